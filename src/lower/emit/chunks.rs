//! A strided contraction's sum walked in chunks.
//!
//! The context `w · V` of bifurcated attention, `[b, h, m] · [h, m, k]`,
//! runs as tiles of 4 samples × a 64-wide row of V (see `emit::vectors`),
//! each tile's sum walking all of V's `m` rows of the head: at m_c = 8192
//! a head's V is 2 MiB, past a core's L2, so every tile of samples reads
//! it again from L3 (8 times at b = 32), and with both cores doing so the
//! L3 holds them back (67-71% of the FMA peak on two threads, 84% on one).
//! Walked in chunks of [`SUM_CHUNK_BYTES`] of V's rows instead, every
//! tile runs the chunk's part of its sum (from the sums so far, which the
//! chunk before stored in the output) while the chunk stays in L2, and
//! each whole tile prefetches its share of the next chunk's lines, one a
//! step (`emit::panel_ahead`), so the first tile finds it there too: 2.45
//! -2.54 ms a layer against 3.06-3.24 on two threads (87-90% of the
//! peak). Each output's sum still runs in the order of `m`, its partial
//! sums kept in f32 between chunks: the same bits as one pass. A bf16
//! `w · V` summed in pairs of V's rows (`emit::pair_dot`, `pair_rows`)
//! takes the same chunks, each starting on a pair (f32 sums only): 1.89-
//! 2.12 -> 1.74-1.87 ms a layer on two threads, 3.65-3.82 -> 3.45-3.54
//! on one.
//!
//! A projection from f32 panels (`lower::cpu::panels`) in wide tiles
//! walks its sum in chunks of [`PANEL_CHUNK_BYTES`] of the panel the same
//! way, so that the tiles of rows after the first find a chunk in L1
//! rather than the whole panel in L2; its whole tiles prefetch the next
//! chunk, the last chunk's the next panel's first rows (1.10-1.29x on the
//! MLP's projections at b = 32, see there).
//!
//! Narrow tiles (`emit::registers`: 6 samples × one vector of 16 outputs)
//! read a 16-wide stripe of V's rows each, and a 64-wide head's 4 blocks
//! of outputs were walked outside the chunks: each block's tiles read the
//! samples' probabilities again (4 times a head, from L3 or memory).
//! There the chunks are walked outside the blocks, each
//! [`NARROW_SUM_CHUNK_BYTES`] of whole rows of V (512 of a 64-wide f32
//! head), so that a chunk's V and probabilities (64 KiB at b = 32) stay
//! in a 512 KiB L2 while every block's tiles read them. On a 2-core Zen 3
//! VM (cpu_step, f32, b = 32, m_c = 8192, one thread, both layers' w·V,
//! three runs alternated): 20.1-26.8 -> 16.6-16.7 ms (chunks of 256 KiB
//! whole rows: 15.8-20.1); against the layers' q·K, which did not
//! change, 1.11-1.31x -> 0.96-0.97x its time (two threads: 1.08-1.24x ->
//! 1.00-1.06x).

use crate::ir::DType;
use crate::lower::LowerError;

use super::bodies::Out;
use super::panel_ahead::{LinesAhead, NextRows, LINE_BYTES};
use super::Kc;

/// Bytes of the strided operand's rows a chunk of the sum reads (with a
/// 64-wide f32 row: 1024 steps), about an eighth of L2: room for the next
/// chunk, prefetched, and the other operand's lines.
pub(super) const SUM_CHUNK_BYTES: i64 = 256 * 1024;

/// Bytes of the strided operand's rows a chunk reads with narrow tiles
/// (`emit::registers`), whose chunks are walked outside the blocks of 16
/// outputs (each a 16-wide stripe of the rows, the tiles' one vector):
/// the whole rows (with a 64-wide f32 row: 512 steps), beside the next
/// chunk prefetched and the other operand's (b = 32: 64 KiB) in a 512
/// KiB L2 (AMD Zen 2-4).
pub(super) const NARROW_SUM_CHUNK_BYTES: i64 = 128 * 1024;

/// Bytes of an f32 panel's rows a chunk of a projection's sum reads in
/// wide tiles (128 steps of a 64-wide panel): with the 4 input rows'
/// stretch of a tile, within L1 (48 KiB) while every tile of rows reads
/// it.
pub(super) const PANEL_CHUNK_BYTES: i64 = 32 * 1024;

