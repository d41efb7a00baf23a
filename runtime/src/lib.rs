//! bifurc-runtime: loads a bifurc artifact (PTX + manifest) and runs the
//! compiled decode step, on CUDA through cudarc (feature `cuda`) or on any
//! other backend that implements [`Step`]; [`session::Session`] drives
//! shared-prefix parallel sampling over any of them.
//!
//! The crate depends on nothing else of bifurc's; the manifest is its
//! contract with the compiler.
//!
//! An engine that embeds it: load an artifact compiled elsewhere, bind a
//! checkpoint's weights, fill the shared context from a prompt and decode
//! `b` samples from it, with any backend's [`Step`] (here the CUDA one,
//! feature `cuda`):
//!
//! ```no_run
//! use bifurc_runtime::weights::{WeightFiles, WeightSource};
//! use bifurc_runtime::{Artifact, SampleOptions, Session, Step};
//! use std::path::PathBuf;
//!
//! type Error = Box<dyn std::error::Error>;
//!
//! /// 32 continuations of 64 tokens of `prompt` (token ids).
//! fn decode<S: Step>(mut step: S, artifact: &Artifact, prompt: &[u32]) -> Result<Vec<Vec<u32>>, Error> {
//!     let manifest = &artifact.manifest;
//!     // Read from the files a tensor at a time, as each is bound.
//!     let weights = WeightSource::Files(WeightFiles::open(&[PathBuf::from("model.safetensors")])?);
//!     weights.bind(&mut step, manifest)?;
//!     let mut session = Session::new(step, manifest)?;
//!     // The step alone holds the context once it is filled.
//!     session.keep_host_context(false)?;
//!     session.fill_context(prompt)?;
//!     let options = SampleOptions { samples: 32, steps: 64, temperature: 0.8, seed: 1, keep_last_logits: false };
//!     let output = session.sample(&options, |report| eprintln!("step {}: {:.2} ms", report.step, report.ms))?;
//!     Ok(output.tokens)
//! }
//!
//! # #[cfg(feature = "cuda")]
//! # fn main() -> Result<(), Error> {
//! let artifact = Artifact::load("step.ptx")?;
//! let step = bifurc_runtime::cuda::CudaStep::new(&artifact, 0)?;
//! let tokens = decode(step, &artifact, &[1, 15043, 29892])?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "cuda"))]
//! # fn main() {}
//! ```
//!
//! | module | what |
//! |---|---|
//! | [`manifest`] | the manifest types, size expressions |
//! | [`artifact`] | `step.ptx` + `step.manifest.json` from disk, cross-checked |
//! | [`step`] | the [`Step`] trait every backend implements |
//! | [`session`] | the decode loop: fill a context, sample `b` continuations |
//! | [`weights`] | weights from `.safetensors`, or random |
//! | [`random`] | deterministic random inputs by role |
//! | [`exec`] | shapes, slots and launches at concrete dims (device-independent) |
//! | [`memory`] | whether a run fits in its device's memory, asked before allocating |
//! | [`plan`] | memory sharing between intermediates |
//! | [`rows`] | decode caches kept in a backend with spare rows |
//! | [`dtype`] | storage dtypes and conversions |
//! | [`bench`](mod@bench) | bench tables (median, bytes model, CSV / Markdown) |
//! | `cuda` | the CUDA backend: `CudaStep` (feature `cuda`) |

pub mod artifact;
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod exec;
pub mod expr;
pub mod manifest;
pub mod memory;
mod parallel;
pub mod plan;
pub mod random;
pub mod rng;
pub mod rows;
pub mod session;
pub mod step;
pub mod weights;

pub use artifact::Artifact;
pub use session::{SampleOptions, SampleOutput, Session, SessionError};
pub use step::{BoundCaches, HostTensor, Step, StepError};
