//! `bifurc run`: load an artifact, fill a context, decode `b` samples from
//! it in parallel, and report the tokens and per-step latency.
//!
//! The artifact is `step.ptx` with `step.manifest.json` and
//! `step.graph.json` beside it ([`crate::Artifact::write`]). On the CPU
//! ([`Device::Cpu`]) the compiled graph (`step.graph.json`) is JIT-compiled
//! with [`CpuBackend`]; on CUDA ([`Device::Cuda`], feature `cuda`) the PTX is
//! loaded with `bifurc_runtime::cuda::CudaStep`. Either way the decode loop
//! is [`bifurc_runtime::Session`], the same as `bifurc-run run`: same
//! weights for a seed, same context fill, same sampler, so the CPU and the
//! GPU decode the same greedy tokens.

use crate::cpu_backend::CpuBackend;
use bifurc_runtime::manifest::{BufferKind, Manifest};
use bifurc_runtime::session::{ContextOnHost, DecodeLayout, SampleOptions, SampleOutput, Session, StepReport};
use bifurc_runtime::weights::{WeightFiles, WeightSource};
use bifurc_runtime::{Artifact, SessionError, Step};
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// `cpu (MLIR JIT, N threads)` or the CUDA device's name.
    pub device: String,
    pub artifact: PathBuf,
    pub bifurcated: bool,
    /// How the weights were made (`random (seed N)` or the files).
    pub weights: String,
    pub weights_bound: usize,
    /// With a prefill step: how many of its weights it shares with the
    /// decode step (one copy; on the CPU, where both store them alike).
    pub prefill_shares: Option<usize>,
    pub weights_s: f64,
    /// Loading the step: JIT compile (CPU) or module load (CUDA).
    pub load_s: f64,
    pub context_len: usize,
    /// `prompt`, `prompt, prefilled` (by a prefill step) or `random`.
    pub context: &'static str,
    pub fill_ms: f64,
    pub samples: usize,
    pub steps: usize,
    pub temperature: f32,
    pub seed: u64,
    pub output: SampleOutput,
    /// Wall seconds of the whole decode (all steps, sampling included).
    pub decode_s: f64,
}

/// How the context was made, for [`RunReport::render`] (its `context`).
fn context_how(context: &str) -> &'static str {
    match context {
        "random" => "random",
        "prompt, prefilled" => "filled from the prompt by the prefill step",
        _ => "filled by stepping the prompt",
    }
}

/// The value at quantile `q` (0..=1) of `xs`, nearest rank.
pub fn percentile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

impl RunReport {
    pub fn median_ms(&self) -> f64 {
        bifurc_runtime::bench::median(&self.output.step_ms).unwrap_or(0.0)
    }

    pub fn p90_ms(&self) -> f64 {
        percentile(&self.output.step_ms, 0.9).unwrap_or(0.0)
    }

    /// Generated tokens (all samples) per second of decode wall time.
    pub fn tokens_per_s(&self) -> f64 {
        let tokens = (self.samples * self.steps) as f64;
        if self.decode_s > 0.0 {
            tokens / self.decode_s
        } else {
            0.0
        }
    }

