//! Staged A (see the parent module and [`Mma::stages_a`]): the block's
//! threads load the A tile of the iterations a walk loads together into
//! shared memory, then each warp reads its fragments from there as 32-bit
//! words.
//!
//! The tile is the block's `16 R` rows by `8 U` words (two elements each:
//! reduction indices `16 su + 2 w8`, `+ 1` of word `8 u + w8`, `su` the
//! `u`-th iteration loaded together), a row every [`Mma::stage_pitch`]
//! words. Word `p` of the tile (`0 .. 16 R · 8 U`) is thread `p % 256`'s,
//! in turns of 256: a warp's lanes read consecutive pairs along a row.

use crate::ir::DType;
use crate::lower::mma::{Mma, TILE_K, TILE_M};
use crate::lower::LowerError;

use super::super::builder::{storage, Val};
use super::super::Kc;
use super::fragments::{LaneRows, RowPairs};
use super::loads::Pair;
use super::{stage_b_ty, stage_ty, MmaMode, Tile, THREADS};

/// Where the staged tiles live: the workgroup memory `%sa` and `%sb` (GPU,
/// packed words) or, in the emulation, f32 scratch (two per word) at `base`
/// (A) and `b_base` (B).
pub(super) struct Stage {
    pub ptr: Option<String>,
    pub base: i64,
    pub b_base: i64,
}

