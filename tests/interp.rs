//! Reference interpreter: every op family against hand-computed values,
//! framework-style attention against a plain loop, errors, random inputs.

use bifurc::interp::{run, Tensor};
use std::collections::{BTreeMap, HashMap};

#[path = "interp/attention.rs"]
mod attention;
#[path = "interp/errors.rs"]
mod errors;
#[path = "interp/ops.rs"]
mod ops;

pub(crate) const NEG_INF: f32 = f32::NEG_INFINITY;

pub(crate) fn t(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), data.to_vec()).expect("test tensor")
}

pub(crate) fn point(dims: &[(&str, i64)]) -> BTreeMap<String, i64> {
    dims.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// A graph with runtime dim `m` and one node `out = op(inputs)` (output `y`); inputs are
/// `(name, shape JSON, dtype)`.
pub(crate) fn op_graph(inputs: &[(&str, &str, &str)], op: &str, attrs: &str) -> String {
    let ins: Vec<String> = inputs
        .iter()
        .map(|(n, s, d)| format!(r#"{{"name": "{n}", "role": "activation", "shape": {s}, "dtype": "{d}"}}"#))
        .collect();
    let names: Vec<String> = inputs.iter().map(|(n, _, _)| format!("\"{n}\"")).collect();
    format!(
        r#"{{"format": "bifurc-graph/1", "dims": {{"runtime": ["m"]}},
            "inputs": [{}],
            "nodes": [{{"id": "out", "op": "{op}", "inputs": [{}], "attrs": {attrs}}}],
            "outputs": [{{"name": "y", "node": "out"}}]}}"#,
        ins.join(", "),
        names.join(", ")
    )
}

/// Imports `json`, runs it at `m` on `inputs` and compares output `y` with
/// `expected` (to 1e-6, relative and absolute).
pub(crate) fn check(json: &str, m: i64, inputs: &[(&str, Tensor)], expected: Tensor) {
    let g = bifurc::import::parse(json).unwrap_or_else(|e| panic!("import: {e}\n{json}"));
    let ins: HashMap<String, Tensor> = inputs.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
    let out = run(&g, &point(&[("m", m)]), &ins).unwrap_or_else(|e| panic!("run: {e}"));
    let y = &out["y"];
    if let Err(e) = y.check_close(&expected, 1e-6, 1e-6) {
        panic!("{e}\ngot      {:?} {:?}\nexpected {:?} {:?}", y.shape, y.data, expected.shape, expected.data);
    }
}

/// One op on f32 inputs `x`, `w`, … named in order.
pub(crate) fn check1(op: &str, attrs: &str, ins: &[(&str, Tensor)], expected: Tensor) {
    let decl: Vec<(String, String)> = ins.iter().map(|(n, t)| (n.to_string(), format!("{:?}", t.shape))).collect();
    let decl: Vec<(&str, &str, &str)> = decl.iter().map(|(n, s)| (n.as_str(), s.as_str(), "f32")).collect();
    check(&op_graph(&decl, op, attrs), 1, ins, expected);
}
