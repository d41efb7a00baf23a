//! `bifurc bench` on the tiny graph: a small sweep runs both compiled steps
//! and writes its table and plots.

use std::process::Command;

#[test]
fn bench_cli_writes_tables_and_plots() {
    let dir = std::env::temp_dir().join(format!("bifurc-bench-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_bifurc"))
        .args(["bench", "examples/tiny/model.json", "--samples", "1,4", "--context", "8,16", "--decoded", "0"])
        .args(["--repeats", "1", "--out"])
        .arg(&dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run bifurc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Header, separator, and one row per point.
    assert_eq!(stdout.lines().filter(|l| l.starts_with("| ")).count(), 1 + 4, "{stdout}");
    let csv = std::fs::read_to_string(dir.join("bench.csv")).expect("bench.csv");
    assert_eq!(csv.lines().count(), 5);
    for row in csv.lines().skip(1) {
        let cols: Vec<f64> = row.split(',').map(|c| c.parse().expect("numeric")).collect();
        assert!(cols[3] > 0.0 && cols[4] > 0.0, "latencies are measured: {row}");
    }
    for svg in ["speedup.svg", "latency.svg"] {
        let text = std::fs::read_to_string(dir.join(svg)).expect("svg written");
        assert!(text.starts_with("<svg"), "{svg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_rejects_multi_level_graphs() {
    let out = Command::new(env!("CARGO_BIN_EXE_bifurc"))
        .args(["bench", "examples/multilevel/model.json", "--samples", "1", "--context", "8"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run bifurc");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("multi-level graphs are not benchmarked"));
}
