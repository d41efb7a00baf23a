//! Test helpers: a CPU step built from a graph document, and its outputs
//! checked against the reference interpreter.

use std::collections::BTreeMap;

use crate::ir::Graph;
use crate::lower::emit::{emit, Target};
use crate::lower::CpuStep;

/// The graph of `doc`, its CPU step, and the step's MLIR text, with
/// bf16 pairs summed by the CPU's bf16 dot product wherever the host has
/// one (`host_has_bf16_dot`), whether or not it prefers it, no AMX tiles
/// (`emit::amx` has its own tests) and the register tiles sized for
/// AVX-512 on any host (the texts the tests check are of those;
/// `emit::registers` tests the narrow ones): the tests check that code on
/// every such host.
pub(crate) fn cpu_step(doc: &serde_json::Value) -> (Graph, CpuStep, String) {
    cpu_step_tiles(doc, false)
}

/// [`cpu_step`] with narrow register tiles or wide ones (see
/// `emit::registers`).
pub(crate) fn cpu_step_tiles(doc: &serde_json::Value, narrow: bool) -> (Graph, CpuStep, String) {
    let graph = crate::import::from_value(doc).unwrap_or_else(|e| panic!("{e}"));
    let (step, text) = super::with_narrow_tiles(narrow, || {
        super::with_amx(false, || {
            super::with_bf16_dot(true, || {
                let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
                let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
                (step, text)
            })
        })
    });
    (graph, step, text)
}

/// The context `w · V` of 2 heads of 64, `[b, h, 1, m] · [h, m, k]` in
/// f32, V a context cache: a sum over m long enough to run in chunks.
pub(crate) fn context_wv_doc() -> serde_json::Value {
    serde_json::json!({
        "format": "bifurc-graph/1",
        "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 64}},
        "inputs": [
            {"name": "w", "role": "activation", "shape": ["b", "h", 1, "m"], "dtype": "f32"},
            {"name": "v", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["h", "m", "k"], "dtype": "f32"}
        ],
        "nodes": [{"id": "o", "op": "einsum", "inputs": ["w", "v"], "attrs": {"spec": "bhxm,hmk->bhxk"}}],
        "outputs": [{"name": "o", "node": "o"}]
    })
}

/// Grouped-query attention's context `q · K` as the tiny example has it
/// (2 KV heads of 16, 2 query heads each): q a reshape of its projection
/// (`[b, 1, g·p·k]` as `[b, g, p, 1, k]`), a unit axis for the new token.
pub(crate) fn reshaped_gqa_scores_doc() -> serde_json::Value {
    serde_json::json!({
        "format": "bifurc-graph/1",
        "dims": {"runtime": ["b", "m"], "constants": {"g": 2, "p": 2, "k": 16}},
        "inputs": [
            {"name": "q", "role": "activation", "shape": ["b", 1, "g*p*k"], "dtype": "f32"},
            {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["g", "m", "k"], "dtype": "f32"}
        ],
        "nodes": [
            {"id": "qh", "op": "reshape", "inputs": ["q"], "attrs": {"shape": ["b", "g", "p", 1, "k"]}},
            {"id": "s", "op": "einsum", "inputs": ["qh", "kc"], "attrs": {"spec": "bgpnk,gmk->bgpnm"}}
        ],
        "outputs": [{"name": "s", "node": "s"}]
    })
}

/// A point binding each `(dim, value)`.
pub(crate) fn point(dims: &[(&str, i64)]) -> BTreeMap<String, i64> {
    dims.iter().map(|(d, v)| (d.to_string(), *v)).collect()
}

/// Random inputs of `graph` at `point` (`seed`), each float one as bf16
/// holds it (rounded to bf16 and back): the interpreter then computes on
/// the values a bf16 step reads, and the two differ by the step's
/// roundings and orders of summing alone.
pub(crate) fn bf16_held_inputs(
    graph: &Graph,
    point: &BTreeMap<String, i64>,
    seed: u64,
) -> std::collections::HashMap<String, crate::interp::Tensor> {
    held_inputs(graph, point, seed, crate::ir::DType::BF16)
}

