//! Tensor-core contraction kernels (see [`crate::lower::mma`]).
//!
//! A block of [`WARPS`] warps; block `i` is `(batch, k_split, n_block,
//! m_block)` with the m block fastest (adjacent blocks share B's rows: the weights,
//! the context cache). A warp computes `R × C` output tiles of 16 × 8
//! ([`Mma::rows`], [`Mma::cols`]): tile `(r, c)` at rows `16 r ..`, columns
//! `8 c ..` of the warp's. Per reduction step of 16, each lane loads its
//! fragments of A (16 × 16, row major) for each row tile and of B (16 × 8,
//! one column per lane group) for each column tile, and the warp runs
//! `R × C` `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`, four f32
//! accumulators per lane each (accumulator `4 (r C + c) + i`).
//!
//! - **Split** ([`Mma::split_k`], a long constant reduction): the
//!   block is one warp's tiles (`16 R × 8 C`); warp `w` takes steps
//!   `w, w + WARPS, …`, [`Mma::unroll`] at a time (`s, s + 8, …`: every
//!   load of those first, then their `mma.sync`; a step past the end
//!   re-reads the last one and its result is not kept); the partials meet
//!   in shared memory (lane `l` of warp `w` at `(32 w + l) 4 R C`) and
//!   thread `o` of `0 .. 128 R C` (in turn, 256 at a time) adds output
//!   `o`'s eight partials in warp order and stores it.
//! - **Not split** (a short constant reduction, or one of runtime length):
//!   the block is `16 R × 64 C`, warp `w` computes the tiles at columns
//!   `64 C n_block + 8 C w ..` over the block's part of the reduction (all
//!   of it, or with [`Mma::k_splits`] `S > 1` part `s` of `S`, into slice
//!   `s` of the workspace that a `combine` kernel adds up), [`Mma::unroll`]
//!   iterations at a time, and stores them from its registers.
//!
//! Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane
//! `l`, `g = l / 4`, `t = l % 4`: A element `i` (0..8) at row
//! `g + 8 ((i / 2) % 2)`, column `2 t + i % 2 + 8 (i / 4)`, two per 32-bit
//! register (lower half first); B element `i` (0..4) at row (k)
//! `2 t + i % 2 + 8 (i / 2)`, column `g`; accumulator `i` (0..4) at row
//! `g + 8 (i / 2)`, column `2 t + i % 2`.
//!
//! Rows past m and columns past n read the last valid row / column (in
//! bounds; never stored). A reduction whose length is not a known multiple
//! of 16 (`m_c`) is walked over its `k / 16` whole steps without checks,
//! then over the step it ends inside, if any (the tail: by the warp whose
//! turn it is in a split walk, by the block whose part holds it across
//! blocks), which reads zeros past the end (indices clamped, values
//! selected).
//!
//! **Chunked walk** (a constant reduction, a multiple of [`CHUNK_K`]): one
//! iteration covers 32 reduction elements, two `mma.sync`. Lane `(g, t)`
//! reads elements `32 c + 8 t .. 32 c + 8 t + 8` of each of its rows (A's
//! rows `g`, `g + 8` of each row tile, B's column `g` of each column tile)
//! as four pairs `p = 0..4`: pair `p`
//! fills slots `2 t, 2 t + 1` (`p` even) or `2 t + 8, 2 t + 9` (`p` odd) of
//! step `p / 2`. Slot `κ` of step `s` is then element
//! `32 c + 8 (κ % 8 / 2) + 4 s + 2 (κ / 8) + κ % 2` for A and B alike, a
//! bijection onto the chunk, so the products pair the same elements; only
//! the order of the sum changes. A stored operand whose innermost axis is
//! the reduction gives the eight as one 16-byte load (row starts are
//! multiples of 8 elements; buffers are 16-byte aligned).
//!
//! **Interleaved columns** (a warp of `C > 1` column tiles whose B has n's
//! last axis innermost: V in `w·V`, a weight stored `[k, n]`): column `g`
//! of tile `c` is the warp's column `C g + c`, so lane `(g, t)` reads its
//! `C` columns of each of its reduction indices as one `C`-element load
//! (tile `c`'s register pair of indices `k, k + 1` is element `c` of
//! those two loads), not `C` single elements `8` columns apart; its
//! accumulator `i` of tile `c` is output column `C (2 t + i % 2) + c`.
//!
//! **Staged A** ([`Mma::stages_a`]: not split in-block, walked in steps of
//! 16, i.e. `w·V` over `m_c` or `m_d`): each iteration, between two
//! `gpu.barrier`s, the block's threads store the block's A tile of the
//! iterations loaded together into the workgroup memory `%sa` (see
//! `staging.rs`), and each lane reads its A pairs from there as 32-bit
//! words; B's loads are issued before the first barrier. Every warp takes
//! part (no live-warp guard: a warp past n reads clamped columns and
//! stores nothing).
//!
//! **Staged B** ([`Kc::stages_b`], `--tune stage-b=on`: beside a staged
//! A, two interleaved column tiles a warp, the block's 128 columns within
//! one row of B's last axis: V of `w·V`): between the same barriers the
//! block's threads also store B's rows of the iteration into `%sb`, each
//! row in 16-byte loads (`staging.rs`), and each lane reads its pairs'
//! words from there instead of from global memory.
//!
//! On the CPU, [`super::Emulation`] runs the same blocks, warps, steps and
//! fragment loads with the warp's lanes as loops (`emulate.rs`): each
//! step's fragments are scattered into 16 × 16 and 16 × 8 scratch tiles,
//! each lane's accumulators add their row · column products, and the
//! partials are combined (split) or stored (not split) as on the GPU.

