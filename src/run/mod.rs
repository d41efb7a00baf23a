//! `bifurc run`: load an artifact, fill a context, decode `b` samples from
//! it in parallel, and report the tokens and per-step latency.
//!
//! The artifact is `step.ptx` with `step.manifest.json` and
//! `step.graph.json` beside it ([`crate::Artifact::write`]). On the CPU
//! ([`Device::Cpu`]) the compiled graph (`step.graph.json`) is JIT-compiled
//! with [`crate::cpu_backend::CpuBackend`]; on CUDA ([`Device::Cuda`], feature `cuda`) the PTX is
//! loaded with `bifurc_runtime::cuda::CudaStep`. Either way the decode loop
//! is [`bifurc_runtime::Session`], the same as `bifurc-run run`: same
//! weights for a seed, same context fill, same sampler, so the CPU and the
//! GPU decode the same greedy tokens.

use bifurc_runtime::session::{ContextOnHost, SampleOptions, Session, StepReport};
use bifurc_runtime::weights::{WeightFiles, WeightSource};
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Instant;

mod load;
mod made;
mod report;

pub use load::{cpu_step, jit, load_artifact, load_graph, parse_ids, read_ids};
use made::{make_step, prefill_step};
pub use report::{percentile, PrefillReport, RunReport};

/// A `bifurc run` failure, as one line of text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunError(pub String);

fn fail(message: impl Into<String>) -> RunError {
    // One line: multi-line diagnostics (MLIR, I/O chains) are joined.
    RunError(message.into().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; "))
}

/// Where the step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The compiled graph (`<stem>.graph.json`), JIT-compiled for this CPU.
    Cpu,
    /// The PTX on CUDA device `ordinal` (needs the `cuda` feature).
    Cuda { ordinal: usize },
}

impl Device {
    /// `cpu`, or `cuda` when built with the `cuda` feature.
    pub fn default_for_build() -> Device {
        if cfg!(feature = "cuda") {
            Device::Cuda { ordinal: 0 }
        } else {
            Device::Cpu
        }
    }
}

/// The weights to bind.
#[derive(Clone, Debug, PartialEq)]
pub enum Weights {
    /// `.safetensors` files or directories of shards.
    Files(Vec<PathBuf>),
    /// Deterministic random weights (`bifurc_runtime::random`).
    Random { seed: u64 },
}

/// How the context is made.
#[derive(Clone, Debug, PartialEq)]
pub enum ContextSource {
    /// Step the graph over these token ids at b = 1.
    Prompt(Vec<u32>),
    /// A random context of `len` tokens (random caches and logits, from the run's seed).
    Random { len: usize },
}

/// Everything `bifurc run` does.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The step's PTX (or its `.manifest.json`).
    pub artifact: PathBuf,
    pub device: Device,
    pub weights: Weights,
    pub context: ContextSource,
    /// b.
    pub samples: usize,
    /// Tokens generated per sample.
    pub steps: usize,
    /// 0 for greedy.
    pub temperature: f32,
    /// Seed of sampling and of a random context.
    pub seed: u64,
    /// Keep the last step's logits of every sample.
    pub keep_logits: bool,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Keep the decode caches on the host and bind them every step instead
    /// of appending rows inside the backend (for checking; see
    /// [`bifurc_runtime::BoundCaches`]).
    pub host_caches: bool,
    /// A prefill artifact (the same model compiled with `n` > 1 new tokens
    /// per step, `import-hf --new-tokens`) that fills the context from the
    /// prompt `n` tokens at a time.
    pub prefill: Option<PathBuf>,
}
/// A progress bar to `len` on stderr, `what` its template (indicatif's)
/// between a spinner and the time left; hidden unless `show` and stderr is
/// a terminal.
fn progress_bar(show: bool, len: usize, what: &str) -> indicatif::ProgressBar {
    if !(show && std::io::stderr().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!("{{spinner}} {what}, eta {{eta}}")) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn check_options(opts: &RunOptions) -> Result<(), RunError> {
    if opts.samples == 0 {
        return Err(fail("--samples must be at least 1"));
    }
    if opts.steps == 0 {
        return Err(fail("--steps must be at least 1"));
    }
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return Err(fail(format!("--temperature must be a finite number >= 0 (0 = greedy), got {}", opts.temperature)));
    }
    Ok(())
}

