//! Tensor-core contraction kernels (see [`crate::lower::mma`]).
//!
//! A block of [`WARPS`] warps; block `i` is `(batch, n_block, m_tile)` with
//! the m tile fastest (adjacent blocks share B's rows: the weights, the
//! context cache). Per reduction step of 16, each lane loads its fragments
//! of A (16 × 16, row major) and B (16 × 8, one column per lane group) and
//! the warp runs one `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`
//! into four f32 accumulators per lane.
//!
//! - **Split** ([`Mma::split_k`], long or runtime-sized reductions): the
//!   block is one 16 × 8 tile; warp `w` takes steps `w, w + WARPS, …`,
//!   [`UNROLL`] at a time (`s, s + 8, s + 16, s + 24`: every load of the
//!   four first, then the four `mma.sync`; a step past the end re-reads the
//!   last one and its result is not kept); the partial tiles meet in 4 KB
//!   of shared memory and threads 0..128 each add one output's eight
//!   partials (warp order) and store it.
//! - **Not split** (a short constant reduction): the block is 16 × 64,
//!   warp `w` computes the tile at columns `64 n_block + 8 w` over the
//!   whole reduction and stores it from its registers.
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
//! of 16 reads zeros past its end (indices clamped, values selected).
//!
//! **Chunked walk** (a constant reduction, a multiple of [`CHUNK_K`]): one
//! iteration covers 32 reduction elements, two `mma.sync`. Lane `(g, t)`
//! reads elements `32 c + 8 t .. 32 c + 8 t + 8` of each of its rows (A's
//! rows `g`, `g + 8`, B's column `g`) as four pairs `p = 0..4`: pair `p`
//! fills slots `2 t, 2 t + 1` (`p` even) or `2 t + 8, 2 t + 9` (`p` odd) of
//! step `p / 2`. Slot `κ` of step `s` is then element
//! `32 c + 8 (κ % 8 / 2) + 4 s + 2 (κ / 8) + κ % 2` for A and B alike, a
//! bijection onto the chunk, so the products pair the same elements; only
//! the order of the sum changes. A stored operand whose innermost axis is
//! the reduction gives the eight as one 16-byte load (row starts are
//! multiples of 8 elements; buffers are 16-byte aligned).
//!
//! On the CPU, [`super::Emulation`] runs the same blocks, warps, steps and
//! fragment loads with the warp's lanes as loops: each step's fragments are
//! scattered into a 16 × 16 and a 16 × 8 scratch tile, each lane's four
//! accumulators add their row · column products, and the partials are
//! combined (split) or stored (not split) as on the GPU.

use crate::ir::DType;
use crate::lower::mma::{Mma, CHUNK_K, TILE_K, TILE_M, TILE_N, UNROLL, WARPS};
use crate::lower::LowerError;

mod fragments;

use fragments::Pair;

use super::builder::{Ty, Val};
use super::Kc;

/// Threads of a block (the runtime's launch block).
const THREADS: i64 = 32 * WARPS;
/// Shared (GPU) or scratch (CPU) f32 elements of the partial tiles.
pub(crate) const PARTIALS: i64 = THREADS * 4;

/// Where the tensor-core kernel runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MmaMode {
    /// `nvvm.mma.sync`, partials in the workgroup memory `%sh`.
    Gpu,
    /// Lanes as loops, scratch from `llvm.alloca`.
    Emulated,
}

/// The GPU kernel's workgroup attribution.
pub(crate) const WORKGROUP: &str = "workgroup(%sh : memref<1024xf32, #gpu.address_space<workgroup>>)";

/// `mma.sync` steps of one iteration of the reduction walk.
fn steps_per_iteration(tile: &Tile) -> i64 {
    if tile.chunked {
        CHUNK_K / TILE_K
    } else {
        1
    }
}

