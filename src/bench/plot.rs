//! SVG plots of a sweep (plotters): speedup against samples, measured and
//! predicted, one line per context length; and step latency of both sides.

use super::Row;
use plotters::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;

const COLORS: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];

fn contexts(rows: &[Row]) -> Vec<i64> {
    rows.iter().map(|r| r.context).collect::<BTreeSet<_>>().into_iter().collect()
}

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Writes `speedup.svg` and `latency.svg` into `dir`. Every latency and
/// ratio must be positive and finite (as [`super::rows_from_csv`] reads
/// them and a sweep measures them): an axis to infinity has no end, and
/// drawing one never finished.
pub fn write_svgs(rows: &[Row], dir: &Path, title: &str) -> std::io::Result<()> {
    let finite = |v: f64| v.is_finite() && v > 0.0;
    if let Some(r) =
        rows.iter().find(|r| ![r.baseline_ms, r.bifurcated_ms, r.predicted, r.speedup()].into_iter().all(finite))
    {
        return Err(err(format!(
            "cannot plot b={}, m_c={}: its latencies and ratios must be positive and finite (baseline {:?} ms, \
             bifurcated {:?} ms, predicted {:?})",
            r.samples, r.context, r.baseline_ms, r.bifurcated_ms, r.predicted
        )));
    }
    speedup(rows, &dir.join("speedup.svg"), title)?;
    latency(rows, &dir.join("latency.svg"), title)
}

fn x_range(rows: &[Row]) -> std::ops::Range<f64> {
    let max = rows.iter().map(|r| r.samples).max().unwrap_or(1) as f64;
    0.0..max * 1.05 + 1.0
}

fn speedup(rows: &[Row], path: &Path, title: &str) -> std::io::Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ymax = rows.iter().map(|r| r.speedup().max(r.predicted)).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: speedup of the bifurcated step"), ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(x_range(rows), 0.0..ymax)
        .map_err(err)?;
    chart.configure_mesh().x_desc("samples (b)").y_desc("baseline / bifurcated").draw().map_err(err)?;
    for (i, c) in contexts(rows).into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.context == c).map(|r| (r.samples as f64, r.speedup())).collect();
        let pred: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.context == c).map(|r| (r.samples as f64, r.predicted)).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("measured, context {c}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(pred, 6, 4, color.into()))
            .map_err(err)?
            .label(format!("bytes model, context {c}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)
}

fn latency(rows: &[Row], path: &Path, title: &str) -> std::io::Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ymax = rows.iter().map(|r| r.baseline_ms.max(r.bifurcated_ms)).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: median step latency"), ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(rows), 0.0..ymax)
        .map_err(err)?;
    chart.configure_mesh().x_desc("samples (b)").y_desc("ms per step").draw().map_err(err)?;
    for (i, c) in contexts(rows).into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let base: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.context == c).map(|r| (r.samples as f64, r.baseline_ms)).collect();
        let bif: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.context == c).map(|r| (r.samples as f64, r.bifurcated_ms)).collect();
        chart
            .draw_series(DashedLineSeries::new(base, 6, 4, color.into()))
            .map_err(err)?
            .label(format!("baseline, context {c}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(LineSeries::new(bif, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("bifurcated, context {c}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An infinite ratio is refused before anything is drawn (its axis
    /// would have no end); extreme finite values draw.
    #[test]
    fn refuses_rows_it_cannot_draw() {
        let row = |baseline_ms: f64, bifurcated_ms: f64| Row {
            samples: 4,
            context: 16,
            decoded: 0,
            baseline_ms,
            bifurcated_ms,
            predicted: 2.0,
            floor_ms: None,
            memory_ms: None,
            logits_diff: None,
        };
        let dir = std::env::temp_dir().join(format!("bifurc-plot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let e = write_svgs(&[row(1e300, 1e-300)], &dir, "t").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("cannot plot b=4, m_c=16") && e.contains("1e-300"), "{e}");
        assert!(!dir.join("speedup.svg").exists(), "nothing drawn");
        write_svgs(&[row(1e300, 1e299), row(3.0, 1.5)], &dir, "t").unwrap_or_else(|e| panic!("{e}"));
        assert!(dir.join("latency.svg").exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