    /// The report as one JSON object. `samples` holds every sample's ids;
    /// `tokens` holds the same (the key `bifurc-run run --json` uses, which
    /// scripts/gpu-check.sh compares); `logits` only when kept.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "device": self.device,
            "artifact": self.artifact.display().to_string(),
            "bifurcated": self.bifurcated,
            "weights": self.weights,
            "context_len": self.context_len,
            "context": self.context,
            "fill_ms": self.fill_ms,
            "num_samples": self.samples,
            "steps": self.steps,
            // As written (0.8, not the f32's 0.800000011920929).
            "temperature": self.temperature.to_string().parse::<f64>().unwrap_or(f64::from(self.temperature)),
            "seed": self.seed,
            "samples": self.output.tokens,
            "tokens": self.output.tokens,
            "step_ms": self.output.step_ms,
            "median_step_ms": self.median_ms(),
            "p90_step_ms": self.p90_ms(),
            "tokens_per_s": self.tokens_per_s(),
        });
        if let Some(n) = self.prefill_shares {
            value["prefill_shared_weights"] = serde_json::json!(n);
        }
        if let Some(logits) = &self.output.last_logits {
            let vocab = logits.shape.get(1).copied().unwrap_or(0).max(1);
            let rows: Vec<Vec<f32>> = logits.data.chunks(vocab).map(<[f32]>::to_vec).collect();
            value["logits"] = serde_json::json!(rows);
        }
        value
    }

    /// The report as text for a terminal.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "device: {}", self.device);
        let _ = writeln!(s, "artifact: {} (bifurcated: {})", self.artifact.display(), self.bifurcated);
        let _ = writeln!(s, "step loaded in {:.2} s", self.load_s);
        let shares = match self.prefill_shares {
            Some(n) => format!(" (the prefill step shares {n} of them)"),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "weights: {}, {} tensors bound in {:.2} s{shares}",
            self.weights, self.weights_bound, self.weights_s
        );
        let how = context_how(self.context);
        let _ = writeln!(s, "context: {} tokens ({how}, {:.1} ms)", self.context_len, self.fill_ms);
        let _ = writeln!(
            s,
            "decoded {} samples x {} steps (temperature {}, seed {}): step median {:.3} ms, p90 {:.3} ms \
             (bind + run + outputs); {:.1} tokens/s",
            self.samples,
            self.steps,
            self.temperature,
            self.seed,
            self.median_ms(),
            self.p90_ms(),
            self.tokens_per_s()
        );
        for (i, ids) in self.output.tokens.iter().enumerate().take(8) {
            let shown: Vec<String> = ids.iter().take(32).map(u32::to_string).collect();
            let _ = writeln!(s, "sample {i}: {}{}", shown.join(" "), if ids.len() > 32 { " ..." } else { "" });
        }
        if self.output.tokens.len() > 8 {
            let _ = writeln!(s, "({} more samples; --json prints all)", self.output.tokens.len() - 8);
        }
        if let Some(logits) = &self.output.last_logits {
            let vocab = logits.shape.get(1).copied().unwrap_or(0).max(1);
            for (i, row) in logits.data.chunks(vocab).enumerate().take(8) {
                let mut top: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let top: Vec<String> = top.iter().take(5).map(|(id, l)| format!("{id}:{l:.4}")).collect();
                let _ = writeln!(s, "last logits, sample {i}, top 5 (id:logit): {}", top.join(" "));
            }
        }
        s
    }
}

/// Parses token ids written as `1,2,3` (commas and/or whitespace; a
/// surrounding `[...]` is allowed, so a JSON array works too).
pub fn parse_ids(text: &str) -> Result<Vec<u32>, RunError> {
    let body = text.trim();
    let body = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')).unwrap_or(body);
    let mut ids = Vec::new();
    for (i, item) in body.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).enumerate() {
        let id = item
            .parse::<u32>()
            .map_err(|_| fail(format!("token id #{} `{item}` is not a non-negative integer", i + 1)))?;
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(fail("no token ids given (the prompt is empty)"));
    }
    Ok(ids)
}

/// Reads token ids from a file (see [`parse_ids`]).
pub fn read_ids(path: &Path) -> Result<Vec<u32>, RunError> {
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    parse_ids(&text).map_err(|e| fail(format!("{}: {e}", path.display())))
}