/// Runs `bifurc run`: see the module docs.
pub fn run(opts: &RunOptions) -> Result<RunReport, RunError> {
    check_options(opts)?;
    let (artifact, layout) = load_artifact(&opts.artifact)?;
    if let ContextSource::Prompt(ids) = &opts.context {
        if ids.is_empty() {
            return Err(fail("no token ids given (the prompt is empty)"));
        }
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= layout.vocab) {
            return Err(fail(format!(
                "prompt token #{} is {id}, outside the model's vocabulary (ids 0..{})",
                i + 1,
                layout.vocab
            )));
        }
    }
    // Past a table of learned positions the step has nothing to read:
    // said here, before any work.
    let context_len = match &opts.context {
        ContextSource::Prompt(ids) => ids.len(),
        ContextSource::Random { len } => *len,
    };
    layout.check_positions(context_len.saturating_add(opts.steps)).map_err(|e| fail(e.to_string()))?;
    // Past the positions check, the context and steps are at most 2^24 + 1.
    let samples = i64::try_from(opts.samples).map_err(|_| fail(format!("--samples {}: too many", opts.samples)))?;
    if let Weights::Files(files) = &opts.weights {
        if let Some(missing) = files.iter().find(|p| !p.exists()) {
            return Err(fail(format!("weights {}: no such file or directory", missing.display())));
        }
    }
    let manifest = artifact.manifest.clone();
    if opts.prefill.is_some() && matches!(opts.context, ContextSource::Random { .. }) {
        return Err(fail("--prefill fills the context from a prompt; it does not go with --context-len"));
    }

    let start = Instant::now();
    // The decode loop's last step: m_d = steps - 1, with room for `steps`
    // rows (as `Session::sample` keeps them).
    let last = BTreeMap::from([
        ("b".to_string(), samples),
        ("m_c".to_string(), context_len as i64),
        ("m_d".to_string(), opts.steps as i64 - 1),
    ]);
    let rows = BTreeMap::from([("m_d".to_string(), opts.steps as i64)]);
    let made = make_step(&artifact, opts.device, &last, &rows)?;
    let (mut step, device) = (made.step, made.device);
    let load_s = start.elapsed().as_secs_f64();
    // The prefill step, made before any weights are bound so that what
    // both need is asked at once; its last chunk ends the context.
    let prefill = match (&opts.prefill, &opts.context) {
        (Some(path), ContextSource::Prompt(_)) => Some(prefill_step(path, opts.device, context_len, &layout)?),
        _ => None,
    };
    let mut needed = made.needed;
    let mut what = format!("the decode step at b = {}, m_c = {context_len}, m_d = {}", opts.samples, opts.steps - 1);
    // The weights the prefill step shares with the decode step (on the
    // CPU, where both store them alike): held once.
    let mut shared = Vec::new();
    if let Some((pre, (artifact, _))) = &prefill {
        shared = pre.step.shares_with(&step, &artifact.manifest);
        let once = pre.step.bytes_of(&shared, &artifact.manifest)?;
        needed = needed.saturating_add(pre.needed.saturating_sub(once));
        what.push_str(" with the prefill step");
    }
    // The session holds the context's caches on the host while it binds
    // them, in f32 (a random context a layer at a time), and keeps no copy
    // once the step holds them: in the same memory as the step's on the
    // CPU, beside the GPU's on CUDA.
    let shorter = |e: bifurc_runtime::memory::Shortfall| fail(format!("{e}; use a shorter context or fewer --samples"));
    let on_host = match opts.context {
        ContextSource::Random { .. } => ContextOnHost::OneLayer,
        ContextSource::Prompt(_) => ContextOnHost::Whole,
    };
    // Binding holds one weight in f32 at a time beside the step's.
    let mut holds = "weights, KV caches and activations".to_string();
    if opts.device == Device::Cpu {
        needed = needed.saturating_add(layout.context_host_bytes(context_len, on_host));
        let binding = bifurc_runtime::weights::binding_bytes(&manifest).map_err(|e| fail(e.to_string()))?;
        needed = needed.saturating_add(binding);
        holds.push_str(", and a weight in f32 while it is bound");
    } else {
        layout.check_host_context(context_len, on_host).map_err(shorter)?;
    }
    let where_ = if opts.device == Device::Cpu { "this machine".to_string() } else { device.clone() };
    bifurc_runtime::memory::check_holding(&what, &holds, needed, made.available, &where_).map_err(shorter)?;

    let start = Instant::now();
    // Files are read once, for the decode step and a prefill step alike.
    let (weights, source) = match &opts.weights {
        Weights::Random { seed } => (format!("random (seed {seed})"), WeightSource::Random(*seed)),
        Weights::Files(paths) => {
            let files = WeightFiles::open(paths).map_err(|e| fail(e.to_string()))?;
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            (names.join(", "), WeightSource::Files(files))
        }
    };
    // Every weight either step binds is in the files, with its shape and a
    // dtype bifurc reads: said from their headers, before any is bound.
    source.check(&manifest).map_err(|e| fail(e.to_string()))?;
    if let Some((_, (artifact, _))) = &prefill {
        source.check(&artifact.manifest).map_err(|e| fail(e.to_string()))?;
    }
    let count = bifurc_runtime::weights::weight_buffers(&manifest).count();
    let bar = progress_bar(opts.progress, count, "binding weights [{bar:30}] {pos}/{len} tensors, {msg}");
    let mut done = 0;
    let weights_bound = source.bind_with(step.step(), &manifest, |name| {
        bar.set_message(name.to_string());
        bar.set_position(done);
        done += 1;
    });
    bar.finish_and_clear();
    let weights_bound = weights_bound.map_err(|e| fail(e.to_string()))?;
    // The prefill step: the same device and weights, shared where it can.
    let mut prefill_report = None;
    let mut prefill = match prefill {
        Some((mut pre, (artifact, layout))) => {
            let shared_weights = pre.step.bind_beside(&step, &shared, &source, &artifact.manifest)?;
            let chunks = layout.prefill_chunks(context_len);
            prefill_report = Some(PrefillReport { n: layout.n, chunks, shared_weights });
            Some((pre.step.boxed(), layout))
        }
        None => None,
    };
    let weights_s = start.elapsed().as_secs_f64();
    let mut step = step.boxed();
    if opts.host_caches {
        step = Box::new(bifurc_runtime::BoundCaches(step));
    }

    let mut session = Session::new(step, &manifest).map_err(|e| fail(e.to_string()))?;
    // The step holds the context (in its own storage dtype on the CPU):
    // no f32 copy beside it.
    session.keep_host_context(false).map_err(|e| fail(e.to_string()))?;
    let start = Instant::now();
    let (context_len, context) = match &opts.context {
        ContextSource::Random { len } => {
            let layers = layout.layers.len();
            let bar = progress_bar(opts.progress, layers, "drawing the context [{bar:30}] {pos}/{len} layers");
            let drawn = session.random_context_with(*len, opts.seed, |n| bar.set_position(n as u64));
            bar.finish_and_clear();
            drawn.map_err(|e| fail(e.to_string()))?;
            (*len, "random")
        }
        ContextSource::Prompt(ids) => {
            let bar = progress_bar(opts.progress, ids.len(), "filling the context [{bar:30}] {pos}/{len} tokens");
            let on_tokens = |n: usize| bar.set_position(n as u64);
            let filled = match prefill.as_mut() {
                Some((pre, layout)) => session.fill_context_prefill_with(pre.as_mut(), layout, ids, on_tokens),
                None => session.fill_context_with(ids, on_tokens),
            };
            bar.finish_and_clear();
            filled.map_err(|e| fail(format!("filling the context: {e}")))?;
            (ids.len(), if prefill.is_some() { "prompt, prefilled" } else { "prompt" })
        }
    };
    // The context is filled: the prefill step's caches, intermediates and
    // the weights it does not share go before decoding.
    drop(prefill);
    let fill_ms = start.elapsed().as_secs_f64() * 1e3;

    let options = SampleOptions {
        samples: opts.samples,
        steps: opts.steps,
        temperature: opts.temperature,
        seed: opts.seed,
        keep_last_logits: opts.keep_logits,
    };
    let bar = progress_bar(opts.progress, opts.steps, "decoding [{bar:30}] {pos}/{len} steps, {msg}");
    let start = Instant::now();
    let output = session.sample(&options, |r: &StepReport| {
        bar.set_message(format!("{:.2} ms/step", r.ms));
        bar.inc(1);
    });
    let decode_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let output = output.map_err(|e| fail(format!("decoding: {e}")))?;

    Ok(RunReport {
        device,
        artifact: artifact.ptx_path.clone(),
        bifurcated: manifest.bifurcate,
        weights,
        weights_bound,
        prefill: prefill_report,
        weights_s,
        load_s,
        context_len,
        context,
        fill_ms,
        samples: opts.samples,
        steps: opts.steps,
        temperature: opts.temperature,
        seed: opts.seed,
        output,
        decode_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line() {
        assert_eq!(fail("a\n  b\n\nc").to_string(), "a; b; c");
    }
}
