//! The vector registers the CPU kernels' register tiles are sized for.
//!
//! The contractions' tiles were sized for AVX-512: 32 registers of 16 f32,
//! one `vector<16xf32>` each. The weight projections in panels and the
//! context `w·V` (`emit::vectors`: 4 rows × 4 vectors of 16 outputs) and
//! the context `q·K` with rows in the lanes (`emit::rows_in_lanes`: 16
//! outputs) each keep 16 such accumulators. A CPU without AVX-512 (AVX2:
//! 16 registers of 8 f32; AMD's Zen 2 and 3, Intel's client cores) holds
//! a `vector<16xf32>` in two, so those 16 accumulators alone need 32, and
//! LLVM spills and reloads them around every FMA: on a 2-core Zen 3 VM,
//! cpu_step's bifurcated f32 step at b = 32 held 137 spills or reloads
//! to 112 FMAs in each projection and 1104 to 304 in each context `q·K`.
//!
//! There the tiles are narrow: the vector tiles take one vector of 16
//! outputs and [`NARROW_VECTOR_ROWS`] rows, the tiles of sums in vectors
//! [`NARROW_SUM_ROWS`] × [`NARROW_SUM_COLS`], and the rows-in-lanes tile
//! sums its 16 outputs in passes of [`NARROW_LANES_OUTPUTS`]: 12 registers
//! of accumulators each, enough to hide the FMAs' latency (4 cycles, 2 a
//! cycle: 8 in flight) with room for the operands. A narrow tile reads a
//! 16-wide stripe of a projection's panel (or of the context V's rows),
//! and its whole tiles prefetch the next stripe (or the next chunk's)
//! with an add and a shift a step (`Kc::lines_ahead_shifted`): the wide
//! tiles' share of the next panel, spread over the sum's steps by a
//! multiply and a division, took more integer work a step beside 12
//! FMAs, and a whole next panel (704 KiB for the MLP's down projection)
//! does not fit beside the current one in Zen 3's 512 KiB of L2. On the
//! Zen 3 VM below (cpu_step, f32, b = 32, m_c = 8192, one thread, the
//! kernels' medians, four runs alternated with the build before): the
//! bifurcated step's 15 projections 26.9-31.7 -> 23.8-25.1 ms in all with
//! the next stripe prefetched (no prefetch before), its kernels 68.0-82.5
//! -> 67.1-69.5 ms; the w·V's shift for its division: no change beyond
//! the noise (17.8-23.7 -> 18.7-20.9 ms for both layers). The chunked
//! w·V walks its chunks outside its 16-wide blocks (`emit::chunks`).
//!
//! Narrow or wide, each output sums the same products: a vector
//! tile's or a lane's in the same order, a sum tile's lane sums added in
//! another tree (16 sums take `Kc::lane_tree_16`'s, 6 the halving tree),
//! so the two may differ in the last bits there (and where LLVM fuses a
//! multiply and an add into an FMA in one and not the other).
//!
//! [`NARROW_TILES_ENV`] overrides the choice (`on`, `off`; `auto` or
//! unset: narrow where the host has no AVX-512F).

use crate::lower::LowerError;

/// The environment variable that overrides the CPU step's tiles
/// ([`CpuStep::compile`](crate::lower::CpuStep::compile)): `on` (narrow
/// tiles, for 16 registers of 256 bits), `off` (the tiles sized for
/// AVX-512's 32 registers of 512 bits), or `auto` (the default: narrow
/// where the CPU has no AVX-512F). Either runs on any x86-64 CPU; only
/// the speed differs.
pub const NARROW_TILES_ENV: &str = "BIFURC_CPU_NARROW_TILES";

