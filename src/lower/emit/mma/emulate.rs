//! The tensor-core kernel on the CPU ([`super::super::Emulation`]): the
//! GPU's blocks, warps, walk and fragment loads, the warp's lanes as loops.
//! Each step's fragments are scattered into scratch tiles by the PTX
//! fragment layout (see the parent module), then each lane's accumulators
//! (kept in scratch as the partials) add their row · column products; the
//! partials are combined (split) or stored (not split) as on the GPU.

use crate::ir::DType;
use crate::lower::mma::{Mma, TILE_K, TILE_M, TILE_N, WARPS};
use crate::lower::LowerError;

use super::super::builder::{Ty, Val};
use super::super::Kc;
use super::staging::Stage;
use super::{steps_per_iteration, Tile};

/// Scratch f32 elements of one step's A tile (16 × 16) and B tile (16 × 8).
const A_TILE: i64 = TILE_M * TILE_K;
const B_TILE: i64 = TILE_K * TILE_N;

/// The scratch: the partials (`32 × WARPS` lanes' accumulators), then per
/// step `q` of an iteration A tiles (one per row tile) and B tiles (one
/// per column tile).
struct Scratch {
    ptr: String,
    partials: i64,
    rows: i64,
    cols: i64,
}

impl Scratch {
    fn step_len(&self) -> i64 {
        self.rows * A_TILE + self.cols * B_TILE
    }

    /// Where step `q`'s A tile for row tile `r` starts.
    fn a(&self, q: i64, r: i64) -> i64 {
        self.partials + q * self.step_len() + r * A_TILE
    }

    /// Where step `q`'s B tile for column tile `c` starts.
    fn b(&self, q: i64, c: i64) -> i64 {
        self.partials + q * self.step_len() + self.rows * A_TILE + c * B_TILE
    }
}

