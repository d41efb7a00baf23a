//! The next block of an operand's rows, prefetched while the tiles of
//! the current one run: the next panel of a weight kept in panels (here),
//! the next chunk of a chunked sum (`emit::chunks`) and the fused context
//! attention's next block of K and V (`emit::fused`, [`Kc::block_ahead`]),
//! all as [`LinesAhead`].
//!
//! A projection from panels (`..k,pkn->..pn`, see `lower::cpu::panels`)
//! walks one panel (`[K, PANEL]`, 256 KiB at K = 1024 in f32) with every
//! tile of rows in turn: the first tile reads it from memory, the others
//! from L2. That first pass waits on memory (a new 4 KiB page every 16
//! steps of the sum, faster than the hardware's prefetcher ramps up),
//! about a quarter of the panel's time at b = 32. Here every whole tile
//! of a panel fetches its share of the next panel's lines, one line per
//! step of its sum, so the next panel is in cache when its first tile
//! starts and the memory traffic runs under the arithmetic of the tiles
//! before. Measured in C on this kernel's loop (gate_proj's shape, b =
//! 32): 47.9 -> 56 G multiply-adds a second on one thread, 93 -> 111 on
//! two; in cpu_step (b = 32, two threads) the MLP projections 0.97-1.04
//! -> 0.82-0.89 ms each, 77% -> 87-92% of the FMA peak. (An f32
//! projection in wide tiles now walks its sum in chunks, `emit::chunks`,
//! whose whole tiles prefetch the next chunk instead: the last chunk's
//! is the next panel's first rows.)
//!
//! Narrow tiles (`emit::registers`: 6 rows × one vector of 16 outputs)
//! read a 16-wide stripe of the panel at a time; their whole tiles
//! prefetch the next stripe instead ([`Kc::stripe_ahead`]), and share its
//! lines by a shift rather than a division ([`Kc::lines_ahead_shifted`]),
//! as the chunked `w · V`'s narrow tiles share the next chunk's.

use crate::ir::Value;
use crate::lower::LowerError;

use super::Kc;

/// Bytes of a cache line: one prefetch each.
pub(super) const LINE_BYTES: i64 = 64;

/// [`LinesAhead::sum`] of a block prefetched over steps that no one
/// letter walks ([`Kc::block_ahead`]): not a letter of any einsum.
const FUSED_BLOCK: char = '\0';

/// The shift `s` of a block of `lines` lines prefetched over `steps`
/// steps, a line every `2^s` steps: the largest that still covers the
/// block (`lines · 2^s <= steps < lines · 2^(s+1)`). None where there
/// are more lines than steps (or none).
fn spread_shift(lines: i64, steps: i64) -> Option<u32> {
    (1..=steps).contains(&lines).then(|| (steps / lines).ilog2())
}

/// The next block of rows of an operand that a whole tile prefetches
/// its share of, a line per step of its sum: a panel projection's next
/// panel, a chunked sum's next chunk (`emit::chunks`).
pub(crate) struct LinesAhead {
    /// The summed letter whose loop walks the block's rows.
    pub(super) sum: char,
    /// The steps of the sum over a block, and the index of this block's
    /// first (0 for a whole panel).
    steps: i64,
    origin: Option<String>,
    /// The buffer's pointer and element type, the element offset of the
    /// next block's first row and the elements between its rows.
    ptr: String,
    dtype: crate::ir::DType,
    start: String,
    stride: String,
    /// Lines of a row, and the elements of a line.
    row_lines: i64,
    line: i64,
    /// The first line of this tile's share and the lines in a share.
    first: String,
    per: String,
    /// Shared by a shift (`Kc::lines_ahead_shifted`): at step `l` line
    /// `(first + l - origin) >> shift` (`first` then counts steps, not
    /// lines, and `per` is unused).
    shift: Option<String>,
}

/// Where the next block lies: buffer `buf`, the element offset of its
/// first row and the elements between its rows.
pub(super) struct NextRows<'a> {
    pub buf: usize,
    pub start: String,
    pub stride: String,
    /// Elements a step of the sum reads of a row (whole lines).
    pub row: i64,
    /// Steps of the sum over the block; the index of this block's first.
    pub steps: i64,
    pub origin: Option<&'a str>,
}

