//! [`Graph`] → model.json, and the layout every model.json we write uses:
//! top-level sections on their own lines, one input / node / output per line,
//! so a graph diffs and greps well. Output is deterministic.

use crate::ir::{fmt_shape, Graph, Op, OutputRole, Poly, Role, UnaryOp, Value, FORMAT};
use serde_json::{json, Map, Value as Json};

/// Pretty-prints a model.json document: objects and arrays nest over lines
/// down to the items of top-level arrays, which stay on one line each.
pub fn to_string(doc: &Json) -> String {
    let mut out = String::new();
    write_value(doc, 0, &mut out);
    out.push('\n');
    out
}

fn write_value(v: &Json, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth + 1);
    let end_pad = "  ".repeat(depth);
    match v {
        Json::Object(map) if depth < 2 && !map.is_empty() => {
            out.push_str("{\n");
            for (i, (k, val)) in map.iter().enumerate() {
                out.push_str(&pad);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                write_value(val, depth + 1, out);
                if i + 1 < map.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&end_pad);
            out.push('}');
        }
        Json::Array(items) if depth < 2 && !items.is_empty() => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad);
                write_value(item, depth + 1, out);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&end_pad);
            out.push(']');
        }
        other => out.push_str(&spaced(other)),
    }
}

/// One-line JSON with a space after `:` and `,` for readability.
fn spaced(v: &Json) -> String {
    match v {
        Json::Object(map) => {
            let parts: Vec<String> =
                map.iter().map(|(k, v)| format!("{}: {}", Json::String(k.clone()), spaced(v))).collect();
            format!("{{{}}}", parts.join(", "))
        }
        Json::Array(items) => {
            let parts: Vec<String> = items.iter().map(spaced).collect();
            format!("[{}]", parts.join(", "))
        }
        other => other.to_string(),
    }
}

/// A size as JSON: a plain integer when constant, else the expression text.
pub fn size_json(p: &Poly) -> Json {
    match p.as_constant() {
        Some(c) => json!(c),
        None => json!(p.to_string()),
    }
}

fn shape_json(shape: &[Poly]) -> Json {
    Json::Array(shape.iter().map(size_json).collect())
}

fn attrs_json(op: &Op) -> Map<String, Json> {
    let mut m = Map::new();
    match op {
        Op::Einsum(spec) => {
            m.insert("spec".into(), json!(spec.to_string()));
        }
        Op::MatMul { transpose_b } => {
            if *transpose_b {
                m.insert("transpose_b".into(), json!(true));
            }
        }
        Op::Concat { axis } | Op::Softmax { axis } => {
            m.insert("axis".into(), json!(axis));
        }
        Op::Broadcast { shape } | Op::Reshape { shape } => {
            m.insert("shape".into(), shape_json(shape));
        }
        Op::Slice { axis, start, end } => {
            m.insert("axis".into(), json!(axis));
            m.insert("start".into(), size_json(start));
            m.insert("end".into(), size_json(end));
        }
        Op::Transpose { perm } => {
            m.insert("perm".into(), json!(perm));
        }
        Op::Unary(UnaryOp::GeluTanh) => {
            m.insert("approximate".into(), json!("tanh"));
        }
        Op::Unary(_) | Op::Binary(_) | Op::Gather => {}
        Op::Reduce { axes, keepdims, .. } => {
            m.insert("axes".into(), json!(axes));
            if *keepdims {
                m.insert("keepdims".into(), json!(true));
            }
        }
        Op::RmsNorm { eps } | Op::LayerNorm { eps } => {
            m.insert("eps".into(), json!(eps));
        }
        Op::Rope { theta } => {
            m.insert("theta".into(), json!(theta));
        }
        Op::Scale { value } => {
            m.insert("value".into(), json!(value));
        }
        Op::Constant { value, shape } => {
            m.insert("value".into(), json!(value));
            m.insert("shape".into(), shape_json(shape));
        }
        Op::CausalMask { query, key, offset } => {
            m.insert("query".into(), size_json(query));
            m.insert("key".into(), size_json(key));
            m.insert("offset".into(), size_json(offset));
        }
    }
    m
}

/// The model.json document of a graph. Importing it gives the same graph.
pub fn to_json(g: &Graph) -> Json {
    let constants: Map<String, Json> = g.dims.constants.iter().map(|(n, v)| (n.clone(), json!(v))).collect();
    let inputs: Vec<Json> = g
        .inputs
        .iter()
        .map(|i| {
            let mut m = Map::new();
            m.insert("name".into(), json!(i.name));
            m.insert("role".into(), json!(i.role.name()));
            if let Role::ContextKv { layer, kv } | Role::DecodeKv { layer, kv } = i.role {
                m.insert("layer".into(), json!(layer));
                m.insert("kv".into(), json!(kv.name()));
            }
            m.insert("shape".into(), shape_json(&i.shape));
            m.insert("dtype".into(), json!(i.dtype.name()));
            Json::Object(m)
        })
        .collect();
    let nodes: Vec<Json> = g
        .nodes
        .iter()
        .map(|n| {
            let mut m = Map::new();
            m.insert("id".into(), json!(n.id));
            m.insert("op".into(), json!(n.op.name()));
            let ins: Vec<&str> = n.inputs.iter().map(|v| g.name_of(*v)).collect();
            m.insert("inputs".into(), json!(ins));
            let attrs = attrs_json(&n.op);
            if !attrs.is_empty() {
                m.insert("attrs".into(), Json::Object(attrs));
            }
            m.insert("dtype".into(), json!(n.dtype.name()));
            Json::Object(m)
        })
        .collect();
    let outputs: Vec<Json> = g
        .outputs
        .iter()
        .map(|o| {
            let mut m = Map::new();
            m.insert("name".into(), json!(o.name));
            m.insert("node".into(), json!(g.name_of(o.value)));
            m.insert("role".into(), json!(o.role.name()));
            if let OutputRole::NewKv { layer, kv } = o.role {
                m.insert("layer".into(), json!(layer));
                m.insert("kv".into(), json!(kv.name()));
            }
            Json::Object(m)
        })
        .collect();
    let mut doc = Map::new();
    doc.insert("format".into(), json!(FORMAT));
    if !g.meta.is_empty() {
        doc.insert("meta".into(), json!(g.meta));
    }
    doc.insert("dims".into(), json!({"runtime": g.dims.runtime, "constants": constants}));
    doc.insert("inputs".into(), Json::Array(inputs));
    doc.insert("nodes".into(), Json::Array(nodes));
    doc.insert("outputs".into(), Json::Array(outputs));
    Json::Object(doc)
}

/// A short description of a value for reports: `name [shape] dtype`.
pub fn describe(g: &Graph, v: Value) -> String {
    format!("{} {} {}", g.name_of(v), fmt_shape(g.shape_of(v)), g.dtype_of(v))
}
