//! The multiply-adds of one decode step at a shape point: what its
//! contractions compute. An einsum computes one multiply-add per output
//! element and value of its summed letters; a matmul one per output element
//! and value of its inner axis. Other ops (softmax's `exp`, norms, rope)
//! are left out: next to the contractions of a decode step they are a few
//! per output element, not per multiply-add.
//!
//! Bifurcation moves no multiply-add (the context and decode einsums sum
//! over the two parts of what one einsum summed over), so baseline and
//! bifurcated graphs count the same: divided by a machine's peak rate
//! it is the least time either step can take there.

use super::point::ShapePoint;
use crate::ir::{shape::numel, Graph, Op, Value};

#[derive(Debug, thiserror::Error)]
#[error("multiply-add count: {0}")]
pub struct MacsError(String);

/// Multiply-adds of one step of `graph` at `point` (which binds every
/// runtime dim).
pub fn multiply_adds(graph: &Graph, point: &ShapePoint) -> Result<f64, MacsError> {
    (0..graph.nodes.len()).map(|j| node_multiply_adds(graph, j, point)).sum()
}

/// Multiply-adds of node `j` of `graph` at `point`: 0 for a node that is
/// not a contraction.
pub fn node_multiply_adds(graph: &Graph, j: usize, point: &ShapePoint) -> Result<f64, MacsError> {
    let size = |v: Value, axis: usize| -> Result<f64, MacsError> {
        let shape = graph.shape_of(v);
        let d = shape.get(axis).ok_or_else(|| MacsError(format!("{} has no axis {axis}", graph.name_of(v))))?;
        let n = graph.dims.eval(d, &point.0).map_err(|e| MacsError(format!("{}: {e}", graph.name_of(v))))?;
        Ok(n as f64)
    };
    let Some(node) = graph.nodes.get(j) else { return Err(MacsError(format!("no node {j}"))) };
    let inner = match &node.op {
        Op::Einsum(spec) => {
            let mut summed = Vec::new();
            for (letters, &input) in spec.inputs.iter().zip(&node.inputs) {
                for (axis, c) in letters.iter().enumerate() {
                    if !spec.output.contains(c) && !summed.iter().any(|(s, _)| s == c) {
                        summed.push((*c, size(input, axis)?));
                    }
                }
            }
            summed.iter().map(|(_, n)| n).product::<f64>()
        }
        Op::MatMul { .. } => {
            let a = node.inputs.first().copied().ok_or_else(|| MacsError(format!("{}: no operands", node.id)))?;
            let rank = graph.shape_of(a).len();
            size(a, rank.checked_sub(1).ok_or_else(|| MacsError(format!("{}: scalar operand", node.id)))?)?
        }
        _ => return Ok(0.0),
    };
    let out = numel(&graph.dims, &node.shape).map_err(MacsError)?;
    let out = graph.dims.eval(&out, &point.0).map_err(|e| MacsError(format!("{}: {e}", node.id)))?;
    Ok(out as f64 * inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(doc: serde_json::Value) -> Graph {
        crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(b: i64, m: i64) -> ShapePoint {
        ShapePoint([("b".to_string(), b), ("m".to_string(), m)].into())
    }

    /// An attention's two einsums and a projection, counted by hand.
    #[test]
    fn contractions_count_output_times_summed() {
        let g = graph(serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 8, "d": 16}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "f32"},
                {"name": "w", "role": "weight", "shape": ["h*k", "d"], "dtype": "f32"},
                {"name": "kc", "role": "activation", "shape": ["h", "m", "k"], "dtype": "f32"},
                {"name": "vc", "role": "activation", "shape": ["h", "m", "k"], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "q", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}},
                {"id": "qh", "op": "reshape", "inputs": ["q"], "attrs": {"shape": ["b", "h", "k"]}},
                {"id": "s", "op": "einsum", "inputs": ["qh", "kc"], "attrs": {"spec": "bhk,hmk->bhm"}},
                {"id": "p", "op": "softmax", "inputs": ["s"], "attrs": {"axis": 2}},
                {"id": "o", "op": "einsum", "inputs": ["p", "vc"], "attrs": {"spec": "bhm,hmk->bhk"}}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        }));
        for (b, m) in [(1, 1), (3, 5), (32, 8192)] {
            let want = b * 16 * 16 + 2 * (b * 2 * m * 8);
            assert_eq!(multiply_adds(&g, &at(b, m)).unwrap_or_else(|e| panic!("{e}")), want as f64, "b={b}, m={m}");
        }
    }

    /// Bifurcation moves no multiply-add: the example's optimized graph
    /// counts what its baseline does, at the point it was optimized for
    /// and at others.
    #[test]
    fn bifurcation_keeps_the_count() {
        let text = include_str!("../../examples/tiny/model.json");
        let g = crate::import::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let point = |b: i64, m_c: i64, m_d: i64| {
            ShapePoint([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)].into())
        };
        let opts = crate::optimize::Options { point: point(32, 8192, 16), ..Default::default() };
        let optimized = crate::optimize::optimize(&g, &opts).unwrap_or_else(|e| panic!("{e}")).graph;
        assert_ne!(g.nodes.len(), optimized.nodes.len(), "nothing was bifurcated");
        for p in [point(32, 8192, 16), point(1, 100, 0), point(7, 33, 5)] {
            let (base, bif) = (multiply_adds(&g, &p), multiply_adds(&optimized, &p));
            let (base, bif) = (base.unwrap_or_else(|e| panic!("{e}")), bif.unwrap_or_else(|e| panic!("{e}")));
            assert!(base > 0.0 && base == bif, "{p}: {base} vs {bif}");
        }
    }
}
