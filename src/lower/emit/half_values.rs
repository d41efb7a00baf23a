//! The context `w · V` of half-precision V, each chunk of V widened to
//! f32 once for every tile of rows.
//!
//! The context einsum `..c..y,cyz->..c..z` of bifurcated attention (the
//! probabilities of one head `c`'s rows against the context cache `V [g,
//! m_c, k]`) in f16, or in bf16 where the CPU has no bf16 instruction to
//! sum it with, ran as the strided contraction's tiles of 4 rows × 4
//! vectors of 16 outputs, in chunks of V's rows (`emit::chunks`): each
//! step of the sum widened V's 64 halves again in every tile of rows (f16:
//! four `vcvtph2ps`, 8 operations on AVX-512's two FMA pipes beside the
//! step's 16 FMAs), at about half the FMA peak.
//!
//! Here ([`Kc::half_values`]) the kernel's items are (head, 64 of its
//! outputs, group of up to 64 of its rows), split into parts, and each
//! item's sums run as a projection's from half panels do
//! (`emit::half_panels`, [`Kc::chunked_sums`]): a chunk of 64 of V's
//! rows (their 64 halves of the item's outputs, a pitch apart) widened
//! once into an f32 slot, every tile of rows summing it from there, the
//! sums carried in a slot from chunk to chunk and stored at the end,
//! rounded to the output's dtype. Each output's sum runs in the order of
//! the context, with the same FMAs from the same zeros: the same bits as
//! the tiles.

use crate::ir::DType;
use crate::lower::LowerError;

use super::amx_values::{ValueRows, ValueSizes};
use super::bodies::Out;
use super::half_panels::{ChunkedSum, GROUP_ROWS, PANEL_OUTPUTS};
use super::Kc;

/// A context `w · V` of half V widened a chunk at a time (see the module
/// docs).
pub(super) struct HalfValues {
    /// The probabilities.
    rows: ValueRows,
    /// The context cache's buffer `[g, m_c, k]` (maybe pitched).
    v: usize,
    /// The dtype of both.
    dtype: DType,
    /// The head's axis among the output's.
    head: usize,
    /// The head's length `k`, a multiple of 64.
    width: i64,
}