/// Loads the artifact at `path` (its PTX or its manifest) and checks that
/// the session can drive it (a single-level b / m_c / m_d decode step).
pub fn load_artifact(path: &Path) -> Result<(Artifact, DecodeLayout), RunError> {
    let artifact = Artifact::load(path).map_err(|e| fail(e.to_string()))?;
    let layout = DecodeLayout::from_manifest(&artifact.manifest).map_err(|e| {
        let why = match e {
            SessionError::Layout(why) => why,
            other => other.to_string(),
        };
        fail(format!("{}: `bifurc run` cannot drive this artifact: {why}", artifact.manifest_path.display()))
    })?;
    Ok((artifact, layout))
}

/// The compiled graph beside `artifact`'s PTX (`<stem>.graph.json`),
/// imported and checked against the manifest.
pub fn load_graph(artifact: &Artifact) -> Result<crate::ir::Graph, RunError> {
    let path = crate::Artifact::graph_path(&artifact.ptx_path);
    if !path.is_file() {
        return Err(fail(format!(
            "{} is missing: the CPU device runs the compiled graph that `bifurc compile` writes beside the PTX \
             (recompile the artifact with this version of bifurc)",
            path.display()
        )));
    }
    let graph = crate::import::load(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    check_graph(&graph, &artifact.manifest).map_err(|e| {
        fail(format!(
            "{} does not match {}: {e} (files from different compiles?)",
            path.display(),
            artifact.manifest_path.display()
        ))
    })?;
    Ok(graph)
}

/// The graph has the manifest's runtime dims, constants, and every input
/// and output buffer by name with the same shape (at the manifest's point).
fn check_graph(graph: &crate::ir::Graph, manifest: &Manifest) -> Result<(), String> {
    if graph.dims.runtime != manifest.dims.runtime {
        return Err(format!("runtime dims {:?} vs {:?}", graph.dims.runtime, manifest.dims.runtime));
    }
    let constants: BTreeMap<String, i64> = graph.dims.constants.iter().cloned().collect();
    if constants != manifest.dims.constants {
        return Err("the model constants differ".into());
    }
    let point = &manifest.point;
    for buffer in &manifest.buffers {
        let shape = match buffer.kind {
            BufferKind::Input => graph.inputs.iter().find(|i| i.name == buffer.name).map(|i| &i.shape),
            BufferKind::Output => graph.outputs.iter().find(|o| o.name == buffer.name).map(|o| graph.shape_of(o.value)),
            BufferKind::Intermediate => continue,
        };
        let what = if buffer.kind == BufferKind::Input { "input" } else { "output" };
        let shape = shape.ok_or_else(|| format!("the graph has no {what} `{}`", buffer.name))?;
        let graph_shape: Vec<i64> =
            shape.iter().map(|p| graph.dims.eval(p, point)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let manifest_shape: Vec<i64> = buffer
            .shape
            .iter()
            .map(|s| manifest.eval(s, point))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if graph_shape != manifest_shape {
            return Err(format!("{what} `{}` has shape {graph_shape:?} vs {manifest_shape:?}", buffer.name));
        }
    }
    Ok(())
}

/// `artifact`'s graph ([`load_graph`]) JIT-compiled for this CPU.
pub fn jit(artifact: &Artifact) -> Result<CpuBackend, RunError> {
    let graph = load_graph(artifact)?;
    CpuBackend::compile(&graph)
        .map_err(|e| fail(format!("JIT-compiling {}: {e}", crate::Artifact::graph_path(&artifact.ptx_path).display())))
}

/// The CPU step of the artifact at `path` (its PTX or manifest), checked as
/// [`load_artifact`] and [`load_graph`] do.
pub fn cpu_step(path: &Path) -> Result<(Artifact, CpuBackend), RunError> {
    let (artifact, _) = load_artifact(path)?;
    let step = jit(&artifact)?;
    Ok((artifact, step))
}

/// A step made for a run, nothing bound yet: its device's name, the bytes
/// it needs at the run's largest point and what its device has available
/// (`None`: unknown).
struct Made {
    step: MadeStep,
    device: String,
    needed: usize,
    available: Option<usize>,
}

/// A step as made: on the CPU the backend itself until its weights are
/// bound, so that a prefill step can share the decode step's
/// ([`CpuBackend::bind_shared`]) instead of holding a second copy.
enum MadeStep {
    Cpu(Box<CpuBackend>),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Other(Box<dyn Step>),
}

impl MadeStep {
    fn step(&mut self) -> &mut dyn Step {
        match self {
            MadeStep::Cpu(step) => step.as_mut(),
            MadeStep::Other(step) => step.as_mut(),
        }
    }

    fn boxed(self) -> Box<dyn Step> {
        match self {
            MadeStep::Cpu(step) => step,
            MadeStep::Other(step) => step,
        }
    }

    /// The weights of `manifest` (this step's) that it can share with
    /// `decode`, stored alike by both: CPU steps only.
    fn shares_with(&self, decode: &MadeStep, manifest: &Manifest) -> Vec<String> {
        match (self, decode) {
            (MadeStep::Cpu(this), MadeStep::Cpu(decode)) => bifurc_runtime::weights::weight_buffers(manifest)
                .filter(|b| this.stores_alike(decode, &b.name))
                .map(|b| b.name.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Bytes of the weights named by `names` as this step stores them.
    fn bytes_of(&self, names: &[String], manifest: &Manifest) -> Result<usize, RunError> {
        match self {
            MadeStep::Cpu(step) => step
                .bytes_where(&manifest.point, |name| names.iter().any(|n| n == name))
                .map_err(|e| fail(e.to_string())),
            MadeStep::Other(_) => Ok(0),
        }
    }

    /// Binds the weights of `manifest` (this step's) from `source`, those
    /// named by `shared` by sharing `decode`'s (bound already): the same
    /// values, one copy. Returns the number shared.
    fn bind_beside(
        &mut self,
        decode: &MadeStep,
        shared: &[String],
        source: &WeightSource,
        manifest: &Manifest,
    ) -> Result<usize, RunError> {
        let mut count = 0;
        if let (MadeStep::Cpu(this), MadeStep::Cpu(decode)) = (&mut *self, decode) {
            for name in shared {
                if this.bind_shared(decode, name).map_err(|e| fail(e.to_string()))? {
                    count += 1;
                }
            }
        }
        let is_bound = |name: &str| matches!(&*self, MadeStep::Cpu(step) if step.is_bound(name));
        let unshared: Vec<String> = bifurc_runtime::weights::weight_buffers(manifest)
            .filter(|b| !is_bound(&b.name))
            .map(|b| b.name.clone())
            .collect();
        source
            .bind_where(self.step(), manifest, |name| unshared.iter().any(|n| n == name), |_| {})
            .map_err(|e| fail(e.to_string()))?;
        Ok(count)
    }
}

/// The step of `artifact` on `device`, with what it needs at `dims`
/// (a decode cache with `capacities` rows where given).
fn make_step(
    artifact: &Artifact,
    device: Device,
    dims: &BTreeMap<String, i64>,
    capacities: &BTreeMap<String, i64>,
) -> Result<Made, RunError> {
    match device {
        Device::Cpu => {
            let step = jit(artifact)?;
            let needed = step.bytes_at(dims, capacities).map_err(|e| fail(e.to_string()))?;
            let threads = step.threads();
            let plural = if threads == 1 { "" } else { "s" };
            let device = format!("cpu (MLIR JIT, {threads} thread{plural})");
            let available = bifurc_runtime::memory::host_available();
            Ok(Made { step: MadeStep::Cpu(Box::new(step)), device, needed, available })
        }
        Device::Cuda { ordinal } => cuda_step(artifact, ordinal, dims),
    }
}

#[cfg(feature = "cuda")]
fn cuda_step(artifact: &Artifact, ordinal: usize, dims: &BTreeMap<String, i64>) -> Result<Made, RunError> {
    let step = bifurc_runtime::cuda::CudaStep::new(artifact, ordinal)
        .map_err(|e| fail(format!("{}: {e}", artifact.ptx_path.display())))?;
    let device = step.device_info().name.clone();
    let needed = step.bytes_needed(dims).map_err(|e| fail(e.to_string()))?;
    let available = Some(step.available_bytes().map_err(|e| fail(e.to_string()))?);
    Ok(Made { step: MadeStep::Other(Box::new(step)), device, needed, available })
}

#[cfg(not(feature = "cuda"))]
fn cuda_step(_artifact: &Artifact, _ordinal: usize, _dims: &BTreeMap<String, i64>) -> Result<Made, RunError> {
    Err(fail(
        "--device cuda: this bifurc was built without CUDA support; rebuild with `cargo build --release --features cuda`, \
         or run the artifact with `bifurc-run run` (see docs/gpu-machine.md)",
    ))
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

/// The prefill step of `path` on `device`, checked to take more than one
/// token a step, with what it needs at the end of a context of
/// `context_len` tokens: its last chunk's run (b = 1, m_c = the chunks
/// before it, m_d = 0), the context cache with room for every chunk's
/// rows (as `Session::fill_context_prefill` runs it).
fn prefill_step(path: &Path, device: Device, context_len: usize) -> Result<(Made, (Artifact, DecodeLayout)), RunError> {
    let artifact = Artifact::load(path).map_err(|e| fail(e.to_string()))?;
    let layout = DecodeLayout::from_manifest(&artifact.manifest)
        .map_err(|e| fail(format!("{}: not a prefill step: {e}", artifact.manifest_path.display())))?;
    if layout.n < 2 {
        return Err(fail(format!(
            "{}: --prefill wants a step with n > 1 new tokens (bifurc import-hf --new-tokens N), this one has n = {}",
            artifact.manifest_path.display(),
            layout.n
        )));
    }
    let (full, last) = layout.prefill_chunks(context_len);
    let end = BTreeMap::from([("b".to_string(), 1), ("m_c".to_string(), last as i64), ("m_d".to_string(), 0)]);
    let made = make_step(&artifact, device, &end, &BTreeMap::from([("m_c".to_string(), full as i64)]))?;
    Ok((made, (artifact, layout)))
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
        (Some(path), ContextSource::Prompt(_)) => Some(prefill_step(path, opts.device, context_len)?),
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
    let mut prefill_shares = None;
    let mut prefill = match prefill {
        Some((mut pre, (artifact, layout))) => {
            prefill_shares = Some(pre.step.bind_beside(&step, &shared, &source, &artifact.manifest)?);
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
        prefill_shares,
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
    fn ids_parse_in_every_spelling() {
        assert_eq!(parse_ids("1,2,3").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids(" 1, 2 ,3\n").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids("[4, 5]").unwrap(), [4, 5]);
        assert_eq!(parse_ids("7 8\t9").unwrap(), [7, 8, 9]);
        assert!(parse_ids("").unwrap_err().to_string().contains("empty"));
        assert!(parse_ids("1,x").unwrap_err().to_string().contains("#2 `x`"));
        assert!(parse_ids("-1").is_err());
        assert!(parse_ids("4294967296").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.9), Some(9.0));
        assert_eq!(percentile(&xs, 0.5), Some(5.0));
        assert_eq!(percentile(&xs, 1.0), Some(10.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0], 0.9), Some(3.0));
        assert_eq!(percentile(&[], 0.9), None);
    }

    #[test]
    fn the_report_says_how_the_context_was_filled() {
        assert_eq!(context_how("prompt"), "filled by stepping the prompt");
        assert_eq!(context_how("prompt, prefilled"), "filled from the prompt by the prefill step");
        assert_eq!(context_how("random"), "random");
    }

    #[test]
    fn errors_are_one_line() {
        assert_eq!(fail("a\n  b\n\nc").to_string(), "a; b; c");
    }
}