use crate::ir::DType;
use crate::lower::mma::{Mma, CHUNK_K, TILE_K, TILE_N, WARPS};
use crate::lower::LowerError;

mod emulate;
mod fragments;
mod loads;
mod output;
mod staging;

use fragments::{steps, LaneRows, Step};
use loads::Pair;
use staging::Stage;

use super::Kc;

/// Threads of a block (the runtime's launch block).
const THREADS: i64 = 32 * WARPS;

/// Where the tensor-core kernel runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MmaMode {
    /// `nvvm.mma.sync`, partials in the workgroup memory `%sh`.
    Gpu,
    /// Lanes as loops, scratch from `llvm.alloca`.
    Emulated,
}

/// The type of a split kernel's shared partials.
fn shared_ty(mma: &Mma) -> String {
    format!("memref<{}xf32, #gpu.address_space<workgroup>>", mma.partials())
}

/// The type of a staged A tile in shared memory (see "staged A").
fn stage_ty(mma: &Mma) -> String {
    format!("memref<{}xi32, #gpu.address_space<workgroup>>", mma.stage_words())
}

/// The type of a staged B tile in shared memory (see "staged B").
fn stage_b_ty(mma: &Mma) -> String {
    format!("memref<{}xi32, #gpu.address_space<workgroup>>", mma.stage_b_words())
}

/// The GPU kernel's workgroup attribution: a split kernel's partials
/// (`%sh`), or the staged A tile (`%sa`) and, if `stages_b` (see
/// [`Kc::stages_b`]), the staged B tile (`%sb`); none for the others.
pub(crate) fn workgroup(mma: &Mma, stages_b: bool) -> Option<String> {
    if mma.split_k {
        Some(format!("workgroup(%sh : {})", shared_ty(mma)))
    } else if mma.stages_a() && stages_b {
        Some(format!("workgroup(%sa : {}, %sb : {})", stage_ty(mma), stage_b_ty(mma)))
    } else if mma.stages_a() {
        Some(format!("workgroup(%sa : {})", stage_ty(mma)))
    } else {
        None
    }
}

/// `mma.sync` steps of one iteration of the reduction walk.
fn steps_per_iteration(tile: &Tile) -> i64 {
    if tile.chunked {
        CHUNK_K / TILE_K
    } else {
        1
    }
}

