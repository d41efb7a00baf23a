//! bifurc: finds attention over a batch-broadcast, concatenated KV cache in a
//! transformer decode graph and compiles it to code that reads the shared
//! context once per step.
//!
//! Stages (see DESIGN.md): [`import`] model.json → [`ir::Graph`] →
//! optimizer (`bifurc-passes`) → lowering → artifact → runtime.
//!
//! # Compiling a model to PTX
//!
//! [`compile`] runs the whole flow — optimize at a shape point, plan
//! kernels, emit MLIR, compile to PTX — and returns an [`Artifact`]: the PTX
//! and its manifest (docs/artifact.md). It links libdevice, found through
//! `CompileOptions::libdevice` or `BIFURC_LIBDEVICE` (`source scripts/env.sh`).
//!
//! ```
//! # if std::env::var_os("BIFURC_LIBDEVICE").is_none() {
//! #     eprintln!("note: BIFURC_LIBDEVICE is unset (source scripts/env.sh): skipping");
//! #     return Ok(());
//! # }
//! use bifurc::lower::gpu::GpuTarget;
//! use bifurc::{compile, CompileOptions};
//!
//! let model = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny/model.json");
//! let graph = bifurc::import::load(model.as_ref())?;
//! let opts = CompileOptions { target: GpuTarget::Sm80, ..CompileOptions::default() };
//! let artifact = compile(&graph, &opts)?;
//! assert!(artifact.ptx.contains(".target sm_80"));
//! // Kernels in launch order; each names the PTX entry to launch.
//! let first = &artifact.manifest.kernels[0];
//! assert!(artifact.ptx.contains(&format!(".entry {}(", first.entry)));
//! // Every attention site of tiny reads its context cache once per step.
//! assert!(artifact.manifest.attention.iter().all(|site| site.bifurcated));
//! // artifact.write("step.ptx".as_ref())? writes step.ptx, step.graph.json and step.manifest.json.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
pub mod cpu_backend;
pub mod dot;
pub mod export;
pub mod fsio;
pub mod hf;
pub mod import;
pub mod inspect;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod optimize;
pub mod run;

pub use lower::artifact::{compile, Artifact, CompileOptions};
