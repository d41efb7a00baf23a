//! The fused context attention's kernel (see `lower::fused_attention`):
//! q, K and V read, the partials written, no score stored.
//!
//! An item is a KV head `g` (with one KV head summed away, multi-query
//! attention, every row's), a stretch `i` of the context (one of
//! the plan's items a head, a multiple of [`BLOCK`] positions) and up to [`UNIT_TILES`]
//! tiles of 16 query rows (the rows that share the head's K and V, one
//! a vector lane); the call's part takes a range of items. Per item:
//! - its rows of q packed `[tile][head][16]` on the stack (rows past the
//!   last are zeros, their partials not stored); in wide tiles with heads
//!   of whole vectors each row read as vectors and each 16 × 16 square
//!   transposed in registers, 64 shuffles (`Kc::fused_q_transposed`),
//!   where a lane at a time LLVM scattered each row's elements (4
//!   `vscatterdps` a row of 64), whose stores the scores' first vector
//!   loads of the slot then waited on: the same bits, in the fused lab
//!   below (60 pairs, against that) 1.013x on two threads and 1.014x on
//!   one at m_c = 8192, 1.070x at 2048 (an item a quarter as long);
//! - per block of positions, each tile in turn (the block's K and V rows
//!   read from memory by the first, from L1 by the next): the scores,
//!   each a vector of 16 rows, summed along the head in passes of a few
//!   positions (a broadcast element of K for an FMA per row vector, as
//!   the rows-in-lanes tile of `emit::rows_in_lanes`), scaled,
//!   and `-inf` past the stretch's end (a K row past the context is read
//!   at the last one instead), kept in a slot, and their max in a tree
//!   of `vmaxps` as each pass ends (`Kc::max_tree`; against a loop over
//!   the slot after the passes, 1.023-1.024x in the fused lab below on
//!   two threads and one, narrow tiles 1.019x, the same bits); the online
//!   softmax a lane a row: `alpha = exp(m_old - m_new)`, the block's
//!   `exp`s over the scores and their sum; the tile's outputs `[head][16]`
//!   (a slot) times `alpha` plus the `exp`s times V, in passes of a few
//!   head elements (a broadcast element of V for an FMA per row vector);
//!   the next block's K and V lines prefetched over the tile's steps
//!   (below);
//! - per row its outputs, its max and its sum into the partials, whose
//!   lines each tile prefetches for writing as the item starts
//!   (`Kc::fused_partials_ahead`): a step's partials are out of the
//!   caches by the next, and written at the item's end their lines' reads
//!   held it up (an item's end without its stores at all: 1.19x at m_c =
//!   1024 in the fused lab below). The same bits; against the kernel
//!   before, 40 pairs on two threads: 1.095-1.106x at m_c = 1024, 1.071x
//!   at 2048, 1.008-1.011x at 8192 (one thread 1.012x); fetched after the
//!   item's first block instead, no different.
//!
//! Items a head ([`Kc::fused_items`]): one every
//! `lower::fused_attention::ITEM_POSITIONS` (2048) positions of the run's
//! context, at least one, at most the plan's 8 (`ITEMS`, the partials'
//! first axis); the merge reads as many. With 8 at every length, each
//! item's costs above, paid at each step, weighed on short contexts:
//! before the transposes and these prefetches, 4, 2 and 1 items a head
//! ran 1.18x, 1.27x and 1.37x as fast as 8 at m_c = 1024 and 1.04-1.06x
//! at 8192 on two threads. With them, the count by m_c against 8 (fused
//! lab below, 40 pairs): 1.080x at m_c = 1024 (one thread 1.106x), 1.060x
//! at 2048, 0.999x at 8192 (four items). Not fewer at 8192: 64 items at
//! b = 32 and 16 heads leave parts to many cores.
//!
//! The next block's lines ([`Kc::fused_ahead`]): K's by the unit's first
//! tile, V's by its last (both by a unit of one tile), each spread over
//! the tile's steps (every step of its scores' and w·V's loops; a
//! line every `2^s` steps, `s` the most that still covers the block: in
//! wide tiles with heads of 64 a line every 2 steps, in narrow ones every
//! 4). Until then both tiles fetched a line of K and one of V a step of
//! their first two scores' passes: 8 steps of 16 FMAs a line of each,
//! faster than the line fill buffers drain, so those passes waited on
//! memory. On the 2-core Emerald Rapids VM below (`scripts/fused-lab.sh
//! --base REV 8192 40 THREADS`, against that): 1.17-1.19x on two threads
//! (two runs, quartiles 1.16-1.21), 1.19x on one (1.19-1.21); with K and
//! V in L2 (m_c = 1024) 1.02x; narrow tiles there
//! (`BIFURC_CPU_NARROW_TILES=on`) 1.16x, where a line's index by a
//! division a step (`s · lines / steps`, 23 steps for 4 lines) took 0.97x.
//! Tried on the way: the second tile's duplicates of the first's dropped
//! (the same burst), 1.00x; K's lines over the first tile's scores and
//! V's over the second's (a line a step), 1.04-1.05x.
//!
//! Wide tiles of 16 rows (AVX-512) keep the outputs `[row][head]`
//! instead ([`Kc::fused_wv_rows`]): the w·V in tiles of 4 rows × 4
//! vectors of 16 outputs, each position's V row read as 4 vectors and
//! each row's probability broadcast from the block's slot, the outputs
//! rescaled by their row's `alpha` broadcast: 8 loads for 16 FMAs where
//! the rows-in-lanes w·V takes 17. The same products in the same order:
//! the same bits. On the Emerald Rapids VM below (fused lab, 60 pairs,
//! against the kernel before): 1.045-1.048x on two threads, 1.037x on
//! one. Each row's partial outputs are then copied out 16 at a time
//! (where `[head][16]` outputs go a lane at a time): 1.010-1.023x.
//!
//! bf16 K and V (`lower::fused_attention`: where the CPU step widens
//! bf16, narrow tiles or no bf16 instruction) are widened a block at a time into f32 slots (`[32][head]`, 8 KiB
//! each for heads of 64) before the tiles' passes, which then broadcast
//! their elements from the slots as from f32 K and V (an element widened
//! alone took a scalar load, a shift, a move to a vector register and a
//! broadcast: see `emit::widened_rows`); the next block's bf16 lines (half
//! f32's) are prefetched over the tile's steps as f32's are.
//!
//! A block inside its stretch (all but the stretch's last) runs its own
//! copy of the scores' passes: no position clamped, no score masked, and
//! a stored f32 K's rows of a pass read at constant offsets from the
//! first row's address (each row's address computed from its clamped
//! position before). On a 2-core Emerald Rapids VM (`scripts/fused-lab.sh
//! --base REV 8192 60 THREADS`, against the kernel before, the same
//! bits): 1.018-1.030x on two threads (three runs), 1.030x on one; the
//! copy without the one address alone, 0.97x of it (no gain); narrow
//! tiles (`BIFURC_CPU_NARROW_TILES=on` there) 1.003x. Where its time
//! goes there (the kernel emitted without a part, in that lab): without
//! its w·V it took two thirds of the time (the w·V about 2 ms a layer on
//! two threads, its FMAs alone 1.45 at the peak), without the scores'
//! FMAs three quarters, without its `exp`s 0.93-0.95, without all three
//! a third (the max, the scores' stores, the prefetches and the merge,
//! K and V streamed in). With K and V in L2 (m_c = 512-1024) it runs at
//! 56% of the FMA peak, and unflushed at m_c = 8192 as fast as flushed:
//! its compute bounds it, more than memory, we read then; but its
//! prefetches came in bursts, which waited on the line fill buffers
//! whether the lines came from memory or L3 (spread, above: 1.19x).
//! Tried there and not kept (in bursts):
//! the next blocks prefetched 2, 4 or 8 ahead, or into L2 (`prefetcht1`)
//! 4 or 8 ahead, 0.99-1.01x; K's lines alone 0.88x, V's alone 0.92x, none
//! 0.81x.
//!
//! 9 to 15 rows a KV head take one tile of 16 lanes (the lanes past the
//! last row zeros: one FMA a step, where two tiles of 8 took two; the
//! cpu_step's attention at 10 to 15 rows 1.5-1.65x as fast, narrow
//! tiles at 12 rows 1.35x); fewer take tiles of 8 lanes (5 to 8 rows)
//! or of 4, all of an item's rows in the item (5 to 7 rows took two
//! tiles of 4 until then: 1.5x). A plan run only from 9 rows a KV head
//! (`FusedPlan::min_rows`: the step's choice by the rows) has the tiles
//! of 16 alone, one run only up to 8 (`FusedPlan::max_rows`) those of 8
//! alone; run at every point (`on`), the kernel branches at run time to
//! all three (its JIT 0.84-0.87 s against 0.30-0.36, the tiny
//! example's).
//! The passes take 12 registers of accumulators with narrow tiles
//! (`emit::registers`; a pass of 6 or 5 positions or head elements of 16
//! rows, 11 or 10 of 8 or 4), 16 vectors otherwise.
//!
//! On the 2-core Zen 3 VM (AVX2), layer 0's context attention of the
//! cpu_step bench (b = 32, m_c = 8192, 16 heads of 64), its kernels linked
//! into a C driver, K and V flushed from the caches before each run,
//! alternated: the fused kernel and its merge 9.2-10.2 ms (best of 8) on
//! two threads against 11.1-13.5 for the q·K, the softmax and the w·V, on
//! one 17.4-18.6 against 20.4-21.3. In the step itself no faster (medians
//! of 6 alternated profiles, both layers on two threads: 23.7 against 23.9
//! ms). Tried and not kept: blocks of 16 and of 64 positions (64: no
//! better than 32), one tile an item (its second tile read K and V from
//! L3: 18.4-19.1 ms on one thread), the block's `exp`s four positions a
//! step (no difference), a row alone where fewer than 16 (b = 4 and 8
//! twice the three kernels' time), the next block two blocks ahead.

