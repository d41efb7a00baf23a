//! bifurc: finds attention over a batch-broadcast, concatenated KV cache in a
//! transformer decode graph and compiles it to code that reads the shared
//! context once per step.
//!
//! Stages (see DESIGN.md): [`import`] model.json → [`ir::Graph`] →
//! optimizer (`bifurc-passes`) → lowering → artifact → runtime.

pub mod dot;
pub mod export;
pub mod fsio;
pub mod import;
pub mod inspect;
pub mod ir;
pub mod lower;
pub mod optimize;
pub mod hf;
pub mod interp;
