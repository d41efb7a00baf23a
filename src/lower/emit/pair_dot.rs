//! bf16 contractions summed in pairs by the CPU's bf16 dot product.
//!
//! A bf16 weight the CPU step keeps in paired panels (`cpu::panels`:
//! `[out / 64, in / 2, 64, 2]`, each output's two consecutive inputs side
//! by side) is read by the einsum `..zt,pzxt->..px`, where `t` (size 2)
//! is the last letter of both operands: the input `x` as `[.., in / 2, 2]`
//! (a reshape) and the panel. On a CPU with AVX512-BF16 each step of the
//! sum over `z` is one `vdpbf16ps` per 16 outputs: the 32 bf16 of the
//! panel's stretch (16 outputs × the pair) against the input's pair
//! broadcast, both products added to the f32 accumulator. Against the
//! widened panels (`..k,pkn->..pn` in f32 lanes) that is half the FMAs and
//! no widening. The products are exact in f32 and each lane adds two per
//! step, where the FMAs added one: the sums differ from them in rounding
//! only, and the instruction treats subnormal inputs and results as zero.
//! The context `q·K` with its rows in the lanes sums its bf16 pairs the
//! same way (`emit::rows_in_lanes`).
//!
//! All of this only where the host prefers it ([`prefer_bf16_dot`]: on
//! AMD; Intel's cores run `vdpbf16ps` at half the FMAs' rate, and there
//! the bf16 operands are widened to f32 and summed by FMAs).
//!
//! A bf16 contraction whose other operand has the summed axis just before
//! the output's last (`w · V`: V `[.., m, k]`; also plain bf16 panels)
//! forms its pairs while it runs ([`Kc::pair_rows`]): each step loads 16
//! outputs' worth of V's rows `2z` and `2z + 1`, interleaves them (one
//! `vector.shuffle`, shared by the tile's rows) and reads the other
//! operand's elements `2z`, `2z + 1`, adjacent in its last axis, as one
//! pair; an odd length's last element is one widened FMA step. The bf16
//! cpu_step model's context `w · V` 5.0-5.3 -> 3.8-4.0 ms a layer (b =
//! 32, m_c = 8192, one thread), its step 32.9-33.5 -> 30.0-30.1 ms.
//!
//! A bf16 contraction summed along both operands' last axis (`x @ Wᵀ`
//! with `W` not in panels) loads 32 adjacent elements of each a step, one
//! `vdpbf16ps` per output of the register tile, instead of widening 16 of
//! each to f32 ([`Kc::dot_sum`], in the vector sums of `emit::contract`).
//! The bf16 GPT-2's tied logits (2 layers, vocab 50257, b = 32, one
//! thread), before the CPU step kept them in panels: 47.2 -> 18.4 ms,
//! its step 56.8 -> 29.0 ms.

use crate::ir::{DType, EinsumSpec, Op, Poly, Value};
use crate::lower::LowerError;

use super::chunks::SumPart;
use super::panel_ahead::LinesAhead;
use super::Kc;

/// The letters of a contraction summed in bf16 pairs (see
/// [`Kc::pair_dot`]) and the operands' roles.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PairDot {
    /// The summed letter walked by the loop (`z`).
    sum: char,
    /// The summed letter of size 2 inside each dot product (`t`).
    pair: char,
    /// The operand with the output's last letter (the panel).
    lane: usize,
    /// The other operand (the input, broadcast).
    row: usize,
}

impl PairDot {
    /// The summed letter walked by the loop.
    pub(super) fn sum(&self) -> char {
        self.sum
    }
}

/// The LLVM intrinsic of `vdpbf16ps` on 512-bit vectors.
pub(super) const DPBF16PS: &str = "llvm.x86.avx512bf16.dpbf16ps.512";

