//! Bench tables read back: `bifurc bench`'s bench.csv, or `bifurc-run
//! bench`'s from a GPU machine (columns `b, m_c, m_d, baseline_ms,
//! bifurcated_ms, …, predicted_speedup`), so that `bifurc plot` can draw
//! either.

use super::Row;

/// Column names of each format: samples, context, decoded, baseline ms,
/// bifurcated ms, predicted speedup.
const FORMATS: [[&str; 6]; 2] = [
    ["samples", "context", "decoded", "baseline_ms", "bifurcated_ms", "predicted_speedup"],
    ["b", "m_c", "m_d", "baseline_ms", "bifurcated_ms", "predicted_speedup"],
];

/// The rows of a bench CSV with both latencies measured (a point the bench
/// skipped, its latency cells empty, is left out). Errors name the line.
pub fn rows_from_csv(text: &str) -> Result<Vec<Row>, String> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or("the file is empty")?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let columns: Vec<usize> = FORMATS
        .iter()
        .find_map(|f| f.iter().map(|c| names.iter().position(|n| n == c)).collect::<Option<Vec<usize>>>())
        .ok_or_else(|| {
            format!("line 1: not a bench table (wants columns {} or {})", FORMATS[0].join(","), FORMATS[1].join(","))
        })?;
    // Optional (written by `bifurc bench` since it measures the peak rate;
    // the logits' difference by both benches).
    let column = |name: &str| names.iter().position(|n| *n == name);
    let (floor_column, memory_column, diff_columns) =
        (column("fma_floor_ms"), column("memory_ms"), [column("logits_max_abs_diff"), column("logits_max_abs")]);
    let mut rows = Vec::new();
    for (i, line) in lines {
        // Only the leading numeric columns are read; a quoted note comes last.
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let cell = |c: usize| cells.get(columns[c]).copied().unwrap_or("");
        if cell(3).is_empty() || cell(4).is_empty() {
            continue;
        }
        // Counts at least `least`; times and ratios positive and finite
        // (a NaN or infinite one made the plots' axes endless).
        let int = |c: usize, least: i64| -> Result<i64, String> {
            let v: i64 = cell(c)
                .parse()
                .map_err(|_| format!("line {}: `{}` is not an integer ({})", i + 1, cell(c), names[columns[c]]))?;
            if v < least {
                return Err(format!("line {}: {} is {v}, less than {least}", i + 1, names[columns[c]]));
            }
            Ok(v)
        };
        let positive = |text: &str, name: &str| -> Result<f64, String> {
            let v: f64 = text.parse().map_err(|_| format!("line {}: `{text}` is not a number ({name})", i + 1))?;
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("line {}: {name} is {text}, not a positive finite number", i + 1));
            }
            Ok(v)
        };
        let num = |c: usize| positive(cell(c), names[columns[c]]);
        let optional = |c: Option<usize>| c.and_then(|c| cells.get(c).copied()).filter(|c| !c.is_empty());
        // An optional time: empty or absent, else positive and finite.
        let time = |c: Option<usize>, name: &str| optional(c).map(|c| positive(c, name)).transpose();
        let (floor_ms, memory_ms) = (time(floor_column, "fma_floor_ms")?, time(memory_column, "memory_ms")?);
        // Both or neither; neither below 0 (NaN where a step gave NaN
        // logits: not drawn, so kept as the bench wrote it).
        let logits_diff = match diff_columns.map(optional) {
            [Some(d), Some(m)] => {
                let [d, m] =
                    [(d, "logits_max_abs_diff"), (m, "logits_max_abs")].map(|(text, name)| match text.parse::<f64>() {
                        Ok(v) if v.is_nan() || v >= 0.0 => Ok(v),
                        _ => Err(format!("line {}: {name} is {text}, not a number at least 0", i + 1)),
                    });
                Some((d?, m?))
            }
            _ => None,
        };
        rows.push(Row {
            samples: int(0, 1)?,
            context: int(1, 0)?,
            decoded: int(2, 0)?,
            baseline_ms: num(3)?,
            bifurcated_ms: num(4)?,
            predicted: num(5)?,
            floor_ms,
            memory_ms,
            logits_diff,
        });
    }
    if rows.is_empty() {
        return Err("no measured rows".to_string());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_formats_and_skips_unmeasured_points() {
        let ours = super::super::to_csv(&[Row {
            samples: 8,
            context: 1024,
            decoded: 16,
            baseline_ms: 2.0,
            bifurcated_ms: 1.0,
            predicted: 3.0,
            floor_ms: Some(0.25),
            memory_ms: Some(0.75),
            logits_diff: Some((1.5e-5, 12.25)),
        }]);
        let rows = rows_from_csv(&ours).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((rows[0].samples, rows[0].context, rows[0].speedup(), rows[0].predicted), (8, 1024, 2.0, 3.0));
        assert_eq!((rows[0].floor_ms, rows[0].memory_ms), (Some(0.25), Some(0.75)));
        assert_eq!(rows[0].logits_diff, Some((1.5e-5, 12.25)));
        let gpu =
            "b,m_c,m_d,baseline_ms,bifurcated_ms,speedup,predicted_speedup,logits_max_abs_diff,logits_max_abs,note\n\
                   16,8192,256,4.5,1.5,3.0,5.1,0.000125,3.5,\"\"\n32,8192,256,,,,,,,\"time budget spent, skipped\"\n";
        let rows = rows_from_csv(gpu).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].samples, rows[0].decoded, rows[0].baseline_ms, rows[0].floor_ms), (16, 256, 4.5, None));
        assert_eq!(rows[0].memory_ms, None, "a GPU machine's table has no memory column");
        assert_eq!(rows[0].logits_diff, Some((0.000125, 3.5)));
        let nan = rows_from_csv(&gpu.replace("0.000125,3.5", "NaN,NaN")).unwrap_or_else(|e| panic!("{e}"));
        assert!(nan[0].logits_diff.is_some_and(|(d, m)| d.is_nan() && m.is_nan()), "NaN logits kept as written");
        let err = rows_from_csv("x,y\n1,2\n").unwrap_err();
        assert!(err.contains("not a bench table"), "{err}");
        let err = rows_from_csv("b,m_c,m_d,baseline_ms,bifurcated_ms,predicted_speedup\n1,2,3,abc,1,1\n").unwrap_err();
        assert_eq!(err, "line 2: `abc` is not a number (baseline_ms)");
        let err = rows_from_csv(
            "samples,context,decoded,baseline_ms,bifurcated_ms,predicted_speedup,fma_floor_ms\n1,2,3,4,1,1,x\n",
        )
        .unwrap_err();
        assert_eq!(err, "line 2: `x` is not a number (fma_floor_ms)");
    }

    /// Values no measurement gives are refused, naming the line and the
    /// column: `bifurc plot` of a row with a NaN or infinite latency ran
    /// forever (its axis had no end).
    #[test]
    fn refuses_values_no_measurement_gives() {
        let header = "samples,context,decoded,baseline_ms,bifurcated_ms,predicted_speedup,fma_floor_ms,memory_ms,\
                      logits_max_abs_diff,logits_max_abs\n";
        for (row, want) in [
            ("1,2,3,4,1,1,,,-0.5,1", "line 2: logits_max_abs_diff is -0.5, not a number at least 0"),
            ("1,2,3,4,1,1,,,0,x", "line 2: logits_max_abs is x, not a number at least 0"),
            ("1,2,3,nan,1,1,", "line 2: baseline_ms is nan, not a positive finite number"),
            ("1,2,3,4,inf,1,", "line 2: bifurcated_ms is inf, not a positive finite number"),
            ("1,2,3,4,1,1e999,", "line 2: predicted_speedup is 1e999, not a positive finite number"),
            ("1,2,3,0,1,1,", "line 2: baseline_ms is 0, not a positive finite number"),
            ("1,2,3,4,-1,1,", "line 2: bifurcated_ms is -1, not a positive finite number"),
            ("1,2,3,4,1,1,-2", "line 2: fma_floor_ms is -2, not a positive finite number"),
            ("1,2,3,4,1,1,,nan", "line 2: memory_ms is nan, not a positive finite number"),
            ("0,2,3,4,1,1,", "line 2: samples is 0, less than 1"),
            ("1,-2,3,4,1,1,", "line 2: context is -2, less than 0"),
            ("1,2,-3,4,1,1,", "line 2: decoded is -3, less than 0"),
        ] {
            assert_eq!(rows_from_csv(&format!("{header}{row}\n")).err().as_deref(), Some(want), "{row}");
        }
    }
}
