//! Symbolic sizes live in the optimizer crate (it reasons about them without
//! seeing this IR); the IR re-exports them.

pub use bifurc_passes::poly::*;
