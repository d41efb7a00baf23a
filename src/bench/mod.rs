//! `bifurc bench`: the compiled step, baseline (`--no-bifurcate`) against
//! bifurcated, over a sweep of samples × context length, timed side by side
//! (alternating runs share the machine's noise) with the bytes model's
//! prediction beside each measured ratio, and the least time the step's
//! multiply-adds take at this machine's measured peak rate. CPU here (the
//! MLIR JIT); the CUDA equivalent is `bifurc-run bench` on a GPU machine,
//! whose table [`rows_from_csv`] reads back for `bifurc plot`.

mod plot;
mod read;
mod report;

pub use plot::write_svgs;
pub use read::rows_from_csv;
pub use report::{to_csv, to_markdown};

use crate::cpu_backend::CpuBackend;
use crate::inspect::{bytes_moved, multiply_adds, ShapePoint};
use crate::interp::{random_inputs, At};
use crate::ir::Graph;
use crate::optimize::{optimize, Options};
use bifurc_runtime::bench::median;
use bifurc_runtime::memory;
use bifurc_runtime::Step;
use std::collections::BTreeMap;
use std::time::Instant;

/// What to sweep.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub samples: Vec<i64>,
    pub context_lens: Vec<i64>,
    /// Tokens decoded so far (`m_d`) at every point.
    pub decoded: i64,
    /// Timed steps per side per point (after one warm-up each).
    pub repeats: usize,
    /// The shape point the bifurcated graph is optimized at; one compiled
    /// step serves the whole sweep (defaults to the largest point).
    pub optimize_at: Option<ShapePoint>,
    pub seed: u64,
}

/// One point of the sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub samples: i64,
    pub context: i64,
    pub decoded: i64,
    pub baseline_ms: f64,
    pub bifurcated_ms: f64,
    /// Bytes moved per step, baseline / bifurcated (the bytes model).
    pub predicted: f64,
    /// The least time a step can take on the machine that ran it: the
    /// step's multiply-adds (the same on both sides) at the machine's
    /// measured peak rate for the threads the steps used
    /// ([`crate::lower::peak_multiply_adds`]); `None` in a table without
    /// it (a GPU machine's).
    pub floor_ms: Option<f64>,
}

impl Row {
    pub fn speedup(&self) -> f64 {
        self.baseline_ms / self.bifurcated_ms
    }

