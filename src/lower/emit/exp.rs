//! `exp` on the CPU as plain arithmetic: `math.exp` becomes a call to
//! libm's `expf` per element, which LLVM cannot vectorize, and softmax
//! spends most of its time there. Here it is range reduction and a
//! polynomial (Cephes' `expf`, within about 1 ulp), which LLVM vectorizes
//! with the loop around it. The GPU keeps `math.exp` (libdevice).

use super::builder::Builder;
use super::Kc;

/// Cephes' `expf` polynomial for `exp(r) ≈ 1 + r + r²·p(r)` on
/// `|r| <= ln2 / 2`, highest degree first.
const POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
/// `ln 2` in two parts (Cody–Waite): `n · LN2_HI` is exact for the `n`
/// that occur, so `x - n·ln2` loses nothing to cancellation.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding it to a float below 2²² in magnitude rounds it to
/// an integer, which then sits in the low bits of the sum.
const ROUND: f32 = 12_582_912.0;
/// [`Builder::exp_nonpositive_f32`] scales by `2^(n + SCALE_OFFSET)`,
/// then by `2^-SCALE_OFFSET`: enough to keep the first factor normal down
/// to `n = -150` (`x` = -104), where `y · 2^(n + 25)` is still at least
/// `2^-126`.
const SCALE_OFFSET: i32 = 25;
/// The biased exponent of `2^(n + SCALE_OFFSET)` less `n`.
const SCALE_EXP: i32 = 127 + SCALE_OFFSET;

impl Kc<'_> {
    /// `exp(x)` (f32): [`Builder::exp_f32`] on the CPU, `math.exp` on the
    /// GPU.
    pub(crate) fn exp(&mut self, x: &str) -> String {
        self.arith_or_math("exp", x, Builder::exp_f32)
    }

    /// `exp(x)` (f32) for an `x` of at most 0: a softmax's `x - max` of
    /// its row. [`Builder::exp_nonpositive_f32`] on the CPU (bit for bit
    /// [`Builder::exp_f32`] there, in fewer operations), `math.exp` on
    /// the GPU.
    pub(crate) fn exp_nonpositive(&mut self, x: &str) -> String {
        self.arith_or_math("exp", x, Builder::exp_nonpositive_f32)
    }

    /// `name(x)` (f32): plain arithmetic (`cpu`, which LLVM vectorizes
    /// with the loop around it) on the CPU, where `math.name` would be a
    /// libm call per element; `math.name` (libdevice) on the GPU.
    pub(crate) fn arith_or_math(&mut self, name: &str, x: &str, cpu: fn(&mut Builder, &str) -> String) -> String {
        if self.simd > 0 {
            cpu(&mut self.b, x)
        } else {
            self.b.math(name, x)
        }
    }
}

/// `f32`, or `vector<lanes x f32>`.
fn f32_type(lanes: Option<usize>) -> String {
    lanes_of("f32", lanes)
}

/// `i32`, or `vector<lanes x i32>`.
fn i32_type(lanes: Option<usize>) -> String {
    lanes_of("i32", lanes)
}

/// `ty`, or `vector<lanes x ty>`.
fn lanes_of(ty: &str, lanes: Option<usize>) -> String {
    match lanes {
        Some(n) => format!("vector<{n}x{ty}>"),
        None => ty.to_owned(),
    }
}

impl Builder {
    /// `exp(x)` for an f32 `x`: `x` clamped to [-104, 89] (outside, expf
    /// is 0 or inf, which the clamped value also gives; NaN passes
    /// through), `n = round(x / ln2)`, `r = x - n·ln2`, the polynomial
    /// (each multiply-add may be one FMA), and the scale by `2^n` in two
    /// halves so that results below `2^-126` come out as the subnormals
    /// they are.
    pub(crate) fn exp_f32(&mut self, x: &str) -> String {
        let (t, y) = self.exp_reduced(x, Some(89.0), None);
        // n as an integer: the low bits of t (t - ROUND is n exactly).
        let ti = self.op(&format!("arith.bitcast {t} : f32 to i32"));
        let round_bits = self.i32(ROUND.to_bits() as i32);
        let n = self.op(&format!("arith.subi {ti}, {round_bits} : i32"));
        let one_i = self.i32(1);
        let n1 = self.op(&format!("arith.shrsi {n}, {one_i} : i32"));
        let n2 = self.op(&format!("arith.subi {n}, {n1} : i32"));
        let mut y = y;
        for half in [n1, n2] {
            let s = self.pow2(&half);
            y = self.fbin("mulf", &y, &s);
        }
        y
    }

