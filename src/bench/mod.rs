//! `bifurc bench`: the compiled step, baseline (`--no-bifurcate`) against
//! bifurcated, over a sweep of samples × context length, timed side by side
//! (alternating runs share the machine's noise) with the bytes model's
//! prediction beside each measured ratio, and the least time the step's
//! multiply-adds take at this machine's measured peak rate. CPU here (the
//! MLIR JIT); the CUDA equivalent is `bifurc-run bench` on a GPU machine,
//! whose table [`rows_from_csv`] reads back for `bifurc plot`.

mod inputs;
mod plot;
mod read;
mod report;

pub use plot::write_svgs;
pub use read::rows_from_csv;
pub use report::{to_csv, to_markdown};

use crate::cpu_backend::CpuBackend;
use crate::inspect::{bytes_moved, multiply_adds, ShapePoint};
use crate::interp::positions_unusable;
use crate::ir::{Graph, Role};
use crate::optimize::{optimize, Options};
use bifurc_runtime::bench::{max_abs_diff, median};
use bifurc_runtime::memory;
use bifurc_runtime::{HostTensor, Step};
use inputs::{bind_random, point_bytes};
use std::collections::{BTreeMap, HashMap};
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
    /// How long the bifurcated step's memory traffic takes on the machine
    /// that ran it: the bytes its kernels move (the bytes model applied to
    /// the CPU step's plan, [`crate::cpu_backend::CpuBackend::moved_at`])
    /// at the machine's measured read rate for the threads the steps used
    /// ([`crate::lower::memory_read_rate`]). A step that takes about that
    /// long is bound by memory; one faster found some of it in cache.
    /// `None` in a table without it (a GPU machine's, or one written
    /// before it was measured).
    pub memory_ms: Option<f64>,
    /// The largest |difference| of the two steps' logits on the same
    /// inputs (the first output where the graph has none named `logits`)
    /// and the largest |logit|, for scale; `None` in a table without them.
    pub logits_diff: Option<(f64, f64)>,
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

    /// The bifurcated step's [`Row::memory_ms`] over its latency, in
    /// percent: the share of its time its memory traffic takes at the
    /// measured read rate.
    pub fn bifurcated_memory_pct(&self) -> Option<f64> {
        self.memory_ms.map(|m| 100.0 * m / self.bifurcated_ms)
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
    /// their inputs (held once where both store them alike), and the
    /// largest random input in f32, would not fit in the host's memory,
    /// a buffer would pass the CPU step's size limit, or the positions
    /// would pass the model's learned ones or 2^24.
    pub skipped: Vec<String>,
    /// Attention sites the bifurcated step splits, of those the graph
    /// has, and the point it was optimized at (`b=…, m_c=…, m_d=…`).
    pub bifurcated: (usize, usize, String),
}

impl Sweep {
    /// What the bifurcated step is: "4 of 4 attention sites bifurcated
    /// (optimized at b=64, m_c=16384, m_d=16)", and with none, that both
    /// steps run the same graph.
    pub fn about(&self) -> String {
        let (done, sites, at) = &self.bifurcated;
        let same = if *done == 0 { ": none, so both steps run the same graph" } else { "" };
        format!("{done} of {sites} attention sites bifurcated (optimized at {at}){same}")
    }
}

