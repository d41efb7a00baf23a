//! Lowering to MLIR (melior, LLVM/MLIR 22).
//!
//! [`context`] makes an MLIR context with every dialect, pass and LLVM
//! translation registered, captures MLIR diagnostics, and runs textual pass
//! pipelines with verification before and after. [`smoke`] builds a tiny
//! module end to end to prove the toolchain works.

pub mod artifact;
pub mod context;
pub mod cpu;
pub mod emit;
mod fused_attention;
pub mod gpu;
mod in_place;
mod kernel_bytes;
pub mod mma;
pub mod plan;
mod smoke;

pub use context::{new_context, run_pipeline, verify, DiagnosticCapture};
pub use cpu::{memory_read_rate, peak_multiply_adds, CpuStep, CPU_PIPELINE};
pub use emit::{
    emit, emit_emulating_gpu, emit_shared, Emulation, SharedModule, Target, AMX_ENV, BF16_DOT_ENV, NARROW_TILES_ENV,
};
pub use fused_attention::{FUSED_ATTENTION_ENV, FUSED_MIN_ROWS, FUSED_OP};
pub use mma::{Mma, Tuning};
pub use plan::{
    plan, plan_cpu, plan_tuned, plan_with, plans_cpu, Buffer, BufferKind, FusedPlan, InPlace, InPlacePart, Kernel,
    Param, Pitch, Program,
};
pub use smoke::{smoke, SMOKE_PIPELINE};

/// `ceil(n / d)` for `d > 0`, exact for every `n` and never overflowing
/// (`(n + d - 1) / d` does at a size near `i64::MAX`, which a model's
/// constants may give).
pub(crate) fn ceil_div(n: i64, d: i64) -> i64 {
    n.div_euclid(d) + i64::from(n.rem_euclid(d) != 0)
}

/// Errors from building, verifying or transforming MLIR.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    /// A module failed MLIR verification.
    #[error("MLIR verification failed ({stage}){}", diagnostics_suffix(.diagnostics))]
    Verify {
        /// Where in the flow the module was verified.
        stage: String,
        /// MLIR diagnostics emitted while verifying, one per line.
        diagnostics: String,
    },
    /// A textual pass pipeline did not parse (unknown pass, bad option, ...).
    #[error("invalid pass pipeline `{pipeline}`: {message}")]
    ParsePipeline {
        /// The pipeline text as given.
        pipeline: String,
        /// MLIR's parser message.
        message: String,
    },
    /// A pass in the pipeline failed on the module.
    #[error("pass pipeline `{pipeline}` failed{}", diagnostics_suffix(.diagnostics))]
    RunPipeline {
        /// The pipeline text as given.
        pipeline: String,
        /// MLIR diagnostics emitted by the failing pass, one per line.
        diagnostics: String,
    },
    /// MLIR text did not parse.
    #[error("MLIR text does not parse{}", diagnostics_suffix(.diagnostics))]
    Parse {
        /// MLIR diagnostics emitted by the parser, one per line.
        diagnostics: String,
    },
    /// libdevice (`libdevice.10.bc`, linked by the GPU pipeline) is missing or unusable.
    #[error("{0}")]
    Libdevice(String),
    /// The GPU pipeline ran but its result holds no usable PTX.
    #[error("no PTX: {0}")]
    Ptx(String),
    /// A node (or a program/graph pair) the kernel emitter cannot lower.
    #[error("cannot lower `{node}`: {message}")]
    Unsupported {
        /// The node id (or kernel name) at fault.
        node: String,
        /// What is not supported.
        message: String,
    },
    /// A symbolic size cannot be formed or evaluated (overflow, unbound dim).
    #[error("{what}: {message}")]
    Size {
        /// Whose size.
        what: String,
        /// Why.
        message: String,
    },
    /// A compiled step was called with a bad point or bad inputs.
    #[error("{0}")]
    Run(String),
    /// The JIT could not be created or a kernel could not be invoked.
    #[error("execution engine: {0}")]
    Engine(String),
    /// A setting of the CPU backend (an environment variable) has a value
    /// it cannot take here.
    #[error("{0}")]
    Setting(String),
    /// A melior builder or accessor failed. (Its error is in the message,
    /// not a source: printed with its chain, `{:#}`, it came out twice.)
    #[error("MLIR construction failed: {0}")]
    Build(melior::Error),
}

impl From<melior::Error> for LowerError {
    fn from(e: melior::Error) -> Self {
        LowerError::Build(e)
    }
}

fn diagnostics_suffix(diagnostics: &str) -> String {
    if diagnostics.is_empty() {
        String::new()
    } else {
        format!(":\n{diagnostics}")
    }
}