    /// `exp(x)` for an f32 `x <= 0` (correct up to `x` = 70): as
    /// [`Builder::exp_f32`], bit for bit, but the scale by `2^n` is one
    /// exact multiply by `2^(n + 25)` (a normal number for `n` in
    /// [-150, 102], and so is the product, `y` being near 1) and one
    /// rounding multiply by `2^-25`, which gives the subnormals below
    /// `2^-126` as the two halves do. The factor's bits come from `t`'s
    /// with one shift and one add, where the halves take seven integer
    /// operations; with no upper clamp either, 17 vector operations
    /// instead of 23. The multiplies, which bind the softmax's sum pass
    /// on the FMA ports, are as many, so the gain is small: the cpu_step
    /// softmax at m_c = 2048 (in cache) 0.61-0.64 -> 0.59-0.60 ms a
    /// layer, within the noise at 8192 (bound by DRAM there). NaN stays
    /// NaN (`y` is NaN, whatever the factor).
    pub(crate) fn exp_nonpositive_f32(&mut self, x: &str) -> String {
        self.exp_nonpositive_lanes(x, None)
    }

    /// [`Builder::exp_nonpositive_f32`] of each lane of a
    /// `vector<lanes x f32>` (`lanes` given), the same operations on
    /// vectors: bit for bit the scalar one's, lane by lane.
    pub(crate) fn exp_nonpositive_lanes(&mut self, x: &str, lanes: Option<usize>) -> String {
        let (t, y) = self.exp_reduced(x, None, lanes);
        // (n + 25 + 127) << 23, n = bits(t) - bits(ROUND), computed as
        // (bits(t) << 23) + ((152 - bits(ROUND)) << 23) in wrapping i32.
        let (fty, ity) = (f32_type(lanes), i32_type(lanes));
        let ti = self.op(&format!("arith.bitcast {t} : {fty} to {ity}"));
        let shift = self.splat_i32(23, lanes);
        let high = self.op(&format!("arith.shli {ti}, {shift} : {ity}"));
        let bias = self.splat_i32(SCALE_EXP.wrapping_sub(ROUND.to_bits() as i32).wrapping_shl(23), lanes);
        let bits = self.op(&format!("arith.addi {high}, {bias} : {ity}"));
        let s = self.op(&format!("arith.bitcast {bits} : {ity} to {fty}"));
        let y = self.fop("mulf", &y, &s, lanes);
        let down = self.splat_f32(f32::from_bits(((127 - SCALE_OFFSET) as u32) << 23), lanes);
        self.fop("mulf", &y, &down, lanes)
    }

    /// The shared part of the two `exp`s of `x`: `x` clamped to -104
    /// below and to `upper` above when given, then `t = x·log2(e) + ROUND` (whose low
    /// bits hold `n = round(x / ln2)`) and `y = exp(x - n·ln2)`, in
    /// [1/sqrt(2), sqrt(2)], the Cody–Waite reduction and the polynomial;
    /// on f32, or on vectors of `lanes` f32.
    fn exp_reduced(&mut self, x: &str, upper: Option<f32>, lanes: Option<usize>) -> (String, String) {
        let lo = self.splat_f32(-104.0, lanes);
        let mut x = self.fop("maximumf", x, &lo, lanes);
        if let Some(upper) = upper {
            let hi = self.splat_f32(upper, lanes);
            x = self.fop("minimumf", &x, &hi, lanes);
        }
        let (log2e, round) = (self.splat_f32(std::f32::consts::LOG2_E, lanes), self.splat_f32(ROUND, lanes));
        let t = self.fused_lanes(&x, &log2e, &round, lanes);
        let n = self.fop("subf", &t, &round, lanes);
        let (c_hi, c_lo) = (self.splat_f32(-LN2_HI, lanes), self.splat_f32(-LN2_LO, lanes));
        let r = self.fused_lanes(&n, &c_hi, &x, lanes);
        let r = self.fused_lanes(&n, &c_lo, &r, lanes);
        let p = self.horner_lanes(&POLY, &r, lanes);
        let r2 = self.fop("mulf", &r, &r, lanes);
        let y = self.fused_lanes(&p, &r2, &r, lanes);
        let one = self.splat_f32(1.0, lanes);
        (t, self.fop("addf", &y, &one, lanes))
    }

