//! The context `q·K` of bifurcated attention on the CPU with the rows that
//! share K (the samples) in the vector lanes.
//!
//! The reuse tile of `bodies.rs` sums each output along the head in
//! vectors and adds the 16 sums of a tile in a tree of shuffles: for a
//! 64-wide head, 4 FMAs and about 3 shuffles or adds an output, which
//! holds the kernel near 57% of the FMA peak. Here, when at least 16 rows
//! share the operand, 16 rows × 16 consecutive outputs are 16 vector
//! accumulators, one per output, each lane a row: every step of the sum
//! loads the 16 rows' elements of the small operand as one vector (packed
//! once per item, transposed, into a stack slot) and broadcasts one
//! element of each of the 16 K rows into an FMA. Only FMAs in the loop;
//! the 16 accumulators are transposed in registers (64 shuffles for 256
//! outputs) so that each row's 16 outputs are stored as one line. The next
//! block's K rows are prefetched a line per step of the sum.
//!
//! A row's 16 f32 outputs are stored past the caches where they start on
//! a line (`Builder::store_vector_streaming`): no read of the line for
//! ownership first. f16 / bf16 scores (half a line) are stored plainly:
//! streamed, each store would write a partial line to memory alone (the
//! bf16 q·K 7-9 -> 25 ms a layer once they really were streamed; until
//! then LLVM had dropped the hint on `bf16` vectors). With plain stores
//! the f32 kernel ran a fifth slower at context lengths a multiple of 16
//! but not of 64 (cpu_step, m_c = 8208, one
//! thread: 6.6-6.9 -> 5.5 ms a layer; two: 3.4-4.1 -> 2.7-3.0), and as
//! fast at 8192 (the softmax then reads the scores from DRAM rather than
//! partly from L3: the step is the same). For the blocks to start on
//! lines at any context length, an item's blocks start where its first
//! row's outputs start a line, `shift` outputs in; the `shift` before
//! them and the few after the last whole block are the tiles of the
//! item's first and last 16 outputs with only those lanes stored (masked
//! stores; about 3% more FMAs at m_c = 8100). Rows a multiple of 16
//! outputs apart (a multi-head model's samples at one head) then all
//! start on lines: m_c = 8100, 6.5-6.7 -> 5.4-5.8 ms a layer on one
//! thread, 3.3-3.5 -> 2.9 on two. Rows that do not (grouped-query heads
//! of one sample, at such lengths) keep plain stores.
//!
//! Wide tiles of f32 lanes pack the rows by 16 × 16 transposes in
//! registers (`Kc::transpose_16`), each row read as vectors along the
//! head ([`Kc::pack_rows`]); a lane at a time, LLVM scattered each row's
//! elements into the slot (`vscatterdps`) and the sums' first vector
//! loads of the slot then waited on those stores, as the fused kernel's q
//! did (`emit::fused`). The same bits; the bf16 model's q·K on the
//! 2-core Emerald Rapids VM (cpu_step, b = 32, m_c = 8192, two threads,
//! profiled, alternated, calm rounds): 2.49-2.80 -> 2.40-2.68 ms a layer.
//!
//! Wide tiles sum two tiles of 16 rows at a time, 8 outputs a pass (16
//! accumulators), each element of K broadcast once for both tiles' FMAs:
//! broadcast for one FMA alone, LLVM folds the load into it
//! (`vfmadd231ps m32{1to16}`), which held the kernel near 58% of the FMA
//! peak in every dtype, where a broadcast kept in a register feeds two
//! (a C loop of each on the VM, one core, in L1: 77-79% against 95% of
//! the peak). The same FMAs in the same order for every output: the same
//! bits. Llama-2-7B's f16 q·K at b = 32, m_c = 8192, two threads
//! (cpu_step, profiled, two rounds alternated): 10.0-10.1 -> 7.8-8.1 ms a
//! layer (58% -> 73-77%), once a 128-wide head's packing turn held two
//! tiles (it held one: the pairs' loop never ran).
//!
//! An f16 / bf16 K is widened a block of 16 rows at a time into a second
//! stack slot that the block's tiles broadcast from (a widening per
//! broadcast would cost more than the FMA it feeds): the bf16 model's q·K
//! 8.0-8.2 -> 5.9-6.3 ms a layer at b = 32, m_c = 8192; the scores are
//! rounded once, at the store.
//!
//! Both bf16 on a CPU that prefers its bf16 dot product (AVX512-BF16 on
//! AMD: `emit::pair_dot::prefer_bf16_dot`), the rows are packed as pairs of
//! the head's consecutive elements (`[tile][pair][lane]`, 32 bits each)
//! and each step sums one pair of all 16 rows with the same pair of each
//! of 16 K rows, read in place and broadcast, by one `vdpbf16ps` per
//! output (`emit::pair_dot`): half the steps, no widened copy of K. The
//! bf16 model's q·K 5.7 -> 2.9 ms a layer (b = 32, m_c = 8192, one
//! thread).
//!
//! A bf16 q·K on a CPU with AMX tiles runs on them instead
//! (`emit::amx_scores`).
//!
//! Fewer than 16 rows (b = 1) walk the reuse tile instead, in the other
//! branch of a runtime test; rows past the last whole 16 and a block cut
//! short by the output's length use the reuse tile's one-row and
//! one-output forms.

use crate::ir::{DType, EinsumSpec, Role, Value};
use crate::lower::LowerError;

use super::bodies::{Out, Values};
use super::registers::NARROW_LANES_OUTPUTS;
use super::{walk_index, Kc, Partition, Target, BLOCK, CPU_SIMD};

