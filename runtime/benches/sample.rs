//! Host time to draw a decode step's tokens: `cargo bench -p bifurc-runtime
//! --bench sample`.
//!
//! After every step the samples' next tokens are drawn on the host from
//! the logits `[b, vocab]` (the device idles meanwhile). At b = 32 and a
//! 32000-token vocabulary (Llama-2), greedy and at temperature 0.8: the
//! samples one after another (`sample_token`) against the batch
//! (`sample_tokens`, split across the cores; the same tokens). Median of 15.

use bifurc_runtime::session::{sample_rng, sample_token, sample_tokens};
use std::time::Instant;

const RUNS: usize = 15;

fn median_ms(mut f: impl FnMut() -> u64) -> (f64, u64) {
    let mut check = 0;
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            check = std::hint::black_box(f());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2], check)
}

fn main() {
    let (b, vocab) = (32usize, 32000usize);
    let logits: Vec<f32> = (0..b * vocab).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("sample: drawing b={b} tokens from [{b}, {vocab}] logits, median of {RUNS} ({cores} cores)");
    for temperature in [0.0f32, 0.8] {
        let (one_ms, one) = median_ms(|| {
            (0..b)
                .map(|s| {
                    let row = &logits[s * vocab..(s + 1) * vocab];
                    u64::from(sample_token(row, temperature, &mut sample_rng(1, s)).expect("draw"))
                })
                .sum()
        });
        let (batch_ms, batch) = median_ms(|| {
            let mut rngs: Vec<_> = (0..b).map(|s| sample_rng(1, s)).collect();
            sample_tokens(&logits, vocab, false, temperature, &mut rngs)
                .expect("draw")
                .iter()
                .map(|&t| u64::from(t))
                .sum()
        });
        assert_eq!(one, batch, "the batch draws the same tokens");
        println!(
            "  temperature {temperature}: one by one {one_ms:.2} ms, batch {batch_ms:.2} ms ({:.2}x)",
            one_ms / batch_ms
        );
    }
}
