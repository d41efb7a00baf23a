//! Bench tables: the measured step times of a baseline and a bifurcated
//! artifact side by side at each shape, with the manifests' bytes model
//! evaluated at the same shape (the speedup a memory-bound step would get).
//!
//! Device-independent: the CUDA bench (`bifurc-run bench`) and any other
//! backend fill [`BenchRow`]s and write them with [`write_csv`] /
//! [`write_markdown`].

use crate::manifest::{Manifest, ManifestError};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The largest |difference| of two steps' outputs on the same inputs,
/// and the largest |value| of the first (for scale); `None` when their
/// lengths differ or they are empty. A NaN in either makes that figure
/// NaN (`f64::max` would pass over it, and NaN logits read as agreement).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> Option<(f64, f64)> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let largest = |m: f64, v: f64| if m.is_nan() || v.is_nan() { f64::NAN } else { m.max(v) };
    let diff = a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, largest);
    let scale = a.iter().map(|x| f64::from(x.abs())).fold(0.0, largest);
    Some((diff, scale))
}

/// The median of `xs` (mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Bytes one step moves in the manifest's bytes model, by category.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepBytes {
    pub weights: i64,
    pub context_kv: i64,
    pub decode_kv: i64,
    pub activations: i64,
    pub total: i64,
}

/// The bytes model of the compiled step at `dims`: the sum over its kernels.
pub fn step_bytes(manifest: &Manifest, dims: &BTreeMap<String, i64>) -> Result<StepBytes, ManifestError> {
    let mut out = StepBytes::default();
    for kernel in &manifest.kernels {
        let b = &kernel.bytes;
        out.weights += manifest.eval(&b.weights, dims)?;
        out.context_kv += manifest.eval(&b.context_kv, dims)?;
        out.decode_kv += manifest.eval(&b.decode_kv, dims)?;
        out.activations += manifest.eval(&b.activations, dims)?;
        out.total += manifest.eval(&b.total, dims)?;
    }
    Ok(out)
}

/// One artifact's measurement at one shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Measurement {
    /// Step times in milliseconds.
    Timed(Vec<f64>),
    /// Why it was not measured (does not fit in memory, time budget, error).
    Skipped(String),
}

impl Measurement {
    pub fn median_ms(&self) -> Option<f64> {
        match self {
            Measurement::Timed(t) => median(t),
            Measurement::Skipped(_) => None,
        }
    }

    pub fn repeats(&self) -> usize {
        match self {
            Measurement::Timed(t) => t.len(),
            Measurement::Skipped(_) => 0,
        }
    }

    pub fn note(&self) -> Option<&str> {
        match self {
            Measurement::Timed(_) => None,
            Measurement::Skipped(why) => Some(why),
        }
    }
}

/// Baseline and bifurcated at one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    pub b: i64,
    pub m_c: i64,
    pub m_d: i64,
    pub baseline: Measurement,
    pub bifurcated: Measurement,
    /// The bytes model of each manifest at this shape.
    pub baseline_bytes: StepBytes,
    pub bifurcated_bytes: StepBytes,
    /// Largest |difference| of the two artifacts' logits on the same inputs,
    /// and the largest |logit| (for scale), when both ran.
    pub logits_max_abs_diff: Option<f64>,
    pub logits_max_abs: Option<f64>,
}

impl BenchRow {
    /// Measured speedup: baseline median / bifurcated median.
    pub fn speedup(&self) -> Option<f64> {
        Some(self.baseline.median_ms()? / self.bifurcated.median_ms()?)
    }

    /// The bytes model's speedup: baseline bytes / bifurcated bytes.
    pub fn predicted_speedup(&self) -> Option<f64> {
        (self.bifurcated_bytes.total > 0).then(|| self.baseline_bytes.total as f64 / self.bifurcated_bytes.total as f64)
    }