/// Blocks of 16 outputs along the last axis per walk item: the rows are
/// packed once per item (b = 32, a 64-wide head: 2048 loads and stores for
/// 2 × 64 × 1024 FMAs).
const CHUNK_BLOCKS: i64 = 64;
/// f32 elements of the stack slot the rows are packed into (8 KiB: 32
/// rows of a 64-wide head, at least one tile of 16 rows for wider ones,
/// two where the tiles are summed two at a time and take at most twice
/// it, a 128-wide head's 32 rows in 16 KiB: `Kc::lanes_block`):
/// more rows are packed and walked in turns, so that the packed rows stay
/// in L1 beside the block of K that their tiles share (grouped-query
/// attention's 128 rows a KV head packed at once, 32 KiB: its q·K 8.3-8.9
/// ms a layer at b = 32, m_c = 8192; in turns of 32 rows 5.2-5.9, and the
/// reuse tile 6.8-8.1).
const PACK_ELEMS: i64 = 2048;
/// bf16 elements of a cache line: with pairs the sum's length must be a
/// multiple of it (the next block of K is prefetched a line per step).
const PAIR_LINE: i64 = 32;

/// A row [`Kc::pack_squares`] packs: whether it is one (`None`: always),
/// and its letters but the summed one.
pub(super) type PackedRow = (Option<String>, Vec<(char, String)>);

/// The two operands of a contraction run with its rows in the lanes.
pub(super) struct RowsInLanes {
    spec: EinsumSpec,
    /// The operand that does not index the output's last letter (q), and
    /// the one that does (K).
    small: (Value, usize),
    large: (Value, usize),
    /// The summed letter and its length.
    sum: (char, i64),
    /// The large operand is f16 / bf16: each block of its rows is widened
    /// once into a stack slot that the block's tiles broadcast from.
    widened: bool,
    /// Both operands are bf16 and this CPU prefers its bf16 dot product
    /// (`prefer_bf16_dot`): the rows are
    /// packed as pairs of the sum's consecutive elements and each step
    /// sums two of them by `vdpbf16ps` (see `emit::pair_dot`), K read in
    /// place.
    pairs: bool,
}

