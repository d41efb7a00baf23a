//! `bifurc-run`: runs compiled bifurc artifacts on a CUDA GPU, with no
//! compiler (no MLIR) inside: small enough to copy to a GPU machine.
//!
//! ```text
//! bifurc-run info  step.ptx
//! bifurc-run run   step.ptx (--weights W.safetensors | --random-weights) (--prompt-ids 1,2,3 | --context-len N)
//!                  [--samples 32] [--steps 64] [--temperature 0.8] [--seed 1] [--json]
//! bifurc-run bench --baseline base.ptx --bifurcated bif.ptx [--samples 1,16,32] [--context 2048,8192]
//!                  [--decoded 256] [--repeats 20] [--budget-s 300] --out DIR
//! ```

use bifurc_runtime::bench::{
    max_abs_diff, median, profile_csv, profile_dims_json, step_bytes, write_csv, write_markdown, BenchRow, Measurement,
    ProfileRow,
};
use bifurc_runtime::cuda::{CudaStep, KernelTime};
use bifurc_runtime::manifest::{BufferKind, Manifest};
use bifurc_runtime::memory::gb;
use bifurc_runtime::random::random_tensor;
use bifurc_runtime::session::{ContextOnHost, DecodeLayout, SampleOptions, Session};
use bifurc_runtime::weights::{weight_buffers, WeightFiles, WeightSource};
use bifurc_runtime::{Artifact, BoundCaches, HostTensor, Step};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "bifurc-run",
    version,
    about = "Run compiled bifurc decode steps on a CUDA GPU (sampling, benchmarks)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load an artifact on the GPU and describe it (checks that the PTX loads).
    Info {
        /// The step's PTX (its manifest is beside it: step.ptx → step.manifest.json).
        ptx: PathBuf,
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Fill a context and decode `--samples` continuations from it.
    Run(RunArgs),
    /// Time a baseline and a bifurcated artifact side by side at each shape.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The step's PTX (its manifest is beside it).
    ptx: PathBuf,
    /// Weights: .safetensors files, or directories of them (sharded checkpoints), read a tensor at a
    /// time as each is bound.
    #[arg(long, num_args = 1.., conflicts_with = "random_weights", required_unless_present = "random_weights")]
    weights: Vec<PathBuf>,
    /// Deterministic random weights (from --seed).
    #[arg(long)]
    random_weights: bool,
    /// The prompt as token ids (the context is filled by stepping the graph over them).
    #[arg(long, value_delimiter = ',', conflicts_with = "context_len", required_unless_present = "context_len")]
    prompt_ids: Vec<u32>,
    /// A random context of this many tokens instead of a prompt (random caches and logits).
    #[arg(long)]
    context_len: Option<usize>,
    /// b: samples decoded together.
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Tokens generated per sample.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// 0 for greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed of random weights, random context and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also write that JSON object to this file.
    #[arg(long)]
    out_json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Also report the last step's logits of every sample (JSON: "logits").
    #[arg(long)]
    logits: bool,
    /// A prefill step (the same model imported with `bifurc import-hf --new-tokens N`
    /// and compiled) that fills the context from the prompt N tokens per run.
    #[arg(long, value_name = "PTX", conflicts_with = "context_len")]
    prefill: Option<PathBuf>,
    /// Keep the decode caches on the host and upload them every step,
    /// instead of appending each step's rows on the device (for checking).
    #[arg(long)]
    host_caches: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The artifact compiled with --no-bifurcate.
    #[arg(long)]
    baseline: PathBuf,
    /// The bifurcated artifact of the same model.
    #[arg(long)]
    bifurcated: PathBuf,
    /// Values of b, comma-separated (`--samples 1,16,32`).
    #[arg(long, value_name = "B,...", value_delimiter = ',', default_values_t = [1, 16, 32])]
    samples: Vec<i64>,
    /// Values of m_c, comma-separated.
    #[arg(long, value_name = "M_C,...", value_delimiter = ',', default_values_t = [2048, 8192])]
    context: Vec<i64>,
    /// m_d (tokens decoded so far); default: the baseline manifest's point.
    #[arg(long)]
    decoded: Option<i64>,
    /// Timed steps per artifact and shape (fewer when the budget requires).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Wall-clock budget for all measurements, seconds.
    #[arg(long, default_value_t = 300.0)]
    budget_s: f64,
    /// Seed of the random weights and inputs (the same for both artifacts).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the per-kernel profile of the largest shape.
    #[arg(long)]
    no_profile: bool,
    /// Output directory: bench.csv, bench.md, profile-*.csv.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    device: usize,
}