/// Rows of a narrow vector tile, one vector of 16 outputs each: 12
/// registers of accumulators, as the rows-in-lanes passes below. The last
/// tile's rows left, if fewer, are a tile of their own, unrolled (b = 32:
/// 5 tiles of 6 and one of 2; one at a time, each row's one vector of
/// accumulators would wait on every FMA). Tried and not kept (stop 39):
/// the rows split evenly over the same number of tiles (b = 32: 5, 5, 6,
/// 5, 5, 6), each tile prefetching: in the projection lab (pairs of 200
/// or 300) the down projection 0.97-1.09 (median of 16 runs 1.03), gate
/// 0.96-1.02 (1.00, 15 runs), o 0.97-0.99 (seven runs): about 0.1 ms of
/// a step of 15 projections; sampled, a row of a tile of 2 cost 4.9% of
/// the down projection's time, of 5 3.3%, of 6 3.0%.
///
/// On a 2-core Zen 3 VM (cpu_step, f32, b = 32, m_c = 8192, two
/// threads): 4 rows × 4 vectors (the wide tile, spilled) 8.8-9.0 ms a
/// layer for the context w·V and 2.9-3.3 for each MLP projection; 4 × 1:
/// 6.3-7.1 and 1.9-2.4; 6 × 1: 4.3-5.8 and 1.3-2.1; 5 × 1 about the same
/// as 6; 2 × 2 and 3 × 2 slower than 4 × 1.
pub(super) const NARROW_VECTOR_ROWS: usize = 6;

/// The narrow tile of sums in vectors (`q·K` where fewer than 16 rows
/// share K: the rows-in-lanes tile takes 16 or more), rows × consecutive
/// outputs: 6 accumulators, 12 registers, the sums then added in a tree
/// (`Kc::lane_tree`); the last tile's rows left a tile of their own, as
/// the vector tiles'. The context q·K at b = 8 on the Zen 3 VM (two
/// threads, one run each): 3.1 ms a layer with the wide 4 × 4, 2.5-2.6
/// with 2 × 4, 2.4 with 2 × 2, 2.6-2.7 with 3 × 2 and 2.0 with 3 × 2 and
/// the rows left unrolled.
pub(super) const NARROW_SUM_ROWS: usize = 3;
pub(super) const NARROW_SUM_COLS: usize = 2;

/// Outputs a pass of the narrow rows-in-lanes tile sums (its 16 rows in
/// the lanes: one `vector<16xf32>` accumulator each, two registers), the
/// last pass what is left (6, 6, 4): 12 registers of accumulators, 2 of
/// the rows, 1 of a broadcast element. Eight accumulators, passes of 4,
/// are too few to hide the FMAs' latency (4 cycles, 2 a cycle) and 16,
/// passes of 8, spill: on a 2-core Zen 3 VM (cpu_step, f32, b = 32, m_c =
/// 8192, two threads, two runs each) the context q·K took 6.2-6.9 ms a
/// layer in passes of 4, 4.1-4.5 in passes of 6, 7.8-8.5 in passes of 8
/// and 8.2 in one pass of 16.
pub(super) const NARROW_LANES_OUTPUTS: usize = 6;

/// Whether this machine's CPU has AVX-512F (32 vector registers of 512
/// bits): the JIT compiles for the host.
pub(crate) fn host_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU kernels' register tiles are narrow: where the host has
/// no AVX-512F, unless [`NARROW_TILES_ENV`] says otherwise (see
/// [`narrow_tiles_choice`], which is this with the setting's error).
pub(crate) fn prefer_narrow_tiles() -> bool {
    narrow_tiles_choice().unwrap_or_else(|_| !host_has_avx512())
}

/// [`prefer_narrow_tiles`]'s answer, or the error naming a value of
/// [`NARROW_TILES_ENV`] it cannot take.
pub(crate) fn narrow_tiles_choice() -> Result<bool, LowerError> {
    #[cfg(test)]
    if let Some(narrow) = FORCED_NARROW.with(std::cell::Cell::get) {
        return Ok(narrow);
    }
    let setting = std::env::var(NARROW_TILES_ENV).ok();
    let on = super::pair_dot::cpu_setting(NARROW_TILES_ENV, setting.as_deref(), || true, "")?;
    Ok(on.unwrap_or_else(|| !host_has_avx512()))
}

