//! `tanh` on the CPU as plain arithmetic: `math.tanh` becomes a call to
//! libm's `tanhf` per element, which LLVM cannot vectorize: GPT-2's and
//! gpt_bigcode's gelu (the tanh form) over the MLP's activations took
//! 1.7-2.2 ms a layer at b = 32 (d_model 1024), more than a projection.
//! Here it is Cephes' `tanhf`: an odd polynomial for `|x| < 0.625`, else
//! `1 - 2 / (exp(2|x|) + 1)` with the polynomial `exp` (see `exp`), the
//! sign copied back; both computed and one selected, so the loop around
//! it vectorizes. Within 2 ulp of glibc's `tanhf` (the test measures it). The GPU
//! keeps `math.tanh` (libdevice).

use super::builder::Builder;
use super::Kc;

/// Where the polynomial gives way to the exponential form.
const SMALL: f32 = 0.625;
/// Cephes' `tanhf` polynomial `p(z)`, `z = x²`, for
/// `tanh(x) ≈ x + x·z·p(z)` on `|x| < 0.625`, highest degree first.
const POLY: [f32; 5] = [-5.704_988_7e-3, 2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1];

impl Kc<'_> {
    /// `tanh(x)` (f32): [`Builder::tanh_f32`] on the CPU, `math.tanh` on
    /// the GPU.
    pub(crate) fn tanh(&mut self, x: &str) -> String {
        self.arith_or_math("tanh", x, Builder::tanh_f32)
    }
}

impl Builder {
    /// `tanh(x)` for an f32 `x`; NaN stays NaN, ±inf gives ±1, -0 gives -0.
    pub(crate) fn tanh_f32(&mut self, x: &str) -> String {
        let a = self.math("absf", x);
        // Large: 1 - 2 / (exp(2|x|) + 1), in [0, 1] (exp clamps its input,
        // so |x| = inf gives 1).
        let two_a = self.fbin("addf", &a, &a);
        let e = self.exp_f32(&two_a);
        let one = self.f32(1.0);
        let e1 = self.fbin("addf", &e, &one);
        let two = self.f32(2.0);
        let q = self.fbin("divf", &two, &e1);
        let large = self.fbin("subf", &one, &q);
        // Small: x + x·z·p(z), of x's sign (|x·z·p(z)| < |x|) but for
        // -0, which gives +0 (-0·z·p + -0).
        let z = self.fbin("mulf", x, x);
        let p = self.horner(&POLY, &z);
        let xz = self.fbin("mulf", x, &z);
        let small = self.fused(&xz, &p, x);
        let limit = self.f32(SMALL);
        // False for NaN: the large form, which keeps it.
        let is_small = self.op(&format!("arith.cmpf olt, {a}, {limit} : f32"));
        let y = self.op(&format!("arith.select {is_small}, {small}, {large} : f32"));
        self.op(&format!("math.copysign {y}, {x} : f32"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// The emitted kernel: `tanh` of a graph input over [-12, 12) in
    /// steps of 1/1024 (both forms and the switch between them), tiny
    /// and special values, run by the CPU step: within 2 ulp of libm, no
    /// libm call left; and gelu's tanh form through it within 1e-6 of the
    /// reference interpreter's.
    #[test]
    fn compiled_tanh_matches_libm() {
        let xs = crate::lower::emit::testing::grid(
            (-12.0, 12.0),
            1024,
            0.000_37,
            &[1e-30, -1e-7, 0.624_999_9, 0.625, 100.0],
        );
        let nodes = json!([
            {"id": "t", "op": "tanh", "inputs": ["x"]},
            {"id": "g", "op": "gelu", "inputs": ["x"], "attrs": {"approximate": "tanh"}}
        ]);
        let run = crate::lower::emit::testing::elementwise(nodes, &xs);
        let (got, want) = (&run.cpu, &run.interpreter);
        assert!(!run.text.contains("math.tanh"), "no libm call:\n{}", run.text);
        let mut worst = 0;
        for (x, got) in xs.iter().zip(&got["t"].data) {
            let want = x.tanh();
            if want.is_nan() {
                assert!(got.is_nan(), "tanh({x}) = {got}");
                continue;
            }
            assert_eq!(got.is_sign_negative(), want.is_sign_negative(), "tanh({x}) = {got}, libm {want}");
            let u = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(u <= 2, "tanh({x}) = {got}, libm {want}: {u} ulp");
            worst = worst.max(u);
        }
        assert!(worst >= 1, "the comparison sees rounding at all");
        for (i, (a, b)) in got["g"].data.iter().zip(&want["g"].data).enumerate() {
            let close = a == b || (a - b).abs() <= 1e-6 * (1.0 + b.abs()) || (a.is_nan() && b.is_nan());
            assert!(close, "gelu({}) = {a} vs {b}", xs[i]);
        }
    }
}