/// The emulation's scratch: the partials, then per step `q` of an iteration
/// the A tile (16 × 16) and the B tile (16 × 8). Where step `q`'s A and B
/// tiles start (for `q` = the steps of an iteration: the scratch's length).
fn scratch_tiles(q: i64) -> (i64, i64) {
    let (a_len, b_len) = (TILE_M * TILE_K, TILE_K * TILE_N);
    let a = PARTIALS + q * (a_len + b_len);
    (a, a + a_len)
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
    /// Whether the reduction may end inside a step.
    ragged_k: bool,
    /// Output axes of each group.
    axes: [Vec<usize>; 3],
    /// This block: batch multi-index, first row, first column.
    batch_idx: Vec<String>,
    m0: String,
    nb0: String,
    /// See [`Mma::split_k`].
    split: bool,
    /// Whether the reduction is walked in chunks of [`CHUNK_K`] (see the
    /// module doc), else in steps of 16.
    chunked: bool,
    /// Iterations of the reduction walk: chunks or steps.
    iters: String,
    /// Where the kernel runs.
    mode: MmaMode,
    /// The output buffer and its element type.
    out_ptr: String,
    out_dtype: DType,
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
        let (out_ptr, out_dtype, sizes) = out;
        if sizes.len() != self.graph.nodes[j].shape.len() {
            return Err(self.unsupported(j, "tensor-core kernel: output rank"));
        }
        let pick = |axes: &[usize]| -> Vec<String> { axes.iter().map(|&a| sizes[a].clone()).collect() };
        let (batch_sizes, m_sizes, n_sizes) = (pick(&mma.batch), pick(&mma.m), pick(&mma.n));
        let m = self.b.size(&mma.m_size)?;
        let n = self.b.size(&mma.n_size)?;
        let k = self.b.size(&mma.k_size)?;
        let batch = self.b.size(&mma.batch_size)?;
        let mtiles = self.ceil_div(&m, TILE_M);
        let split = mma.split_k;
        let n_block = if split { TILE_N } else { TILE_N * WARPS };
        let nblocks = self.ceil_div(&n, n_block);
        let chunked = mma.k_size.as_constant().is_some_and(|c| c % CHUNK_K == 0);
        let iters = self.ceil_div(&k, if chunked { CHUNK_K } else { TILE_K });
        let mn = self.b.hoist(&format!("arith.muli {mtiles}, {nblocks} : index"));
        let blocks = self.b.hoist(&format!("arith.muli {mn}, {batch} : index"));
        let flat = match mode {
            MmaMode::Gpu => flat.to_owned(),
            MmaMode::Emulated => {
                *opened += 1;
                self.b.open_loop(&blocks)
            }
        };
        let at = self.b.delinearize(&flat, &[batch.clone(), nblocks, mtiles]);
        let batch_idx = self.b.delinearize(&at[0], &batch_sizes);
        let (tm, nb) = (self.b.index(TILE_M), self.b.index(n_block));
        let m0 = self.b.muli(&at[2], &tm);
        let nb0 = self.b.muli(&at[1], &nb);
        let ragged_k = mma.k_size.as_constant().is_none_or(|c| c % TILE_K != 0);
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
            axes,
            batch_idx,
            m0,
            nb0,
            split,
            chunked,
            iters,
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
        if !tile.split {
            // A warp whose tile starts past n has nothing to do (warp-uniform).
            let live = self.b.ult(&n0, &tile.n);
            self.b.open_guard(&live);
        }
        let rows = self.lane_rows(tile, &n0, &lane)?;
        let zero = self.b.f32(0.0);
        let (first, step) = self.walk(tile, &w);
        let (res, s, accs) = self.b.open_for_typed_from(&first, &tile.iters, &step, &vec![zero; 4], "f32");
        // Every load of the unrolled iterations first, then the mma chain.
        let mut loaded = Vec::new();
        for u in 0..self.unroll(tile) {
            let (su, keep) = self.unrolled(tile, &s, u);
            loaded.push((self.fragments(j, mma, tile, &rows, &su)?, keep));
        }
        let mut accs = accs;
        for (steps, keep) in loaded {
            let before = accs.clone();
            for (a, b) in steps {
                accs = self.mma_sync(mma.dtype, &a, &b, &accs);
            }
            if let Some(ok) = keep {
                accs = accs
                    .iter()
                    .zip(&before)
                    .map(|(x, y)| self.b.op(&format!("arith.select {ok}, {x}, {y} : f32")))
                    .collect();
            }
        }
        self.b.close_for_typed(&accs, "f32");
        if !tile.split {
            for (i, r) in res.iter().enumerate() {
                let i = self.b.index(i as i64);
                self.store_output(tile, &n0, &lane, &i, r)?;
            }
            self.b.close(); // the live-warp guard
            return Ok(());
        }
        let four = self.b.index(4);
        let base = self.b.muli("%tid", &four);
        for (i, r) in res.iter().enumerate() {
            let off = self.offset(&base, i as i64);
            self.b
                .line(&format!("memref.store {r}, %sh[{off}] : memref<{PARTIALS}xf32, #gpu.address_space<workgroup>>"));
        }
        self.b.line("gpu.barrier");
        let outputs = self.b.index(PARTIALS / WARPS);
        let first = self.b.ult("%tid", &outputs);
        self.b.open_guard(&first);
        let total = self.sum_partials("%tid", None)?;
        let (lane, i) = self.output_lane("%tid");
        self.store_output(tile, &tile.nb0, &lane, &i, &total)?;
        self.b.close();
        Ok(())
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

    fn mma_emulated(&mut self, j: usize, mma: &Mma, tile: &Tile) -> Result<(), LowerError> {
        let len = self.b.i64(scratch_tiles(steps_per_iteration(tile)).0);
        let scratch = self.b.hoist(&format!("llvm.alloca {len} x f32 : (i64) -> !llvm.ptr"));
        let zero = self.b.f32(0.0);
        let all = self.b.index(PARTIALS);
        let x = self.b.open_loop(&all);
        self.b.store(&scratch, &x, DType::F32, Val::f32(zero.clone()));
        self.b.close();
        let warps = self.b.index(WARPS);
        let w = self.b.open_loop(&warps);
        let n0 = self.warp_n0(tile, &w);
        if !tile.split {
            let live = self.b.ult(&n0, &tile.n);
            self.b.open_guard(&live);
        }
        let (first, stride) = self.walk(tile, &w);
        let s0 = self.b.open_loop_from(&first, &tile.iters, &stride);
        let lanes = self.b.index(32);
        for u in 0..self.unroll(tile) {
            let (s, keep) = self.unrolled(tile, &s0, u);
            self.mma_emulated_iteration(j, mma, tile, (&scratch, &w, &n0, &s), keep.as_deref())?;
        }
        self.b.close(); // iterations
        if !tile.split {
            // Each lane stores its four accumulators.
            let lane = self.b.open_loop(&lanes);
            let base = self.partial_base(&w, &lane);
            for i in 0..4 {
                let at = self.offset(&base, i);
                let v = self.b.load(&scratch, &at, DType::F32).ssa;
                let i = self.b.index(i);
                self.store_output(tile, &n0, &lane, &i, &v)?;
            }
            self.b.close(); // lanes
            self.b.close(); // the live-warp guard
            self.b.close(); // warps
            return Ok(());
        }
        self.b.close(); // warps
        let outputs = self.b.index(PARTIALS / WARPS);
        let tid = self.b.open_loop(&outputs);
        let total = self.sum_partials(&tid, Some(&scratch))?;
        let (lane, i) = self.output_lane(&tid);
        self.store_output(tile, &tile.nb0, &lane, &i, &total)?;
        self.b.close();
        Ok(())
    }

    /// One iteration `s` of warp `w`'s walk, emulated (see the module doc):
    /// each lane's fragments scattered into the scratch tiles, then each
    /// lane's accumulators (in `scratch`) add row · column, unless `keep`
    /// is false (an unrolled iteration past the end).
    fn mma_emulated_iteration(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        (scratch, w, n0, s): (&str, &str, &str, &str),
        keep: Option<&str>,
    ) -> Result<(), LowerError> {
        let a_base = |q: i64| scratch_tiles(q).0;
        let b_base = |q: i64| scratch_tiles(q).1;
        let zero = self.b.f32(0.0);
        let lanes = self.b.index(32);
        let lane = self.b.open_loop(&lanes);
        let rows = self.lane_rows(tile, n0, &lane)?;
        let (g, t) = self.lane_group(&lane);
        for (q, (a, b)) in self.fragments(j, mma, tile, &rows, s)?.into_iter().enumerate() {
            let q = q as i64;
            let a: Vec<String> = a.iter().flat_map(|p| self.unpack(p, mma.dtype)).collect();
            let b: Vec<String> = b.iter().flat_map(|p| self.unpack(p, mma.dtype)).collect();
            for (i, v) in a.iter().enumerate() {
                let i = i as i64;
                let r = self.offset(&g, 8 * ((i / 2) % 2));
                let c = self.k_offset(&t, i % 2 + 8 * (i / 4));
                let at = self.tile_offset(&r, TILE_K, &c, a_base(q));
                self.b.store(scratch, &at, DType::F32, Val::f32(v.clone()));
            }
            for (i, v) in b.iter().enumerate() {
                let i = i as i64;
                let kk = self.k_offset(&t, i % 2 + 8 * (i / 2));
                let at = self.tile_offset(&kk, TILE_N, &g, b_base(q));
                self.b.store(scratch, &at, DType::F32, Val::f32(v.clone()));
            }
        }
        self.b.close();
        // The warp's mma of each step: each lane's accumulators add row · column.
        let lane = self.b.open_loop(&lanes);
        let (g, t) = self.lane_group(&lane);
        let base = self.partial_base(w, &lane);
        for q in 0..steps_per_iteration(tile) {
            for i in 0..4 {
                let r = self.offset(&g, 8 * (i / 2));
                let c = self.k_offset(&t, i % 2);
                let tk = self.b.index(TILE_K);
                let (dot, kk, acc) = self.b.open_for(&tk, &zero, Ty::F32);
                let ai = self.tile_offset(&r, TILE_K, &kk, a_base(q));
                let bi = self.tile_offset(&kk, TILE_N, &c, b_base(q));
                let x = self.b.load(scratch, &ai, DType::F32).ssa;
                let y = self.b.load(scratch, &bi, DType::F32).ssa;
                let p = self.b.fbin("mulf", &x, &y);
                let next = self.b.fbin("addf", &acc, &p);
                self.b.close_for(&next, Ty::F32);
                let at = self.offset(&base, i);
                let old = self.b.load(scratch, &at, DType::F32).ssa;
                let mut sum = self.b.fbin("addf", &old, &dot);
                if let Some(ok) = keep {
                    sum = self.b.op(&format!("arith.select {ok}, {sum}, {old} : f32"));
                }
                self.b.store(scratch, &at, DType::F32, Val::f32(sum));
            }
        }
        self.b.close(); // lanes
        Ok(())
    }

    /// Iterations a warp loads together: [`UNROLL`] in a split walk, one
    /// otherwise (a short constant walk is unrolled whole by LLVM).
    fn unroll(&self, tile: &Tile) -> i64 {
        if tile.split {
            UNROLL
        } else {
            1
        }
    }

    /// Where warp `w`'s walk starts and its stride: `w` and `WARPS * UNROLL`
    /// (split), or `0` and `1`.
    fn walk(&mut self, tile: &Tile, w: &str) -> (String, String) {
        if tile.split {
            (w.to_owned(), self.b.index(WARPS * UNROLL))
        } else {
            (self.b.index(0), self.b.index(1))
        }
    }

    /// The `u`-th of the iterations loaded together from `s`: `s + u WARPS`,
    /// clamped to the last iteration, and (for `u > 0`) whether it is in
    /// the walk (else its result is not kept).
    fn unrolled(&mut self, tile: &Tile, s: &str, u: i64) -> (String, Option<String>) {
        if u == 0 {
            return (s.to_owned(), None);
        }
        let su = self.offset(s, u * WARPS);
        let ok = self.b.ult(&su, &tile.iters);
        let one = self.b.index(1);
        let last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.iters));
        (self.b.op(&format!("arith.minui {su}, {last} : index")), Some(ok))
    }

    /// The first column of warp `w`'s tile.
    fn warp_n0(&mut self, tile: &Tile, w: &str) -> String {
        if tile.split {
            return tile.nb0.clone();
        }
        let tn = self.b.index(TILE_N);
        let off = self.b.muli(w, &tn);
        self.b.addi(&tile.nb0, &off)
    }

    /// Offset of lane `lane` of warp `w`'s four partials.
    fn partial_base(&mut self, w: &str, lane: &str) -> String {
        let (lanes, four) = (self.b.index(32), self.b.index(4));
        let wl = self.b.muli(w, &lanes);
        let thread = self.b.addi(&wl, lane);
        self.b.muli(&thread, &four)
    }

    /// The eight partials of output `tid` (0..128) added in warp order, from
    /// the workgroup memory (GPU) or `scratch` (CPU).
    fn sum_partials(&mut self, tid: &str, scratch: Option<&str>) -> Result<String, LowerError> {
        let mut total: Option<String> = None;
        for w in 0..WARPS {
            let off = self.offset(tid, w * (PARTIALS / WARPS));
            let p = match scratch {
                Some(ptr) => self.b.load(ptr, &off, DType::F32).ssa,
                None => self
                    .b
                    .op(&format!("memref.load %sh[{off}] : memref<{PARTIALS}xf32, #gpu.address_space<workgroup>>")),
            };
            total = Some(match total {
                None => p,
                Some(t) => self.b.fbin("addf", &t, &p),
            });
        }
        total.ok_or_else(|| LowerError::Unsupported { node: self.kernel.to_owned(), message: "no warps".into() })
    }

    /// The lane and accumulator of combined output `tid` (0..128): lane
    /// `tid / 4`, accumulator `tid % 4` (the layout of the partials).
    fn output_lane(&mut self, tid: &str) -> (String, String) {
        let four = self.b.index(4);
        let lane = self.b.op(&format!("arith.divui {tid}, {four} : index"));
        let i = self.b.op(&format!("arith.remui {tid}, {four} : index"));
        (lane, i)
    }

    /// Stores accumulator `i` of lane `lane` of the tile at columns
    /// `n0..n0 + 8`, if it is inside the output.
    fn store_output(&mut self, tile: &Tile, n0: &str, lane: &str, i: &str, value: &str) -> Result<(), LowerError> {
        let (g, t) = self.lane_group(lane);
        let two = self.b.index(2);
        let half = self.b.op(&format!("arith.divui {i}, {two} : index"));
        let odd = self.b.op(&format!("arith.remui {i}, {two} : index"));
        let eight = self.b.index(8);
        let down = self.b.muli(&half, &eight);
        let r = self.b.addi(&g, &down);
        let t2 = self.b.muli(&t, &two);
        let c = self.b.addi(&t2, &odd);
        let m = self.b.addi(&tile.m0, &r);
        let n = self.b.addi(n0, &c);
        let (in_m, in_n) = (self.b.ult(&m, &tile.m), self.b.ult(&n, &tile.n));
        let inside = self.b.op(&format!("arith.andi {in_m}, {in_n} : i1"));
        self.b.open_guard(&inside);
        let mi = self.b.delinearize(&m, &tile.m_sizes);
        let ni = self.b.delinearize(&n, &tile.n_sizes);
        let idx = self.tile_index(tile, &mi, &ni)?;
        let off = self.b.linearize(&idx, &tile.sizes);
        self.b.store(&tile.out_ptr, &off, tile.out_dtype, Val::f32(value.to_owned()));
        self.b.close();
        Ok(())
    }
}