    fn notes(&self) -> String {
        let mut notes = Vec::new();
        if let Some(n) = self.baseline.note() {
            notes.push(format!("baseline: {n}"));
        }
        if let Some(n) = self.bifurcated.note() {
            notes.push(format!("bifurcated: {n}"));
        }
        notes.join("; ")
    }
}

/// Modelled bytes over measured time, in GB/s.
fn gbps(bytes: i64, ms: Option<f64>) -> Option<f64> {
    ms.filter(|ms| *ms > 0.0).map(|ms| bytes as f64 / (ms * 1e6))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_default()
}

/// CSV with a header row; empty fields where nothing was measured.
pub fn write_csv(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "b,m_c,m_d,baseline_ms,bifurcated_ms,speedup,predicted_speedup,baseline_bytes,bifurcated_bytes,\
         baseline_context_kv_bytes,bifurcated_context_kv_bytes,baseline_gbps,bifurcated_gbps,\
         baseline_repeats,bifurcated_repeats,logits_max_abs_diff,logits_max_abs,note\n",
    );
    for r in rows {
        let (base, bif) = (r.baseline.median_ms(), r.bifurcated.median_ms());
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
            r.b,
            r.m_c,
            r.m_d,
            opt(base, 4),
            opt(bif, 4),
            opt(r.speedup(), 3),
            opt(r.predicted_speedup(), 3),
            r.baseline_bytes.total,
            r.bifurcated_bytes.total,
            r.baseline_bytes.context_kv,
            r.bifurcated_bytes.context_kv,
            opt(gbps(r.baseline_bytes.total, base), 1),
            opt(gbps(r.bifurcated_bytes.total, bif), 1),
            r.baseline.repeats(),
            r.bifurcated.repeats(),
            opt(r.logits_max_abs_diff, 6),
            opt(r.logits_max_abs, 4),
            r.notes().replace('"', "'"),
        );
    }
    out
}

/// One kernel's time in a step's profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProfileRow<'a> {
    /// The manifest's kernel name (`k12_l0_attn_scores_einsum1`).
    pub kernel: &'a str,
    /// The entry point that ran it.
    pub entry: &'a str,
    /// Its node's op.
    pub op: &'a str,
    pub ms: f64,
}

/// A profile as CSV, one kernel a row in launch order (`kernel,entry,op,ms`):
/// the `profile-{label}.csv` that `bifurc-run bench` writes and
/// `scripts/attention_targets.py` and `scripts/tuning_summary.py` read.
pub fn profile_csv(rows: &[ProfileRow]) -> String {
    let mut csv = String::from("kernel,entry,op,ms\n");
    for r in rows {
        let _ = writeln!(csv, "{},{},{},{:.6}", r.kernel, r.entry, r.op, r.ms);
    }
    csv
}

/// The shape the profiles were taken at, as `profile-dims.json` holds it
/// (`{"dims": {"b": 32, ...}}`).
pub fn profile_dims_json(dims: &BTreeMap<String, i64>) -> String {
    serde_json::json!({ "dims": dims }).to_string()
}