use crate::ir::{DType, Op, Value};
use crate::lower::fused_attention::{ITEM_POSITIONS, WIDE_TILE_ROWS};
use crate::lower::LowerError;

use super::bodies::Out;
use super::builder::Val;
use super::panel_ahead::{LinesAhead, LINE_BYTES};
use super::registers::NARROW_LANES_OUTPUTS;
use super::{Kc, Partition};

/// Rows of a whole tile, one a lane.
const ROWS: usize = 16;
/// Tiles of rows an item takes at most (walked in turn over each block).
const UNIT_TILES: usize = 2;
/// Positions of a block.
const BLOCK: i64 = 32;
/// Rows and vectors of 16 outputs of the `[row][e]` w·V's register tile
/// (`Kc::fused_wv_rows`): 16 accumulators.
const OUT_ROWS: usize = 4;
const OUT_VECTORS: usize = 4;

/// What [`Kc::fused_wv_rows`] reads and writes of a tile: the block's
/// probabilities slot, the outputs slot and where the tile's start, the
/// rows' `alpha` (a vector of 16), the block's first position, V's slot
/// where widened, the prefetches.
struct RowsOut<'a> {
    es: &'a str,
    os: &'a str,
    o_base: &'a str,
    alpha: &'a str,
    p0: &'a str,
    v_slot: Option<&'a str>,
    /// The tile's prefetches of the next block, and the step the w·V's
    /// first loop starts at (`Kc::fused_prefetch`).
    ahead: (&'a [LinesAhead], i64),
}

/// One item of a fused context attention, as [`Kc::fused_tiles`] walks
/// it: the `q·K` node and the `w·V` node; the letters `g, z, y` of K and
/// `g, z, e` of V; q (value, letters); K and V (values, letters); the
/// rows' letters, the axis of `g` among them (none: one KV head), the other rows' sizes and
/// their product; the heads of K and V; the item's KV head and stretch
/// index; the stretch (first position, end, the context's last
/// position); the scale; where the partials go.
struct Item<'o> {
    j: usize,
    wv: usize,
    letters: [char; 6],
    q: (Value, Vec<char>),
    kv: [(Value, Vec<char>); 2],
    rows: (Vec<char>, Option<usize>, Vec<String>, String),
    heads: (i64, i64),
    unit: (String, String),
    stretch: (String, String, String),
    scale: f32,
    out: &'o Out<'o>,
}

