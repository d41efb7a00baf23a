//! Test helpers: a CPU step built from a graph document, and its outputs
//! checked against the reference interpreter.

use std::collections::BTreeMap;

use crate::ir::Graph;
use crate::lower::emit::{emit, Target};
use crate::lower::CpuStep;

/// The graph of `doc`, its CPU step, and the step's MLIR text.
pub(crate) fn cpu_step(doc: &serde_json::Value) -> (Graph, CpuStep, String) {
    let graph = crate::import::from_value(doc).unwrap_or_else(|e| panic!("{e}"));
    let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
    let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
    (graph, step, text)
}

/// A point binding each `(dim, value)`.
pub(crate) fn point(dims: &[(&str, i64)]) -> BTreeMap<String, i64> {
    dims.iter().map(|(d, v)| (d.to_string(), *v)).collect()
}

/// Output `name` of `step` at `point` on random inputs (`seed`) against
/// the interpreter's: the same shape, each element within
/// `abs + rel · |want|`.
pub(crate) fn check_output(
    graph: &Graph,
    step: &CpuStep,
    point: &BTreeMap<String, i64>,
    seed: u64,
    name: &str,
    (abs, rel): (f32, f32),
) {
    let inputs = crate::interp::random_inputs(graph, point, seed).unwrap_or_else(|e| panic!("{e}"));
    let want = crate::interp::run(graph, point, &inputs).unwrap_or_else(|e| panic!("{e}"));
    let got = step.run(point, &inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got[name].shape, want[name].shape, "{name} at {point:?}");
    for (i, (x, y)) in got[name].data.iter().zip(&want[name].data).enumerate() {
        assert!((x - y).abs() <= abs + rel * y.abs(), "{name} at {point:?}: element {i}: {x} vs {y}");
    }
}
