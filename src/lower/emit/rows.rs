//! Row kernels: softmax, rms_norm and layer_norm, whose statistics (max
//! and sum of `exp`, mean and mean square) are reductions along one axis
//! of a row, split across a block's threads on the GPU.

use crate::ir::{DType, Op, Poly, Value};
use crate::lower::LowerError;

use super::builder::{Ty, Val};
use super::{Kc, Lanes};

/// Longest softmax row whose `exp`s a CPU kernel with a half-precision
/// output keeps in f32 on the stack (64 KiB), instead of computing them
/// again in the pass that stores them.
const ROW_KEEP: usize = 16384;

/// Where a softmax's sum pass keeps each `exp(x - max)` for the pass that
/// scales and stores it.
#[derive(Clone, Copy)]
enum Keep<'a> {
    /// In the (f32) output itself, at its row-major offset in `sizes`.
    Out { ptr: &'a str, sizes: &'a [String] },
    /// In an f32 row of ROW_KEEP on the stack, at its index along the row.
    Row(&'a str),
    /// Over the parts of the softmax's input, in their buffers (a softmax
    /// planned in place, see [`crate::lower::InPlace`]): the output too.
    Parts(&'a [Part]),
}

/// One part of the row of a softmax planned in place: its buffer's
/// pointer and sizes, and where it starts along the row.
pub(super) struct Part {
    ptr: String,
    sizes: Vec<String>,
    start: Poly,
}

impl Kc<'_> {
    /// Softmax along `axis`: max, sum of `exp(x - max)`, element. A lane
    /// whose max is `-inf` (fully masked) gives 0.
    pub(super) fn softmax(&mut self, j: usize, x: Value, axis: usize, idx: &[String]) -> Result<Val, LowerError> {
        let stats = self.softmax_stats(j, x, axis, idx)?;
        self.softmax_elem(x, &stats, idx)
    }

    /// Max and sum of `exp(x - max)` of the lane through `idx` along `axis`
    /// (`idx[axis]` is not read).
    fn softmax_stats(&mut self, j: usize, x: Value, axis: usize, idx: &[String]) -> Result<[String; 2], LowerError> {
        if axis >= idx.len() {
            return Err(self.unsupported(j, "softmax axis"));
        }
        let segments = self.row_segments(x, axis);
        let mut at = idx.to_vec();
        let max = self.softmax_max(x, &mut at, axis, &segments)?;
        let sum = self.softmax_sum(x, &mut at, axis, &segments, &max, None)?;
        Ok([max, sum])
    }

    /// The lane's max of `x` along `axis` (`at[axis]` walks the lane over
    /// `segments`, see [`Kc::row_segments`]), combined over the block.
    fn softmax_max(
        &mut self,
        x: Value,
        at: &mut [String],
        axis: usize,
        segments: &[Poly],
    ) -> Result<String, LowerError> {
        let ninf = self.b.f32(f32::NEG_INFINITY);
        let max = self.row_fold(segments, &ninf, |kc, l, a| {
            at[axis] = l.to_owned();
            let v = kc.loadf(x, at)?;
            Ok(kc.row_max(a, &v))
        })?;
        Ok(self.row_combine("maximumf", &max))
    }

    /// The lane's sum of `exp(x - max)` along `axis`, combined over the
    /// block; each `exp` is also stored where `keep` says, when given.
    fn softmax_sum(
        &mut self,
        x: Value,
        at: &mut [String],
        axis: usize,
        segments: &[Poly],
        max: &str,
        keep: Option<Keep>,
    ) -> Result<String, LowerError> {
        let zero = self.b.f32(0.0);
        let element = |kc: &mut Self, at: &mut [String], l: &str, a: &str| -> Result<String, LowerError> {
            at[axis] = l.to_owned();
            let v = kc.loadf(x, at)?;
            let d = kc.b.fbin("subf", &v, max);
            let e = kc.exp_nonpositive(&d);
            match keep {
                Some(Keep::Out { ptr, sizes }) => {
                    let off = kc.b.linearize(at, sizes);
                    kc.b.store(ptr, &off, DType::F32, Val::f32(e.clone()));
                }
                Some(Keep::Row(ptr)) => kc.b.store(ptr, l, DType::F32, Val::f32(e.clone())),
                Some(Keep::Parts(parts)) => {
                    let (ptr, off) = kc.part_offset(parts, at, axis)?;
                    kc.b.store(&ptr, &off, DType::F32, Val::f32(e.clone()));
                }
                None => {}
            }
            Ok(kc.row_add(a, &e))
        };
        let sum = if self.vector_rows() {
            let mut ahead = at.to_vec();
            self.row_fold_ahead(segments, &zero, (x, &mut ahead, axis), |kc, l, a| element(kc, at, l, a))?
        } else {
            self.row_fold(segments, &zero, |kc, l, a| element(kc, at, l, a))?
        };
        Ok(self.row_combine("add", &sum))
    }

    fn softmax_elem(&mut self, x: Value, [max, sum]: &[String; 2], idx: &[String]) -> Result<Val, LowerError> {
        let (ninf, zero) = (self.b.f32(f32::NEG_INFINITY), self.b.f32(0.0));
        let v = self.loadf(x, idx)?;
        let d = self.b.fbin("subf", &v, max);
        let e = self.exp_nonpositive(&d);
        let q = self.b.fbin("divf", &e, sum);
        let masked = self.b.op(&format!("arith.cmpf oeq, {max}, {ninf} : f32"));
        Ok(Val::f32(self.b.op(&format!("arith.select {masked}, {zero}, {q} : f32"))))
    }

    /// The last softmax pass over a row of `len` whose `e`s were kept
    /// (see [`Keep`]): each scaled by `1 / sum` (0 in a fully masked lane)
    /// and stored at its row-major offset in `out` (pointer, sizes, dtype),
    /// or, `over` the parts of a softmax planned in place whose `e`s were
    /// kept in a row (a half-precision one), in them, as `dtype`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_scale(
        &mut self,
        [max, sum]: &[String; 2],
        (len, segments): (&str, &[Poly]),
        at: &mut [String],
        axis: usize,
        keep: Keep,
        (ptr, sizes, dtype): (&str, &[String], DType),
        over: Option<&[Part]>,
    ) -> Result<(), LowerError> {
        let ninf = self.b.f32(f32::NEG_INFINITY);
        let (zero, one) = (self.b.f32(0.0), self.b.f32(1.0));
        let masked = self.b.op(&format!("arith.cmpf oeq, {max}, {ninf} : f32"));
        let inv = self.b.fbin("divf", &one, sum);
        let scaled = |kc: &mut Self, e: &str| {
            let q = kc.b.fbin("mulf", e, &inv);
            kc.b.op(&format!("arith.select {masked}, {zero}, {q} : f32"))
        };
        // Planned in place: each part's loop scales what its buffer kept
        // (f32), or the row's `e`s, into its buffer.
        let over = match keep {
            Keep::Parts(parts) => Some(parts),
            _ => over,
        };
        if let Some(parts) = over {
            return self.row_each(segments, |kc, l| {
                at[axis] = l.to_owned();
                let (ptr, off) = kc.part_offset(parts, at, axis)?;
                let e = match keep {
                    Keep::Row(row) => kc.b.load(row, l, DType::F32),
                    _ => kc.b.load(&ptr, &off, DType::F32),
                };
                let v = scaled(kc, &e.ssa);
                kc.b.store(&ptr, &off, dtype, Val::f32(v));
                Ok(())
            });
        }
        let l = self.row_loop(len);
        at[axis] = l.clone();
        let off = self.b.linearize(at, sizes);
        let e = match keep {
            Keep::Row(row) => self.b.load(row, &l, DType::F32),
            // `Keep::Out`: in the output itself.
            _ => self.b.load(ptr, &off, DType::F32),
        };
        let v = scaled(self, &e.ssa);
        self.b.store(ptr, &off, dtype, Val::f32(v));
        self.b.close();
        Ok(())
    }

    /// The softmax of a row whose first part is a fused context
    /// attention's (see `lower::fused_attention`): the max over the
    /// items' maxes (the partials) and the other parts' values, the sum
    /// over the items' sums (each times `exp(m_item - max)`) and the
    /// other parts' `exp`s (kept over their buffers, then scaled, as an
    /// in-place softmax does), and the context output, the items' outputs
    /// weighed the same way and divided by the sum, written into the
    /// fused `w·V`'s buffer. `sizes` and `dtype` are the softmax's (its
    /// parts'): in f16 / bf16 the other parts' `exp`s are not kept (their
    /// buffers are narrower than f32) but computed again in the last
    /// pass, as a softmax too long for its row on the stack does.
    fn softmax_merge(
        &mut self,
        x: Value,
        (at, axis): (&mut [String], usize),
        (segments, parts): (&[Poly], &[Part]),
        fused: &crate::lower::FusedPlan,
        (sizes, dtype): (&[String], DType),
    ) -> Result<(), LowerError> {
        let node = self.kernel.to_owned();
        let unsupported = |message: &str| LowerError::Unsupported { node: node.clone(), message: message.into() };
        if segments.len() != parts.len() + 1 || parts.len() < 2 {
            return Err(unsupported("a fused softmax's row is not split at its parts"));
        }
        let rest = &segments[1..];
        let partials = self.program.buffers.get(fused.partials).ok_or_else(|| unsupported("no partials"))?;
        let width = partials.shape.last().and_then(|p| self.graph.dims.normalize(p).ok()?.as_constant());
        let width = width.filter(|w| *w > 2).ok_or_else(|| unsupported("partials of no constant head"))?;
        let e_len = width - 2;
        let (pptr, cptr) = (self.ptr(fused.partials)?, self.ptr(fused.context)?);
        // The w·V's dtype (f32 in a bifurcated graph, whose w·V parts are
        // summed in f32).
        let context = self.program.buffers.get(fused.context).ok_or_else(|| unsupported("no context buffer"))?.dtype;
        // The row: its index among the softmax's rows.
        let mut row_sizes = sizes.to_vec();
        row_sizes[axis] = self.b.index(1);
        let mut row_at = at.to_vec();
        row_at[axis] = self.b.index(0);
        let row = self.b.linearize(&row_at, &row_sizes);
        let mut rows = self.b.index(1);
        for (_, s) in sizes.iter().enumerate().filter(|(a, _)| *a != axis) {
            rows = self.b.hoist(&format!("arith.muli {rows}, {s} : index"));
        }
        // The context's length: where its part (the first) ends.
        let m_c = self.sizes(&segments[1..2])?.remove(0);
        let items = self.fused_items(&m_c, fused.items);
        let (w, c_e) = (self.b.index(width), self.b.index(e_len));
        // Where item `i`'s partials of this row start.
        let item_base = |kc: &mut Self, i: &str| {
            let r = kc.b.muli(i, &rows);
            let r = kc.b.addi(&r, &row);
            kc.b.muli(&r, &w)
        };
        let (ninf, zero) = (self.b.f32(f32::NEG_INFINITY), self.b.f32(0.0));
        let max_rest = self.softmax_max(x, at, axis, rest)?;
        let (max_items, i, acc) = self.b.open_for(&items, &ninf, Ty::F32);
        let base = item_base(self, &i);
        let off = self.b.addi(&base, &c_e);
        let m = self.b.load(&pptr, &off, DType::F32);
        let next = self.b.fbin("maximumf", &acc, &m.ssa);
        self.b.close_for(&next, Ty::F32);
        let max = self.b.fbin("maximumf", &max_rest, &max_items);
        let masked = self.b.op(&format!("arith.cmpf oeq, {max}, {ninf} : f32"));
        let keep = (dtype == DType::F32).then_some(Keep::Parts(parts));
        let sum_rest = self.softmax_sum(x, at, axis, rest, &max, keep)?;
        // Each item's weight `exp(m_item - max)` (0 in a fully masked
        // row), kept for the outputs, and its sum times it.
        let weights = self.b.stack_f32("merge_weights", fused.items as usize, None);
        let (sum_items, i, acc) = self.b.open_for(&items, &zero, Ty::F32);
        let base = item_base(self, &i);
        let off = self.b.addi(&base, &c_e);
        let m = self.b.load(&pptr, &off, DType::F32);
        let one = self.b.index(1);
        let off = self.b.addi(&off, &one);
        let l = self.b.load(&pptr, &off, DType::F32);
        let d = self.b.fbin("subf", &m.ssa, &max);
        let wt = self.exp_nonpositive(&d);
        let wt = self.b.op(&format!("arith.select {masked}, {zero}, {wt} : f32"));
        self.b.store(&weights, &i, DType::F32, Val::f32(wt.clone()));
        let p = self.b.fbin("mulf", &l.ssa, &wt);
        let next = self.b.fbin("addf", &acc, &p);
        self.b.close_for(&next, Ty::F32);
        let sum = self.b.fbin("addf", &sum_rest, &sum_items);
        let stats = [max.clone(), sum.clone()];
        if dtype == DType::F32 {
            let len = sizes[axis].clone();
            let out = (pptr.as_str(), sizes, DType::F32);
            self.softmax_scale(&stats, (&len, rest), at, axis, Keep::Parts(parts), out, None)?;
        } else {
            self.softmax_each(x, &stats, rest, (at, axis), (pptr.as_str(), sizes, dtype), Some(parts))?;
        }
        // The context output: the items' outputs weighed, over the sum.
        let one_f = self.b.f32(1.0);
        let inv = self.b.fbin("divf", &one_f, &sum);
        let inv = self.b.op(&format!("arith.select {masked}, {zero}, {inv} : f32"));
        let out_base = self.b.muli(&row, &c_e);
        let e = self.b.open_loop(&c_e);
        let (total, i, acc) = self.b.open_for(&items, &zero, Ty::F32);
        let base = item_base(self, &i);
        let off = self.b.addi(&base, &e);
        let o = self.b.load(&pptr, &off, DType::F32);
        let wt = self.b.load(&weights, &i, DType::F32);
        let p = self.b.fbin("mulf", &o.ssa, &wt.ssa);
        let next = self.b.fbin("addf", &acc, &p);
        self.b.close_for(&next, Ty::F32);
        let v = self.b.fbin("mulf", &total, &inv);
        let off = self.b.addi(&out_base, &e);
        self.b.store(&cptr, &off, context, Val::f32(v));
        self.b.close();
        Ok(())
    }

    /// The parts of softmax node `j`'s row when it is planned in place
    /// (see [`Keep::Parts`]).
    fn in_place_parts(&mut self, j: usize) -> Result<Option<Vec<Part>>, LowerError> {
        let Some(plan) = self.program.in_place_of(&self.graph.nodes[j].id) else { return Ok(None) };
        // The softmax's shape with the row cut to the part's length: the
        // part's buffer, or a reshape of it that keeps the row (see
        // `lower::in_place`), both row-major.
        let axis = self.row_axis(j).ok_or_else(|| self.unsupported(j, "is not a row kernel"))?;
        let shape = self.graph.nodes[j].shape.clone();
        let mut parts = Vec::with_capacity(plan.parts.len());
        for part in &plan.parts {
            let mut cut = shape.clone();
            cut[axis] = part.len.clone();
            parts.push(Part { ptr: self.ptr(part.buffer)?, sizes: self.sizes(&cut)?, start: part.start.clone() });
        }
        Ok(Some(parts))
    }

    /// Where element `at` of a softmax planned in place is kept (`at[axis]`
    /// a row index pinned to one part's segment, see `segments`): that
    /// part's pointer, and the offset of the element in it.
    fn part_offset(&mut self, parts: &[Part], at: &[String], axis: usize) -> Result<(String, String), LowerError> {
        let l = &at[axis];
        let p = match parts {
            [_] => Some(0),
            _ => self
                .pinned
                .iter()
                .rev()
                .find(|(i, _, _)| i == l)
                .and_then(|(_, lo, _)| parts.iter().position(|q| self.graph.dims.same(&q.start, lo))),
        };
        let part = p.and_then(|p| parts.get(p)).ok_or_else(|| LowerError::Unsupported {
            node: self.kernel.to_owned(),
            message: "an in-place softmax's row is not split at its parts".into(),
        })?;
        let start = self.sizes(std::slice::from_ref(&part.start))?.remove(0);
        let mut local = at.to_vec();
        local[axis] = self.b.subi(l, &start);
        let off = self.b.linearize(&local, &part.sizes);
        Ok((part.ptr.clone(), off))
    }

    /// The sum of a softmax row of max `max`, then every element from
    /// both (each `exp` computed again), stored at its row-major offset in
    /// `out`, or `over` the parts of a softmax planned in place.
    fn softmax_recompute(
        &mut self,
        x: Value,
        max: String,
        segments: &[Poly],
        (at, axis): (&mut [String], usize),
        (ptr, sizes, dtype): (&str, &[String], DType),
        over: Option<&[Part]>,
    ) -> Result<(), LowerError> {
        let sum = self.softmax_sum(x, at, axis, segments, &max, None)?;
        self.softmax_each(x, &[max, sum], segments, (at, axis), (ptr, sizes, dtype), over)
    }

    /// The last softmax pass without kept `e`s: each element's value
    /// computed again from the row's `stats` (max, sum) and stored at its
    /// row-major offset in `out`, or `over` the parts of a softmax planned
    /// in place, as `dtype`.
    fn softmax_each(
        &mut self,
        x: Value,
        stats: &[String; 2],
        segments: &[Poly],
        (at, axis): (&mut [String], usize),
        (ptr, sizes, dtype): (&str, &[String], DType),
        over: Option<&[Part]>,
    ) -> Result<(), LowerError> {
        self.row_each(segments, |kc, l| {
            at[axis] = l.to_owned();
            let v = kc.softmax_elem(x, stats, at)?;
            let (ptr, off) = match over {
                Some(parts) => kc.part_offset(parts, at, axis)?,
                None => (ptr.to_owned(), kc.b.linearize(at, sizes)),
            };
            kc.b.store(&ptr, &off, dtype, v);
            Ok(())
        })
    }

    /// A reduction loop over a row of `len` elements: over all of it, or
    /// in a block-shared kernel over this lane's share (elements `lane,
    /// lane + lanes, …`; see [`Kc::lanes`]). `init` is the identity of the
    /// combination [`Kc::row_combine`] applies afterwards.
    pub(super) fn row_for(&mut self, len: &str, init: &str) -> (String, String, String) {
        match self.lanes {
            Lanes::Whole => self.b.open_for(len, init, Ty::F32),
            Lanes::Block => self.b.open_for_from("%tid", len, "%bdim", init, Ty::F32),
            Lanes::Warp => {
                let lanes = self.b.index(32);
                self.b.open_for_from("%lane", len, &lanes, init, Ty::F32)
            }
            Lanes::Emulated(n) => {
                let lanes = self.b.index(n as i64);
                let (res, lane, acc) = self.b.open_for(&lanes, init, Ty::F32);
                self.lane_loops.push((res, acc));
                self.b.open_for_from(&lane, len, &lanes, init, Ty::F32)
            }
        }
    }

    /// `acc + v` in a row's sum: on the CPU with the whole row in one
    /// loop, reassociable, so that LLVM vectorizes the loop (the sum is
    /// then taken in strands and combined; the GPU's lanes have their own
    /// fixed order).
    fn row_add(&mut self, acc: &str, v: &str) -> String {
        if self.vector_rows() {
            self.b.op(&format!("arith.addf {acc}, {v} fastmath<reassoc> : f32"))
        } else {
            self.b.fbin("addf", acc, v)
        }
    }

    /// `max(acc, v)` (NaN if either is) in a row's max: on the CPU with
    /// the whole row in one loop, LLVM's own `maximum`, whose reductions
    /// it vectorizes (`arith.maximumf` reaches it expanded into compares
    /// and selects, which it does not recognize as one).
    fn row_max(&mut self, acc: &str, v: &str) -> String {
        if self.vector_rows() {
            self.b.op(&format!("llvm.intr.maximum({acc}, {v}) : (f32, f32) -> f32"))
        } else {
            self.b.fbin("maximumf", acc, v)
        }
    }

    /// Whether row reductions are loops LLVM may vectorize: the CPU, one
    /// iteration doing the whole row.
    pub(super) fn vector_rows(&self) -> bool {
        self.lanes == Lanes::Whole && self.simd > 0
    }

    /// A loop over this lane's elements of a row (see [`Kc::row_for`]);
    /// emulated lanes store every element in one loop.
    pub(super) fn row_loop(&mut self, len: &str) -> String {
        match self.lanes {
            Lanes::Block => self.b.open_loop_from("%tid", len, "%bdim"),
            Lanes::Warp => {
                let lanes = self.b.index(32);
                self.b.open_loop_from("%lane", len, &lanes)
            }
            Lanes::Whole | Lanes::Emulated(_) => self.b.open_loop(len),
        }
    }

    /// The row's reduction of the per-lane partials `v` (`maximumf` or
    /// `add`), after a [`Kc::row_for`] loop closed: a `gpu.all_reduce` over
    /// the block, a shuffle butterfly over the warp, the combination across
    /// the emulated lanes (closing their loop), or `v` itself (one thread
    /// had the whole row).
    pub(super) fn row_combine(&mut self, op: &str, v: &str) -> String {
        // The arith op of a combination the warp or emulated lanes apply.
        let f = if op == "add" { "addf" } else { op };
        match self.lanes {
            Lanes::Whole => v.to_owned(),
            Lanes::Block => {
                let r = self.b.op(&format!("gpu.all_reduce {op} {v} uniform {{}} : (f32) -> (f32)"));
                // The reduction ends with every thread reading the result
                // from shared memory; a next one would overwrite it (its
                // first step stores partials there before any barrier), so
                // no thread may start one until all have read this one.
                self.b.line("gpu.barrier");
                r
            }
            Lanes::Warp => {
                // Butterfly: after the shuffle at distance d every lane holds
                // the sum over its group of 2d lanes.
                let width = self.b.i32(32);
                let mut acc = v.to_owned();
                for d in [16, 8, 4, 2, 1] {
                    let dist = self.b.i32(d);
                    let (other, valid) = (self.b.fresh(), self.b.fresh());
                    self.b.line(&format!("{other}, {valid} = gpu.shuffle xor {acc}, {dist}, {width} : f32"));
                    acc = self.b.fbin(f, &acc, &other);
                }
                acc
            }
            Lanes::Emulated(_) => {
                let Some((res, acc)) = self.lane_loops.pop() else { return v.to_owned() };
                let c = self.b.fbin(f, &acc, v);
                self.b.close_for(&c, Ty::F32);
                res
            }
        }
    }

    /// The axis a row kernel of node `j` walks (softmax: its axis; rms /
    /// layer norm: the last), when `j` is one: its per-lane statistics are
    /// then computed once per lane instead of once per element.
    pub(crate) fn row_axis(&self, j: usize) -> Option<usize> {
        let node = self.graph.nodes.get(j)?;
        crate::lower::plan::row_axis(&node.op, node.shape.len())
    }

    /// One lane of row kernel `j` (see [`Kc::row_axis`]): its statistics
    /// at `idx` (`idx[axis]` is not read), then a loop over `axis` (each
    /// arm opens and closes its own) storing every element at its
    /// row-major offset in `out_sizes`.
    pub(crate) fn row_lane(
        &mut self,
        j: usize,
        idx: &[String],
        out_sizes: &[String],
        out_ptr: &str,
        out_dtype: crate::ir::DType,
    ) -> Result<(), LowerError> {
        let axis = self.row_axis(j).ok_or_else(|| self.unsupported(j, "is not a row kernel"))?;
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let arg = |kc: &Self, k: usize| inputs.get(k).copied().ok_or_else(|| kc.unsupported(j, "missing input"));
        let len = out_sizes[axis].clone();
        let mut at = idx.to_vec();
        match op {
            Op::Softmax { .. } => {
                // max; then `e = exp(x - max)` summed; then each element.
                let x = arg(self, 0)?;
                let segments = self.row_segments(x, axis);
                let fused = self.program.in_place_of(&self.graph.nodes[j].id).and_then(|p| p.fused.clone());
                if let Some(fused) = fused {
                    // The fused context attention's partials stand for
                    // the first part (`lower::fused_attention`).
                    let parts = self.in_place_parts(j)?.unwrap_or_default();
                    // Its parts are of the softmax's dtype; the kernel
                    // writes the w·V's buffer.
                    let dtype = self.graph.nodes[j].dtype;
                    return self.softmax_merge(x, (&mut at, axis), (&segments, &parts), &fused, (out_sizes, dtype));
                }
                let max = self.softmax_max(x, &mut at, axis, &segments)?;
                let out = (out_ptr, out_sizes, out_dtype);
                if out_dtype == DType::F32 {
                    // Each `e` stored in the output as it is summed, then
                    // scaled by `1 / sum` (0 in a fully masked lane): one
                    // exp per element, and the last pass reads the output
                    // contiguously instead of through the input's views.
                    // Planned in place, the output is the input's parts.
                    let parts = self.in_place_parts(j)?;
                    let keep = match &parts {
                        Some(parts) => Keep::Parts(parts),
                        None => Keep::Out { ptr: out_ptr, sizes: out_sizes },
                    };
                    let sum = self.softmax_sum(x, &mut at, axis, &segments, &max, Some(keep))?;
                    self.softmax_scale(&[max, sum], (&len, &segments), &mut at, axis, keep, out, None)?;
                } else if self.vector_rows() {
                    // A half-precision output, on the CPU: the `e`s kept in
                    // f32 in a row on the stack (rounded once, at the
                    // store), when the row fits it; a longer row computes
                    // each `e` again in its last pass. Planned in place,
                    // the values are stored over the input's parts.
                    let parts = self.in_place_parts(j)?;
                    let over = parts.as_deref();
                    let cap = self.b.index(ROW_KEEP as i64);
                    let fits = self.b.op(&format!("arith.cmpi ule, {len}, {cap} : index"));
                    self.b.open_guard(&fits);
                    let n = self.b.hoist(&format!("llvm.mlir.constant({ROW_KEEP} : i64) : i64"));
                    let alloca = format!("llvm.alloca {n} x f32 {{alignment = 64 : i64}} : (i64) -> !llvm.ptr");
                    let row = self.b.hoist(&alloca);
                    let sum = self.softmax_sum(x, &mut at, axis, &segments, &max, Some(Keep::Row(&row)))?;
                    let stats = [max.clone(), sum];
                    self.softmax_scale(&stats, (&len, &segments), &mut at, axis, Keep::Row(&row), out, over)?;
                    self.b.else_guard();
                    self.softmax_recompute(x, max, &segments, (&mut at, axis), out, over)?;
                    self.b.close();
                } else {
                    self.softmax_recompute(x, max, &segments, (&mut at, axis), out, None)?;
                }
            }
            Op::RmsNorm { eps } | Op::LayerNorm { eps } => {
                let (x, w) = (arg(self, 0)?, arg(self, 1)?);
                let bias = if matches!(op, Op::LayerNorm { .. }) { Some(arg(self, 2)?) } else { None };
                let stats = self.norm_stats(j, x, bias.is_some(), eps, idx)?;
                let l = self.row_loop(&len);
                at[axis] = l;
                let v = self.norm_elem(x, w, bias, &stats, &at)?;
                let off = self.b.linearize(&at, out_sizes);
                self.b.store(out_ptr, &off, out_dtype, v);
                self.b.close();
            }
            _ => return Err(self.unsupported(j, "is not a row kernel")),
        }
        Ok(())
    }

    /// rms_norm (`bias` = None) or layer_norm over the last axis.
    pub(super) fn norm(
        &mut self,
        j: usize,
        x: Value,
        w: Value,
        bias: Option<Value>,
        eps: f64,
        idx: &[String],
    ) -> Result<Val, LowerError> {
        let stats = self.norm_stats(j, x, bias.is_some(), eps, idx)?;
        self.norm_elem(x, w, bias, &stats, idx)
    }

    /// The mean (layer norm) and `1 / sqrt(mean square + eps)` of the lane
    /// through `idx` along the last axis (its last index is not read).
    fn norm_stats(
        &mut self,
        j: usize,
        x: Value,
        centered: bool,
        eps: f64,
        idx: &[String],
    ) -> Result<(Option<String>, String), LowerError> {
        let shape = self.graph.shape_of(x).clone();
        let last = idx.len().checked_sub(1).ok_or_else(|| self.unsupported(j, "norm of a scalar"))?;
        let len = self.sizes(&shape[last..])?.remove(0);
        let n = self.b.index_to_f32(&len);
        let zero = self.b.f32(0.0);
        let one = self.b.f32(1.0);
        let mut at = idx.to_vec();
        let mean = if centered {
            let (sum, l, a) = self.row_for(&len, &zero);
            at[last] = l;
            let v = self.loadf(x, &at)?;
            let s = self.b.fbin("addf", &a, &v);
            self.b.close_for(&s, Ty::F32);
            let sum = self.row_combine("add", &sum);
            Some(self.b.fbin("divf", &sum, &n))
        } else {
            None
        };
        let (ss, l, a) = self.row_for(&len, &zero);
        at[last] = l;
        let v = self.loadf(x, &at)?;
        let c = match &mean {
            Some(m) => self.b.fbin("subf", &v, m),
            None => v,
        };
        let sq = self.b.fbin("mulf", &c, &c);
        let s = self.b.fbin("addf", &a, &sq);
        self.b.close_for(&s, Ty::F32);
        let ss = self.row_combine("add", &ss);
        let ms = self.b.fbin("divf", &ss, &n);
        let e = self.b.f32(eps as f32);
        let ms = self.b.fbin("addf", &ms, &e);
        let root = self.b.math("sqrt", &ms);
        Ok((mean, self.b.fbin("divf", &one, &root)))
    }

    fn norm_elem(
        &mut self,
        x: Value,
        w: Value,
        bias: Option<Value>,
        (mean, r): &(Option<String>, String),
        idx: &[String],
    ) -> Result<Val, LowerError> {
        let last = idx.len() - 1;
        let v = self.loadf(x, idx)?;
        let c = match mean {
            Some(m) => self.b.fbin("subf", &v, m),
            None => v,
        };
        let y = self.b.fbin("mulf", &c, r);
        let g = self.loadf(w, std::slice::from_ref(&idx[last]))?;
        let y = self.b.fbin("mulf", &y, &g);
        Ok(Val::f32(match bias {
            None => y,
            Some(bv) => {
                let bb = self.loadf(bv, std::slice::from_ref(&idx[last]))?;
                self.b.fbin("addf", &y, &bb)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::ROW_KEEP;
    use crate::lower::emit::{emit, Target};
    use crate::lower::CpuStep;

    /// The bifurcated scores' softmax of dtype `dtype` (every value).
    fn concat_softmax(dtype: &str) -> crate::ir::Graph {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m_c", "m_d"], "constants": {"h": 3}},
            "inputs": [
                {"name": "s_ctx", "role": "activation", "shape": ["b", "h", 1, "m_c"], "dtype": dtype},
                {"name": "s_dec", "role": "activation", "shape": ["b", "h", 1, "m_d"], "dtype": dtype},
                {"name": "s_new", "role": "activation", "shape": ["b", "h", 1, 1], "dtype": dtype},
                {"name": "mask", "role": "activation", "shape": [1, "m_c+m_d+1"], "dtype": dtype}
            ],
            "nodes": [
                {"id": "s", "op": "concat", "inputs": ["s_ctx", "s_dec", "s_new"], "attrs": {"axis": 3}},
                {"id": "scaled", "op": "scale", "inputs": ["s"], "attrs": {"value": 0.125}},
                {"id": "masked", "op": "add", "inputs": ["scaled", "mask"]},
                {"id": "p", "op": "softmax", "inputs": ["masked"], "attrs": {"axis": 3}}
            ],
            "outputs": [{"name": "p", "node": "p"}]
        });
        crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `graph` (a [`concat_softmax`]) at each `(b, m_c, m_d)` against the
    /// interpreter, within `abs + rel · |want|` of each element; the new
    /// token masked, and at m_d > 0 the first decode row. Inputs are
    /// given as values of the storage type (`round`), as the CPU stores
    /// them (the interpreter does not emulate storage precision).
    fn check_concat_softmax(
        graph: &crate::ir::Graph,
        step: &CpuStep,
        points: &[(i64, i64, i64)],
        (round, abs, rel): (fn(f32) -> f32, f32, f32),
    ) {
        for &(b, m_c, m_d) in points {
            let point = BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)]);
            let mut inputs = crate::interp::random_inputs(graph, &point, 3).unwrap_or_else(|e| panic!("{e}"));
            for t in inputs.values_mut() {
                t.data.iter_mut().for_each(|x| *x = round(*x));
            }
            // Mask the new token, and at m_d > 0 the first decode row.
            if let Some(mask) = inputs.get_mut("mask") {
                let n = mask.data.len();
                mask.data[n - 1] = f32::NEG_INFINITY;
                if m_d > 0 {
                    mask.data[m_c as usize] = f32::NEG_INFINITY;
                }
            }
            let want = crate::interp::run(graph, &point, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let got = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got["p"].shape, want["p"].shape);
            for (i, (x, y)) in got["p"].data.iter().zip(&want["p"].data).enumerate() {
                assert!((x - y).abs() <= abs + rel * y.abs(), "{point:?}: element {i}: {x} vs {y}");
            }
        }
    }

    /// The bifurcated softmax: scaled, masked scores that are a concat of
    /// the context, decode and new-token parts along the softmax axis. On
    /// the CPU its max and sum are reductions LLVM vectorizes (its own
    /// `maximum`, a reassociable add) in one loop per part (no branch per
    /// element to find the part), walked in chunks that prefetch the next
    /// row's lines of each part (16 a chunk), and it matches the
    /// interpreter at ragged points, including an empty context, a fully
    /// masked lane and rows of several chunks and a remainder.
    #[test]
    fn softmax_over_concat_matches_interpreter() {
        let graph = concat_softmax("f32");
        let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
        let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            text.contains("llvm.intr.maximum(") && text.contains("fastmath<reassoc>"),
            "softmax reductions LLVM vectorizes:\n{text}"
        );
        assert!(!text.contains("= scf.if"), "row loops split at the concat's parts, no branch per element:\n{text}");
        assert!(!text.contains("llvm.alloca"), "an f32 softmax keeps its exps in its output:\n{text}");
        assert_eq!(text.matches("rw = 0 : i32").count(), 3 * 16, "next-row prefetches, three parts:\n{text}");
        let points = [(2, 37, 3), (1, 0, 0), (3, 16, 17), (2, 600, 3), (1, 256, 0), (2, 255, 300)];
        check_concat_softmax(&graph, &step, &points, (|x| x, 1e-6, 1e-5));
    }

    /// Grouped-query attention's bifurcated scores, `[b, g, p, 1, m]` parts
    /// concatenated and read as `[b, g·p, 1, m]` through a reshape: the
    /// row loops still split at the parts (no branch per element), and the
    /// softmax matches the interpreter.
    #[test]
    fn softmax_over_a_reshaped_concat_splits_its_rows() {
        let (graph, step, text) = crate::lower::emit::testing::cpu_step(&serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m_c", "m_d"], "constants": {"g": 2, "p": 3}},
            "inputs": [
                {"name": "s_ctx", "role": "activation", "shape": ["b", "g", "p", 1, "m_c"], "dtype": "f32"},
                {"name": "s_dec", "role": "activation", "shape": ["b", "g", "p", 1, "m_d"], "dtype": "f32"},
                {"name": "s_new", "role": "activation", "shape": ["b", "g", "p", 1, 1], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "s", "op": "concat", "inputs": ["s_ctx", "s_dec", "s_new"], "attrs": {"axis": 4}},
                {"id": "h", "op": "reshape", "inputs": ["s"], "attrs": {"shape": ["b", "g*p", 1, "m_c+m_d+1"]}},
                {"id": "scaled", "op": "scale", "inputs": ["h"], "attrs": {"value": 0.25}},
                {"id": "p", "op": "softmax", "inputs": ["scaled"], "attrs": {"axis": 3}}
            ],
            "outputs": [{"name": "p", "node": "p"}]
        }));
        assert!(!text.contains("= scf.if"), "row loops split at the concat's parts:\n{text}");
        for (b, m_c, m_d) in [(2, 37, 3), (1, 0, 0), (3, 16, 17)] {
            let at = crate::lower::emit::testing::point(&[("b", b), ("m_c", m_c), ("m_d", m_d)]);
            crate::lower::emit::testing::check_output(&graph, &step, &at, 5, "p", (1e-6, 1e-5));
        }
    }

    /// A bf16 / f16 softmax on the CPU keeps its `exp`s in an f32 row on
    /// the stack (rounded once, at the store) when the row fits
    /// ROW_KEEP, else computes them again: both within 1.5 units in the
    /// last place of the storage type of the interpreter (its f32 value
    /// rounded, the sum in another order; f16's smallest spacing, 2^-24,
    /// below its normal range), at rows on either side of ROW_KEEP, an
    /// empty context and a fully masked lane.
    #[test]
    fn half_softmax_keeps_its_exps_in_f32() {
        use crate::lower::cpu::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
        let long = ROW_KEEP as i64 + 5;
        type Half = (&'static str, fn(f32) -> f32, f32, i32);
        let halves: [Half; 2] = [
            ("bf16", |x| bf16_to_f32(f32_to_bf16(x)), 0.0, 8),
            ("f16", |x| f16_to_f32(f32_to_f16(x)), 1.5 * 2f32.powi(-24), 11),
        ];
        for (dtype, round, abs, bits) in halves {
            let graph = concat_softmax(dtype);
            let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
            let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(text.matches("llvm.alloca").count(), 1, "{dtype}: one kept row:\n{text}");
            let points = [(2, 37, 3), (1, 0, 0), (1, long - 1, 0), (2, long, 3), (1, ROW_KEEP as i64 - 1, 0)];
            check_concat_softmax(&graph, &step, &points, (round, abs, 1.5 * 2f32.powi(-bits)));
        }
    }
}