impl Kc<'_> {
    /// Node `j` (walked keeping axes `keep`, reusing `reuse`) as a
    /// [`RowsInLanes`] contraction: on the CPU, float output and operands,
    /// one short sum in 16-lane vectors along both operands' innermost
    /// axis (`Kc::vector_sum`: a head), the output's last axis kept, and
    /// indexed only by the operand that indexes no reuse axis, a context
    /// cache (the context `q·K`).
    pub(super) fn rows_in_lanes(&self, j: usize, out: &Out, keep: &[usize], reuse: &[usize]) -> Option<RowsInLanes> {
        let rank = out.sizes.len();
        if out.target != Target::Cpu
            || out.emulation.is_some()
            || self.partition != Partition::Pending
            || self.simd != CPU_SIMD
            || !out.dtype.is_float()
            || keep.last() != Some(&(rank.checked_sub(1)?))
            || reuse.is_empty()
        {
            return None;
        }
        let sum = self.vector_sum(j).filter(|s| s.letters == 1 && s.short() && s.lanes == CPU_SIMD)?;
        let (spec, inputs) = self.contraction_spec(j)?;
        let z = *spec.output.last()?;
        let reused: Vec<char> = reuse.iter().map(|&a| spec.output[a]).collect();
        let (&[a, b], [_, sb]) = (inputs.as_slice(), spec.inputs.as_slice()) else { return None };
        let ((small, ks), (large, kl)) = if sb.contains(&z) { ((a, 0), (b, 1)) } else { ((b, 1), (a, 0)) };
        let (ss, sl) = (&spec.inputs[ks], &spec.inputs[kl]);
        let float = |v: Value| self.graph.dtype_of(v).is_float();
        // A context cache (a weight's short sum, a toy model's projection,
        // keeps the reuse tile).
        let context = match large {
            Value::Input(i) => self.graph.inputs.get(i).is_some_and(|x| matches!(x.role, Role::ContextKv { .. })),
            Value::Node(_) => false,
        };
        if !context
            || ss.contains(&z)
            || !sl.contains(&z)
            || sl.iter().any(|c| reused.contains(c))
            || !float(small)
            || !float(large)
        {
            return None;
        }
        let letter = *ss.last()?;
        let bf16 = |v: Value| self.graph.dtype_of(v) == DType::BF16;
        let stored_bf16 = self.stored(large).is_some_and(|b| self.program.buffers[b].dtype == DType::BF16);
        let pairs = self.bf16_dot && bf16(small) && bf16(large) && stored_bf16 && sum.len % PAIR_LINE == 0;
        let widened = self.graph.dtype_of(large) != DType::F32 && !pairs;
        Some(RowsInLanes { spec, small: (small, ks), large: (large, kl), sum: (letter, sum.len), widened, pairs })
    }

    /// Node `j` with its rows in the lanes where at least 16 rows share
    /// the large operand, else (b < 16) as `Kc::reuse_body` walks it.
    pub(super) fn rows_in_lanes_body(
        &mut self,
        out: &Out,
        j: usize,
        t: &RowsInLanes,
        (keep, reuse, tile): (Vec<usize>, Vec<usize>, usize),
    ) -> Result<String, LowerError> {
        let rows = self.extent_of(out, &reuse)?;
        let lanes = self.b.index(CPU_SIMD as i64);
        let enough = self.b.op(&format!("arith.cmpi uge, {rows}, {lanes} : index"));
        self.b.open_guard(&enough);
        let mut opened = 0;
        self.lanes_walk(out, j, t, (&keep, &reuse, &rows), &mut opened)?;
        self.close_n(opened);
        self.b.else_guard();
        // The other branch's walk is split into the call's part too.
        self.partition = Partition::Pending;
        let mut opened = 0;
        let extent = self.reuse_body(out, j, (keep, reuse, tile), &mut opened)?;
        self.close_n(opened);
        self.b.close();
        Ok(extent)
    }

    /// The sizes of `axes` of the output.
    fn pick_sizes(&self, out: &Out, axes: &[usize]) -> Vec<String> {
        axes.iter().map(|&a| out.sizes[a].clone()).collect()
    }

    /// Closes `n` regions (loops, guards).
    fn close_n(&mut self, n: usize) {
        for _ in 0..n {
            self.b.close();
        }
    }

    /// The walk with rows in the lanes: items of CHUNK_BLOCKS blocks along
    /// the output's last axis at each index of the other kept axes; in
    /// each, the rows packed (in turns of what the slot holds), then each
    /// block by tiles of 16 rows. `rows` is the number of rows (the
    /// product of the reuse axes' sizes).
    fn lanes_walk(
        &mut self,
        out: &Out,
        j: usize,
        t: &RowsInLanes,
        (keep, reuse, rows): (&[usize], &[usize], &str),
        opened: &mut usize,
    ) -> Result<(), LowerError> {
        let zaxis = out.sizes.len() - 1;
        let outer: Vec<usize> = keep.iter().copied().filter(|&a| a != zaxis).collect();
        let reuse_sizes = self.pick_sizes(out, reuse);
        let zlen = out.sizes[zaxis].clone();
        let span = self.b.index(CHUNK_BLOCKS * BLOCK as i64);
        // Hoisted, as the walk's sizes are (the part loop's bound).
        let chunks = self.ceil_div(&zlen, CHUNK_BLOCKS * BLOCK as i64);
        let mut walk_sizes = self.pick_sizes(out, &outer);
        walk_sizes.push(chunks);
        let mut at = walk_index(self, Target::Cpu, &out.flat, &walk_sizes, false, opened);
        let chunk = at.pop().unwrap_or_default();
        let mut idx = vec![self.b.index(0); out.sizes.len()];
        for (&a, v) in outer.iter().zip(&at) {
            idx[a] = v.clone();
        }
        let z0 = self.b.muli(&chunk, &span);
        let z1 = self.b.addi(&z0, &span);
        let z1 = self.b.op(&format!("arith.minui {z1}, {zlen} : index"));
        // The rows in turns of what the slot holds.
        let tile = CPU_SIMD as i64;
        // Two tiles a turn at least where they are summed two at a time
        // (`Kc::lanes_block`) and one tile's rows fit the slot (two then
        // take at most twice it: 32 rows of a 128-wide head, 16 KiB).
        let by_two = !(t.pairs || self.narrow);
        let least = if by_two && tile * t.sum.1 <= PACK_ELEMS { 2 * tile } else { tile };
        let turn_rows = (PACK_ELEMS / t.sum.1 / tile * tile).max(least);
        let paired = by_two && turn_rows >= 2 * tile;
        let per_turn = self.b.index(turn_rows);
        let turns = self.ceil_div(rows, turn_rows);
        let turn = self.b.open_loop(&turns);
        let first = self.b.muli(&turn, &per_turn);
        let left = self.b.subi(rows, &first);
        let here = self.b.op(&format!("arith.minui {left}, {per_turn} : index"));
        let lanes = self.b.index(CPU_SIMD as i64);
        let tiles = self.b.op(&format!("arith.divui {here}, {lanes} : index"));
        let slot = self.b.stack_f32("rows_in_lanes", (turn_rows * t.sum.1) as usize, None);
        self.pack_rows(j, t, (&idx, reuse, &reuse_sizes), (&first, &tiles), &slot)?;
        let item = Item {
            idx: &idx,
            reuse,
            sizes: &reuse_sizes,
            first: &first,
            here: &here,
            tiles: &tiles,
            slot: &slot,
            paired,
        };
        // The blocks of 16 outputs start where the turn's first row's
        // outputs start a line (half a line for f16 / bf16), `shift` into
        // the item, so that the rows' stores fill lines and, in f32, go past
        // the caches (every row's where the rows are a multiple of 16
        // outputs apart: a multi-head model's samples; see
        // `Kc::lanes_block`; f16 / bf16 halves of lines are stored plainly,
        // `Builder::store_vector_streaming`). The
        // `shift` before them and the `rem` after them are a block's tile
        // at the item's first and last 16 outputs with only those lanes
        // stored. An item narrower than a block: one output at a time.
        let block = self.b.index(BLOCK as i64);
        let width = self.b.subi(&z1, &z0);
        let fits = self.b.op(&format!("arith.cmpi uge, {width}, {block} : index"));
        self.b.open_guard(&fits);
        let mut at0 = self.row_index(&idx, reuse, &reuse_sizes, &first);
        at0[zaxis] = z0.clone();
        let off0 = self.b.linearize(&at0, &out.sizes);
        let a = self.b.misalignment(&out.ptr, &off0, CPU_SIMD, out.dtype);
        let back = self.b.subi(&block, &a);
        let shift = self.b.op(&format!("arith.remui {back}, {block} : index"));
        let inner = self.b.subi(&width, &shift);
        let blocks = self.b.op(&format!("arith.divui {inner}, {block} : index"));
        let rem = self.b.op(&format!("arith.remui {inner}, {block} : index"));
        let zero = self.b.index(0);
        let head = self.b.op(&format!("arith.cmpi ugt, {shift}, {zero} : index"));
        let head_end = self.b.addi(&z0, &shift);
        self.b.open_guard(&head);
        let lanes_before = self.b.op(&format!("vector.create_mask {shift} : vector<{CPU_SIMD}xi1>"));
        self.lanes_block(out, j, t, &item, &z0, Some((&lanes_before, &z0, &head_end)))?;
        self.b.close();
        let bi = self.b.open_loop(&blocks);
        let start = self.b.muli(&bi, &block);
        let start = self.b.addi(&head_end, &start);
        self.lanes_block(out, j, t, &item, &start, None)?;
        self.b.close();
        let tail = self.b.op(&format!("arith.cmpi ugt, {rem}, {zero} : index"));
        self.b.open_guard(&tail);
        let start = self.b.subi(&z1, &block);
        let kept = self.b.subi(&block, &rem);
        let lanes_kept = self.b.op(&format!("vector.create_mask {kept} : vector<{CPU_SIMD}xi1>"));
        let all = self.b.hoist(&format!("arith.constant dense<true> : vector<{CPU_SIMD}xi1>"));
        let lanes_after = self.b.op(&format!("arith.xori {lanes_kept}, {all} : vector<{CPU_SIMD}xi1>"));
        let tail_start = self.b.subi(&z1, &rem);
        self.lanes_block(out, j, t, &item, &start, Some((&lanes_after, &tail_start, &z1)))?;
        self.b.close();
        self.b.else_guard();
        self.scalar_span(out, j, &item, (&zero, &here), (&z0, &z1))?;
        self.b.close();
        self.b.close();
        Ok(())
    }

    /// The tiles of 16 rows × the 16 outputs from `start` of an item's
    /// turn, all stored (`part` None: past the caches where a row's start
    /// a line, `Builder::store_vector_streaming`) or only the lanes of
    /// `part`'s mask (the outputs `from..to` of the block); the rows past
    /// the last whole tile a row of the block at a time (of `part`, one
    /// output at a time).
    fn lanes_block(
        &mut self,
        out: &Out,
        j: usize,
        t: &RowsInLanes,
        item: &Item,
        start: &str,
        part: Option<(&str, &str, &str)>,
    ) -> Result<(), LowerError> {
        let zaxis = out.sizes.len() - 1;
        let rows_k = if t.widened { Some(self.widen_block(j, t, item.idx, start)?) } else { None };
        let slots = (item.slot, rows_k.as_deref(), part.map(|(m, _, _)| m));
        let rows = (item.idx, item.reuse, item.sizes);
        if !item.paired {
            let ti = self.b.open_loop(item.tiles);
            self.lanes_tile(out, j, t, rows, (item.first, &[ti], start), slots)?;
            self.b.close();
        } else {
            // Two tiles at a time (each broadcast of K feeding both), then
            // the odd one.
            let two = self.b.index(2);
            let pairs = self.b.op(&format!("arith.divui {}, {two} : index", item.tiles));
            let tp = self.b.open_loop(&pairs);
            let ta = self.b.muli(&tp, &two);
            let one = self.b.index(1);
            let tb = self.b.addi(&ta, &one);
            self.lanes_tile(out, j, t, rows, (item.first, &[ta, tb], start), slots)?;
            self.b.close();
            let paired = self.b.muli(&pairs, &two);
            let odd = self.b.ult(&paired, item.tiles);
            self.b.open_guard(&odd);
            self.lanes_tile(out, j, t, rows, (item.first, &[paired], start), slots)?;
            self.b.close();
        }
        let lanes = self.b.index(CPU_SIMD as i64);
        let done = self.b.muli(item.tiles, &lanes);
        match part {
            None => {
                let one = self.b.index(1);
                let r = self.b.open_loop_from(&done, item.here, &one);
                let row = self.b.addi(item.first, &r);
                let mut ridx = self.row_index(item.idx, item.reuse, item.sizes, &row);
                ridx[zaxis] = start.to_owned();
                let idxs = self.spread(&ridx, zaxis, BLOCK, 1);
                self.store_tile(out, j, Values::Rows { cols: BLOCK, ahead: false }, &idxs, (None, None))?;
                self.b.close();
                Ok(())
            }
            Some((_, from, to)) => self.scalar_span(out, j, item, (&done, item.here), (from, to)),
        }
    }

    /// The outputs `zs.0..zs.1` along the last axis of the turn's rows
    /// `rows.0..rows.1`, one at a time.
    fn scalar_span(
        &mut self,
        out: &Out,
        j: usize,
        item: &Item,
        rows: (&str, &str),
        zs: (&str, &str),
    ) -> Result<(), LowerError> {
        let zaxis = out.sizes.len() - 1;
        let one = self.b.index(1);
        let r = self.b.open_loop_from(rows.0, rows.1, &one);
        let row = self.b.addi(item.first, &r);
        let mut ridx = self.row_index(item.idx, item.reuse, item.sizes, &row);
        let c = self.b.open_loop_from(zs.0, zs.1, &one);
        ridx[zaxis] = c;
        self.store_tile(out, j, Values::Scalars, &[ridx], (None, None))?;
        self.b.close();
        self.b.close();
        Ok(())
    }

    /// Output index `idx` with its reuse axes at flat row `row`.
    fn row_index(&mut self, idx: &[String], reuse: &[usize], sizes: &[String], row: &str) -> Vec<String> {
        let mut at = idx.to_vec();
        for (&a, v) in reuse.iter().zip(self.b.delinearize(row, sizes)) {
            at[a] = v;
        }
        at
    }

    /// The large operand's 16 rows from `start` along the output's last
    /// axis (at output index `idx`), widened to f32 into a stack slot
    /// `[row][summed letter]` (`Kc::widen_run`: a vector load and store
    /// per 16 elements), once per block.
    fn widen_block(&mut self, j: usize, t: &RowsInLanes, idx: &[String], start: &str) -> Result<String, LowerError> {
        let (n, len) = (CPU_SIMD, t.sum.1);
        let slot = self.b.stack_f32("rows_in_lanes_k", n * len as usize, None);
        let (v, k) = t.large;
        if self.stored(v).is_none() {
            return Err(self.unsupported(j, "a widened operand that is not stored"));
        }
        let mut env: Vec<(char, String)> = t.spec.output.iter().copied().zip(idx.iter().cloned()).collect();
        let zl = *t.spec.output.last().ok_or_else(|| self.unsupported(j, "an einsum without outputs"))?;
        let rows = self.b.index(n as i64);
        let c = self.b.open_loop(&rows);
        let z = self.b.addi(start, &c);
        set(&mut env, zl, &z);
        let (c0, width) = (self.b.index(0), self.b.index(len));
        let row = self.b.muli(&c, &width);
        self.widen_run((j, &t.spec.inputs[k], v, t.sum.0), &env, (&c0, &width), (&slot, &row))?;
        self.b.close();
        Ok(slot)
    }

    /// The small operand's elements of the `tiles` whole tiles of 16 rows
    /// from row `first`, in `slot` as `[tile][summed letter][lane]`.
    fn pack_rows(
        &mut self,
        j: usize,
        t: &RowsInLanes,
        (idx, reuse, sizes): (&[String], &[usize], &[String]),
        (first, tiles): (&str, &str),
        slot: &str,
    ) -> Result<(), LowerError> {
        let lanes = self.b.index(CPU_SIMD as i64);
        let len = self.b.index(t.sum.1);
        if self.packs_by_squares(t) {
            // Each tile's rows read as vectors along the sum, each 16 × 16
            // square transposed in registers and stored a vector at a time.
            let ti = self.b.open_loop(tiles);
            let row0 = self.b.muli(&ti, &lanes);
            let row0 = self.b.addi(first, &row0);
            let rows_at: Vec<Vec<String>> = (0..CPU_SIMD)
                .map(|l| {
                    let off = self.b.index(l as i64);
                    let row = self.b.addi(&row0, &off);
                    self.row_index(idx, reuse, sizes, &row)
                })
                .collect();
            let rows: Vec<PackedRow> =
                rows_at.into_iter().map(|at| (None, t.spec.output.iter().copied().zip(at).collect())).collect();
            let tile_at = self.b.muli(&ti, &len);
            let base = self.b.muli(&tile_at, &lanes);
            let (v, k) = t.small;
            self.pack_squares(j, (v, &t.spec.inputs[k]), t.sum, &rows, (slot, &base))?;
            self.b.close();
            return Ok(());
        }
        let rows = self.b.muli(tiles, &lanes);
        let r = self.b.open_loop(&rows);
        let row = self.b.addi(first, &r);
        let at = self.row_index(idx, reuse, sizes, &row);
        let tile = self.b.op(&format!("arith.divui {r}, {lanes} : index"));
        let lane = self.b.op(&format!("arith.remui {r}, {lanes} : index"));
        if t.pairs {
            // `[tile][pair][lane]`, each element the 32 bits of a pair.
            let half = self.b.index(t.sum.1 / 2);
            let d2 = self.b.open_loop(&half);
            let two = self.b.index(2);
            let d = self.b.muli(&d2, &two);
            let next = self.b.index(1);
            let d1 = self.b.addi(&d, &next);
            let (x0, x1) = (self.small_at(j, t, &at, &d)?, self.small_at(j, t, &at, &d1)?);
            let word = self.bf16_pair(&x0, &x1);
            let off = self.b.muli(&tile, &half);
            let off = self.b.addi(&off, &d2);
            let off = self.b.muli(&off, &lanes);
            let off = self.b.addi(&off, &lane);
            let p = self.b.element_ptr(slot, &off, "i32");
            self.b.line(&format!("llvm.store {word}, {p} : i32, !llvm.ptr"));
            self.b.close();
            self.b.close();
            return Ok(());
        }
        let d = self.b.open_loop(&len);
        let x = self.small_at(j, t, &at, &d)?;
        let off = self.b.muli(&tile, &len);
        let off = self.b.addi(&off, &d);
        let off = self.b.muli(&off, &lanes);
        let off = self.b.addi(&off, &lane);
        self.b.store(slot, &off, DType::F32, super::builder::Val::f32(x));
        self.b.close();
        self.b.close();
        Ok(())
    }

    /// Whether [`Kc::pack_rows`] packs a tile's rows by 16 × 16 transposes
    /// in registers (`Kc::transpose_16`): wide tiles, f32 lanes (not
    /// pairs), a sum of whole vectors along the small operand's last
    /// axis, read as vectors. Packed a lane at a time, LLVM scattered each
    /// row's elements into the slot, and the sums' first vector loads of
    /// the slot waited on those stores (see the module doc).
    fn packs_by_squares(&self, t: &RowsInLanes) -> bool {
        let (v, k) = t.small;
        !self.narrow
            && !t.pairs
            && t.sum.1 % CPU_SIMD as i64 == 0
            && t.spec.inputs[k].last() == Some(&t.sum.0)
            && self.vector_readable(v)
    }

    /// 16 rows of operand `v` (read by node `j` as `subs`, the summed
    /// letter `sum` last, of a length a multiple of 16), each given by its
    /// letters but `sum` (and, where given, whether it is a row: if not,
    /// it is packed as zeros), packed `[sum][16]` into `slot` from element
    /// `base`: each row read as vectors along `sum`, each 16 × 16 square
    /// transposed in registers (`Kc::transpose_16`) and stored a vector
    /// at a time. The rows-in-lanes q·K's rows and the fused attention's
    /// q (`emit::fused`) are packed so.
    pub(super) fn pack_squares(
        &mut self,
        j: usize,
        (v, subs): (Value, &[char]),
        (sum, len): (char, i64),
        rows: &[PackedRow],
        (slot, base): (&str, &str),
    ) -> Result<(), LowerError> {
        let vty = format!("vector<{CPU_SIMD}xf32>");
        let zeros = self.b.splat_f32(0.0, Some(CPU_SIMD));
        for d0 in (0..len).step_by(CPU_SIMD) {
            let d = self.b.index(d0);
            let mut square = Vec::with_capacity(rows.len());
            for (valid, env) in rows {
                let mut env = env.clone();
                env.push((sum, d.clone()));
                let at = self.operand_index(j, subs, &env)?;
                let x = self.load_vector_view(v, &at, CPU_SIMD)?;
                square.push(match valid {
                    Some(valid) => self.b.op(&format!("arith.select {valid}, {x}, {zeros} : {vty}")),
                    None => x,
                });
            }
            for (c, x) in self.transpose_16(&square).iter().enumerate() {
                let off = self.b.index((d0 as usize + c) as i64 * CPU_SIMD as i64);
                let off = self.b.addi(&off, base);
                self.b.store_vector(slot, &off, x, CPU_SIMD, DType::F32);
            }
        }
        Ok(())
    }

    /// The small operand at output index `at`, step `d` of the sum.
    fn small_at(&mut self, j: usize, t: &RowsInLanes, at: &[String], d: &str) -> Result<String, LowerError> {
        let mut env: Vec<(char, String)> = t.spec.output.iter().copied().zip(at.iter().cloned()).collect();
        env.push((t.sum.0, d.to_owned()));
        let (v, k) = t.small;
        let i = self.operand_index(j, &t.spec.inputs[k], &env)?;
        self.loadf(v, &i)
    }

    /// Tiles `tis` (one, or two: wide tiles without pairs) of 16 rows from
    /// row `first` × the block of 16 outputs from `start` along the last
    /// axis: 16 vector accumulators a tile (an output each, a row a lane)
    /// summed with one FMA per element of the large operand and tile,
    /// transposed, each row's 16 outputs stored as one vector (only the
    /// lanes of `mask` when given).
    fn lanes_tile(
        &mut self,
        out: &Out,
        j: usize,
        t: &RowsInLanes,
        (idx, reuse, sizes): (&[String], &[usize], &[String]),
        (first, tis, start): (&str, &[String], &str),
        (slot, rows_k, mask): (&str, Option<&str>, Option<&str>),
    ) -> Result<(), LowerError> {
        let n = CPU_SIMD;
        let zaxis = out.sizes.len() - 1;
        let lanes = self.b.index(n as i64);
        let sums = if t.pairs {
            tis.iter().map(|ti| self.pair_sums(j, t, idx, (ti, start), slot)).collect::<Result<Vec<_>, _>>()?
        } else {
            self.lanes_sums(j, t, idx, (tis, start), (slot, rows_k))?
        };
        for (ti, res) in tis.iter().zip(&sums) {
            let by_row = self.transpose_16(res);
            for (l, v) in by_row.iter().enumerate() {
                let r = self.b.muli(ti, &lanes);
                let lane = self.b.index(l as i64);
                let r = self.b.addi(&r, &lane);
                let row = self.b.addi(first, &r);
                let mut at = self.row_index(idx, reuse, sizes, &row);
                at[zaxis] = start.to_owned();
                let off = self.b.linearize(&at, &out.sizes);
                match mask {
                    None => self.b.store_vector_streaming(&out.ptr, &off, v, n, out.dtype),
                    Some(m) => self.b.store_vector_masked(&out.ptr, &off, v, n, out.dtype, m),
                }
            }
        }
        Ok(())
    }

    /// The 16 accumulators of each of [`Kc::lanes_tile`]'s tiles `tis`
    /// without pairs, in passes of the block's outputs: all 16 at once
    /// for one tile, 8 at a time for two (16 accumulators, each
    /// broadcast element of the large operand feeding both tiles' FMAs:
    /// the load folded into a lone FMA held it near half the FMA peak),
    /// a few at a time with narrow tiles (`emit::registers`: 6, 6 and 4).
    /// Each output's sum is the same FMAs in the same order whatever the
    /// pass. The first pass prefetches the next block.
    fn lanes_sums(
        &mut self,
        j: usize,
        t: &RowsInLanes,
        idx: &[String],
        (tis, start): (&[String], &str),
        (slot, rows_k): (&str, Option<&str>),
    ) -> Result<Vec<Vec<String>>, LowerError> {
        let n = CPU_SIMD;
        let vty = format!("vector<{n}xf32>");
        let zaxis = idx.len() - 1;
        let lanes = self.b.index(n as i64);
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let one = self.b.index(1);
        let most = if self.narrow { NARROW_LANES_OUTPUTS } else { n / tis.len() };
        let mut res = vec![Vec::with_capacity(n); tis.len()];
        for first in (0..n).step_by(most) {
            let pass = most.min(n - first);
            let len = self.b.index(t.sum.1);
            let inits = vec![zero.clone(); pass * tis.len()];
            let (sums, d, accs) = self.b.open_for_typed(&len, &one, &inits, &vty);
            let mut rows = Vec::with_capacity(tis.len());
            for ti in tis {
                let base = self.b.muli(ti, &len);
                let base = self.b.addi(&base, &d);
                let base = self.b.muli(&base, &lanes);
                rows.push(self.b.load_vector(slot, &base, n, DType::F32));
            }
            let (v, k) = t.large;
            let mut env: Vec<(char, String)> = t.spec.output.iter().copied().zip(idx.iter().cloned()).collect();
            env.push((t.sum.0, d.clone()));
            let zl = t.spec.output[zaxis];
            let mut nexts = vec![String::new(); accs.len()];
            for c in 0..pass {
                let off = self.b.index((first + c) as i64);
                let z = self.b.addi(start, &off);
                let x = match rows_k {
                    // Row c of the widened block, element d.
                    Some(rows_k) => {
                        let off = self.b.muli(&off, &len);
                        let off = self.b.addi(&off, &d);
                        self.b.load(rows_k, &off, DType::F32).ssa
                    }
                    None => {
                        set(&mut env, zl, &z);
                        let at = self.operand_index(j, &t.spec.inputs[k], &env)?;
                        self.loadf(v, &at)?
                    }
                };
                let x = self.b.op(&format!("vector.broadcast {x} : f32 to {vty}"));
                for (i, r) in rows.iter().enumerate() {
                    let acc = &accs[i * pass + c];
                    let p = self.b.op(&format!("arith.mulf {x}, {r} fastmath<contract> : {vty}"));
                    nexts[i * pass + c] = self.b.op(&format!("arith.addf {acc}, {p} fastmath<contract> : {vty}"));
                }
            }
            // The next block's rows of the large operand, a line per step.
            if first == 0 {
                self.prefetch_next_k(j, t, &mut env, (start, &d), n as i64)?;
            }
            self.b.close_for_typed(&nexts, &vty);
            for (i, r) in res.iter_mut().enumerate() {
                r.extend(sums[i * pass..(i + 1) * pass].iter().cloned());
            }
        }
        Ok(res)
    }
}

