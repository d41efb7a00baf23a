//! What `bifurc run` reports: as text for a terminal or as one JSON object.

use bifurc_runtime::session::{PrefillChunks, SampleOutput};
use std::path::PathBuf;

/// How a prefill step filled the context (`bifurc run --prefill`).
#[derive(Clone, Debug)]
pub struct PrefillReport {
    /// Tokens per run.
    pub n: usize,
    /// Its runs over the prompt: whole chunks, a padded one, tokens stepped.
    pub chunks: PrefillChunks,
    /// Its weights shared with the decode step (one copy; on the CPU,
    /// where both store them alike).
    pub shared_weights: usize,
}

impl PrefillReport {
    /// Its runs in words: `2 runs of 16 tokens, one padded run of 8`.
    fn runs(&self) -> String {
        let c = &self.chunks;
        let whole = c.whole / self.n.max(1);
        let mut parts = vec![format!("{whole} run{} of {} tokens", if whole == 1 { "" } else { "s" }, self.n)];
        if c.padded > 0 {
            parts.push(format!("one padded run of {}", c.padded));
        }
        if c.stepped > 0 {
            parts.push(format!("{} stepped", c.stepped));
        }
        parts.join(", ")
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// `cpu (MLIR JIT, N threads)` or the CUDA device's name.
    pub device: String,
    pub artifact: PathBuf,
    pub bifurcated: bool,
    /// How the weights were made (`random (seed N)` or the files).
    pub weights: String,
    pub weights_bound: usize,
    /// With a prefill step (`context` is then `prompt, prefilled`).
    pub prefill: Option<PrefillReport>,
    pub weights_s: f64,
    /// Loading the step: JIT compile (CPU) or module load (CUDA).
    pub load_s: f64,
    pub context_len: usize,
    /// `prompt`, `prompt, prefilled` (by a prefill step) or `random`.
    pub context: &'static str,
    pub fill_ms: f64,
    pub samples: usize,
    pub steps: usize,
    pub temperature: f32,
    pub seed: u64,
    pub output: SampleOutput,
    /// Wall seconds of the whole decode (all steps, sampling included).
    pub decode_s: f64,
}

/// How the context was made, for [`RunReport::render`] (its `context`).
fn context_how(context: &str) -> &'static str {
    match context {
        "random" => "random",
        "prompt, prefilled" => "filled from the prompt by the prefill step",
        _ => "filled by stepping the prompt",
    }
}

/// The value at quantile `q` (0..=1) of `xs`, nearest rank.
pub fn percentile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

impl RunReport {
    pub fn median_ms(&self) -> f64 {
        bifurc_runtime::bench::median(&self.output.step_ms).unwrap_or(0.0)
    }

    pub fn p90_ms(&self) -> f64 {
        percentile(&self.output.step_ms, 0.9).unwrap_or(0.0)
    }

    /// Generated tokens (all samples) per second of decode wall time,
    /// its set-up left out ([`SampleOutput::setup_ms`]: on the CPU, the
    /// JIT compile of the plan the samples take, once).
    pub fn tokens_per_s(&self) -> f64 {
        self.output.tokens_per_s(self.decode_s)
    }

