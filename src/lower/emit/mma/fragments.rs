//! A lane's share of a tensor-core step: which rows it reads, its fragments
//! (loaded element by element through views, or as 32-bit pairs from a
//! stored buffer), the operand indices of a contraction, and the index
//! arithmetic of tiles (see the parent module for the layout).

use crate::ir::{DType, Op, Value};
use crate::lower::mma::{Mma, CHUNK_K, TILE_K};
use crate::lower::LowerError;

use super::super::builder::{storage, Ty};
use super::super::Kc;
use super::{MmaMode, Tile};

/// Two elements of a fragment (one 32-bit register): loaded one by one
/// (f32, already rounded to the operand type), or together.
#[derive(Clone)]
pub(super) enum Pair {
    Values(String, String),
    /// A `vector<2 x bf16/f16>`.
    Packed(String),
}

/// One `mma.sync`'s register pairs of a lane: A's four, B's two.
pub(super) type Step = (Vec<Pair>, Vec<Pair>);

/// A lane's operand rows: A's output index for its two rows (`g`, `g + 8`)
/// and B's for its column (`g`), clamped into range.
pub(super) struct LaneRows {
    a: [Vec<String>; 2],
    b: Vec<String>,
    t: String,
}

impl Kc<'_> {
    pub(super) fn lane_group(&mut self, lane: &str) -> (String, String) {
        let four = self.b.index(4);
        let g = self.b.op(&format!("arith.divui {lane}, {four} : index"));
        let t = self.b.op(&format!("arith.remui {lane}, {four} : index"));
        (g, t)
    }

    pub(super) fn lane_rows(&mut self, tile: &Tile, n0: &str, lane: &str) -> Result<LaneRows, LowerError> {
        let (g, t) = self.lane_group(lane);
        let one = self.b.index(1);
        let m_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.m));
        let n_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.n));
        let mut a = [Vec::new(), Vec::new()];
        for (h, slot) in a.iter_mut().enumerate() {
            let r = self.offset(&g, 8 * h as i64);
            let m = self.b.addi(&tile.m0, &r);
            let m = self.b.op(&format!("arith.minui {m}, {m_last} : index"));
            let mi = self.b.delinearize(&m, &tile.m_sizes);
            let zeros: Vec<String> = tile.n_sizes.iter().map(|_| self.b.index(0)).collect();
            *slot = self.tile_index(tile, &mi, &zeros)?;
        }
        let n = self.b.addi(n0, &g);
        let n = self.b.op(&format!("arith.minui {n}, {n_last} : index"));
        let ni = self.b.delinearize(&n, &tile.n_sizes);
        let zeros: Vec<String> = tile.m_sizes.iter().map(|_| self.b.index(0)).collect();
        let b = self.tile_index(tile, &zeros, &ni)?;
        Ok(LaneRows { a, b, t })
    }

    /// The lane's fragments of iteration `s` of the reduction walk as
    /// register pairs, one `(A, B)` per step: A's four, B's two (see the
    /// module doc for which elements).
    pub(super) fn fragments(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        s: &str,
    ) -> Result<Vec<Step>, LowerError> {
        if tile.chunked {
            return self.chunk_fragments(j, mma, tile, rows, s);
        }
        let tk = self.b.index(TILE_K);
        let k0 = self.b.muli(s, &tk);
        let two = self.b.index(2);
        let t2 = self.b.muli(&rows.t, &two);
        let base = self.b.addi(&k0, &t2);
        // The four reduction indices a lane reads: 2t, 2t+1, 2t+8, 2t+9.
        let ks: Vec<String> = [0, 1, 8, 9].iter().map(|&d| self.offset(&base, d)).collect();
        let one = self.b.index(1);
        let k_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.k));
        let mut guarded = Vec::with_capacity(4);
        for kv in &ks {
            guarded.push(if tile.ragged_k {
                let ok = self.b.ult(kv, &tile.k);
                let kc = self.b.op(&format!("arith.minui {kv}, {k_last} : index"));
                (kc, Some(ok))
            } else {
                (kv.clone(), None)
            });
        }
        // Elements `at` and `at + 1` (adjacent along the reduction): one
        // 32-bit load where they are adjacent in memory.
        let pair = |kc: &mut Self, p: usize, out_idx: &[String], at: usize| -> Result<Pair, LowerError> {
            if !tile.ragged_k {
                if let Some(v) = kc.vector_load(j, p, out_idx, &guarded[at].0, tile, 2)? {
                    return Ok(Pair::Packed(v));
                }
            }
            let (k0, ok0) = &guarded[at];
            let (k1, ok1) = &guarded[at + 1];
            let x = kc.fragment_element(j, p, out_idx, k0, ok0.as_deref())?;
            let y = kc.fragment_element(j, p, out_idx, k1, ok1.as_deref())?;
            Ok(Pair::Values(x, y))
        };
        // A: (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..).
        let mut a = Vec::with_capacity(4);
        for (h, at) in [(0, 0), (1, 0), (0, 2), (1, 2)] {
            a.push(pair(self, mma.a, &rows.a[h], at)?);
        }
        let mut b = Vec::with_capacity(2);
        for at in [0, 2] {
            b.push(pair(self, mma.b, &rows.b, at)?);
        }
        Ok(vec![(a, b)])
    }

    /// The chunked walk's fragments of chunk `c` (see the module doc): each
    /// row's eight elements from `32 c + 8 t` as four pairs; step `s` takes
    /// pairs `2 s` (slots `2 t, 2 t + 1`) and `2 s + 1` (`2 t + 8, 2 t + 9`).
    fn chunk_fragments(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        c: &str,
    ) -> Result<Vec<Step>, LowerError> {
        let (ck, eight) = (self.b.index(CHUNK_K), self.b.index(8));
        let k0 = self.b.muli(c, &ck);
        let t8 = self.b.muli(&rows.t, &eight);
        let base = self.b.addi(&k0, &t8);
        let a0 = self.row_pairs(j, mma.a, &rows.a[0], &base, tile, mma.dtype)?;
        let a1 = self.row_pairs(j, mma.a, &rows.a[1], &base, tile, mma.dtype)?;
        let b = self.row_pairs(j, mma.b, &rows.b, &base, tile, mma.dtype)?;
        Ok((0..2)
            .map(|s| {
                let a = vec![a0[2 * s].clone(), a1[2 * s].clone(), a0[2 * s + 1].clone(), a1[2 * s + 1].clone()];
                (a, vec![b[2 * s].clone(), b[2 * s + 1].clone()])
            })
            .collect())
    }

    /// Elements `k .. k + 8` of operand `p` at output index `out_idx` as
    /// four register pairs (operand type `dtype`): one 16-byte load where
    /// the operand allows it, else 32-bit pairs or single elements.
    fn row_pairs(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
        tile: &Tile,
        dtype: DType,
    ) -> Result<Vec<Pair>, LowerError> {
        if let Some(v) = self.vector_load(j, p, out_idx, k, tile, 8)? {
            let st = storage(dtype);
            return Ok((0..4)
                .map(|q| {
                    Pair::Packed(self.b.op(&format!(
                        "llvm.shufflevector {v}, {v} [{}, {}] : vector<8x{st}>",
                        2 * q,
                        2 * q + 1
                    )))
                })
                .collect());
        }
        let mut pairs = Vec::with_capacity(4);
        for q in 0..4 {
            let kq = self.offset(k, 2 * q);
            if let Some(v) = self.vector_load(j, p, out_idx, &kq, tile, 2)? {
                pairs.push(Pair::Packed(v));
                continue;
            }
            let kq1 = self.offset(&kq, 1);
            let x = self.fragment_element(j, p, out_idx, &kq, None)?;
            let y = self.fragment_element(j, p, out_idx, &kq1, None)?;
            pairs.push(Pair::Values(x, y));
        }
        Ok(pairs)
    }

    /// Element `k` of operand `p` at output index `out_idx` as f32: a value
    /// of the operand type widened (the form reads only bf16 / f16 buffers,
    /// see `mma_form`), so packing it back into a register pair is exact;
    /// zero where `ok` (the reduction's bound check) is false.
    fn fragment_element(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
        ok: Option<&str>,
    ) -> Result<String, LowerError> {
        let idx = self.contraction_operand_index(j, p, out_idx, k)?;
        let v = self.graph.nodes[j].inputs[p];
        let x = self.load(v, &idx)?;
        let x = self.b.coerce(x, Ty::F32).ssa;
        Ok(match ok {
            Some(ok) => {
                let z = self.b.f32(0.0);
                self.b.op(&format!("arith.select {ok}, {x}, {z} : f32"))
            }
            None => x,
        })
    }

    /// Elements `k .. k + lanes` of operand `p` as one `vector<lanes x
    /// bf16/f16>` load, when the operand is a bf16 / f16 buffer (the
    /// contraction's operand type, see `mma_form`), stored or seen through
    /// reshapes ([`Kc::row_major_source`]), whose last axis is the
    /// reduction, of constant length a multiple of `lanes` (`k` is a
    /// multiple of `lanes`, so the load is aligned to its size on the GPU:
    /// buffers are 16-byte aligned); `None` otherwise.
    pub(super) fn vector_load(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
        tile: &Tile,
        lanes: i64,
    ) -> Result<Option<String>, LowerError> {
        let v = self.graph.nodes[j].inputs[p];
        let Some(buf) = self.row_major_source(v) else { return Ok(None) };
        let dtype = self.program.buffers[buf].dtype;
        let shape = self.graph.shape_of(v).clone();
        let fits = shape.last().and_then(|d| self.graph.dims.normalize(d).ok()).and_then(|d| d.as_constant());
        if !matches!(dtype, DType::BF16 | DType::F16) || fits.is_none_or(|d| d % lanes != 0) {
            return Ok(None);
        }
        let idx = self.contraction_operand_index(j, p, out_idx, k)?;
        let Some((last, rest)) = idx.split_last() else { return Ok(None) };
        if last != k || rest.iter().any(|i| i == k) {
            return Ok(None);
        }
        let (ptr, off) = if self.stored(v).is_some() {
            self.buffer_offset(buf, &idx)?
        } else {
            let sizes = self.sizes(&shape)?;
            (self.ptr(buf)?, self.b.linearize(&idx, &sizes))
        };
        let st = storage(dtype);
        let o = self.b.index_to_i64(&off);
        // The CPU emulation's buffers are aligned to their element only.
        let align = if tile.mode == MmaMode::Gpu { 2 * lanes } else { 2 };
        let at = self.b.op(&format!("llvm.getelementptr inbounds {ptr}[{o}] : (!llvm.ptr, i64) -> !llvm.ptr, {st}"));
        Ok(Some(
            self.b.op(&format!("llvm.load {at} {{alignment = {align} : i64}} : !llvm.ptr -> vector<{lanes}x{st}>")),
        ))
    }

    /// The buffer whose memory `v` is in row-major order: `v`'s own (maybe
    /// pitched), or an unpitched one that `v` views through reshapes and
    /// transposes that move only axes of length 1 (both keep the row-major
    /// order, so `v`'s element at a multi-index is at the buffer's linear
    /// offset of that index in `v`'s shape).
    fn row_major_source(&self, v: Value) -> Option<usize> {
        if let Some(b) = self.stored(v) {
            return Some(b);
        }
        let Value::Node(j) = v else { return None };
        let node = self.graph.nodes.get(j)?;
        let [x] = node.inputs.as_slice() else { return None };
        let keeps_order = match &node.op {
            Op::Reshape { .. } => true,
            Op::Transpose { perm } => {
                let shape = self.graph.shape_of(*x);
                let moved: Vec<usize> =
                    perm.iter().copied().filter(|&a| shape.get(a).is_some_and(|d| !self.is_one(d))).collect();
                moved.windows(2).all(|w| w[0] < w[1])
            }
            _ => false,
        };
        let b = if keeps_order { self.row_major_source(*x)? } else { return None };
        self.program.buffers[b].pitch.is_none().then_some(b)
    }

    /// A register pair as the `mma.sync` operand: bf16 as `i32`, f16 as
    /// `vector<2xf16>`.
    pub(super) fn pack(&mut self, pair: &Pair, dtype: DType) -> String {
        let st = storage(dtype);
        let v = match pair {
            Pair::Packed(v) => v.clone(),
            Pair::Values(x, y) => {
                let x = self.b.op(&format!("arith.truncf {x} : f32 to {st}"));
                let y = self.b.op(&format!("arith.truncf {y} : f32 to {st}"));
                self.b.op(&format!("vector.from_elements {x}, {y} : vector<2x{st}>"))
            }
        };
        match dtype {
            DType::F16 => v,
            _ => self.b.op(&format!("llvm.bitcast {v} : vector<2x{st}> to i32")),
        }
    }

    /// A register pair's two elements as f32 (the emulation).
    pub(super) fn unpack(&mut self, pair: &Pair, dtype: DType) -> [String; 2] {
        match pair {
            Pair::Values(x, y) => [x.clone(), y.clone()],
            Pair::Packed(v) => {
                let st = storage(dtype);
                [0, 1].map(|i| {
                    let e = self.b.op(&format!("vector.extract {v}[{i}] : {st} from vector<2x{st}>"));
                    self.b.op(&format!("arith.extf {e} : {st} to f32"))
                })
            }
        }
    }

    /// The output multi-index of this tile's batch with m-group index `mi`
    /// and n-group index `ni`.
    pub(super) fn tile_index(&self, tile: &Tile, mi: &[String], ni: &[String]) -> Result<Vec<String>, LowerError> {
        let mut idx = vec![String::new(); tile.sizes.len()];
        for (axes, values) in tile.axes.iter().zip([tile.batch_idx.as_slice(), mi, ni]) {
            for (&a, v) in axes.iter().zip(values) {
                match idx.get_mut(a) {
                    Some(slot) => *slot = v.clone(),
                    None => {
                        return Err(LowerError::Unsupported {
                            node: self.kernel.to_owned(),
                            message: format!("tensor-core kernel: output axis {a} out of range"),
                        })
                    }
                }
            }
        }
        if idx.iter().any(String::is_empty) {
            return Err(LowerError::Unsupported {
                node: self.kernel.to_owned(),
                message: "tensor-core kernel: an output axis is in no group".into(),
            });
        }
        Ok(idx)
    }

    /// Index of operand `p` of contraction node `j` at output index
    /// `out_idx` and reduction index `k`.
    pub(crate) fn contraction_operand_index(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
    ) -> Result<Vec<String>, LowerError> {
        let node = &self.graph.nodes[j];
        match &node.op {
            Op::Einsum(spec) => {
                let subs = spec.inputs.get(p).ok_or_else(|| self.unsupported(j, "einsum operand"))?;
                let mut env: Vec<(char, String)> = spec.output.iter().copied().zip(out_idx.iter().cloned()).collect();
                let reduced = subs.iter().find(|c| !spec.output.contains(c)).copied();
                if let Some(c) = reduced {
                    env.push((c, k.to_owned()));
                }
                let subs = subs.clone();
                self.operand_index(j, &subs, &env)
            }
            Op::MatMul { transpose_b } => {
                let transpose_b = *transpose_b;
                let v = *node.inputs.get(p).ok_or_else(|| self.unsupported(j, "matmul operand"))?;
                let shape = self.graph.shape_of(v).clone();
                let r = out_idx.len();
                let mut idx = self.matmul_batch_index(&shape, out_idx);
                match (p, transpose_b) {
                    (0, _) => idx.extend([out_idx[r - 2].clone(), k.to_owned()]),
                    (_, true) => idx.extend([out_idx[r - 1].clone(), k.to_owned()]),
                    (_, false) => idx.extend([k.to_owned(), out_idx[r - 1].clone()]),
                }
                Ok(idx)
            }
            _ => Err(self.unsupported(j, "tensor-core kernel of a node that is not a contraction")),
        }
    }

    /// `ceil(x / d)` (hoisted).
    pub(super) fn ceil_div(&mut self, x: &str, d: i64) -> String {
        let (dm1, dd) = (self.b.index(d - 1), self.b.index(d));
        let up = self.b.hoist(&format!("arith.addi {x}, {dm1} : index"));
        self.b.hoist(&format!("arith.divui {up}, {dd} : index"))
    }

    /// `x + c`.
    pub(super) fn offset(&mut self, x: &str, c: i64) -> String {
        if c == 0 {
            return x.to_owned();
        }
        let c = self.b.index(c);
        self.b.addi(x, &c)
    }

    /// `2 t + c`.
    pub(super) fn k_offset(&mut self, t: &str, c: i64) -> String {
        let two = self.b.index(2);
        let t2 = self.b.muli(t, &two);
        self.offset(&t2, c)
    }

    /// `base + r * cols + c`.
    pub(super) fn tile_offset(&mut self, r: &str, cols: i64, c: &str, base: i64) -> String {
        let cols = self.b.index(cols);
        let rc = self.b.muli(r, &cols);
        let x = self.b.addi(&rc, c);
        self.offset(&x, base)
    }
}
