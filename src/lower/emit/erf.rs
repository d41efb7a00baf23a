//! `erf` on the CPU as plain arithmetic (for gelu's exact form, `0.5 x
//! (1 + erf(x / sqrt 2))`): `math.erf` becomes a call to libm's `erff`
//! per element, which LLVM cannot vectorize. Here it is the rational
//! approximation Eigen and XLA use for f32, `x·p(x²) / q(x²)` with `x`
//! clamped to [-4, 4], the result clamped to [-1, 1] and ±1 from
//! |x| = 3.92 on (where erf is ±1 in f32); no branch, so the loop around
//! it vectorizes. It is 6.5e-8 from erf in exact arithmetic, 3.3e-7 at
//! worst evaluated in f32 (at 3 < |x| < 4; libm's `erff` is within 1 ulp,
//! 6e-8 there): gelu's output within 2.2e-7·|x| plus its own rounding,
//! which the test checks against the interpreter's f64 gelu. The GPU
//! keeps `math.erf` (libdevice).

use super::builder::Builder;
use super::Kc;

/// The numerator's coefficients (of `x`, `x³`, …, `x¹³`), highest first.
const NUM: [f32; 7] =
    [-2.726_142_3e-10, 2.770_681_4e-8, -2.101_024e-6, -5.692_506_4e-5, -7.349_906e-4, -2.954_6e-3, -1.609_603_3e-2];
/// The denominator's (of `1`, `x²`, …, `x⁸`), highest first.
const DEN: [f32; 5] = [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];
/// The end of the approximation's interval.
const CLAMP: f32 = 4.0;
/// From where erf is ±1 in f32 (erf(3.92) = 1 - 2.96e-8, nearer 1 than
/// the float below it).
const ONE: f32 = 3.92;

impl Kc<'_> {
    /// `erf(x)` (f32): [`Builder::erf_f32`] on the CPU, `math.erf` on the
    /// GPU.
    pub(crate) fn erf(&mut self, x: &str) -> String {
        self.arith_or_math("erf", x, Builder::erf_f32)
    }
}

impl Builder {
    /// `erf(x)` for an f32 `x`, in [-1, 1]; NaN stays NaN (the clamps
    /// pass it).
    pub(crate) fn erf_f32(&mut self, x_in: &str) -> String {
        let (lo, hi) = (self.f32(-CLAMP), self.f32(CLAMP));
        let x = self.fbin("maximumf", x_in, &lo);
        let x = self.fbin("minimumf", &x, &hi);
        let x2 = self.fbin("mulf", &x, &x);
        let p = self.horner(&NUM, &x2);
        let p = self.fbin("mulf", &x, &p);
        let q = self.horner(&DEN, &x2);
        let y = self.fbin("divf", &p, &q);
        // The quotient's rounding can pass ±1 by an ulp, which gelu's
        // `1 + erf` would turn into a value of the wrong sign; from
        // `ONE` on, erf is ±1 in f32, which the quotient misses by up to
        // 2 ulp (and gelu(-inf) would be -inf, not libm's NaN).
        let (minus_one, one) = (self.f32(-1.0), self.f32(1.0));
        let y = self.fbin("maximumf", &y, &minus_one);
        let y = self.fbin("minimumf", &y, &one);
        let a = self.math("absf", x_in);
        let limit = self.f32(ONE);
        let is_one = self.op(&format!("arith.cmpf oge, {a}, {limit} : f32"));
        let sign = self.op(&format!("math.copysign {one}, {x_in} : f32"));
        self.op(&format!("arith.select {is_one}, {sign}, {y} : f32"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// gelu's exact form run by the CPU step over [-10, 10) in steps of
    /// 1/1024 and special values, with no libm call: within `2.2e-7 |x| +
    /// 1.2e-7 |gelu(x)|` of the interpreter's (f64 erf, rounded once):
    /// erf within 3.3e-7 (gelu halves it, times x), the sum `1 + erf` and
    /// the output rounded.
    #[test]
    fn compiled_gelu_erf_matches_interpreter() {
        let xs =
            crate::lower::emit::testing::grid((-10.0, 10.0), 1024, 0.000_37, &[1e-30, -1e-7, 3.999, 4.0, 4.001, 100.0]);
        let run = crate::lower::emit::testing::elementwise(json!([{"id": "g", "op": "gelu", "inputs": ["x"]}]), &xs);
        assert!(!run.text.contains("math.erf"), "no libm call:\n{}", run.text);
        let (got, want) = (&run.cpu, &run.interpreter);
        for (x, (a, b)) in xs.iter().zip(got["g"].data.iter().zip(&want["g"].data)) {
            let close = a == b || (a - b).abs() <= 2.2e-7 * x.abs() + 1.2e-7 * b.abs() || (a.is_nan() && b.is_nan());
            assert!(close, "gelu({x}) = {a}, interpreter {b}");
        }
    }
}