/// [`bf16_held_inputs`] with the values `dtype` holds (bf16 or f16).
pub(crate) fn held_inputs(
    graph: &Graph,
    point: &BTreeMap<String, i64>,
    seed: u64,
    dtype: crate::ir::DType,
) -> std::collections::HashMap<String, crate::interp::Tensor> {
    let mut inputs = crate::interp::random_inputs(graph, point, seed).unwrap_or_else(|e| panic!("{e}"));
    for input in graph.inputs.iter().filter(|i| i.dtype.is_float()) {
        if let Some(t) = inputs.get_mut(&input.name) {
            let bytes = dtype.encode(&t.data).unwrap_or_else(|e| panic!("{}: {e}", input.name));
            t.data = dtype.decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", input.name));
        }
    }
    inputs
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

/// Elementwise `nodes` over one f32 input `x` of shape `[n]` holding
/// `xs`, every node an output: run by the CPU step and by the reference
/// interpreter.
pub(crate) struct Elementwise {
    pub(crate) cpu: std::collections::HashMap<String, crate::interp::Tensor>,
    pub(crate) interpreter: std::collections::HashMap<String, crate::interp::Tensor>,
    /// The step's MLIR.
    pub(crate) text: String,
}

pub(crate) fn elementwise(nodes: serde_json::Value, xs: &[f32]) -> Elementwise {
    let outputs: Vec<serde_json::Value> = nodes
        .as_array()
        .map(|ns| ns.iter().map(|n| serde_json::json!({"name": n["id"], "node": n["id"]})).collect())
        .unwrap_or_default();
    let doc = serde_json::json!({
        "format": "bifurc-graph/1",
        "dims": {"runtime": ["n"], "constants": {}},
        "inputs": [{"name": "x", "role": "activation", "shape": ["n"], "dtype": "f32"}],
        "nodes": nodes,
        "outputs": outputs
    });
    let (graph, step, text) = cpu_step(&doc);
    let at = point(&[("n", xs.len() as i64)]);
    let x = crate::interp::Tensor::new(vec![xs.len()], xs.to_vec()).unwrap_or_else(|e| panic!("{e}"));
    let inputs = std::collections::HashMap::from([("x".to_string(), x)]);
    let cpu = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
    let interpreter = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
    Elementwise { cpu, interpreter, text }
}

/// `from, from + 1/per_unit, …` below `to`, each moved by `offset` (off
/// the round values), then NaN, ±inf, ±0 and `extra`: the inputs of a
/// math function's test.
pub(crate) fn grid((from, to): (f32, f32), per_unit: usize, offset: f32, extra: &[f32]) -> Vec<f32> {
    let n = ((to - from) * per_unit as f32) as usize;
    let mut xs: Vec<f32> = (0..n).map(|i| from + i as f32 / per_unit as f32 + offset).collect();
    xs.extend([f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0]);
    xs.extend_from_slice(extra);
    xs
}

/// `graph`'s CPU step compiled with AMX tiles on (where the host has them,
/// see `emit::amx`) or off, the register tiles sized for AVX-512, and its
/// MLIR text.
pub(crate) fn cpu_step_amx(graph: &Graph, amx: bool) -> (CpuStep, String) {
    super::with_narrow_tiles(false, || {
        super::with_amx(amx, || {
            let step = CpuStep::compile(graph).unwrap_or_else(|e| panic!("{e}"));
            let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
            (step, text)
        })
    })
}

/// `step`'s outputs `names` at `point` on `inputs` with every kernel split
/// into 2 and then 3 parts: the same bytes as in one (`whole`). Leaves the
/// step on one thread.
pub(crate) fn check_parts(
    step: &mut CpuStep,
    point: &BTreeMap<String, i64>,
    inputs: &std::collections::HashMap<String, crate::interp::Tensor>,
    whole: &std::collections::HashMap<String, crate::interp::Tensor>,
    names: &[&str],
) {
    step.set_min_split_bytes(0);
    for threads in [2, 3] {
        step.set_threads(threads);
        let split = step.run(point, inputs).unwrap_or_else(|e| panic!("{e}"));
        for name in names {
            assert_eq!(split[*name].data, whole[*name].data, "{name} at {point:?} in {threads} parts");
        }
    }
    step.set_threads(1);
}

/// How many functions of MLIR `text` sum half operands widened a chunk at
/// a time (`emit::half_panels`, `emit::half_values`): their three f32
/// stack slots (the chunk, the carried sums, a tile's rows) and a slot of
/// the rows' offsets.
pub(crate) fn chunked_kernels(text: &str) -> usize {
    text.split("func.func")
        .filter(|f| f.matches(" x f32 {alignment").count() == 3 && f.matches(" x i64 {alignment").count() == 1)
        .count()
}
