//! Projections from half-precision panels, each chunk of a panel widened
//! to f32 once for every tile of rows.
//!
//! A weight kept in panels (`cpu::panels`, `[out / 64, in, 64]`) in f16,
//! or in bf16 where the CPU has no bf16 instruction to sum it with
//! (`emit::pair_dot`, `emit::amx`), is read by the strided contraction's
//! tiles of 4 rows × 4 vectors of 16 outputs: each step of the sum widens
//! the panel's 64 halves to f32 again in every tile of rows. f16 takes a
//! `vcvtph2ps` a vector, two operations on AVX-512's FMA pipes, so 4 of
//! them, 8 operations, beside each step's 16 FMAs (bf16 4 by its split,
//! `emit::widened_rows`); and the whole panel is read by every tile of
//! rows, from L2 where it fits (Llama-2-7B's down projection's panel,
//! 11008 inputs, is 1.4 MB).
//!
//! Here ([`Kc::half_panels`]) the kernel's items are (panel, group of up
//! to [`GROUP_ROWS`] rows), split into parts, and an item's sum runs in
//! chunks of [`CHUNK`] steps: each chunk of the panel is widened once
//! into an f32 slot (16 KiB, in L1), then every tile of the group's rows
//! runs the chunk's part of its sums from it (its rows of `x` widened
//! into a slot of their own first), carrying its sums from chunk to chunk
//! in an f32 slot of the group's rows (16 KiB), and at the end the sums
//! are stored, rounded to the output's dtype. Each output's sum runs in
//! input order, with the same FMAs from the same zeros: the same bits as
//! the tiles before. The chunked sums ([`Kc::chunked_sums`]) take their
//! addresses from a [`ChunkedSum`] (the half operand's pitch from a step
//! to the next, each row's offsets of `x` and of its outputs noted in a
//! slot once an item), which the context `w · V` of a half V fills too
//! (`emit::half_values`).
//!
//! The half panel's next chunk (at a panel's end, the next panel's
//! first, contiguous in memory) is fetched into L2 a line a step of the
//! whole tiles' sums (16 rows: 256 steps a chunk for its 128 lines of
//! f16), or, where the rows are fewer than two whole tiles, two lines a
//! step of the chunk's widening [`CHUNK_AHEAD`] chunks on: fetched in
//! that burst at every row count, 16 rows took 1.14x the time, 32 1.09x,
//! 8 1.16x; spread over the tiles at every row count, one row 1.2x
//! (`scripts/projection-lab.sh`, up_proj, below).
//!
//! On the 2-core Emerald Rapids VM (no AVX512-BF16 or AMX in its flags),
//! against 4a8d025, where the tiles widened each step and f16 rows each
//! element (`PROJECTION_LAB_CONFIG=examples/llama-2-7b/config.json
//! scripts/projection-lab.sh --base 4a8d025 PROJECTION 20 2 f16 16`):
//! Llama-2-7B's up_proj 2.40x, down_proj 2.71x; cpu_step with its first
//! 2 layers (f16, `BIFURC_BENCH_CONFIG`, m_c = 2048, two rounds
//! alternated) b = 32 377-384 -> 147-168 ms, b = 16 196-198 -> 82-84,
//! b = 1 52-62 -> 43; Mistral-7B's in bf16 b = 32 198-204 -> 148-158,
//! b = 16 105-109 -> 83-85, b = 1 47-48 -> 42-43.

use crate::ir::{DType, EinsumSpec, Value};
use crate::lower::LowerError;

use super::amx::{dense_source, distinct};
use super::bodies::Out;
use super::panel_ahead::LINE_BYTES;
use super::Kc;

/// Outputs of a panel (`cpu::panels::PANEL`): 4 vectors of 16.
pub(super) const PANEL_OUTPUTS: i64 = 64;
/// Steps of the sum a chunk takes: its 64 f32 a step in a 16 KiB slot.
const CHUNK: i64 = 64;
/// Rows of `x` an item computes: their carried sums in a 16 KiB slot.
pub(super) const GROUP_ROWS: i64 = 64;
/// Rows of a tile: 4 × 4 vectors of accumulators.
const TILE_ROWS: i64 = 4;
/// How many chunks ahead of the one it widens a chunk's widening fetches
/// the half panel (into L2).
const CHUNK_AHEAD: i64 = 2;