impl Kc<'_> {
    /// The body of a fused context attention whose `q·K` is node `j`,
    /// writing its partials (`out`). Returns the item count.
    pub(super) fn fused_attention_body(&mut self, out: &Out, j: usize) -> Result<String, LowerError> {
        let graph = self.graph;
        let fused = (self.program.fused_of(out.kernel))
            .ok_or_else(|| self.unsupported(j, "a fused context attention without its plan"))?;
        let wv = match graph.find(&fused.values) {
            Some(Value::Node(w)) => w,
            _ => return Err(self.unsupported(j, "a fused context attention without its w·V")),
        };
        let (Op::Einsum(spec), [q, k]) = (&graph.nodes[j].op, graph.nodes[j].inputs.as_slice()) else {
            return Err(self.unsupported(j, "a fused q·K that is not an einsum of two"));
        };
        let (Op::Einsum(spec2), [_, v]) = (&graph.nodes[wv].op, graph.nodes[wv].inputs.as_slice()) else {
            return Err(self.unsupported(wv, "a fused w·V that is not an einsum of two"));
        };
        let (spec, spec2, q, k, v) = (spec.clone(), spec2.clone(), *q, *k, *v);
        let bad = |kc: &Self| kc.unsupported(j, "a fused context attention of another form");
        let (&[g, z, y], &[g2, z2, e]) = (spec.inputs[1].as_slice(), spec2.inputs[1].as_slice()) else {
            return Err(bad(self));
        };
        let rank = spec.output.len().saturating_sub(1);
        let rows: Vec<char> = spec.output[..rank].to_vec();
        // K's head among the rows, or none: one head for every row
        // (multi-query attention, `lower::fused_attention`).
        let g_axis = rows.iter().position(|&c| c == g);
        let known = |kc: &Self, p: &crate::ir::Poly| {
            kc.graph.dims.normalize(p).ok().and_then(|p| p.as_constant()).ok_or_else(|| bad(kc))
        };
        let head = known(self, &graph.shape_of(k)[2])?;
        let e_len = known(self, &graph.nodes[wv].shape[rank])?;
        let row_sizes = self.sizes(&graph.nodes[j].shape[..rank])?;
        let m_c = self.sizes(&graph.shape_of(k)[1..2])?.remove(0);
        let others: Vec<usize> = (0..rank).filter(|&a| Some(a) != g_axis).collect();
        let other_sizes: Vec<String> = others.iter().map(|&a| row_sizes[a].clone()).collect();
        let mut r_len = self.b.index(1);
        for s in &other_sizes {
            r_len = self.b.hoist(&format!("arith.muli {r_len}, {s} : index"));
        }
        let tiles = self.ceil_div(&r_len, ROWS as i64);
        let items = self.fused_items(&m_c, fused.items);
        let per_item = self.ceil_div_by(&m_c, &items);
        let per_item = self.ceil_div(&per_item, BLOCK);
        let block = self.b.index(BLOCK);
        let per_item = self.b.hoist(&format!("arith.muli {per_item}, {block} : index"));
        let one = self.b.index(1);
        let last_z = self.b.hoist(&format!("arith.subi {m_c}, {one} : index"));

        // The items of this call's part: fewer rows than a whole tile make
        // one item a head and stretch.
        let unit_tiles = self.ceil_div(&tiles, UNIT_TILES as i64);
        let kv_heads = match g_axis {
            Some(a) => row_sizes[a].clone(),
            None => self.b.index(1),
        };
        let units = [kv_heads, items.clone(), unit_tiles];
        let (flat, regions) = self.open_part_loop(&units);
        self.partition = Partition::Done;
        let unit = self.b.delinearize(&flat, &units);
        let (gi, item) = (unit[0].clone(), unit[1].clone());
        let z0 = self.b.muli(&item, &per_item);
        let z1 = self.b.addi(&z0, &per_item);
        let z1 = self.b.op(&format!("arith.minui {z1}, {m_c} : index"));
        let at = Item {
            j,
            wv,
            letters: [g, z, y, g2, z2, e],
            q: (q, spec.inputs[0].clone()),
            kv: [(k, spec.inputs[1].clone()), (v, spec2.inputs[1].clone())],
            rows: (rows, g_axis, other_sizes, r_len.clone()),
            heads: (head, e_len),
            unit: (gi, item),
            stretch: (z0, z1, last_z),
            scale: fused.scale as f32,
            out,
        };
        // Tiles of 16 rows where there are more than 8 (the last one's
        // rows past the last are zeros: one FMA a step for up to 16 rows,
        // where two tiles of 8 lanes took two); else one tile of 8 or of 4
        // lanes (b = 1 to 8 of a multi-head model: 16 lanes would compute
        // rows of nothing, for as many FMAs), in the one item.
        let per_unit = self.b.index(UNIT_TILES as i64);
        let first_tile = self.b.muli(&unit[2], &per_unit);
        let left = self.b.subi(&tiles, &first_tile);
        let unit_tiles = self.b.op(&format!("arith.minui {left}, {per_unit} : index"));
        let narrow_only = fused.max_rows.is_some_and(|most| most < WIDE_TILE_ROWS);
        let c0 = self.b.index(0);
        if fused.min_rows >= WIDE_TILE_ROWS {
            // Run from 9 rows a KV head only (the step's choice): no
            // narrower tiles to branch to.
            self.fused_tiles(&at, ROWS, (&first_tile, &unit_tiles))?;
        } else if narrow_only {
            // Run up to 8 rows only (the step's choice): tiles of 8 lanes
            // alone, as many FMAs as tiles of 4 for 2 to 4 rows (cpu_step
            // at b = 2 to 4, both layers' attention, two threads, two
            // rounds: 5.11-5.97 ms against 5.25-6.60), one tile width to
            // JIT-compile.
            let eights = self.ceil_div(&r_len, ROWS as i64 / 2);
            self.fused_tiles(&at, ROWS / 2, (&c0, &eights))?;
        } else {
            let (c4, c8) = (self.b.index(ROWS as i64 / 4), self.b.index(ROWS as i64 / 2));
            let whole = self.b.op(&format!("arith.cmpi ugt, {r_len}, {c8} : index"));
            self.b.open_guard(&whole);
            self.fused_tiles(&at, ROWS, (&first_tile, &unit_tiles))?;
            self.b.else_guard();
            let half = self.b.op(&format!("arith.cmpi ugt, {r_len}, {c4} : index"));
            self.b.open_guard(&half);
            let eights = self.ceil_div(&r_len, ROWS as i64 / 2);
            self.fused_tiles(&at, ROWS / 2, (&c0, &eights))?;
            self.b.else_guard();
            let count = self.ceil_div(&r_len, ROWS as i64 / 4);
            self.fused_tiles(&at, ROWS / 4, (&c0, &count))?;
            self.b.close();
            self.b.close();
        }
        for _ in 0..regions {
            self.b.close();
        }
        Ok(flat)
    }

    /// The items a KV head at a run with `m_c` context positions (hoisted):
    /// one an [`ITEM_POSITIONS`] positions, at least one, at most `most`
    /// (the plan's, the partials' first axis). The kernel and the
    /// softmax's merge both take it: the items past it are neither
    /// written nor read. A function of the context's length alone, so the
    /// results do not depend on the threads.
    pub(super) fn fused_items(&mut self, m_c: &str, most: i64) -> String {
        let (per, one, most) = (self.b.index(ITEM_POSITIONS), self.b.index(1), self.b.index(most));
        let n = self.b.hoist(&format!("arith.divui {m_c}, {per} : index"));
        let n = self.b.hoist(&format!("arith.maxui {n}, {one} : index"));
        self.b.hoist(&format!("arith.minui {n}, {most} : index"))
    }

    /// Item `it` of a fused context attention in tiles of `n` rows, one
    /// a lane: `count` tiles from tile `first` (see the module docs).
    fn fused_tiles(&mut self, it: &Item, n: usize, (first_tile, unit_tiles): (&str, &str)) -> Result<(), LowerError> {
        let (j, wv) = (it.j, it.wv);
        let [g, z, y, g2, z2, e] = it.letters;
        let (q, k, v) = (it.q.0, it.kv[0].0, it.kv[1].0);
        let r_len = &it.rows.3;
        let (head, e_len) = it.heads;
        let gi = &it.unit.0;
        let (z1, last_z) = (&it.stretch.1, &it.stretch.2);
        let out = it.out;
        let vty = format!("vector<{n}xf32>");
        let lanes = Some(n);
        let (one, block) = (self.b.index(1), self.b.index(BLOCK));
        let (c_n, c_head, c_e) = (self.b.index(n as i64), self.b.index(head), self.b.index(e_len));
        let zero = self.b.f32(0.0);
        let zeros = self.b.splat_f32(0.0, lanes);
        let ninfs = self.b.splat_f32(f32::NEG_INFINITY, lanes);
        let scale = self.b.splat_f32(it.scale, lanes);
        // Where tile `t`'s rows start; its q, outputs, maxes and sums in
        // the slots.
        let (q_size, o_size) = (self.b.index(head * n as i64), self.b.index(e_len * n as i64));
        let bases = |kc: &mut Self, t: &str| {
            let row = kc.b.addi(first_tile, t);
            let row = kc.b.muli(&row, &c_n);
            [row, kc.b.muli(t, &q_size), kc.b.muli(t, &o_size), kc.b.muli(t, &c_n)]
        };

        // The unit's rows of q, `[tile][head][16]`; the state.
        let tiles_most = UNIT_TILES * n;
        let qs = self.b.stack_f32(&format!("fused_q{n}"), head as usize * tiles_most, None);
        let os = self.b.stack_f32(&format!("fused_o{n}"), e_len as usize * tiles_most, None);
        let es = self.b.stack_f32(&format!("fused_e{n}"), BLOCK as usize * n, None);
        let ms = self.b.stack_f32(&format!("fused_m{n}"), tiles_most, None);
        let ls = self.b.stack_f32(&format!("fused_l{n}"), tiles_most, None);
        let t = self.b.open_loop(unit_tiles);
        let [first_row, q_base, o_base, m_base] = bases(self, &t);
        if !self.narrow && n == ROWS && head % ROWS as i64 == 0 && it.q.1.last() == Some(&y) && self.vector_readable(q)
        {
            self.fused_q_transposed(it, &qs, (&first_row, &q_base))?;
        } else {
            let l = self.b.open_loop(&c_n);
            let r = self.b.addi(&first_row, &l);
            let (valid, rc) = self.clamped_row(it, &r);
            let mut env = self.row_env(it, &rc);
            let d = self.b.open_loop(&c_head);
            env.push((y, d.clone()));
            let at = self.operand_index(j, &it.q.1, &env)?;
            let x = self.loadf(q, &at)?;
            let x = self.b.op(&format!("arith.select {valid}, {x}, {zero} : f32"));
            let off = self.b.muli(&d, &c_n);
            let off = self.b.addi(&off, &l);
            let off = self.b.addi(&off, &q_base);
            self.b.store(&qs, &off, DType::F32, Val::f32(x));
            self.b.close();
            self.b.close();
        }
        self.fused_partials_ahead(it, n, &first_row);
        let c0 = self.b.index(0);
        self.b.store_vector(&ms, &m_base, &ninfs, n, DType::F32);
        self.b.store_vector(&ls, &m_base, &zeros, n, DType::F32);
        let ei = self.b.open_loop(&c_e);
        let off = self.b.muli(&ei, &c_n);
        let off = self.b.addi(&off, &o_base);
        self.b.store_vector(&os, &off, &zeros, n, DType::F32);
        self.b.close();
        self.b.close();

        // The stretch's blocks.
        let p0 = self.b.open_loop_from(&it.stretch.0, z1, &block);
        // 12 registers of accumulators with narrow tiles (a vector of 16
        // rows is two there), 16 vectors otherwise.
        let pass_len = match (self.narrow, n) {
            (true, ROWS) => NARROW_LANES_OUTPUTS,
            (true, _) => 2 * NARROW_LANES_OUTPUTS,
            (false, _) => ROWS,
        };
        // Wide tiles of 16 rows keep their outputs `[row][e]` for the w·V
        // (`Kc::fused_wv_rows`), where V's rows read as vectors.
        let rows_out = !self.narrow && n == ROWS && e_len % 16 == 0 && self.vector_readable(v);
        // Where the next block's K and V rows start (each stored, the
        // head its innermost axis, the positions the next one out: the
        // block's rows one run of memory), and its elements.
        let next = self.b.addi(&p0, &block);
        let mut starts = Vec::with_capacity(2);
        for (operand, node, subs, (gl, zl, hl), len) in
            [(k, j, &it.kv[0].1, (g, z, y), head), (v, wv, &it.kv[1].1, (g2, z2, e), e_len)]
        {
            let start = match (self.stored(operand), subs.as_slice()) {
                (Some(b), [.., zs, hs]) if (*zs, *hs) == (zl, hl) => {
                    let env = [(gl, gi.to_owned()), (zl, next.clone()), (hl, c0.clone())];
                    let at = self.operand_index(node, subs, &env)?;
                    let (_, start) = self.buffer_offset(b, &at)?;
                    Some((b, start, BLOCK * len))
                }
                _ => None,
            };
            starts.push(start);
        }
        // bf16 K and V: the block's rows widened into f32 slots first, 16
        // a vector, which every tile's passes then broadcast from (see
        // `emit::widened_rows`: an element widened alone took a scalar
        // load, a shift, a move to a vector register and a broadcast).
        let mut slots = [None, None];
        for (slot, (operand, node, subs, (gl, zl, hl), len, name)) in slots
            .iter_mut()
            .zip([(k, j, &it.kv[0].1, (g, z, y), head, "fused_k"), (v, wv, &it.kv[1].1, (g2, z2, e), e_len, "fused_v")])
        {
            if self.graph.dtype_of(operand) != DType::F32 {
                let to = self.b.stack_f32(name, BLOCK as usize * len as usize, None);
                self.widen_kv_block((operand, node, subs), (gl, zl, hl), (gi, &p0, last_z), len, &to)?;
                *slot = Some(to);
            }
        }
        let [k_slot, v_slot] = slots;
        // Each tile in turn over the block (its K and V rows in L1 for
        // the next).
        let t = self.b.open_loop(unit_tiles);
        let [_, q_base, o_base, m_base] = bases(self, &t);
        // The next block's lines, spread evenly over the tile's steps
        // (each step of its passes' loops): K's by the unit's first tile,
        // V's by its last (both by a unit of one tile).
        let score_passes = passes(BLOCK as usize, pass_len);
        let wv_passes = match rows_out {
            true => (ROWS / OUT_ROWS) * passes(e_len as usize / 16, OUT_VECTORS).len(),
            false => passes(e_len as usize, pass_len).len(),
        };
        let wv_step0 = score_passes.len() as i64 * head;
        let steps = wv_step0 + wv_passes as i64 * BLOCK;
        let ahead = self.fused_ahead(&starts, (&t, unit_tiles), steps)?;
        // The scores' passes twice: for a block inside the stretch (no
        // position clamped or masked; a stored f32 K's rows of a pass
        // read at constant offsets from the first's address), and for
        // the stretch's last block (each position clamped to the
        // context's last, `-inf` past the stretch). See the module doc.
        // Each yields the block's max, from the scores in registers.
        let block_end = self.b.addi(&p0, &block);
        let inside = self.b.op(&format!("arith.cmpi ule, {block_end}, {z1} : index"));
        let block_max = self.b.open_if_typed(&inside, &vty);
        for clamped in [false, true] {
            let mut most: Option<String> = None;
            for (pass, &(first, count)) in score_passes.iter().enumerate() {
                // The positions, a K row past the context read at its last.
                let mut zs = Vec::with_capacity(count);
                for c in first..first + count {
                    let off = self.b.index(c as i64);
                    let at = self.b.addi(&p0, &off);
                    let zc =
                        if clamped { self.b.op(&format!("arith.minui {at}, {last_z} : index")) } else { at.clone() };
                    zs.push((at, zc));
                }
                let (sums, d, accs) = self.b.open_for_typed(&c_head, &one, &vec![zeros.clone(); count], &vty);
                let off = self.b.muli(&d, &c_n);
                let q_at = self.b.addi(&off, &q_base);
                let qv = self.b.load_vector(&qs, &q_at, n, DType::F32);
                self.fused_prefetch(&ahead, pass as i64 * head, &d);
                let mut nexts = Vec::with_capacity(count);
                // Inside the stretch, a stored f32 K's rows of the pass
                // from one address, the first's, at constant offsets
                // (`head` elements apart: K's rows are its positions).
                let first_row = match (&k_slot, clamped, self.stored(k), zs.first()) {
                    (None, false, Some(_), Some((_, z0))) => {
                        let env = [(g, gi.to_owned()), (z, z0.clone()), (y, d.clone())];
                        let at = self.operand_index(j, &it.kv[0].1, &env)?;
                        let (ptr, off) = self.pair_address(k, &at)?;
                        Some(self.b.element_ptr(&ptr, &off, "f32"))
                    }
                    _ => None,
                };
                for (c, ((_, zc), acc)) in (first..).zip(zs.iter().zip(&accs)) {
                    let x = match (&k_slot, &first_row) {
                        (Some(slot), _) => {
                            let row = self.b.index((c as i64) * head);
                            let at = self.b.addi(&row, &d);
                            self.b.load(slot, &at, DType::F32).ssa
                        }
                        (None, Some(p)) => {
                            let at = self.b.index(((c - first) as i64) * head);
                            self.b.load(p, &at, DType::F32).ssa
                        }
                        (None, None) => {
                            let env = [(g, gi.to_owned()), (z, zc.clone()), (y, d.clone())];
                            let at = self.operand_index(j, &it.kv[0].1, &env)?;
                            self.loadf(k, &at)?
                        }
                    };
                    nexts.push(self.b.lanes_fma(&qv, &x, acc, &vty));
                }
                self.b.close_for_typed(&nexts, &vty);
                // Rounded as the q·K's dtype holds them (the three kernels
                // store them so), scaled, `-inf` past the stretch, kept in the
                // block's slot; their max.
                let mut scores = Vec::with_capacity(count);
                for (c, ((at, _), sum)) in (first..).zip(zs.iter().zip(&sums)) {
                    let sum = match self.graph.nodes[j].dtype {
                        DType::BF16 => self.b.rounded_to_bf16(sum, lanes),
                        _ => sum.clone(),
                    };
                    let s = self.b.op(&format!("arith.mulf {sum}, {scale} : {vty}"));
                    let s = if clamped {
                        let inside = self.b.ult(at, z1);
                        self.b.op(&format!("arith.select {inside}, {s}, {ninfs} : {vty}"))
                    } else {
                        s
                    };
                    let off = self.b.index((c * n) as i64);
                    self.b.store_vector(&es, &off, &s, n, DType::F32);
                    scores.push(s);
                }
                if let Some(m) = most.take() {
                    scores.push(m);
                }
                most = Some(self.max_tree(scores, n));
            }
            let most = most.unwrap_or_else(|| ninfs.clone());
            if clamped {
                self.b.close_if_typed(&most, &vty);
            } else {
                self.b.else_branch_typed(&most, &vty);
            }
        }
        // The online softmax, a row a lane: the block's max (with the
        // rows' so far), then its `exp`s over its scores in the slot, and
        // their sum.
        let m_old = self.b.load_vector(&ms, &m_base, n, DType::F32);
        let m_new = self.max_tree(vec![block_max, m_old.clone()], n);
        let shift = self.b.op(&format!("arith.subf {m_old}, {m_new} : {vty}"));
        let alpha = self.b.exp_nonpositive_lanes(&shift, lanes);
        let (sum, c, acc) = self.b.open_for_typed(&block, &one, std::slice::from_ref(&zeros), &vty);
        let off = self.b.muli(&c, &c_n);
        let s = self.b.load_vector(&es, &off, n, DType::F32);
        let x = self.b.op(&format!("arith.subf {s}, {m_new} : {vty}"));
        let p = self.b.exp_nonpositive_lanes(&x, lanes);
        self.b.store_vector(&es, &off, &p, n, DType::F32);
        let next = self.b.op(&format!("arith.addf {}, {p} : {vty}", acc[0]));
        self.b.close_for_typed(&[next], &vty);
        let sum = sum[0].clone();
        let l_old = self.b.load_vector(&ls, &m_base, n, DType::F32);
        let l_new = self.b.op(&format!("arith.mulf {l_old}, {alpha} : {vty}"));
        let l_new = self.b.op(&format!("arith.addf {l_new}, {sum} : {vty}"));
        self.b.store_vector(&ls, &m_base, &l_new, n, DType::F32);
        self.b.store_vector(&ms, &m_base, &m_new, n, DType::F32);
        // The outputs: rescaled, plus the block's `exp`s times V.
        let e_len = e_len as usize;
        let lane_passes = if rows_out {
            let ctx = RowsOut {
                es: &es,
                os: &os,
                o_base: &o_base,
                alpha: &alpha,
                p0: &p0,
                v_slot: v_slot.as_deref(),
                ahead: (&ahead, wv_step0),
            };
            self.fused_wv_rows(it, &ctx, e_len)?;
            Vec::new()
        } else {
            passes(e_len, pass_len)
        };
        for (pass, (first, count)) in lane_passes.into_iter().enumerate() {
            let mut inits = Vec::with_capacity(count);
            let mut o_at = Vec::with_capacity(count);
            for k in first..first + count {
                let off = self.b.index((k * n) as i64);
                let off = self.b.addi(&off, &o_base);
                let o = self.b.load_vector(&os, &off, n, DType::F32);
                o_at.push(off);
                inits.push(self.b.op(&format!("arith.mulf {o}, {alpha} : {vty}")));
            }
            let (outs, c, accs) = self.b.open_for_typed(&block, &one, &inits, &vty);
            self.fused_prefetch(&ahead, wv_step0 + pass as i64 * BLOCK, &c);
            let off = self.b.muli(&c, &c_n);
            let pv = self.b.load_vector(&es, &off, n, DType::F32);
            let at = self.b.addi(&p0, &c);
            let zc = self.b.op(&format!("arith.minui {at}, {last_z} : index"));
            // V's row of the block in its slot.
            let v_row = v_slot.as_ref().map(|slot| (slot.clone(), self.b.muli(&c, &c_e)));
            let mut nexts = Vec::with_capacity(count);
            for (k, acc) in (first..).zip(&accs) {
                let ek = self.b.index(k as i64);
                let x = match &v_row {
                    Some((slot, row)) => {
                        let at = self.b.addi(row, &ek);
                        self.b.load(slot, &at, DType::F32).ssa
                    }
                    None => {
                        let env = [(g2, gi.to_owned()), (z2, zc.clone()), (e, ek)];
                        let at = self.operand_index(wv, &it.kv[1].1, &env)?;
                        self.loadf(v, &at)?
                    }
                };
                nexts.push(self.b.lanes_fma(&pv, &x, acc, &vty));
            }
            self.b.close_for_typed(&nexts, &vty);
            for (off, o) in o_at.iter().zip(&outs) {
                self.b.store_vector(&os, off, o, n, DType::F32);
            }
        }
        self.b.close();
        self.b.close();

        // Each row's outputs, max and sum.
        let t = self.b.open_loop(unit_tiles);
        let [first_row, _, o_base, m_base] = bases(self, &t);
        let l = self.b.open_loop(&c_n);
        let r = self.b.addi(&first_row, &l);
        let valid = self.b.ult(&r, r_len);
        self.b.open_guard(&valid);
        let base = self.partial_row(it, &r);
        if rows_out {
            // `[row][e]` where the w·V keeps its outputs so: the row's
            // outputs copied 16 at a time.
            let row = self.b.muli(&l, &c_e);
            let row = self.b.addi(&row, &o_base);
            for w in (0..e_len).step_by(16) {
                let ew = self.b.index(w as i64);
                let from = self.b.addi(&row, &ew);
                let o = self.b.load_vector(&os, &from, 16, DType::F32);
                let to = self.b.addi(&base, &ew);
                self.b.store_vector(&out.ptr, &to, &o, 16, DType::F32);
            }
        } else {
            // `[e][row]`: a lane of each.
            let ei = self.b.open_loop(&c_e);
            let off = self.b.muli(&ei, &c_n);
            let off = self.b.addi(&off, &l);
            let off = self.b.addi(&off, &o_base);
            let o = self.b.load(&os, &off, DType::F32);
            let to = self.b.addi(&base, &ei);
            self.b.store(&out.ptr, &to, DType::F32, o);
            self.b.close();
        }
        let lane = self.b.addi(&l, &m_base);
        for (slot, k) in [(&ms, e_len as i64), (&ls, e_len as i64 + 1)] {
            let x = self.b.load(slot, &lane, DType::F32);
            let ko = self.b.index(k);
            let to = self.b.addi(&base, &ko);
            self.b.store(&out.ptr, &to, DType::F32, x);
        }
        self.b.close();
        self.b.close();
        self.b.close();
        Ok(())
    }

    /// Where row `r` of the item's rows starts in its partials (`[item,
    /// rows…, e]`: its outputs, then its max and its sum).
    fn partial_row(&mut self, it: &Item, r: &str) -> String {
        let env = self.row_env(it, r);
        let mut at: Vec<String> = vec![it.unit.1.clone()];
        at.extend(env.into_iter().map(|(_, i)| i));
        at.push(self.b.index(0));
        self.b.linearize(&at, &it.out.sizes)
    }

    /// The lines of the partials of a tile's `n` rows from `first_row`
    /// (a row past the last: the last's) prefetched for writing, as the
    /// item starts: written at its end, they missed the caches (the
    /// partials of a step are out of them by the next), and the item
    /// waited on those lines' reads; see the module doc.
    fn fused_partials_ahead(&mut self, it: &Item, n: usize, first_row: &str) {
        let len = it.heads.1 as usize + 2;
        let c_n = self.b.index(n as i64);
        let l = self.b.open_loop(&c_n);
        let r = self.b.addi(first_row, &l);
        let (_, rc) = self.clamped_row(it, &r);
        let base = self.partial_row(it, &rc);
        // A line every 16 elements, and the last element's (a row need not
        // start on a line).
        for w in (0..len).step_by(LINE_BYTES as usize / 4).chain([len - 1]) {
            let o = self.b.index(w as i64);
            let off = self.b.addi(&base, &o);
            self.b.prefetch(&it.out.ptr, &off, DType::F32, true);
        }
        self.b.close();
    }

    /// A whole tile's 16 rows of q from row `first_row` (a row past the
    /// last read at the last, zeros), packed `[head][16]` into `qs` from
    /// `q_base` by 16 × 16 transposes of the rows read as vectors
    /// (`Kc::pack_squares`). Written a lane at a time (scattered), the
    /// scores' first vector loads of the slot waited for those stores:
    /// see the module doc.
    fn fused_q_transposed(&mut self, it: &Item, qs: &str, (first_row, q_base): (&str, &str)) -> Result<(), LowerError> {
        let mut lanes_at = Vec::with_capacity(ROWS);
        for l in 0..ROWS {
            let off = self.b.index(l as i64);
            let r = self.b.addi(first_row, &off);
            let (valid, rc) = self.clamped_row(it, &r);
            lanes_at.push((Some(valid), self.row_env(it, &rc)));
        }
        self.pack_squares(it.j, (it.q.0, &it.q.1), (it.letters[2], it.heads.0), &lanes_at, (qs, q_base))
    }

    /// Whether row `r` of an item is one of its rows, and the row it
    /// reads: `r`, or the last row when past it.
    fn clamped_row(&mut self, it: &Item, r: &str) -> (String, String) {
        let r_len = &it.rows.3;
        let one = self.b.index(1);
        let last_r = self.b.hoist(&format!("arith.subi {r_len}, {one} : index"));
        let valid = self.b.ult(r, r_len);
        let rc = self.b.op(&format!("arith.select {valid}, {r}, {last_r} : index"));
        (valid, rc)
    }

    /// The w·V of a block for a tile of 16 rows whose outputs are kept
    /// `[row][e]` (`ctx.os` from `ctx.o_base`): per 4 rows and 4 vectors of
    /// 16 outputs (16 accumulators), each position's V row read as 4
    /// vectors (from V, or its widened slot), each row's probability
    /// broadcast from the block's slot (`ctx.es`, `[position][row]`);
    /// the outputs first rescaled by their row's `alpha`. Half the loads
    /// of the rows-in-lanes w·V (a broadcast element of V an FMA).
    fn fused_wv_rows(&mut self, it: &Item, ctx: &RowsOut, e_len: usize) -> Result<(), LowerError> {
        let (wv, v) = (it.wv, it.kv[1].0);
        let [_, _, _, g2, z2, e] = it.letters;
        let (gi, last_z) = (&it.unit.0, &it.stretch.2);
        let vty = "vector<16xf32>";
        let (one, block) = (self.b.index(1), self.b.index(BLOCK));
        let c_n = self.b.index(ROWS as i64);
        let c_e = self.b.index(e_len as i64);
        let alphas = self.b.stack_f32("fused_alpha", ROWS, None);
        let c0 = self.b.index(0);
        self.b.store_vector(&alphas, &c0, ctx.alpha, ROWS, DType::F32);
        let vector_passes = passes(e_len / 16, OUT_VECTORS);
        for r0 in (0..ROWS).step_by(OUT_ROWS) {
            for (p, &(v0, nv)) in vector_passes.iter().enumerate() {
                let pass = (r0 / OUT_ROWS * vector_passes.len() + p) as i64;
                let mut inits = Vec::with_capacity(OUT_ROWS * nv);
                let mut o_at = Vec::with_capacity(OUT_ROWS * nv);
                for r in r0..r0 + OUT_ROWS {
                    let ri = self.b.index(r as i64);
                    let a = self.b.load(&alphas, &ri, DType::F32).ssa;
                    let a = self.b.op(&format!("vector.broadcast {a} : f32 to {vty}"));
                    for w in v0..v0 + nv {
                        let off = self.b.index((r * e_len + w * 16) as i64);
                        let off = self.b.addi(&off, ctx.o_base);
                        let o = self.b.load_vector(ctx.os, &off, ROWS, DType::F32);
                        o_at.push(off);
                        inits.push(self.b.op(&format!("arith.mulf {o}, {a} : {vty}")));
                    }
                }
                let (outs, c, accs) = self.b.open_for_typed(&block, &one, &inits, vty);
                self.fused_prefetch(ctx.ahead.0, ctx.ahead.1 + pass * BLOCK, &c);
                let at = self.b.addi(ctx.p0, &c);
                let zc = self.b.op(&format!("arith.minui {at}, {last_z} : index"));
                // V's row of the block in its slot.
                let v_row = ctx.v_slot.map(|slot| (slot, self.b.muli(&c, &c_e)));
                let mut vs = Vec::with_capacity(nv);
                for w in v0..v0 + nv {
                    let ew = self.b.index((w * 16) as i64);
                    vs.push(match &v_row {
                        Some((slot, row)) => {
                            let at = self.b.addi(row, &ew);
                            self.b.load_vector(slot, &at, 16, DType::F32)
                        }
                        None => {
                            let env = [(g2, gi.to_owned()), (z2, zc.clone()), (e, ew)];
                            let at = self.operand_index(wv, &it.kv[1].1, &env)?;
                            self.load_vector_view(v, &at, 16)?
                        }
                    });
                }
                let row = self.b.muli(&c, &c_n);
                let mut nexts = Vec::with_capacity(accs.len());
                for (k, acc) in accs.iter().enumerate() {
                    let (r, w) = (r0 + k / nv, k % nv);
                    let ri = self.b.index(r as i64);
                    let at = self.b.addi(&row, &ri);
                    let p = self.b.load(ctx.es, &at, DType::F32).ssa;
                    let p = self.b.op(&format!("vector.broadcast {p} : f32 to {vty}"));
                    nexts.push(self.b.op(&format!("vector.fma {p}, {}, {acc} : {vty}", vs[w])));
                }
                self.b.close_for_typed(&nexts, vty);
                for (off, o) in o_at.iter().zip(&outs) {
                    self.b.store_vector(ctx.os, off, o, ROWS, DType::F32);
                }
            }
        }
        Ok(())
    }

    /// The block of K or V (`operand`, read by `node` as `subs`, letters
    /// `g, z, h`: head, position, element) from position `p0` of KV head
    /// `gi`, each position past the context's last (`last_z`) read at it,
    /// widened to f32 into `slot` (`[BLOCK][len]`), a row at a time
    /// (`Kc::widen_run`).
    fn widen_kv_block(
        &mut self,
        (operand, node, subs): (Value, usize, &[char]),
        (g, z, h): (char, char, char),
        (gi, p0, last_z): (&str, &str, &str),
        len: i64,
        slot: &str,
    ) -> Result<(), LowerError> {
        let block = self.b.index(BLOCK);
        let c = self.b.open_loop(&block);
        let at = self.b.addi(p0, &c);
        let zc = self.b.op(&format!("arith.minui {at}, {last_z} : index"));
        let c_len = self.b.index(len);
        let row = self.b.muli(&c, &c_len);
        let (c0, env) = (self.b.index(0), [(g, gi.to_owned()), (z, zc)]);
        self.widen_run((node, subs, operand, h), &env, (&c0, &c_len), (slot, &row))?;
        self.b.close();
        Ok(())
    }

    /// The prefetch plans of tile `t` of a unit of `tiles` over the next
    /// block of K and V (`starts`: each one's buffer, the block's first
    /// element and its elements, where stored as one run): K's lines by
    /// the unit's first tile, V's by its last, each spread over the tile's
    /// `steps` (`Kc::block_ahead`); a tile that leaves an operand to the
    /// other fetches the current block's lines instead (in cache already:
    /// a hint that costs a load slot, not a branch in the loops). Fetched
    /// in a burst (a line of each a step of the first two scores' passes)
    /// they waited on the line fill buffers: see the module doc.
    fn fused_ahead(
        &mut self,
        starts: &[Option<(usize, String, i64)>],
        (t, tiles): (&str, &str),
        steps: i64,
    ) -> Result<Vec<LinesAhead>, LowerError> {
        let (zero, one) = (self.b.index(0), self.b.index(1));
        let last = self.b.subi(tiles, &one);
        let first_tile = self.b.op(&format!("arith.cmpi eq, {t}, {zero} : index"));
        let last_tile = self.b.op(&format!("arith.cmpi eq, {t}, {last} : index"));
        let mut plans = Vec::with_capacity(starts.len());
        for (on, start) in [first_tile, last_tile].iter().zip(starts) {
            let Some((b, next, elements)) = start else { continue };
            let size = self.program.buffers[*b].dtype.size() as i64;
            let lines = (elements * size + LINE_BYTES - 1) / LINE_BYTES;
            let back = self.b.index(*elements);
            let here = self.b.subi(next, &back);
            let from = self.b.op(&format!("arith.select {on}, {next}, {here} : index"));
            plans.push(self.block_ahead(*b, from, (lines, steps))?);
        }
        Ok(plans)
    }

    /// At step `step0 + i` of a tile, its line of each plan of `ahead`.
    fn fused_prefetch(&mut self, ahead: &[LinesAhead], step0: i64, i: &str) {
        let s0 = self.b.index(step0);
        let l = self.b.addi(&s0, i);
        for a in ahead {
            self.prefetch_line(a, &l);
        }
    }

    /// The lanes' max of `values` (vectors of `n` f32), in a tree of
    /// `a > b ? a : b`, one `vmaxps` each on x86 (`arith.maximumf` takes
    /// five there, for its NaN; a NaN score still makes the row's sum
    /// NaN): the block's max from its scores in registers, about 5
    /// dependent steps where a loop over the block's slot took 32.
    fn max_tree(&mut self, mut values: Vec<String>, n: usize) -> String {
        let vty = format!("vector<{n}xf32>");
        while values.len() > 1 {
            let mut next = Vec::with_capacity(values.len().div_ceil(2));
            for pair in values.chunks(2) {
                next.push(match pair {
                    [a, b] => {
                        let above = self.b.op(&format!("arith.cmpf ogt, {a}, {b} : {vty}"));
                        self.b.op(&format!("arith.select {above}, {a}, {b} : vector<{n}xi1>, {vty}"))
                    }
                    _ => pair[0].clone(),
                });
            }
            values = next;
        }
        values.pop().unwrap_or_default()
    }

    /// The letters of row `r` of item `it`'s rows, in the order of its
    /// rows' letters: its KV head at `g`'s axis (where K's head is a
    /// row's), the other row letters from `r` delinearized over their
    /// sizes.
    fn row_env(&mut self, it: &Item, r: &str) -> Vec<(char, String)> {
        let (rows, g_axis, sizes) = (&it.rows.0, it.rows.1, &it.rows.2);
        let mut idx = self.b.delinearize(r, sizes).into_iter();
        rows.iter()
            .enumerate()
            .map(|(a, &c)| (c, if Some(a) == g_axis { it.unit.0.clone() } else { idx.next().unwrap_or_default() }))
            .collect()
    }
}

/// `total` split into the fewest passes of at most `most`, as even as
/// they can be (32 in passes of 6: 6, 6, 5, 5, 5, 5; a pass of 2 would
/// have too few accumulators to hide the FMAs' latency): each pass's
/// first index and length.
fn passes(total: usize, most: usize) -> Vec<(usize, usize)> {
    let count = total.div_ceil(most.max(1));
    let (base, extra) = (total / count.max(1), total % count.max(1));
    let mut first = 0;
    (0..count)
        .map(|p| {
            let len = base + usize::from(p < extra);
            first += len;
            (first - len, len)
        })
        .collect()
}
