//! The bytes model on small hand-written graphs: broadcast over a runtime dim
//! is paid per sample, over a constant (heads of a KV group) it is not;
//! gather reads only the rows it picks.

use bifurc::inspect::{bytes_moved, ShapePoint};

fn graph(nodes: &str, inputs: &str, consts: &str) -> bifurc::ir::Graph {
    let text = format!(
        r#"{{"format": "bifurc-graph/1",
            "dims": {{"runtime": ["b", "m_c"], "constants": {{{consts}}}}},
            "inputs": [{inputs}], "nodes": [{nodes}],
            "outputs": [{{"name": "y", "node": "y"}}]}}"#
    );
    bifurc::import::parse(&text).expect("test graph is valid")
}

fn at(b: i64, m_c: i64) -> ShapePoint {
    ShapePoint::parse(&format!("b={b},m_c={m_c}")).expect("point")
}

#[test]
fn batch_broadcast_is_paid_per_sample_group_broadcast_is_not() {
    let g = graph(
        r#"{"id": "kb", "op": "broadcast", "inputs": ["kc"], "attrs": {"shape": ["b", "g", "m_c", "k"]}},
           {"id": "k5", "op": "reshape", "inputs": ["kb"], "attrs": {"shape": ["b", "g", 1, "m_c", "k"]}},
           {"id": "kp", "op": "broadcast", "inputs": ["k5"], "attrs": {"shape": ["b", "g", "p", "m_c", "k"]}},
           {"id": "kh", "op": "reshape", "inputs": ["kp"], "attrs": {"shape": ["b", "g*p", "m_c", "k"]}},
           {"id": "y", "op": "einsum", "inputs": ["q", "kh"], "attrs": {"spec": "bhk,bhmk->bhm"}}"#,
        r#"{"name": "q", "role": "activation", "shape": ["b", "g*p", "k"], "dtype": "f32"},
           {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["g", "m_c", "k"], "dtype": "bf16"}"#,
        r#""g": 2, "p": 4, "k": 8"#,
    );
    let bytes = bytes_moved(&g, &at(3, 10)).expect("bytes");
    assert_eq!(bytes.context_kv, (3 * 2 * 10 * 8 * 2) as f64, "once per sample and KV group");
    // q read (3*8*8 f32) + y written (3*8*10 f32).
    assert_eq!(bytes.activations, (3 * 8 * 8 * 4 + 3 * 8 * 10 * 4) as f64);
}

#[test]
fn gather_reads_only_picked_rows() {
    let g = graph(
        r#"{"id": "y", "op": "gather", "inputs": ["table", "ids"]}"#,
        r#"{"name": "table", "role": "weight", "shape": ["vocab", "d"], "dtype": "f32"},
           {"name": "ids", "role": "token_ids", "shape": ["b"], "dtype": "i32"}"#,
        r#""vocab": 1000, "d": 16"#,
    );
    let bytes = bytes_moved(&g, &at(5, 1)).expect("bytes");
    assert_eq!(bytes.weights, (5 * 16 * 4) as f64);
}
