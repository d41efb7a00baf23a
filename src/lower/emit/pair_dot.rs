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

use crate::ir::{DType, Op, Value};
use crate::lower::LowerError;

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

/// The LLVM intrinsic of `vdpbf16ps` on 512-bit vectors.
pub(super) const DPBF16PS: &str = "llvm.x86.avx512bf16.dpbf16ps.512";

/// Whether this machine's CPU has AVX512-BF16 (`vdpbf16ps`): the JIT
/// compiles for the host, so its kernels may use it.
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

impl Kc<'_> {
    /// Node `j` as a contraction summed in bf16 pairs on this CPU: two bf16
    /// operands whose last letter is the same summed letter of size 2; one
    /// (the lane operand, a stored buffer) has the output's last letter
    /// just before it, the other does not have it and reads its pairs
    /// from a stored buffer's innermost axis; one more summed letter, and
    /// the output's last axis a multiple of 16. `None` without AVX512-BF16.
    pub(crate) fn pair_dot(&self, j: usize) -> Option<PairDot> {
        if !self.bf16_dot || self.simd != 16 {
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
        let lane_stored = self.stored(inputs[lane]).is_some_and(|b| self.program.buffers[b].dtype == DType::BF16);
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
        let constant = |s: Option<&crate::ir::Poly>| s.and_then(|p| self.constant_size(p));
        constant(node.shape.last()) == Some(2)
            && constant(self.graph.shape_of(first).last()).is_some_and(|n| n % 2 == 0)
            && self.graph.dtype_of(first) == DType::BF16
            && self.vector_readable(first)
    }

    /// The address (pointer, element offset) of element `idx` of `v`
    /// through its views (see [`Kc::pairs_readable`]).
    fn pair_address(&mut self, v: Value, idx: &[String]) -> Result<(String, String), LowerError> {
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

    /// Einsum node `j` summed in bf16 pairs (`pd`, see [`Kc::pair_dot`]) at
    /// every index of `idxs`: each the 16 outputs from it along the
    /// output's last axis, as a `vector<16xf32>`.
    pub(crate) fn pair_dot_vec(
        &mut self,
        j: usize,
        pd: PairDot,
        idxs: &[Vec<String>],
    ) -> Result<Vec<String>, LowerError> {
        let Some((spec, inputs)) = self.contraction_spec(j) else {
            return Err(self.unsupported(j, "bf16 pair sum of a non-einsum"));
        };
        let position = |k: usize| spec.inputs[k].iter().position(|c| *c == pd.sum).unwrap_or(0);
        let len = self.graph.shape_of(inputs[pd.row]).get(position(pd.row)).cloned();
        let len = len.ok_or_else(|| self.unsupported(j, "bf16 pair sum without its length"))?;
        let segments =
            self.sum_segments(&[(inputs[pd.row], position(pd.row)), (inputs[pd.lane], position(pd.lane))], &len);
        let vty = "vector<16xf32>";
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let first = self.b.index(0);
        let envs: Vec<Vec<(char, String)>> =
            idxs.iter().map(|idx| spec.output.iter().copied().zip(idx.iter().cloned()).collect()).collect();
        self.sum_over(&segments, &vec![zero; idxs.len()], vty, |kc, l, accs| {
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
                    let p = kc.b.element_ptr(&ptr, &off, "bf16");
                    let x = if k == pd.lane {
                        kc.b.op(&format!("llvm.load {p} {{alignment = 2 : i64}} : !llvm.ptr -> vector<32xbf16>"))
                    } else {
                        let pair = kc.b.op(&format!("llvm.load {p} {{alignment = 2 : i64}} : !llvm.ptr -> i32"));
                        let splat = kc.b.op(&format!("vector.broadcast {pair} : i32 to vector<16xi32>"));
                        kc.b.op(&format!("llvm.bitcast {splat} : vector<16xi32> to vector<32xbf16>"))
                    };
                    loaded.push((k, at, x.clone()));
                    Ok(x)
                };
                let row = operand(kc, pd.row)?;
                let lane = operand(kc, pd.lane)?;
                nexts.push(kc.b.op(&format!(
                    "llvm.call_intrinsic \"{DPBF16PS}\"({acc}, {row}, {lane}) : \
                     ({vty}, vector<32xbf16>, vector<32xbf16>) -> {vty}"
                )));
            }
            Ok(nexts)
        })
    }
}
