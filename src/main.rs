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
    /// Print a model.json as a graph (Graphviz dot) or re-emit it in canonical JSON.
    Graph {
        /// The model.json to read.
        model: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
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
enum GraphFormat {
    /// Graphviz dot.
    Dot,
    /// model.json in bifurc's canonical layout.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<bifurc::ir::Graph> {
    bifurc::import::load(path).with_context(|| format!("{}", path.display()))
}

/// Refuses to write an output over one of the command's inputs.
fn check_not_input(output: &Path, inputs: &[&Path]) -> Result<()> {
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
        Command::ImportHf { config, output, layers, dtype, multi_level } => {
            check_not_input(&output, &[&config])?;
            let text = std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
            let opts = bifurc::hf::HfOptions { layers, dtype: dtype.map(Into::into), multi_level };
            let doc = bifurc::hf::build(&text, &opts).with_context(|| format!("{}", config.display()))?;
            bifurc::fsio::write_atomic(&output, bifurc::export::to_string(&doc).as_bytes())
                .with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!("wrote {}", output.display());
        }
        Command::Inspect { model, shape, json } => {
            let graph = load(&model)?;
            let point = ShapePoint::parse(shape.as_deref().unwrap_or(""))?;
            let report = bifurc::inspect::inspect(&graph, &point)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json(&graph))?);
            } else {
                print!("{}", report.render(&graph));
            }
        }
        Command::Optimize { model, output, shape, node_limit, iter_limit, time_limit, json } => {
            check_not_input(&output, &[&model])?;
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