/// A Markdown report: `title`, free-form `facts` (artifacts, device, …) and
/// the table.
pub fn write_markdown(title: &str, facts: &[(String, String)], rows: &[BenchRow]) -> String {
    let mut out = format!("# {title}\n\n");
    for (k, v) in facts {
        let _ = writeln!(out, "- {k}: {v}");
    }
    out.push_str(
        "\nMedian step time (ms). *predicted* is the bytes model's speedup (baseline bytes / bifurcated \
         bytes at the shape); GB/s is modelled bytes over measured time.\n\n",
    );
    out.push_str(
        "| b | m_c | m_d | baseline ms | bifurcated ms | speedup | predicted | GB/s base | GB/s bif | logits max diff | note |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        let (base, bif) = (r.baseline.median_ms(), r.bifurcated.median_ms());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.b,
            r.m_c,
            r.m_d,
            opt(base, 3),
            opt(bif, 3),
            r.speedup().map(|s| format!("{s:.2}x")).unwrap_or_default(),
            r.predicted_speedup().map(|s| format!("{s:.2}x")).unwrap_or_default(),
            opt(gbps(r.baseline_bytes.total, base), 0),
            opt(gbps(r.bifurcated_bytes.total, bif), 0),
            match (r.logits_max_abs_diff, r.logits_max_abs) {
                (Some(d), Some(m)) => format!("{d:.3e} (max {m:.2})"),
                _ => String::new(),
            },
            r.notes().replace('|', "/"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn max_abs_diff_is_the_largest_gap_beside_the_largest_value() {
        assert_eq!(max_abs_diff(&[1.0, -4.0, 2.0], &[1.5, -4.0, 1.75]), Some((0.5, 4.0)));
        assert_eq!(max_abs_diff(&[1.0], &[1.0, 2.0]), None, "lengths differ");
        assert_eq!(max_abs_diff(&[], &[]), None, "nothing to compare");
        let nan = max_abs_diff(&[1.0, f32::NAN, 2.0], &[1.0, 3.0, 2.0]);
        assert!(nan.is_some_and(|(d, m)| d.is_nan() && m.is_nan()), "{nan:?}");
        let nan = max_abs_diff(&[1.0, 2.0], &[f32::NAN, 2.0]);
        assert!(nan.is_some_and(|(d, m)| d.is_nan() && m == 2.0), "{nan:?}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn bytes_model_matches_the_manifest_at_its_point() {
        let m = Manifest::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.manifest.json"))
            .unwrap();
        let at_point = step_bytes(&m, &m.point).unwrap();
        assert_eq!(at_point.weights, m.bytes.after.weights);
        assert_eq!(at_point.context_kv, m.bytes.after.context_kv);
        assert_eq!(at_point.decode_kv, m.bytes.after.decode_kv);
        let sum: i64 = m.kernels.iter().map(|k| k.bytes_at_point).sum();
        assert_eq!(at_point.total, sum);
    }

    #[test]
    fn tables() {
        let bytes = |total| StepBytes { total, ..StepBytes::default() };
        let rows = vec![
            BenchRow {
                b: 32,
                m_c: 8192,
                m_d: 256,
                baseline: Measurement::Timed(vec![4.0, 2.0, 3.0]),
                bifurcated: Measurement::Timed(vec![1.0, 1.5]),
                baseline_bytes: bytes(6_000_000),
                bifurcated_bytes: bytes(2_000_000),
                logits_max_abs_diff: Some(0.0125),
                logits_max_abs: Some(3.5),
            },
            BenchRow {
                b: 64,
                m_c: 8192,
                m_d: 256,
                baseline: Measurement::Skipped("needs 90 GB, 79 GB free".into()),
                bifurcated: Measurement::Timed(vec![1.0]),
                baseline_bytes: bytes(1),
                bifurcated_bytes: bytes(0),
                logits_max_abs_diff: None,
                logits_max_abs: None,
            },
        ];
        assert_eq!(rows[0].speedup(), Some(2.4));
        assert_eq!(rows[0].predicted_speedup(), Some(3.0));
        let csv = write_csv(&rows);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        let header = lines[0].split(',').count();
        assert_eq!(lines[1].split(',').count(), header);
        assert!(lines[1].starts_with("32,8192,256,3.0000,1.2500,2.400,3.000,6000000,2000000,"), "{}", lines[1]);
        // GB/s: 6e6 bytes / 3 ms = 2 GB/s; 2e6 bytes / 1.25 ms = 1.6 GB/s.
        assert!(lines[1].contains(",2.0,1.6,3,2,0.012500,"), "{}", lines[1]);
        assert!(lines[2].contains("baseline: needs 90 GB"), "{}", lines[2]);
        let md = write_markdown("bench", &[("device".into(), "H100".into())], &rows);
        assert!(md.contains("- device: H100"));
        assert!(md.contains("| 32 | 8192 | 256 | 3.000 | 1.250 | 2.40x | 3.00x |"), "{md}");
    }
}