/// Runs the sweep on the CPU. `progress` is told about each point as it
/// starts. The random weights are drawn and bound once, and the inputs
/// the two steps store alike (every one, for a graph and its rewrite)
/// are held once and shared between them: a Llama-2-7B's fp16 weights
/// take 13.5 GB, not twice that beside 27 GB in f32. A point whose two
/// steps would not fit in the memory the host has available
/// ([`bifurc_runtime::memory::host_available`], asked after the last
/// point's memory but the weights is freed), or would have a buffer past
/// the CPU step's size limit, is skipped, not run into an allocation
/// failure; so is a point whose positions cannot be given
/// ([`positions_unusable`]: past a table of learned positions, GPT-2
/// past 1024 tokens, where the steps would gather no row and give NaN
/// logits; or past 2^24). A sweep with no point that can run is an
/// error.
///
/// `point_done` is given the sweep so far after each point, run or
/// skipped (for partial results that survive an interrupted sweep).
pub fn run_cpu(
    graph: &Graph,
    opts: &BenchOptions,
    mut progress: impl FnMut(&str),
    mut point_done: impl FnMut(&Sweep),
) -> Result<Sweep, BenchError> {
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
    let optimized = optimize(graph, &Options { point: at.clone(), ..Options::default() })?;
    let bifurcated = (optimized.report.rewritten(), optimized.report.sites.len(), at.to_string());
    let optimized = optimized.graph;
    progress("compiling baseline and bifurcated steps");
    let mut base = CpuBackend::compile(graph)?;
    let mut bif = CpuBackend::compile(&optimized)?;
    progress("measuring this machine's peak multiply-add rate");
    let peak = crate::lower::peak_multiply_adds(base.threads())?;
    progress("measuring this machine's memory read rate");
    // Without the memory to measure it (a quarter of what is available
    // must hold 1 MiB a thread), the table goes without the column.
    let reads = crate::lower::memory_read_rate(base.threads(), memory::host_available()).ok();
    let mut sweep = Sweep { bifurcated, ..Sweep::default() };
    let points = opts.context_lens.len() * opts.samples.len();
    // The weights are drawn and bound once, at the first point that runs,
    // and kept for the others; every input the two steps store alike (all
    // of them, for a graph and its rewrite) is held once, shared.
    let weights: Vec<&str> = graph.inputs.iter().filter(|i| i.role == Role::Weight).map(|i| i.name.as_str()).collect();
    let is_weight = |name: &str| weights.contains(&name);
    for &m_c in &opts.context_lens {
        for &b in &opts.samples {
            let p = point(b, m_c, opts.decoded);
            let done = sweep.rows.len() + sweep.skipped.len();
            let this = format!("point {} of {points}: b={b}, m_c={m_c}, m_d={}", done + 1, opts.decoded);
            progress(&this);
            // The last point's inputs (but the weights) and intermediates
            // freed, then: what this point adds to the memory in use.
            base.release_but(is_weight);
            bif.release_but(is_weight);
            let at = format!("b={b}, m_c={m_c}, m_d={}", opts.decoded);
            // Positions past a table of learned positions (GPT-2 past 1024
            // tokens) would be gathered from no row (NaN logits); past 2^24
            // they are not exact in f32.
            let fits = match positions_unusable(graph, &p)? {
                Some(why) => Err(why),
                None => point_bytes([&base, &bif], graph, &p).and_then(|n| {
                    let what = "the baseline and bifurcated steps";
                    memory::check(what, n, memory::host_available(), "this machine").map_err(|e| e.to_string())
                }),
            };
            if let Err(why) = fits {
                progress(&format!("skipped {at}: {why}"));
                sweep.skipped.push(format!("{at}: {why}"));
                point_done(&sweep);
                continue;
            }
            bind_random([&mut base, &mut bif], graph, &p, opts.seed, |i, n, name| {
                progress(&format!("{this}: binding random input {i} of {n} (`{name}`)"));
            })?;
            progress(&this);
            // Warm-up (the two steps' logits compared), then alternate so
            // both sides see the same noise.
            let logits_diff = compare_logits(graph, &base.run(&p)?, &bif.run(&p)?);
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
            let memory_ms = reads.map(|r| bif.moved_at(&sp.0) / r * 1e3);
            sweep.rows.push(Row {
                samples: b,
                context: m_c,
                decoded: opts.decoded,
                baseline_ms: median(&tb).unwrap_or(f64::NAN),
                bifurcated_ms: median(&tf).unwrap_or(f64::NAN),
                predicted,
                floor_ms,
                memory_ms,
                logits_diff,
            });
            point_done(&sweep);
        }
    }
    if sweep.rows.is_empty() {
        if let Some(first) = sweep.skipped.first() {
            return Err(BenchError::Skipped(format!("no point of the sweep could run; the first, {first}")));
        }
    }
    Ok(sweep)
}

/// [`Row::logits_diff`] of two steps' outputs.
fn compare_logits(
    graph: &Graph,
    base: &HashMap<String, HostTensor>,
    bif: &HashMap<String, HostTensor>,
) -> Option<(f64, f64)> {
    let named = graph.outputs.iter().find(|o| o.name == "logits");
    let name = &named.or(graph.outputs.first())?.name;
    max_abs_diff(&base.get(name)?.data, &bif.get(name)?.data)
}

/// `examples/tiny`, the graph the bench's tests sweep.
#[cfg(test)]
fn tiny() -> Graph {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny/model.json");
    crate::import::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `point_done` sees the sweep after every point, run or skipped, in
    /// order (the CLI writes its tables from it).
    #[test]
    fn each_point_is_reported_when_done() {
        let graph = tiny();
        let opts = BenchOptions {
            samples: vec![1, 2],
            context_lens: vec![8, 3_000_000_000],
            decoded: 0,
            repeats: 1,
            optimize_at: None,
            seed: 1,
        };
        let mut seen = Vec::new();
        let sweep = run_cpu(&graph, &opts, |_| {}, |s| seen.push((s.rows.len(), s.skipped.len())));
        let sweep = sweep.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seen, [(1, 0), (2, 0), (2, 1), (2, 2)]);
        assert_eq!((sweep.rows.len(), sweep.skipped.len()), (2, 2));
    }
}
