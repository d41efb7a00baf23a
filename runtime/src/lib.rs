//! bifurc-runtime: loads a bifurc artifact (PTX + manifest) and runs the
//! compiled decode step, on CUDA through cudarc (feature `cuda`) or on any
//! other backend that implements [`Step`]; [`session::Session`] drives
//! shared-prefix parallel sampling over any of them.
//!
//! The crate depends on nothing else of bifurc's; the manifest is its
//! contract with the compiler.
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
