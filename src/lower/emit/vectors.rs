//! CPU contractions vectorized along the output's last axis when their sum
//! walks an operand with a stride: `w · V` over a per-sample cache,
//! `probs [.., m] @ values [.., m, k]`, where computing one output at a
//! time reads each row of V once per output. Here each step of the sum
//! loads a vector of V's row through the views (broadcast, concat,
//! reshape, transpose, slice keep its last axis the stored buffer's
//! innermost) and the other operand's element once, broadcast.

use crate::ir::{Op, Value};
use crate::lower::LowerError;

use super::bodies::Out;
use super::{walk_index, Kc};

impl Kc<'_> {
    /// Whether `v` can be read as vectors along its last axis: it is float
    /// data (f16 / bf16 widened to f32 lanes) whose last axis is, through
    /// its views, the innermost axis of a stored buffer (a concat is on
    /// another axis; a broadcast does not stretch it; a transpose and a
    /// reshape keep it last; a slice of it starts and ends on whole
    /// vectors).
    pub(crate) fn vector_readable(&self, v: Value) -> bool {
        if !self.graph.dtype_of(v).is_float() {
            return false;
        }
        if let Some(b) = self.stored(v) {
            return self.program.buffers[b].dtype.is_float();
        }
        let Value::Node(j) = v else { return false };
        let node = &self.graph.nodes[j];
        let rank = node.shape.len();
        let Some(&first) = node.inputs.first() else { return false };
        let in_shape = self.graph.shape_of(first);
        let last_kept = || match (node.shape.last(), in_shape.last()) {
            (Some(a), Some(b)) => self.graph.dims.same(a, b),
            _ => false,
        };
        // A constant multiple of the lanes: vectors that start at a
        // multiple of the lanes along it never cross its rows.
        let whole_vectors = |p: Option<&crate::ir::Poly>| {
            p.and_then(|p| self.constant_size(p)).is_some_and(|n| self.simd > 0 && n % self.simd as i64 == 0)
        };
        match &node.op {
            Op::Transpose { perm } => perm.last() == Some(&(rank.wrapping_sub(1))) && self.vector_readable(first),
            Op::Broadcast { .. } => last_kept() && self.vector_readable(first),
            // A slice on another axis keeps the last; one along the last
            // axis (GPT-2's q, k, v out of one `c_attn` row) starts and
            // ends on whole vectors, so none crosses its ends.
            Op::Slice { axis, start, .. } => {
                let kept = if *axis + 1 == rank {
                    whole_vectors(Some(start)) && whole_vectors(node.shape.last())
                } else {
                    last_kept()
                };
                kept && self.vector_readable(first)
            }
            // The last axis the same, or split / merged in whole vectors
            // (`[.., g·k]` as `[.., g, k]`): consecutive lanes stay
            // consecutive elements of the input's last axis.
            Op::Reshape { .. } => {
                let same = last_kept() && whole_vectors(node.shape.last());
                (same || (whole_vectors(node.shape.last()) && whole_vectors(in_shape.last())))
                    && self.vector_readable(first)
            }
            Op::Concat { axis } => *axis + 1 != rank && node.inputs.iter().all(|&p| self.vector_readable(p)),
            _ => false,
        }
    }

    /// `lanes` consecutive elements of `v` from `idx` along its last axis
    /// (see [`Kc::vector_readable`]), as a `vector<lanes x f32>`.
    pub(crate) fn load_vector_view(&mut self, v: Value, idx: &[String], lanes: usize) -> Result<String, LowerError> {
        if let Some(b) = self.stored(v) {
            return self.load_vector(b, idx, lanes);
        }
        let j = match v {
            Value::Node(j) => j,
            Value::Input(_) => {
                return Err(LowerError::Unsupported {
                    node: self.graph.name_of(v).to_owned(),
                    message: "graph input has no buffer in the program".into(),
                })
            }
        };
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let first = *inputs.first().ok_or_else(|| self.unsupported(j, "view without an input"))?;
        match op {
            Op::Concat { axis } => {
                let bounds = self.concat_offsets(&inputs, axis).unwrap_or_default();
                match self.pinned_part(&idx[axis], &bounds) {
                    // The index stays in part p (a sum split there).
                    Some(p) => self.concat_vector(&inputs[p..=p], axis, 0, bounds[p].clone(), idx, lanes),
                    None => self.concat_vector(&inputs, axis, 0, crate::ir::Poly::zero(), idx, lanes),
                }
            }
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Broadcast { .. } | Op::Slice { .. } => {
                // The scalar index map, applied to the first lane: the
                // last axis maps to the input's last (checked by
                // `vector_readable`), so the lanes stay consecutive.
                let inner = self.view_index(j, idx)?;
                self.load_vector_view(first, &inner, lanes)
            }
            _ => Err(self.unsupported(j, "not a vector-readable view")),
        }
    }

    /// Part `k` (or a later one) of a concat along `axis` (not the last),
    /// as vectors: `start` is where part `k` begins.
    fn concat_vector(
        &mut self,
        parts: &[Value],
        axis: usize,
        k: usize,
        start: crate::ir::Poly,
        idx: &[String],
        lanes: usize,
    ) -> Result<String, LowerError> {
        let part = parts[k];
        let len = self.graph.shape_of(part).get(axis).cloned().unwrap_or_else(crate::ir::Poly::zero);
        let end =
            start.add(&len).map_err(|e| LowerError::Size { what: "concat offset".into(), message: e.to_string() })?;
        let vty = format!("vector<{lanes}xf32>");
        let read = |kc: &mut Self| -> Result<String, LowerError> {
            let mut inner = idx.to_vec();
            let s = kc.sizes(std::slice::from_ref(&start))?.remove(0);
            inner[axis] = kc.b.subi(&idx[axis], &s);
            kc.load_vector_view(part, &inner, lanes)
        };
        if k + 1 == parts.len() {
            return read(self);
        }
        let e = self.sizes(std::slice::from_ref(&end))?.remove(0);
        let cond = self.b.ult(&idx[axis], &e);
        let r = self.b.open_if_typed(&cond, &vty);
        let a = read(self)?;
        self.b.else_branch_typed(&a, &vty);
        let rest = self.concat_vector(parts, axis, k + 1, end, idx, lanes)?;
        self.b.close_if_typed(&rest, &vty);
        Ok(r)
    }

    /// Lanes of a CPU matmul `a @ b` (not transposed) vectorized along
    /// the output's last axis: float output (`out_float`), a last axis of
    /// a constant multiple of [`Kc::simd`], and `b` readable as vectors
    /// along its last axis (so its summed axis is not innermost: the
    /// strided case).
    pub(crate) fn matmul_lanes(&self, j: usize, out_float: bool) -> Option<usize> {
        let node = self.graph.nodes.get(j)?;
        let Op::MatMul { transpose_b: false } = node.op else { return None };
        let n = self.graph.dims.normalize(node.shape.last()?).ok()?.as_constant()?;
        let lanes = self.simd;
        if lanes == 0 || !out_float || n <= 0 || n % lanes as i64 != 0 {
            return None;
        }
        let (&a, &b) = (node.inputs.first()?, node.inputs.get(1)?);
        let sb = self.graph.shape_of(b);
        if self.graph.shape_of(a).len() < 2 || sb.len() < 2 || !self.vector_readable(b) {
            return None;
        }
        Some(lanes)
    }

    /// Matmul node `j` at every index of `idxs`: the `lanes` outputs from
    /// each along the last axis, one vector accumulator each, in one loop
    /// over the summed index (each output's sum in its order, as the
    /// scalar kernel's); an element of `a` shared by several is loaded
    /// once per step.
    fn matmul_vector(&mut self, j: usize, idxs: &[Vec<String>], lanes: usize) -> Result<Vec<String>, LowerError> {
        let node = &self.graph.nodes[j];
        let (a, bv) = match node.inputs.as_slice() {
            [a, b] => (*a, *b),
            _ => return Err(self.unsupported(j, "matmul without two operands")),
        };
        let (sa, sb) = (self.graph.shape_of(a).clone(), self.graph.shape_of(bv).clone());
        let r = idxs.first().map_or(0, Vec::len);
        if sa.len() < 2 || sb.len() < 2 || r < 2 || sa.len() > r || sb.len() > r || idxs.iter().any(|i| i.len() != r) {
            return Err(self.unsupported(j, "matmul ranks"));
        }
        let vty = format!("vector<{lanes}xf32>");
        let kdim = sa[sa.len() - 1].clone();
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        // One loop per part of a concat either operand reads along the
        // sum (the baseline's `p @ concat(V_context, V_decode, v_new)`).
        let segments = self.sum_segments(&[(a, sa.len() - 1), (bv, sb.len() - 2)], &kdim);
        self.sum_over(&segments, &vec![zero; idxs.len()], &vty, |kc, kk, accs| {
            let mut shared: Vec<(Vec<String>, String)> = Vec::new();
            let mut nexts = Vec::with_capacity(idxs.len());
            for (idx, acc) in idxs.iter().zip(accs) {
                let (ia, ib) = kc.matmul_operand_indices((&sa, &sb), idx, kk, false);
                let x = match shared.iter().find(|(at, _)| *at == ia) {
                    Some((_, x)) => x.clone(),
                    None => {
                        let x = kc.loadf(a, &ia)?;
                        let x = kc.b.op(&format!("vector.broadcast {x} : f32 to {vty}"));
                        shared.push((ia, x.clone()));
                        x
                    }
                };
                let y = kc.load_vector_view(bv, &ib, lanes)?;
                let p = kc.b.op(&format!("arith.mulf {x}, {y} fastmath<{}> : {vty}", super::contract::CONTRACT));
                nexts.push(kc.b.op(&format!("arith.addf {acc}, {p} fastmath<{}> : {vty}", super::contract::CONTRACT)));
            }
            Ok(nexts)
        })
    }

    /// The lanes of [`Kc::vector_body`] for node `j` (walked `walk` into
    /// `out`) on the CPU: a float output, no operand reused across outputs
    /// (a row-major walk, or reuse axes all of size 1), and a matmul or
    /// einsum whose strided operand reads as vectors.
    pub(super) fn vector_lanes(&self, j: usize, walk: &super::walk::Walk, out: &Out) -> Option<usize> {
        if self.partition != super::Partition::Pending || !out.dtype.is_float() {
            return None;
        }
        let node = self.graph.nodes.get(j)?;
        let no_reuse = match walk {
            super::walk::Walk::RowMajor => true,
            super::walk::Walk::Reuse { reuse, .. } => reuse.iter().all(|&a| self.is_one(&node.shape[a])),
            _ => false,
        };
        if !no_reuse {
            return None;
        }
        let n = self.graph.dims.normalize(node.shape.last()?).ok()?.as_constant();
        self.matmul_lanes(j, true).or_else(|| self.out_lanes(j, n, true))
    }

    /// A contraction walked along its output with the last axis in vectors
    /// of `lanes` (see [`Kc::matmul_lanes`], [`Kc::out_lanes`]): each
    /// iteration computes and stores one vector of outputs.
    pub(super) fn vector_body(
        &mut self,
        out: &Out,
        j: usize,
        lanes: usize,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        let rank = out.sizes.len();
        let mut walk = out.sizes.clone();
        let last = walk.last().cloned().ok_or_else(|| self.unsupported(j, "a scalar output"))?;
        // Up to VECTOR_GROUPS vectors along the last axis at once: each
        // step of the sum then reads one stretch of a row of the strided
        // operand for all of them (one vector at a time would walk the
        // whole operand once per vector).
        let groups = super::bodies::vector_groups(self.b.known(&last), lanes);
        let step = self.b.index((lanes * groups) as i64);
        walk[rank - 1] = self.b.hoist(&format!("arith.divui {last}, {step} : index"));
        let mut idx = walk_index(self, out.target, &out.flat, &walk, false, opened);
        idx[rank - 1] = self.b.muli(&idx[rank - 1], &step);
        let idxs = self.spread(&idx, rank - 1, groups, lanes);
        let vs = if matches!(self.graph.nodes[j].op, Op::MatMul { .. }) {
            self.matmul_vector(j, &idxs, lanes)?
        } else {
            self.einsum_out_vec(j, &idxs, lanes, (None, None))?
        };
        for (at, v) in idxs.iter().zip(&vs) {
            let off = self.b.linearize(at, &out.sizes);
            self.b.store_vector(&out.ptr, &off, v, lanes, out.dtype);
        }
        self.b.size(&out.kernel.extent)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use crate::interp::Tensor;
    use crate::ir::DType;
    use crate::lower::emit::{emit, Target};
    use crate::lower::CpuStep;

    /// Grouped-query attention's context `q · K` with the query a reshape
    /// of its projection (`[b, 1, g·p·k]` as `[b, g, p, 1, k]`): the sum
    /// over k runs in explicit vectors read through the reshape, not as a
    /// scalar loop that LLVM vectorized across a short tile's rows with
    /// gathers (5x slower at b = 1, where the tile's rows are the p heads
    /// of a group). Against the interpreter at b from 1 to past a tile.
    #[test]
    fn contraction_reads_vectors_through_a_reshaped_operand() {
        let (graph, step, text) =
            crate::lower::emit::testing::cpu_step(&crate::lower::emit::testing::reshaped_gqa_scores_doc());
        // One output at a time (b = 1): a loop of one vector accumulator.
        assert!(text.contains("-> (vector<16xf32>) {"), "the sum over k in vectors:\n{text}");
        for (b, m) in [(1, 40), (3, 17), (5, 64)] {
            let at = crate::lower::emit::testing::point(&[("b", b), ("m", m)]);
            crate::lower::emit::testing::check_output(&graph, &step, &at, 6, "s", (1e-5, 1e-5));
        }
    }

    /// `probs @ concat(broadcast(V_ctx), V_dec, V_new)` with the new row
    /// from a split projection (`[b, 1, g·k]` as `[b, g, 1, k]`): the
    /// baseline's `w · V` over the per-sample cache, read in vectors
    /// through every view (both 16-wide halves of a row in one walk),
    /// against the interpreter at ragged points, the decode cache dense and
    /// with spare rows.
    #[test]
    fn strided_matmul_reads_vectors_through_views() {
        strided_matmul(DType::F32, 1e-5);
    }

    /// The same in bf16 and f16: 16 stored halves widened to f32 lanes,
    /// summed in f32, rounded once at the store (the scalar kernel's
    /// rounding; the interpreter rounds each node to the dtype too).
    #[test]
    fn strided_matmul_reads_half_vectors() {
        strided_matmul(DType::BF16, 1e-2);
        strided_matmul(DType::F16, 2e-3);
    }

    fn strided_matmul(dtype: DType, tol: f32) {
        let dt = crate::lower::emit::builder::storage(dtype);
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m_c", "m_d"], "constants": {"g": 2, "k": 32}},
            "inputs": [
                {"name": "p", "role": "activation", "shape": ["b", "g", 1, "m_c+m_d+1"], "dtype": dt},
                {"name": "v_ctx", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["g", "m_c", "k"], "dtype": dt},
                {"name": "v_dec", "role": "decode_kv", "layer": 0, "kv": "v", "shape": ["b", "g", "m_d", "k"], "dtype": dt},
                {"name": "v_proj", "role": "activation", "shape": ["b", 1, "g*k"], "dtype": dt}
            ],
            "nodes": [
                {"id": "v_split", "op": "reshape", "inputs": ["v_proj"], "attrs": {"shape": ["b", 1, "g", "k"]}},
                {"id": "v_new", "op": "transpose", "inputs": ["v_split"], "attrs": {"perm": [0, 2, 1, 3]}},
                {"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}},
                {"id": "v_all", "op": "concat", "inputs": ["v_ctx_b", "v_dec", "v_new"], "attrs": {"axis": 2}},
                {"id": "o", "op": "matmul", "inputs": ["p", "v_all"]}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        });
        let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
        let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
        let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
        // bf16 is stored as its bits (`emit::round_bf16`).
        let st = if dt == "bf16" { "i16" } else { dt };
        assert!(
            text.contains(&format!("-> vector<16x{dt}>")) && text.contains(&format!(": vector<16x{st}>, !llvm.ptr")),
            "the {dt} matmul reads and writes vectors:\n{text}"
        );
        // Both vectors of a 32-wide row in one walk of the cache, the walk
        // split at the concat's three parts (each part read without a
        // branch: no `scf.if` choosing one at every step).
        let sums = text.matches("-> (vector<16xf32>, vector<16xf32>) {").count();
        assert_eq!(sums, 3, "two vectors per step, one loop per part:\n{text}");
        assert!(!text.contains("-> (vector<16xf32>) {\n"), "no per-step choice of a part:\n{text}");
        for (b, m_c, m_d) in [(3, 5, 2), (1, 0, 0), (2, 17, 3), (4, 1, 7)] {
            let point = BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)]);
            let inputs = crate::interp::random_inputs(&graph, &point, 11).unwrap_or_else(|e| panic!("{e}"));
            let want = crate::interp::run(&graph, &point, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let got = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
            close(&got["o"], &want["o"], tol, &format!("{dt} dense at {point:?}"));
            // The decode cache with two spare rows of garbage per (b, g).
            let cap = m_d as usize + 2;
            let dense = &inputs["v_dec"];
            let mut spare = Tensor::full(vec![b as usize, 2, cap, 32], f32::NAN);
            for (row, chunk) in dense.data.chunks(32).enumerate() {
                let (bg, r) = (row / m_d.max(1) as usize, row % m_d.max(1) as usize);
                let at = (bg * cap + r) * 32;
                spare.data[at..at + 32].copy_from_slice(chunk);
            }
            let mut pitched: HashMap<String, Tensor> = inputs.clone();
            pitched.insert("v_dec".into(), spare);
            let caps = BTreeMap::from([("m_d".to_string(), cap as i64)]);
            let got = step.run_with_capacity(&point, &caps, &pitched).unwrap_or_else(|e| panic!("{e}"));
            close(&got["o"], &want["o"], tol, &format!("{dt} with spare rows at {point:?}"));
        }
    }

    /// The same sum as an einsum (`bgm,bgmk->bgk` over `concat(V_context
    /// broadcast, V_decode)`): one loop per part there too, against the
    /// interpreter with either part empty.
    #[test]
    fn einsum_sums_split_at_concat_parts() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m_c", "m_d"], "constants": {"g": 2, "k": 32}},
            "inputs": [
                {"name": "p", "role": "activation", "shape": ["b", "g", "m_c+m_d"], "dtype": "f32"},
                {"name": "v_ctx", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["g", "m_c", "k"], "dtype": "f32"},
                {"name": "v_dec", "role": "decode_kv", "layer": 0, "kv": "v", "shape": ["b", "g", "m_d", "k"], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}},
                {"id": "v_all", "op": "concat", "inputs": ["v_ctx_b", "v_dec"], "attrs": {"axis": 2}},
                {"id": "o", "op": "einsum", "inputs": ["p", "v_all"], "attrs": {"spec": "bgm,bgmk->bgk"}}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        });
        let (graph, step, text) = crate::lower::emit::testing::cpu_step(&doc);
        let sums = text.matches("-> (vector<16xf32>, vector<16xf32>) {").count();
        assert_eq!(sums, 2, "one loop per part:\n{text}");
        assert!(!text.contains("-> (vector<16xf32>) {\n"), "no per-step choice of a part:\n{text}");
        for (b, m_c, m_d) in [(3, 5, 2), (2, 0, 3), (2, 17, 0), (1, 0, 0)] {
            let at = crate::lower::emit::testing::point(&[("b", b), ("m_c", m_c), ("m_d", m_d)]);
            crate::lower::emit::testing::check_output(&graph, &step, &at, 4, "o", (1e-5, 1e-5));
        }
    }

    /// A batched `p @ V` whose rows share V (`[b, h, n, m] @ [b, h, m, k]`,
    /// the unbifurcated attention of a prefill step, n > 1): read as the
    /// einsum `abmk,abkn->abmn`, it runs in register tiles of output
    /// vectors (8 rows x 2 vectors of 16 for k = 32), not the scalar tile
    /// (a prefill step's `w·V` at m_c = 4096: 43 -> 5.3 ms); against the
    /// interpreter with a short last tile (n = 12).
    #[test]
    fn batched_matmul_rows_share_vectors() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "n": 12, "k": 32}},
            "inputs": [
                {"name": "p", "role": "activation", "shape": ["b", "h", "n", "m"], "dtype": "f32"},
                {"name": "v", "role": "activation", "shape": ["b", "h", "m", "k"], "dtype": "f32"}
            ],
            "nodes": [{"id": "o", "op": "matmul", "inputs": ["p", "v"]}],
            "outputs": [{"name": "o", "node": "o"}]
        });
        let (graph, step, text) = crate::lower::emit::testing::cpu_step(&doc);
        let tile = format!("-> ({}) {{", vec!["vector<16xf32>"; 16].join(", "));
        assert!(text.contains(&tile), "8 rows x 2 output vectors:\n{text}");
        for (b, m) in [(1, 5), (3, 17), (2, 0)] {
            let at = crate::lower::emit::testing::point(&[("b", b), ("m", m)]);
            crate::lower::emit::testing::check_output(&graph, &step, &at, 8, "o", (1e-5, 1e-5));
        }
    }

    /// Multi-query attention's `w · V` (`bhm,cmk->bhk`, V `[1, m, k]`):
    /// the summed letter of size 1 has no loop and is read at 0, so the
    /// sum over m runs in output vectors (bf16: in pairs formed from V's
    /// rows, by the dot product where the CPU has it), not in the scalar
    /// tile. Against the interpreter at b on both sides of a tile.
    #[test]
    fn unit_summed_letter_reads_at_zero() {
        for (dtype, tol) in [("f32", 1e-5), ("bf16", 2e-2)] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {"h": 3, "c": 1, "k": 64}},
                "inputs": [
                    {"name": "w", "role": "activation", "shape": ["b", "h", "m"], "dtype": dtype},
                    {"name": "v", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["c", "m", "k"], "dtype": dtype}
                ],
                "nodes": [{"id": "o", "op": "einsum", "inputs": ["w", "v"], "attrs": {"spec": "bhm,cmk->bhk"}}],
                "outputs": [{"name": "o", "node": "o"}]
            });
            let (graph, step, text) = crate::lower::emit::testing::cpu_step(&doc);
            let pairs = dtype == "bf16" && crate::lower::emit::host_has_bf16_dot();
            assert_eq!(text.contains("dpbf16ps"), pairs, "{dtype}:\n{text}");
            let tile = format!("-> ({}) {{", vec!["vector<16xf32>"; 16].join(", "));
            assert!(text.contains(&tile), "{dtype}: 4 rows x 4 output vectors:\n{text}");
            for (b, m) in [(1, 5), (3, 17), (9, 64), (2, 0)] {
                let at = crate::lower::emit::testing::point(&[("b", b), ("m", m)]);
                crate::lower::emit::testing::check_output(&graph, &step, &at, 8, "o", (tol, tol));
            }
        }
    }

    /// A projection by a matrix stored `[in, out]` (`x @ W`, GPT-2's
    /// Conv1D) from q, k and v sliced out of one row along its last axis
    /// (`c_attn`): the matmul runs in register tiles of output vectors
    /// (4 rows x 4 vectors of 16, as `w · V`), not the scalar tile, and
    /// the slices at whole vectors read as vectors (the q · K below sums
    /// in them: its tree); a slice starting mid-vector is read element by
    /// element. In f32 (`W` an activation: an f32 weight is kept
    /// transposed, see `cpu::layout`) and in bf16 (a weight; stored halves
    /// widened). Against the interpreter at b on both sides of a tile.
    #[test]
    fn weight_matmul_and_last_axis_slices_read_vectors() {
        let cases = [("f32", 32, true, 1e-5), ("f32", 8, false, 1e-5), ("bf16", 32, true, 2e-2)];
        for (dtype, start, sliced_in_vectors, tol) in cases {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {"d": 48, "h": 2, "k": 32}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": dtype},
                    {"name": "w", "role": if dtype == "f32" { "activation" } else { "weight" }, "shape": ["d", "3*h*k"], "dtype": dtype},
                    {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["h", "m", "k"], "dtype": dtype}
                ],
                "nodes": [
                    {"id": "qkv", "op": "matmul", "inputs": ["x", "w"]},
                    {"id": "heads", "op": "reshape", "inputs": ["qkv"], "attrs": {"shape": ["b", "h", "3*k"]}},
                    {"id": "q", "op": "slice", "inputs": ["heads"], "attrs": {"axis": 2, "start": start, "end": start + 32}},
                    {"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "bhk,hmk->bhm"}}
                ],
                "outputs": [{"name": "qkv", "node": "qkv"}, {"name": "s", "node": "s"}]
            });
            let (graph, step, text) = crate::lower::emit::testing::cpu_step(&doc);
            let tile = format!("-> ({}) {{", vec!["vector<16xf32>"; 16].join(", "));
            assert!(text.contains(&tile), "{dtype} x @ W in 4 x 4 output vectors:\n{text}");
            assert_eq!(text.contains("vector.shuffle"), sliced_in_vectors, "{dtype} slice at {start}:\n{text}");
            for (b, m) in [(1, 3), (4, 16), (5, 33), (9, 0)] {
                let at = crate::lower::emit::testing::point(&[("b", b), ("m", m)]);
                for name in ["qkv", "s"] {
                    crate::lower::emit::testing::check_output(&graph, &step, &at, 5, name, (tol, tol));
                }
            }
        }
    }

    fn close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
        assert_eq!(got.shape, want.shape, "{what}");
        for (i, (x, y)) in got.data.iter().zip(&want.data).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}: element {i}: {x} vs {y}");
        }
    }
}