/// Per-kernel values of a tensor-core kernel.
struct Tile {
    /// Output sizes, and each group's sizes.
    sizes: Vec<String>,
    m_sizes: Vec<String>,
    n_sizes: Vec<String>,
    m: String,
    n: String,
    k: String,
    /// Whether the reduction may end inside a step: then the walk covers
    /// the `full` steps without checks, and the step it ends inside, if
    /// any, is walked after them with checks (the tail).
    ragged_k: bool,
    /// The walk's end without the tail: `k / 16` steps (ragged), else
    /// `iters`.
    full: String,
    /// This block's part of the walk ([`Mma::k_splits`]): iterations
    /// `lo .. hi`, of which `lo .. main_end` are whole steps (`main_end` =
    /// `min(hi, full)`); `0 .. iters` and `full` unsplit.
    lo: String,
    hi: String,
    main_end: String,
    /// With a split reduction: this block's index among the splits, the
    /// first index of its partial sums in the workspace.
    slice: Option<String>,
    /// Sizes of the buffer stored to: the output, or the workspace
    /// (`[k_splits, ...output]`).
    store_sizes: Vec<String>,
    /// Output axes of each group.
    axes: [Vec<usize>; 3],
    /// This block: batch multi-index, first row, first column.
    batch_idx: Vec<String>,
    m0: String,
    nb0: String,
    /// See [`Mma::split_k`].
    split: bool,
    /// A warp's row and column tiles ([`Mma::rows`], [`Mma::cols`]).
    rows: i64,
    cols: i64,
    /// Whether the reduction is walked in chunks of [`CHUNK_K`] (see the
    /// module doc), else in steps of 16.
    chunked: bool,
    /// Whether B is read a warp's [`Tile::cols`] columns at a time (see
    /// the module doc, "interleaved columns").
    interleaved: bool,
    /// Whether the block stages A in shared memory ([`Mma::stages_a`], the
    /// module doc's "staged A").
    staged: bool,
    /// Whether it stages B too ([`Kc::stages_b`], "staged B").
    staged_b: bool,
    /// Iterations of the reduction walk: chunks or steps.
    iters: String,
    /// Iterations loaded together ([`Mma::unroll`]).
    unroll: i64,
    /// Where the kernel runs.
    mode: MmaMode,
    /// The output buffer and its element type.
    out_ptr: String,
    out_dtype: DType,
}

impl Tile {
    /// Accumulators of a lane: four per tile.
    fn accs(&self) -> i64 {
        4 * self.rows * self.cols
    }
}