/// Whether this machine's CPU has AVX512-BF16 (`vdpbf16ps`): the JIT
/// compiles for the host, so its kernels may use it (see
/// [`prefer_bf16_dot`] for whether they do).
pub(crate) fn host_has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU kernels sum bf16 pairs by `vdpbf16ps` (paired weight
/// panels, the context `q·K`'s packed rows, `w·V`'s interleaved rows):
/// where the host has it and it is the faster way, on AMD: on an EPYC VM
/// the pairs halved the bf16 model's q·K (cpu_step at b = 32, m_c = 8192,
/// one thread: 5.7 -> 2.9 ms a layer). Intel's cores run it at half the
/// FMAs' rate of products: on an
/// Emerald Rapids VM, 16 independent chains of `vdpbf16ps` on 512-bit
/// vectors summed 40 G products/s a core against 80-85 G for f32 FMAs
/// (one instruction every two cycles against two a cycle), and the bf16
/// model's kernels were faster with bf16 widened to f32 and summed by
/// FMAs: q·K 7.0-8.5 -> 5.0-5.8 ms a layer, w·V 8.0-9.7 -> 6.2-6.6, the
/// step 62-67 -> 51-55 ms (one thread, alternated runs).
///
/// [`BF16_DOT_ENV`] overrides the choice (`on`, `off`; `auto` or unset:
/// this one); [`bf16_dot_choice`], which
/// [`CpuStep::compile`](crate::lower::CpuStep::compile) calls, rejects a
/// value it cannot take, and here it counts as `auto`.
pub(crate) fn prefer_bf16_dot() -> bool {
    bf16_dot_choice().unwrap_or_else(|_| host_has_bf16_dot() && host_is_amd())
}

/// [`prefer_bf16_dot`]'s answer, or the error naming a value of
/// [`BF16_DOT_ENV`] it cannot take ([`bf16_dot_setting`]).
pub(crate) fn bf16_dot_choice() -> Result<bool, LowerError> {
    #[cfg(test)]
    if let Some(dot) = FORCED_BF16_DOT.with(std::cell::Cell::get) {
        return Ok(dot && host_has_bf16_dot());
    }
    let has = host_has_bf16_dot();
    let setting = bf16_dot_setting(std::env::var(BF16_DOT_ENV).ok().as_deref(), has)?;
    Ok(setting.unwrap_or_else(|| has && host_is_amd()))
}

/// The environment variable that overrides how the CPU step sums bf16
/// pairs ([`CpuStep::compile`](crate::lower::CpuStep::compile)): `on`
/// (by `vdpbf16ps`; the CPU must have AVX512-BF16), `off` (bf16 widened to
/// f32 and summed by FMAs), or `auto` (the default: the dot product on AMD
/// only, where it halved the bf16 q·K; Intel's cores run it at half the
/// FMAs' rate, see `prefer_bf16_dot`).
pub const BF16_DOT_ENV: &str = "BIFURC_CPU_BF16_DOT";

/// The override that [`BF16_DOT_ENV`]'s `value` asks for on a CPU that
/// has AVX512-BF16 or not (`has`): `None` for `auto` (or unset), or an
/// error naming the variable and what it may be.
pub(crate) fn bf16_dot_setting(value: Option<&str>, has: bool) -> Result<Option<bool>, LowerError> {
    cpu_setting(BF16_DOT_ENV, value, || has, "this CPU has no AVX512-BF16 (no `vdpbf16ps`)")
}

/// The override that environment variable `var`'s `value` asks for: `None`
/// for `auto` (or unset, or empty), `Some(false)` for `off`, `Some(true)`
/// for `on` where `has()` says the host can (else an error saying what it
/// `lacks`); any other value is an error naming the variable and its values.
pub(crate) fn cpu_setting(
    var: &str,
    value: Option<&str>,
    has: impl FnOnce() -> bool,
    lacks: &str,
) -> Result<Option<bool>, LowerError> {
    match value.map(str::trim) {
        None | Some("" | "auto") => Ok(None),
        Some("off") => Ok(Some(false)),
        Some("on") if has() => Ok(Some(true)),
        Some("on") => Err(LowerError::Setting(format!("{var}=on, but {lacks}: unset it, or set `auto` or `off`"))),
        Some(other) => {
            Err(LowerError::Setting(format!("{var}={other:?} is not a setting: `auto` (the default), `on` or `off`")))
        }
    }
}

/// Whether the CPU's vendor (CPUID leaf 0) is AMD.
fn host_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // An `unsafe fn` in older Rust releases.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is an instruction of every x86_64 CPU; leaf 0 only
        // reads the vendor's name and the highest leaf.
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
thread_local! {
    /// This thread's override of [`prefer_bf16_dot`] (see [`with_bf16_dot`]).
    static FORCED_BF16_DOT: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`prefer_bf16_dot`] answering `dot` on this thread (still
/// `false` where the host has no AVX512-BF16): tests compile and emit
/// both ways where they can, whichever this host prefers.
#[cfg(test)]
pub(crate) fn with_bf16_dot<R>(dot: bool, f: impl FnOnce() -> R) -> R {
    with_forced(&FORCED_BF16_DOT, dot, f)
}

/// Runs `f` with the test override `forced` (a thread-local choice of the
/// CPU's code: see [`with_bf16_dot`], `amx::with_amx`) set to `value` on
/// this thread, and restores it.
#[cfg(test)]
pub(super) fn with_forced<R>(
    forced: &'static std::thread::LocalKey<std::cell::Cell<Option<bool>>>,
    value: bool,
    f: impl FnOnce() -> R,
) -> R {
    let before = forced.with(|c| c.replace(Some(value)));
    let out = f();
    forced.with(|c| c.set(before));
    out
}

impl Kc<'_> {
    /// Node `j` as a candidate for the bf16 dot product on this CPU (see
    /// [`Kc::lanes16_candidate`]). `None` without AVX512-BF16.
    #[allow(clippy::type_complexity)]
    fn bf16_dot_candidate(&self, j: usize) -> Option<(EinsumSpec, Vec<Value>, char, Vec<(char, Poly)>)> {
        if !self.bf16_dot {
            return None;
        }
        self.lanes16_candidate(j)
    }

    /// Node `j` as an einsum of two operands in output vectors of 16
    /// lanes, with a float output whose last axis is a multiple of 16; its
    /// spec, operands, output's last letter and summed letters.
    #[allow(clippy::type_complexity)]
    pub(super) fn lanes16_candidate(&self, j: usize) -> Option<(EinsumSpec, Vec<Value>, char, Vec<(char, Poly)>)> {
        if self.simd != 16 {
            return None;
        }
        let (spec, inputs) = self.contraction_spec(j)?;
        let node = self.graph.nodes.get(j)?;
        let x = *spec.output.last()?;
        let n = self.graph.dims.normalize(node.shape.last()?).ok()?.as_constant()?;
        if n % 16 != 0 || spec.inputs.len() != 2 || inputs.len() != 2 || !node.dtype.is_float() {
            return None;
        }
        let reduced = self.reduced(&spec, &inputs);
        Some((spec, inputs, x, reduced))
    }

    /// Whether `v` is a stored bf16 buffer.
    fn stored_bf16(&self, v: Value) -> bool {
        self.stored(v).is_some_and(|b| self.program.buffers[b].dtype == DType::BF16)
    }

    /// The bf16 pair at element `off` of `ptr` (32 bits, aligned to `align`
    /// bytes) in all 16 lanes of a `vector<32xbf16>`: the broadcast operand
    /// of [`Kc::dot_bf16`].
    pub(super) fn splat_bf16_pair(&mut self, ptr: &str, off: &str, align: usize) -> String {
        let p = self.b.element_ptr(ptr, off, "bf16");
        let pair = self.b.op(&format!("llvm.load {p} {{alignment = {align} : i64}} : !llvm.ptr -> i32"));
        let splat = self.b.op(&format!("vector.broadcast {pair} : i32 to vector<16xi32>"));
        self.b.op(&format!("llvm.bitcast {splat} : vector<16xi32> to vector<32xbf16>"))
    }

    /// `acc` (`vector<16xf32>`) plus, in each lane, the two products of
    /// that lane's pair of `a` and of `b` (`vector<32xbf16>` each):
    /// `vdpbf16ps`.
    pub(super) fn dot_bf16(&mut self, acc: &str, a: &str, b: &str) -> String {
        self.b.op(&format!(
            "llvm.call_intrinsic \"{DPBF16PS}\"({acc}, {a}, {b}) : \
             (vector<16xf32>, vector<32xbf16>, vector<32xbf16>) -> vector<16xf32>"
        ))
    }

    /// Whether the explicit-vector sum over letter `c` (size `d`, in
    /// vectors of `lanes`) of einsum `spec` over `inputs` runs on the bf16
    /// dot product (in `Kc::simd_sums`): this CPU has it, the sum is in
    /// 16 lanes over a constant multiple of 32, and there are two
    /// operands, both bf16 with `c` last, each read through views that
    /// keep consecutive elements of its last axis adjacent in a stored
    /// buffer ([`Kc::adjacent_last`]): a run of 32 from a multiple of 32
    /// along `c` is then 32 adjacent elements.
    pub(crate) fn dot_sum(&self, spec: &EinsumSpec, inputs: &[Value], c: char, lanes: usize) -> bool {
        let len = self.reduced(spec, inputs).into_iter().find(|(l, _)| *l == c).map(|(_, d)| d);
        self.bf16_dot
            && self.simd == 16
            && lanes == 16
            && len.and_then(|d| self.constant_size(&d)).is_some_and(|n| n > 0 && n % 32 == 0)
            && spec.inputs.len() == 2
            && inputs.len() == 2
            && spec.inputs.iter().zip(inputs).all(|(subs, &v)| {
                subs.last() == Some(&c)
                    && subs.iter().filter(|l| **l == c).count() == 1
                    && self.graph.dtype_of(v) == DType::BF16
                    && self.adjacent_last(v)
            })
    }

    /// The 32 bf16 of operand `v` from `at` along its last axis (see
    /// [`Kc::dot_sum`]), as a `vector<32xbf16>`.
    pub(crate) fn load_bf16_run(&mut self, v: Value, at: &[String]) -> Result<String, LowerError> {
        let (ptr, off) = self.pair_address(v, at)?;
        let p = self.b.element_ptr(&ptr, &off, "bf16");
        Ok(self.b.op(&format!("llvm.load {p} {{alignment = 2 : i64}} : !llvm.ptr -> vector<32xbf16>")))
    }

    /// Node `j` as a contraction summed in bf16 pairs on this CPU: two bf16
    /// operands whose last letter is the same summed letter of size 2; one
    /// (the lane operand, a stored buffer) has the output's last letter
    /// just before it, the other does not have it and reads its pairs
    /// from a stored buffer's innermost axis; one more summed letter, and
    /// the output's last axis a multiple of 16. `None` without AVX512-BF16.
    pub(crate) fn pair_dot(&self, j: usize) -> Option<PairDot> {
        let (spec, inputs, x, reduced) = self.bf16_dot_candidate(j)?;
        let pair = *spec.inputs[0].last()?;
        let [(a, _), (b, _)] = reduced.as_slice() else { return None };
        let sum = if *a == pair { *b } else { *a };
        let size = reduced.iter().find(|(c, _)| *c == pair)?.1.clone();
        if self.constant_size(&size) != Some(2) || spec.inputs[1].last() != Some(&pair) {
            return None;
        }
        let lane = spec.inputs.iter().position(|s| s.contains(&x))?;
        let row = 1 - lane;
        let (lane_subs, row_subs) = (&spec.inputs[lane], &spec.inputs[row]);
        let bf16 = |v: Value| self.graph.dtype_of(v) == DType::BF16;
        let lane_stored = self.stored_bf16(inputs[lane]);
        let ok = lane_subs.len() >= 2
            && lane_subs[lane_subs.len() - 2] == x
            && lane_subs.contains(&sum)
            && !row_subs.contains(&x)
            && row_subs.len() >= 2
            && row_subs[row_subs.len() - 2] == sum
            && bf16(inputs[0])
            && bf16(inputs[1])
            && lane_stored
            && self.pairs_readable(inputs[row]);
        ok.then_some(PairDot { sum, pair, lane, row })
    }

    /// Whether `v`'s last axis (of size 2) is pairs of consecutive
    /// elements of a stored bf16 buffer's innermost axis: the buffer itself,
    /// or a reshape splitting the last axis of a value readable as vectors
    /// (see [`Kc::vector_readable`]) into pairs.
    fn pairs_readable(&self, v: Value) -> bool {
        if let Some(b) = self.stored(v) {
            return self.program.buffers[b].dtype == DType::BF16;
        }
        let Value::Node(j) = v else { return false };
        let node = &self.graph.nodes[j];
        let (Op::Reshape { .. }, Some(&first)) = (&node.op, node.inputs.first()) else { return false };
        let constant = |s: Option<&Poly>| s.and_then(|p| self.constant_size(p));
        constant(node.shape.last()) == Some(2)
            && constant(self.graph.shape_of(first).last()).is_some_and(|n| n % 2 == 0)
            && self.graph.dtype_of(first) == DType::BF16
            && self.vector_readable(first)
    }

    /// The address (pointer, element offset) of element `idx` of `v`
    /// through its views (see [`Kc::pairs_readable`], [`Kc::adjacent_last`]).
    pub(super) fn pair_address(&mut self, v: Value, idx: &[String]) -> Result<(String, String), LowerError> {
        if let Some(b) = self.stored(v) {
            return self.buffer_offset(b, idx);
        }
        let Value::Node(j) = v else {
            return Err(LowerError::Unsupported {
                node: self.graph.name_of(v).to_owned(),
                message: "graph input has no buffer in the program".into(),
            });
        };
        let first = *self.graph.nodes[j].inputs.first().ok_or_else(|| self.unsupported(j, "view without an input"))?;
        let inner = self.view_index(j, idx)?;
        self.pair_address(first, &inner)
    }

    /// Contraction `j` summed in bf16 pairs (or widened rows) along letter
    /// `sum`: its spec, its operands and the length of `sum` in operand
    /// `row`.
    pub(super) fn pair_sum(
        &self,
        j: usize,
        sum: char,
        row: usize,
    ) -> Result<(EinsumSpec, Vec<Value>, Poly), LowerError> {
        let Some((spec, inputs)) = self.contraction_spec(j) else {
            return Err(self.unsupported(j, "bf16 pair sum of a non-einsum"));
        };
        let position = spec.inputs[row].iter().position(|c| *c == sum).unwrap_or(0);
        let len = self.graph.shape_of(inputs[row]).get(position).cloned();
        let len = len.ok_or_else(|| self.unsupported(j, "bf16 pair sum without its length"))?;
        Ok((spec, inputs, len))
    }

    /// Einsum node `j` summed in bf16 pairs (`pd`, see [`Kc::pair_dot`]) at
    /// every index of `idxs`: each the 16 outputs from it along the
    /// output's last axis, as a `vector<16xf32>`.
    pub(crate) fn pair_dot_vec(
        &mut self,
        j: usize,
        pd: PairDot,
        idxs: &[Vec<String>],
        ahead: Option<&LinesAhead>,
    ) -> Result<Vec<String>, LowerError> {
        let (spec, inputs, len) = self.pair_sum(j, pd.sum, pd.row)?;
        let position = |k: usize| spec.inputs[k].iter().position(|c| *c == pd.sum).unwrap_or(0);
        let segments =
            self.sum_segments(&[(inputs[pd.row], position(pd.row)), (inputs[pd.lane], position(pd.lane))], &len);
        let vty = "vector<16xf32>";
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let first = self.b.index(0);
        let envs = super::contract::output_envs(&spec.output, idxs);
        self.sum_over(&segments, &vec![zero; idxs.len()], vty, |kc, l, accs| {
            if let Some(p) = ahead.filter(|p| p.sum == pd.sum) {
                kc.prefetch_line(p, l);
            }
            // Each panel stretch and each input pair loaded once per step.
            let mut loaded: Vec<(usize, Vec<String>, String)> = Vec::new();
            let mut nexts = Vec::with_capacity(accs.len());
            for (env, acc) in envs.iter().zip(accs) {
                let mut env = env.clone();
                env.extend([(pd.sum, l.to_owned()), (pd.pair, first.clone())]);
                let mut operand = |kc: &mut Self, k: usize| -> Result<String, LowerError> {
                    let at = kc.operand_index(j, &spec.inputs[k], &env)?;
                    if let Some((_, _, x)) = loaded.iter().find(|(q, i, _)| *q == k && *i == at) {
                        return Ok(x.clone());
                    }
                    let (ptr, off) = kc.pair_address(inputs[k], &at)?;
                    let x = if k == pd.lane {
                        let p = kc.b.element_ptr(&ptr, &off, "bf16");
                        kc.b.op(&format!("llvm.load {p} {{alignment = 2 : i64}} : !llvm.ptr -> vector<32xbf16>"))
                    } else {
                        kc.splat_bf16_pair(&ptr, &off, 2)
                    };
                    loaded.push((k, at, x.clone()));
                    Ok(x)
                };
                let row = operand(kc, pd.row)?;
                let lane = operand(kc, pd.lane)?;
                nexts.push(kc.dot_bf16(acc, &row, &lane));
            }
            Ok(nexts)
        })
    }
}

/// A contraction summed in bf16 pairs formed while it runs (see
/// [`Kc::pair_rows`]): the summed letter and the operands' roles.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PairRows {
    sum: char,
    /// The operand with the output's last letter, the summed one just
    /// before it (V: `[.., m, k]`).
    lane: usize,
    /// The other, the summed letter last (the probabilities).
    row: usize,
}

