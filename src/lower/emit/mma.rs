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
//!   block is one 16 × 8 tile; warp `w` takes steps `w, w + WARPS, …`; the
//!   partial tiles meet in 4 KB of shared memory and threads 0..128 each
//!   add one output's eight partials (warp order) and store it.
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
//! On the CPU, [`super::Emulation`] runs the same blocks, warps, steps and
//! fragment loads with the warp's lanes as loops: each step's fragments are
//! scattered into a 16 × 16 and a 16 × 8 scratch tile, each lane's four
//! accumulators add their row · column products, and the partials are
//! combined (split) or stored (not split) as on the GPU.

use crate::ir::{DType, Op};
use crate::lower::mma::{Mma, TILE_K, TILE_M, TILE_N, WARPS};
use crate::lower::LowerError;

use super::builder::{storage, Val};
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
    /// Reduction steps of 16.
    ksteps: String,
    /// The output buffer and its element type.
    out_ptr: String,
    out_dtype: DType,
}

impl Kc<'_> {
    /// The body of tensor-core kernel node `j` (see the module doc); `flat`
    /// is the tile (GPU: the block id). Returns the number of tiles (the
    /// GPU's guard). On the CPU the tile loop is opened here (`opened`).
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
        let ksteps = self.ceil_div(&k, TILE_K);
        let mn = self.b.hoist(&format!("arith.muli {mtiles}, {nblocks} : index"));
        let tiles = self.b.hoist(&format!("arith.muli {mn}, {batch} : index"));
        let flat = match mode {
            MmaMode::Gpu => flat.to_owned(),
            MmaMode::Emulated => {
                *opened += 1;
                self.b.open_loop(&tiles)
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
            ksteps,
            out_ptr,
            out_dtype,
        };
        match mode {
            MmaMode::Gpu => self.mma_gpu(j, mma, &tile)?,
            MmaMode::Emulated => self.mma_emulated(j, mma, &tile)?,
        }
        Ok(tiles)
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
        let (first, step) =
            if tile.split { (w.clone(), self.b.index(WARPS)) } else { (self.b.index(0), self.b.index(1)) };
        let (res, s, accs) = self.b.open_for_typed_from(&first, &tile.ksteps, &step, &vec![zero; 4], "f32");
        let (a, b) = self.fragments(j, mma, tile, &rows, &s)?;
        let (pair_ty, kind) = match mma.dtype {
            DType::F16 => ("vector<2xf16>", "f16"),
            _ => ("i32", "bf16"),
        };
        let ra: Vec<String> = a.iter().map(|p| self.pack(p, mma.dtype)).collect();
        let rb: Vec<String> = b.iter().map(|p| self.pack(p, mma.dtype)).collect();
        let d = self.b.op(&format!(
            "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, \
             multiplicandAPtxType = #nvvm.mma_type<{kind}>, multiplicandBPtxType = #nvvm.mma_type<{kind}>, \
             shape = #nvvm.shape<m = 16, n = 8, k = 16>}} : ({pair_ty}, {pair_ty}, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
            ra.join(", "),
            rb.join(", "),
            accs.join(", ")
        ));
        let nexts: Vec<String> = (0..4)
            .map(|i| self.b.op(&format!("llvm.extractvalue {d}[{i}] : !llvm.struct<(f32, f32, f32, f32)>")))
            .collect();
        self.b.close_for_typed(&nexts, "f32");
        if !tile.split {
            for (i, r) in res.iter().enumerate() {
                let i = self.b.index(i as i64);
                self.store_output(tile, &n0, &lane, &i, r)?;
            }
            self.b.close();
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

    fn mma_emulated(&mut self, j: usize, mma: &Mma, tile: &Tile) -> Result<(), LowerError> {
        // Scratch: the partials, then the A tile (16 × 16), then B (16 × 8).
        let len = self.b.i64(PARTIALS + TILE_M * TILE_K + TILE_K * TILE_N);
        let scratch = self.b.hoist(&format!("llvm.alloca {len} x f32 : (i64) -> !llvm.ptr"));
        let (a_base, b_base) = (PARTIALS, PARTIALS + TILE_M * TILE_K);
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
        let s =
            if tile.split { self.b.open_loop_from(&w, &tile.ksteps, &warps) } else { self.b.open_loop(&tile.ksteps) };
        let lanes = self.b.index(32);
        let lane = self.b.open_loop(&lanes);
        let rows = self.lane_rows(tile, &n0, &lane)?;
        let (a, b) = self.fragments(j, mma, tile, &rows, &s)?;
        let a: Vec<String> = a.iter().flat_map(|p| self.unpack(p, mma.dtype)).collect();
        let b: Vec<String> = b.iter().flat_map(|p| self.unpack(p, mma.dtype)).collect();
        let (g, t) = self.lane_group(&lane);
        for (i, v) in a.iter().enumerate() {
            let i = i as i64;
            let r = self.offset(&g, 8 * ((i / 2) % 2));
            let c = self.k_offset(&t, i % 2 + 8 * (i / 4));
            let at = self.tile_offset(&r, TILE_K, &c, a_base);
            self.b.store(&scratch, &at, DType::F32, Val::f32(v.clone()));
        }
        for (i, v) in b.iter().enumerate() {
            let i = i as i64;
            let kk = self.k_offset(&t, i % 2 + 8 * (i / 2));
            let at = self.tile_offset(&kk, TILE_N, &g, b_base);
            self.b.store(&scratch, &at, DType::F32, Val::f32(v.clone()));
        }
        self.b.close();
        // The warp's mma: each lane's accumulators add row · column.
        let lane = self.b.open_loop(&lanes);
        let (g, t) = self.lane_group(&lane);
        let base = self.partial_base(&w, &lane);
        for i in 0..4 {
            let r = self.offset(&g, 8 * (i / 2));
            let c = self.k_offset(&t, i % 2);
            let tk = self.b.index(TILE_K);
            let (dot, kk, acc) = self.b.open_for(&tk, &zero, super::builder::Ty::F32);
            let ai = self.tile_offset(&r, TILE_K, &kk, a_base);
            let bi = self.tile_offset(&kk, TILE_N, &c, b_base);
            let x = self.b.load(&scratch, &ai, DType::F32).ssa;
            let y = self.b.load(&scratch, &bi, DType::F32).ssa;
            let p = self.b.fbin("mulf", &x, &y);
            let next = self.b.fbin("addf", &acc, &p);
            self.b.close_for(&next, super::builder::Ty::F32);
            let at = self.offset(&base, i);
            let old = self.b.load(&scratch, &at, DType::F32).ssa;
            let sum = self.b.fbin("addf", &old, &dot);
            self.b.store(&scratch, &at, DType::F32, Val::f32(sum));
        }
        self.b.close();
        self.b.close();
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
            self.b.close();
            self.b.close();
            self.b.close();
            return Ok(());
        }
        self.b.close();
        let outputs = self.b.index(PARTIALS / WARPS);
        let tid = self.b.open_loop(&outputs);
        let total = self.sum_partials(&tid, Some(&scratch))?;
        let (lane, i) = self.output_lane(&tid);
        self.store_output(tile, &tile.nb0, &lane, &i, &total)?;
        self.b.close();
        Ok(())
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

/// Two elements of a fragment (one 32-bit register): loaded one by one
/// (f32, already rounded to the operand type), or together.
enum Pair {
    Values(String, String),
    /// A `vector<2 x bf16/f16>`.
    Packed(String),
}

/// A lane's operand rows: A's output index for its two rows (`g`, `g + 8`)
/// and B's for its column (`g`), clamped into range.
struct LaneRows {
    a: [Vec<String>; 2],
    b: Vec<String>,
    t: String,
}

impl Kc<'_> {
    fn lane_group(&mut self, lane: &str) -> (String, String) {
        let four = self.b.index(4);
        let g = self.b.op(&format!("arith.divui {lane}, {four} : index"));
        let t = self.b.op(&format!("arith.remui {lane}, {four} : index"));
        (g, t)
    }

    fn lane_rows(&mut self, tile: &Tile, n0: &str, lane: &str) -> Result<LaneRows, LowerError> {
        let (g, t) = self.lane_group(lane);
        let one = self.b.index(1);
        let m_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.m));
        let n_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.n));
        let mut a = [Vec::new(), Vec::new()];
        for (h, slot) in a.iter_mut().enumerate() {
            let r = self.offset(&g, 8 * h as i64);
            let m = self.b.addi(&tile.m0, &r);
            let m = self.b.op(&format!("arith.minui {m}, {m_last} : index"));
            let mi = self.b.delinearize(&m, &tile.m_sizes);
            let zeros: Vec<String> = tile.n_sizes.iter().map(|_| self.b.index(0)).collect();
            *slot = self.tile_index(tile, &mi, &zeros)?;
        }
        let n = self.b.addi(n0, &g);
        let n = self.b.op(&format!("arith.minui {n}, {n_last} : index"));
        let ni = self.b.delinearize(&n, &tile.n_sizes);
        let zeros: Vec<String> = tile.m_sizes.iter().map(|_| self.b.index(0)).collect();
        let b = self.tile_index(tile, &zeros, &ni)?;
        Ok(LaneRows { a, b, t })
    }

    /// The lane's fragments of reduction step `s` as register pairs: A's
    /// four, B's two (see the module doc for which elements).
    fn fragments(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        s: &str,
    ) -> Result<(Vec<Pair>, Vec<Pair>), LowerError> {
        let tk = self.b.index(TILE_K);
        let k0 = self.b.muli(s, &tk);
        let two = self.b.index(2);
        let t2 = self.b.muli(&rows.t, &two);
        let base = self.b.addi(&k0, &t2);
        // The four reduction indices a lane reads: 2t, 2t+1, 2t+8, 2t+9.
        let ks: Vec<String> = [0, 1, 8, 9].iter().map(|&d| self.offset(&base, d)).collect();
        let one = self.b.index(1);
        let k_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.k));
        let mut guarded = Vec::with_capacity(4);
        for kv in &ks {
            guarded.push(if tile.ragged_k {
                let ok = self.b.ult(kv, &tile.k);
                let kc = self.b.op(&format!("arith.minui {kv}, {k_last} : index"));
                (kc, Some(ok))
            } else {
                (kv.clone(), None)
            });
        }
        let st = storage(mma.dtype);
        let element = |kc: &mut Self, p: usize, out_idx: &[String], at: usize| -> Result<String, LowerError> {
            let (kv, ok) = &guarded[at];
            let idx = kc.contraction_operand_index(j, p, out_idx, kv)?;
            let v = kc.graph.nodes[j].inputs[p];
            let x = kc.load(v, &idx)?;
            let x = kc.b.coerce(x, super::builder::Ty::F32).ssa;
            // Exact for stored bf16 / f16 data; the emulation rounds as the GPU does.
            let r = kc.b.op(&format!("arith.truncf {x} : f32 to {st}"));
            let x = kc.b.op(&format!("arith.extf {r} : {st} to f32"));
            Ok(match ok {
                Some(ok) => {
                    let z = kc.b.f32(0.0);
                    kc.b.op(&format!("arith.select {ok}, {x}, {z} : f32"))
                }
                None => x,
            })
        };
        // Elements `at` and `at + 1` (adjacent along the reduction): one
        // 32-bit load where they are adjacent in memory.
        let pair = |kc: &mut Self, p: usize, out_idx: &[String], at: usize| -> Result<Pair, LowerError> {
            if !tile.ragged_k {
                if let Some(v) = kc.packed_load(j, p, out_idx, &guarded[at].0, mma.dtype)? {
                    return Ok(Pair::Packed(v));
                }
            }
            Ok(Pair::Values(element(kc, p, out_idx, at)?, element(kc, p, out_idx, at + 1)?))
        };
        // A: (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..).
        let mut a = Vec::with_capacity(4);
        for (h, at) in [(0, 0), (1, 0), (0, 2), (1, 2)] {
            a.push(pair(self, mma.a, &rows.a[h], at)?);
        }
        let mut b = Vec::with_capacity(2);
        for at in [0, 2] {
            b.push(pair(self, mma.b, &rows.b, at)?);
        }
        Ok((a, b))
    }

    /// Elements `k`, `k + 1` of operand `p` as one `vector<2 x bf16/f16>`
    /// load, when the operand is a stored buffer of that type whose last
    /// axis is the reduction, of even constant length (`k` is even, so the
    /// load is 4-byte aligned); `None` otherwise.
    fn packed_load(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
        dtype: DType,
    ) -> Result<Option<String>, LowerError> {
        let v = self.graph.nodes[j].inputs[p];
        let Some(buf) = self.stored(v) else { return Ok(None) };
        let b = &self.program.buffers[buf];
        let even = b.shape.last().and_then(|d| d.as_constant()).is_some_and(|d| d % 2 == 0);
        if b.dtype != dtype || !even {
            return Ok(None);
        }
        let idx = self.contraction_operand_index(j, p, out_idx, k)?;
        let Some((last, rest)) = idx.split_last() else { return Ok(None) };
        if last != k || rest.iter().any(|i| i == k) {
            return Ok(None);
        }
        let (ptr, off) = self.buffer_offset(buf, &idx)?;
        let st = storage(dtype);
        let o = self.b.index_to_i64(&off);
        let at = self.b.op(&format!("llvm.getelementptr inbounds {ptr}[{o}] : (!llvm.ptr, i64) -> !llvm.ptr, {st}"));
        Ok(Some(self.b.op(&format!("llvm.load {at} {{alignment = 4 : i64}} : !llvm.ptr -> vector<2x{st}>"))))
    }

    /// A register pair as the `mma.sync` operand: bf16 as `i32`, f16 as
    /// `vector<2xf16>`.
    fn pack(&mut self, pair: &Pair, dtype: DType) -> String {
        let st = storage(dtype);
        let v = match pair {
            Pair::Packed(v) => v.clone(),
            Pair::Values(x, y) => {
                let x = self.b.op(&format!("arith.truncf {x} : f32 to {st}"));
                let y = self.b.op(&format!("arith.truncf {y} : f32 to {st}"));
                self.b.op(&format!("vector.from_elements {x}, {y} : vector<2x{st}>"))
            }
        };
        match dtype {
            DType::F16 => v,
            _ => self.b.op(&format!("llvm.bitcast {v} : vector<2x{st}> to i32")),
        }
    }

    /// A register pair's two elements as f32 (the emulation).
    fn unpack(&mut self, pair: &Pair, dtype: DType) -> [String; 2] {
        match pair {
            Pair::Values(x, y) => [x.clone(), y.clone()],
            Pair::Packed(v) => {
                let st = storage(dtype);
                [0, 1].map(|i| {
                    let e = self.b.op(&format!("vector.extract {v}[{i}] : {st} from vector<2x{st}>"));
                    self.b.op(&format!("arith.extf {e} : {st} to f32"))
                })
            }
        }
    }

    /// The output multi-index of this tile's batch with m-group index `mi`
    /// and n-group index `ni`.
    fn tile_index(&self, tile: &Tile, mi: &[String], ni: &[String]) -> Result<Vec<String>, LowerError> {
        let mut idx = vec![String::new(); tile.sizes.len()];
        for (axes, values) in tile.axes.iter().zip([tile.batch_idx.as_slice(), mi, ni]) {
            for (&a, v) in axes.iter().zip(values) {
                match idx.get_mut(a) {
                    Some(slot) => *slot = v.clone(),
                    None => {
                        return Err(LowerError::Unsupported {
                            node: self.kernel.to_owned(),
                            message: format!("tensor-core kernel: output axis {a} out of range"),
                        })
                    }
                }
            }
        }
        if idx.iter().any(String::is_empty) {
            return Err(LowerError::Unsupported {
                node: self.kernel.to_owned(),
                message: "tensor-core kernel: an output axis is in no group".into(),
            });
        }
        Ok(idx)
    }

    /// Index of operand `p` of contraction node `j` at output index
    /// `out_idx` and reduction index `k`.
    pub(crate) fn contraction_operand_index(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
    ) -> Result<Vec<String>, LowerError> {
        let node = &self.graph.nodes[j];
        match &node.op {
            Op::Einsum(spec) => {
                let subs = spec.inputs.get(p).ok_or_else(|| self.unsupported(j, "einsum operand"))?;
                let mut env: Vec<(char, String)> = spec.output.iter().copied().zip(out_idx.iter().cloned()).collect();
                let reduced = subs.iter().find(|c| !spec.output.contains(c)).copied();
                if let Some(c) = reduced {
                    env.push((c, k.to_owned()));
                }
                let subs = subs.clone();
                self.operand_index(j, &subs, &env)
            }
            Op::MatMul { transpose_b } => {
                let transpose_b = *transpose_b;
                let v = *node.inputs.get(p).ok_or_else(|| self.unsupported(j, "matmul operand"))?;
                let shape = self.graph.shape_of(v).clone();
                let r = out_idx.len();
                let mut idx = self.matmul_batch_index(&shape, out_idx);
                match (p, transpose_b) {
                    (0, _) => idx.extend([out_idx[r - 2].clone(), k.to_owned()]),
                    (_, true) => idx.extend([out_idx[r - 1].clone(), k.to_owned()]),
                    (_, false) => idx.extend([k.to_owned(), out_idx[r - 1].clone()]),
                }
                Ok(idx)
            }
            _ => Err(self.unsupported(j, "tensor-core kernel of a node that is not a contraction")),
        }
    }

    /// `ceil(x / d)` (hoisted).
    fn ceil_div(&mut self, x: &str, d: i64) -> String {
        let (dm1, dd) = (self.b.index(d - 1), self.b.index(d));
        let up = self.b.hoist(&format!("arith.addi {x}, {dm1} : index"));
        self.b.hoist(&format!("arith.divui {up}, {dd} : index"))
    }

    /// `x + c`.
    fn offset(&mut self, x: &str, c: i64) -> String {
        if c == 0 {
            return x.to_owned();
        }
        let c = self.b.index(c);
        self.b.addi(x, &c)
    }

    /// `2 t + c`.
    fn k_offset(&mut self, t: &str, c: i64) -> String {
        let two = self.b.index(2);
        let t2 = self.b.muli(t, &two);
        self.offset(&t2, c)
    }

    /// `base + r * cols + c`.
    fn tile_offset(&mut self, r: &str, cols: i64, c: &str, base: i64) -> String {
        let cols = self.b.index(cols);
        let rc = self.b.muli(r, &cols);
        let x = self.b.addi(&rc, c);
        self.offset(&x, base)
    }
}
