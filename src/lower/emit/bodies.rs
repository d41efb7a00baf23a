//! The bodies of kernels by how they walk their output (see `walk.rs`):
//! a split reduction's `combine`, a row kernel's lanes, a contraction's
//! reuse tiles, a cooperative contraction, one output per item. Each emits
//! its body into the kernel's builder and returns the kernel's item count
//! (the GPU's guard); `kernel_fn` (mod.rs) picks one and wraps it in the
//! function.

use crate::ir::{shape::numel, DType, Poly};
use crate::lower::plan::Kernel;
use crate::lower::LowerError;

use super::chunks::{SumPart, NARROW_SUM_CHUNK_BYTES, SUM_CHUNK_BYTES};
use super::panel_ahead::LinesAhead;
use super::registers::{NARROW_SUM_COLS, NARROW_SUM_ROWS, NARROW_VECTOR_ROWS};
use super::{
    builder, mismatch, walk_index, walk_index_within, Emulation, Kc, Lanes, Target, BLOCK, CPU_COLS, CPU_SIMD,
    SUM_COLS, SUM_READ_AHEAD, SUM_ROWS, SUM_WRITE_AHEAD, VECTOR_GROUPS,
};

/// What a kernel body writes, and where it runs.
pub(super) struct Out<'k> {
    pub kernel: &'k Kernel,
    pub target: Target,
    pub emulation: Option<Emulation>,
    /// The item: the loop index `%i` (CPU) or the thread's (GPU).
    pub flat: String,
    /// The output buffer: shape, sizes, pointer, element type.
    pub shape: Vec<Poly>,
    pub sizes: Vec<String>,
    pub ptr: String,
    pub dtype: DType,
}

/// Vectors of `lanes` along an axis of size `n` (known) that one step
/// computes: the most, up to VECTOR_GROUPS, that divide it (1 when the
/// size is not known).
pub(super) fn vector_groups(n: Option<i64>, lanes: usize) -> usize {
    let n = n.unwrap_or(0);
    (1..=VECTOR_GROUPS).rev().find(|g| n % (lanes * g) as i64 == 0).unwrap_or(1)
}

/// The rows of a [`Kc::reuse_body`] step's tile along the reuse axes.
#[derive(Clone, Copy)]
enum Rows {
    /// All `tile` rows, unrolled (every one inside the reuse extent).
    Tile,
    /// A loop over the rows left in the reuse extent (fewer than `tile`).
    Loop,
    /// The tile's first row only (the one left in the reuse extent).
    One,
    /// The tile's first `n` rows, unrolled (exactly `n` left in the reuse
    /// extent, `1 < n < tile`): a narrow tile's last (see
    /// `emit::registers`).
    Short(usize),
}

impl Rows {
    /// The rows a [`Rows::Tile`] (of `tile`) or [`Rows::Short`] unrolls.
    fn unrolled(self, tile: usize) -> usize {
        match self {
            Rows::Short(n) => n,
            _ => tile,
        }
    }
}

/// The walk of a [`Kc::reuse_body`] step (see there).
struct Tiled<'a> {
    keep: &'a [usize],
    reuse: &'a [usize],
    keep_sizes: &'a [String],
    reuse_sizes: &'a [String],
    /// The reuse extent.
    inner: &'a str,
    tile: usize,
    /// The kept axis walked in blocks of BLOCK (CPU).
    block: Option<usize>,
    /// The block's outputs as one vector (see `Kc::out_lanes`).
    vector: Option<usize>,
    /// Vector blocks per step.
    groups: usize,
    /// The sum runs in explicit vectors (see `summed` in `reuse_body`).
    summed: bool,
    /// Every block is whole (see `whole` in `reuse_body`).
    whole: bool,
    /// Tiles along the reuse extent, and this step's.
    tiles: &'a str,
    tile_index: &'a str,
    /// With narrow tiles, the whole tiles along the reuse extent (hoisted:
    /// they share the next lines by a shift, `Kc::lines_ahead_shifted`).
    whole_tiles: Option<String>,
    /// The weight whose next block a whole tile prefetches, and its row
    /// length (a long sum in vectors: `Kc::block_operand`).
    next_block: Option<(usize, String)>,
    /// A weight kept in panels whose next panel a whole tile of vectors
    /// prefetches (`Kc::panel_operand`: its buffer, the output axis of
    /// its panels, the summed letter).
    next_panel: Option<(usize, usize, char)>,
    /// The chunk of the sum this step runs and the chunk's length (see
    /// `Kc::sum_chunk`).
    chunk: Option<(&'a str, i64)>,
}

/// How [`Kc::store_tile`] computes and stores a register tile.
#[derive(Clone, Copy)]
pub(super) enum Values {
    /// One output per index.
    Scalars,
    /// A vector of this many outputs from each index (`Kc::out_lanes`).
    Vectors(usize),
    /// A vector per row of `cols` consecutive indices (`Kc::einsum_rows`),
    /// prefetching ahead along the rows (`ahead`: a whole tile's rows,
    /// which reuse each loaded line; a short tile's rows stream the
    /// operand in order, where prefetches only cost instructions).
    Rows { cols: usize, ahead: bool },
}