impl Kc<'_> {
    /// The 16 accumulators of [`Kc::lanes_tile`] with pairs (see
    /// [`RowsInLanes::pairs`]): each step of the sum loads the tile's rows'
    /// pairs as one vector and, for each of the 16 outputs, the pair of
    /// the large operand's row in place, broadcast, into one `vdpbf16ps`;
    /// the next block's rows prefetched a line per step.
    fn pair_sums(
        &mut self,
        j: usize,
        t: &RowsInLanes,
        idx: &[String],
        (ti, start): (&str, &str),
        slot: &str,
    ) -> Result<Vec<String>, LowerError> {
        let n = CPU_SIMD;
        let vty = format!("vector<{n}xf32>");
        let (v, k) = t.large;
        let Some(b) = self.stored(v) else { return Err(self.unsupported(j, "a paired operand that is not stored")) };
        let zl = *t.spec.output.last().ok_or_else(|| self.unsupported(j, "an einsum without outputs"))?;
        let lanes = self.b.index(n as i64);
        let half = self.b.index(t.sum.1 / 2);
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let one = self.b.index(1);
        let (res, d2, accs) = self.b.open_for_typed(&half, &one, &vec![zero; n], &vty);
        let base = self.b.muli(ti, &half);
        let base = self.b.addi(&base, &d2);
        let base = self.b.muli(&base, &lanes);
        let p = self.b.element_ptr(slot, &base, "i32");
        let words = self.b.op(&format!("llvm.load {p} {{alignment = 4 : i64}} : !llvm.ptr -> vector<{n}xi32>"));
        let rows = self.b.op(&format!("llvm.bitcast {words} : vector<{n}xi32> to vector<32xbf16>"));
        let two = self.b.index(2);
        let d = self.b.muli(&d2, &two);
        let mut env: Vec<(char, String)> = t.spec.output.iter().copied().zip(idx.iter().cloned()).collect();
        env.push((t.sum.0, d));
        let mut nexts = Vec::with_capacity(n);
        for (c, acc) in accs.iter().enumerate() {
            let off = self.b.index(c as i64);
            let z = self.b.addi(start, &off);
            set(&mut env, zl, &z);
            let at = self.operand_index(j, &t.spec.inputs[k], &env)?;
            let (ptr, off) = self.buffer_offset(b, &at)?;
            let kpair = self.splat_bf16_pair(&ptr, &off, 4);
            nexts.push(self.dot_bf16(acc, &rows, &kpair));
        }
        // The next block's rows, a line (32 elements) per step.
        self.prefetch_next_k(j, t, &mut env, (start, &d2), PAIR_LINE)?;
        self.b.close_for_typed(&nexts, &vty);
        Ok(res)
    }

    /// Prefetches, at step `step` of a tile's sum over the block of 16
    /// outputs from `start`, one stretch of `per_line` elements of the
    /// next block's rows of the large operand (if stored): row
    /// `step / (len / per_line)` of that block, the rows' stretches in
    /// order, so the sum's steps cover the whole block. `env` binds the
    /// output's letters (its last and the summed one are set here).
    fn prefetch_next_k(
        &mut self,
        j: usize,
        t: &RowsInLanes,
        env: &mut [(char, String)],
        (start, step): (&str, &str),
        per_line: i64,
    ) -> Result<(), LowerError> {
        let (v, k) = t.large;
        let Some(b) = self.stored(v) else { return Ok(()) };
        let zl = *t.spec.output.last().ok_or_else(|| self.unsupported(j, "an einsum without outputs"))?;
        let per_row = self.b.index(t.sum.1 / per_line);
        let ahead = self.b.op(&format!("arith.divui {step}, {per_row} : index"));
        let z = self.b.addi(start, &ahead);
        let next = self.b.index(BLOCK as i64);
        let z = self.b.addi(&z, &next);
        let col = self.b.op(&format!("arith.remui {step}, {per_row} : index"));
        let width = self.b.index(per_line);
        let col = self.b.muli(&col, &width);
        set(env, zl, &z);
        set(env, t.sum.0, &col);
        let at = self.operand_index(j, &t.spec.inputs[k], env)?;
        self.prefetch_buffer(b, &at)
    }

    /// The 32 bits of the bf16 pair (`x0`, `x1`), f32 values that bf16
    /// holds exactly: `x0` in the low half, the first element in memory.
    fn bf16_pair(&mut self, x0: &str, x1: &str) -> String {
        let half = |kc: &mut Self, x: &str| {
            let bits = kc.b.bf16_bits(x, None);
            kc.b.op(&format!("arith.extui {bits} : i16 to i32"))
        };
        let (lo, hi) = (half(self, x0), half(self, x1));
        let sixteen = self.b.hoist("arith.constant 16 : i32");
        let hi = self.b.op(&format!("arith.shli {hi}, {sixteen} : i32"));
        self.b.op(&format!("arith.ori {lo}, {hi} : i32"))
    }
}