    /// `a * b + c` (f32), marked so that LLVM may fuse it into one FMA
    /// where the machine has one (one rounding instead of two): the
    /// softmax rows' exp loop, compute-bound, ran 10% faster (3.18 to
    /// 2.85 ms a layer of cpu_step at b = 32 alone).
    pub(super) fn fused(&mut self, a: &str, b: &str, c: &str) -> String {
        self.fused_lanes(a, b, c, None)
    }

    /// `acc + rows · x` on vectors of type `vty` (`x` an f32 broadcast to
    /// the lanes), marked so that LLVM may fuse it into one FMA: a step of
    /// a tile of rows in lanes (`emit::rows_in_lanes`, `emit::fused`).
    pub(super) fn lanes_fma(&mut self, rows: &str, x: &str, acc: &str, vty: &str) -> String {
        let x = self.op(&format!("vector.broadcast {x} : f32 to {vty}"));
        let p = self.op(&format!("arith.mulf {x}, {rows} fastmath<contract> : {vty}"));
        self.op(&format!("arith.addf {acc}, {p} fastmath<contract> : {vty}"))
    }

    /// [`Builder::fused`] on f32 or on vectors of `lanes` f32.
    fn fused_lanes(&mut self, a: &str, b: &str, c: &str, lanes: Option<usize>) -> String {
        let ty = f32_type(lanes);
        let m = self.op(&format!("arith.mulf {a}, {b} fastmath<contract> : {ty}"));
        self.op(&format!("arith.addf {m}, {c} fastmath<contract> : {ty}"))
    }

    /// The polynomial with coefficients `coeffs` (highest degree first) at
    /// `x` (f32), in Horner's form: each step one multiply-add
    /// ([`Builder::fused`]).
    pub(super) fn horner(&mut self, coeffs: &[f32], x: &str) -> String {
        self.horner_lanes(coeffs, x, None)
    }

    /// [`Builder::horner`] on f32 or on vectors of `lanes` f32.
    fn horner_lanes(&mut self, coeffs: &[f32], x: &str, lanes: Option<usize>) -> String {
        let mut p = self.splat_f32(coeffs.first().copied().unwrap_or(0.0), lanes);
        for c in coeffs.iter().skip(1) {
            let c = self.splat_f32(*c, lanes);
            p = self.fused_lanes(&p, x, &c, lanes);
        }
        p
    }

    /// `arith.op a, b` on f32 or on vectors of `lanes` f32.
    pub(crate) fn fop(&mut self, op: &str, a: &str, b: &str, lanes: Option<usize>) -> String {
        self.op(&format!("arith.{op} {a}, {b} : {}", f32_type(lanes)))
    }

    /// The f32 constant `x`, or a hoisted vector of `lanes` of it.
    pub(crate) fn splat_f32(&mut self, x: f32, lanes: Option<usize>) -> String {
        let c = self.f32(x);
        self.splat(c, "f32", lanes)
    }

    /// The i32 constant `x`, or a hoisted vector of `lanes` of it.
    fn splat_i32(&mut self, x: i32, lanes: Option<usize>) -> String {
        let c = self.i32(x);
        self.splat(c, "i32", lanes)
    }

    /// Hoisted constant `c` of element type `ty`, broadcast to `lanes` when
    /// given.
    fn splat(&mut self, c: String, ty: &str, lanes: Option<usize>) -> String {
        match lanes {
            None => c,
            Some(n) => self.hoist(&format!("vector.broadcast {c} : {ty} to vector<{n}x{ty}>")),
        }
    }