impl Kc<'_> {
    pub(super) fn mma_emulated(&mut self, j: usize, mma: &Mma, tile: &Tile) -> Result<(), LowerError> {
        let partials = 32 * WARPS * tile.accs();
        let steps = steps_per_iteration(tile);
        let mut scratch = Scratch { ptr: String::new(), partials, rows: tile.rows, cols: tile.cols };
        // Then the staged A tile (two f32 a word), if the block stages it.
        let stage_at = partials + steps * scratch.step_len();
        let stage_len = if tile.staged { 2 * mma.stage_words() } else { 0 };
        let stage_b_len = if tile.staged_b { 2 * mma.stage_b_words() } else { 0 };
        let len = self.b.i64(stage_at + stage_len + stage_b_len);
        scratch.ptr = self.b.hoist(&format!("llvm.alloca {len} x f32 : (i64) -> !llvm.ptr"));
        let stage = Stage { ptr: Some(scratch.ptr.clone()), base: stage_at, b_base: stage_at + stage_len };
        let zero = self.b.f32(0.0);
        let all = self.b.index(partials);
        let x = self.b.open_loop(&all);
        self.b.store(&scratch.ptr, &x, DType::F32, Val::f32(zero));
        self.b.close();
        let warps = self.b.index(WARPS);
        let w = self.b.open_loop(&warps);
        let n0 = self.warp_n0(tile, &w);
        // As on the GPU: a warp past n skips the walk unless the block
        // stages A (each emulated warp stages the whole tile for itself,
        // every thread's share in turn: the same words).
        let guarded = !tile.split && !tile.staged;
        if guarded {
            let live = self.b.ult(&n0, &tile.n);
            self.b.open_guard(&live);
        }
        let (first, stride) = self.walk(tile, &w);
        let s0 = self.b.open_loop_from(&first, &tile.main_end, &stride);
        if tile.staged {
            self.stage_block(j, mma, tile, (&s0, tile.unroll, false), &stage)?;
        }
        for u in 0..tile.unroll {
            let (s, keep) = self.unrolled(tile, &s0, u);
            let slot = tile.staged.then_some((&stage, u));
            self.emulated_iteration(j, mma, tile, &scratch, (&w, &n0, &s), (false, keep.as_deref(), slot))?;
        }
        self.b.close(); // iterations
        if tile.ragged_k {
            let end = self.tail_end(tile, &w);
            let one = self.b.index(1);
            let s = self.b.open_loop_from(&tile.full, &end, &one);
            if tile.staged {
                self.stage_block(j, mma, tile, (&s, 1, true), &stage)?;
            }
            let slot = tile.staged.then_some((&stage, 0));
            self.emulated_iteration(j, mma, tile, &scratch, (&w, &n0, &s), (true, None, slot))?;
            self.b.close(); // the tail
        }
        let lanes = self.b.index(32);
        if !tile.split {
            // Each lane stores its accumulators.
            let lane = self.b.open_loop(&lanes);
            let base = self.partial_base(tile, &w, &lane);
            for a in 0..tile.accs() {
                let at = self.offset(&base, a);
                let v = self.b.load(&scratch.ptr, &at, DType::F32).ssa;
                let pos = self.acc_position(tile, a);
                self.store_output(tile, &n0, &lane, &pos, &v)?;
            }
            self.b.close(); // lanes
            if guarded {
                self.b.close(); // the live-warp guard
            }
            self.b.close(); // warps
            return Ok(());
        }
        self.b.close(); // warps
        let outputs = self.b.index(32 * tile.accs());
        let o = self.b.open_loop(&outputs);
        let total = self.sum_partials(tile, &o, Some(&scratch.ptr), "")?;
        let (lane, pos) = self.output_position(tile, &o);
        self.store_output(tile, &tile.nb0, &lane, &pos, &total)?;
        self.b.close();
        Ok(())
    }

    /// One iteration `s` of warp `w`'s walk (`tail`: the step the reduction
    /// ends inside): each lane's fragments (A's from `slot` of the staged
    /// tile, if given) scattered into the scratch tiles, then each lane's
    /// accumulators add row · column, unless `keep` is false (an unrolled
    /// iteration past the end).
    fn emulated_iteration(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        scratch: &Scratch,
        (w, n0, s): (&str, &str, &str),
        (tail, keep, slot): (bool, Option<&str>, Option<(&Stage, i64)>),
    ) -> Result<(), LowerError> {
        let ptr = scratch.ptr.as_str();
        let lanes = self.b.index(32);
        let lane = self.b.open_loop(&lanes);
        let rows = self.lane_rows(tile, n0, &lane)?;
        let (g, t) = self.lane_group(&lane);
        for (q, step) in self.fragments(j, mma, tile, &rows, (s, tail), slot)?.into_iter().enumerate() {
            let q = q as i64;
            for (r, a) in step.a.iter().enumerate() {
                let a: Vec<String> = a.iter().flat_map(|p| self.unpack(p, mma.dtype)).collect();
                for (i, v) in a.iter().enumerate() {
                    let i = i as i64;
                    let row = self.offset(&g, 8 * ((i / 2) % 2));
                    let col = self.k_offset(&t, i % 2 + 8 * (i / 4));
                    let at = self.tile_offset(&row, TILE_K, &col, scratch.a(q, r as i64));
                    self.b.store(ptr, &at, DType::F32, Val::f32(v.clone()));
                }
            }
            for (c, b) in step.b.iter().enumerate() {
                let b: Vec<String> = b.iter().flat_map(|p| self.unpack(p, mma.dtype)).collect();
                for (i, v) in b.iter().enumerate() {
                    let i = i as i64;
                    let kk = self.k_offset(&t, i % 2 + 8 * (i / 2));
                    let at = self.tile_offset(&kk, TILE_N, &g, scratch.b(q, c as i64));
                    self.b.store(ptr, &at, DType::F32, Val::f32(v.clone()));
                }
            }
        }
        self.b.close();
        // Each step's mma for each tile: a lane's accumulators add row · column.
        let zero = self.b.f32(0.0);
        let lane = self.b.open_loop(&lanes);
        let (g, t) = self.lane_group(&lane);
        let base = self.partial_base(tile, w, &lane);
        for q in 0..steps_per_iteration(tile) {
            for r in 0..tile.rows {
                for c in 0..tile.cols {
                    for i in 0..4 {
                        let row = self.offset(&g, 8 * (i / 2));
                        let col = self.k_offset(&t, i % 2);
                        let tk = self.b.index(TILE_K);
                        let (dot, kk, acc) = self.b.open_for(&tk, &zero, Ty::F32);
                        let ai = self.tile_offset(&row, TILE_K, &kk, scratch.a(q, r));
                        let bi = self.tile_offset(&kk, TILE_N, &col, scratch.b(q, c));
                        let x = self.b.load(ptr, &ai, DType::F32).ssa;
                        let y = self.b.load(ptr, &bi, DType::F32).ssa;
                        let p = self.b.fbin("mulf", &x, &y);
                        let next = self.b.fbin("addf", &acc, &p);
                        self.b.close_for(&next, Ty::F32);
                        let at = self.offset(&base, 4 * (r * tile.cols + c) + i);
                        let old = self.b.load(ptr, &at, DType::F32).ssa;
                        let mut sum = self.b.fbin("addf", &old, &dot);
                        if let Some(ok) = keep {
                            sum = self.b.op(&format!("arith.select {ok}, {sum}, {old} : f32"));
                        }
                        self.b.store(ptr, &at, DType::F32, Val::f32(sum));
                    }
                }
            }
        }
        self.b.close(); // lanes
        Ok(())
    }
}
