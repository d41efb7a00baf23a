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

/// Logits a thread of [`sample_tokens`] must get (below, starting it costs
/// more than it saves): a greedy pick reads a logit in about a nanosecond,
/// a draw at a temperature takes an `exp` of each, ten times that.
const PARALLEL_MIN: usize = 1 << 15;
const PARALLEL_MIN_GREEDY: usize = 1 << 20;

/// One token per sample `s` (one generator each, `rngs[s]`): drawn from
/// `rows` itself (`shared`: `vocab` logits every sample draws from) or from
/// row `s` of `rows` (`[rngs.len(), vocab]`). A large batch is split across
/// the machine's cores by sample; since every sample has its own
/// generator, the tokens, and the first error by sample (its index and
/// cause), are those of drawing the samples one after another.
pub fn sample_tokens(
    rows: &[f32],
    vocab: usize,
    shared: bool,
    temperature: f32,
    rngs: &mut [SplitMix64],
) -> Result<Vec<u32>, (usize, SampleError)> {
    let one = |s: usize, rng: &mut SplitMix64| {
        let row = if shared { rows } else { rows.get(s * vocab..(s + 1) * vocab).unwrap_or_default() };
        sample_token(row, temperature, rng).map_err(|e| (s, e))
    };
    let min = if temperature == 0.0 { PARALLEL_MIN_GREEDY } else { PARALLEL_MIN };
    let threads = crate::parallel::parts(rngs.len() * vocab, min).min(rngs.len());
    if threads <= 1 {
        return rngs.iter_mut().enumerate().map(|(s, rng)| one(s, rng)).collect();
    }
    let per = rngs.len().div_ceil(threads);
    let parts: Vec<Result<Vec<u32>, (usize, SampleError)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rngs
            .chunks_mut(per)
            .enumerate()
            .map(|(c, chunk)| {
                let one = &one;
                scope.spawn(move || chunk.iter_mut().enumerate().map(|(i, rng)| one(c * per + i, rng)).collect())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let mut tokens = Vec::with_capacity(rngs.len());
    for part in parts {
        tokens.extend(part?);
    }
    Ok(tokens)
}

/// Draws a token id from `logits` (see the module docs).
pub fn sample_token(logits: &[f32], temperature: f32, rng: &mut SplitMix64) -> Result<u32, SampleError> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(SampleError::Temperature(temperature));
    }
    // The largest logit, and whether any is NaN or +inf, in one branch-free
    // (vectorized) pass; then the first of the largest (ties to the lowest id).
    let (mut max, mut bad) = (f32::NEG_INFINITY, false);
    for &value in logits {
        bad |= value.is_nan() | (value == f32::INFINITY);
        max = if value > max { value } else { max };
    }
    if bad {
        if let Some((index, &value)) = logits.iter().enumerate().find(|(_, v)| v.is_nan() || **v == f32::INFINITY) {
            return Err(SampleError::NotFinite { index, value });
        }
    }
    if max == f32::NEG_INFINITY {
        return Err(SampleError::Empty(logits.len()));
    }
    let argmax = logits.iter().position(|&v| v == max).unwrap_or(0);
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

    #[test]
    fn a_batch_draws_what_its_samples_draw_one_by_one() {
        // Large enough to be split across threads on a machine with cores
        // (at a temperature; greedy picks need larger batches).
        let (b, vocab) = (24, 8000);
        assert!(b * vocab >= 2 * PARALLEL_MIN);
        let rows: Vec<f32> = (0..b * vocab).map(|i| ((i * 7919) % 1013) as f32 / 97.0).collect();
        for (shared, temperature) in [(false, 0.0), (false, 0.8), (true, 0.8)] {
            let mut rngs: Vec<SplitMix64> = (0..b).map(|s| sample_rng(3, s)).collect();
            let batch = sample_tokens(&rows, vocab, shared, temperature, &mut rngs).unwrap();
            let one_by_one: Vec<u32> = (0..b)
                .map(|s| {
                    let row = if shared { &rows[..] } else { &rows[s * vocab..(s + 1) * vocab] };
                    sample_token(row, temperature, &mut sample_rng(3, s)).unwrap()
                })
                .collect();
            assert_eq!(batch, one_by_one, "shared {shared}, temperature {temperature}");
            // The generators advanced as one by one: the next draw agrees too.
            let next = sample_tokens(&rows, vocab, shared, temperature, &mut rngs).unwrap();
            let mut again: Vec<SplitMix64> = (0..b).map(|s| sample_rng(3, s)).collect();
            for (s, rng) in again.iter_mut().enumerate() {
                let row = if shared { &rows[..] } else { &rows[s * vocab..(s + 1) * vocab] };
                sample_token(row, temperature, rng).unwrap();
                assert_eq!(sample_token(row, temperature, rng).unwrap(), next[s]);
            }
        }
        // The first failing sample is reported, as one by one.
        let mut bad = rows.clone();
        bad[5 * vocab + 3] = f32::NAN;
        bad[17 * vocab + 1] = f32::INFINITY;
        let mut rngs: Vec<SplitMix64> = (0..b).map(|s| sample_rng(3, s)).collect();
        let (sample, err) = sample_tokens(&bad, vocab, false, 0.8, &mut rngs).unwrap_err();
        assert_eq!((sample, err.to_string()), (5, "logit 3 is NaN".to_string()));
    }
}
