//! Loading a lane's fragment elements: 16-byte vectors or 32-bit pairs
//! where an operand's memory allows (a bf16 / f16 buffer, stored or seen
//! through order-keeping views, the reduction innermost), single elements
//! through any view otherwise; and packing them into `mma.sync` registers.

use crate::ir::{DType, Op, Poly, Value};
use crate::lower::mma::Mma;
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

impl Kc<'_> {
    /// Elements `k .. k + 8` of operand `p` at output index `out_idx` as
    /// four register pairs (operand type `dtype`): one 16-byte load where
    /// the operand allows it, else 32-bit pairs or single elements.
    pub(super) fn row_pairs(
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
    pub(super) fn fragment_element(
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
        self.contiguous_load(j, p, (out_idx, k), k, tile, lanes)
    }

    /// Elements of operand `p` at output index `out_idx` and reduction
    /// index `k`, and the `lanes - 1` after it along the operand's last
    /// axis, as one `vector<lanes x bf16/f16>` load, when that axis is
    /// indexed by `along` (the reduction index `k`, or an output index
    /// that is a multiple of `lanes`) and the operand's memory allows it
    /// (see [`Kc::vector_load`]); `None` otherwise.
    pub(super) fn contiguous_load(
        &mut self,
        j: usize,
        p: usize,
        (out_idx, k): (&[String], &str),
        along: &str,
        tile: &Tile,
        lanes: i64,
    ) -> Result<Option<String>, LowerError> {
        let v = self.graph.nodes[j].inputs[p];
        let Some(buf) = self.row_major_source(v) else { return Ok(None) };
        let dtype = self.program.buffers[buf].dtype;
        let shape = self.graph.shape_of(v).clone();
        let fits = shape.last().and_then(|d| self.constant_size(d));
        if !matches!(dtype, DType::BF16 | DType::F16) || fits.is_none_or(|d| d % lanes != 0) {
            return Ok(None);
        }
        let idx = self.contraction_operand_index(j, p, out_idx, k)?;
        let Some((last, rest)) = idx.split_last() else { return Ok(None) };
        if last != along || rest.iter().any(|i| i == along) {
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

    /// Whether B (the columns operand) of tensor-core kernel node `j` is
    /// read [`Mma::cols`] columns at a time (see the parent module's
    /// "interleaved columns"): a warp with more than one column tile whose
    /// B is a bf16 / f16 buffer in row-major order ([`Kc::row_major_source`])
    /// with n's last axis innermost, both of a constant length that is a
    /// multiple of the column tiles (so a lane's columns are adjacent and
    /// their first is aligned to all of them).
    pub(super) fn interleaves(&self, j: usize, mma: &Mma) -> bool {
        let Some(node) = self.graph.nodes.get(j) else { return false };
        let (Some(&v), Some(&axis)) = (node.inputs.get(mma.b), mma.n.last()) else { return false };
        let fits = |d: Option<&Poly>| d.and_then(|d| self.constant_size(d)).is_some_and(|d| d > 0 && d % mma.cols == 0);
        let innermost = match &node.op {
            Op::Einsum(spec) => {
                let (subs, out) = (spec.inputs.get(mma.b), spec.output.get(axis));
                subs.and_then(|s| s.last()).is_some_and(|c| Some(c) == out)
            }
            Op::MatMul { transpose_b } => mma.b == 1 && !transpose_b && axis + 1 == node.shape.len(),
            _ => false,
        };
        let dtype = self.row_major_source(v).map(|b| self.program.buffers[b].dtype);
        mma.tuning.interleave
            && mma.cols > 1
            && innermost
            && matches!(dtype, Some(DType::BF16 | DType::F16))
            && fits(self.graph.shape_of(v).last())
            && fits(node.shape.get(axis))
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
}