#[cfg(test)]
thread_local! {
    /// This thread's override of [`prefer_narrow_tiles`] (see
    /// [`with_narrow_tiles`]).
    static FORCED_NARROW: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`prefer_narrow_tiles`] answering `narrow` on this
/// thread: tests compile both ways on any host.
#[cfg(test)]
pub(crate) fn with_narrow_tiles<R>(narrow: bool, f: impl FnOnce() -> R) -> R {
    super::pair_dot::with_forced(&FORCED_NARROW, narrow, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::emit::pair_dot::cpu_setting;
    use crate::lower::emit::testing;

    #[test]
    fn the_setting_takes_on_off_and_auto_only() {
        let read = |v: Option<&str>| cpu_setting(NARROW_TILES_ENV, v, || true, "");
        assert_eq!(read(None).ok(), Some(None));
        assert_eq!(read(Some("auto")).ok(), Some(None));
        assert_eq!(read(Some("on")).ok(), Some(Some(true)));
        assert_eq!(read(Some(" off ")).ok(), Some(Some(false)));
        let err = read(Some("wide")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(NARROW_TILES_ENV) && err.contains("`on` or `off`"), "{err}");
    }

    #[test]
    fn the_test_override_wins() {
        assert!(with_narrow_tiles(true, prefer_narrow_tiles));
        assert!(!with_narrow_tiles(false, prefer_narrow_tiles));
    }

    /// A loop carrying `n` `vector<16xf32>` accumulators.
    fn accumulator_loops(text: &str, n: usize) -> usize {
        text.matches(&format!("-> ({}) {{", vec!["vector<16xf32>"; n].join(", "))).count()
    }

    /// The context `q·K` with rows in the lanes (multi-head and
    /// grouped-query, q as given and reshaped from its projection), the
    /// context `w·V` in vector tiles, a projection in panels and one too
    /// narrow for them match the interpreter with narrow tiles and with wide
    /// ones, at b below one tile of 16 rows, at one, past it and past two
    /// (every size of the narrow tiles' last tile), and at context lengths
    /// across items and blocks cut short. The
    /// narrow module holds fewer loops of 16 accumulators than the wide
    /// one, and more of 6 (the `q·K`'s passes, the vector tiles' rows, the
    /// sum tiles). With either tiles, equal rows give equal bits at b
    /// below 16.
    #[test]
    fn narrow_and_wide_tiles_match_interpreter() {
        let mha = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 64, "f": 128}},
            "inputs": [
                {"name": "q", "role": "activation", "shape": ["b", "h", "k"], "dtype": "f32"},
                {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["h", "m", "k"], "dtype": "f32"},
                {"name": "vc", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["h", "m", "k"], "dtype": "f32"},
                {"name": "w", "role": "weight", "shape": ["f", "h*k"], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "bhk,hmk->bhm"}},
                {"id": "o", "op": "einsum", "inputs": ["s", "vc"], "attrs": {"spec": "bhm,hmk->bhk"}},
                {"id": "r", "op": "reshape", "inputs": ["o"], "attrs": {"shape": ["b", 1, "h*k"]}},
                {"id": "y", "op": "matmul", "inputs": ["r", "w"], "attrs": {"transpose_b": true}}
            ],
            "outputs": [{"name": "s", "node": "s"}, {"name": "o", "node": "o"}, {"name": "y", "node": "y"}]
        });
        let gqa = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"g": 2, "p": 2, "k": 16}},
            "inputs": [
                {"name": "q", "role": "activation", "shape": ["b", "g", "p", "k"], "dtype": "f32"},
                {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["g", "m", "k"], "dtype": "f32"}
            ],
            "nodes": [{"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "bgpk,gmk->bgpm"}}],
            "outputs": [{"name": "s", "node": "s"}]
        });
        // Grouped-query as the tiny example has it: q a reshape of its
        // projection, a unit axis for the new token.
        let tiny = testing::reshaped_gqa_scores_doc();
        // A projection too narrow for panels (grouped-query's k_proj: 32
        // outputs), summed in vectors along its 64 inputs.
        let proj = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"d": 64, "o": 32}},
            "inputs": [
                {"name": "q", "role": "activation", "shape": ["b", 1, "d"], "dtype": "f32"},
                {"name": "w", "role": "weight", "shape": ["o", "d"], "dtype": "f32"}
            ],
            "nodes": [{"id": "y", "op": "matmul", "inputs": ["q", "w"], "attrs": {"transpose_b": true}}],
            "outputs": [{"name": "y", "node": "y"}]
        });
        // Rows of q that share a row of K (or of the weight), per sample.
        let docs =
            [(&mha, &["s", "o", "y"][..], 1), (&gqa, &["s"][..], 2), (&tiny, &["s"][..], 2), (&proj, &["y"][..], 1)];
        for (doc, outputs, group) in docs {
            let (graph, wide, wide_text) = testing::cpu_step_tiles(doc, false);
            let (_, narrow, narrow_text) = testing::cpu_step_tiles(doc, true);
            let (w16, n16) = (accumulator_loops(&wide_text, 16), accumulator_loops(&narrow_text, 16));
            assert!(n16 < w16, "16 accumulators: {n16} loops narrow, {w16} wide:\n{narrow_text}");
            let (w6, n6) = (accumulator_loops(&wide_text, 6), accumulator_loops(&narrow_text, 6));
            assert!(n6 > w6, "6 accumulators: {n6} loops narrow, {w6} wide:\n{narrow_text}");
            // Equal rows (greedy samples: the same q) get equal bits from
            // either tiles wherever they fall: whole tiles, rows left of 1
            // or 2 (narrow: b = 4, 5 with sum tiles of 3; grouped-query's
            // 8, 10 rows at b = 4, 5; b = 7, 8 with vector tiles of 6) or
            // of 1 and 3 (wide: b = 5, 7 with sum tiles of 4), blocks cut
            // short (m = 5, 20, 37, 100: one output at a time). (Not across
            // 16 rows in the lanes and the rows past them, either way: a
            // lane sums its head in order, a row alone in vectors and a
            // tree of lanes.)
            for (b, m) in [(4, 5), (4, 37), (5, 100), (7, 20), (8, 64)].into_iter().filter(|(b, _)| b * group < 16) {
                let at = testing::point(&[("b", b), ("m", m)]);
                let mut inputs = crate::interp::random_inputs(&graph, &at, 5).unwrap_or_else(|e| panic!("{e}"));
                if let Some(q) = inputs.get_mut("q") {
                    let row = q.data.len() / b as usize;
                    let first = q.data[..row].to_vec();
                    for r in q.data.chunks_mut(row) {
                        r.copy_from_slice(&first);
                    }
                }
                for (tiles, step) in [("narrow", &narrow), ("wide", &wide)] {
                    let got = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    for &name in outputs {
                        let t = &got[name];
                        let row = t.data.len() / b as usize;
                        let bits = |r: &[f32]| r.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        for (i, r) in t.data.chunks(row).enumerate() {
                            let same = bits(r) == bits(&t.data[..row]);
                            assert!(same, "{tiles}: {name} at b = {b}, m = {m}: row {i} != row 0");
                        }
                    }
                }
            }
            // b = 3, 16, 17, 32, 33: the narrow vector tiles' last tile of
            // 3, 4, 5, 2, 3 rows; 7: of one; b = 5, 8: the sum tiles' (a
            // q·K of fewer than 16 rows a head) of 2.
            for (b, m) in [(3, 37), (5, 37), (7, 20), (8, 100), (16, 16), (17, 1029), (32, 40), (33, 40)] {
                let at = testing::point(&[("b", b), ("m", m)]);
                // `o` sums up to 1029 unnormalized scores × V: terms in the
                // tens, sums of a few units.
                for &name in outputs {
                    testing::check_output(&graph, &wide, &at, 3, name, (1e-3, 1e-5));
                    testing::check_output(&graph, &narrow, &at, 3, name, (1e-3, 1e-5));
                }
            }
        }
    }
}