    /// The report as one JSON object. `samples` holds every sample's ids;
    /// `tokens` holds the same (the key `bifurc-run run --json` uses, which
    /// scripts/gpu-check.sh compares); `logits` only when kept.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "device": self.device,
            "artifact": self.artifact.display().to_string(),
            "bifurcated": self.bifurcated,
            "weights": self.weights,
            "context_len": self.context_len,
            "context": self.context,
            "fill_ms": self.fill_ms,
            "num_samples": self.samples,
            "steps": self.steps,
            // As written (0.8, not the f32's 0.800000011920929).
            "temperature": self.temperature.to_string().parse::<f64>().unwrap_or(f64::from(self.temperature)),
            "seed": self.seed,
            "samples": self.output.tokens,
            "tokens": self.output.tokens,
            "step_ms": self.output.step_ms,
            "median_step_ms": self.median_ms(),
            "p90_step_ms": self.p90_ms(),
            "tokens_per_s": self.tokens_per_s(),
            "decode_setup_ms": self.output.setup_ms,
        });
        if let Some(p) = &self.prefill {
            value["prefill"] = serde_json::json!({
                "n": p.n,
                "whole_runs": p.chunks.whole / p.n.max(1),
                "padded_tokens": p.chunks.padded,
                "stepped_tokens": p.chunks.stepped,
                "shared_weights": p.shared_weights,
            });
        }
        if let Some(logits) = &self.output.last_logits {
            let vocab = logits.shape.get(1).copied().unwrap_or(0).max(1);
            let rows: Vec<Vec<f32>> = logits.data.chunks(vocab).map(<[f32]>::to_vec).collect();
            value["logits"] = serde_json::json!(rows);
        }
        value
    }

    /// The report as text for a terminal.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "device: {}", self.device);
        let _ = writeln!(s, "artifact: {} (bifurcated: {})", self.artifact.display(), self.bifurcated);
        let _ = writeln!(s, "step loaded in {:.2} s", self.load_s);
        let shares = match &self.prefill {
            Some(p) => format!(" (the prefill step shares {} of them)", p.shared_weights),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "weights: {}, {} tensors bound in {:.2} s{shares}",
            self.weights, self.weights_bound, self.weights_s
        );
        let mut how = context_how(self.context).to_string();
        if let Some(p) = &self.prefill {
            how = format!("{how}: {}", p.runs());
        }
        let _ = writeln!(s, "context: {} tokens ({how}; {:.1} ms)", self.context_len, self.fill_ms);
        let _ = writeln!(
            s,
            "decoded {} samples x {} steps (temperature {}, seed {}): step median {:.3} ms, p90 {:.3} ms \
             (bind + run + outputs); {:.1} tokens/s after {:.1} ms of set-up",
            self.samples,
            self.steps,
            self.temperature,
            self.seed,
            self.median_ms(),
            self.p90_ms(),
            self.tokens_per_s(),
            self.output.setup_ms
        );
        for (i, ids) in self.output.tokens.iter().enumerate().take(8) {
            let shown: Vec<String> = ids.iter().take(32).map(u32::to_string).collect();
            let _ = writeln!(s, "sample {i}: {}{}", shown.join(" "), if ids.len() > 32 { " ..." } else { "" });
        }
        if self.output.tokens.len() > 8 {
            let _ = writeln!(s, "({} more samples; --json prints all)", self.output.tokens.len() - 8);
        }
        if let Some(logits) = &self.output.last_logits {
            let vocab = logits.shape.get(1).copied().unwrap_or(0).max(1);
            for (i, row) in logits.data.chunks(vocab).enumerate().take(8) {
                let mut top: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let top: Vec<String> = top.iter().take(5).map(|(id, l)| format!("{id}:{l:.4}")).collect();
                let _ = writeln!(s, "last logits, sample {i}, top 5 (id:logit): {}", top.join(" "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.9), Some(9.0));
        assert_eq!(percentile(&xs, 0.5), Some(5.0));
        assert_eq!(percentile(&xs, 1.0), Some(10.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0], 0.9), Some(3.0));
        assert_eq!(percentile(&[], 0.9), None);
    }

    #[test]
    fn a_prefill_steps_runs_in_words() {
        let report = |whole, padded, stepped| PrefillReport {
            n: 4,
            chunks: PrefillChunks { whole, padded, stepped, last: 0 },
            shared_weights: 0,
        };
        assert_eq!(report(8, 3, 0).runs(), "2 runs of 4 tokens, one padded run of 3");
        assert_eq!(report(4, 0, 0).runs(), "1 run of 4 tokens");
        assert_eq!(report(0, 0, 1).runs(), "0 runs of 4 tokens, 1 stepped");
    }

    #[test]
    fn the_report_says_how_the_context_was_filled() {
        assert_eq!(context_how("prompt"), "filled by stepping the prompt");
        assert_eq!(context_how("prompt, prefilled"), "filled from the prompt by the prefill step");
        assert_eq!(context_how("random"), "random");
    }
}
