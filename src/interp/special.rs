//! Special functions in f64: `erf`, `erfc` and the activations built on them.
//!
//! `erf` is not in Rust's std. Abramowitz–Stegun 7.1.26 (error ~1e-7) is too
//! coarse for an oracle, so:
//! - `|x| < 2`: the series `erf(x) = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (2n+1)!!`,
//!   whose terms are all of one sign (no cancellation); relative error
//!   ~1e-15 against glibc's `erf`.
//! - `|x| >= 2`: the continued fraction
//!   `erfc(x) = e^{-x^2}/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))`,
//!   60 levels evaluated bottom-up; relative error ~4e-15 for `x >= 2`.

use std::f64::consts::PI;

/// Levels of the `erfc` continued fraction (enough for `x >= 2`).
const CF_LEVELS: u32 = 60;

/// The error function, accurate to ~1e-15 relative.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x.abs() < 2.0 {
        erf_series(x)
    } else {
        (1.0 - erfc_cf(x.abs())).copysign(x)
    }
}

/// The complementary error function `1 - erf(x)`, accurate in the tail.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x >= 2.0 {
        erfc_cf(x)
    } else if x <= -2.0 {
        2.0 - erfc_cf(-x)
    } else {
        1.0 - erf_series(x)
    }
}

/// `0.5 x (1 + erf(x / sqrt 2))`, written as `0.5 x erfc(-x / sqrt 2)` so
/// the negative tail keeps its relative accuracy.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * erfc(-x / std::f64::consts::SQRT_2)
}

/// GPT-2's `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// `x * sigmoid(x)`.
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    // Terms shrink once 2n+1 > 2x^2; for |x| < 2 about 45 terms reach 1e-17.
    for n in 1..200 {
        term *= 2.0 * x2 / f64::from(2 * n + 1);
        sum += term;
        if term.abs() <= 1e-17 * sum.abs() {
            break;
        }
    }
    2.0 / PI.sqrt() * (-x2).exp() * sum
}

/// `erfc(x)` for `x >= 2` by the continued fraction.
fn erfc_cf(x: f64) -> f64 {
    if x.is_infinite() {
        return 0.0;
    }
    let mut f = x;
    for n in (1..=CF_LEVELS).rev() {
        f = x + f64::from(n) / 2.0 / f;
    }
    (-x * x).exp() / PI.sqrt() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        ((a - b) / b).abs()
    }

    #[test]
    fn erf_matches_reference_values() {
        // Reference values: glibc erf/erfc (Python's math.erf, math.erfc).
        let cases = [
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (1.9, 0.9927904292352575),
            (2.0, 0.9953222650189527),
            (3.0, 0.9999779095030014),
            (-1.0, -0.8427007929497149),
        ];
        for (x, want) in cases {
            assert!(rel(erf(x), want) < 1e-14, "erf({x}) = {} want {want}", erf(x));
        }
        let tails = [
            (0.5, 0.4795001221869535),
            (2.5, 0.0004069520174449589),
            (5.0, 1.537459794428035e-12),
            (10.0, 2.088487583762545e-45),
        ];
        for (x, want) in tails {
            assert!(rel(erfc(x), want) < 1e-13, "erfc({x}) = {} want {want}", erfc(x));
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn gelu_values() {
        // gelu(x) = x * Phi(x); Phi(1) = 0.8413447460685429.
        assert!(rel(gelu(1.0), 0.8413447460685429) < 1e-14);
        assert!(rel(gelu(-1.0), -0.15865525393145707) < 1e-14);
        // Deep negative tail: -8 * Phi(-8), Phi(-8) = 6.220960574271819e-16.
        assert!(rel(gelu(-8.0), -8.0 * 6.220960574271819e-16) < 1e-12);
        assert!(rel(gelu_tanh(1.0), 0.8411919906082768) < 1e-14);
        assert!(rel(silu(1.0), 0.7310585786300049) < 1e-15);
    }
}
