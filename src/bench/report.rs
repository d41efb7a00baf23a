//! The bench's tables: CSV for scripts, markdown for people.

use super::Row;
use std::fmt::Write;

pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "samples,context,decoded,baseline_ms,bifurcated_ms,speedup,predicted_speedup,fma_floor_ms,memory_ms,\
         logits_max_abs_diff,logits_max_abs\n",
    );
    for r in rows {
        let floor = r.floor_ms.map(|f| format!("{f:.3}")).unwrap_or_default();
        let memory = r.memory_ms.map(|m| format!("{m:.3}")).unwrap_or_default();
        let diff = r.logits_diff.map(|(d, m)| format!("{d:.3e},{m:.4}")).unwrap_or_else(|| ",".to_string());
        let _ = writeln!(
            s,
            "{},{},{},{:.3},{:.3},{:.3},{:.3},{floor},{memory},{diff}",
            r.samples,
            r.context,
            r.decoded,
            r.baseline_ms,
            r.bifurcated_ms,
            r.speedup(),
            r.predicted
        );
    }
    s
}

/// The table under `title` and `about` (what was compared, see
/// [`super::Sweep::about`]), then a line for each point left out
/// (`skipped`: the point and why, see [`super::Sweep::skipped`]).
pub fn to_markdown(rows: &[Row], skipped: &[String], title: &str, about: &str) -> String {
    let mut s = format!("## {title}\n\n");
    if !about.is_empty() {
        let _ = write!(s, "{about}.\n\n");
    }
    s.push_str(
        "Median step latency; speedup = baseline / bifurcated; predicted = bytes moved, baseline / \
         bifurcated; FMA floor = the step's multiply-adds (the same on both sides) at this machine's measured peak \
         rate, the least time either step can take; % of peak = FMA floor / bifurcated ms; memory ms = the bytes \
         the bifurcated step's kernels move (the bytes model of its plan) at this machine's measured read rate, \
         % of it = memory ms / bifurcated ms (near 100%: bound by memory; above: some of it was in cache); \
         logits max diff = the largest |difference| of the two steps' logits on the same inputs (the largest \
         |logit| beside it).\n\n",
    );
    s.push_str(
        "| samples | context | decoded | baseline ms | bifurcated ms | speedup | predicted | FMA floor ms | % of peak \
         | memory ms | % of it | logits max diff |\n",
    );
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let floor = r.floor_ms.map_or_else(|| "-".to_string(), |f| format!("{f:.2}"));
        let pct = r.bifurcated_peak_pct().map_or_else(|| "-".to_string(), |p| format!("{p:.0}%"));
        let memory = r.memory_ms.map_or_else(|| "-".to_string(), |m| format!("{m:.2}"));
        let mem_pct = r.bifurcated_memory_pct().map_or_else(|| "-".to_string(), |p| format!("{p:.0}%"));
        let diff = r.logits_diff.map_or_else(|| "-".to_string(), |(d, m)| format!("{d:.3e} (max {m:.2})"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2}x | {:.2}x | {floor} | {pct} | {memory} | {mem_pct} | {diff} |",
            r.samples,
            r.context,
            r.decoded,
            r.baseline_ms,
            r.bifurcated_ms,
            r.speedup(),
            r.predicted
        );
    }
    if !skipped.is_empty() {
        s.push_str("\nNot run:\n\n");
        for why in skipped {
            let _ = writeln!(s, "- {why}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_one_line_per_row() {
        let rows = vec![
            Row {
                samples: 1,
                context: 1024,
                decoded: 16,
                baseline_ms: 2.0,
                bifurcated_ms: 2.0,
                predicted: 1.0,
                floor_ms: None,
                memory_ms: None,
                logits_diff: None,
            },
            Row {
                samples: 32,
                context: 1024,
                decoded: 16,
                baseline_ms: 40.0,
                bifurcated_ms: 10.0,
                predicted: 6.0,
                floor_ms: Some(2.5),
                memory_ms: Some(7.5),
                logits_diff: Some((2.5e-6, 8.0)),
            },
        ];
        let csv = to_csv(&rows);
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.contains("1,1024,16,2.000,2.000,1.000,1.000,,,,\n"), "{csv}");
        assert!(csv.contains("32,1024,16,40.000,10.000,4.000,6.000,2.500,7.500,2.500e-6,8.0000\n"), "{csv}");
        let md = to_markdown(&rows, &[], "t", "4 of 4 attention sites bifurcated (optimized at b=32)");
        assert!(md.starts_with("## t\n\n4 of 4 attention sites bifurcated (optimized at b=32).\n\nMedian"), "{md}");
        assert!(md.contains("| 1 | 1024 | 16 | 2.00 | 2.00 | 1.00x | 1.00x | - | - | - | - | - |"), "{md}");
        let row = "| 32 | 1024 | 16 | 40.00 | 10.00 | 4.00x | 6.00x | 2.50 | 25% | 7.50 | 75% | 2.500e-6 (max 8.00) |";
        assert!(md.contains(row), "{md}");
        assert!(!md.contains("Not run"), "{md}");
        let why = "b=64, m_c=16384, m_d=16: not enough memory for the baseline and bifurcated steps: ...";
        let md = to_markdown(&rows, &[why.to_string()], "t", "");
        assert!(md.starts_with("## t\n\nMedian"), "{md}");
        assert!(md.ends_with(&format!("\nNot run:\n\n- {why}\n")), "{md}");
    }
}