impl Kc<'_> {
    /// Node `j` as a [`HalfValues`] contraction: in wide tiles (see
    /// [`Kc::chunks_widened`]) the CPU einsum of probabilities `w` (`[..,
    /// m]`, dense through order-keeping views, or a slice of the rows of
    /// such a buffer: [`Kc::value_rows`]) and a stored context cache `V [g,
    /// m, k]` (letters `c y z`) of the same dtype, f16 or bf16 widened to
    /// f32 ([`Kc::widens_half`]), into `w`'s leading axes and `k` (the
    /// output's last), `k` a constant multiple of 64.
    pub(super) fn half_values(&self, j: usize, out: &Out) -> Option<HalfValues> {
        if !self.chunks_widened(out) {
            return None;
        }
        let (dtype, h) = [DType::F16, DType::BF16]
            .into_iter()
            .filter(|&d| self.widens_half(d))
            .find_map(|d| Some((d, self.head_sum(j, d)?)))?;
        if !(h.sum_first && h.last > 0 && h.last % PANEL_OUTPUTS == 0) {
            return None;
        }
        let rows = self.value_rows(j, &h, dtype)?;
        Some(HalfValues { rows, v: h.buffer, dtype, head: h.head, width: h.last })
    }

    /// The body of [`HalfValues`] contraction `t` (see the module docs): a
    /// loop over (head, 64 of its outputs, group of its rows), split into
    /// parts.
    pub(super) fn half_values_body(
        &mut self,
        out: &Out,
        t: &HalfValues,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        let ValueSizes { lead, heads, rows, positions, row_len, start } = self.value_sizes(out, &t.rows, t.head)?;
        let groups = self.ceil_div(&rows, GROUP_ROWS);
        let blocks = self.b.index(t.width / PANEL_OUTPUTS);
        let item = self.part_range(&[heads.clone(), blocks.clone(), groups.clone()]);
        self.partition = super::Partition::Done;
        *opened += 1;
        let at = self.b.delinearize(&item, &[heads, blocks, groups]);
        let (c, block, g) = (at[0].clone(), at[1].clone(), at[2].clone());
        let (r0, rn) = self.group_rows(&g, &rows);
        let outputs = self.b.index(PANEL_OUTPUTS);
        let e0 = self.b.muli(&block, &outputs);
        // Where each row's probabilities and outputs start.
        let width = self.b.index(t.width);
        let offsets = self.offsets_slot(2 * GROUP_ROWS);
        let r = self.b.open_loop(&rn);
        let row = self.b.addi(&r0, &r);
        let flat = self.head_row(&lead, t.head, &c, &row);
        let p_off = self.b.muli(&flat, &row_len);
        let p_off = self.b.addi(&p_off, &start);
        let o_off = self.b.muli(&flat, &width);
        let o_off = self.b.addi(&o_off, &e0);
        self.note_row_offsets(&offsets, &r, (&p_off, &o_off));
        self.b.close();
        // V's rows of the item's outputs: from position 0, a pitch apart.
        let (zero, one) = (self.b.index(0), self.b.index(1));
        let (v_ptr, v_base) = self.buffer_offset(t.v, &[c.clone(), zero, e0.clone()])?;
        let (_, v_next) = self.buffer_offset(t.v, &[c, one, e0])?;
        let v_step = self.b.subi(&v_next, &v_base);
        let p_ptr = self.ptr(t.rows.p)?;
        let sum = ChunkedSum {
            w: (&v_ptr, t.dtype),
            w_at: (&v_base, &v_step),
            x: (&p_ptr, t.dtype),
            steps: &positions,
            offsets: &offsets,
            rows: &rn,
        };
        self.chunked_sums(out, &sum)?;
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::interp::Tensor;
    use crate::ir::{DType, Graph};
    use crate::lower::emit::half_panels::with_half_panels;
    use crate::lower::emit::testing::{check_parts, chunked_kernels, held_inputs, point};
    use crate::lower::CpuStep;

    /// `graph`'s CPU step in wide tiles without bf16 instructions, half
    /// operands widened a chunk at a time (`on`) or by the tiles at each
    /// step, and its MLIR text.
    fn compile(graph: &Graph, on: bool) -> (CpuStep, String) {
        crate::lower::emit::with_narrow_tiles(false, || {
            crate::lower::emit::with_amx(false, || {
                crate::lower::emit::with_bf16_dot(false, || {
                    with_half_panels(on, || {
                        let step = CpuStep::compile(graph).unwrap_or_else(|e| panic!("{e}"));
                        let text = crate::lower::emit::emit(step.graph(), step.program(), crate::lower::Target::Cpu)
                            .unwrap_or_else(|e| panic!("{e}"));
                        (step, text)
                    })
                })
            })
        })
    }

    /// A context `w · V` of f16 and of bf16 (without bf16 instructions):
    /// multi-head (`bhm,hmk->bhk`) and grouped-query (`bgpm,gmk->bgpk`),
    /// heads of 64 and 128 (two items of outputs a head), f32 outputs (as
    /// bifurcated attention's context part has them) and half ones, the
    /// probabilities their own rows or a slice of longer ones. Widened a
    /// chunk of V at a time, each is one such kernel; it gives the bits of
    /// the tiles that widen V at each step (`emit::chunks`), at context
    /// lengths of none, under, at and past a chunk of 64 and across
    /// several, row counts under, at and past a tile and a group of 64,
    /// the same bytes in any number of parts, and the interpreter's values
    /// within the half dtype's rounding.
    #[test]
    fn chunks_of_v_widened_once_sum_as_the_tiles_do() {
        for dtype in ["f16", "bf16"] {
            for (spec, w_shape, k, out) in [
                ("bhm,hmk->bhk", serde_json::json!(["b", 2, "m"]), 64, "f32"),
                ("bgpm,gmk->bgpk", serde_json::json!(["b", 2, 2, "m"]), 128, "f32"),
                ("bhm,hmk->bhk", serde_json::json!(["b", 2, "m+5"]), 64, dtype),
            ] {
                let graph = values_graph(spec, &w_shape, k, (dtype, out));
                let ((mut chunked, text), (tiles, tiles_text)) = (compile(&graph, true), compile(&graph, false));
                assert_eq!(chunked_kernels(&text), 1, "{dtype} {spec}: V widened a chunk at a time:\n{text}");
                assert_eq!(chunked_kernels(&tiles_text), 0, "{dtype} {spec}: the tiles widen V:\n{tiles_text}");
                let what = format!("{dtype} {spec} k = {k}, {w_shape}");
                for (b, m) in [(1, 7), (3, 64), (4, 65), (5, 1030), (33, 100), (64, 130), (65, 3), (2, 0)] {
                    let at = point(&[("b", b), ("m", m)]);
                    let held = DType::parse(dtype).unwrap_or_else(|e| panic!("{e}"));
                    let inputs = held_inputs(&graph, &at, 5, held);
                    let run = |step: &CpuStep| -> HashMap<String, Tensor> {
                        step.run(&at, &inputs).unwrap_or_else(|e| panic!("{what}, b = {b}, m = {m}: {e}"))
                    };
                    let (got, want) = (run(&chunked), run(&tiles));
                    let bits = |t: &Tensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got["o"]), bits(&want["o"]), "{what}, b = {b}, m = {m}: chunks against tiles");
                    near_interpreter(&graph, &at, &inputs, &got["o"], &format!("{what}, b = {b}, m = {m}"));
                    if [(5, 1030), (65, 3)].contains(&(b, m)) {
                        check_parts(&mut chunked, &at, &inputs, &got, &["o"]);
                    }
                }
            }
        }
    }

    /// With V a context cache stored with spare rows (its capacity past
    /// m, filled with NaN), the chunks step through V's rows by its
    /// capacity and read no spare row: the interpreter's values on the
    /// dense V.
    #[test]
    fn chunks_of_v_walk_a_cache_with_spare_rows() {
        let graph = values_graph("bhm,hmk->bhk", &serde_json::json!(["b", 2, "m"]), 128, ("f16", "f32"));
        let (step, text) = compile(&graph, true);
        assert_eq!(chunked_kernels(&text), 1, "V widened a chunk at a time:\n{text}");
        for (b, m) in [(8, 129), (5, 70)] {
            let at = point(&[("b", b), ("m", m)]);
            let inputs = held_inputs(&graph, &at, 11, DType::F16);
            let (cap, m) = (m as usize + 5, m as usize);
            let mut spare = Tensor::full(vec![2, cap, 128], f32::NAN);
            for (row, data) in inputs["vc"].data.chunks(128).enumerate() {
                let (g, r) = (row / m, row % m);
                spare.data[(g * cap + r) * 128..][..128].copy_from_slice(data);
            }
            let mut pitched = inputs.clone();
            pitched.insert("vc".into(), spare);
            let caps = point(&[("m", cap as i64)]);
            let got = step.run_with_capacity(&at, &caps, &pitched).unwrap_or_else(|e| panic!("{e}"));
            near_interpreter(&graph, &at, &inputs, &got["o"], &format!("b = {b}, m = {m}, capacity {cap}"));
        }
    }

    /// The context `w · V` `spec` of probabilities `w_shape` (a slice of
    /// each row when its last size is `m+5`) and a context cache `vc`
    /// `[2, m, k]`, in `dtype`, its output in `out`.
    fn values_graph(spec: &str, w_shape: &serde_json::Value, k: i64, (dtype, out): (&str, &str)) -> Graph {
        let sliced = w_shape.as_array().and_then(|s| s.last()).is_some_and(|m| m == "m+5");
        let w = if sliced { "ws" } else { "w" };
        let mut nodes = vec![
            serde_json::json!({"id": "o", "op": "einsum", "inputs": [w, "vc"], "attrs": {"spec": spec}, "dtype": out}),
        ];
        if sliced {
            let axis = w_shape.as_array().map_or(0, |s| s.len() - 1);
            let slice = serde_json::json!(
                {"id": "ws", "op": "slice", "inputs": ["w"], "attrs": {"axis": axis, "start": 3, "end": "m+3"}}
            );
            nodes.insert(0, slice);
        }
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {}},
            "inputs": [
                {"name": "w", "role": "activation", "shape": w_shape, "dtype": dtype},
                {"name": "vc", "role": "context_kv", "layer": 0, "kv": "v", "shape": [2, "m", k], "dtype": dtype}
            ],
            "nodes": nodes,
            "outputs": [{"name": "o", "node": "o"}]
        });
        crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `got` against the interpreter's `o` on the same (half-held) inputs:
    /// the sums differ in the order of f32 additions and the output's
    /// rounding alone (half a bf16 ulp, 2^-9 of it).
    fn near_interpreter(
        graph: &Graph,
        at: &std::collections::BTreeMap<String, i64>,
        inputs: &HashMap<String, Tensor>,
        got: &Tensor,
        what: &str,
    ) {
        let want = crate::interp::run(graph, at, inputs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.shape, want["o"].shape, "{what}");
        let top = want["o"].data.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (i, (x, y)) in got.data.iter().zip(&want["o"].data).enumerate() {
            let tol = y.abs() / 256.0 + top / 4096.0;
            assert!((x - y).abs() <= tol, "{what}: element {i}: {x} vs {y}");
        }
    }
}
