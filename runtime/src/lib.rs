//! bifurc-runtime: loads a bifurc artifact (PTX + manifest) and runs the
//! compiled decode step, on CUDA through cudarc (feature `cuda`) or on CPU.
//!
//! The crate depends on nothing else of bifurc's; the manifest is its
//! contract with the compiler.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod manifest;
pub mod step;

pub use step::{HostTensor, Step, StepError};
