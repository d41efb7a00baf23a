//! Drawing one token from a row of logits.
//!
//! - temperature 0: greedy, the highest logit, ties to the lowest id;
//! - temperature T > 0: a draw from softmax(logits / T), computed in f64
//!   with the maximum subtracted, by inverse CDF on one uniform number of the
//!   sample's own generator (deterministic for a seed).
//!
//! `-inf` logits are allowed (masked tokens: never drawn); NaN or `+inf`
//! logits are an error (they mean a broken step, not a distribution).

use crate::rng::SplitMix64;

/// Why no token could be drawn.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("temperature must be finite and >= 0, got {0}")]
    Temperature(f32),
    #[error("logit {index} is {value}")]
    NotFinite { index: usize, value: f32 },
    #[error("no finite logit to choose from ({0} logits)")]
    Empty(usize),
}

/// The generator of sample `index` under `seed`: each sample has its own
/// stream, so sample `i` draws the same tokens whatever the batch size.
pub fn sample_rng(seed: u64, index: usize) -> SplitMix64 {
    SplitMix64::named(seed, &format!("sample.{index}"))
}

/// Draws a token id from `logits` (see the module docs).
pub fn sample_token(logits: &[f32], temperature: f32, rng: &mut SplitMix64) -> Result<u32, SampleError> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(SampleError::Temperature(temperature));
    }
    let mut best: Option<(usize, f32)> = None;
    for (index, &value) in logits.iter().enumerate() {
        if value.is_nan() || value == f32::INFINITY {
            return Err(SampleError::NotFinite { index, value });
        }
        if value > f32::NEG_INFINITY && best.is_none_or(|(_, b)| value > b) {
            best = Some((index, value));
        }
    }
    let (argmax, max) = best.ok_or(SampleError::Empty(logits.len()))?;
    if temperature == 0.0 {
        return Ok(argmax as u32);
    }
    let t = f64::from(temperature);
    let weights: Vec<f64> = logits.iter().map(|&l| ((f64::from(l) - f64::from(max)) / t).exp()).collect();
    let total: f64 = weights.iter().sum();
    let target = rng.unit_f64() * total;
    let mut cumulative = 0.0;
    let mut last_positive = argmax;
    for (index, w) in weights.iter().enumerate() {
        if *w > 0.0 {
            cumulative += w;
            last_positive = index;
            if cumulative > target {
                return Ok(index as u32);
            }
        }
    }
    // Rounding left the target at the very top: the last token with weight.
    Ok(last_positive as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_max_and_the_lowest_id_on_ties() {
        let mut rng = SplitMix64::new(0);
        assert_eq!(sample_token(&[0.0, 3.0, 1.0], 0.0, &mut rng), Ok(1));
        assert_eq!(sample_token(&[2.0, 5.0, 5.0, 5.0], 0.0, &mut rng), Ok(1));
        assert_eq!(sample_token(&[f32::NEG_INFINITY, -1e30, f32::NEG_INFINITY], 0.0, &mut rng), Ok(1));
        assert_eq!(sample_token(&[f32::NEG_INFINITY; 3], 0.0, &mut rng), Err(SampleError::Empty(3)));
        assert_eq!(sample_token(&[], 0.0, &mut rng), Err(SampleError::Empty(0)));
        assert_eq!(sample_token(&[0.0, f32::NAN], 0.0, &mut rng).unwrap_err().to_string(), "logit 1 is NaN");
        assert!(sample_token(&[f32::INFINITY], 1.0, &mut rng).is_err());
        assert!(sample_token(&[1.0], -1.0, &mut rng).is_err());
        assert!(sample_token(&[1.0], f32::NAN, &mut rng).is_err());
    }

    #[test]
    fn temperature_follows_the_softmax() {
        // softmax([ln 1, ln 2, ln 3, -inf] / 1) = [1/6, 2/6, 3/6, 0].
        let logits = [0.0, 2f32.ln(), 3f32.ln(), f32::NEG_INFINITY];
        let mut rng = sample_rng(42, 0);
        let n = 60_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample_token(&logits, 1.0, &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(counts[3], 0, "a -inf logit is never drawn");
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
        // A low temperature concentrates on the max; a high one flattens.
        let mut rng = sample_rng(1, 0);
        assert!((0..200).all(|_| sample_token(&logits, 0.01, &mut rng) == Ok(2)));
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample_token(&logits, 1000.0, &mut rng).unwrap() as usize] += 1;
        }
        assert!(counts[..3].iter().all(|&c| (c as f64 / n as f64 - 1.0 / 3.0).abs() < 0.01), "{counts:?}");
    }

    #[test]
    fn deterministic_for_a_seed_and_independent_per_sample() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed, index| {
            let mut rng = sample_rng(seed, index);
            (0..20).map(|_| sample_token(&logits, 0.8, &mut rng).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(5, 0), draw(5, 0));
        assert_ne!(draw(5, 0), draw(5, 1));
        assert_ne!(draw(5, 0), draw(6, 0));
    }
}
