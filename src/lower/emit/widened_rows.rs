//! bf16 (and f16) rows widened into a stack slot before the FMAs that
//! read them.
//!
//! A contraction in output vectors (a projection from panels,
//! `..k,pkn->..pn`; `w · V`) broadcasts one element of its row operand
//! (the input `x`, the probabilities) per row of the tile and step of the
//! sum. Where that operand is bf16 and the step does not sum it by
//! `vdpbf16ps` (`emit::pair_dot`: only on AMD's AVX512-BF16; so narrow
//! tiles, `emit::registers`, an AVX-512 CPU without AVX512-BF16, and
//! Intel's cores outside their AMX tiles), each element was widened on
//! its own: a scalar load, a shift, a move into a
//! vector register and a broadcast, two of them on the vector pipes the
//! FMAs need, for two FMAs (four in wide tiles). The bf16 cpu_step
//! model's MLP projections ran at 35% of the FMA peak on the Zen 3 VM,
//! where their f32 twins ran at 90-100%.
//!
//! Here ([`Kc::widened_rows`]) the sum runs in stretches of
//! [`STRETCH`] steps: the tile's rows of the stretch are widened first,
//! 16 elements a vector, into a stack slot of f32 (24 KiB for 6 rows: in
//! L1; one slot for the kernel's tiles), and the stretch's FMAs then
//! broadcast each element from the slot (`vbroadcastss` from memory: a
//! load, no vector pipe), as in f32. Each output sums the same products
//! in the same order as before: the same bits (tested against the wide
//! tiles, which widen each element). Widening costs a quarter of a
//! vector operation an element, once per tile and stripe, where the
//! broadcasts took two for each element. On the Zen 3 VM
//! (`scripts/projection-lab.sh --base REV PROJECTION 100 THREADS bf16`,
//! against the build before, medians of 100 pairs): the down projection
//! 1.22x on two threads and 1.17x on one, gate 1.25x, o 1.31x, q 1.13x;
//! the bf16 cpu_step at b = 32, m_c = 8192 on two threads (three runs
//! alternated): the context `w · V` 8.6-8.9 -> 6.9-8.4 ms a layer, the
//! step's kernels 63.6-64.0 -> 52.4-64.8 ms.
//!
//! Tried first: both elements of a pair read as one 32-bit broadcast and
//! widened in the vector (a shift left of 16, a mask of the high half)
//! for two steps of the sum; LLVM kept all six broadcasts of a tile live
//! beside 12 accumulators and two rows of the panel, and spilled (the
//! down projection 0.86x); with each element's 32 bits loaded on their
//! own, it moved the shift before the broadcast (a scalar load, a vector
//! shift, a broadcast: 1.05-1.12x).
//!
//! The lane operand's 16 elements a step (a stripe of the weight's panel,
//! a row of V), where bf16 and adjacent, are split as well
//! ([`Kc::split_bf16_16`]): one load of 8 words, the even elements by a
//! shift and the odd ones by a mask, for two `vpmovzxwd` (shuffles) and
//! two shifts; the accumulators' lanes are then in the order `x0, x2, …,
//! x14, x1, …, x15`, shuffled there from the sums so far and back before
//! the store (the same bits). Tried alone before the slot (c245dcb), it
//! freed the shuffles' pipe while the broadcasts still bound the tile, and
//! was not kept; after it, in the projection lab against the slot alone
//! (100 pairs, two threads): down 1.03x, gate 1.06x, o 1.07x; the bf16
//! cpu_step's context `w · V` (both together, against neither) 7.8-8.0 ->
//! 5.4-5.8 ms a layer on two threads.
//!
//! Wide tiles (AVX-512: 4 rows × 4 vectors of 16) split a row's two
//! adjacent vectors together ([`Kc::split_bf16_32`]): one load of 16
//! words, a shift and a mask for 32 elements, the pair's accumulators
//! holding its even and its odd outputs (`split_bf16_16`'s halves would
//! each take a move into the upper half of a 512-bit register). On a
//! 2-core Emerald Rapids VM (AVX-512 without AVX512-BF16 or AMX: rows and
//! split were narrow tiles' alone before; `scripts/projection-lab.sh
//! --base REV PROJECTION 100 2 bf16`, against the build before, the
//! same bits): the down projection 1.22x, gate 1.28x, o 1.20x; the bf16
//! cpu_step at b = 32 on two threads (alternated runs): see README.
//!
//! f16 rows (Llama-2's checkpoints are f16) take the same slot, widened
//! 16 at a time (`vcvtph2ps`), where each element had been widened on
//! its own (a scalar load, a conversion and a broadcast, each on a pipe
//! the FMAs need); an f16 lane operand is widened a vector at a time, as
//! before (f16 is not the top half of an f32: no split). The same bits.
//! On the 2-core Emerald Rapids VM, the first layer of Llama-2-7B in f16
//! (`PROJECTION_LAB_CONFIG=examples/llama-2-7b/config.json
//! scripts/projection-lab.sh --base 4a8d025 PROJECTION 10 2 f16`, b = 32):
//! q_proj (4096 -> 4096) 1.96x, up_proj (4096 -> 11008) 1.97x, down_proj
//! (11008 -> 4096) 1.61x; in cpu_step with its first 2 layers
//! (`BIFURC_BENCH_CONFIG`, b = 16, m_c = 2048, two threads) the
//! bifurcated step 190.8 -> 111.0 ms, each MLP projection 14.3-17.2 ->
//! 7.3-12.0 ms.
//!
//! Tried after them and not kept: the bf16 panels' next line column
//! prefetched as f32's next stripe is (`Kc::stripe_ahead`, a bf16 line
//! two stripes wide, each line fetched twice): 0.98x on the down and gate
//! projections on two threads and on one (100 pairs each).