    /// `2^n` for an i32 `n` in [-126, 127], built from its exponent bits.
    fn pow2(&mut self, n: &str) -> String {
        let (bias, shift) = (self.i32(127), self.i32(23));
        let e = self.op(&format!("arith.addi {n}, {bias} : i32"));
        let bits = self.op(&format!("arith.shli {e}, {shift} : i32"));
        self.op(&format!("arith.bitcast {bits} : i32 to f32"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// The emitted kernel: `exp` of a graph input over [-110, 90) in
    /// steps of 1/256 (and the special values), run by the CPU step, within 1 ulp
    /// of libm (subnormals within 2 of the smallest step), its reduction
    /// and polynomial written as multiply-adds LLVM may fuse.
    #[test]
    fn compiled_exp_matches_libm() {
        let xs = crate::lower::emit::testing::grid((-110.0, 90.0), 256, 0.001_3, &[88.72, -87.33, -103.9]);
        let run = crate::lower::emit::testing::elementwise(json!([{"id": "e", "op": "exp", "inputs": ["x"]}]), &xs);
        let (got, text) = (&run.cpu, &run.text);
        let fusable = text.matches("fastmath<contract> : f32").count();
        // n, the two parts of r, five polynomial steps, the last term.
        assert_eq!(fusable, 2 * 9, "9 multiply-adds (mul and add) marked:\n{text}");
        for (x, got) in xs.iter().zip(&got["e"].data) {
            let want = x.exp();
            if want.is_nan() {
                assert!(got.is_nan(), "exp({x}) = {got}");
            } else if want.is_infinite() || want == 0.0 || want >= f32::MIN_POSITIVE {
                let u = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(u <= 1, "exp({x}) = {got}, libm {want}: {u} ulp");
            } else {
                assert!((got - want).abs() <= 2.0 * f32::from_bits(1), "exp({x}): {got} vs {want}");
            }
        }
    }

    /// The softmax's `exp` of `x <= 0` (one scale multiply) is the general
    /// one's (two halves) bit for bit, subnormal results included: rows
    /// `[0, x]` give `p_x = e(x) · p_0` exactly (the scale pass multiplies
    /// both by the same `1 / (1 + e(x))`, and `p_0` is that), with `e(x)`
    /// the general `exp` op's output on the same `x`.
    #[test]
    fn softmax_exp_is_the_general_exp_bit_for_bit() {
        let mut xs = crate::lower::emit::testing::grid((-110.0, 0.0), 256, 0.001_3, &[-87.33, -103.9, -104.0, -150.0]);
        xs.retain(|x| !x.is_nan() && *x <= 0.0);
        let general = crate::lower::emit::testing::elementwise(json!([{"id": "e", "op": "exp", "inputs": ["x"]}]), &xs);
        let (_, step, text) = crate::lower::emit::testing::cpu_step(&json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["r"], "constants": {}},
            "inputs": [{"name": "x", "role": "activation", "shape": ["r", 2], "dtype": "f32"}],
            "nodes": [{"id": "p", "op": "softmax", "inputs": ["x"], "attrs": {"axis": 1}}],
            "outputs": [{"name": "p", "node": "p"}]
        }));
        assert!(!text.contains("arith.shrsi"), "the softmax scales once:\n{text}");
        let rows: Vec<f32> = xs.iter().flat_map(|x| [0.0, *x]).collect();
        let x = crate::interp::Tensor::new(vec![xs.len(), 2], rows).unwrap_or_else(|e| panic!("{e}"));
        let at = crate::lower::emit::testing::point(&[("r", xs.len() as i64)]);
        let got =
            step.run(&at, &std::collections::HashMap::from([("x".to_string(), x)])).unwrap_or_else(|e| panic!("{e}"));
        let mut subnormal = 0;
        for (i, (x, e)) in xs.iter().zip(&general.cpu["e"].data).enumerate() {
            let (p0, px) = (got["p"].data[2 * i], got["p"].data[2 * i + 1]);
            assert_eq!(px.to_bits(), (e * p0).to_bits(), "x = {x}: {px} vs exp {e} · {p0}");
            subnormal += usize::from(*e != 0.0 && *e < f32::MIN_POSITIVE);
        }
        assert!(subnormal > 1000, "the grid reaches the subnormals: {subnormal}");
    }
}
