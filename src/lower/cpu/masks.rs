//! Causal masks that mask nothing.
//!
//! A decode step's attention adds `causal_mask(query: n, key: m_c + m_d +
//! n, offset: m_c + m_d)` to its scores. With one new token (`n = 1`)
//! every key is at or before the query (`j <= offset + i` holds for all
//! `j < key` once `key - offset <= 1`), so the mask is all zeros, and its
//! add leaves every score as it is (`x + 0 = x`, NaN and infinities
//! included; only `-0` becomes `+0`, which no softmax tells apart). The
//! softmax's max and sum passes still loaded a mask element and added it
//! for every score. The CPU step reads the scores directly instead.

use crate::ir::{Graph, Op, Value};

/// Whether node value `v` of `graph` is a causal mask of all zeros: every
/// key at or before every query (`key - offset` a constant of at most 1).
fn open_mask(graph: &Graph, v: Value) -> bool {
    let Value::Node(j) = v else { return false };
    let Op::CausalMask { key, offset, .. } = &graph.nodes[j].op else { return false };
    let span = key.sub(offset).ok().and_then(|d| graph.dims.normalize(&d).ok()).and_then(|d| d.as_constant());
    span.is_some_and(|d| d <= 1)
}

/// `graph` with every use of `add(x, mask)` (either order) of a mask of
/// all zeros ([`open_mask`]) reading `x` instead, where the add has `x`'s
/// shape and dtype (it neither broadcasts `x` nor converts it). The adds
/// and masks stay, unused (the plan gives dead nodes no kernel).
pub(super) fn skip_open_masks(graph: &Graph) -> Graph {
    // What each node's uses read instead, if anything.
    let mut instead: Vec<Option<Value>> = vec![None; graph.nodes.len()];
    for (j, node) in graph.nodes.iter().enumerate() {
        if node.op != Op::Binary(crate::ir::BinaryOp::Add) {
            continue;
        }
        let x = match node.inputs.as_slice() {
            [x, m] | [m, x] if open_mask(graph, *m) && !open_mask(graph, *x) => *x,
            _ => continue,
        };
        let same_shape = graph.dims.same_shape(graph.shape_of(x), &node.shape);
        if same_shape && graph.dtype_of(x) == node.dtype {
            // `x` comes earlier: its own replacement is already known.
            instead[j] = Some(resolve(&instead, x));
        }
    }
    if instead.iter().all(Option::is_none) {
        return graph.clone();
    }
    let mut out = graph.clone();
    for node in &mut out.nodes {
        for v in &mut node.inputs {
            *v = resolve(&instead, *v);
        }
    }
    for o in &mut out.outputs {
        o.value = resolve(&instead, o.value);
    }
    out
}

fn resolve(instead: &[Option<Value>], v: Value) -> Value {
    match v {
        Value::Node(j) => instead.get(j).copied().flatten().unwrap_or(v),
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::emit::testing;

    /// A decode step's mask (one new token) is skipped, a prefill step's
    /// (three) is not; the step's outputs match the interpreter's either
    /// way, the fully masked rows of the prefill included.
    #[test]
    fn only_masks_of_one_query_are_skipped() {
        for (n, skipped) in [(1, true), (3, false)] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "n": n}},
                "inputs": [{"name": "s", "role": "activation", "shape": ["b", "h", "n", "m+n"], "dtype": "f32"}],
                "nodes": [
                    {"id": "mask", "op": "causal_mask", "attrs": {"query": "n", "key": "m+n", "offset": "m"}},
                    {"id": "masked", "op": "add", "inputs": ["s", "mask"]},
                    {"id": "p", "op": "softmax", "inputs": ["masked"], "attrs": {"axis": 3}}
                ],
                "outputs": [{"name": "p", "node": "p"}]
            });
            let (graph, step, _) = testing::cpu_step(&doc);
            // The graph the step compiled.
            let compiled = step.graph();
            let p = compiled.find("p").unwrap_or_else(|| panic!("p"));
            let Value::Node(j) = p else { panic!("p is a node") };
            let reads = compiled.nodes[j].inputs[0];
            assert_eq!(reads == Value::Input(0), skipped, "n = {n}: the softmax reads {reads:?}");
            assert_eq!(skip_open_masks(&graph).nodes[j].inputs, compiled.nodes[j].inputs);
            for (b, m) in [(1, 1), (3, 17), (2, 40)] {
                let at = testing::point(&[("b", b), ("m", m)]);
                testing::check_output(&graph, &step, &at, 4, "p", (1e-6, 1e-6));
            }
        }
    }
}