#[cfg(test)]
thread_local! {
    /// Whether this thread's kernels widen half panels a chunk at a time
    /// (`Some(false)`: the tiles widen them at every step; see
    /// [`with_half_panels`]).
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with half panels widened a chunk at a time (`on`, as the CPU
/// step chooses) or by the tiles at every step (tests: the bits to match).
#[cfg(test)]
pub(crate) fn with_half_panels<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::pair_dot::with_forced(&FORCED, on, f)
}

/// An item's sums in chunks (a projection's panel and group of rows, or
/// a context `w · V`'s head, 64 outputs and group of rows: see
/// `emit::half_values`), its values hoisted or the item's.
pub(super) struct ChunkedSum<'a> {
    /// The half operand's pointer and dtype, the element of the item's
    /// first output at step 0, and the elements from a step to the next.
    pub w: (&'a str, DType),
    pub w_at: (&'a str, &'a str),
    /// The pointer of `x` and its dtype.
    pub x: (&'a str, DType),
    /// The sum's steps.
    pub steps: &'a str,
    /// Where each row of the item reads `x` and writes its 64 outputs
    /// (see [`Kc::note_row_offsets`]).
    pub offsets: &'a str,
    /// The item's rows (up to [`GROUP_ROWS`]).
    pub rows: &'a str,
}

/// The stack slots of [`Kc::chunked_sums`]: a tile's rows of `x`, the
/// widened chunk and the carried sums.
struct Slots<'a> {
    x: &'a str,
    w: &'a str,
    carry: &'a str,
}

/// A projection from half panels (see the module docs).
pub(super) struct HalfPanels {
    /// The dense buffer of `x` (`[.., in]`) and its dtype.
    x: usize,
    x_dtype: DType,
    /// The panels' buffer (`[panels, in, 64]`), its dtype, `in` and its
    /// panels.
    w: usize,
    w_dtype: DType,
    inputs: i64,
    panels: i64,
}

impl Kc<'_> {
    /// Node `j` as a [`HalfPanels`] projection: on the CPU in wide tiles
    /// (16 lanes, not emulating the GPU), the einsum `..k,pkn->..pn` of
    /// an `x` `[.., in]` read from a dense unpitched buffer in its order
    /// (see [`dense_source`]) and stored f16 or bf16 panels `[P, in, 64]`
    /// of constant sizes, into a float output `[.., P, 64]` with `x`'s
    /// leading axes. bf16 panels only where the CPU sums bf16 by FMAs
    /// (panels paired for its dot product are another einsum).
    pub(super) fn half_panels(&self, j: usize, out: &Out) -> Option<HalfPanels> {
        if !self.chunks_widened(out) {
            return None;
        }
        let (spec, inputs) = self.contraction_spec(j)?;
        let (EinsumSpec { inputs: subs, output }, &[xv, wv]) = (&spec, inputs.as_slice()) else { return None };
        let [xs, ws] = subs.as_slice() else { return None };
        let (&[p, k, n], rank) = (ws.as_slice(), output.len()) else { return None };
        let lead = output.get(..rank.checked_sub(2)?)?;
        let letters_ok = output[rank - 2..] == [p, n]
            && xs.len() == lead.len() + 1
            && xs[..lead.len()] == *lead
            && xs[lead.len()] == k
            && distinct(output)
            && distinct(ws)
            && !lead.iter().any(|c| ws.contains(c));
        if !letters_ok {
            return None;
        }
        let w = self.stored(wv)?;
        let w_dtype = self.program.buffers[w].dtype;
        let half = self.widens_half(w_dtype);
        let sizes: Vec<i64> = self.graph.shape_of(wv).iter().map(|d| self.constant_size(d)).collect::<Option<_>>()?;
        let &[panels, inputs, outs] = sizes.as_slice() else { return None };
        if !half || outs != PANEL_OUTPUTS || inputs <= 0 || panels <= 0 {
            return None;
        }
        let source = dense_source(self.graph, xv, &|v| self.stored(v).is_some())?;
        let x = self.stored(source)?;
        let x_buf = &self.program.buffers[x];
        let (x_shape, y_shape) = (self.graph.shape_of(xv), self.graph.shape_of(Value::Node(j)));
        let dense = x_buf.pitch.is_none()
            && x_buf.dtype.is_float()
            && x_shape.len() == lead.len() + 1
            && self.graph.dims.same_shape(&x_shape[..lead.len()], &y_shape[..lead.len()])
            && x_shape.get(lead.len()).and_then(|d| self.constant_size(d)) == Some(inputs)
            && y_shape.get(rank - 2).and_then(|d| self.constant_size(d)) == Some(panels);
        dense.then_some(HalfPanels { x, x_dtype: x_buf.dtype, w, w_dtype, inputs, panels })
    }

    /// Whether a kernel writing `out` may widen a half operand's chunks
    /// once for all its tiles: on the CPU in wide tiles (16 lanes, not
    /// emulating the GPU), a float output, its walk not yet split.
    pub(super) fn chunks_widened(&self, out: &Out) -> bool {
        #[cfg(test)]
        if FORCED.with(std::cell::Cell::get) == Some(false) {
            return false;
        }
        self.simd == 16 && !self.narrow && self.partition == super::Partition::Pending && out.dtype.is_float()
    }

    /// Whether half operand `dtype` is widened to f32 by FMA kernels: f16,
    /// and bf16 where the CPU has no bf16 instruction to sum it with
    /// (`emit::pair_dot`, `emit::amx`).
    pub(super) fn widens_half(&self, dtype: DType) -> bool {
        match dtype {
            DType::F16 => true,
            DType::BF16 => !self.bf16_dot && !self.amx,
            _ => false,
        }
    }

    /// The body of [`HalfPanels`] projection `h` (see the module docs): a
    /// loop over (panel, group of rows), split into parts.
    pub(super) fn half_panels_body(
        &mut self,
        out: &Out,
        h: &HalfPanels,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        let lead: Vec<usize> = (0..out.sizes.len() - 2).collect();
        let rows = self.extent_of(out, &lead)?;
        let groups = self.ceil_div(&rows, GROUP_ROWS);
        let panels = self.b.index(h.panels);
        let item = self.part_range(&[panels.clone(), groups.clone()]);
        self.partition = super::Partition::Done;
        *opened += 1;
        let at = self.b.delinearize(&item, &[panels, groups]);
        let (p, g) = (at[0].clone(), at[1].clone());
        let (r0, rn) = self.group_rows(&g, &rows);
        // Where each row's x and outputs start: output row r, panel p,
        // its outputs from (r·P + p)·64.
        let (inputs, out_panels, width) = (self.b.index(h.inputs), self.b.index(h.panels), self.b.index(PANEL_OUTPUTS));
        let offsets = self.offsets_slot(2 * GROUP_ROWS);
        let r = self.b.open_loop(&rn);
        let row = self.b.addi(&r0, &r);
        let x_off = self.b.muli(&row, &inputs);
        let o_off = self.b.muli(&row, &out_panels);
        let o_off = self.b.addi(&o_off, &p);
        let o_off = self.b.muli(&o_off, &width);
        self.note_row_offsets(&offsets, &r, (&x_off, &o_off));
        self.b.close();
        let (w_ptr, x_ptr) = (self.ptr(h.w)?, self.ptr(h.x)?);
        let panel_len = self.b.index(h.inputs * PANEL_OUTPUTS);
        let w_base = self.b.muli(&p, &panel_len);
        let sum = ChunkedSum {
            w: (&w_ptr, h.w_dtype),
            w_at: (&w_base, &width),
            x: (&x_ptr, h.x_dtype),
            steps: &inputs,
            offsets: &offsets,
            rows: &rn,
        };
        self.chunked_sums(out, &sum)?;
        Ok(item)
    }

    /// Group `g`'s first row of `rows` and its number of rows (up to
    /// [`GROUP_ROWS`]).
    pub(super) fn group_rows(&mut self, g: &str, rows: &str) -> (String, String) {
        let group = self.b.index(GROUP_ROWS);
        let r0 = self.b.muli(g, &group);
        let left = self.b.subi(rows, &r0);
        let rn = self.b.op(&format!("arith.minui {left}, {group} : index"));
        (r0, rn)
    }

    /// Notes in offsets slot `slot` (of `2 · GROUP_ROWS`) where the item's
    /// row `r` reads `x` (at `r`) and writes its outputs (at `GROUP_ROWS +
    /// r`).
    pub(super) fn note_row_offsets(&mut self, slot: &str, r: &str, (x, o): (&str, &str)) {
        self.note_offset(slot, r, x);
        let group = self.b.index(GROUP_ROWS);
        let at = self.b.addi(r, &group);
        self.note_offset(slot, &at, o);
    }

    /// An item's sums of `s` (see [`ChunkedSum`]): from zeros, in chunks
    /// of [`CHUNK`] steps, each widened once for all the tiles of rows,
    /// then stored rounded to the output's dtype.
    pub(super) fn chunked_sums(&mut self, out: &Out, s: &ChunkedSum) -> Result<(), LowerError> {
        let two_tiles = self.b.index(2 * TILE_ROWS);
        let few = self.b.ult(s.rows, &two_tiles);
        let w_slot = self.b.stack_f32("half_panel_chunk", (CHUNK * PANEL_OUTPUTS) as usize, None);
        let carry = self.b.stack_f32("half_panel_sums", (GROUP_ROWS * PANEL_OUTPUTS) as usize, None);
        let x_slot = self.b.stack_f32("half_panel_rows", (TILE_ROWS * CHUNK) as usize, None);
        let slots = Slots { x: &x_slot, w: &w_slot, carry: &carry };
        let width = self.b.index(PANEL_OUTPUTS);
        let vty = "vector<16xf32>";
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        // The group's sums start at zero.
        let sums = self.b.muli(s.rows, &width);
        let (first, sixteen) = (self.b.index(0), self.b.index(16));
        let e = self.b.open_loop_from(&first, &sums, &sixteen);
        self.b.store_vector(&carry, &e, &zero, 16, DType::F32);
        self.b.close();
        let chunks = self.ceil_div(s.steps, CHUNK);
        let c = self.b.open_loop(&chunks);
        let chunk = self.b.index(CHUNK);
        let k0 = self.b.muli(&c, &chunk);
        let k_left = self.b.subi(s.steps, &k0);
        let kn = self.b.op(&format!("arith.minui {k_left}, {chunk} : index"));
        self.widen_chunk(s, &w_slot, (&k0, &kn), &few)?;
        // The next chunk's lines, spread over the whole tiles' steps.
        let (w_base, w_step) = s.w_at;
        let next = self.b.addi(&k0, &chunk);
        let next = self.b.muli(&next, w_step);
        let next = self.b.addi(w_base, &next);
        // The group's whole tiles, then its rows left one at a time.
        let tile = self.b.index(TILE_ROWS);
        let tiles = self.b.op(&format!("arith.divui {}, {tile} : index", s.rows));
        let t = self.b.open_loop(&tiles);
        let rt = self.b.muli(&t, &tile);
        self.chunk_tile(s, &slots, (&rt, TILE_ROWS as usize), (&k0, &kn), Some((&next, &t)))?;
        self.b.close();
        let whole = self.b.muli(&tiles, &tile);
        let one = self.b.index(1);
        let r = self.b.open_loop_from(&whole, s.rows, &one);
        self.chunk_tile(s, &slots, (&r, 1), (&k0, &kn), None)?;
        self.b.close();
        self.b.close();
        // The sums, rounded to the output's dtype.
        let r = self.b.open_loop(s.rows);
        let src = self.b.muli(&r, &width);
        let group = self.b.index(GROUP_ROWS);
        let at = self.b.addi(&r, &group);
        let dst = self.noted_offset(s.offsets, &at);
        for i in 0..PANEL_OUTPUTS / 16 {
            let shift = self.b.index(16 * i);
            let from = self.b.addi(&src, &shift);
            let v = self.b.load_vector(&carry, &from, 16, DType::F32);
            let to = self.b.addi(&dst, &shift);
            self.b.store_vector(&out.ptr, &to, &v, 16, out.dtype);
        }
        self.b.close();
        Ok(())
    }

    /// The offset of line `q` of the half operand's chunk whose first
    /// step is at `base`: a step's 64 halves are two lines.
    fn chunk_line(&mut self, s: &ChunkedSum, base: &str, q: &str) -> String {
        let per_line = LINE_BYTES / s.w.1.size() as i64;
        let lines = self.b.index(PANEL_OUTPUTS / per_line);
        let step = self.b.op(&format!("arith.divui {q}, {lines} : index"));
        let within = self.b.op(&format!("arith.remui {q}, {lines} : index"));
        let step = self.b.muli(&step, s.w_at.1);
        let per_line = self.b.index(per_line);
        let within = self.b.muli(&within, &per_line);
        let at = self.b.addi(base, &step);
        self.b.addi(&at, &within)
    }

    /// Steps `k0 .. k0 + kn` of the half operand widened into `slot`, 64
    /// f32 a step; with few rows each step also fetches its lines
    /// `CHUNK_AHEAD` chunks on into L2.
    fn widen_chunk(&mut self, s: &ChunkedSum, slot: &str, (k0, kn): (&str, &str), few: &str) -> Result<(), LowerError> {
        let ((w_ptr, w_dtype), (w_base, w_step)) = (s.w, s.w_at);
        let width = self.b.index(PANEL_OUTPUTS);
        let i = self.b.open_loop(kn);
        let k = self.b.addi(k0, &i);
        let from = self.b.muli(&k, w_step);
        let from = self.b.addi(w_base, &from);
        let to = self.b.muli(&i, &width);
        for v in 0..PANEL_OUTPUTS / 16 {
            let shift = self.b.index(16 * v);
            let src = self.b.addi(&from, &shift);
            let x = self.b.load_vector(w_ptr, &src, 16, w_dtype);
            let dst = self.b.addi(&to, &shift);
            self.b.store_vector(slot, &dst, &x, 16, DType::F32);
        }
        // With fewer rows than two whole tiles, whose steps would not
        // cover the next chunk's lines, each step fetches its two lines
        // CHUNK_AHEAD chunks on (a step's 64 halves are 128 bytes).
        self.b.open_guard(few);
        let per_line = LINE_BYTES / w_dtype.size() as i64;
        let ahead = self.b.index(CHUNK_AHEAD * CHUNK);
        let ahead = self.b.muli(&ahead, w_step);
        let later = self.b.addi(&from, &ahead);
        for l in 0..PANEL_OUTPUTS / per_line {
            let shift = self.b.index(l * per_line);
            let at = self.b.addi(&later, &shift);
            self.b.prefetch_to(w_ptr, &at, w_dtype, false, 2);
        }
        self.b.close();
        self.b.close();
        Ok(())
    }

    /// A tile of `n` rows of the item (from its row `rt`) runs steps `k0
    /// .. k0 + kn` of its sums from the widened chunk: its rows of `x`
    /// widened into their slot (`CHUNK` a row), its sums from the carry
    /// slot and back; a whole tile's steps fetch the next chunk (from
    /// `next`, the tile `t`'s share of its lines).
    fn chunk_tile(
        &mut self,
        s: &ChunkedSum,
        slots: &Slots,
        (rt, n): (&str, usize),
        (k0, kn): (&str, &str),
        ahead: Option<(&str, &str)>,
    ) -> Result<(), LowerError> {
        let vty = "vector<16xf32>";
        let width = self.b.index(PANEL_OUTPUTS);
        let vectors = (PANEL_OUTPUTS / 16) as usize;
        let one = self.b.index(1);
        let (x_ptr, x_dtype) = s.x;
        let mut accs = Vec::with_capacity(n * vectors);
        for i in 0..n {
            let ri = self.b.index(i as i64);
            let local = self.b.addi(rt, &ri);
            // The row's stretch of x, widened into its row of the slot.
            let x_row = self.noted_offset(s.offsets, &local);
            let x_row = self.b.addi(&x_row, k0);
            let slot_row = self.b.index(i as i64 * CHUNK);
            self.widen_into(
                kn,
                (slots.x, &slot_row),
                &mut |kc, e| {
                    let src = kc.b.addi(&x_row, e);
                    Ok(kc.b.load_vector(x_ptr, &src, 16, x_dtype))
                },
                &mut |kc, e| {
                    let src = kc.b.addi(&x_row, e);
                    Ok(kc.b.load(x_ptr, &src, x_dtype).ssa)
                },
            )?;
            let sums = self.b.muli(&local, &width);
            for v in 0..vectors {
                let shift = self.b.index(16 * v as i64);
                let at = self.b.addi(&sums, &shift);
                accs.push(self.b.load_vector(slots.carry, &at, 16, DType::F32));
            }
        }
        let (res, step, accs) = self.b.open_for_typed(kn, &one, &accs, vty);
        if let Some((next, tile)) = ahead {
            // Line `t · kn + step` of the next chunk, the last where past it.
            let q = self.b.muli(tile, kn);
            let q = self.b.addi(&q, &step);
            let last = self.b.index(CHUNK * PANEL_OUTPUTS * s.w.1.size() as i64 / LINE_BYTES - 1);
            let q = self.b.op(&format!("arith.minui {q}, {last} : index"));
            let at = self.chunk_line(s, next, &q);
            self.b.prefetch_to(s.w.0, &at, s.w.1, false, 2);
        }
        let w_row = self.b.muli(&step, &width);
        let mut ws = Vec::with_capacity(vectors);
        for v in 0..vectors {
            let shift = self.b.index(16 * v as i64);
            let at = self.b.addi(&w_row, &shift);
            ws.push(self.b.load_vector(slots.w, &at, 16, DType::F32));
        }
        let mut nexts = Vec::with_capacity(accs.len());
        for i in 0..n {
            let at = self.b.index(i as i64 * CHUNK);
            let at = self.b.addi(&at, &step);
            let x = self.b.load(slots.x, &at, DType::F32).ssa;
            let x = self.b.op(&format!("vector.broadcast {x} : f32 to {vty}"));
            for (v, w) in ws.iter().enumerate() {
                let p = self.b.op(&format!("arith.mulf {x}, {w} fastmath<contract> : {vty}"));
                let acc = &accs[i * vectors + v];
                nexts.push(self.b.op(&format!("arith.addf {acc}, {p} fastmath<contract> : {vty}")));
            }
        }
        self.b.close_for_typed(&nexts, vty);
        for i in 0..n {
            let ri = self.b.index(i as i64);
            let local = self.b.addi(rt, &ri);
            let sums = self.b.muli(&local, &width);
            for v in 0..vectors {
                let shift = self.b.index(16 * v as i64);
                let at = self.b.addi(&sums, &shift);
                self.b.store_vector(slots.carry, &at, &res[i * vectors + v], 16, DType::F32);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::with_half_panels;
    use crate::interp::Tensor;
    use crate::lower::emit::testing::{check_output, check_parts, chunked_kernels, held_inputs, point};
    use crate::lower::CpuStep;

    /// Projections from f16 and bf16 panels in wide tiles, without bf16
    /// instructions: `in` of 1093 (a short last chunk, and a stretch of
    /// `x` past its last 16), an MLP of `[b, 1, ..]` rows, heads merged
    /// before `o_proj` (a dense `x` through a transpose of size-1 axes)
    /// and an f32 output. Widened a chunk at a time, every projection is
    /// one such kernel (its three slots); it gives the bits of the tiles
    /// that widen each step, at row counts under, at and past a tile and
    /// a group, the same bytes in any number of parts, and the
    /// interpreter's values within the half dtype's rounding.
    #[test]
    fn chunks_widened_once_sum_as_the_tiles_do() {
        for dtype in ["f16", "bf16"] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": 1093, "e": 96}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": dtype},
                    {"name": "w", "role": "weight", "shape": [192, "d"], "dtype": dtype},
                    {"name": "x1", "role": "activation", "shape": ["b", 1, 64], "dtype": dtype},
                    {"name": "w_up", "role": "weight", "shape": [128, 64], "dtype": dtype},
                    {"name": "w_down", "role": "weight", "shape": [64, 128], "dtype": dtype},
                    {"name": "heads", "role": "activation", "shape": ["b", 2, 1, 32], "dtype": dtype},
                    {"name": "w_o", "role": "weight", "shape": [64, 64], "dtype": dtype},
                    {"name": "x2", "role": "activation", "shape": ["b", "e"], "dtype": dtype},
                    {"name": "w_wide", "role": "weight", "shape": [192, "e"], "dtype": dtype}
                ],
                "nodes": [
                    {"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}},
                    {"id": "up", "op": "matmul", "inputs": ["x1", "w_up"], "attrs": {"transpose_b": true}},
                    {"id": "a", "op": "silu", "inputs": ["up"]},
                    {"id": "down", "op": "matmul", "inputs": ["a", "w_down"], "attrs": {"transpose_b": true}},
                    {"id": "t", "op": "transpose", "inputs": ["heads"], "attrs": {"perm": [0, 2, 1, 3]}},
                    {"id": "merged", "op": "reshape", "inputs": ["t"], "attrs": {"shape": ["b", 1, 64]}},
                    {"id": "o", "op": "matmul", "inputs": ["merged", "w_o"], "attrs": {"transpose_b": true}},
                    {"id": "wide", "op": "matmul", "inputs": ["x2", "w_wide"], "attrs": {"transpose_b": true},
                     "dtype": "f32"}
                ],
                "outputs": [
                    {"name": "y", "node": "y"}, {"name": "down", "node": "down"}, {"name": "o", "node": "o"},
                    {"name": "wide", "node": "wide"}
                ]
            });
            let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
            let compile = |on: bool| {
                crate::lower::emit::with_narrow_tiles(false, || {
                    crate::lower::emit::with_amx(false, || {
                        crate::lower::emit::with_bf16_dot(false, || {
                            with_half_panels(on, || {
                                let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
                                let text =
                                    crate::lower::emit::emit(step.graph(), step.program(), crate::lower::Target::Cpu)
                                        .unwrap_or_else(|e| panic!("{e}"));
                                (step, text)
                            })
                        })
                    })
                })
            };
            let ((mut chunked, text), (tiles, tiles_text)) = (compile(true), compile(false));
            assert_eq!(chunked_kernels(&text), 5, "{dtype}: every projection widens its chunks once:\n{text}");
            assert_eq!(chunked_kernels(&tiles_text), 0, "{dtype}: the tiles widen each step:\n{tiles_text}");
            // A line of the next chunk a step of a whole tile, and two a
            // step of the chunk's widening where the rows are few.
            let fetches = text.matches("\"llvm.intr.prefetch\"").count();
            assert_eq!(fetches, 5 * 3, "{dtype}: the chunks' prefetches:\n{text}");
            let names = ["y", "down", "o", "wide"];
            for b in [1, 3, 4, 5, 63, 64, 65, 130] {
                let at = point(&[("b", b)]);
                let held = crate::ir::DType::parse(dtype).unwrap_or_else(|e| panic!("{e}"));
                let inputs = held_inputs(&graph, &at, 9, held);
                let run = |step: &CpuStep| -> HashMap<String, Tensor> {
                    step.run(&at, &inputs).unwrap_or_else(|e| panic!("{dtype}, b = {b}: {e}"))
                };
                let (got, want) = (run(&chunked), run(&tiles));
                for name in names {
                    let bits = |t: &Tensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got[name]), bits(&want[name]), "{dtype}, b = {b}: {name}, chunks against tiles");
                    check_output(&graph, &chunked, &at, 9, name, (2e-2, 2e-2));
                }
                if [5, 65, 130].contains(&b) {
                    check_parts(&mut chunked, &at, &inputs, &got, &names);
                }
            }
        }
    }
}