impl Kc<'_> {
    /// For einsum `j` walked in vector tiles, the operand that is a
    /// weight kept in panels: a stored, densely laid out buffer `[P, K,
    /// ..]` of known sizes indexed `[p, k, z, ..]`, with `p` an output
    /// letter, `k` the letter the sum's loop walks (the one summed letter;
    /// of paired panels `[P, K / 2, width, 2]`, the pairs' index, see
    /// `emit::pair_dot`) and `z` the output's last (the vectors' axis); a
    /// row of a panel whole lines. Returns its buffer, the output axis of
    /// `p` and `k`.
    pub(super) fn panel_operand(&self, j: usize) -> Option<(usize, usize, char)> {
        let (spec, inputs) = self.contraction_spec(j)?;
        let z = *spec.output.last()?;
        let k = match self.pair_dot(j) {
            Some(pd) => pd.sum(),
            None => match self.reduced(&spec, &inputs).as_slice() {
                [(k, _)] => *k,
                _ => return None,
            },
        };
        let (subs, &v): (&Vec<char>, &Value) =
            spec.inputs.iter().zip(&inputs).find(|(s, _)| s.len() >= 3 && s[1] == k && s[2] == z)?;
        let p_axis = spec.output.iter().position(|&c| c == subs[0] && c != z)?;
        let b = self.stored(v)?;
        let buf = &self.program.buffers[b];
        let known: Option<Vec<i64>> = buf.shape.iter().map(|p| self.constant_size(p)).collect();
        let row: i64 = known?.get(2..)?.iter().product();
        let row_bytes = row * buf.dtype.size() as i64;
        let whole_lines = buf.shape.len() == subs.len() && buf.pitch.is_none() && row_bytes % LINE_BYTES == 0;
        whole_lines.then_some((b, p_axis, k))
    }

    /// The prefetch plan of a whole tile (`share` of `shares` along the
    /// panel's rows) of panel `panel` of the operand `panel_operand`
    /// found (`buf`, summed letter `k`).
    pub(super) fn panel_ahead(
        &mut self,
        (buf, k): (usize, char),
        panel: &str,
        shares: (&str, &str),
    ) -> Result<LinesAhead, LowerError> {
        let b = &self.program.buffers[buf];
        let shape = b.shape.clone();
        let sizes: Option<Vec<i64>> = shape.iter().skip(1).map(|p| self.constant_size(p)).collect();
        let Some((&steps, rest)) = sizes.as_ref().and_then(|s| s.split_first()) else {
            return Err(LowerError::Unsupported { node: b.name.clone(), message: "panels of sizes not known".into() });
        };
        let row: i64 = rest.iter().product();
        let one = self.b.index(1);
        let mut at = vec![self.b.addi(panel, &one)];
        let zero = self.b.index(0);
        at.resize(shape.len(), zero);
        let (_, start) = self.buffer_offset(buf, &at)?;
        let stride = self.b.index(row);
        let next = NextRows { buf, start, stride, row, steps, origin: None };
        self.lines_ahead(k, next, shares)
    }

    /// The plan of a whole tile (`share` of `shares`) prefetching the
    /// block `next` whose rows summed letter `k` walks: its lines split
    /// in equal runs among the shares.
    pub(super) fn lines_ahead(
        &mut self,
        k: char,
        next: NextRows,
        (share, shares): (&str, &str),
    ) -> Result<LinesAhead, LowerError> {
        let dtype = self.program.buffers[next.buf].dtype;
        let row_lines = (next.row / (LINE_BYTES / dtype.size() as i64)).max(1);
        let total = self.b.index(next.steps * row_lines);
        let per = self.ceil_div_here(&total, shares);
        let first = self.b.muli(share, &per);
        self.plan_ahead(k, next, (first, per, None))
    }

    /// The plan of a tile prefetching a block of `lines` whole lines of
    /// buffer `buf` from element `start` over its `steps` steps (the
    /// fused context attention's next block of K or V, `emit::fused`):
    /// line `l >> s` at step `l`, a line every `2^s` steps
    /// ([`spread_shift`]: the block covered, at most twice as fast as
    /// evenly), for a shift a step (with a division a step instead, 23
    /// steps for 4 lines in narrow tiles, the fused kernel was 0.97x as
    /// fast as with the old burst; with the shift 1.16x). More lines than
    /// steps (not a block the fused kernel makes: K's lines are at most
    /// its scores' steps, V's at most its w·V's), a line a step, the
    /// block's first `steps` lines.
    pub(super) fn block_ahead(
        &mut self,
        buf: usize,
        start: String,
        (lines, steps): (i64, i64),
    ) -> Result<LinesAhead, LowerError> {
        let line = LINE_BYTES / self.program.buffers[buf].dtype.size() as i64;
        let stride = self.b.index(line);
        let (first, per) = (self.b.index(0), self.b.index(1));
        let shift = self.b.index(i64::from(spread_shift(lines, steps).unwrap_or(0)));
        let next = NextRows { buf, start, stride, row: line, steps, origin: None };
        self.plan_ahead(FUSED_BLOCK, next, (first, per, Some(shift)))
    }

    /// The [`LinesAhead`] of `next` (summed letter `k`) for a share from
    /// `first` of `per` lines, or shared by `shift`.
    fn plan_ahead(
        &mut self,
        k: char,
        next: NextRows,
        (first, per, shift): (String, String, Option<String>),
    ) -> Result<LinesAhead, LowerError> {
        let dtype = self.program.buffers[next.buf].dtype;
        let line = LINE_BYTES / dtype.size() as i64;
        let ptr = self.ptr(next.buf)?;
        Ok(LinesAhead {
            sum: k,
            steps: next.steps,
            origin: next.origin.map(str::to_owned),
            ptr,
            dtype,
            start: next.start,
            stride: next.stride,
            row_lines: (next.row / line).max(1),
            line,
            first,
            per,
            shift,
        })
    }

    /// The prefetch plan of whole tile `share` of `shares` (rows of a
    /// narrow vector tile) of the 16-wide stripe of panel `panel` from
    /// column `z0`, f32: the next stripe (the next 16 columns, or the
    /// next panel's first), a line a row. Tile `t` prefetches at step `l`
    /// line `(t · K + l) >> s`, `2^s` the most whole tiles' power of two:
    /// the first `2^s` tiles cover the stripe, a line every `2^s` steps, by
    /// an add and a shift a step (tiles past them fetch past the stripe:
    /// hints, harmless). None where the stripe is not whole lines.
    pub(super) fn stripe_ahead(
        &mut self,
        (buf, k): (usize, char),
        (panel, z0): (&str, &str),
        (share, whole): (&str, &str),
    ) -> Result<Option<LinesAhead>, LowerError> {
        let b = &self.program.buffers[buf];
        let (shape, dtype) = (b.shape.clone(), b.dtype);
        let sizes: Option<Vec<i64>> = shape.iter().skip(1).map(|p| self.constant_size(p)).collect();
        let Some((&steps, rest)) = sizes.as_ref().and_then(|s| s.split_first()) else { return Ok(None) };
        let row: i64 = rest.iter().product();
        let line = LINE_BYTES / dtype.size() as i64;
        if dtype != crate::ir::DType::F32 || line != super::BLOCK as i64 || row % line != 0 || rest.len() != 1 {
            return Ok(None);
        }
        let zero = self.b.index(0);
        let one = self.b.index(1);
        let mut here = vec![panel.to_owned(), zero.clone(), z0.to_owned()];
        here.resize(shape.len(), zero.clone());
        let (_, cur) = self.buffer_offset(buf, &here)?;
        let mut after = vec![self.b.addi(panel, &one), zero.clone()];
        after.resize(shape.len(), zero);
        let (_, next_panel) = self.buffer_offset(buf, &after)?;
        let w = self.b.index(line);
        let z1 = self.b.addi(z0, &w);
        let r = self.b.index(row);
        let inside = self.b.op(&format!("arith.cmpi ult, {z1}, {r} : index"));
        let next_stripe = self.b.addi(&cur, &w);
        let start = self.b.op(&format!("arith.select {inside}, {next_stripe}, {next_panel} : index"));
        let next = NextRows { buf, start, stride: r, row: line, steps, origin: None };
        self.lines_ahead_shifted(k, next, (share, whole)).map(Some)
    }

    /// The plan of whole tile `share` of `whole` prefetching the block
    /// `next`, whose rows are one line each: tile `t` at step `l` (from
    /// the block's first) fetches line `(t · steps + l) >> s`, `2^s` the
    /// most whole tiles' power of two. The first `2^s` tiles cover the
    /// block, a line every `2^s` steps each, for an add and a shift a step
    /// (a share's division, `Kc::lines_ahead`, costs a multiply); tiles
    /// past them fetch past the block (hints, harmless).
    pub(super) fn lines_ahead_shifted(
        &mut self,
        k: char,
        next: NextRows,
        (share, whole): (&str, &str),
    ) -> Result<LinesAhead, LowerError> {
        let one = self.b.index(1);
        // s = floor(log2(max(whole, 1))).
        let n = self.b.op(&format!("arith.maxui {whole}, {one} : index"));
        let n = self.b.op(&format!("arith.index_cast {n} : index to i64"));
        let lz = self.b.op(&format!("math.ctlz {n} : i64"));
        let c63 = self.b.op("arith.constant 63 : i64");
        let s = self.b.op(&format!("arith.subi {c63}, {lz} : i64"));
        let s = self.b.op(&format!("arith.index_cast {s} : i64 to index"));
        let steps = self.b.index(next.steps);
        let first = self.b.muli(share, &steps);
        self.plan_ahead(k, next, (first, one, Some(s)))
    }

    /// At step `l` of the sum: line `(l - origin) · per / steps` of this
    /// tile's share (a line every `steps / per` steps; every `per /
    /// steps`-th one when a share has more lines than the sum has steps);
    /// shared by a shift ([`Kc::lines_ahead_shifted`]), line
    /// `(first + l − origin) >> shift`.
    pub(super) fn prefetch_line(&mut self, a: &LinesAhead, l: &str) {
        let d = match &a.origin {
            Some(o) => self.b.subi(l, o),
            None => l.to_owned(),
        };
        let at = match &a.shift {
            Some(s) => {
                let x = self.b.addi(&a.first, &d);
                self.b.op(&format!("arith.shrui {x}, {s} : index"))
            }
            None => {
                let steps = self.b.index(a.steps);
                let along = self.b.muli(&d, &a.per);
                let along = self.b.op(&format!("arith.divui {along}, {steps} : index"));
                self.b.addi(&a.first, &along)
            }
        };
        let off = if a.row_lines == 1 {
            self.b.muli(&at, &a.stride)
        } else {
            let n = self.b.index(a.row_lines);
            let row = self.b.op(&format!("arith.divui {at}, {n} : index"));
            let col = self.b.op(&format!("arith.remui {at}, {n} : index"));
            let row = self.b.muli(&row, &a.stride);
            let e = self.b.index(a.line);
            let col = self.b.muli(&col, &e);
            self.b.addi(&row, &col)
        };
        let off = self.b.addi(&a.start, &off);
        self.b.prefetch(&a.ptr, &off, a.dtype, false);
    }
}

