//! The bench's tables: CSV for scripts, markdown for people.

use super::Row;
use std::fmt::Write;

pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from("samples,context,decoded,baseline_ms,bifurcated_ms,speedup,predicted_speedup\n");
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{:.3},{:.3},{:.3},{:.3}",
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

pub fn to_markdown(rows: &[Row], title: &str) -> String {
    let mut s = format!("## {title}\n\nMedian step latency; speedup = baseline / bifurcated; predicted = bytes moved, baseline / bifurcated.\n\n");
    s.push_str("| samples | context | decoded | baseline ms | bifurcated ms | speedup | predicted |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_one_line_per_row() {
        let rows = vec![
            Row { samples: 1, context: 1024, decoded: 16, baseline_ms: 2.0, bifurcated_ms: 2.0, predicted: 1.0 },
            Row { samples: 32, context: 1024, decoded: 16, baseline_ms: 40.0, bifurcated_ms: 10.0, predicted: 6.0 },
        ];
        let csv = to_csv(&rows);
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.contains("32,1024,16,40.000,10.000,4.000,6.000"));
        let md = to_markdown(&rows, "t");
        assert!(md.contains("| 32 | 1024 | 16 | 40.00 | 10.00 | 4.00x | 6.00x |"));
    }
}