/// One turn of an item of the walk with rows in the lanes: the output
/// index of its other kept axes (`idx`), the reuse axes and their sizes,
/// its first row, its rows (`here`), their whole tiles and the slot they
/// are packed in.
struct Item<'a> {
    idx: &'a [String],
    reuse: &'a [usize],
    sizes: &'a [String],
    first: &'a str,
    here: &'a str,
    tiles: &'a str,
    slot: &'a str,
    /// A turn holds two tiles or more, summed two at a time.
    paired: bool,
}

/// Binds `letter` to `value` in `env`.
fn set(env: &mut [(char, String)], letter: char, value: &str) {
    if let Some((_, v)) = env.iter_mut().find(|(l, _)| *l == letter) {
        *v = value.to_owned();
    }
}

#[cfg(test)]
mod tests {
    use crate::lower::emit::testing::{check_output, cpu_step, point};

    /// Multi-head (`bhk,hmk->bhm`) and grouped-query (`bgpk,gmk->bgpm`:
    /// the rows are the samples × the group's heads) context scores, f32,
    /// bf16 (both; on a CPU with AVX512-BF16, whether or not it prefers
    /// it, the rows packed in pairs and
    /// summed with K's pairs by `vdpbf16ps`, elsewhere K widened a block at
    /// a time) and f16 (widened), the scores rounded once at the store: the
    /// module packs rows into a stack slot (in wide tiles of f32 lanes by
    /// 16 × 16 transposes of the rows read as vectors) and transposes
    /// in registers, wide tiles without pairs summing two tiles of rows at
    /// a time (heads up to 128: f16's case has one), and matches the
    /// interpreter with fewer than 16 rows (the reuse tile), exactly 16
    /// (one tile alone), a tile and a remainder, two tiles and more, rows
    /// over more than one packing turn (32 rows a turn of a 64- or
    /// 128-wide head, 16 of a 256-wide one), an empty context, blocks cut short and more than one
    /// item along the context (1024 outputs an item). Rows stored past the
    /// caches where they start a whole vector's bytes apart (m a multiple
    /// of 16: 16, 1040, 2048 and the 256-wide head's 3 × 16), plain
    /// elsewhere, and the kernel ends with a fence; at other m an item's
    /// blocks start on its first row's lines, its first and last outputs
    /// stored from masked tiles (m = 20: both tiles and no whole block;
    /// 37, 2100: both and whole blocks; 1029: an item narrower than a
    /// block).
    #[test]
    fn rows_in_lanes_match_interpreter() {
        let cases = [
            ("bhk,hmk->bhm", serde_json::json!(["b", "h", "k"]), serde_json::json!({"h": 2, "k": 64}), "f32"),
            ("bhk,hmk->bhm", serde_json::json!(["b", "h", "k"]), serde_json::json!({"h": 2, "k": 64}), "bf16"),
            (
                "bgpk,gmk->bgpm",
                serde_json::json!(["b", "g", "p", "k"]),
                serde_json::json!({"g": 2, "p": 3, "k": 32}),
                "f32",
            ),
            (
                "bgpk,gmk->bgpm",
                serde_json::json!(["b", "g", "p", "k"]),
                serde_json::json!({"g": 2, "p": 3, "k": 32}),
                "f16",
            ),
            (
                "bgpk,gmk->bgpm",
                serde_json::json!(["b", "g", "p", "k"]),
                serde_json::json!({"g": 2, "p": 3, "k": 32}),
                "bf16",
            ),
            ("bhk,hmk->bhm", serde_json::json!(["b", "h", "k"]), serde_json::json!({"h": 1, "k": 256}), "f32"),
            ("bhk,hmk->bhm", serde_json::json!(["b", "h", "k"]), serde_json::json!({"h": 2, "k": 128}), "f16"),
            // Multi-query: the one KV head a summed letter of size 1.
            ("bhk,cmk->bhm", serde_json::json!(["b", "h", "k"]), serde_json::json!({"h": 3, "c": 1, "k": 64}), "f32"),
            ("bhk,cmk->bhm", serde_json::json!(["b", "h", "k"]), serde_json::json!({"h": 3, "c": 1, "k": 64}), "bf16"),
        ];
        for (spec, q_shape, constants, dtype) in cases {
            // K's axes, each named by its letter.
            let heads: Vec<String> =
                spec.split([',', '-']).nth(1).unwrap_or_default().chars().map(String::from).collect();
            let (graph, step, text) = cpu_step(&serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": constants},
                "inputs": [
                    {"name": "q", "role": "activation", "shape": q_shape, "dtype": dtype},
                    {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": heads, "dtype": dtype}
                ],
                "nodes": [{"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": spec}}],
                "outputs": [{"name": "s", "node": "s"}]
            }));
            // bf16 on a CPU with AVX512-BF16 (`cpu_step` uses it wherever
            // the host has it): rows packed in pairs, K read
            // in place by `vdpbf16ps`.
            let pairs = dtype == "bf16" && crate::lower::emit::host_has_bf16_dot();
            let slots = if dtype == "f32" || pairs { 1 } else { 2 };
            assert_eq!(text.matches("llvm.alloca").count(), slots, "{spec} {dtype}: packed rows (and K):\n{text}");
            assert_eq!(text.contains("dpbf16ps"), pairs, "{spec} {dtype}: bf16 pairs summed by vdpbf16ps:\n{text}");
            // The 16 x 16 transpose's last stage: 128-bit groups 1, 3 of
            // each vector.
            let groups_hi = "[4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]";
            let transposes = text.matches(groups_hi).count();
            assert!(transposes >= 16, "{spec}: a transpose in registers:\n{text}");
            // Wide tiles of f32 lanes also pack the rows so: a square of 16
            // group shuffles each 16 of the head, besides the accumulators'
            // (three tiles at least: whole blocks and the two masked edges).
            let narrow = crate::lower::emit::narrow_tiles_choice().unwrap_or(true);
            if !narrow && !pairs {
                let k = constants["k"].as_u64().unwrap_or(0) as usize;
                assert!(transposes >= k + 3 * 16, "{spec} {dtype}: rows packed by squares ({transposes}):\n{text}");
            }
            // Wide tiles (`cpu_step`'s) without pairs sum two tiles of rows at a time, 8
            // outputs a pass, each broadcast element of K feeding both
            // (where two tiles' rows fit twice the packing slot: heads up
            // to 128).
            let k = constants["k"].as_u64().unwrap_or(0);
            let tile = format!("-> ({}) {{", ["vector<16xf32>"; 16].join(", "));
            let two_tiles =
                text.split(&tile).skip(1).map(|s| s.split("scf.yield").next().unwrap_or("")).any(|body| {
                    body.matches("vector.broadcast").count() == 8 && body.matches("arith.mulf").count() == 16
                });
            assert_eq!(two_tiles, !pairs && k <= 128, "{spec} {dtype}: two tiles at a time:\n{text}");
            // f32: each row's 16 outputs are a line, stored past the caches
            // (then a fence); bf16: half a line, stored plainly (streamed
            // alone, it would write a partial line to memory).
            let streamed = dtype == "f32";
            assert!(text.contains("llvm.intr.masked.store"), "{spec} {dtype}: masked edge tiles:\n{text}");
            assert_eq!(
                text.contains("nontemporal}") && text.contains("llvm.fence seq_cst"),
                streamed,
                "{spec} {dtype}: rows stored past the caches (f32 only), then a fence:\n{text}"
            );
            let points: &[(i64, i64)] = if constants["k"] == 256 {
                &[(70, 40), (64, 17), (16, 3), (17, 48)]
            } else {
                &[
                    (1, 37),
                    (15, 16),
                    (16, 16),
                    (17, 37),
                    (33, 0),
                    (40, 1029),
                    (16, 2100),
                    (6, 20),
                    (40, 1040),
                    (33, 2048),
                ]
            };
            // The step stores q and K as bf16 / f16, the interpreter reads
            // the f32 values: each of k = 64 products is off by up to 2^-8
            // of itself, tens of thousands of outputs at 40 x 1029.
            let tol = if dtype == "f32" { (1e-5, 1e-5) } else { (5e-2, 1e-2) };
            for &(b, m) in points {
                check_output(&graph, &step, &point(&[("b", b), ("m", m)]), 7, "s", tol);
            }
        }
    }
}