impl Kc<'_> {
    /// The block's staging of A's tile of `walk` (see [`Kc::stage_a`]): on
    /// the GPU each thread's share between two barriers (the block's warps
    /// are done reading the last tile before any thread overwrites it, and
    /// every word is stored before any warp reads it); emulated, every
    /// thread's share in turn.
    pub(super) fn stage_block(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        walk: (&str, i64, bool),
        stage: &Stage,
    ) -> Result<(), LowerError> {
        let tid = match tile.mode {
            MmaMode::Gpu => {
                self.b.line("gpu.barrier");
                "%tid".to_owned()
            }
            MmaMode::Emulated => {
                let threads = self.b.index(THREADS);
                self.b.open_loop(&threads)
            }
        };
        self.stage_a(j, mma, tile, walk, &tid, stage)?;
        if tile.staged_b {
            self.stage_b(j, mma, tile, walk, &tid, stage)?;
        }
        match tile.mode {
            MmaMode::Gpu => self.b.line("gpu.barrier"),
            MmaMode::Emulated => self.b.close(),
        }
        Ok(())
    }

    /// Whether contraction node `j` stages B beside A ([`Tuning::stage_b`]
    /// on): A staged, two column tiles a warp read in pairs (B's columns
    /// innermost, see `interleaves`), and a block's columns within one
    /// row of B's last axis (its length a multiple of the block's), so the
    /// block's threads read each of B's rows in 16-byte loads.
    ///
    /// [`Tuning::stage_b`]: crate::lower::mma::Tuning::stage_b
    pub(crate) fn stages_b(&self, j: usize, mma: &Mma) -> bool {
        let last = self.graph.nodes.get(j).zip(mma.n.last()).and_then(|(node, &a)| node.shape.get(a));
        let fits = last.and_then(|d| self.constant_size(d)).is_some_and(|d| d % mma.block_n() == 0);
        mma.tuning.stage_b && mma.stages_a() && mma.cols == 2 && fits && self.interleaves(j, mma)
    }

    /// Thread `tid`'s share of staging B's rows of `slots` iterations from
    /// `s` (clamped as in [`Kc::stage_a`]; the `tail`: one slot, zeros past
    /// the reduction's end): 16-byte group `q` (in turns of 256) is row
    /// `q / G`, columns `8 (q % G) ..` of the block's (`G` = columns / 8),
    /// stored as four words at word `4 (q % G)` of the row.
    fn stage_b(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        (s, slots, tail): (&str, i64, bool),
        tid: &str,
        stage: &Stage,
    ) -> Result<(), LowerError> {
        let groups = mma.block_n() / 8;
        let total = TILE_K * slots * groups;
        let one = self.b.index(1);
        let k_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.k));
        let st = storage(mma.dtype);
        let vty = format!("vector<8x{st}>");
        self.stage_turns(tid, total, |kc, q| {
            let g = kc.b.index(groups);
            let row = kc.b.op(&format!("arith.divui {q}, {g} : index"));
            let c8 = kc.b.op(&format!("arith.remui {q}, {g} : index"));
            let tk = kc.b.index(TILE_K);
            let within = kc.b.op(&format!("arith.remui {row}, {tk} : index"));
            let su = kc.slot_step(tile, (s, slots), (&row, TILE_K));
            let k0 = kc.b.muli(&su, &tk);
            let k = kc.b.addi(&k0, &within);
            let (k, ok) = if tail {
                let ok = kc.b.ult(&k, &tile.k);
                (kc.b.op(&format!("arith.minui {k}, {k_last} : index")), Some(ok))
            } else {
                (k, None)
            };
            let eight = kc.b.index(8);
            let cols = kc.b.muli(&c8, &eight);
            let n = kc.b.addi(&tile.nb0, &cols);
            let ni = kc.b.delinearize(&n, &tile.n_sizes);
            let zeros: Vec<String> = tile.m_sizes.iter().map(|_| kc.b.index(0)).collect();
            let out_idx = kc.tile_index(tile, &zeros, &ni)?;
            let along = mma.n.last().and_then(|&a| out_idx.get(a)).cloned().unwrap_or_default();
            let Some(mut v) = kc.contiguous_load(j, mma.b, (&out_idx, &k), &along, tile, 8)? else {
                return Err(kc.unsupported(j, "tensor-core kernel: B's rows cannot be staged"));
            };
            if let Some(ok) = ok {
                let zero = kc.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
                v = kc.b.op(&format!("arith.select {ok}, {v}, {zero} : {vty}"));
            }
            let pitch = kc.b.index(mma.stage_b_pitch());
            let four = kc.b.index(4);
            let row_at = kc.b.muli(&row, &pitch);
            let col_at = kc.b.muli(&c8, &four);
            let at = kc.b.addi(&row_at, &col_at);
            match &stage.ptr {
                None => {
                    let words = kc.b.op(&format!("llvm.bitcast {v} : {vty} to vector<4xi32>"));
                    let ty = stage_b_ty(mma);
                    kc.b.line(&format!(
                        "vector.store {words}, %sb[{at}] {{alignment = 16 : i64}} : {ty}, vector<4xi32>"
                    ));
                }
                Some(ptr) => {
                    let two = kc.b.index(2);
                    let at2 = kc.b.muli(&at, &two);
                    let base = kc.offset(&at2, stage.b_base);
                    for i in 0..8 {
                        let e = kc.b.op(&format!("vector.extract {v}[{i}] : {st} from {vty}"));
                        let x = kc.b.op(&format!("arith.extf {e} : {st} to f32"));
                        let o = kc.offset(&base, i);
                        kc.b.store(ptr, &o, DType::F32, Val::f32(x));
                    }
                }
            }
            Ok(())
        })
    }

    /// B's register pairs of the lane for slot `slot` of the staged tile,
    /// for each of the warp's two column tiles (interleaved: the lane's
    /// word `(n0 - nb0) / 2 + g` of rows `16 slot + 2 t (+ 1, 8, 9)`; tile
    /// `c`'s pair of rows `k, k + 1` is element `c` of each of their words).
    pub(super) fn staged_b_pairs(
        &mut self,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        slot: i64,
        stage: &Stage,
    ) -> Vec<Vec<Pair>> {
        let two = self.b.index(2);
        let local = self.b.subi(&rows.n0, &tile.nb0);
        let half = self.b.op(&format!("arith.divui {local}, {two} : index"));
        let word = self.b.addi(&half, &rows.g);
        let pitch = self.b.index(mma.stage_b_pitch());
        let st = storage(mma.dtype);
        let mut words = Vec::with_capacity(4);
        for d in [0, 1, 8, 9] {
            let row = self.k_offset(&rows.t, TILE_K * slot + d);
            let row_at = self.b.muli(&row, &pitch);
            let at = self.b.addi(&row_at, &word);
            words.push(self.load_stage_word(mma, stage, &at, true));
        }
        (0..2)
            .map(|c| {
                words
                    .chunks(2)
                    .map(|kk| match (&kk[0], &kk[1]) {
                        (Pair::Packed(x), Pair::Packed(y)) => Pair::Packed(
                            self.b.op(&format!("llvm.shufflevector {x}, {y} [{c}, {}] : vector<2x{st}>", 2 + c)),
                        ),
                        (Pair::Values(x0, x1), Pair::Values(y0, y1)) => {
                            let pick = |a: &String, b: &String| if c == 0 { a.clone() } else { b.clone() };
                            Pair::Values(pick(x0, x1), pick(y0, y1))
                        }
                        (x, _) => x.clone(),
                    })
                    .collect()
            })
            .collect()
    }

    /// Thread `tid`'s share of staging the A tile of `slots` iterations
    /// from `s` (clamped to the walk's last whole step like the iterations
    /// they load, see `unrolled`; the `tail` step: one slot, elements past
    /// the reduction's end zero).
    fn stage_a(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        (s, slots, tail): (&str, i64, bool),
        tid: &str,
        stage: &Stage,
    ) -> Result<(), LowerError> {
        let row_words = 8 * slots;
        let total = TILE_M * tile.rows * row_words;
        let one = self.b.index(1);
        let m_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.m));
        let k_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.k));
        self.stage_turns(tid, total, |kc, p| {
            let rw = kc.b.index(row_words);
            let row = kc.b.op(&format!("arith.divui {p}, {rw} : index"));
            let word = kc.b.op(&format!("arith.remui {p}, {rw} : index"));
            let eight = kc.b.index(8);
            let w8 = kc.b.op(&format!("arith.remui {word}, {eight} : index"));
            let su = kc.slot_step(tile, (s, slots), (&word, 8));
            let tk = kc.b.index(TILE_K);
            let k0 = kc.b.muli(&su, &tk);
            let k = kc.k_offset(&w8, 0);
            let k = kc.b.addi(&k0, &k);
            let m = kc.b.addi(&tile.m0, &row);
            let m = kc.b.op(&format!("arith.minui {m}, {m_last} : index"));
            let mi = kc.b.delinearize(&m, &tile.m_sizes);
            let zeros: Vec<String> = tile.n_sizes.iter().map(|_| kc.b.index(0)).collect();
            let out_idx = kc.tile_index(tile, &mi, &zeros)?;
            let mut pair = Vec::with_capacity(2);
            for d in 0..2 {
                let kd = kc.offset(&k, d);
                pair.push(if tail {
                    let ok = kc.b.ult(&kd, &tile.k);
                    let clamped = kc.b.op(&format!("arith.minui {kd}, {k_last} : index"));
                    kc.fragment_element(j, mma.a, &out_idx, &clamped, Some(&ok))?
                } else {
                    kc.fragment_element(j, mma.a, &out_idx, &kd, None)?
                });
            }
            let at = kc.stage_word(mma, &row, &word);
            kc.store_stage_word(mma, stage, &at, Pair::Values(pair[0].clone(), pair[1].clone()));
            Ok(())
        })
    }

    /// A's register pairs of the lane (rows and `t` of `rows`) for slot
    /// `slot` of the staged tile: for each row tile, rows `g` and `g + 8`
    /// each at reduction indices `2 t ..` and `2 t + 8 ..`.
    pub(super) fn staged_a_pairs(&mut self, mma: &Mma, g: &str, t: &str, slot: i64, stage: &Stage) -> Vec<RowPairs> {
        let mut a = Vec::with_capacity(mma.rows as usize);
        for r in 0..mma.rows {
            let mut halves = [Vec::new(), Vec::new()];
            for (h, half) in halves.iter_mut().enumerate() {
                let row = self.offset(g, TILE_M * r + 8 * h as i64);
                for d in [0, 4] {
                    let word = self.offset(t, 8 * slot + d);
                    let at = self.stage_word(mma, &row, &word);
                    half.push(self.load_stage_word(mma, stage, &at, false));
                }
            }
            let [lo, hi] = halves;
            a.push((lo, hi));
        }
        a
    }

    /// `body(p)` for each `p = tid + 256 i < total` (one turn of the
    /// block's threads each; the last turn guarded when partial).
    fn stage_turns(
        &mut self,
        tid: &str,
        total: i64,
        mut body: impl FnMut(&mut Self, &str) -> Result<(), LowerError>,
    ) -> Result<(), LowerError> {
        for turn in 0..(total + THREADS - 1) / THREADS {
            let p = self.offset(tid, turn * THREADS);
            let partial = (turn + 1) * THREADS > total;
            if partial {
                let end = self.b.index(total);
                let inside = self.b.ult(&p, &end);
                self.b.open_guard(&inside);
            }
            body(self, &p)?;
            if partial {
                self.b.close();
            }
        }
        Ok(())
    }

    /// The step a staged position belongs to: the iteration loaded
    /// together `at / per` from `s` (of `slots`), clamped to the walk's last
    /// whole step as `unrolled` clamps it; `s` itself for one slot.
    fn slot_step(&mut self, tile: &Tile, (s, slots): (&str, i64), (at, per): (&str, i64)) -> String {
        if slots == 1 {
            return s.to_owned();
        }
        let per = self.b.index(per);
        let slot = self.b.op(&format!("arith.divui {at}, {per} : index"));
        let step = self.b.addi(s, &slot);
        let one = self.b.index(1);
        let last = self.b.op(&format!("arith.subi {}, {one} : index", tile.main_end));
        self.b.op(&format!("arith.minui {step}, {last} : index"))
    }

    /// Word `word` of row `row` of the staged tile.
    fn stage_word(&mut self, mma: &Mma, row: &str, word: &str) -> String {
        let pitch = self.b.index(mma.stage_pitch());
        let at = self.b.muli(row, &pitch);
        self.b.addi(&at, word)
    }

    fn store_stage_word(&mut self, mma: &Mma, stage: &Stage, at: &str, pair: Pair) {
        match &stage.ptr {
            None => {
                let word = self.pack(&pair, mma.dtype);
                let word = self.word_bits(&word, mma.dtype, true);
                let ty = stage_ty(mma);
                self.b.line(&format!("memref.store {word}, %sa[{at}] : {ty}"));
            }
            Some(ptr) => {
                let [x, y] = self.unpack(&pair, mma.dtype);
                let two = self.b.index(2);
                let at2 = self.b.muli(at, &two);
                let lo = self.offset(&at2, stage.base);
                let hi = self.offset(&lo, 1);
                self.b.store(ptr, &lo, DType::F32, Val::f32(x));
                self.b.store(ptr, &hi, DType::F32, Val::f32(y));
            }
        }
    }

    /// Word `at` of the staged A tile (`b`: of the B tile) as a register
    /// pair.
    fn load_stage_word(&mut self, mma: &Mma, stage: &Stage, at: &str, b: bool) -> Pair {
        match &stage.ptr {
            None => {
                let (name, ty) = if b { ("%sb", stage_b_ty(mma)) } else { ("%sa", stage_ty(mma)) };
                let word = self.b.op(&format!("memref.load {name}[{at}] : {ty}"));
                Pair::Packed(self.word_bits(&word, mma.dtype, false))
            }
            Some(ptr) => {
                let two = self.b.index(2);
                let at2 = self.b.muli(at, &two);
                let lo = self.offset(&at2, if b { stage.b_base } else { stage.base });
                let hi = self.offset(&lo, 1);
                let x = self.b.load(ptr, &lo, DType::F32).ssa;
                let y = self.b.load(ptr, &hi, DType::F32).ssa;
                Pair::Values(x, y)
            }
        }
    }

    /// A packed register (`i32` for bf16, `vector<2xf16>` for f16, see
    /// [`Kc::pack`]) as the stage's `i32` word (`to_word`), or a word as a
    /// `vector<2 x bf16/f16>` pair.
    fn word_bits(&mut self, v: &str, dtype: DType, to_word: bool) -> String {
        let pair = format!("vector<2x{}>", storage(dtype));
        match (dtype, to_word) {
            (DType::F16, true) => self.b.op(&format!("llvm.bitcast {v} : {pair} to i32")),
            (_, true) => v.to_owned(),
            (_, false) => self.b.op(&format!("llvm.bitcast {v} : i32 to {pair}")),
        }
    }
}