type Result<T> = std::result::Result<T, String>;

/// Lets a closed pipe end the process quietly, as it ends any Unix filter
/// (`bifurc-run bench … | head`), where `println!` would panic: Rust
/// starts a program with SIGPIPE ignored.
fn default_sigpipe() {
    // SAFETY: called first in `main`, before any other thread exists;
    // restoring a signal's default disposition touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { ptx, device } => info(&ptx, device),
        Command::Run(args) => run(&args),
        Command::Bench(args) => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load(ptx: &Path, device: usize) -> Result<(Artifact, CudaStep)> {
    let artifact = Artifact::load(ptx).map_err(|e| e.to_string())?;
    let step = CudaStep::new(&artifact, device).map_err(|e| format!("{}: {e}", ptx.display()))?;
    Ok((artifact, step))
}

fn info(ptx: &Path, device: usize) -> Result<()> {
    let start = Instant::now();
    let (artifact, step) = load(ptx, device)?;
    let m = &artifact.manifest;
    let d = step.device_info();
    let (free, total) = step.memory_info().map_err(|e| e.to_string())?;
    println!(
        "device {}: {} (sm_{}{}), {} free of {}",
        d.ordinal,
        d.name,
        d.compute_capability.0,
        d.compute_capability.1,
        gb(free),
        gb(total)
    );
    println!("artifact {} (target {}, bifurcated: {})", artifact.ptx_path.display(), m.target, m.bifurcate);
    println!("model: {}", m.model.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "));
    println!(
        "kernels: {} launches, {} PTX entries; loaded in {:.2} s",
        m.kernels.len(),
        artifact.entries().len(),
        start.elapsed().as_secs_f64()
    );
    let needed = step.bytes_needed(&m.point).map_err(|e| e.to_string())?;
    println!("device memory at {:?}: {}", m.point, gb(needed));
    Ok(())
}

fn run(args: &RunArgs) -> Result<()> {
    let (artifact, mut step) = load(&args.ptx, args.device)?;
    let manifest = artifact.manifest.clone();
    // Before anything is bound: the decode loop's last step (m_d = steps
    // - 1) fits in the device's memory.
    let context_len = args.context_len.unwrap_or(args.prompt_ids.len());
    // Past a table of learned positions or 2^24 no position can be given
    // (and past it, the context and steps are at most 2^24 + 1).
    let layout = DecodeLayout::from_manifest(&manifest).map_err(|e| e.to_string())?;
    layout.check_positions(context_len.saturating_add(args.steps)).map_err(|e| e.to_string())?;
    let samples = i64::try_from(args.samples).map_err(|_| format!("--samples {}: too many", args.samples))?;
    let last = BTreeMap::from([
        ("b".to_string(), samples),
        ("m_c".to_string(), context_len as i64),
        ("m_d".to_string(), args.steps.saturating_sub(1) as i64),
    ]);
    let what = format!("the decode step at b = {}, m_c = {context_len}, m_d = {}", args.samples, last["m_d"]);
    step.check_fits(&what, &last).map_err(|e| format!("{e}; use a shorter context or fewer --samples"))?;
    // The session holds the context on the host while it binds it, in
    // f32 (a random one a layer at a time).
    let on_host = if args.context_len.is_some() { ContextOnHost::OneLayer } else { ContextOnHost::Whole };
    layout.check_host_context(context_len, on_host).map_err(|e| format!("{e}; use a shorter context"))?;
    // A prefill step's artifact: one that takes n > 1 tokens a step, of
    // the same model, checked before anything is bound.
    let prefill = match &args.prefill {
        None => None,
        Some(path) => {
            let pre_artifact = Artifact::load(path).map_err(|e| e.to_string())?;
            let pre_layout = DecodeLayout::from_manifest(&pre_artifact.manifest).map_err(|e| e.to_string())?;
            if pre_layout.n < 2 {
                return Err(format!(
                    "{}: --prefill wants a step with n > 1 new tokens, this one has n = {}",
                    path.display(),
                    pre_layout.n
                ));
            }
            layout.check_prefill(&pre_layout).map_err(|e| format!("{}: {e}", path.display()))?;
            Some((path, pre_artifact, pre_layout))
        }
    };
    let start = Instant::now();
    // Files are read once, for the decode step and a prefill step alike.
    let source = if args.random_weights {
        WeightSource::Random(args.seed)
    } else {
        WeightSource::Files(WeightFiles::open(&args.weights).map_err(|e| e.to_string())?)
    };
    // Every weight either step binds is in the files, with its shape and a
    // dtype bifurc reads: said from their headers, before any is bound.
    source.check(&manifest).map_err(|e| e.to_string())?;
    if let Some((_, pre_artifact, _)) = &prefill {
        source.check(&pre_artifact.manifest).map_err(|e| e.to_string())?;
    }
    // A tenth of the weights at a time, on stderr (unless --json).
    let count = weight_buffers(&manifest).count();
    let (mut tenths, mut done) = (Tenths::of(count), 0);
    let bound = source
        .bind_with(&mut step, &manifest, |_| {
            done += 1;
            if !args.json && tenths.passed(done) {
                eprintln!("weights {done}/{count} bound");
            }
        })
        .map_err(|e| e.to_string())?;
    // The prefill step: the same device and weights.
    let mut prefill = match prefill {
        None => None,
        Some((path, pre_artifact, pre_layout)) => {
            let mut pre = CudaStep::new(&pre_artifact, args.device).map_err(|e| format!("{}: {e}", path.display()))?;
            // Its last chunk's run (b = 1, m_c = the chunks before it, m_d
            // = 0, as `Session::fill_context_prefill` runs it).
            let last = pre_layout.prefill_chunks(context_len).last as i64;
            let end = BTreeMap::from([("b".to_string(), 1), ("m_c".to_string(), last), ("m_d".to_string(), 0)]);
            pre.check_fits(&format!("the prefill step at m_c = {last}"), &end).map_err(|e| e.to_string())?;
            source.bind(&mut pre, &pre_artifact.manifest).map_err(|e| e.to_string())?;
            Some((pre, pre_layout))
        }
    };
    let weights_s = start.elapsed().as_secs_f64();
    let device = step.device_info().name.clone();
    let step: Box<dyn Step> = if args.host_caches { Box::new(BoundCaches(step)) } else { Box::new(step) };
    let mut session = Session::new(step, &manifest).map_err(|e| e.to_string())?;
    // The device holds the context: no host copy beside it.
    session.keep_host_context(false).map_err(|e| e.to_string())?;

    let start = Instant::now();
    let context_len = match args.context_len {
        Some(len) => {
            // A tenth of the layers at a time, on stderr (unless --json).
            let (layers, json) = (layout.layers.len(), args.json);
            let mut tenths = Tenths::of(layers);
            let on_layers = |n: usize| {
                if !json && tenths.passed(n) {
                    eprintln!("context layer {n}/{layers} drawn and bound");
                }
            };
            session.random_context_with(len, args.seed, on_layers).map_err(|e| e.to_string())?;
            len
        }
        None => {
            // A tenth of the prompt at a time, on stderr (unless --json).
            let (len, json) = (args.prompt_ids.len(), args.json);
            let mut tenths = Tenths::of(len);
            let on_tokens = |n: usize| {
                if !json && tenths.passed(n) {
                    eprintln!("context {n}/{len} tokens");
                }
            };
            match prefill.as_mut() {
                Some((pre, layout)) => session.fill_context_prefill_with(pre, layout, &args.prompt_ids, on_tokens),
                None => session.fill_context_with(&args.prompt_ids, on_tokens),
            }
            .map_err(|e| e.to_string())?;
            args.prompt_ids.len()
        }
    };
    // The context is filled: the prefill step's device memory (its own
    // weights, caches and intermediates) goes before the decode loop
    // reserves room for its last step.
    drop(prefill);
    let fill_ms = start.elapsed().as_secs_f64() * 1e3;

    let options = SampleOptions {
        samples: args.samples,
        steps: args.steps,
        temperature: args.temperature,
        seed: args.seed,
        keep_last_logits: args.logits,
    };
    let mut tenths = Tenths::of(args.steps);
    let json = args.json;
    let start = Instant::now();
    let out = session
        .sample(&options, |r| {
            if !json && tenths.passed(r.step + 1) {
                eprintln!("step {}/{}: {:.3} ms", r.step + 1, args.steps, r.ms);
            }
        })
        .map_err(|e| e.to_string())?;
    // Tokens a second of the steps and the drawing, the one-time set-up
    // (caches, the launches readied) left out.
    let rate = out.tokens_per_s(start.elapsed().as_secs_f64());
    let median_ms = median(&out.step_ms).unwrap_or(0.0);
    let weights =
        if args.random_weights { format!("random (seed {})", args.seed) } else { format!("{:?}", args.weights) };
    let mut value = serde_json::json!({
        "device": device,
        "artifact": artifact.ptx_path.display().to_string(),
        "bifurcated": manifest.bifurcate,
        "weights": weights,
        "context_len": context_len,
        "context": if args.context_len.is_some() { "random" } else { "prompt" },
        "fill_ms": fill_ms,
        "samples": args.samples,
        "steps": args.steps,
        "temperature": args.temperature,
        "seed": args.seed,
        "tokens": out.tokens,
        "step_ms": out.step_ms,
        "median_step_ms": median_ms,
        "tokens_per_s": rate,
        "decode_setup_ms": out.setup_ms,
    });
    if let Some(logits) = &out.last_logits {
        let vocab = logits.shape.get(1).copied().unwrap_or(0).max(1);
        let rows: Vec<Vec<f32>> = logits.data.chunks(vocab).map(<[f32]>::to_vec).collect();
        value["logits"] = serde_json::json!(rows);
    }
    if let Some(path) = &args.out_json {
        std::fs::write(path, format!("{value}\n")).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if json {
        println!("{value}");
    } else {
        println!("device: {device}");
        println!("artifact: {} (bifurcated: {})", artifact.ptx_path.display(), manifest.bifurcate);
        println!("weights: {bound} tensors bound in {weights_s:.2} s");
        let how = if args.context_len.is_some() { "random" } else { "filled by stepping the prompt" };
        println!("context: {context_len} tokens ({how}, {fill_ms:.1} ms)");
        println!(
            "decoded {} samples x {} steps: median {median_ms:.3} ms/step (bind + run + outputs), {:.0} tokens/s \
             after {:.1} ms of set-up",
            args.samples, args.steps, rate, out.setup_ms
        );
        for (s, ids) in out.tokens.iter().enumerate().take(8) {
            let shown: Vec<String> = ids.iter().take(32).map(u32::to_string).collect();
            println!("sample {s}: {}{}", shown.join(" "), if ids.len() > 32 { " ..." } else { "" });
        }
        if out.tokens.len() > 8 {
            println!("({} more samples; --json prints all)", out.tokens.len() - 8);
        }
    }
    Ok(())
}

/// "4 of 4 attention sites bifurcated": of the sites the manifest's
/// model has, those its step splits.
fn sites_bifurcated(m: &Manifest) -> String {
    let split = m.attention.iter().filter(|site| site.bifurcated).count();
    format!("{split} of {} attention sites bifurcated", m.attention.len())
}

/// When a count of work done has passed another tenth of its total: the
/// progress lines `run` prints for weights, context and steps alike.
struct Tenths {
    every: usize,
    told: usize,
}

impl Tenths {
    fn of(total: usize) -> Self {
        Tenths { every: (total / 10).max(1), told: 0 }
    }

    /// Whether `done` (counted up from 0, in any steps) has reached a
    /// multiple of a tenth past the last one told; then it is told.
    fn passed(&mut self, done: usize) -> bool {
        let passed = done / self.every > self.told / self.every;
        if passed {
            self.told = done;
        }
        passed
    }
}

/// Random values for every non-weight input of `manifest` at `dims`.
fn random_inputs(manifest: &Manifest, dims: &BTreeMap<String, i64>, seed: u64) -> Result<Vec<(String, HostTensor)>> {
    let mut out = Vec::new();
    for b in &manifest.buffers {
        if b.kind == BufferKind::Input && b.role.as_deref() != Some("weight") {
            out.push((b.name.clone(), random_tensor(manifest, b, dims, seed).map_err(|e| e.to_string())?));
        }
    }
    Ok(out)
}

fn bind_all(step: &mut CudaStep, inputs: &[(String, HostTensor)]) -> Result<()> {
    for (name, t) in inputs {
        step.bind(name, t).map_err(|e| format!("binding `{name}`: {e}"))?;
    }
    Ok(())
}

/// The logits of one (untimed) step.
fn logits_of(step: &mut CudaStep, dims: &BTreeMap<String, i64>) -> Result<Vec<f32>> {
    let outputs = step.run(dims).map_err(|e| e.to_string())?;
    let name = step
        .manifest()
        .buffers
        .iter()
        .find(|b| b.kind == BufferKind::Output && b.role.as_deref() == Some("logits"))
        .map(|b| b.name.clone())
        .unwrap_or_else(|| "logits".into());
    Ok(outputs.get(&name).map(|t| t.data.clone()).unwrap_or_default())
}

struct Budget {
    start: Instant,
    seconds: f64,
}

impl Budget {
    fn left(&self) -> f64 {
        self.seconds - self.start.elapsed().as_secs_f64()
    }
}

/// One artifact at one shape: fit check, inputs, a first step (its logits),
/// then as many timed steps as the budget share allows.
fn measure(
    step: &mut CudaStep,
    dims: &BTreeMap<String, i64>,
    inputs: &[(String, HostTensor)],
    repeats: usize,
    share_s: f64,
) -> (Measurement, Option<Vec<f32>>) {
    let attempt = |step: &mut CudaStep| -> Result<(Measurement, Option<Vec<f32>>)> {
        let needed = step.bytes_needed(dims).map_err(|e| e.to_string())?;
        let available = step.available_bytes().map_err(|e| e.to_string())?;
        if needed as f64 > 0.95 * available as f64 {
            return Ok((Measurement::Skipped(format!("needs {}, {} available", gb(needed), gb(available))), None));
        }
        bind_all(step, inputs)?;
        let start = Instant::now();
        let logits = logits_of(step, dims)?;
        let first_s = start.elapsed().as_secs_f64().max(1e-6);
        // `run_timed` needs no warm-up after this step at the same dims.
        let fit = ((share_s / first_s).floor() as usize).saturating_sub(1);
        let n = fit.clamp(1, repeats.max(1));
        let times = step.run_timed(dims, n).map_err(|e| e.to_string())?;
        Ok((Measurement::Timed(times), Some(logits)))
    };
    match attempt(step) {
        Ok(result) => result,
        Err(e) => {
            step.release_scratch();
            (Measurement::Skipped(e), None)
        }
    }
}

fn write_profile(path: &Path, times: &[KernelTime]) -> Result<String> {
    let rows: Vec<ProfileRow> =
        times.iter().map(|t| ProfileRow { kernel: &t.name, entry: &t.entry, op: &t.op, ms: t.ms }).collect();
    std::fs::write(path, profile_csv(&rows)).map_err(|e| format!("writing {}: {e}", path.display()))?;
    // Summary by op, largest first.
    let mut by_op: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for t in times {
        let e = by_op.entry(&t.op).or_default();
        e.0 += t.ms;
        e.1 += 1;
    }
    let total: f64 = times.iter().map(|t| t.ms).sum();
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut md = String::from("| op | kernels | ms | share |\n|---|---:|---:|---:|\n");
    for (op, (ms, n)) in ops {
        let _ = writeln!(md, "| {op} | {n} | {ms:.3} | {:.1}% |", 100.0 * ms / total.max(1e-12));
    }
    let _ = writeln!(md, "| total | {} | {total:.3} | |", times.len());
    Ok(md)
}

fn bench(args: &BenchArgs) -> Result<()> {
    let budget = Budget { start: Instant::now(), seconds: args.budget_s };
    std::fs::create_dir_all(&args.out).map_err(|e| format!("creating {}: {e}", args.out.display()))?;
    let (base_artifact, mut base) = load(&args.baseline, args.device)?;
    let (bif_artifact, mut bif) = load(&args.bifurcated, args.device)?;
    let (bm, fm): (&Manifest, &Manifest) = (&base_artifact.manifest, &bif_artifact.manifest);
    let inputs = |m: &Manifest| -> Vec<(String, String)> {
        let mut v: Vec<_> = m
            .buffers
            .iter()
            .filter(|b| b.kind == BufferKind::Input)
            .map(|b| (b.name.clone(), format!("{:?} {}", b.shape, b.dtype)))
            .collect();
        v.sort();
        v
    };
    if inputs(bm) != inputs(fm) {
        return Err(
            "the two artifacts take different inputs: compile the same model.json (with and without --no-bifurcate)"
                .into(),
        );
    }
    if !fm.attention.iter().any(|site| site.bifurcated) {
        eprintln!(
            "warning: {}: {}, so both artifacts run the same graph",
            args.bifurcated.display(),
            sites_bifurcated(fm)
        );
    }
    let m_d = args.decoded.or_else(|| bm.point.get("m_d").copied()).unwrap_or(256);
    eprintln!("binding random weights (seed {}) ...", args.seed);
    // One tensor at a time, the same for both (the inputs were checked equal).
    for b in weight_buffers(bm) {
        let t = random_tensor(bm, b, &bm.point, args.seed).map_err(|e| e.to_string())?;
        for step in [&mut base, &mut bif] {
            step.bind(&b.name, &t).map_err(|e| format!("binding `{}`: {e}", b.name))?;
        }
    }

    let mut shapes: Vec<(i64, i64)> =
        args.context.iter().flat_map(|&m_c| args.samples.iter().map(move |&b| (m_c, b))).collect();
    shapes.sort_by_key(|&(m_c, b)| (m_c * b, m_c, b));
    let mut rows = Vec::new();
    let mut measurements_left = shapes.len() * 2;
    let mut last_timed: Option<BTreeMap<String, i64>> = None;
    // A decode step with a table of learned positions (GPT-2's 1024):
    // past it the gather has no row to read (NaN logits), so not timed.
    let layout = DecodeLayout::from_manifest(bm).ok();
    for &(m_c, b) in &shapes {
        let dims = BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)]);
        let bytes = |m: &Manifest| step_bytes(m, &dims).unwrap_or_default();
        let end = usize::try_from(m_c.saturating_add(m_d)).unwrap_or(usize::MAX);
        let past = layout.as_ref().and_then(|l| l.check_positions(end.saturating_add(l.n)).err());
        let mut results = Vec::new();
        let mut inputs: Option<Vec<(String, HostTensor)>> = None;
        for step in [&mut base, &mut bif] {
            // Keep a tenth of the budget for the per-kernel profile.
            let left = budget.left() - if args.no_profile { 0.0 } else { 0.1 * args.budget_s };
            let label = if step.manifest().bifurcate { "bifurcated" } else { "baseline" };
            let result = if let Some(why) = &past {
                (Measurement::Skipped(why.to_string()), None)
            } else if left <= 0.0 {
                (Measurement::Skipped("time budget spent".into()), None)
            } else {
                eprintln!("b={b} m_c={m_c} m_d={m_d}: {label} ...");
                if inputs.is_none() {
                    // The same random inputs for both artifacts.
                    inputs = Some(random_inputs(bm, &dims, args.seed)?);
                }
                let share = left / measurements_left as f64;
                measure(step, &dims, inputs.as_deref().unwrap_or_default(), args.repeats, share)
            };
            measurements_left -= 1;
            results.push(result);
        }
        drop(inputs);
        let (bif_m, bif_logits) = results.pop().unwrap_or((Measurement::Skipped("not run".into()), None));
        let (base_m, base_logits) = results.pop().unwrap_or((Measurement::Skipped("not run".into()), None));
        let diff = base_logits.as_deref().zip(bif_logits.as_deref()).and_then(|(a, b)| max_abs_diff(a, b));
        if matches!((&base_m, &bif_m), (Measurement::Timed(_), Measurement::Timed(_))) {
            last_timed = Some(dims.clone());
        }
        let row = BenchRow {
            b,
            m_c,
            m_d,
            baseline: base_m,
            bifurcated: bif_m,
            baseline_bytes: bytes(bm),
            bifurcated_bytes: bytes(fm),
            logits_max_abs_diff: diff.map(|d| d.0),
            logits_max_abs: diff.map(|d| d.1),
        };
        eprintln!(
            "  baseline {} ms, bifurcated {} ms, speedup {}, predicted {}",
            row.baseline.median_ms().map_or("-".into(), |v| format!("{v:.3}")),
            row.bifurcated.median_ms().map_or("-".into(), |v| format!("{v:.3}")),
            row.speedup().map_or("-".into(), |v| format!("{v:.2}x")),
            row.predicted_speedup().map_or("-".into(), |v| format!("{v:.2}x")),
        );
        rows.push(row);
        // Partial results survive a later crash or timeout.
        std::fs::write(args.out.join("bench.csv"), write_csv(&rows)).map_err(|e| format!("writing bench.csv: {e}"))?;
    }

    let d = base.device_info().clone();
    let (major, minor) = d.compute_capability;
    let model = bm.model.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
    let timing = format!(
        "CUDA events around one whole step (all kernels, no copies), after one untimed step; \
         up to {} repeats within a {:.0} s budget",
        args.repeats, args.budget_s
    );
    let mut facts = vec![
        ("device".to_string(), format!("{} (sm_{major}{minor}, {})", d.name, gb(d.total_bytes))),
        ("baseline".to_string(), format!("{} ({} kernels)", base_artifact.ptx_path.display(), bm.kernels.len())),
        (
            "bifurcated".to_string(),
            format!("{} ({} kernels; {})", bif_artifact.ptx_path.display(), fm.kernels.len(), sites_bifurcated(fm)),
        ),
    ];
    for (label, m) in [("baseline", bm), ("bifurcated", fm)] {
        if !m.tuning.is_empty() {
            facts.push((format!("{label} tuning"), m.tuning.clone()));
        }
    }
    facts.extend([
        ("model".to_string(), model),
        ("m_d".to_string(), m_d.to_string()),
        ("timing".to_string(), timing),
        ("inputs".to_string(), format!("random weights and caches, seed {} (the same for both artifacts)", args.seed)),
    ]);
    let mut profile_md = String::new();
    if let (false, Some(dims)) = (args.no_profile, &last_timed) {
        // The dims the profiles are taken at, for scripts reading them.
        std::fs::write(args.out.join("profile-dims.json"), profile_dims_json(dims))
            .map_err(|e| format!("writing profile-dims.json: {e}"))?;
        for (label, step) in [("baseline", &mut base), ("bifurcated", &mut bif)] {
            if budget.left() <= 0.0 {
                break;
            }
            let path = args.out.join(format!("profile-{label}.csv"));
            let profiled = random_inputs(bm, dims, args.seed)
                .and_then(|inputs| bind_all(step, &inputs))
                .and_then(|()| step.profile(dims).map_err(|e| e.to_string()));
            match profiled {
                Ok(times) => {
                    let md = write_profile(&path, &times)?;
                    let _ = write!(profile_md, "\n## Kernel time by op: {label} at {dims:?}\n\n{md}");
                }
                Err(e) => facts.push((format!("profile {label}"), format!("failed: {e}"))),
            }
        }
    }
    let mut md = write_markdown("bifurc-run bench", &facts, &rows);
    md.push_str(&profile_md);
    std::fs::write(args.out.join("bench.csv"), write_csv(&rows)).map_err(|e| format!("writing bench.csv: {e}"))?;
    std::fs::write(args.out.join("bench.md"), &md).map_err(|e| format!("writing bench.md: {e}"))?;
    println!("{md}");
    println!("wrote {}/bench.csv and bench.md", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tenths;

    /// A line a tenth of the way, whether the count goes up by one (weights,
    /// steps) or by chunks (a prefilled context): never two in one tenth.
    #[test]
    fn tenths_pass_once_each() {
        let told = |total: usize, counts: &[usize]| {
            let mut t = Tenths::of(total);
            counts.iter().copied().filter(|&n| t.passed(n)).collect::<Vec<_>>()
        };
        let weights: Vec<usize> = (1..=291).collect();
        assert_eq!(told(291, &weights), (1..=10).map(|k| 29 * k).collect::<Vec<_>>());
        assert_eq!(told(5, &[1, 2, 3, 4, 5]), [1, 2, 3, 4, 5], "fewer than ten: each");
        assert_eq!(told(100, &[4, 8, 12, 13, 30, 99, 100]), [12, 30, 99, 100], "chunks: once per tenth passed");
        assert_eq!(told(0, &[]), Vec::<usize>::new());
    }

    /// The bench's facts say how many of the model's attention sites the
    /// bifurcated artifact splits (the Llama-2-7B manifests gpu-check uses).
    #[test]
    fn the_bifurcated_manifest_says_its_sites() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-2-7b-l2");
        let load = |name: &str| {
            let m = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            m.parse::<super::Manifest>().unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let bif = load("llama-2-7b-l2-bif.manifest.json");
        assert_eq!(super::sites_bifurcated(&bif), "4 of 4 attention sites bifurcated");
        let base = load("llama-2-7b-l2-base.manifest.json");
        assert_eq!(super::sites_bifurcated(&base), "0 of 4 attention sites bifurcated");
    }
}
