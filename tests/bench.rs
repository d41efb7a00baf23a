//! `bifurc bench` on the tiny graph: a small sweep runs both compiled steps
//! and writes its table and plots.

use std::process::Command;

#[test]
fn bench_cli_writes_tables_and_plots() {
    let dir = std::env::temp_dir().join(format!("bifurc-bench-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_bifurc"))
        .args(["bench", "examples/tiny/model.json", "--samples", "1,4", "--context", "8,16", "--decoded", "0"])
        .args(["--repeats", "1", "--threads", "2", "--out"])
        .arg(&dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run bifurc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Header, separator, and one row per point.
    assert_eq!(stdout.lines().filter(|l| l.starts_with("| ")).count(), 1 + 4, "{stdout}");
    assert!(stdout.contains("examples/tiny/model.json (CPU, 2 threads)"), "the title says where it ran: {stdout}");
    let about = "\n4 of 4 attention sites bifurcated (optimized at b=4, m_c=16, m_d=0).\n";
    assert!(stdout.contains(about), "and what it compared: {stdout}");
    let csv = std::fs::read_to_string(dir.join("bench.csv")).expect("bench.csv");
    assert_eq!(csv.lines().count(), 5);
    for row in csv.lines().skip(1) {
        let cols: Vec<f64> = row.split(',').map(|c| c.parse().expect("numeric")).collect();
        assert!(cols[3] > 0.0 && cols[4] > 0.0, "latencies are measured: {row}");
        // The FMA floor and the memory time: the bifurcated step's kernels
        // move some bytes, at a measured rate.
        assert!(cols.len() == 11 && cols[7] > 0.0 && cols[8] > 0.0 && cols[8].is_finite(), "floors: {row}");
        // The two steps' logits on the same inputs: f32, the same sums.
        assert!(cols[10] > 0.0 && cols[9] <= 1e-4 * cols[10], "logits agree: {row}");
    }
    for svg in ["speedup.svg", "latency.svg"] {
        let text = std::fs::read_to_string(dir.join(svg)).expect("svg written");
        assert!(text.starts_with("<svg"), "{svg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A point past what the host can hold is not run (it would end in an
/// allocation failure, an abort): it is listed under the table with what
/// it needs, the others run; a buffer past the CPU step's limit likewise;
/// a sweep of nothing that can run is a one-line error. The large point,
/// 3 million samples (the context cannot grow so far: positions past 2^24
/// are refused first), needs about 73 GB: on a host with 50 GB available
/// the memory case is not checked.
#[test]
fn bench_skips_points_that_do_not_fit() {
    let bench = |samples: &str| {
        Command::new(env!("CARGO_BIN_EXE_bifurc"))
            .args(["bench", "examples/tiny/model.json", "--samples", samples, "--context", "8", "--decoded", "0"])
            .args(["--repeats", "1"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run bifurc")
    };
    let roomy = bifurc_runtime::memory::host_available().is_none_or(|n| n > 50_000_000_000);
    let cases: &[(&str, &[&str])] = if roomy {
        &[("1,9000000", &["b=9000000, m_c=8, m_d=0: ", "too large", "at most 2147483648 elements"])]
    } else {
        &[
            ("1,3000000", &["b=3000000, m_c=8, m_d=0: not enough memory", "GB", "available"]),
            ("1,9000000", &["b=9000000, m_c=8, m_d=0: ", "too large", "at most 2147483648 elements"]),
        ]
    };
    for (samples, wants) in cases {
        let out = bench(samples);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            stdout.lines().filter(|l| l.starts_with("| 1 | 8 | 0 |")).count(),
            1,
            "the small point ran: {stdout}"
        );
        let (_, not_run) = stdout.split_once("\nNot run:\n\n").unwrap_or_else(|| panic!("no `Not run`: {stdout}"));
        assert_eq!(not_run.lines().count(), 1, "{stdout}");
        for want in *wants {
            assert!(not_run.starts_with("- ") && not_run.contains(want), "`{want}` missing: {stdout}");
        }
        // Only the large point: nothing can run.
        let large = samples.trim_start_matches("1,");
        let out = bench(large);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("no point of the sweep could run") && stderr.contains(wants[0]), "{stderr}");
    }
}

/// A graph whose attention is already bifurcated (the optimizer's own
/// output) has no site left to split: the two steps are the same graph,
/// which the bench says on stderr and under the table's title.
#[test]
fn bench_says_when_nothing_was_bifurcated() {
    let dir = std::env::temp_dir().join(format!("bifurc-bench-same-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let optimized = dir.join("tiny-bif.json");
    let bifurc = || Command::new(env!("CARGO_BIN_EXE_bifurc"));
    let out = bifurc()
        .args(["optimize", "examples/tiny/model.json", "--output"])
        .arg(&optimized)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run bifurc");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bifurc()
        .arg("bench")
        .arg(&optimized)
        .args(["--samples", "4", "--context", "16", "--decoded", "0", "--repeats", "1"])
        .output()
        .expect("run bifurc");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let same = "0 of 0 attention sites bifurcated (optimized at b=4, m_c=16, m_d=0): none, so both steps run the \
                same graph";
    assert!(stderr.contains(&format!("warning: {same}\n")), "{stderr}");
    assert!(stdout.contains(&format!("\n{same}.\n")), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

/// GPT-2's positions end at 1024: a point past them (its steps would
/// gather no row, NaN logits) is listed, not run, naming the table; the
/// point within them runs and its logits agree.
#[test]
fn bench_skips_points_past_learned_positions() {
    let out = Command::new(env!("CARGO_BIN_EXE_bifurc"))
        .args(["bench", "examples/gpt2/model.json", "--samples", "1", "--context", "8,1024", "--decoded", "0"])
        .args(["--repeats", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run bifurc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ran: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| 1 | 8 | 0 |")).collect();
    assert_eq!(ran.len(), 1, "{stdout}");
    assert!(ran[0].contains(" (max ") && !ran[0].contains("NaN"), "logits compared: {stdout}");
    let (_, not_run) = stdout.split_once("\nNot run:\n\n").unwrap_or_else(|| panic!("no `Not run`: {stdout}"));
    let want = "- b=1, m_c=1024, m_d=0: 1025 positions (context and decoded tokens together) are past the model's \
                1024 learned positions (`transformer.wpe.weight` has 1024 rows)\n";
    assert_eq!(not_run, want);
}

/// Sweeps no step can run, refused before anything is compiled: a sample
/// count of 0 (its table would not plot), a negative context, no repeats
/// or more than 1000;
/// and an --out that is a file (bench found it after the whole sweep).
#[test]
fn bench_refuses_empty_sample_counts_and_repeats() {
    for (args, want) in [
        (["--samples=4,0", "--context=8"], "--samples: every sample count must be at least 1, got 0"),
        (["--samples=1", "--context=-8"], "--context and --decoded must be non-negative"),
        (["--samples=1", "--repeats=0"], "--repeats must be at least 1"),
        (
            ["--samples=1", "--repeats=1001"],
            "--repeats must be at most 1000 (each side of each point is timed that many times), got 1001",
        ),
    ] {
        let (flag, value) = (args[0], args[1]);
        let out = Command::new(env!("CARGO_BIN_EXE_bifurc"))
            .args(["bench", "examples/tiny/model.json"])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run bifurc");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert_eq!(stderr.trim_end(), format!("error: {want}"), "{flag} {value}");
    }
    // An --out that is a file: refused before the sweep, the file kept.
    let file = std::env::temp_dir().join(format!("bifurc-bench-out-{}", std::process::id()));
    std::fs::write(&file, "mine\n").expect("write");
    let csv = std::env::temp_dir().join(format!("bifurc-bench-out-{}.csv", std::process::id()));
    std::fs::write(&csv, "b,m_c,m_d,baseline_ms,bifurcated_ms,predicted_speedup\n1,8,0,2.0,1.0,1.5\n").expect("csv");
    let csv = csv.to_str().unwrap_or_default().to_string();
    for cmd in [["bench", "examples/tiny/model.json"], ["plot", csv.as_str()]] {
        let out = Command::new(env!("CARGO_BIN_EXE_bifurc"))
            .args(cmd)
            .arg("--out")
            .arg(&file)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run bifurc");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
        assert!(stderr.trim_end().ends_with("is a file, not a directory"), "{cmd:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{cmd:?}: nothing was run");
    }
    assert_eq!(std::fs::read_to_string(&file).ok().as_deref(), Some("mine\n"));
    std::fs::remove_file(&file).ok();
    std::fs::remove_file(&csv).ok();
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

/// `bifurc plot` draws a GPU machine's `bifurc-run bench` table (skipped
/// points left out) and names a file that is not a bench table.
#[test]
fn plot_cli_draws_a_gpu_bench_table() {
    let dir = std::env::temp_dir().join(format!("bifurc-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let csv = dir.join("bench.csv");
    std::fs::write(
        &csv,
        "b,m_c,m_d,baseline_ms,bifurcated_ms,speedup,predicted_speedup,note\n\
         1,2048,256,3.0,2.9,1.03,1.0,\"\"\n16,2048,256,10.0,3.0,3.33,4.0,\"\"\n32,8192,256,,,,,\"skipped, budget\"\n",
    )
    .expect("write csv");
    let plots = dir.join("plots");
    let out = Command::new(env!("CARGO_BIN_EXE_bifurc"))
        .arg("plot")
        .arg(&csv)
        .arg("--out")
        .arg(&plots)
        .output()
        .expect("run bifurc");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(2 points)"));
    for svg in ["speedup.svg", "latency.svg"] {
        let text = std::fs::read_to_string(plots.join(svg)).expect("svg written");
        assert!(text.starts_with("<svg"), "{svg}");
    }
    std::fs::write(&csv, "x,y\n1,2\n").expect("write csv");
    let out = Command::new(env!("CARGO_BIN_EXE_bifurc")).arg("plot").arg(&csv).arg("--out").arg(&plots).output();
    let out = out.expect("run bifurc");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1: not a bench table"));
    // A NaN latency (the plot never finished drawing its endless axis):
    // refused at once, naming the line. Waited on for at most a minute.
    std::fs::write(&csv, "b,m_c,m_d,baseline_ms,bifurcated_ms,predicted_speedup\n1,2,3,nan,inf,1\n").expect("csv");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bifurc"))
        .arg("plot")
        .arg(&csv)
        .arg("--out")
        .arg(&plots)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run bifurc");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed().as_secs() > 60 {
            child.kill().ok();
            panic!("bifurc plot of a NaN latency still running after a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2: baseline_ms is nan, not a positive finite number"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