impl Kc<'_> {
    /// A split reduction's partial sums (its one input, `[S, ...out]`),
    /// added in order of the split: one output per item.
    pub(super) fn combine_body(&mut self, out: &Out, opened: &mut usize) -> Result<String, LowerError> {
        let ws = match out.kernel.reads.as_slice() {
            [ws] => *ws,
            _ => return Err(mismatch(&out.kernel.name, "a combine kernel reads one workspace".to_string())),
        };
        let splits = self.program.buffers[ws].shape.first().and_then(Poly::as_constant).unwrap_or(0);
        let ws_ptr = self.ptr(ws)?;
        let idx = walk_index(self, out.target, &out.flat, &out.sizes, false, opened);
        let off = if out.target == Target::Cpu { self.b.linearize(&idx, &out.sizes) } else { out.flat.clone() };
        let count = self.b.size(&out.kernel.extent)?;
        let mut total: Option<String> = None;
        for s in 0..splits {
            let at = if s == 0 {
                off.clone()
            } else {
                let sc = self.b.index(s);
                let base = self.b.muli(&count, &sc);
                self.b.addi(&base, &off)
            };
            let v = self.b.load(&ws_ptr, &at, DType::F32).ssa;
            total = Some(self.b.add_in_order(total, v));
        }
        let total = total.ok_or_else(|| mismatch(&out.kernel.name, "a workspace of no partial sums".to_string()))?;
        self.b.store(&out.ptr, &off, out.dtype, builder::Val::f32(total));
        self.b.size(&out.kernel.extent)
    }

    /// A row kernel (softmax, a norm) along `axis`: one iteration (CPU) or
    /// block (GPU) per row, the same body on both targets.
    pub(super) fn row_body(
        &mut self,
        out: &Out,
        j: usize,
        axis: usize,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        let mut outer_shape = out.shape.clone();
        outer_shape.remove(axis);
        let lanes = numel(&self.graph.dims, &outer_shape)
            .map_err(|message| LowerError::Size { what: format!("lanes of `{}`", out.kernel.name), message })?;
        if !self.graph.dims.same(&lanes, &out.kernel.extent) {
            return Err(mismatch(
                &out.kernel.name,
                format!("row kernel has extent `{}`, not its {lanes} lanes", out.kernel.extent),
            ));
        }
        let mut outer = out.sizes.clone();
        outer.remove(axis);
        self.lanes = match (out.target, out.emulation) {
            (Target::Gpu, _) => Lanes::Block,
            (Target::Cpu, Some(e)) => Lanes::Emulated(e.lanes.max(1)),
            (Target::Cpu, None) => Lanes::Whole,
        };
        let mut idx = walk_index(self, out.target, &out.flat, &outer, true, opened);
        idx.insert(axis, self.b.index(0));
        self.row_lane(j, &idx, &out.sizes, &out.ptr, out.dtype)?;
        self.b.size(&lanes)
    }

    /// The number of outputs along `axes` of `out` (hoisted).
    pub(super) fn extent_of(&mut self, out: &Out, axes: &[usize]) -> Result<String, LowerError> {
        let shape: Vec<Poly> = axes.iter().map(|&a| out.shape[a].clone()).collect();
        let p = numel(&self.graph.dims, &shape)
            .map_err(|message| LowerError::Size { what: format!("kernel `{}`", out.kernel.name), message })?;
        self.b.size(&p)
    }

    /// A contraction whose outputs along the `reuse` axes share the
    /// operand along the `keep` ones: `tile` outputs along `reuse` per item.
    pub(super) fn reuse_body(
        &mut self,
        out: &Out,
        j: usize,
        (keep, reuse, tile): (Vec<usize>, Vec<usize>, usize),
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        let pick = |axes: &[usize]| -> Vec<Poly> { axes.iter().map(|&a| out.shape[a].clone()).collect() };
        let (keep_sizes, reuse_sizes) = (self.sizes(&pick(&keep))?, self.sizes(&pick(&reuse))?);
        let (outer, inner) = (self.extent_of(out, &keep)?, self.extent_of(out, &reuse)?);
        // CPU: the innermost kept axis of size other than 1 is walked in
        // blocks of BLOCK, the reuse tiles inside a block, the block's
        // elements innermost: a tile's stores then fill whole cache
        // lines, and the block's slice of the large operand stays in L1
        // across the tiles (without blocking, consecutive stores are a
        // reuse stride apart: cache-set conflicts).
        let block = match out.target {
            Target::Cpu if tile > 1 => keep_sizes.iter().rposition(|s| self.b.known(s) != Some(1)),
            _ => None,
        };
        // A block along the output's last axis whose outputs are one
        // vector (see `Kc::out_lanes`): no loop over its elements; and up
        // to VECTOR_GROUPS such blocks at once when they divide the axis
        // (each step of the sum then reads one stretch of a row of the
        // operand for all of them: a 64-wide head of V once, not once per
        // 16), with fewer rows in the tile to keep 16 accumulators.
        let vector = block
            .filter(|&pos| keep[pos] + 1 == out.sizes.len() && BLOCK == CPU_SIMD)
            .and_then(|pos| self.out_lanes(j, self.b.known(&keep_sizes[pos]), out.dtype.is_float()));
        // Narrow tiles (`emit::registers`): one vector, NARROW_VECTOR_ROWS
        // rows.
        let groups = match (vector, block) {
            (Some(_), Some(_)) if self.narrow => 1,
            (Some(_), Some(pos)) => vector_groups(self.b.known(&keep_sizes[pos]), BLOCK),
            _ => 1,
        };
        // A sum in explicit vectors (q·K: the head dim innermost in both
        // operands) with a block along the output's last axis: a tile of
        // SUM_ROWS rows × SUM_COLS consecutive outputs of a whole block
        // (16 vector accumulators; each load of either operand feeds
        // several FMAs), the sums added in one tree (`Kc::lane_tree`), and
        // each row's outputs stored together. One output at a time, a
        // tile's rows' stores land a reuse stride apart, in one cache set.
        let summed = match (block, vector) {
            (Some(pos), None) if keep[pos] + 1 == out.sizes.len() => self.vector_sum(j).filter(|s| s.letters == 1),
            _ => None,
        };
        // Tiles along the reuse index: `tiles = ceil(inner / tile)`.
        // Narrow tiles (`emit::registers`) of sums in vectors:
        // NARROW_SUM_ROWS × NARROW_SUM_COLS.
        let (sum_rows, sum_cols) = if self.narrow { (NARROW_SUM_ROWS, NARROW_SUM_COLS) } else { (SUM_ROWS, SUM_COLS) };
        let tile = if summed.is_some() {
            tile.min(sum_rows)
        } else if vector.is_some() && self.narrow {
            tile.min(NARROW_VECTOR_ROWS)
        } else if groups > 1 {
            tile.min(CPU_SIMD / groups)
        } else {
            tile
        }
        .max(1);
        let tiles = if tile == 1 { inner.clone() } else { self.ceil_div(&inner, tile as i64) };
        let mut walk_sizes = keep_sizes.clone();
        if let Some(pos) = block {
            // A constant when the axis is (one block of a 64-wide head: no
            // loop, so the walk's split into parts goes to the loops that
            // have iterations to share, as multi-query attention's tiles).
            let step = (BLOCK * groups) as i64;
            walk_sizes[pos] = match self.b.known(&keep_sizes[pos]) {
                Some(n) => self.b.index(crate::lower::ceil_div(n, step)),
                None => self.ceil_div(&keep_sizes[pos], step),
            };
        }
        // A sum over a long strided operand in chunks, the chunks walked
        // inside the kept axes and outside the tiles (`emit::chunks`),
        // never split into parts: only when a kept axis is there to split
        // (multi-query attention's one head keeps one pass, on all cores).
        // Narrow tiles (one vector of 16 outputs: a 16-wide stripe of the
        // strided rows) walk the chunks outside the blocks of a whole row
        // too (its size known), so that a chunk's rows and the other
        // operand's stay in L2 while every block's tiles read them (with
        // the blocks outside, each block read the other operand's rows
        // again: the context w·V's probabilities 4 times a 64-wide head).
        let outside = block.filter(|_| self.narrow && groups == 1).and_then(|pos| {
            let n = self.b.known(&keep_sizes[pos])?;
            (n % BLOCK as i64 == 0).then_some((pos, n as usize))
        });
        let split = walk_sizes
            .iter()
            .enumerate()
            .any(|(a, s)| outside.is_none_or(|(pos, _)| a != pos) && self.b.known(s) != Some(1));
        let chunk = match vector {
            Some(_) if tile > 1 && split && out.dtype == DType::F32 => match outside {
                Some((_, n)) => self.sum_chunk(j, (n, NARROW_SUM_CHUNK_BYTES)),
                None => self.sum_chunk(j, (BLOCK * groups, SUM_CHUNK_BYTES)),
            },
            _ => None,
        };
        let moved = chunk.as_ref().and(outside).map(|(pos, _)| pos);
        let moved_size = moved.map(|pos| walk_sizes.remove(pos));
        if let Some((_, chunks)) = &chunk {
            walk_sizes.push(chunks.clone());
        }
        if let Some(m) = &moved_size {
            walk_sizes.push(m.clone());
        }
        walk_sizes.push(tiles.clone());
        let within = if chunk.is_some() { 2 + usize::from(moved.is_some()) } else { 0 };
        let mut at = walk_index_within(self, out.target, &out.flat, (&walk_sizes, within), false, opened);
        let tile_index = at.pop().unwrap_or_default();
        let moved_index = moved.map(|_| at.pop().unwrap_or_default());
        let chunk_index = chunk.as_ref().map(|_| at.pop().unwrap_or_default());
        if let (Some(pos), Some(i)) = (moved, moved_index) {
            at.insert(pos, i);
        }
        // The blocks along the kept axis are all whole (its size a known
        // multiple of BLOCK).
        let whole = block.is_some_and(|pos| self.b.known(&keep_sizes[pos]).is_some_and(|n| n % BLOCK as i64 == 0));
        let next_panel = vector.and_then(|_| self.panel_operand(j));
        let tiled = Tiled {
            keep: &keep,
            reuse: &reuse,
            keep_sizes: &keep_sizes,
            reuse_sizes: &reuse_sizes,
            inner: &inner,
            tile,
            block,
            vector,
            groups,
            summed: summed.is_some(),
            whole,
            tiles: &tiles,
            tile_index: &tile_index,
            whole_tiles: (self.narrow && (next_panel.is_some() || chunk.is_some())).then(|| {
                let rows = self.b.index(tile as i64);
                self.b.hoist(&format!("arith.divui {inner}, {rows} : index"))
            }),
            next_block: if summed.is_some() { self.block_operand(j) } else { None },
            next_panel,
            chunk: chunk.as_ref().zip(chunk_index.as_deref()).map(|((len, _), i)| (i, *len)),
        };
        // A tile whose rows are all inside the reuse extent computes them
        // together, and several outputs of the block with each (a
        // register tile of `tile` × CPU_COLS: each operand load feeds
        // several FMAs) when the block is whole; the last tile, if short
        // (b = 1, 13), loops over its real rows one output at a time
        // instead of redoing work for rows past the end.
        if tile > 1 {
            let cols = match (summed.is_some(), whole && vector.is_none()) {
                (true, _) => sum_cols,
                (false, true) => CPU_COLS,
                (false, false) => 1,
            };
            let t = self.b.index(tile as i64);
            let base = self.b.muli(&tile_index, &t);
            let end = self.b.addi(&base, &t);
            let full = self.b.op(&format!("arith.cmpi ule, {end}, {inner} : index"));
            self.b.open_guard(&full);
            self.whole_blocks(out, j, &tiled, &at, (cols, &base, Rows::Tile))?;
            self.b.else_guard();
            // A short tile of one row (b = 1, 9, …) without a loop over
            // its rows: with one, LLVM keeps what does not change along
            // the rows out of it (a weight projection's weight row, through
            // the stack, one at a time from memory: about 3x slower at
            // b = 1); without, only the input row stays and the weight
            // streams. A long sum in vectors (a projection's) computes
            // SUM_COLS outputs of each row at once here too (one output at
            // a time, the one-row projections were 30% slower at b = 1); a
            // short one (q·K) one output at a time (4 at once, q·K at b = 1
            // ran at half the speed: 1.1 -> 2.5 ms timed alone, and the
            // b = 1 step of a model with 128-wide heads 13.5 -> 18 ms).
            //
            // Narrow tiles of a short sum take their rows left as whole
            // tiles do, NARROW_SUM_COLS outputs at once: every row's sums
            // then go through the same tree of lanes, so that equal rows
            // (greedy samples) get equal bits wherever they fall.
            let cols = match summed {
                Some(s) if !s.short() => SUM_COLS,
                Some(_) if self.narrow => sum_cols,
                _ => 1,
            };
            // A narrow tile's rows left, unrolled (one at a time, a row's
            // few accumulators wait on each FMA: b = 32's last 2 of vector
            // tiles of 6, b = 8's of sum tiles of 3).
            let shorts = if self.narrow && (vector.is_some() || summed.is_some()) { 2..tile } else { 0..0 };
            match summed {
                // Wide tiles of a short sum: the rows left after whole
                // tiles take SUM_COLS outputs at once, their sums through
                // the whole tiles' tree of lanes (`Kc::lane_tree`: equal
                // rows, equal bits); with no whole tile before them (b <
                // SUM_ROWS: every row here) one output at a time, as above.
                Some(s) if s.short() && !self.narrow => {
                    let zero = self.b.index(0);
                    let after = self.b.op(&format!("arith.cmpi ugt, {base}, {zero} : index"));
                    self.b.open_guard(&after);
                    self.rows_left(out, j, &tiled, &at, (SUM_COLS, &base, &inner), shorts.clone())?;
                    self.b.else_guard();
                    self.rows_left(out, j, &tiled, &at, (cols, &base, &inner), shorts)?;
                    self.b.close();
                }
                _ => self.rows_left(out, j, &tiled, &at, (cols, &base, &inner), shorts)?,
            }
            self.b.close();
        } else {
            self.reuse_tile(out, j, &tiled, at, (1, &tile_index, Rows::Tile))?;
        }
        if tile == 1 {
            self.b.size(&out.kernel.extent)
        } else {
            Ok(self.b.hoist(&format!("arith.muli {outer}, {tiles} : index")))
        }
    }

    /// The rows of the last tile from `base` to `inner` (fewer than a
    /// tile), `cols` outputs of a block at a time: one row, a narrow
    /// tile's `shorts` (unrolled), or a loop over them.
    fn rows_left(
        &mut self,
        out: &Out,
        j: usize,
        t: &Tiled,
        at: &[String],
        (cols, base, inner): (usize, &str, &str),
        shorts: std::ops::Range<usize>,
    ) -> Result<(), LowerError> {
        let left = self.b.subi(inner, base);
        let one = self.b.index(1);
        let single = self.b.op(&format!("arith.cmpi eq, {left}, {one} : index"));
        self.b.open_guard(&single);
        self.whole_blocks(out, j, t, at, (cols, base, Rows::One))?;
        self.b.else_guard();
        for n in shorts.clone() {
            let rows = self.b.index(n as i64);
            let here = self.b.op(&format!("arith.cmpi eq, {left}, {rows} : index"));
            self.b.open_guard(&here);
            self.whole_blocks(out, j, t, at, (cols, base, Rows::Short(n)))?;
            self.b.else_guard();
        }
        self.whole_blocks(out, j, t, at, (cols, base, Rows::Loop))?;
        for _ in shorts {
            self.b.close();
        }
        self.b.close();
        Ok(())
    }

    /// [`Kc::reuse_tile`] with `cols` outputs of the block at once where
    /// the block is whole: when its size is only known at run time, a
    /// guard, and one output at a time in a block cut short.
    fn whole_blocks(
        &mut self,
        out: &Out,
        j: usize,
        t: &Tiled,
        at: &[String],
        (cols, base, rows): (usize, &str, Rows),
    ) -> Result<(), LowerError> {
        match t.block {
            Some(pos) if cols > 1 && !t.whole => {
                let bn = self.b.index(BLOCK as i64);
                let start = self.b.muli(&at[pos], &bn);
                let stop = self.b.addi(&start, &bn);
                let all = self.b.op(&format!("arith.cmpi ule, {stop}, {} : index", t.keep_sizes[pos]));
                self.b.open_guard(&all);
                self.reuse_tile(out, j, t, at.to_vec(), (cols, base, rows))?;
                self.b.else_guard();
                self.reuse_tile(out, j, t, at.to_vec(), (1, base, rows))?;
                self.b.close();
                Ok(())
            }
            _ => self.reuse_tile(out, j, t, at.to_vec(), (cols, base, rows)),
        }
    }

    /// One step of [`Kc::reuse_body`] at walk index `at`: the block's
    /// outputs (`cols` at a time, a whole block; or its vectors) for the
    /// rows of the tile starting at `base` along the reuse axes (`rows`),
    /// computed and stored.
    fn reuse_tile(
        &mut self,
        out: &Out,
        j: usize,
        t: &Tiled,
        mut at: Vec<String>,
        (cols, base, rows): (usize, &str, Rows),
    ) -> Result<(), LowerError> {
        let mut opened = 0;
        // The panel this step reads, of a weight kept in panels.
        let panel =
            t.next_panel.and_then(|(_, axis, _)| Some(at.get(t.keep.iter().position(|&a| a == axis)?)?.clone()));
        if let Some(pos) = t.block {
            let bn = self.b.index((BLOCK * t.groups) as i64);
            let start = self.b.muli(&at[pos], &bn);
            if t.vector.is_some() {
                at[pos] = start;
            } else if cols > 1 {
                let ub = self.b.index((BLOCK / cols) as i64);
                let inner = self.b.open_loop(&ub);
                opened += 1;
                let c = self.b.index(cols as i64);
                let first = self.b.muli(&inner, &c);
                at[pos] = self.b.addi(&start, &first);
                if let (Some((w, row)), Rows::Tile) = (&t.next_block, rows) {
                    // This step's share of the next block's weight rows.
                    let share = self.b.muli(t.tile_index, &ub);
                    let share = self.b.addi(&share, &inner);
                    let shares = self.b.muli(t.tiles, &ub);
                    let next = self.b.addi(&start, &bn);
                    self.prefetch_next_block(*w, (row, &next), (&share, &shares))?;
                }
            } else {
                let left = self.b.subi(&t.keep_sizes[pos], &start);
                let ub = self.b.op(&format!("arith.minui {left}, {bn} : index"));
                let inner = self.b.open_loop(&ub);
                opened += 1;
                at[pos] = self.b.addi(&start, &inner);
            }
        }
        // The block's outputs this step: its vectors, or `cols` elements.
        let (count, stride) = if t.vector.is_some() { (t.groups, BLOCK) } else { (cols, 1) };
        let cols_at = match t.block {
            Some(pos) => self.spread(&at, pos, count, stride),
            None => vec![at],
        };
        let starts: Vec<String> = match rows {
            Rows::Loop => {
                let n = self.b.index(t.tile as i64);
                let left = self.b.subi(t.inner, base);
                let ub = self.b.op(&format!("arith.minui {left}, {n} : index"));
                let r = self.b.open_loop(&ub);
                opened += 1;
                vec![self.b.addi(base, &r)]
            }
            Rows::One => vec![base.to_owned()],
            // Every row of the tile is inside the reuse extent (the
            // caller's guard): no clamps, no guards.
            Rows::Tile | Rows::Short(_) => (0..rows.unrolled(t.tile))
                .map(|r| {
                    if r == 0 {
                        base.to_owned()
                    } else {
                        let off = self.b.index(r as i64);
                        self.b.addi(base, &off)
                    }
                })
                .collect(),
        };
        let mut idxs = Vec::with_capacity(starts.len() * cols_at.len());
        for row in &starts {
            let inner_idx = self.b.delinearize(row, t.reuse_sizes);
            for at in &cols_at {
                let mut idx = vec![String::new(); out.sizes.len()];
                for (a, v) in t.keep.iter().zip(at).chain(t.reuse.iter().zip(&inner_idx)) {
                    idx[*a] = v.clone();
                }
                idxs.push(idx);
            }
        }
        let values = match (t.vector, t.summed && cols > 1) {
            (Some(lanes), _) => Values::Vectors(lanes),
            (None, true) => Values::Rows { cols, ahead: matches!(rows, Rows::Tile) },
            (None, false) => Values::Scalars,
        };
        // A chunked sum's chunk; the next block of rows a whole tile
        // prefetches: the next panel, or the next chunk.
        let part = match (t.chunk, values) {
            (Some((index, len)), Values::Vectors(lanes)) => {
                Some((self.chunk_start(out, (index, len), &idxs, lanes), len))
            }
            _ => None,
        };
        let shares = (t.tile_index, t.tiles);
        // Narrow tiles prefetch the next stripe of 16 columns, wide ones
        // the next chunk of a chunked sum (a projection's from f32
        // panels too, `emit::chunks`), else the next panel
        // (`emit::panel_ahead`).
        let whole = t.whole_tiles.as_deref();
        let ahead = match (t.next_panel, rows, panel, &part, idxs.first()) {
            (Some((buf, _, k)), Rows::Tile, Some(panel), _, Some(idx)) if self.narrow => {
                match (t.block.and_then(|pos| idx.get(*t.keep.get(pos)?)), whole) {
                    (Some(z0), Some(whole)) => self.stripe_ahead((buf, k), (&panel, z0), (t.tile_index, whole))?,
                    _ => None,
                }
            }
            (_, Rows::Tile, _, Some((p, len)), Some(idx)) => {
                self.chunk_ahead(j, (idx, p, *len), BLOCK * t.groups, (shares, whole))?
            }
            (Some((buf, _, k)), Rows::Tile, Some(panel), _, _) => Some(self.panel_ahead((buf, k), &panel, shares)?),
            _ => None,
        };
        let part = part.map(|(p, _)| p);
        self.store_tile(out, j, values, &idxs, (ahead.as_ref(), part.as_ref()))?;
        for _ in 0..opened {
            self.b.close();
        }
        Ok(())
    }

    /// `count` copies of index `at`, entry `axis` advanced by `stride`
    /// from one to the next (the outputs one step computes along it).
    pub(super) fn spread(&mut self, at: &[String], axis: usize, count: usize, stride: usize) -> Vec<Vec<String>> {
        (0..count.max(1))
            .map(|c| {
                let mut a = at.to_vec();
                if c > 0 {
                    let o = self.b.index((c * stride) as i64);
                    a[axis] = self.b.addi(&at[axis], &o);
                }
                a
            })
            .collect()
    }

    /// Node `j` at every index of `idxs` (one register tile), stored: as
    /// scalars, one vector of outputs from each index (`Vectors`), or one
    /// vector per row of `n` consecutive indices (`Rows`).
    pub(super) fn store_tile(
        &mut self,
        out: &Out,
        j: usize,
        values: Values,
        idxs: &[Vec<String>],
        (ahead, part): (Option<&LinesAhead>, Option<&SumPart>),
    ) -> Result<(), LowerError> {
        let (computed, lanes, at): (Vec<builder::Val>, usize, Vec<&Vec<String>>) = match values {
            Values::Scalars => (self.compute_tile(j, idxs)?, 1, idxs.iter().collect()),
            Values::Vectors(lanes) => {
                let v = self.einsum_out_vec(j, idxs, lanes, (ahead, part))?;
                (v.into_iter().map(builder::Val::f32).collect(), lanes, idxs.iter().collect())
            }
            Values::Rows { cols, ahead } => {
                let v = self.einsum_rows(j, idxs, cols, ahead.then_some(SUM_READ_AHEAD))?;
                (v.into_iter().map(builder::Val::f32).collect(), cols, idxs.iter().step_by(cols).collect())
            }
        };
        for (idx, v) in at.into_iter().zip(computed) {
            let off = self.b.linearize(idx, &out.sizes);
            if lanes > 1 {
                self.b.store_vector(&out.ptr, &off, &v.ssa, lanes, out.dtype);
            } else {
                self.b.store(&out.ptr, &off, out.dtype, v);
            }
            if let Values::Rows { ahead: true, .. } = values {
                let step = self.b.index(SUM_WRITE_AHEAD as i64);
                let later = self.b.addi(&off, &step);
                self.b.prefetch(&out.ptr, &later, out.dtype, true);
            }
        }
        Ok(())
    }

    /// A cooperative contraction: one block or warp per index of the `keep`
    /// axes, computing the outputs along the `reuse` axes in turn.
    pub(super) fn cooperative_body(
        &mut self,
        out: &Out,
        j: usize,
        (keep, reuse): (Vec<usize>, Vec<usize>),
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        // GPU: one block (or warp) per index of the kept axes (`out.flat`
        // is the block id, or the warp's index); it computes the
        // outputs along the reuse axes in turn, its threads splitting
        // each one's sum, `gpu.all_reduce` (shuffles) adding the
        // parts, thread (lane) 0 storing it. CPU: the out.emulation of
        // that, one iteration per kept index.
        let gpu = out.target == Target::Gpu;
        self.lanes = match (gpu, out.kernel.warp) {
            (true, false) => Lanes::Block,
            (true, true) => Lanes::Warp,
            (false, _) => Lanes::Emulated(out.emulation.map_or(1, |e| e.lanes.max(1))),
        };
        let pick = |axes: &[usize]| -> Vec<String> { axes.iter().map(|&a| out.sizes[a].clone()).collect() };
        let (keep_sizes, reuse_sizes) = (pick(&keep), pick(&reuse));
        let at = walk_index(self, out.target, &out.flat, &keep_sizes, false, opened);
        let mut count = self.b.index(1);
        for s in &reuse_sizes {
            count = self.b.muli(&count, s);
        }
        let r = self.b.open_loop(&count);
        *opened += 1;
        let inner = self.b.delinearize(&r, &reuse_sizes);
        let mut idx = vec![String::new(); out.sizes.len()];
        for (a, v) in keep.iter().zip(&at).chain(reuse.iter().zip(&inner)) {
            idx[*a] = v.clone();
        }
        let value = self.compute(j, &idx)?;
        let off = self.b.linearize(&idx, &out.sizes);
        if gpu {
            let c0 = self.b.index(0);
            let thread = if out.kernel.warp { "%lane" } else { "%tid" };
            let first = self.b.op(&format!("arith.cmpi eq, {thread}, {c0} : index"));
            self.b.open_guard(&first);
            self.b.store(&out.ptr, &off, out.dtype, value);
            self.b.close();
        } else {
            self.b.store(&out.ptr, &off, out.dtype, value);
        }
        self.b.size(&out.kernel.extent)
    }

    /// One output per item: node `node`'s value, or (`None`) a copy of the
    /// kernel's node.
    pub(super) fn plain_body(
        &mut self,
        out: &Out,
        node: Option<usize>,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        if let Some(j) = node.filter(|&j| self.row_axis(j).is_some()) {
            return Err(self.unsupported(j, "row kernel without a row walk"));
        }
        let idx = walk_index(self, out.target, &out.flat, &out.sizes, false, opened);
        let value = match node {
            Some(j) => self.compute(j, &idx)?,
            None => {
                let v = self
                    .graph
                    .find(&out.kernel.node)
                    .ok_or_else(|| mismatch(&out.kernel.name, format!("copies unknown `{}`", out.kernel.node)))?;
                self.load(v, &idx)?
            }
        };
        let off = if out.target == Target::Cpu { self.b.linearize(&idx, &out.sizes) } else { out.flat.clone() };
        self.b.store(&out.ptr, &off, out.dtype, value);
        self.b.size(&out.kernel.extent)
    }
}