use crate::ir::{DType, Op, Value};
use crate::lower::LowerError;

use super::chunks::SumPart;
use super::panel_ahead::LinesAhead;
use super::registers::NARROW_VECTOR_ROWS;
use super::Kc;

/// Natural lanes into the order of a split bf16 operand
/// (`Kc::split_bf16_16`: the even elements, then the odd), and back.
const EVEN_ODD: [usize; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15];
const NATURAL: [usize; 16] = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15];
/// A pair of adjacent vectors' 32 lanes (`a`, then `b`) into the order
/// of a split of 32 bf16 (`Kc::split_bf16_32`: the even elements in one
/// vector, the odd in the other), and back into `a` and `b`.
const EVENS: [usize; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
const ODDS: [usize; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];
const FIRST: [usize; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
const SECOND: [usize; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];

/// Steps of the sum a stretch widens at a time: 6 rows of it in 24 KiB.
pub(super) const STRETCH: usize = 1024;

/// Where an accumulator of a tile of widened rows stands in the split of
/// a bf16 lane operand ([`Kc::adjacent_pairs`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pair {
    /// Split on its own, 16 elements (`Kc::split_bf16_16`).
    Alone,
    /// The first of two adjacent vectors split together, 32 elements
    /// (`Kc::split_bf16_32`): its even ones.
    First,
    /// The second: the odd ones.
    Second,
}

#[cfg(test)]
thread_local! {
    /// Whether this thread's kernels widen rows into a slot
    /// (`Some(false)`: each row element on its own; see
    /// [`with_widened_rows`]).
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the rows widened into a slot (`on`, as the CPU step
/// chooses) or each element on its own (tests: the bits to match).
#[cfg(test)]
pub(crate) fn with_widened_rows<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::pair_dot::with_forced(&FORCED, on, f)
}

/// A contraction whose row operand is widened into a stack slot (see
/// [`Kc::widened_rows`]): the summed letter and the operands' roles.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WidenedRows {
    sum: char,
    /// The operand with the output's last letter, last (a panel, V).
    lane: usize,
    /// The other, bf16, the summed letter last (the input, the
    /// probabilities).
    row: usize,
}

impl Kc<'_> {
    /// Node `j` as a contraction in output vectors of 16 whose row operand
    /// is widened a stretch at a time (see the module doc): an einsum of
    /// two operands, one summed letter; the row operand bf16 (on a CPU
    /// without the bf16 dot product) or f16 with the summed letter last, read
    /// through views that keep its elements adjacent (or, in a projection
    /// from panels, views it reads as vectors), without the output's last
    /// letter; the lane operand with the output's last letter last,
    /// read as vectors through views that are not a concat (whose parts
    /// the sum would split at). `None` otherwise.
    pub(crate) fn widened_rows(&self, j: usize) -> Option<WidenedRows> {
        #[cfg(test)]
        if FORCED.with(std::cell::Cell::get) == Some(false) {
            return None;
        }
        let (spec, inputs, x, reduced) = self.lanes16_candidate(j)?;
        let [(sum, _)] = reduced.as_slice() else { return None };
        let lane = spec.inputs.iter().position(|s| s.contains(&x))?;
        let row = 1 - lane;
        let (lane_subs, row_subs) = (&spec.inputs[lane], &spec.inputs[row]);
        // bf16 rows where the CPU sums bf16 pairs by its dot product
        // (`emit::pair_dot`) are its, even where it does not take them.
        let dtype = self.graph.dtype_of(inputs[row]);
        if self.bf16_dot && dtype == DType::BF16 {
            return None;
        }
        // Read through views that merge its last axis (the attention's
        // heads into the output projection's input) only from a multiple
        // of 16 along it: a panel projection's stretches start at
        // multiples of STRETCH (a chunked sum's chunks need not).
        let panel = self.panel_operand(j).is_some();
        let ok = lane_subs.last() == Some(&x)
            && row_subs.last() == Some(sum)
            && row_subs.iter().filter(|c| *c == sum).count() == 1
            && !row_subs.contains(&x)
            && matches!(dtype, DType::BF16 | DType::F16)
            && (self.adjacent_last(inputs[row]) || (self.vector_readable(inputs[row]) && panel))
            && self.vector_readable(inputs[lane])
            && self.no_concat(inputs[lane]);
        ok.then_some(WidenedRows { sum: *sum, lane, row })
    }

    /// Whether `v` is a stored buffer or views of one with no concat.
    fn no_concat(&self, v: Value) -> bool {
        if self.stored(v).is_some() {
            return true;
        }
        let Value::Node(j) = v else { return false };
        let node = &self.graph.nodes[j];
        let view =
            matches!(node.op, Op::Reshape { .. } | Op::Transpose { .. } | Op::Broadcast { .. } | Op::Slice { .. });
        view && node.inputs.first().is_some_and(|&first| self.no_concat(first))
    }

    /// Einsum node `j` with its row operand widened a stretch at a time
    /// (`wr`, see [`Kc::widened_rows`]) at every index of `idxs`: each the
    /// 16 outputs from it along the output's last axis, as a
    /// `vector<16xf32>`; the sum over `part`'s range where given (a chunk
    /// of a chunked sum, from its sums so far), with `ahead`'s line of the
    /// next block prefetched each step.
    pub(crate) fn widened_rows_vec(
        &mut self,
        j: usize,
        wr: WidenedRows,
        idxs: &[Vec<String>],
        (ahead, part): (Option<&LinesAhead>, Option<&SumPart>),
    ) -> Result<Vec<String>, LowerError> {
        let (spec, inputs, len) = self.pair_sum(j, wr.sum, wr.row)?;
        let len = self.sizes(std::slice::from_ref(&len))?.remove(0);
        let vty = "vector<16xf32>";
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let envs = super::contract::output_envs(&spec.output, idxs);
        let (inits, (from, to)) = match part {
            Some(p) => {
                let to = self.b.op(&format!("arith.minui {}, {len} : index", p.to));
                (p.inits.clone(), (p.from.clone(), to))
            }
            None => (vec![zero; idxs.len()], (self.b.index(0), len.clone())),
        };
        // A bf16 lane operand split into its even and odd elements (see
        // `split_bf16_16`; in wide tiles a row's adjacent vectors in pairs,
        // `split_bf16_32`): the accumulators' lanes in that order, from
        // the sums so far and back at the end.
        let split = self.graph.dtype_of(inputs[wr.lane]) == DType::BF16 && self.adjacent_last(inputs[wr.lane]);
        let paired = match spec.output.last() {
            Some(&x) if split && !self.narrow => self.adjacent_pairs(&envs, x),
            _ => vec![Pair::Alone; envs.len()],
        };
        let inits = if split { self.split_order(&inits, &paired, (&EVEN_ODD, (&EVENS, &ODDS))) } else { inits };
        let stretch = self.b.index(STRETCH as i64);
        let (res, start, accs) = self.b.open_for_typed_from(&from, &to, &stretch, &inits, vty);
        let end = self.b.addi(&start, &stretch);
        let end = self.b.op(&format!("arith.minui {end}, {to} : index"));
        // The tile's rows (each env's row at the stretch's start, once
        // each; an env without the sum) and which one each env reads.
        let mut starts: Vec<Vec<String>> = Vec::new();
        let mut rows: Vec<Vec<(char, String)>> = Vec::new();
        let mut of_env = Vec::with_capacity(envs.len());
        for env in &envs {
            let mut at_start = env.clone();
            at_start.push((wr.sum, start.clone()));
            let at = self.operand_index(j, &spec.inputs[wr.row], &at_start)?;
            let k = match starts.iter().position(|a| *a == at) {
                Some(k) => k,
                None => {
                    starts.push(at);
                    rows.push(env.clone());
                    rows.len() - 1
                }
            };
            of_env.push(k);
        }
        // One slot for every tile of a kernel (the whole tiles' rows; a
        // tile of more rows would take one of its own).
        let slot_rows = rows.len().max(NARROW_VECTOR_ROWS);
        let slot = self.b.stack_f32(&format!("widened_rows{slot_rows}"), slot_rows * STRETCH, None);
        self.widen_stretch(j, (&spec.inputs[wr.row], inputs[wr.row], wr.sum), &rows, &slot, (&start, &end))?;
        // The stretch's FMAs, each element broadcast from the slot.
        let one = self.b.index(1);
        let (next, l, accs) = self.b.open_for_typed_from(&start, &end, &one, &accs, vty);
        if let Some(a) = ahead.filter(|a| a.sum == wr.sum) {
            self.prefetch_line(a, &l);
        }
        let e = self.b.subi(&l, &start);
        let mut broadcast: Vec<Option<String>> = vec![None; rows.len()];
        let mut lanes: Vec<(Vec<String>, String)> = Vec::new();
        let mut odd: Option<String> = None;
        let mut nexts = Vec::with_capacity(accs.len());
        for (((env, acc), &k), pair) in envs.iter().zip(&accs).zip(&of_env).zip(&paired) {
            let x = match &broadcast[k] {
                Some(x) => x.clone(),
                None => {
                    let at = self.b.index((k * STRETCH) as i64);
                    let at = self.b.addi(&at, &e);
                    let x = self.b.load(&slot, &at, DType::F32).ssa;
                    let x = self.b.op(&format!("vector.broadcast {x} : f32 to {vty}"));
                    broadcast[k] = Some(x.clone());
                    x
                }
            };
            let mut env = env.clone();
            env.push((wr.sum, l.clone()));
            let at = self.operand_index(j, &spec.inputs[wr.lane], &env)?;
            let y = match lanes.iter().find(|(a, _)| *a == at) {
                Some((_, y)) => y.clone(),
                None => {
                    let y = match (split, pair) {
                        (true, Pair::First) => {
                            let (ptr, off) = self.pair_address(inputs[wr.lane], &at)?;
                            let (even, rest) = self.split_bf16_32(&ptr, &off);
                            odd = Some(rest);
                            even
                        }
                        (true, Pair::Second) => {
                            odd.take().ok_or_else(|| self.unsupported(j, "a pair of vectors without its first"))?
                        }
                        (true, Pair::Alone) => {
                            let (ptr, off) = self.pair_address(inputs[wr.lane], &at)?;
                            self.split_bf16_16(&ptr, &off)
                        }
                        (false, _) => self.load_vector_view(inputs[wr.lane], &at, 16)?,
                    };
                    lanes.push((at, y.clone()));
                    y
                }
            };
            let p = self.b.op(&format!("arith.mulf {x}, {y} fastmath<contract> : {vty}"));
            nexts.push(self.b.op(&format!("arith.addf {acc}, {p} fastmath<contract> : {vty}")));
        }
        self.b.close_for_typed(&nexts, vty);
        self.b.close_for_typed(&next, vty);
        Ok(if split { self.split_order(&res, &paired, (&NATURAL, (&FIRST, &SECOND))) } else { res })
    }

    /// Which of `envs` (a tile's outputs, a vector of 16 along `x` each)
    /// pair up for [`Kc::split_bf16_32`]: an env and the next, the same
    /// but for `x`, 16 further along it (as the emitters built them:
    /// `Builder::offset_between`).
    fn adjacent_pairs(&self, envs: &[Vec<(char, String)>], x: char) -> Vec<Pair> {
        let next_to = |a: &[(char, String)], b: &[(char, String)]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|((ca, va), (cb, vb))| {
                    ca == cb && if *ca == x { self.b.offset_between(va, vb) == Some(16) } else { va == vb }
                })
        };
        let mut pairs = vec![Pair::Alone; envs.len()];
        let mut k = 0;
        while k + 1 < envs.len() {
            if next_to(&envs[k], &envs[k + 1]) {
                pairs[k] = Pair::First;
                pairs[k + 1] = Pair::Second;
                k += 2;
            } else {
                k += 1;
            }
        }
        pairs
    }

    /// `vs` (accumulators, paired as `pairs` says) with their lanes taken
    /// in `alone`'s order where alone, a pair's 32 in `first`'s and
    /// `second`'s (see [`Kc::split_bf16_32`]).
    fn split_order(
        &mut self,
        vs: &[String],
        pairs: &[Pair],
        (alone, (first, second)): (&[usize; 16], (&[usize; 16], &[usize; 16])),
    ) -> Vec<String> {
        let mut out = Vec::with_capacity(vs.len());
        for (k, (v, pair)) in vs.iter().zip(pairs).enumerate() {
            out.push(match pair {
                Pair::Alone => self.lanes_shuffled(v, v, alone),
                Pair::First => self.lanes_shuffled(v, &vs[k + 1], first),
                Pair::Second => self.lanes_shuffled(&vs[k - 1], v, second),
            });
        }
        out
    }

    /// The 32 bf16 from element `off` of `ptr` as two `vector<16xf32>`:
    /// the even elements, then the odd ([`Kc::split_words`] of 16). With
    /// AVX-512's registers of 16 f32 that is one shift and a mask for 32
    /// elements, where `split_bf16_16`'s halves would each take a move
    /// into the vector's upper half, and the plain widening a shuffle and
    /// a shift each 16.
    fn split_bf16_32(&mut self, ptr: &str, off: &str) -> (String, String) {
        self.split_words(ptr, off, 16)
    }

    /// The 16 bf16 from element `off` of `ptr` as a `vector<16xf32>` with
    /// its lanes in the order `x0, x2, …, x14, x1, x3, …, x15`
    /// ([`Kc::split_words`] of 8, the halves side by side). Where the CPU
    /// widens 8 bf16 at a time (`vpmovzxwd`, a shuffle) and then shifts
    /// them, that is one shift and a mask (any vector pipe) for two
    /// shuffles and two shifts.
    fn split_bf16_16(&mut self, ptr: &str, off: &str) -> String {
        let (even, odd) = self.split_words(ptr, off, 8);
        let order: Vec<String> = (0..16).map(|i| i.to_string()).collect();
        self.b.op(&format!("vector.shuffle {even}, {odd} [{}] : vector<8xf32>, vector<8xf32>", order.join(", ")))
    }

    /// `2 · words` bf16 from element `off` of `ptr` as two
    /// `vector<words x f32>`, the even elements and the odd: one load of
    /// `words` words of 32 bits, each shifted left by 16 for the even, its
    /// high half masked for the odd (bf16 is the top half of an f32).
    fn split_words(&mut self, ptr: &str, off: &str, words: usize) -> (String, String) {
        let (ity, fty) = (format!("vector<{words}xi32>"), format!("vector<{words}xf32>"));
        let p = self.b.element_ptr(ptr, off, "bf16");
        let w = self.b.op(&format!("llvm.load {p} {{alignment = 2 : i64}} : !llvm.ptr -> {ity}"));
        let sixteen = self.b.hoist(&format!("arith.constant dense<16> : {ity}"));
        let high = self.b.hoist(&format!("arith.constant dense<-65536> : {ity}"));
        let even = self.b.op(&format!("arith.shli {w}, {sixteen} : {ity}"));
        let odd = self.b.op(&format!("arith.andi {w}, {high} : {ity}"));
        let [even, odd] = [even, odd].map(|v| self.b.op(&format!("arith.bitcast {v} : {ity} to {fty}")));
        (even, odd)
    }

    /// The lanes of `a` then `b` (`vector<16xf32>` each) taken in `order`.
    fn lanes_shuffled(&mut self, a: &str, b: &str, order: &[usize; 16]) -> String {
        let order: Vec<String> = order.iter().map(usize::to_string).collect();
        self.b.op(&format!("vector.shuffle {a}, {b} [{}] : vector<16xf32>, vector<16xf32>", order.join(", ")))
    }

    /// Elements `start..end` of the row operand (`subs`, `v`, summed along
    /// `sum`) at each of `rows` (an env each, without the sum) widened
    /// into `slot`, row `k` from element `k · STRETCH` (see
    /// [`Kc::widen_run`]).
    fn widen_stretch(
        &mut self,
        j: usize,
        (subs, v, sum): (&[char], Value, char),
        rows: &[Vec<(char, String)>],
        slot: &str,
        (start, end): (&str, &str),
    ) -> Result<(), LowerError> {
        let count = self.b.subi(end, start);
        for (k, env) in rows.iter().enumerate() {
            let base = self.b.index((k * STRETCH) as i64);
            self.widen_run((j, subs, v, sum), env, (start, &count), (slot, &base))?;
        }
        Ok(())
    }

    /// `count` elements of operand `v` (read by node `j` as `subs`) from
    /// index `start` of letter `sum`, the other letters as `env` binds
    /// them, widened to f32 into `slot` from element `base`: 16 a vector
    /// (from a multiple of 16 past `start`, each vector read through the
    /// views), the rest one at a time. The fused attention widens its
    /// blocks of K and V rows so too (`emit::fused`), and the
    /// rows-in-lanes q·K its blocks of a bf16 cache (`emit::rows_in_lanes`).
    pub(super) fn widen_run(
        &mut self,
        (j, subs, v, sum): (usize, &[char], Value, char),
        env: &[(char, String)],
        (start, count): (&str, &str),
        (slot, base): (&str, &str),
    ) -> Result<(), LowerError> {
        let index = |kc: &mut Self, e: &str| -> Result<Vec<String>, LowerError> {
            let mut env = env.to_vec();
            env.push((sum, kc.b.addi(start, e)));
            kc.operand_index(j, subs, &env)
        };
        self.widen_into(
            count,
            (slot, base),
            &mut |kc, e| {
                let from = index(kc, e)?;
                kc.load_vector_view(v, &from, 16)
            },
            &mut |kc, e| {
                let from = index(kc, e)?;
                kc.loadf(v, &from)
            },
        )
    }

    /// `count` elements widened to f32 into `slot` from element `base`:
    /// 16 a vector (`vector(kc, e)`: elements `e .. e + 16`, from a
    /// multiple of 16), the rest one at a time (`scalar(kc, e)`), each
    /// loaded as f32 by the caller's closures ([`Kc::widen_run`] through
    /// the operand's views, `emit::half_panels` from a dense buffer).
    pub(super) fn widen_into(
        &mut self,
        count: &str,
        (slot, base): (&str, &str),
        vector: &mut dyn FnMut(&mut Self, &str) -> Result<String, LowerError>,
        scalar: &mut dyn FnMut(&mut Self, &str) -> Result<String, LowerError>,
    ) -> Result<(), LowerError> {
        let sixteen = self.b.index(16);
        let vectors = self.b.op(&format!("arith.divui {count}, {sixteen} : index"));
        let whole = self.b.muli(&vectors, &sixteen);
        let one = self.b.index(1);
        let i = self.b.open_loop(&vectors);
        let e = self.b.muli(&i, &sixteen);
        let x = vector(self, &e)?;
        let to = self.b.addi(base, &e);
        self.b.store_vector(slot, &to, &x, 16, DType::F32);
        self.b.close();
        let e = self.b.open_loop_from(&whole, count, &one);
        let x = scalar(self, &e)?;
        let to = self.b.addi(base, &e);
        self.b.store(slot, &to, DType::F32, super::builder::Val::f32(x));
        self.b.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::interp::Tensor;

    /// A bf16 projection from panels (`x @ Wᵀ`, more inputs than a stretch
    /// and not a multiple of 16: a stretch's last elements widened one at
    /// a time), one whose input merges two axes (the attention's output,
    /// `[b, h, 1, k]` transposed and reshaped to `[b, 1, h·k]`) and a bf16
    /// `w · V` (the probabilities a slice from an odd
    /// offset, as the bifurcated attention's decode part reads them; V
    /// long enough at the largest m to run in chunks), without the bf16
    /// dot product: the rows widened into the slot in narrow tiles (the
    /// lane operand split 16 at a time) and in wide ones (a row's adjacent
    /// vectors split together, 32 at a time), and each element widened on
    /// its own in wide tiles. All three sum the same products in the same
    /// order: the same bits; and the interpreter's values, at b and m on
    /// either side of a tile and a stretch, odd and even.
    #[test]
    fn widened_rows_sum_as_single_steps() {
        widened_rows_in(crate::ir::DType::BF16);
    }

    /// [`widened_rows_sum_as_single_steps`] in f16: the rows widened into
    /// the slot as bf16's are (by `vcvtph2ps`, 16 at a time), the lane
    /// operand widened a vector at a time (no split: f16 is not the top
    /// half of an f32).
    #[test]
    fn f16_rows_are_widened_too() {
        widened_rows_in(crate::ir::DType::F16);
    }

    fn widened_rows_in(dtype: crate::ir::DType) {
        let dt = dtype.name();
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 64, "d": 1093, "o": 128}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": dt},
                {"name": "w", "role": "weight", "shape": ["o", "d"], "dtype": dt},
                {"name": "p", "role": "activation", "shape": ["b", "h", "m+5"], "dtype": dt},
                {"name": "v", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["h", "m", "k"], "dtype": dt},
                {"name": "a", "role": "activation", "shape": ["b", "h", 1, "k"], "dtype": dt},
                {"name": "wo", "role": "weight", "shape": ["o", 128], "dtype": dt}
            ],
            "nodes": [
                {"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}},
                {"id": "at", "op": "transpose", "inputs": ["a"], "attrs": {"perm": [0, 2, 1, 3]}},
                {"id": "ar", "op": "reshape", "inputs": ["at"], "attrs": {"shape": ["b", 1, 128]}},
                {"id": "z", "op": "matmul", "inputs": ["ar", "wo"], "attrs": {"transpose_b": true}},
                {"id": "ps", "op": "slice", "inputs": ["p"], "attrs": {"axis": 2, "start": 5, "end": "m+5"}},
                {"id": "o", "op": "einsum", "inputs": ["ps", "v"], "attrs": {"spec": "bhm,hmk->bhk"}}
            ],
            "outputs": [{"name": "y", "node": "y"}, {"name": "o", "node": "o"}, {"name": "z", "node": "z"}]
        });
        let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
        let compile_with = |narrow: bool, widened: bool, dot: bool| {
            crate::lower::emit::with_narrow_tiles(narrow, || {
                crate::lower::emit::with_amx(false, || {
                    crate::lower::emit::with_bf16_dot(dot, || {
                        // The projections by these tiles, not a chunk of
                        // the panel widened at once (`emit::half_panels`).
                        super::super::half_panels::with_half_panels(false, || {
                            super::with_widened_rows(widened, || {
                                let step = crate::lower::CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
                                let text =
                                    crate::lower::emit::emit(step.graph(), step.program(), crate::lower::Target::Cpu)
                                        .unwrap_or_else(|e| panic!("{e}"));
                                (step, text)
                            })
                        })
                    })
                })
            })
        };
        let compile = |narrow: bool, widened: bool| compile_with(narrow, widened, false);
        let (narrow, narrow_text) = compile(true, true);
        let (wide, wide_text) = compile(false, true);
        let (single, single_text) = compile(false, false);
        // The slot: in the three sums' kernels where the rows are
        // widened, in none where each element is; 32 elements of the lane
        // operand split at once only in wide tiles.
        let slots = |text: &str| text.split("func.func").filter(|f| f.contains("llvm.alloca")).count();
        let pairs = |text: &str| text.split("func.func").filter(|f| f.contains("-> vector<16xi32>")).count();
        assert_eq!(slots(&narrow_text), 3, "rows widened into a slot in each sum:\n{narrow_text}");
        assert_eq!(slots(&wide_text), 3, "rows widened into a slot in each sum:\n{wide_text}");
        assert_eq!(slots(&single_text), 0, "single steps:\n{single_text}");
        if dtype == crate::ir::DType::F16 {
            // A CPU's bf16 dot product changes nothing in f16.
            let (_, dot_text) = compile_with(false, true, true);
            assert_eq!(dot_text, wide_text, "f16 with the bf16 dot product");
        }
        let split = if dtype == crate::ir::DType::BF16 { 3 } else { 0 };
        assert_eq!(
            (pairs(&narrow_text), pairs(&wide_text)),
            (0, split),
            "adjacent vectors split in pairs:\n{wide_text}"
        );
        for (b, m) in [(1, 1), (3, 7), (6, 64), (7, 33), (13, 1025), (32, 3000)] {
            let at = crate::lower::emit::testing::point(&[("b", b), ("m", m)]);
            // The inputs as bf16 holds them, so the interpreter multiplies
            // the same values: the outputs differ by their bf16 rounding.
            let inputs = crate::lower::emit::testing::held_inputs(&graph, &at, 17, dtype);
            let want = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let run = |step: &crate::lower::CpuStep| -> HashMap<String, Tensor> {
                step.run(&at, &inputs).unwrap_or_else(|e| panic!("b = {b}, m = {m}: {e}"))
            };
            let (got, paired, single) = (run(&narrow), run(&wide), run(&single));
            for name in ["y", "o", "z"] {
                let bits = |t: &Tensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let what = format!("{dtype:?}, b = {b}, m = {m}: {name}");
                assert_eq!(bits(&got[name]), bits(&single[name]), "{what}, narrow against single steps");
                assert_eq!(bits(&paired[name]), bits(&single[name]), "{what}, wide against single steps");
                assert_eq!(got[name].shape, want[name].shape);
                // The bf16 output's rounding and the sums' order: within
                // 1% of the largest output.
                let top = want[name].data.iter().fold(0f32, |a, y| a.max(y.abs()));
                for (i, (x, y)) in got[name].data.iter().zip(&want[name].data).enumerate() {
                    let what = format!("{what} element {i}");
                    assert!((x - y).abs() <= 1e-2 * top, "{what}: {x} vs {y} (largest {top})");
                }
            }
        }
    }
}