    /// The bifurcated step's share of the machine's peak multiply-add
    /// rate, in percent (its [`Row::floor_ms`] over its latency).
    pub fn bifurcated_peak_pct(&self) -> Option<f64> {
        self.floor_ms.map(|f| 100.0 * f / self.bifurcated_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the graph's runtime dims must be b, m_c, m_d (got {0}); multi-level graphs are not benchmarked")]
    Dims(String),
    #[error("nothing to sweep: give at least one sample count and one context length")]
    Empty,
    #[error(transparent)]
    Optimize(#[from] crate::optimize::OptimizeError),
    #[error(transparent)]
    Lower(#[from] crate::lower::LowerError),
    #[error(transparent)]
    Point(#[from] crate::inspect::point::PointError),
    #[error(transparent)]
    Bytes(#[from] crate::inspect::bytes::BytesError),
    #[error(transparent)]
    Macs(#[from] crate::inspect::MacsError),
    #[error(transparent)]
    Inputs(#[from] crate::interp::InterpError),
    #[error("{0}")]
    Skipped(String),
    #[error(transparent)]
    Step(#[from] bifurc_runtime::StepError),
}

fn point(b: i64, m_c: i64, m_d: i64) -> BTreeMap<String, i64> {
    BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)])
}

/// What a sweep measured, and the points it could not run.
#[derive(Clone, Debug, Default)]
pub struct Sweep {
    pub rows: Vec<Row>,
    /// Points not run, each with why (in sweep order): the two steps with
    /// their inputs, and the random inputs in f32, would not fit in the
    /// host's memory, or a buffer would pass the CPU step's size limit.
    pub skipped: Vec<String>,
}

/// Runs the sweep on the CPU. `progress` is told about each point as it
/// starts. A point whose two steps would not fit in the memory the host
/// has available ([`bifurc_runtime::memory::host_available`], asked after
/// the last point's memory is freed), or would have a buffer past the CPU
/// step's size limit, is skipped, not run into an allocation failure; a
/// sweep with no point that can run is an error.
pub fn run_cpu(graph: &Graph, opts: &BenchOptions, mut progress: impl FnMut(&str)) -> Result<Sweep, BenchError> {
    if graph.dims.runtime != ["b", "m_c", "m_d"] {
        return Err(BenchError::Dims(graph.dims.runtime.join(", ")));
    }
    let (Some(&max_b), Some(&max_c)) = (opts.samples.iter().max(), opts.context_lens.iter().max()) else {
        return Err(BenchError::Empty);
    };
    let at = match &opts.optimize_at {
        Some(p) => p.clone(),
        None => ShapePoint(point(max_b, max_c, opts.decoded)),
    };
    progress(&format!("optimizing at {at}"));
    let optimized = optimize(graph, &Options { point: at, ..Options::default() })?.graph;
    progress("compiling baseline and bifurcated steps");
    let mut base = CpuBackend::compile(graph)?;
    let mut bif = CpuBackend::compile(&optimized)?;
    progress("measuring this machine's peak multiply-add rate");
    let peak = crate::lower::peak_multiply_adds(base.threads())?;
    let mut sweep = Sweep::default();
    let points = opts.context_lens.len() * opts.samples.len();
    for &m_c in &opts.context_lens {
        for &b in &opts.samples {
            let p = point(b, m_c, opts.decoded);
            let done = sweep.rows.len() + sweep.skipped.len();
            progress(&format!("point {} of {points}: b={b}, m_c={m_c}, m_d={}", done + 1, opts.decoded));
            // The last point's inputs and intermediates freed, then: both
            // steps at this point, and the random inputs (f32) they are
            // converted from.
            base.release();
            bif.release();
            let at = format!("b={b}, m_c={m_c}, m_d={}", opts.decoded);
            let fits = point_bytes([&base, &bif], graph, &p).and_then(|n| {
                let what = "the baseline and bifurcated steps";
                memory::check(what, n, memory::host_available(), "this machine").map_err(|e| e.to_string())
            });
            if let Err(why) = fits {
                progress(&format!("skipped {at}: {why}"));
                sweep.skipped.push(format!("{at}: {why}"));
                continue;
            }
            for (name, t) in random_inputs(graph, &p, opts.seed)? {
                base.bind_tensor(&name, t.clone())?;
                bif.bind_tensor(&name, t)?;
            }
            // Warm-up, then alternate so both sides see the same noise.
            base.run(&p)?;
            bif.run(&p)?;
            let (mut tb, mut tf) = (Vec::new(), Vec::new());
            for _ in 0..opts.repeats.max(1) {
                let t0 = Instant::now();
                base.run(&p)?;
                tb.push(t0.elapsed().as_secs_f64() * 1e3);
                let t0 = Instant::now();
                bif.run(&p)?;
                tf.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let sp = ShapePoint(p);
            let predicted = bytes_moved(graph, &sp)?.total() / bytes_moved(&optimized, &sp)?.total();
            let floor_ms = Some(multiply_adds(graph, &sp)? / peak * 1e3);
            sweep.rows.push(Row {
                samples: b,
                context: m_c,
                decoded: opts.decoded,
                baseline_ms: median(&tb).unwrap_or(f64::NAN),
                bifurcated_ms: median(&tf).unwrap_or(f64::NAN),
                predicted,
                floor_ms,
            });
        }
    }
    if sweep.rows.is_empty() {
        if let Some(first) = sweep.skipped.first() {
            return Err(BenchError::Skipped(format!("no point of the sweep could run; the first, {first}")));
        }
    }
    Ok(sweep)
}

/// Bytes a point of the sweep needs: both steps at `p` with their inputs
/// bound, and the random inputs ([`random_inputs`]: the reference
/// interpreter's f32 tensors) they are converted from.
fn point_bytes(steps: [&CpuBackend; 2], graph: &Graph, p: &BTreeMap<String, i64>) -> Result<usize, String> {
    let mut total = 0usize;
    for step in steps {
        total = total.saturating_add(step.bytes_at(p, &BTreeMap::new()).map_err(|e| e.to_string())?);
    }
    let at = At::new(graph, p).map_err(|e| e.to_string())?;
    for input in &graph.inputs {
        let shape = at.shape(&input.shape, &format!("input `{}`", input.name)).map_err(|e| e.to_string())?;
        total = total.saturating_add(4 * shape.iter().product::<usize>());
    }
    Ok(total)
}