impl Kc<'_> {
    /// The body of tensor-core kernel node `j` (see the module doc); `flat`
    /// is the block (GPU: the block id). Returns the number of blocks (the
    /// GPU's guard). On the CPU the loop over blocks is opened here
    /// (counted in `opened`).
    pub(crate) fn mma_kernel(
        &mut self,
        j: usize,
        mma: &Mma,
        flat: &str,
        out: (&str, DType, Vec<String>),
        mode: MmaMode,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        let (out_ptr, out_dtype, store_sizes) = out;
        // A split reduction stores to its workspace `[k_splits, ...output]`.
        let lead = usize::from(mma.k_splits > 1);
        let sizes = store_sizes.get(lead..).map(<[String]>::to_vec).unwrap_or_default();
        if sizes.len() != self.graph.nodes[j].shape.len() || store_sizes.len() != sizes.len() + lead {
            return Err(self.unsupported(j, "tensor-core kernel: output rank"));
        }
        let pick = |axes: &[usize]| -> Vec<String> { axes.iter().map(|&a| sizes[a].clone()).collect() };
        let (batch_sizes, m_sizes, n_sizes) = (pick(&mma.batch), pick(&mma.m), pick(&mma.n));
        let m = self.b.size(&mma.m_size)?;
        let n = self.b.size(&mma.n_size)?;
        let k = self.b.size(&mma.k_size)?;
        let batch = self.b.size(&mma.batch_size)?;
        let mblocks = self.ceil_div(&m, mma.block_m());
        let nblocks = self.ceil_div(&n, mma.block_n());
        let chunked = mma.chunked();
        let iters = self.ceil_div(&k, if chunked { CHUNK_K } else { TILE_K });
        let splits = self.b.index(mma.k_splits);
        let mn = self.b.hoist(&format!("arith.muli {mblocks}, {nblocks} : index"));
        let mns = self.b.hoist(&format!("arith.muli {mn}, {splits} : index"));
        let blocks = self.b.hoist(&format!("arith.muli {mns}, {batch} : index"));
        let flat = match mode {
            MmaMode::Gpu => flat.to_owned(),
            MmaMode::Emulated => {
                *opened += 1;
                self.b.open_loop(&blocks)
            }
        };
        let at = self.b.delinearize(&flat, &[batch.clone(), splits.clone(), nblocks, mblocks]);
        let batch_idx = self.b.delinearize(&at[0], &batch_sizes);
        let (bm, bn) = (self.b.index(mma.block_m()), self.b.index(mma.block_n()));
        let m0 = self.b.muli(&at[3], &bm);
        let nb0 = self.b.muli(&at[2], &bn);
        let ragged_k = mma.k_size.as_constant().is_none_or(|c| c % TILE_K != 0);
        let full = if ragged_k {
            let tk = self.b.index(TILE_K);
            self.b.hoist(&format!("arith.divui {k}, {tk} : index"))
        } else {
            iters.clone()
        };
        let (lo, hi, main_end, slice) = if mma.k_splits > 1 {
            // Block `s` walks `s·per .. min(iters, (s + 1)·per)`.
            let per = self.ceil_div(&iters, mma.k_splits);
            let lo = self.b.muli(&at[1], &per);
            let end = self.b.addi(&lo, &per);
            let hi = self.b.op(&format!("arith.minui {end}, {iters} : index"));
            let main_end = self.b.op(&format!("arith.minui {hi}, {full} : index"));
            (lo, hi, main_end, Some(at[1].clone()))
        } else {
            (self.b.index(0), iters.clone(), full.clone(), None)
        };
        let axes = [mma.batch.clone(), mma.m.clone(), mma.n.clone()];
        let (out_ptr, out_dtype) = (out_ptr.to_owned(), out_dtype);
        let tile = Tile {
            sizes,
            m_sizes,
            n_sizes,
            m,
            n,
            k,
            ragged_k,
            full,
            lo,
            hi,
            main_end,
            slice,
            store_sizes,
            axes,
            batch_idx,
            m0,
            nb0,
            split: mma.split_k,
            rows: mma.rows,
            cols: mma.cols,
            chunked,
            interleaved: self.interleaves(j, mma),
            staged: mma.stages_a(),
            staged_b: self.stages_b(j, mma),
            iters,
            unroll: mma.unroll(),
            mode,
            out_ptr,
            out_dtype,
        };
        match mode {
            MmaMode::Gpu => self.mma_gpu(j, mma, &tile)?,
            MmaMode::Emulated => self.mma_emulated(j, mma, &tile)?,
        }
        Ok(blocks)
    }

    fn mma_gpu(&mut self, j: usize, mma: &Mma, tile: &Tile) -> Result<(), LowerError> {
        let warp = self.b.index(32);
        let w = self.b.op(&format!("arith.divui %tid, {warp} : index"));
        let lane = self.b.op(&format!("arith.remui %tid, {warp} : index"));
        let n0 = self.warp_n0(tile, &w);
        // A warp whose tiles start past n has nothing to do (warp-uniform),
        // unless the block stages A: then it takes its part in staging and
        // its barriers (its columns are clamped into n, its stores
        // guarded).
        let guarded = !tile.split && !tile.staged;
        if guarded {
            let live = self.b.ult(&n0, &tile.n);
            self.b.open_guard(&live);
        }
        let rows = self.lane_rows(tile, &n0, &lane)?;
        let zero = self.b.f32(0.0);
        let (first, step) = self.walk(tile, &w);
        let init = vec![zero; tile.accs() as usize];
        let (mut res, s, accs) = self.b.open_for_typed_from(&first, &tile.main_end, &step, &init, "f32");
        // Every load of the unrolled iterations first, then the mma chain.
        let mut loaded = Vec::new();
        if tile.staged {
            let (sus, keeps): (Vec<String>, Vec<Option<String>>) =
                (0..tile.unroll).map(|u| self.unrolled(tile, &s, u)).unzip();
            let staged = self.staged_steps(j, mma, tile, &rows, (&s, &sus, false))?;
            loaded.extend(staged.into_iter().zip(keeps));
        } else {
            for u in 0..tile.unroll {
                let (su, keep) = self.unrolled(tile, &s, u);
                loaded.push((self.fragments(j, mma, tile, &rows, (&su, false), None)?, keep));
            }
        }
        let mut accs = accs;
        for (steps, keep) in loaded {
            let before = accs.clone();
            accs = self.mma_steps(mma, tile, steps, accs);
            if let Some(ok) = keep {
                accs = accs
                    .iter()
                    .zip(&before)
                    .map(|(x, y)| self.b.op(&format!("arith.select {ok}, {x}, {y} : f32")))
                    .collect();
            }
        }
        self.b.close_for_typed(&accs, "f32");
        if tile.ragged_k {
            // The tail: one more step, for its warp (split) or every warp.
            let end = self.tail_end(tile, &w);
            let one = self.b.index(1);
            let (tail_res, s, accs) = self.b.open_for_typed_from(&tile.full, &end, &one, &res, "f32");
            let steps = if tile.staged {
                let staged = self.staged_steps(j, mma, tile, &rows, (&s, std::slice::from_ref(&s), true))?;
                staged.into_iter().flatten().collect()
            } else {
                self.fragments(j, mma, tile, &rows, (&s, true), None)?
            };
            let accs = self.mma_steps(mma, tile, steps, accs);
            self.b.close_for_typed(&accs, "f32");
            res = tail_res;
        }
        if !tile.split {
            for (a, v) in res.iter().enumerate() {
                let pos = self.acc_position(tile, a as i64);
                self.store_output(tile, &n0, &lane, &pos, v)?;
            }
            if guarded {
                self.b.close(); // the live-warp guard
            }
            return Ok(());
        }
        let per_lane = self.b.index(tile.accs());
        let base = self.b.muli("%tid", &per_lane);
        let ty = shared_ty(mma);
        for (a, v) in res.iter().enumerate() {
            let off = self.offset(&base, a as i64);
            self.b.line(&format!("memref.store {v}, %sh[{off}] : {ty}"));
        }
        self.b.line("gpu.barrier");
        // Thread o of the block's outputs, 256 at a time.
        let (outputs, threads) = (self.b.index(32 * tile.accs()), self.b.index(THREADS));
        let o = self.b.open_loop_from("%tid", &outputs, &threads);
        let total = self.sum_partials(tile, &o, None, &ty)?;
        let (lane, pos) = self.output_position(tile, &o);
        self.store_output(tile, &tile.nb0, &lane, &pos, &total)?;
        self.b.close();
        Ok(())
    }

    /// The steps of a staged iteration from `s` (see "staged A", "staged
    /// B"), one list per iteration loaded together (at steps `sus`; the
    /// `tail` step: one): B's global loads issued first (unless B is staged
    /// too), then the block's staging between barriers, then A's pairs (and
    /// B's) from shared memory.
    fn staged_steps(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        (s, sus, tail): (&str, &[String], bool),
    ) -> Result<Vec<Vec<Step>>, LowerError> {
        let stage = Stage { ptr: None, base: 0, b_base: 0 };
        let mut b = Vec::with_capacity(sus.len());
        if !tile.staged_b {
            for su in sus {
                let ks = self.lane_ks(tile, &rows.t, su, tail);
                b.push(self.b_fragments(j, mma, tile, rows, &ks)?);
            }
        }
        self.stage_block(j, mma, tile, (s, sus.len() as i64, tail), &stage)?;
        let mut staged = Vec::with_capacity(sus.len());
        for u in 0..sus.len() {
            let a = self.staged_a_pairs(mma, &rows.g, &rows.t, u as i64, &stage);
            let b = match tile.staged_b {
                true => self.staged_b_pairs(mma, tile, rows, u as i64, &stage),
                false => std::mem::take(&mut b[u]),
            };
            staged.push(steps(&a, &b));
        }
        Ok(staged)
    }

    /// The `mma.sync` of each step for each of the warp's tiles into the
    /// accumulators `accs`; returns the new accumulators.
    fn mma_steps(&mut self, mma: &Mma, tile: &Tile, steps: Vec<Step>, mut accs: Vec<String>) -> Vec<String> {
        for step in steps {
            for (r, a) in step.a.iter().enumerate() {
                for (c, b) in step.b.iter().enumerate() {
                    let at = 4 * (r * tile.cols as usize + c);
                    let next = self.mma_sync(mma.dtype, a, b, &accs[at..at + 4]);
                    accs.splice(at..at + 4, next);
                }
            }
        }
        accs
    }

    /// One `mma.sync` of register pairs `a` (4) and `b` (2) into the
    /// accumulators `c` (4); returns the new accumulators.
    fn mma_sync(&mut self, dtype: DType, a: &[Pair], b: &[Pair], c: &[String]) -> Vec<String> {
        let (pair_ty, kind) = match dtype {
            DType::F16 => ("vector<2xf16>", "f16"),
            _ => ("i32", "bf16"),
        };
        let ra: Vec<String> = a.iter().map(|p| self.pack(p, dtype)).collect();
        let rb: Vec<String> = b.iter().map(|p| self.pack(p, dtype)).collect();
        let d = self.b.op(&format!(
            "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, \
             multiplicandAPtxType = #nvvm.mma_type<{kind}>, multiplicandBPtxType = #nvvm.mma_type<{kind}>, \
             shape = #nvvm.shape<m = 16, n = 8, k = 16>}} : ({pair_ty}, {pair_ty}, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
            ra.join(", "),
            rb.join(", "),
            c.join(", ")
        ));
        (0..4).map(|i| self.b.op(&format!("llvm.extractvalue {d}[{i}] : !llvm.struct<(f32, f32, f32, f32)>"))).collect()
    }

    /// Where warp `w`'s walk starts and its stride: `w` and `WARPS` times
    /// the iterations loaded together (split), or the block's first
    /// iteration and the iterations loaded together.
    fn walk(&mut self, tile: &Tile, w: &str) -> (String, String) {
        if tile.split {
            (w.to_owned(), self.b.index(WARPS * tile.unroll))
        } else {
            (tile.lo.clone(), self.b.index(tile.unroll))
        }
    }

    /// The `u`-th of the iterations loaded together from `s`: `s + u WARPS`
    /// (split) or `s + u`, clamped to the walk's last whole step, and (for
    /// `u > 0`) whether it is in the walk (else its result is not kept).
    fn unrolled(&mut self, tile: &Tile, s: &str, u: i64) -> (String, Option<String>) {
        if u == 0 {
            return (s.to_owned(), None);
        }
        let su = self.offset(s, u * if tile.split { WARPS } else { 1 });
        let ok = self.b.ult(&su, &tile.main_end);
        let one = self.b.index(1);
        // Evaluated only inside the walk, where `main_end >= 1`.
        let last = self.b.op(&format!("arith.subi {}, {one} : index", tile.main_end));
        (self.b.op(&format!("arith.minui {su}, {last} : index")), Some(ok))
    }

    /// Where warp `w`'s tail walk (from step `full`) ends: `iters` (one step
    /// when the reduction ends inside one, none otherwise) for the warp
    /// whose turn it is in a split walk (`full % WARPS`), and for every warp
    /// of an unsplit one whose block's part holds step `full`; `full` (no
    /// step) for the others.
    fn tail_end(&mut self, tile: &Tile, w: &str) -> String {
        let mine = if tile.split {
            let warps = self.b.index(WARPS);
            let turn = self.b.op(&format!("arith.remui {}, {warps} : index", tile.full));
            self.b.op(&format!("arith.cmpi eq, {w}, {turn} : index"))
        } else if tile.slice.is_some() {
            let from = self.b.op(&format!("arith.cmpi ule, {}, {} : index", tile.lo, tile.full));
            let below = self.b.ult(&tile.full, &tile.hi);
            self.b.op(&format!("arith.andi {from}, {below} : i1"))
        } else {
            return tile.iters.clone();
        };
        self.b.op(&format!("arith.select {mine}, {}, {} : index", tile.iters, tile.full))
    }

    /// The first column of warp `w`'s tiles.
    fn warp_n0(&mut self, tile: &Tile, w: &str) -> String {
        if tile.split {
            return tile.nb0.clone();
        }
        let tn = self.b.index(TILE_N * tile.cols);
        let off = self.b.muli(w, &tn);
        self.b.addi(&tile.nb0, &off)
    }
}