impl Kc<'_> {
    /// Node `j` as a bf16 contraction whose pairs are formed from two
    /// consecutive rows of its lane operand (`w · V`: each step of the sum
    /// interleaves V's rows `2z` and `2z + 1` and reads the other
    /// operand's elements `2z`, `2z + 1`, adjacent, as one pair): two bf16
    /// operands, one summed letter, last in the row operand (read through
    /// views that keep its elements adjacent) and just before the output's
    /// last letter in the stored lane operand; the output's last axis a
    /// multiple of 16. `None` without AVX512-BF16.
    pub(crate) fn pair_rows(&self, j: usize) -> Option<PairRows> {
        let (spec, inputs, x, reduced) = self.bf16_dot_candidate(j)?;
        let [(sum, _)] = reduced.as_slice() else { return None };
        let lane = spec.inputs.iter().position(|s| s.contains(&x))?;
        let row = 1 - lane;
        let (lane_subs, row_subs) = (&spec.inputs[lane], &spec.inputs[row]);
        let lane_stored = self.stored_bf16(inputs[lane]);
        let ok = lane_subs.len() >= 2
            && lane_subs[lane_subs.len() - 1] == x
            && lane_subs[lane_subs.len() - 2] == *sum
            && row_subs.last() == Some(sum)
            && !row_subs.contains(&x)
            && self.graph.dtype_of(inputs[row]) == DType::BF16
            && lane_stored
            && self.adjacent_last(inputs[row]);
        ok.then_some(PairRows { sum: *sum, lane, row })
    }

    /// Whether consecutive elements along `v`'s last axis are adjacent
    /// half-precision (bf16 or f16) elements of a stored buffer: the
    /// buffer, or views that keep the last axis (a slice of it anywhere
    /// along it). Its callers that need bf16 check the dtype too.
    pub(super) fn adjacent_last(&self, v: Value) -> bool {
        if let Some(b) = self.stored(v) {
            return matches!(self.program.buffers[b].dtype, DType::BF16 | DType::F16);
        }
        let Value::Node(j) = v else { return false };
        let node = &self.graph.nodes[j];
        let Some(&first) = node.inputs.first() else { return false };
        let rank = node.shape.len();
        let kept = match (node.shape.last(), self.graph.shape_of(first).last()) {
            (Some(a), Some(b)) => self.graph.dims.same(a, b),
            _ => false,
        };
        let keeps = match &node.op {
            Op::Slice { .. } => true,
            Op::Transpose { perm } => perm.last() == Some(&rank.wrapping_sub(1)),
            Op::Broadcast { .. } | Op::Reshape { .. } => kept,
            _ => false,
        };
        keeps && self.adjacent_last(first)
    }

    /// Einsum node `j` summed in bf16 pairs formed from its lane operand's
    /// rows (`pr`, see [`Kc::pair_rows`]) at every index of `idxs`: each
    /// the 16 outputs from it along the output's last axis, as a
    /// `vector<16xf32>`. An odd length's last step is an f32 FMA.
    pub(crate) fn pair_rows_vec(
        &mut self,
        j: usize,
        pr: PairRows,
        idxs: &[Vec<String>],
        (ahead, part): (Option<&LinesAhead>, Option<&SumPart>),
    ) -> Result<Vec<String>, LowerError> {
        let (spec, inputs, len) = self.pair_sum(j, pr.sum, pr.row)?;
        let len = self.sizes(std::slice::from_ref(&len))?.remove(0);
        let vty = "vector<16xf32>";
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let (one, two) = (self.b.index(1), self.b.index(2));
        let half = self.b.op(&format!("arith.divui {len}, {two} : index"));
        let envs = super::contract::output_envs(&spec.output, idxs);
        let interleave: Vec<String> = (0..16).flat_map(|i| [i, i + 16]).map(|i| i.to_string()).collect();
        // A chunk of a chunked sum (`emit::chunks`, an even length): its
        // pairs, from the sums so far.
        let (inits, (lo, hi)) = match part {
            Some(p) => {
                let lo = self.b.op(&format!("arith.divui {}, {two} : index", p.from));
                let hi = self.b.op(&format!("arith.divui {}, {two} : index", p.to));
                let hi = self.b.op(&format!("arith.minui {hi}, {half} : index"));
                (p.inits.clone(), (lo, hi))
            }
            None => (vec![zero; idxs.len()], (self.b.index(0), half.clone())),
        };
        let (res, z, accs) = self.b.open_for_typed_from(&lo, &hi, &one, &inits, vty);
        let y0 = self.b.muli(&z, &two);
        let y1 = self.b.addi(&y0, &one);
        if let Some(a) = ahead.filter(|a| a.sum == pr.sum) {
            self.prefetch_line(a, &y0);
        }
        // Each pair of rows and each pair of the other operand loaded once
        // per step.
        let mut loaded: Vec<(usize, Vec<String>, String)> = Vec::new();
        let mut nexts = Vec::with_capacity(accs.len());
        for (env, acc) in envs.iter().zip(&accs) {
            let at_y = |kc: &mut Self, k: usize, y: &str| {
                let mut env = env.clone();
                env.push((pr.sum, y.to_owned()));
                kc.operand_index(j, &spec.inputs[k], &env)
            };
            let row_at = at_y(self, pr.row, &y0)?;
            let row = match loaded.iter().find(|(k, i, _)| *k == pr.row && *i == row_at) {
                Some((_, _, x)) => x.clone(),
                None => {
                    let (ptr, off) = self.pair_address(inputs[pr.row], &row_at)?;
                    let x = self.splat_bf16_pair(&ptr, &off, 2);
                    loaded.push((pr.row, row_at, x.clone()));
                    x
                }
            };
            let lane_at = at_y(self, pr.lane, &y0)?;
            let lane = match loaded.iter().find(|(k, i, _)| *k == pr.lane && *i == lane_at) {
                Some((_, _, x)) => x.clone(),
                None => {
                    let next_at = at_y(self, pr.lane, &y1)?;
                    let half_row = |kc: &mut Self, at: &[String]| -> Result<String, LowerError> {
                        let (ptr, off) = kc.pair_address(inputs[pr.lane], at)?;
                        let p = kc.b.element_ptr(&ptr, &off, "bf16");
                        Ok(kc.b.op(&format!("llvm.load {p} {{alignment = 2 : i64}} : !llvm.ptr -> vector<16xbf16>")))
                    };
                    let (a, b) = (half_row(self, &lane_at)?, half_row(self, &next_at)?);
                    let x = self.b.op(&format!(
                        "vector.shuffle {a}, {b} [{}] : vector<16xbf16>, vector<16xbf16>",
                        interleave.join(", ")
                    ));
                    loaded.push((pr.lane, lane_at, x.clone()));
                    x
                }
            };
            nexts.push(self.dot_bf16(acc, &row, &lane));
        }
        self.b.close_for_typed(&nexts, vty);
        // The last element of an odd length: one widened step.
        let mut done = self.b.muli(&half, &two);
        let mut end = len.clone();
        if let Some(p) = part {
            done = self.b.op(&format!("arith.maxui {done}, {} : index", p.from));
            end = self.b.op(&format!("arith.minui {end}, {} : index", p.to));
        }
        let (res, y, accs) = self.b.open_for_typed_from(&done, &end, &one, &res, vty);
        let mut nexts = Vec::with_capacity(accs.len());
        for (env, acc) in envs.iter().zip(&accs) {
            let mut env = env.clone();
            env.push((pr.sum, y.clone()));
            let row_at = self.operand_index(j, &spec.inputs[pr.row], &env)?;
            let lane_at = self.operand_index(j, &spec.inputs[pr.lane], &env)?;
            let r = self.loadf(inputs[pr.row], &row_at)?;
            let r = self.b.op(&format!("vector.broadcast {r} : f32 to {vty}"));
            let l = self.load_vector_view(inputs[pr.lane], &lane_at, 16)?;
            let p = self.b.op(&format!("arith.mulf {r}, {l} fastmath<contract> : {vty}"));
            nexts.push(self.b.op(&format!("arith.addf {acc}, {p} fastmath<contract> : {vty}")));
        }
        self.b.close_for_typed(&nexts, vty);
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use crate::lower::emit::testing::{check_output, cpu_step, point};

    /// The override's values: `auto` (or unset, or empty) leaves the
    /// choice to the host, `on` needs AVX512-BF16, anything else is an
    /// error that names the variable and the values it takes.
    #[test]
    fn the_override_takes_auto_on_and_off() {
        use super::bf16_dot_setting as setting;
        for has in [false, true] {
            for auto in [None, Some(""), Some("auto"), Some(" auto ")] {
                assert_eq!(setting(auto, has).ok(), Some(None), "{auto:?}");
            }
            assert_eq!(setting(Some("off"), has).ok(), Some(Some(false)));
        }
        assert_eq!(setting(Some("on"), true).ok(), Some(Some(true)));
        let no_dot = setting(Some("on"), false).map_err(|e| e.to_string());
        assert!(
            no_dot.as_ref().is_err_and(|e| e.contains("BIFURC_CPU_BF16_DOT=on") && e.contains("AVX512-BF16")),
            "{no_dot:?}"
        );
        let bad = setting(Some("yes"), true).map_err(|e| e.to_string());
        assert!(
            bad.as_ref().is_err_and(|e| e.contains("\"yes\"") && e.contains("`auto`") && e.contains("`off`")),
            "{bad:?}"
        );
    }

    /// The vendor CPUID gives is the one the kernel reports.
    #[test]
    fn vendor_is_read_from_cpuid() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return };
        let vendor =
            info.lines().find_map(|l| l.strip_prefix("vendor_id")).map(|v| v.trim_start_matches([' ', '\t', ':']));
        if let Some(vendor) = vendor {
            assert_eq!(super::host_is_amd(), vendor == "AuthenticAMD", "/proc/cpuinfo says {vendor}");
        }
    }

    /// A bf16 step compiled as this host prefers (`prefer_bf16_dot`: the
    /// bf16 dot product on AMD, f32 FMAs on Intel), and each way forced:
    /// `vdpbf16ps` in the text exactly where chosen and available, and the
    /// same values as the interpreter every way (context q·K with rows in
    /// the lanes, and a weight projection by panels).
    #[test]
    fn the_host_preference_picks_the_sums() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 64, "d": 128}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "bf16"},
                {"name": "w", "role": "weight", "shape": [128, "d"], "dtype": "bf16"},
                {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["h", "m", "k"], "dtype": "bf16"}
            ],
            "nodes": [
                {"id": "p", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}},
                {"id": "q", "op": "reshape", "inputs": ["p"], "attrs": {"shape": ["b", "h", "k"]}},
                {"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "bhk,hmk->bhm"}}
            ],
            "outputs": [{"name": "s", "node": "s"}]
        });
        let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
        // Without AMX tiles, which would take both (see `emit::amx`).
        let compile = || {
            crate::lower::emit::with_amx(false, || {
                let step = crate::lower::CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
                let text = crate::lower::emit::emit(step.graph(), step.program(), crate::lower::Target::Cpu)
                    .unwrap_or_else(|e| panic!("{e}"));
                (step, text)
            })
        };
        let ways = [
            ("preferred", super::prefer_bf16_dot(), compile()),
            ("forced on", super::host_has_bf16_dot(), super::with_bf16_dot(true, compile)),
            ("forced off", false, super::with_bf16_dot(false, compile)),
        ];
        for (way, dot, (step, text)) in &ways {
            assert_eq!(text.contains(super::DPBF16PS), *dot, "{way}:\n{text}");
            for (b, m) in [(1, 17), (16, 40), (33, 64)] {
                check_output(&graph, step, &point(&[("b", b), ("m", m)]), 3, "s", (0.05, 0.02));
            }
        }
    }

    /// A tied embedding's logits in bf16, the vocabulary (100) too far
    /// from a multiple of 64 to be padded into panels: `x @ Wᵀ` sums along
    /// both operands' rows. On a CPU with AVX512-BF16 each step is one
    /// `vdpbf16ps` of 32 adjacent elements of each (`d` a multiple of 32,
    /// here 96 and 64; `x` also through a slice of the rows); at `d` = 48
    /// the sum stays in widened vectors. Against the interpreter, on the
    /// inputs as bf16 holds them, at a tile's rows and past them.
    #[test]
    fn tied_logits_sum_rows_by_dot() {
        for (d, dot) in [(96, true), (64, true), (48, false)] {
            let (graph, step, text) = cpu_step(&serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": d, "v": 100}},
                "inputs": [
                    {"name": "ids", "role": "token_ids", "shape": ["b", 1], "dtype": "i32"},
                    {"name": "x", "role": "activation", "shape": ["b", 2, "d"], "dtype": "bf16"},
                    {"name": "w", "role": "weight", "shape": ["v", "d"], "dtype": "bf16"}
                ],
                "nodes": [
                    {"id": "e", "op": "gather", "inputs": ["w", "ids"]},
                    {"id": "x1", "op": "slice", "inputs": ["x"], "attrs": {"axis": 1, "start": 1, "end": 2}},
                    {"id": "h", "op": "add", "inputs": ["e", "x1"]},
                    {"id": "logits", "op": "matmul", "inputs": ["h", "w"], "attrs": {"transpose_b": true}},
                    {"id": "direct", "op": "matmul", "inputs": ["x1", "w"], "attrs": {"transpose_b": true}}
                ],
                "outputs": [{"name": "logits", "node": "logits"}, {"name": "direct", "node": "direct"}]
            }));
            let pairs = super::host_has_bf16_dot() && dot;
            let calls = text.matches(super::DPBF16PS).count();
            assert_eq!(calls > 0, pairs, "d = {d}: summed by vdpbf16ps where the CPU has it:\n{text}");
            for b in [1, 3, 4, 5, 9, 17] {
                let at = point(&[("b", b)]);
                let inputs = crate::lower::emit::testing::bf16_held_inputs(&graph, &at, 5);
                let want = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let got = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                for name in ["logits", "direct"] {
                    assert_eq!(got[name].shape, want[name].shape);
                    // The outputs' bf16 rounding (2^-9 relative) and the
                    // sums' order: within 0.6% of the largest.
                    let top = want[name].data.iter().fold(0f32, |a, y| a.max(y.abs()));
                    for (i, (x, y)) in got[name].data.iter().zip(&want[name].data).enumerate() {
                        let what = format!("d = {d}, b = {b}: {name} element {i}");
                        assert!((x - y).abs() <= 6e-3 * top, "{what}: {x} vs {y} (largest {top})");
                    }
                }
            }
        }
    }

    /// `w · V` in bf16 (`bhm,hmk->bhk`, the probabilities a slice along
    /// `m` from an odd offset, as the bifurcated attention's decode part
    /// reads them): on a CPU with AVX512-BF16 each step's pairs come from
    /// two rows of V interleaved, an odd length's last row in a widened
    /// step; against the interpreter at odd and even lengths, fewer rows
    /// than a tile and several tiles.
    #[test]
    fn pairs_from_rows_match_interpreter() {
        let (graph, step, text) = cpu_step(&serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 64}},
            "inputs": [
                {"name": "w", "role": "activation", "shape": ["b", "h", "m+5"], "dtype": "bf16"},
                {"name": "v", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["h", "m", "k"], "dtype": "bf16"}
            ],
            "nodes": [
                {"id": "p", "op": "slice", "inputs": ["w"], "attrs": {"axis": 2, "start": 5, "end": "m+5"}},
                {"id": "o", "op": "einsum", "inputs": ["p", "v"], "attrs": {"spec": "bhm,hmk->bhk"}}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        }));
        let pairs = super::host_has_bf16_dot();
        assert_eq!(text.contains(super::DPBF16PS), pairs, "summed by vdpbf16ps where the CPU has it:\n{text}");
        assert_eq!(text.contains(": vector<16xbf16>, vector<16xbf16>"), pairs, "V's rows interleaved:\n{text}");
        for (b, m) in [(1, 1), (3, 7), (5, 64), (9, 33), (9, 101), (16, 2), (33, 100), (33, 101)] {
            let at = point(&[("b", b), ("m", m)]);
            // The inputs as bf16 holds them, so both sides multiply the
            // same values: the sums differ in order and the outputs by
            // their bf16 rounding.
            let inputs = crate::lower::emit::testing::bf16_held_inputs(&graph, &at, 11);
            let want = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let got = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got["o"].shape, want["o"].shape);
            for (i, (x, y)) in got["o"].data.iter().zip(&want["o"].data).enumerate() {
                assert!((x - y).abs() <= 1e-3 + 8e-3 * y.abs(), "b = {b}, m = {m}: element {i}: {x} vs {y}");
            }
        }
    }
}