#[cfg(test)]
mod tests {
    use crate::lower::emit::testing::{check_output, cpu_step, point};

    /// A weight projection `x [b, 1, d] @ W[48, d]ᵀ` (a block-whole kept
    /// axis). With d a multiple of the vector lanes, the sum runs in
    /// vectors: a tile of 4 rows inside b computes 4 rows × 4 outputs in
    /// one loop (16 vector accumulators, added in one shuffle tree, each
    /// row's 4 outputs one vector store); with d = 40, in scalars: 8 rows ×
    /// 4 outputs (32 accumulators). A short last tile computes its real
    /// rows one at a time: a single row without a loop over rows, more in
    /// a loop; 4 outputs of the row at once when the sum is long (d = 320,
    /// past a head: 4 vector accumulators), else one (one f32 accumulator).
    /// With d = 320 the whole tiles also prefetch the next block's weight
    /// rows into L2 (the last block's past the weight: harmless).
    /// All against the interpreter, at b on either side of the tiles and not a
    /// multiple of them, with one row left (1, 5, 9, 17) and more.
    #[test]
    fn projection_tiles_rows_and_columns() {
        let cases = [
            (64, 4, "vector<16xf32>", ("f32", 1)),
            (320, 4, "vector<16xf32>", ("vector<16xf32>", 4)),
            (40, 8, "f32", ("f32", 1)),
        ];
        for (d, tile, acc, (short_acc, short_n)) in cases {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": d, "o": 48}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": "f32"},
                    {"name": "w", "role": "weight", "shape": ["o", "d"], "dtype": "f32"}
                ],
                "nodes": [{"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}}],
                "outputs": [{"name": "y", "node": "y"}]
            });
            let (graph, step, text) = cpu_step(&doc);
            let accumulators = |ty: &str, n: usize| format!("-> ({}) {{", vec![ty; n].join(", "));
            let whole = accumulators(acc, tile * 4);
            assert!(text.contains(&whole), "a {tile} x 4 tile, d = {d}:\n{text}");
            assert_eq!(text.contains("vector.shuffle"), d != 40, "a tree of the vector sums, d = {d}:\n{text}");
            if d != 40 {
                assert!(text.contains("vector<4xf32>, !llvm.ptr"), "4 outputs stored at once:\n{text}");
            }
            let next_block = text.contains("hint = 2 : i32");
            assert_eq!(
                next_block,
                d == 320,
                "a long sum's whole tiles prefetch the next block's weights, d = {d}:\n{text}"
            );
            let short = text.split(&whole).nth(1).unwrap_or_default();
            let one = accumulators(short_acc, short_n);
            assert_eq!(short.matches(&one).count(), 2, "one row, and a loop of rows, d = {d}:\n{text}");
            assert!(short.contains("arith.cmpi eq"), "a guard for the one-row tile:\n{text}");
            for b in [1, 3, 4, 5, 8, 9, 13, 16, 17] {
                check_output(&graph, &step, &point(&[("b", b)]), 9, "y", (1e-5, 1e-5));
            }
        }
    }

    /// The context `q·K` of bifurcated attention, `bhk,hmk->bhm` with a
    /// runtime context length: whole blocks of 16 along m in 4 × 4 tiles
    /// (each row's outputs one vector, the 16 sums added in the
    /// lane-local-first tree, the next block's K rows and
    /// outputs prefetched), a block cut short by m one output at a time;
    /// f32 and bf16 (rounded once at the store). Against the interpreter
    /// at m under, at and past a block and b under and past a tile.
    #[test]
    fn context_scores_tile_whole_blocks() {
        for dtype in ["f32", "bf16"] {
            let (graph, step, text) = cpu_step(&serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 32}},
                "inputs": [
                    {"name": "q", "role": "activation", "shape": ["b", "h", "k"], "dtype": dtype},
                    {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["h", "m", "k"], "dtype": dtype}
                ],
                "nodes": [{"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "bhk,hmk->bhm"}}],
                "outputs": [{"name": "s", "node": "s"}]
            }));
            // bf16 is stored as its bits (`emit::round_bf16`).
            let st = if dtype == "f32" { "f32" } else { "i16" };
            for want in [
                format!("vector<4x{st}>, !llvm.ptr"),
                "vector.shuffle".to_string(),
                // The 16-lane tree's first stage: lanes paired within
                // each group of 4 (an unpack), not halves of the vector.
                "[0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29]".to_string(),
                "rw = 0 : i32".to_string(),
                "rw = 1 : i32".to_string(),
            ] {
                assert!(text.contains(&want), "{dtype}: `{want}`:\n{text}");
            }
            let tol = if dtype == "f32" { (1e-5, 1e-5) } else { (2e-2, 1e-2) };
            for (b, m) in [(1, 5), (3, 16), (4, 37), (5, 64), (9, 100), (4, 0)] {
                check_output(&graph, &step, &point(&[("b", b), ("m", m)]), 3, "s", tol);
            }
        }
    }

    /// A contraction over two letters, the inner one in vectors
    /// (`bgk,mgk->bm`): the tile's 8 rows' vector sums are added in one
    /// tree and each lane taken out (no per-output `vector.reduction`).
    #[test]
    fn vector_sums_of_a_tile_add_in_a_tree() {
        let (graph, step, text) = cpu_step(&serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"g": 3, "k": 32}},
            "inputs": [
                {"name": "q", "role": "activation", "shape": ["b", "g", "k"], "dtype": "f32"},
                {"name": "kc", "role": "weight", "shape": ["m", "g", "k"], "dtype": "f32"}
            ],
            "nodes": [{"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "bgk,mgk->bm"}}],
            "outputs": [{"name": "s", "node": "s"}]
        }));
        let tile = text.split(&format!("-> ({}) {{", ["vector<16xf32>"; 8].join(", "))).nth(1);
        let tile = tile.unwrap_or_else(|| panic!("an 8-row tile of vector sums:\n{text}"));
        let tile = tile.split("} else {").next().unwrap_or_default();
        assert!(
            tile.contains("vector.shuffle") && tile.contains("vector.extract ") && !tile.contains("vector.reduction"),
            "the tile's sums in a tree:\n{tile}"
        );
        for (b, m) in [(1, 3), (8, 17), (11, 40)] {
            check_output(&graph, &step, &point(&[("b", b), ("m", m)]), 5, "s", (1e-5, 1e-5));
        }
    }
}