/// One chunk of a chunked sum: its indices `[from, to)` of the summed
/// letter and a tile's accumulators on entry.
pub(crate) struct SumPart {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) inits: Vec<String>,
}

impl Kc<'_> {
    /// For einsum `j` walked in vector tiles reading `row` elements of
    /// the strided operand a step, in chunks of about `bytes` of its rows:
    /// the chunk length and the number of
    /// chunks (hoisted; at least one, so a sum of no terms still stores
    /// its zeros) when its sum is chunked: one summed letter, longer than
    /// a chunk or of a size known only at run time, not a sum of paired
    /// panels (`Kc::pair_dot`). A projection from f32 panels
    /// (`Kc::panel_operand`) is chunked in wide tiles only, in chunks of
    /// [`PANEL_CHUNK_BYTES`] whatever `bytes` says (narrow tiles walk a
    /// stripe of the panel a tile, and prefetch the next stripe:
    /// `Kc::stripe_ahead`). A sum in pairs of rows formed while it runs
    /// (`Kc::pair_rows`) is chunked on pairs.
    pub(super) fn sum_chunk(&mut self, j: usize, (row, bytes): (usize, i64)) -> Option<(i64, String)> {
        if self.pair_dot(j).is_some() {
            return None;
        }
        let bytes = match self.panel_operand(j) {
            None => bytes,
            Some((buf, _, _)) if !self.narrow && self.program.buffers[buf].dtype == DType::F32 => PANEL_CHUNK_BYTES,
            Some(_) => return None,
        };
        let (spec, inputs) = self.contraction_spec(j)?;
        let reduced = self.reduced(&spec, &inputs);
        let [(_, d)] = reduced.as_slice() else { return None };
        // An even length: a sum in pairs of rows (`Kc::pair_rows`) starts
        // each chunk on a pair.
        let len = (bytes / (row.max(1) * DType::F32.size()) as i64).max(2) & !1;
        let m = self.sizes(std::slice::from_ref(d)).ok()?.pop()?;
        if self.b.known(&m).is_some_and(|m| m <= len) {
            return None;
        }
        let chunks = self.ceil_div(&m, len);
        let one = self.b.index(1);
        Some((len, self.b.hoist(&format!("arith.maxui {chunks}, {one} : index"))))
    }

    /// Chunk `index` (of `len` steps) for the tile of outputs at `idxs`
    /// (vectors of `lanes`, f32): its range, and its accumulators: zeros
    /// in the first chunk, the sums so far in the others.
    pub(super) fn chunk_start(
        &mut self,
        out: &Out,
        (index, len): (&str, i64),
        idxs: &[Vec<String>],
        lanes: usize,
    ) -> SumPart {
        let n = self.b.index(len);
        let from = self.b.muli(index, &n);
        let to = self.b.addi(&from, &n);
        let zero_index = self.b.index(0);
        let first = self.b.op(&format!("arith.cmpi eq, {index}, {zero_index} : index"));
        let vty = format!("vector<{lanes}xf32>");
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let inits = idxs
            .iter()
            .map(|idx| {
                let off = self.b.linearize(idx, &out.sizes);
                let v = self.b.load_vector(&out.ptr, &off, lanes, DType::F32);
                self.b.op(&format!("arith.select {first}, {zero}, {v} : {vty}"))
            })
            .collect();
        SumPart { from, to, inits }
    }

    /// For chunk `part` (of `len` steps) of einsum `j`'s sum, the next
    /// chunk's rows of the operand indexed by the summed letter and then
    /// the output's last, when it is stored: the `row` elements from the
    /// tile's first output `idx` a step reads, prefetched by a whole tile
    /// (`share` of `shares`; see [`Kc::lines_ahead`]; given the number of
    /// `whole` tiles, narrow ones, rows of one line are shared by a shift
    /// instead, [`Kc::lines_ahead_shifted`]).
    pub(super) fn chunk_ahead(
        &mut self,
        j: usize,
        (idx, part, len): (&[String], &SumPart, i64),
        row: usize,
        (shares, whole): ((&str, &str), Option<&str>),
    ) -> Result<Option<LinesAhead>, LowerError> {
        let Some((spec, inputs)) = self.contraction_spec(j) else { return Ok(None) };
        let reduced = self.reduced(&spec, &inputs);
        let (Some(&z), [(c, _)]) = (spec.output.last(), reduced.as_slice()) else {
            return Ok(None);
        };
        let c = *c;
        let found = spec.inputs.iter().zip(&inputs).find_map(|(subs, &v)| {
            let n = subs.len();
            (n >= 2 && subs[n - 1] == z && subs[n - 2] == c).then_some((subs, self.stored(v)?))
        });
        let Some((subs, buf)) = found else { return Ok(None) };
        let row_bytes = (row * self.program.buffers[buf].dtype.size()) as i64;
        if row_bytes % LINE_BYTES != 0 {
            return Ok(None);
        }
        let mut env: Vec<(char, String)> = spec.output.iter().copied().zip(idx.iter().cloned()).collect();
        let one = self.b.index(1);
        let mut offsets = Vec::with_capacity(2);
        for at in [part.to.clone(), self.b.addi(&part.to, &one)] {
            env.push((c, at));
            let at = self.operand_index(j, subs, &env)?;
            env.pop();
            offsets.push(self.buffer_offset(buf, &at)?.1);
        }
        let stride = self.b.subi(&offsets[1], &offsets[0]);
        let start = offsets.swap_remove(0);
        let next = NextRows { buf, start, stride, row: row as i64, steps: len, origin: Some(&part.from) };
        match whole {
            Some(whole) if row_bytes == LINE_BYTES => self.lines_ahead_shifted(c, next, (shares.0, whole)).map(Some),
            _ => self.lines_ahead(c, next, shares).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::lower::emit::testing::{check_output, context_wv_doc, cpu_step, cpu_step_tiles, point};

    /// The context `w · V` of `h` heads, `[b, h, 1, m] · [h, m, k]` (k =
    /// 64, and 128: two blocks of 64 a row, each its own lines), m
    /// known only at run time: walked in chunks of 1024 rows of V when a
    /// kept axis (the heads) is there to split into parts, each whole
    /// tile's sum prefetching a line of the next chunk a step; with one
    /// head, one pass (no chunks to keep from the parts); bf16 too (in
    /// pairs of V's rows where the CPU prefers its bf16 dot product), the sums f32
    /// (a bf16 output is not chunked: its partial sums would be rounded
    /// between chunks). Against the
    /// interpreter at m on either side of a chunk's end and across
    /// several (the chunks of a head in one part; the sums carried in the
    /// output between them), b whole and short tiles, and m = 0 (no
    /// chunk's sum has a term: zeros stored all the same).
    #[test]
    fn strided_sums_run_in_chunks() {
        // bf16: the interpreter sums the unrounded random values, the
        // step their bf16 roundings (2^-9 relative each, over up to 3000
        // terms of |w·v| < 1: sums up to about 35).
        let f32_tol = (1e-4, 1e-4);
        let cases =
            [(2, 64, "f32", f32_tol), (16, 64, "f32", f32_tol), (1, 64, "f32", f32_tol), (2, 128, "f32", f32_tol)];
        for (h, k, dtype, tol) in cases.into_iter().chain([(2, 64, "bf16", (0.2, 2e-2))]) {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {"h": h, "k": k}},
                "inputs": [
                    {"name": "w", "role": "activation", "shape": ["b", "h", 1, "m"], "dtype": dtype},
                    {"name": "v", "role": "activation", "shape": ["h", "m", "k"], "dtype": dtype}
                ],
                "nodes": [{"id": "o", "op": "einsum", "inputs": ["w", "v"], "attrs": {"spec": "bhxm,hmk->bhxk"}, "dtype": "f32"}],
                "outputs": [{"name": "o", "node": "o"}]
            });
            // The tiles' own chunks (a CPU without the bf16 dot product
            // widens a bf16 V a chunk at a time otherwise: `emit::half_values`).
            let (graph, step, text) = crate::lower::emit::with_half_panels(false, || cpu_step(&doc));
            let tile = format!("-> ({}) {{", ["vector<16xf32>"; 16].join(", "));
            let loops: Vec<&str> =
                text.split(&tile).skip(1).map(|s| s.split("scf.yield").next().unwrap_or("")).collect();
            // bf16 in pairs of rows where this CPU has the bf16 dot
            // product: a loop of pairs, then an odd length's last row;
            // else its rows widened a stretch at a time, the stretch's
            // loop around the steps' (`emit::widened_rows`).
            let pairs = dtype == "bf16" && crate::lower::emit::host_has_bf16_dot();
            let widened = dtype == "bf16" && !pairs;
            let want = 1 + usize::from(pairs) + usize::from(widened);
            assert_eq!(loops.len(), want, "h = {h}, {dtype}: one whole tile:\n{text}");
            let chunked = h > 1;
            let carried = text.lines().any(|l| l.contains("arith.select") && l.ends_with(": vector<16xf32>"));
            assert_eq!(carried, chunked, "h = {h}: the sums carried from chunk to chunk:\n{text}");
            let steps = loops[usize::from(widened)..].first().copied().unwrap_or("");
            let prefetches = steps.matches("\"llvm.intr.prefetch\"").count();
            assert_eq!(prefetches, usize::from(chunked), "h = {h}: a line of the next chunk a step:\n{text}");
            for (b, m) in [(4, 1023), (5, 1025), (32, 2100), (3, 1), (8, 0), (1, 3000)] {
                check_output(&graph, &step, &point(&[("b", b), ("m", m)]), 4, "o", tol);
            }
        }
    }

    /// A projection from f32 panels in wide tiles, `x [b, 1, d] @ W[o,
    /// d]ᵀ` with o = 128 (two panels), sums in chunks of
    /// [`super::PANEL_CHUNK_BYTES`] of a panel's rows (128 steps of 64
    /// outputs) where d is longer than one: d = 320 (two whole chunks and
    /// a short one) and 1024, the sums carried in the output from chunk
    /// to chunk, each whole tile's steps prefetching a line of the next
    /// chunk (the last chunk's: the next panel's first rows). One pass at
    /// d = 128 (one chunk), with narrow tiles (a 16-wide stripe of the
    /// panel a tile, `emit::registers`) and with a bf16 weight (its
    /// output bf16: partial sums would be rounded between chunks).
    /// Against the interpreter at b with whole tiles of 4 rows and short
    /// ones.
    #[test]
    fn panel_projections_run_in_chunks() {
        let proj = |d: i64, dtype: &str| {
            serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": d, "o": 128}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": dtype},
                    {"name": "w", "role": "weight", "shape": ["o", "d"], "dtype": dtype}
                ],
                "nodes": [{"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}}],
                "outputs": [{"name": "y", "node": "y"}]
            })
        };
        let cases =
            [(320, "f32", false), (1024, "f32", false), (128, "f32", false), (320, "f32", true), (320, "bf16", false)];
        for (d, dtype, narrow) in cases {
            let what = format!("d = {d}, {dtype}, narrow tiles {narrow}");
            let chunked = d > 128 && dtype == "f32" && !narrow;
            let (graph, step, text) = cpu_step_tiles(&proj(d, dtype), narrow);
            assert!(step.graph().find("y.panels").is_some(), "{what}: w kept in panels");
            let carried = text.lines().any(|l| l.contains("arith.select") && l.ends_with(": vector<16xf32>"));
            assert_eq!(carried, chunked, "{what}: the sums carried from chunk to chunk:\n{text}");
            if chunked {
                let tile = format!("-> ({}) {{", ["vector<16xf32>"; 16].join(", "));
                let loops: Vec<&str> =
                    text.split(&tile).skip(1).map(|s| s.split("scf.yield").next().unwrap_or("")).collect();
                assert_eq!(loops.len(), 1, "{what}: one loop of whole tiles:\n{text}");
                assert_eq!(loops[0].matches("\"llvm.intr.prefetch\"").count(), 1, "{what}: a line a step:\n{text}");
                let len = format!("arith.constant {} : index", super::PANEL_CHUNK_BYTES / 256);
                assert!(text.contains(&len), "{what}: chunks of 128 steps:\n{text}");
            }
            let tol = if dtype == "f32" { 1e-4 } else { 2e-2 };
            for b in [1, 3, 4, 5, 17, 32] {
                check_output(&graph, &step, &point(&[("b", b)]), 9, "y", (tol, tol));
            }
        }
    }

    /// The context `w · V` with V a context cache stored with spare rows
    /// (its capacity past m, filled with NaN): the chunks and the next
    /// chunk's prefetch step through V's rows by its capacity, and no
    /// chunk reads a spare row. Against the interpreter on the dense V.
    #[test]
    fn chunks_walk_a_cache_with_spare_rows() {
        let doc = context_wv_doc();
        let (graph, step, text) = cpu_step(&doc);
        assert!(text.contains("\"llvm.intr.prefetch\""), "chunked, the next chunk prefetched:\n{text}");
        let capacity = text.split("%c").skip(1).any(|t| t.starts_with(|c: char| c.is_ascii_digit()));
        assert!(capacity, "V pitched (its capacity a parameter):\n{text}");
        for (b, m) in [(8, 1025), (5, 2100)] {
            let at = point(&[("b", b), ("m", m)]);
            let inputs = crate::interp::random_inputs(&graph, &at, 7).unwrap_or_else(|e| panic!("{e}"));
            let want = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let cap = m as usize + 5;
            let mut spare = crate::interp::Tensor::full(vec![2, cap, 64], f32::NAN);
            for (row, data) in inputs["v"].data.chunks(64).enumerate() {
                let (g, r) = (row / m as usize, row % m as usize);
                spare.data[(g * cap + r) * 64..][..64].copy_from_slice(data);
            }
            let mut pitched = inputs.clone();
            pitched.insert("v".into(), spare);
            let caps = point(&[("m", cap as i64)]);
            let got = step.run_with_capacity(&at, &caps, &pitched).unwrap_or_else(|e| panic!("{e}"));
            for (i, (x, y)) in got["o"].data.iter().zip(&want["o"].data).enumerate() {
                assert!((x - y).abs() <= 1e-4 + 1e-4 * y.abs(), "b = {b}, m = {m}: element {i}: {x} vs {y}");
            }
        }
    }

    /// With narrow tiles (`emit::registers`: a 16-wide stripe of V's rows
    /// a tile) the context `w · V`'s chunks are walked outside its blocks
    /// of 16 outputs (the loop right inside the chunks' is the 4 blocks of
    /// a 64-wide head), each chunk [`super::NARROW_SUM_CHUNK_BYTES`] of
    /// whole rows (512 of 64 f32); with the wide tiles (a whole row a
    /// tile) the tiles' loop is right inside. Against the interpreter at
    /// m on either side of a narrow chunk's end and across several, b
    /// with whole tiles of 6 rows, a short one, and none.
    #[test]
    fn narrow_chunks_hold_every_block_of_the_rows() {
        let doc = context_wv_doc();
        // The constant bounding the loop right inside the chunks' (the
        // first hoisted `maxui`: their count), if it is one.
        let inside_chunks = |text: &str| -> Option<i64> {
            let lines: Vec<&str> = text.lines().collect();
            let chunks = lines.iter().find(|l| l.contains("= arith.maxui"))?.trim().split(' ').next()?.to_owned();
            let at = lines.iter().position(|l| l.contains("scf.for") && l.contains(&format!(" to {chunks} step")))?;
            let bound = lines.get(at + 1)?.split(" to ").nth(1)?.split(' ').next()?.to_owned();
            let def = format!("{bound} = arith.constant ");
            let line = lines.iter().find(|l| l.trim().starts_with(&def))?;
            line.trim().strip_prefix(&def)?.split(' ').next()?.parse().ok()
        };
        for narrow in [true, false] {
            let (graph, step, text) = cpu_step_tiles(&doc, narrow);
            let want = if narrow { Some(4) } else { None };
            assert_eq!(inside_chunks(&text), want, "narrow = {narrow}: the loop inside the chunks':\n{text}");
            let len = format!("arith.constant {} : index", super::NARROW_SUM_CHUNK_BYTES / 256);
            assert_eq!(text.contains(&len), narrow, "narrow = {narrow}: chunks of 512 rows:\n{text}");
            for (b, m) in [(6, 511), (7, 513), (32, 2100), (13, 1029), (3, 600), (1, 1500)] {
                check_output(&graph, &step, &point(&[("b", b), ("m", m)]), 4, "o", (1e-4, 1e-4));
            }
        }
    }
}
