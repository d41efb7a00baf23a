//! The `bifurc` command line.

use anyhow::{bail, Context, Result};
use bifurc::inspect::ShapePoint;
use bifurc::ir::DType;
use bifurc::optimize::Limits;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Finds attention over a shared, batch-broadcast KV cache in a transformer
/// decode graph and bifurcates it, so the shared context is read once per
/// step instead of once per sample.
#[derive(Parser)]
#[command(name = "bifurc", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the decode-step graph (model.json) of a Hugging Face model from its config.json.
    ///
    /// Supported: llama, mistral, qwen2 (multi-head and grouped-query), gpt2 (multi-head),
    /// gpt_bigcode (multi-query or multi-head). Attention is written the way the framework
    /// exports it: over concat(broadcast of the context K/V over b, decode K/V, the new row).
    ImportHf {
        /// The model's config.json.
        config: PathBuf,
        /// Where to write model.json (written atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Keep only the first N layers.
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
        /// Storage dtype of weights, caches and activations (default: the config's torch_dtype, else f32).
        #[arg(long)]
        dtype: Option<DtypeArg>,
        /// Multi-level sharing: P prompts x S samples (batch P*S) share a system prompt
        /// (cache.{i}.{k,v}_sys [g, m_s, k], broadcast over all samples) and each prompt's
        /// samples share its context (cache.{i}.{k,v}_ctx [P, g, m_c, k]). Runtime dims
        /// P, S, m_s, m_c, m_d.
        #[arg(long)]
        multi_level: bool,
        /// n: tokens fed per sample per step (default 1, a decode step). More make a
        /// prefill graph for `bifurc run --prefill`: n prompt tokens at once under a causal
        /// mask, new K/V rows [b, g, n, k] and logits [b, n, vocab] for all of them.
        #[arg(long, value_name = "N")]
        new_tokens: Option<usize>,
    },
    /// Summarize a model.json: layers, parameters, the attention sites that read a
    /// batch-broadcast context cache, and bytes moved per decode step.
    Inspect {
        /// The model.json to read.
        model: PathBuf,
        /// Shape point for the bytes model, e.g. b=32,m_c=8192,m_d=256. Runtime dims not
        /// given default to b=32, m_c=8192, m_d=256.
        #[arg(long, value_name = "DIM=N,...")]
        shape: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bifurcate attention over a shared, batch-broadcast KV cache where it lowers bytes moved.
    ///
    /// Runs the e-graph optimizer at a shape point, writes the optimized graph (same format,
    /// re-imported and checked) and prints a report: every attention site rewritten or not
    /// and why, bytes before/after, predicted step speedup, rule firings, e-graph size, time.
    Optimize {
        /// The model.json to read.
        model: PathBuf,
        /// Where to write the optimized model.json (written atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Shape point for the cost model, e.g. b=32,m_c=8192,m_d=256 (defaults: b=32,
        /// m_c=8192, m_d=256). At b=1 nothing is rewritten: bifurcation saves nothing there.
        #[arg(long, value_name = "DIM=N,...")]
        shape: Option<String>,
        /// Stop saturation at this many e-nodes.
        #[arg(long, default_value_t = Limits::default().nodes)]
        node_limit: usize,
        /// Stop saturation after this many iterations.
        #[arg(long, default_value_t = Limits::default().iterations)]
        iter_limit: usize,
        /// Stop saturation after this many seconds.
        #[arg(long, default_value_t = Limits::default().time.as_secs_f64())]
        time_limit: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compile a model.json to GPU code: step.ptx and, beside it, step.manifest.json and
    /// step.graph.json (the compiled graph, which `bifurc run --device cpu` runs).
    ///
    /// Optimizes at the shape point (unless --no-bifurcate), plans one kernel per compute node,
    /// emits MLIR and compiles it to PTX in process (MLIR's NVPTX backend, libdevice linked).
    /// The manifest lists dims, buffers, kernels in launch order with their parameters and
    /// grid/block, the bifurcated attention sites and the bytes model (docs/artifact.md).
    /// With --emit, prints that stage to stdout and writes nothing.
    Compile {
        /// The model.json to read.
        model: PathBuf,
        /// Where to write the PTX (written atomically, with the manifest and the compiled
        /// graph beside it: step.ptx -> step.manifest.json, step.graph.json). Required unless
        /// --emit is given.
        #[arg(short, long, required_unless_present = "emit", conflicts_with = "emit")]
        output: Option<PathBuf>,
        /// The chip to compile for.
        #[arg(long, value_enum, default_value_t = ChipArg::Sm90)]
        target: ChipArg,
        /// Shape point for the cost model and the manifest's *_at_point figures, e.g.
        /// b=32,m_c=8192,m_d=256 (defaults: b=32, m_c=8192, m_d=256). The PTX works for any point.
        #[arg(long, value_name = "DIM=N,...")]
        shape: Option<String>,
        /// Compile the graph as given, without bifurcating attention.
        #[arg(long)]
        no_bifurcate: bool,
        /// Run every contraction on CUDA cores. By default a bf16 / f16 contraction with at
        /// least 8 outputs on its larger side at the --shape point (the projections, attention's
        /// q·K and w·V over either cache) runs on tensor cores (mma.sync, f32 accumulation).
        #[arg(long)]
        no_tensor_cores: bool,
        /// Tensor-core choices for a tuning experiment, over the defaults of
        /// src/lower/mma.rs: unroll=1..16 (iterations a warp loads together, for one tile),
        /// min-blocks=N (blocks needed for two column tiles over a constant reduction), split-blocks=N,
        /// max-walk=N, max-splits=N (how a runtime-length reduction is split across blocks),
        /// stage=on|off (w·V stages its probabilities in shared memory), interleave=on|off
        /// (two column tiles read as pairs where columns are innermost), wide-short=on|off (two
        /// column tiles a warp over a short reduction, q·K's head dim), stage-b=on|off (w·V also
        /// stages V in shared memory, read in 16-byte loads; off by default). Every setting gives
        /// the same results up to summation order; only speed differs.
        #[arg(long, value_name = "KEY=VALUE,...", conflicts_with = "no_tensor_cores")]
        tune: Option<String>,
        /// Storage dtype of every float input and node (default: as in model.json).
        #[arg(long)]
        dtype: Option<DtypeArg>,
        /// Print this stage to stdout instead of writing files.
        #[arg(long, value_enum)]
        emit: Option<EmitArg>,
        /// libdevice.10.bc, linked for math functions (default: $BIFURC_LIBDEVICE).
        #[arg(long, value_name = "PATH")]
        libdevice: Option<PathBuf>,
    },
    /// Time the compiled step, baseline against bifurcated, over samples x context length.
    ///
    /// Compiles the graph twice for this machine's CPU (the MLIR JIT): as given, and
    /// bifurcated (optimized at --optimize-at, default the largest point of the sweep; the
    /// table says how many attention sites that split, and a warning says when none was);
    /// one compilation of each serves every point. It binds random weights once (one copy, shared
    /// by the two steps) and at each point random caches, warms up, then alternates timed
    /// steps of the two (shared noise) and reports the
    /// median latencies, their ratio, and the bytes model's predicted ratio beside it, with the
    /// FMA floor: the step's multiply-adds (the same on both sides) at this machine's peak rate
    /// (measured first, by a JIT-compiled loop of vector FMAs on the threads the steps use), the
    /// least time either step can take here, and the bifurcated step's share of it; the
    /// bifurcated step's memory time: the bytes its kernels move (the bytes model of its plan)
    /// at this machine's read rate (measured next, each thread reading its own stretch of
    /// memory past the caches), and its share of the step (near 100%: bound by memory); and the
    /// largest difference of the two steps' logits on the same inputs. A point
    /// whose two steps would not fit in the memory this machine has available (or with a
    /// buffer past the CPU step's limit, or positions past the model's learned ones, GPT-2
    /// beyond 1024 tokens, or past 2^24) is not run but listed under the table with why. On
    /// a GPU machine use `bifurc-run bench` with artifacts from `bifurc compile`.
    Bench {
        /// The model.json to benchmark (runtime dims b, m_c, m_d).
        model: PathBuf,
        /// Sample counts (b) to sweep, comma-separated (`--samples 1,8,32`).
        #[arg(long, value_name = "B,...", value_delimiter = ',', default_values_t = [1, 8, 16, 32, 64])]
        samples: Vec<i64>,
        /// Context lengths (m_c) to sweep, comma-separated.
        #[arg(long, value_name = "M_C,...", value_delimiter = ',', default_values_t = [1024, 4096, 16384])]
        context: Vec<i64>,
        /// Tokens decoded so far (m_d) at every point.
        #[arg(long, default_value_t = 16)]
        decoded: i64,
        /// Timed steps per side per point (the median is reported), 1 to 1000.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Shape point the bifurcated graph is optimized at (default: the largest point).
        #[arg(long, value_name = "DIM=N,...")]
        optimize_at: Option<String>,
        /// Seed of the random weights and caches.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for bench.csv, bench.md, speedup.svg and latency.svg (the tables written
        /// again after every point, so an interrupted sweep leaves what it measured).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Threads each large kernel is split across (default: one per core).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
    },
    /// Draw a bench table as SVG plots (speedup.svg, latency.svg).
    ///
    /// Reads bench.csv from `bifurc bench`, or from `bifurc-run bench` on a GPU machine (whose
    /// runtime-only binary draws nothing): bring its OUT/bench/bench.csv back and plot it here.
    Plot {
        /// The bench.csv to read.
        csv: PathBuf,
        /// Directory for the SVGs (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Plot title (default: the CSV's path).
        #[arg(long)]
        title: Option<String>,
    },
    /// Fill a context and decode samples from it in parallel with a compiled artifact.
    ///
    /// Loads the manifest beside the PTX (step.ptx -> step.manifest.json). --device cpu
    /// JIT-compiles the compiled graph written beside them (step.graph.json); --device cuda
    /// runs the PTX on a GPU (needs a build with `--features cuda`; otherwise use `bifurc-run
    /// run`, see docs/gpu-machine.md). The context is a prompt, filled by stepping the graph
    /// over it at b=1, or a random one (--context-len). Then --samples continuations are
    /// decoded together for --steps tokens. Prints the tokens, the per-step latency (median,
    /// p90) and tokens/s, the decode's one-time set-up apart (on the CPU the JIT compile of
    /// the plan the samples take); --json prints one JSON object instead. Before any weights are bound
    /// it asks whether the run fits: the step's buffers at the last step (weights, the context
    /// and decode caches, intermediates; on the CPU also the context caches in f32 while they
    /// are bound: all of a prompt's, one layer of a random context's; and the largest weight in
    /// f32, as binding holds one at a time) against the memory the
    /// machine, or the GPU, has available; a run that does not fit is an error that says what
    /// it needs. Once bound, the context is held by the step alone.
    ///
    /// On the CPU, bf16 projections and context attention run on AMX tiles where the CPU has
    /// them (Intel, from Sapphire Rapids), bf16 pairs are summed by `vdpbf16ps` on AMD, and
    /// the contractions' register tiles are narrow where the CPU has no AVX-512 (16 vector
    /// registers of 256 bits); BIFURC_CPU_AMX=auto|on|off, BIFURC_CPU_BF16_DOT=auto|on|off
    /// and BIFURC_CPU_NARROW_TILES=auto|on|off override each.
    /// f32 context attention runs as one fused kernel where at least 2 query rows share a KV
    /// head (b >= 2 multi-head; b times the query heads a KV head where they share one), as
    /// three below; BIFURC_CPU_FUSED_ATTENTION=auto|on|off
    /// overrides that (`on` fuses bf16 too where the step widens bf16 to f32 anyway, with no
    /// `vdpbf16ps` in use and no AMX or with narrow tiles: faster, but rounded apart from the
    /// baseline by about bf16's noise over many layers).
    Run(RunArgs),
    /// Print a model.json as a graph (Graphviz dot) or re-emit it in canonical JSON.
    Graph {
        /// The model.json to read.
        model: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The step's PTX (or its .manifest.json); the manifest and the compiled graph are
    /// beside it (step.manifest.json, step.graph.json).
    ptx: PathBuf,
    #[command(flatten)]
    weights: RunWeightsArgs,
    /// Seed of --random-weights (default: --seed).
    #[arg(long, value_name = "N", requires = "random_weights")]
    weights_seed: Option<u64>,
    #[command(flatten)]
    context: RunContextArgs,
    /// b: samples decoded together.
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Tokens generated per sample (= decode steps).
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Sampling temperature; 0 for greedy.
    #[arg(long, default_value_t = 0.8, allow_hyphen_values = true)]
    temperature: f32,
    /// Seed of sampling, of a random context and (unless --weights-seed) of random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the step runs: cpu (the MLIR JIT) or cuda (builds with --features cuda).
    #[arg(long, value_enum, default_value_t = RunDeviceArg::for_build())]
    device: RunDeviceArg,
    /// The CUDA device ordinal (with --device cuda).
    #[arg(long, value_name = "N", default_value_t = 0)]
    cuda_device: usize,
    /// Threads each large kernel is split across (--device cpu; default: one per core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Print one JSON object instead of text: samples (ids per sample), step_ms,
    /// tokens_per_s, ...
    #[arg(long)]
    json: bool,
    /// Also report the last step's logits of every sample (JSON: "logits"; text: the top 5).
    #[arg(long)]
    logits: bool,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "FILE")]
    out_json: Option<PathBuf>,
    /// Keep the decode caches on the host and bind them every step, instead of
    /// appending each step's K/V rows inside the backend (for checking).
    #[arg(long)]
    host_caches: bool,
    /// A prefill step (the same model imported with --new-tokens N and compiled) that
    /// fills the context from the prompt N tokens per run instead of one (on the CPU it
    /// shares the decode step's weights).
    #[arg(long, value_name = "PTX")]
    prefill: Option<PathBuf>,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct RunWeightsArgs {
    /// Weights: .safetensors files, or directories of them (sharded checkpoints), read a tensor at a
    /// time as each is bound.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    weights: Vec<PathBuf>,
    /// Deterministic random weights (seeded by --weights-seed, else --seed).
    #[arg(long)]
    random_weights: bool,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct RunContextArgs {
    /// The prompt as token ids, e.g. 1,2,3 (the context is filled by stepping the graph over them).
    #[arg(long, value_name = "IDS", allow_hyphen_values = true)]
    prompt_ids: Option<String>,
    /// A file of prompt token ids, separated by commas or whitespace (a JSON array works).
    #[arg(long, value_name = "FILE")]
    prompt_ids_file: Option<PathBuf>,
    /// A random context of N tokens instead of a prompt (random caches and logits).
    #[arg(long, value_name = "N")]
    context_len: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum RunDeviceArg {
    /// This machine's CPU: the compiled graph, JIT-compiled through MLIR.
    Cpu,
    /// A CUDA GPU: the PTX (needs a build with --features cuda).
    Cuda,
}

impl RunDeviceArg {
    fn for_build() -> Self {
        if cfg!(feature = "cuda") {
            RunDeviceArg::Cuda
        } else {
            RunDeviceArg::Cpu
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ChipArg {
    /// Ampere (A100).
    #[value(name = "sm_80")]
    Sm80,
    /// Hopper (H100, H200).
    #[value(name = "sm_90")]
    Sm90,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmitArg {
    /// The MLIR kernel module that is compiled to PTX.
    Mlir,
    /// The graph that is compiled (optimized unless --no-bifurcate), as model.json.
    Graph,
    /// The GPU pass pipeline.
    Pipeline,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    /// Graphviz dot.
    Dot,
    /// model.json in bifurc's canonical layout.
    Json,
}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Lets a closed pipe end the process quietly, as it ends any Unix filter
/// (`bifurc graph model.json | head`), where `println!` panicked ("failed
/// printing to stdout: Broken pipe", exit status 101): Rust starts a
/// program with SIGPIPE ignored.
fn default_sigpipe() {
    // SAFETY: called first in `main`, before any other thread exists;
    // restoring a signal's default disposition touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Reads a model.json; errors inside the file are prefixed with its path
/// (an unreadable file's error names it already).
fn load(path: &Path) -> Result<bifurc::ir::Graph> {
    match bifurc::import::load(path) {
        Ok(g) => Ok(g),
        Err(e @ bifurc::import::ImportError::Io { .. }) => Err(e.into()),
        Err(e) => Err(anyhow::Error::new(e).context(path.display().to_string())),
    }
}

/// Directory `dir` for a command's outputs, made when missing; a file
/// there is refused by name.
fn out_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {} is a file, not a directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Refuses, before any work, an output that cannot be written: in a
/// directory that does not exist, or over one of the command's inputs.
fn check_output(output: &Path, inputs: &[&Path]) -> Result<()> {
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("cannot write {}: the directory {} does not exist", output.display(), dir.display());
        }
    }
    for input in inputs {
        let same = match (output.canonicalize(), input.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            bail!("output {} would overwrite the input {}", output.display(), input.display());
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ImportHf { config, output, layers, dtype, multi_level, new_tokens } => {
            check_output(&output, &[&config])?;
            let text = std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
            let opts = bifurc::hf::HfOptions { layers, dtype: dtype.map(Into::into), multi_level, new_tokens };
            let doc = bifurc::hf::build(&text, &opts).with_context(|| format!("{}", config.display()))?;
            bifurc::fsio::write_atomic(&output, bifurc::export::to_string(&doc).as_bytes())
                .with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!("wrote {}", output.display());
        }
        Command::Inspect { model, shape, json } => {
            let graph = load(&model)?;
            let point = ShapePoint::parse(shape.as_deref().unwrap_or(""))?;
            let report = bifurc::inspect::inspect(&graph, &point).with_context(|| format!("{}", model.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json(&graph))?);
            } else {
                print!("{}", report.render(&graph));
            }
        }
        Command::Optimize { model, output, shape, node_limit, iter_limit, time_limit, json } => {
            check_output(&output, &[&model])?;
            if !(time_limit > 0.0 && time_limit.is_finite()) {
                bail!("--time-limit must be a positive number of seconds, got {time_limit}");
            }
            let graph = load(&model)?;
            let opts = bifurc::optimize::Options {
                point: ShapePoint::parse(shape.as_deref().unwrap_or(""))?,
                limits: Limits {
                    nodes: node_limit,
                    iterations: iter_limit,
                    time: std::time::Duration::from_secs_f64(time_limit),
                },
            };
            let out = bifurc::optimize::optimize(&graph, &opts).with_context(|| format!("{}", model.display()))?;
            let text = bifurc::export::to_string(&bifurc::export::to_json(&out.graph));
            bifurc::fsio::write_atomic(&output, text.as_bytes())
                .with_context(|| format!("cannot write {}", output.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out.report.to_json())?);
            } else {
                print!("{}", out.report.render());
            }
            if out.report.passes.hit_limit {
                eprintln!("warning: saturation stopped at a limit ({})", out.report.passes.stop_reason);
            }
            eprintln!("wrote {}", output.display());
        }
        Command::Compile {
            model,
            output,
            target,
            shape,
            no_bifurcate,
            no_tensor_cores,
            tune,
            dtype,
            emit,
            libdevice,
        } => {
            let tuning = bifurc::lower::Tuning::parse(tune.as_deref().unwrap_or(""))
                .map_err(|e| anyhow::anyhow!("--tune: {e}"))?;
            let tensor_cores = (!no_tensor_cores).then_some(tuning);
            compile(&model, output.as_deref(), target, shape, no_bifurcate, tensor_cores, dtype, emit, libdevice)?;
        }
        Command::Plot { csv, out, title } => {
            let text = std::fs::read_to_string(&csv).with_context(|| format!("cannot read {}", csv.display()))?;
            let rows = bifurc::bench::rows_from_csv(&text).map_err(|e| anyhow::anyhow!("{}: {e}", csv.display()))?;
            let title = title.unwrap_or_else(|| csv.display().to_string());
            out_dir(&out)?;
            bifurc::bench::write_svgs(&rows, &out, &title)
                .with_context(|| format!("cannot write plots in {}", out.display()))?;
            eprintln!("wrote speedup.svg, latency.svg in {} ({} points)", out.display(), rows.len());
        }
        Command::Bench { model, samples, context, decoded, repeats, optimize_at, seed, out, threads } => {
            use_threads(threads)?;
            let graph = load(&model)?;
            if let Some(b) = samples.iter().find(|&&b| b < 1) {
                bail!("--samples: every sample count must be at least 1, got {b}");
            }
            if context.iter().any(|v| *v < 0) || decoded < 0 {
                bail!("--context and --decoded must be non-negative");
            }
            if repeats == 0 {
                bail!("--repeats must be at least 1");
            }
            if repeats > MAX_BENCH_REPEATS {
                bail!(
                    "--repeats must be at most {MAX_BENCH_REPEATS} (each side of each point is timed that many \
                     times), got {repeats}"
                );
            }
            let optimize_at = match optimize_at {
                Some(text) => Some(ShapePoint::parse(&text)?),
                None => None,
            };
            // Made (or refused) before the sweep, not after minutes of it.
            if let Some(dir) = &out {
                out_dir(dir)?;
            }
            let opts =
                bifurc::bench::BenchOptions { samples, context_lens: context, decoded, repeats, optimize_at, seed };
            let threads = rayon::current_num_threads();
            let title = format!("{} (CPU, {threads} thread{})", model.display(), if threads == 1 { "" } else { "s" });
            // The tables, written again after every point: an interrupted
            // sweep leaves what it measured.
            let tables = |dir: &Path, sweep: &bifurc::bench::Sweep| -> Result<()> {
                let write = |name: &str, text: String| {
                    let path = dir.join(name);
                    bifurc::fsio::write_atomic(&path, text.as_bytes())
                        .with_context(|| format!("cannot write {}", path.display()))
                };
                write("bench.csv", bifurc::bench::to_csv(&sweep.rows))?;
                write("bench.md", bifurc::bench::to_markdown(&sweep.rows, &sweep.skipped, &title, &sweep.about()))
            };
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            // A table that cannot be written part way is said at the end,
            // when it is written whole.
            let sweep = bifurc::bench::run_cpu(
                &graph,
                &opts,
                |msg| bar.set_message(msg.to_string()),
                |sweep| {
                    if let Some(dir) = &out {
                        let _ = tables(dir, sweep);
                    }
                },
            );
            bar.finish_and_clear();
            let sweep = sweep.with_context(|| format!("{}", model.display()))?;
            if sweep.bifurcated.0 == 0 {
                eprintln!("warning: {}", sweep.about());
            }
            print!("{}", bifurc::bench::to_markdown(&sweep.rows, &sweep.skipped, &title, &sweep.about()));
            if let Some(dir) = out {
                tables(&dir, &sweep)?;
                bifurc::bench::write_svgs(&sweep.rows, &dir, &title)
                    .with_context(|| format!("cannot write plots in {}", dir.display()))?;
                eprintln!("wrote bench.csv, bench.md, speedup.svg, latency.svg in {}", dir.display());
            }
        }
        Command::Run(args) => {
            use_threads(args.threads)?;
            run_step(&args)?
        }
        Command::Graph { model, format } => {
            let graph = load(&model)?;
            match format {
                GraphFormat::Dot => print!("{}", bifurc::dot::to_dot(&graph)),
                GraphFormat::Json => print!("{}", bifurc::export::to_string(&bifurc::export::to_json(&graph))),
            }
        }
    }
    Ok(())
}

/// Most `--threads` for each core.
const THREADS_PER_CORE: usize = 4;

/// The most timed steps `bifurc bench` takes per side per point: a median
/// of more says nothing new, and a typo (`--repeats 100000`) would run for
/// hours before its first row.
const MAX_BENCH_REPEATS: usize = 1000;

/// `--threads N`: the size of the thread pool that the CPU step splits
/// its large kernels across (see `bifurc::lower::CpuStep::set_threads`).
fn use_threads(threads: Option<usize>) -> Result<()> {
    // More threads than cores only take turns; a typo of a million would
    // start a million threads.
    let cores = std::thread::available_parallelism().map_or(256, usize::from);
    match threads {
        None => Ok(()),
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) if n > THREADS_PER_CORE * cores => {
            bail!(
                "--threads {n}: at most {} ({THREADS_PER_CORE} for each of this machine's {cores} cores)",
                THREADS_PER_CORE * cores
            )
        }
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("--threads {n}: cannot start the thread pool: {e}")),
    }
}

/// `bifurc run`: see [`bifurc::run`].
fn run_step(args: &RunArgs) -> Result<()> {
    use bifurc::run::{parse_ids, read_ids, ContextSource, Device, RunOptions, Weights};
    let context = match (&args.context.prompt_ids, &args.context.prompt_ids_file, args.context.context_len) {
        (Some(ids), _, _) => ContextSource::Prompt(parse_ids(ids).context("--prompt-ids")?),
        (None, Some(file), _) => ContextSource::Prompt(read_ids(file).context("--prompt-ids-file")?),
        (None, None, Some(len)) => ContextSource::Random { len },
        (None, None, None) => bail!("give --prompt-ids, --prompt-ids-file or --context-len"),
    };
    let weights = if args.weights.random_weights {
        Weights::Random { seed: args.weights_seed.unwrap_or(args.seed) }
    } else {
        Weights::Files(args.weights.weights.clone())
    };
    let device = match args.device {
        RunDeviceArg::Cpu => Device::Cpu,
        RunDeviceArg::Cuda => Device::Cuda { ordinal: args.cuda_device },
    };
    let opts = RunOptions {
        artifact: args.ptx.clone(),
        device,
        weights,
        context,
        samples: args.samples,
        steps: args.steps,
        temperature: args.temperature,
        seed: args.seed,
        keep_logits: args.logits,
        progress: !args.json,
        host_caches: args.host_caches,
        prefill: args.prefill.clone(),
    };
    let report = bifurc::run::run(&opts)?;
    let value = report.to_json();
    if let Some(path) = &args.out_json {
        bifurc::fsio::write_atomic(path, format!("{value}\n").as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{value}");
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compile(
    model: &Path,
    output: Option<&Path>,
    target: ChipArg,
    shape: Option<String>,
    no_bifurcate: bool,
    tensor_cores: Option<bifurc::lower::Tuning>,
    dtype: Option<DtypeArg>,
    emit: Option<EmitArg>,
    libdevice: Option<PathBuf>,
) -> Result<()> {
    use bifurc::lower::artifact::{lower_mlir, prepare};
    use bifurc::lower::gpu::{find_libdevice, gpu_pipeline, GpuTarget};
    let target = match target {
        ChipArg::Sm80 => GpuTarget::Sm80,
        ChipArg::Sm90 => GpuTarget::Sm90,
    };
    let opts = bifurc::CompileOptions {
        target,
        point: ShapePoint::parse(shape.as_deref().unwrap_or(""))?,
        bifurcate: !no_bifurcate,
        tensor_cores: tensor_cores.is_some(),
        tuning: tensor_cores.unwrap_or_default(),
        dtype: dtype.map(Into::into),
        libdevice,
        ..Default::default()
    };
    // --emit output may be piped into `head`: a closed pipe is not an error.
    let to_stdout = |text: &str| -> Result<()> {
        use std::io::Write as _;
        match std::io::stdout().lock().write_all(text.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("cannot write to stdout"),
        }
    };
    if let Some(EmitArg::Pipeline) = emit {
        let pipeline = gpu_pipeline(target.chip(), &find_libdevice(opts.libdevice.as_deref())?);
        return to_stdout(&format!("{pipeline}\n"));
    }
    let graph = load(model)?;
    match emit {
        Some(EmitArg::Graph) => {
            let (optimized, _) = prepare(&graph, &opts).with_context(|| format!("{}", model.display()))?;
            return to_stdout(&bifurc::export::to_string(&bifurc::export::to_json(&optimized)));
        }
        Some(EmitArg::Mlir) => {
            let (_, mlir) = lower_mlir(&graph, &opts).with_context(|| format!("{}", model.display()))?;
            return to_stdout(&mlir);
        }
        Some(EmitArg::Pipeline) | None => {}
    }
    let output = output.context("--output is required")?;
    let manifest_path = bifurc::Artifact::manifest_path(output);
    check_output(output, &[model])?;
    check_output(&manifest_path, &[model])?;
    let graph_path = bifurc::Artifact::graph_path(output);
    check_output(&graph_path, &[model])?;
    let artifact = bifurc::compile(&graph, &opts).with_context(|| format!("{}", model.display()))?;
    artifact.write(output).with_context(|| format!("cannot write {}", output.display()))?;
    let m = &artifact.manifest;
    let point: Vec<String> = m.point.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("compiled {} for {} at {}", model.display(), m.target, point.join(", "));
    println!(
        "  kernels: {} ({} on tensor cores), PTX: {}",
        m.kernels.len(),
        artifact.tensor_core_kernels.len(),
        bifurc::inspect::human_bytes(artifact.ptx.len() as f64)
    );
    let tuned = opts.tuning.describe();
    if opts.tensor_cores && !tuned.is_empty() {
        println!("  tensor-core tuning: {tuned}");
    }
    let bifurcated = m.attention.iter().filter(|s| s.bifurcated).count();
    println!("  attention sites bifurcated: {bifurcated} of {}", m.attention.len());
    println!(
        "  bytes moved per step: {} -> {} ({:.2}x)",
        bifurc::inspect::human_bytes(m.bytes.before.total as f64),
        bifurc::inspect::human_bytes(m.bytes.after.total as f64),
        m.bytes.predicted_speedup
    );
    if let Some(report) = &artifact.report {
        if report.passes.hit_limit {
            eprintln!("warning: saturation stopped at a limit ({})", report.passes.stop_reason);
        }
    }
    eprintln!("wrote {}, {} and {}", output.display(), manifest_path.display(), graph_path.display());
    Ok(())
}
