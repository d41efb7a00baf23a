//! Row loops split at a concat's boundaries. The bifurcated softmax reads
//! `concat(scores_context, scores_decode, scores_new)` along its axis: one
//! loop over the row branches on every element to find the part, which
//! keeps LLVM from vectorizing it. On the CPU the loop is split into one
//! loop per part (the accumulator carried from one to the next, the
//! elements in the same order), each index pinned to its part's range so
//! that the concat reads that part without a branch (`Kc::pinned`).

use crate::ir::{Op, Poly, Value};
use crate::lower::plan::is_elementwise;
use crate::lower::LowerError;

use super::builder::Ty;
use super::Kc;

/// Elements of a row a prefetching row loop walks between prefetches
/// (see [`Kc::row_fold_ahead`]): 16 lines of f32.
const ROW_CHUNK: usize = 256;
/// Elements of one cache line of f32: one prefetch each.
const ROW_LINE: usize = 16;

impl Kc<'_> {
    /// Where the row loop over `axis` of `x` splits: the offsets along it
    /// of the parts of a concat on that axis that `x` reads element for
    /// element (through elementwise ops that do not broadcast along it and
    /// reshapes that keep it),
    /// from 0 to the axis' length; just `[0, len]` when there is none, or
    /// off the CPU's whole-row loops.
    pub(super) fn row_segments(&self, x: Value, axis: usize) -> Vec<Poly> {
        let len = self.graph.shape_of(x).get(axis).cloned().unwrap_or_else(Poly::zero);
        let whole = vec![Poly::zero(), len];
        if !self.vector_rows() {
            return whole;
        }
        self.concat_bounds(x, axis).unwrap_or(whole)
    }

    fn concat_bounds(&self, v: Value, axis: usize) -> Option<Vec<Poly>> {
        if self.stored(v).is_some() {
            return None;
        }
        let Value::Node(j) = v else { return None };
        let node = &self.graph.nodes[j];
        match &node.op {
            Op::Concat { axis: a } if *a == axis => self.concat_offsets(&node.inputs, axis),
            // A reshape that keeps the axis as it is (grouped-query
            // attention's scores `[b, g, p, n, m]` read as `[b, h, n, m]`):
            // its index passes through unchanged (see `reshape_index`).
            Op::Reshape { .. } => {
                let first = *node.inputs.first()?;
                let groups = self.reshape_groups(&node.shape, self.graph.shape_of(first))?;
                let (_, inner) =
                    groups.into_iter().find(|(out, inp)| out.contains(&axis) && out.len() == 1 && inp.len() == 1)?;
                self.concat_bounds(first, inner.start)
            }
            op if is_elementwise(op) => {
                let len = node.shape.get(axis)?;
                node.inputs.iter().find_map(|&p| {
                    let shape = self.graph.shape_of(p);
                    let same = shape.len() == node.shape.len()
                        && shape.get(axis).is_some_and(|d| self.graph.dims.same(d, len));
                    if same {
                        self.concat_bounds(p, axis)
                    } else {
                        None
                    }
                })
            }
            _ => None,
        }
    }

    /// The end of `segments` when they are one segment from 0, else
    /// nothing.
    fn end_from_zero<'s>(&self, segments: &'s [Poly]) -> &'s [Poly] {
        match segments {
            [start, end] if self.graph.dims.same(start, &Poly::zero()) => std::slice::from_ref(end),
            _ => &[],
        }
    }

    /// A row reduction over `segments` (see [`Kc::row_segments`]) from
    /// `init`: `body(kc, index, acc)` gives the next accumulator. One loop
    /// per segment, the index pinned to it; a single segment from 0 is one
    /// [`Kc::row_for`] loop (the GPU's lanes included). Returns the
    /// accumulated value, before [`Kc::row_combine`].
    pub(super) fn row_fold(
        &mut self,
        segments: &[Poly],
        init: &str,
        mut body: impl FnMut(&mut Self, &str, &str) -> Result<String, LowerError>,
    ) -> Result<String, LowerError> {
        if let [end] = self.end_from_zero(segments) {
            let len = self.sizes(std::slice::from_ref(end))?.remove(0);
            let (res, l, a) = self.row_for(&len, init);
            let next = body(self, &l, &a)?;
            self.b.close_for(&next, Ty::F32);
            return Ok(res);
        }
        let sums =
            self.sum_over(segments, &[init.to_owned()], Ty::F32.mlir(), |kc, l, a| Ok(vec![body(kc, l, &a[0])?]))?;
        Ok(sums.into_iter().next().unwrap_or_else(|| init.to_owned()))
    }

    /// [`Kc::row_fold`] on the CPU's whole-row loops, each segment walked
    /// in chunks of [`ROW_CHUNK`] elements; before each chunk, the lines
    /// of the next row that `x` reads there (`at` is `x`'s index, its
    /// `axis` walking the row) are prefetched. The chunk's loop is what
    /// LLVM vectorizes (a prefetch in it would keep it from that), and
    /// the next row's read from memory runs under this row's arithmetic:
    /// a softmax's exp pass is bound by it, and the next max pass then
    /// finds its row in cache (the cpu_step softmax 3.3 -> 2.9 ms a layer
    /// alone).
    pub(super) fn row_fold_ahead(
        &mut self,
        segments: &[Poly],
        init: &str,
        (x, at, axis): (Value, &mut [String], usize),
        mut body: impl FnMut(&mut Self, &str, &str) -> Result<String, LowerError>,
    ) -> Result<String, LowerError> {
        let (one, chunk) = (self.b.index(1), self.b.index(ROW_CHUNK as i64));
        let mut acc = init.to_owned();
        for w in segments.windows(2) {
            let bounds = self.sizes(w)?;
            let (outer, start, a) = self.b.open_for_from(&bounds[0], &bounds[1], &chunk, &acc, Ty::F32);
            for line in 0..ROW_CHUNK / ROW_LINE {
                let step = self.b.index((line * ROW_LINE) as i64);
                let l = self.b.addi(&start, &step);
                at[axis] = l.clone();
                self.pinned.push((l, w[0].clone(), w[1].clone()));
                let r = self.prefetch_next_row(x, at);
                self.pinned.pop();
                r?;
            }
            let end = self.b.addi(&start, &chunk);
            let end = self.b.op(&format!("arith.minui {end}, {} : index", bounds[1]));
            let (res, l, a) = self.b.open_for_from(&start, &end, &one, &a, Ty::F32);
            self.pinned.push((l.clone(), w[0].clone(), w[1].clone()));
            let next = body(self, &l, &a);
            self.pinned.pop();
            self.b.close_for(&next?, Ty::F32);
            self.b.close_for(&res, Ty::F32);
            acc = outer;
        }
        Ok(acc)
    }

    /// Prefetches, for element `idx` of `x`, the element one row further
    /// on in the stored buffer it reads (its last axis' length on from
    /// the element it reads for `idx`): through
    /// views, elementwise ops (their operand of `x`'s shape) and the part
    /// of a concat the index is pinned to. Nothing where `x` reads no
    /// such buffer. A prefetch never faults, so one past the buffer's
    /// last row is harmless.
    fn prefetch_next_row(&mut self, x: Value, idx: &[String]) -> Result<(), LowerError> {
        if let Some(b) = self.stored(x) {
            let (ptr, off) = self.buffer_offset(b, idx)?;
            let row = self.storage_sizes(b)?.last().cloned().unwrap_or_else(|| self.b.index(1));
            let next = self.b.addi(&off, &row);
            self.b.prefetch(&ptr, &next, self.program.buffers[b].dtype, false);
            return Ok(());
        }
        let Value::Node(j) = x else { return Ok(()) };
        let node = &self.graph.nodes[j];
        let (op, inputs, shape) = (node.op.clone(), node.inputs.clone(), node.shape.clone());
        match op {
            Op::Concat { axis } => {
                let bounds = self.concat_offsets(&inputs, axis).unwrap_or_default();
                let Some(p) = idx.get(axis).and_then(|l| self.pinned_part(l, &bounds)) else { return Ok(()) };
                let mut inner = idx.to_vec();
                let s = self.sizes(std::slice::from_ref(&bounds[p]))?.remove(0);
                inner[axis] = self.b.subi(&idx[axis], &s);
                self.prefetch_next_row(inputs[p], &inner)
            }
            op if op.is_view() => {
                let inner = self.view_index(j, idx)?;
                self.prefetch_next_row(inputs[0], &inner)
            }
            op if is_elementwise(&op) => {
                let same = inputs.iter().copied().find(|&v| self.graph.dims.same_shape(self.graph.shape_of(v), &shape));
                match same {
                    Some(v) => self.prefetch_next_row(v, idx),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// A row loop over `segments` without an accumulator: `body(kc,
    /// index)` per element (see [`Kc::row_fold`]; a single segment is one
    /// `row_loop`).
    pub(super) fn row_each(
        &mut self,
        segments: &[Poly],
        mut body: impl FnMut(&mut Self, &str) -> Result<(), LowerError>,
    ) -> Result<(), LowerError> {
        if let [end] = self.end_from_zero(segments) {
            let len = self.sizes(std::slice::from_ref(end))?.remove(0);
            let l = self.row_loop(&len);
            body(self, &l)?;
            self.b.close();
            return Ok(());
        }
        let one = self.b.index(1);
        for w in segments.windows(2) {
            let bounds = self.sizes(w)?;
            let l = self.b.open_loop_from(&bounds[0], &bounds[1], &one);
            self.pinned.push((l.clone(), w[0].clone(), w[1].clone()));
            let r = body(self, &l);
            self.pinned.pop();
            r?;
            self.b.close();
        }
        Ok(())
    }

    /// Where each part of a concat of `parts` along `axis` starts, and the
    /// total length last.
    pub(super) fn concat_offsets(&self, parts: &[Value], axis: usize) -> Option<Vec<Poly>> {
        let mut bounds = vec![Poly::zero()];
        for &p in parts {
            let len = self.graph.shape_of(p).get(axis)?;
            let end = bounds.last()?.add(len).ok()?;
            bounds.push(end);
        }
        Some(bounds)
    }

    /// Where a CPU sum of length `len` splits: the offsets of the parts of
    /// a concat that one of `operands` (each a value and the axis the sum
    /// walks in it) reads element for element along that axis (as
    /// [`Kc::row_segments`]; the baseline's `w·V` reads V as
    /// `concat(V_context, V_decode, v_new)`), or just `[0, len]`.
    pub(super) fn sum_segments(&self, operands: &[(Value, usize)], len: &Poly) -> Vec<Poly> {
        let split = (self.simd > 0).then(|| operands.iter().find_map(|&(v, axis)| self.concat_bounds(v, axis)));
        split.flatten().unwrap_or_else(|| vec![Poly::zero(), len.clone()])
    }

    /// A sum's loop over `segments` (see [`Kc::sum_segments`]) carrying
    /// the accumulators `inits` of MLIR type `ty`: one loop per segment,
    /// its index pinned to it, so a concat read there reads its part
    /// without a branch at every step; `body(kc, index, accs)` gives the
    /// next accumulators. Returns the sums.
    pub(super) fn sum_over(
        &mut self,
        segments: &[Poly],
        inits: &[String],
        ty: &str,
        body: impl FnMut(&mut Self, &str, &[String]) -> Result<Vec<String>, LowerError>,
    ) -> Result<Vec<String>, LowerError> {
        self.sum_over_within(segments, None, inits, ty, body)
    }

    /// [`Kc::sum_over`] over only the indices in `[from, to)` when
    /// `within` gives them (each segment's loop clamped to that range).
    pub(super) fn sum_over_within(
        &mut self,
        segments: &[Poly],
        within: Option<(&str, &str)>,
        inits: &[String],
        ty: &str,
        mut body: impl FnMut(&mut Self, &str, &[String]) -> Result<Vec<String>, LowerError>,
    ) -> Result<Vec<String>, LowerError> {
        let one = self.b.index(1);
        let mut accs = inits.to_vec();
        for w in segments.windows(2) {
            let mut bounds = self.sizes(w)?;
            if let Some((from, to)) = within {
                bounds[0] = self.b.op(&format!("arith.maxui {}, {from} : index", bounds[0]));
                bounds[1] = self.b.op(&format!("arith.minui {}, {to} : index", bounds[1]));
            }
            let (res, l, a) = self.b.open_for_typed_from(&bounds[0], &bounds[1], &one, &accs, ty);
            self.pinned.push((l.clone(), w[0].clone(), w[1].clone()));
            let next = body(self, &l, &a);
            self.pinned.pop();
            self.b.close_for_typed(&next?, ty);
            accs = res;
        }
        Ok(accs)
    }

    /// The part of a concat along an index pinned to exactly its range
    /// (see [`Kc::pinned`]), if any: `bounds` are the parts' offsets.
    pub(super) fn pinned_part(&self, index: &str, bounds: &[Poly]) -> Option<usize> {
        let (_, lo, hi) = self.pinned.iter().rev().find(|(l, _, _)| l == index)?;
        let dims = &self.graph.dims;
        bounds.windows(2).position(|w| dims.same(&w[0], lo) && dims.same(&w[1], hi))
    }
}
