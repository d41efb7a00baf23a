//! Benchmark of the optimizer on a 7B model: `cargo bench --bench optimize`.
//!
//! Loads examples/llama-2-7b/model.json and times `bifurc::optimize::optimize`
//! (saturate + extract + verify + report) at b=32, m_c=8192, m_d=256:
//! 2 warm-up runs, then 15 timed runs; prints the median, min and max in ms,
//! the saturate / extract split of the median run, and the e-graph size.
//! Target: a median under 1 s on a 2-core machine.

use bifurc::inspect::ShapePoint;
use bifurc::optimize::{optimize, Options};
use std::path::Path;
use std::time::{Duration, Instant};

const WARMUP: usize = 2;
const RUNS: usize = 15;
const POINT: &str = "b=32,m_c=8192,m_d=256";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter); there is nothing to filter.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/llama-2-7b/model.json");
    let graph = bifurc::import::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let opts = Options { point: ShapePoint::parse(POINT).expect("point"), limits: Default::default() };

    for _ in 0..WARMUP {
        optimize(&graph, &opts).expect("optimize");
    }
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        let out = optimize(&graph, &opts).expect("optimize");
        let total = start.elapsed();
        runs.push((total, out.report));
    }
    runs.sort_by_key(|(t, _)| *t);
    let (median, report) = &runs[RUNS / 2];
    let (min, max) = (runs[0].0, runs[RUNS - 1].0);
    let p = &report.passes;

    println!(
        "optimize {} at {POINT} ({} nodes in): {RUNS} runs after {WARMUP} warm-ups",
        path.display(),
        graph.nodes.len()
    );
    println!("  median {:9.1} ms", ms(*median));
    println!("  min    {:9.1} ms", ms(min));
    println!("  max    {:9.1} ms", ms(max));
    println!(
        "  median run: saturate {:.1} ms, extract {:.1} ms, rest (convert, verify, report) {:.1} ms",
        ms(p.saturate_time),
        ms(p.extract_time),
        ms(median.saturating_sub(p.saturate_time + p.extract_time))
    );
    println!(
        "  e-graph: {} nodes, {} classes, {} iterations, stopped: {}",
        p.egraph_nodes, p.egraph_classes, p.iterations, p.stop_reason
    );
    println!("  attention sites: {} of {} rewritten", report.rewritten(), report.sites.len());
    let target = Duration::from_secs(1);
    println!("  target: median under {} ms: {}", ms(target), if *median < target { "met" } else { "NOT met" });
}