#[cfg(test)]
mod tests {
    use super::spread_shift;
    use crate::lower::emit::testing::{check_output, context_wv_doc, cpu_step, cpu_step_tiles, point};

    /// `x [b, 1, 64] @ W[o, 64]ᵀ`, W kept in panels of 64 outputs, at o =
    /// 192 (three panels: the last tile's prefetch lands past the weight,
    /// harmless) and o = 64 (one); f32, and bf16 (in paired panels summed
    /// by `vdpbf16ps` where this CPU has it, else in plain ones). The
    /// whole 4-row tiles' sum loop prefetches one line of the next panel
    /// a step, the short tiles' (b not a multiple of 4) do not; outputs
    /// against the interpreter at b on either side of the tiles and of
    /// the share of lines each tile takes (b = 32: 8 tiles, a line every
    /// 2 steps).
    #[test]
    fn panel_tiles_prefetch_the_next_panel() {
        for (dtype, o, tol) in [("f32", 192, 1e-4), ("f32", 64, 1e-4), ("bf16", 192, 2e-2)] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": 64, "o": o}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": dtype},
                    {"name": "w", "role": "weight", "shape": ["o", "d"], "dtype": dtype}
                ],
                "nodes": [{"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}}],
                "outputs": [{"name": "y", "node": "y"}]
            });
            // The tiles' prefetch (a half panel widened a chunk at a time
            // fetches its own way, `emit::half_panels`).
            let (graph, step, text) = crate::lower::emit::with_half_panels(false, || cpu_step(&doc));
            let what = format!("{dtype}, o = {o}");
            assert!(step.graph().find("y.panels").is_some(), "{what}: w kept in panels");
            let tile = format!("-> ({}) {{", ["vector<16xf32>"; 16].join(", "));
            let loops: Vec<&str> =
                text.split(&tile).skip(1).map(|s| s.split("scf.yield").next().unwrap_or("")).collect();
            assert!(!loops.is_empty(), "{what}: whole tiles:\n{text}");
            let hint = "\"llvm.intr.prefetch\"";
            let paired = dtype == "bf16" && crate::lower::emit::host_has_bf16_dot();
            assert_eq!(text.contains(super::super::pair_dot::DPBF16PS), paired, "{what}: paired panels:\n{text}");
            // Without the dot product, bf16 rows are widened a stretch at
            // a time: the steps' loop inside the stretch's.
            let steps = loops[usize::from(dtype == "bf16" && !paired)..].first().copied().unwrap_or("");
            assert_eq!(steps.matches(hint).count(), 1, "{what}: a line a step:\n{text}");
            let short = format!("-> ({}) {{", ["vector<16xf32>"; 4].join(", "));
            for rest in text.split(&short).skip(1) {
                let body = rest.split("scf.yield").next().unwrap_or("");
                assert!(!body.contains(hint), "{what}: a short tile prefetches nothing:\n{text}");
            }
            for b in [1, 3, 4, 5, 16, 17, 32] {
                check_output(&graph, &step, &point(&[("b", b)]), 9, "y", (tol, tol));
            }
        }
    }

    /// A block spread over a tile's steps by a shift: every line fetched
    /// within the steps, at most twice as fast as evenly.
    #[test]
    fn spread_lines_cover_the_block() {
        for lines in 1..=300i64 {
            for steps in lines..=2000 {
                let s = spread_shift(lines, steps).unwrap_or_else(|| panic!("{lines} over {steps}"));
                assert!(lines << s <= steps && steps < lines << (s + 1), "{lines} lines over {steps} steps: {s}");
            }
            assert_eq!(spread_shift(lines, lines - 1), None);
        }
        assert_eq!(spread_shift(0, 5), None);
        assert_eq!(spread_shift(128, 256), Some(1));
        assert_eq!(spread_shift(128, 736), Some(2));
    }

    /// Narrow tiles (`emit::registers`) share the next lines by a shift:
    /// a projection's whole 6-row tiles each prefetch the next 16-wide
    /// stripe of the panel (the next 16 columns, or the next panel's
    /// first; the last past the weight, harmless), and the chunked
    /// context `w · V`'s the next chunk's 16-wide stripe of V's rows, a
    /// line a step at most, with an add and a shift (no division, as the
    /// wide tiles' shares take). Against the interpreter at b with no whole
    /// tile (b < 6), one (s = 0), two, three (s = 1), five (s = 2), and
    /// tiles left of every size.
    #[test]
    fn narrow_tiles_share_the_next_lines_by_a_shift() {
        let proj = |o: i64| {
            serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": 64, "o": o}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": "f32"},
                    {"name": "w", "role": "weight", "shape": ["o", "d"], "dtype": "f32"}
                ],
                "nodes": [{"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}}],
                "outputs": [{"name": "y", "node": "y"}]
            })
        };
        let wv = context_wv_doc();
        let bs = [1, 5, 6, 7, 12, 13, 18, 20, 32, 33];
        let cases = [(proj(192), "y", 0), (proj(64), "y", 0), (wv, "o", 2100)];
        for (doc, name, m) in cases {
            let (graph, step, text) = cpu_step_tiles(&doc, true);
            let tile =
                format!("-> ({}) {{", ["vector<16xf32>"; super::super::registers::NARROW_VECTOR_ROWS].join(", "));
            let loops: Vec<&str> =
                text.split(&tile).skip(1).map(|s| s.split("scf.yield").next().unwrap_or("")).collect();
            assert_eq!(loops.len(), 1, "{name}: one loop of whole tiles:\n{text}");
            let body = loops[0];
            assert_eq!(body.matches("\"llvm.intr.prefetch\"").count(), 1, "{name}: a line a step:\n{text}");
            assert!(body.contains("arith.shrui"), "{name}: the line by a shift:\n{text}");
            assert!(!body.contains("arith.divui"), "{name}: no division a step:\n{text}");
            for b in bs {
                let at = if m > 0 { point(&[("b", b), ("m", m)]) } else { point(&[("b", b)]) };
                check_output(&graph, &step, &at, 5, name, (1e-4, 1e-4));
            }
        }
    }
}
