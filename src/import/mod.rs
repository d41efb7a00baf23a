//! model.json → checked [`Graph`]. Syntax errors carry line and column;
//! every other error names the JSON path (and the node id) at fault.
//! See docs/model-format.md for the format and the list of messages.

mod attrs;
mod json;

use crate::ir::shape::{check_size, infer, Operand};
use crate::ir::{DType, Dims, Graph, Input, Kv, Node, Output, OutputRole, Poly, Role, Shape, Value, FORMAT};
use json::{err, At, Child, ROOT};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The OS error is part of the message (not a `source`), so callers that
    /// print `{e}` show it and error chains don't print it twice.
    #[error("cannot read {file}: {cause}")]
    Io { file: String, cause: std::io::Error },
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Json { line: usize, column: usize, message: String },
    #[error("{path}: {message}")]
    At { path: String, message: String },
}

impl ImportError {
    /// Adds the node id to an error raised inside `nodes[i]`.
    fn in_node(self, id: &str) -> Self {
        match self {
            ImportError::At { path, message } => ImportError::At { path: format!("{path} (node `{id}`)"), message },
            other => other,
        }
    }
}

/// Reads and checks a model.json file.
pub fn load(path: &Path) -> Result<Graph, ImportError> {
    let text =
        std::fs::read_to_string(path).map_err(|cause| ImportError::Io { file: path.display().to_string(), cause })?;
    parse(&text)
}

/// Parses and checks model.json text.
pub fn parse(text: &str) -> Result<Graph, ImportError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        // serde_json appends " at line L column C"; we print those separately.
        let message = message.split(" at line ").next().unwrap_or(&message).to_string();
        ImportError::Json { line: e.line(), column: e.column(), message }
    })?;
    from_value(&value)
}

/// Checks an already-parsed JSON document.
pub fn from_value(value: &serde_json::Value) -> Result<Graph, ImportError> {
    let root = At { value, path: ROOT };
    root.object()?;
    root.only(&["format", "meta", "dims", "inputs", "nodes", "outputs"])?;
    let format = root.field("format")?;
    let tag = format.at().str()?;
    if tag != FORMAT {
        return Err(err(&format.path, format!("unsupported format `{tag}` (this bifurc reads `{FORMAT}`)")));
    }
    let meta = read_meta(&root)?;
    let dims = read_dims(&root.field("dims")?)?;
    let inputs = read_inputs(&dims, &root.field("inputs")?)?;
    let raw_nodes = read_raw_nodes(&root.field("nodes")?)?;
    let nodes = resolve_nodes(&dims, &inputs, raw_nodes)?;
    let mut graph = Graph { meta, dims, inputs, nodes, outputs: Vec::new() };
    graph.outputs = read_outputs(&graph, &root.field("outputs")?)?;
    Ok(graph)
}

fn read_meta(root: &At<'_, '_>) -> Result<BTreeMap<String, String>, ImportError> {
    let mut out = BTreeMap::new();
    if let Some(m) = root.opt("meta")? {
        for (k, v) in m.at().object()? {
            let child = Child { value: v, path: json::join(&m.path, k) };
            out.insert(k.clone(), child.at().str()?.to_string());
        }
    }
    Ok(out)
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn read_dims(d: &Child) -> Result<Dims, ImportError> {
    let at = d.at();
    at.only(&["runtime", "constants"])?;
    let mut dims = Dims::default();
    let mut seen = BTreeSet::new();
    for item in at.field("runtime")?.at().array()? {
        let name = item.at().str()?;
        if !is_ident(name) {
            return Err(err(&item.path, format!("dim name `{name}` is not an identifier")));
        }
        if !seen.insert(name.to_string()) {
            return Err(err(&item.path, format!("dim `{name}` is declared twice")));
        }
        dims.runtime.push(name.to_string());
    }
    if let Some(c) = at.opt("constants")? {
        for (name, v) in c.at().object()? {
            let path = json::join(&c.path, name);
            let child = At { value: v, path: &path };
            if !is_ident(name) {
                return Err(err(&path, format!("dim name `{name}` is not an identifier")));
            }
            if !seen.insert(name.clone()) {
                return Err(err(&path, format!("dim `{name}` is declared twice")));
            }
            let value = child.i64()?;
            if value <= 0 {
                return Err(err(&path, format!("dim `{name}` = {value} must be positive")));
            }
            dims.constants.push((name.clone(), value));
        }
    }
    Ok(dims)
}

/// A size written in JSON: an integer or an expression over declared dims.
pub(crate) fn read_size(dims: &Dims, at: &At<'_, '_>) -> Result<Poly, ImportError> {
    let p = match at.value {
        serde_json::Value::String(s) => Poly::parse(s).map_err(|e| err(at.path, format!("bad size `{s}`: {e}")))?,
        serde_json::Value::Number(_) => Poly::constant(at.i64()?),
        other => {
            return Err(err(
                at.path,
                format!("expected a size (integer or expression string), got {}", json::type_name(other)),
            ))
        }
    };
    for s in p.symbols() {
        if !dims.is_known(s) {
            return Err(err(at.path, format!("unknown dim `{s}` (declare it under `dims`)")));
        }
    }
    Ok(p)
}

/// A shape: an array of positive sizes.
pub(crate) fn read_shape(dims: &Dims, at: &At<'_, '_>) -> Result<Shape, ImportError> {
    let mut out = Vec::new();
    for item in at.array()? {
        let p = read_size(dims, &item.at())?;
        check_size(dims, &p).map_err(|m| err(&item.path, m))?;
        out.push(p);
    }
    Ok(out)
}

fn read_dtype(at: &At<'_, '_>) -> Result<DType, ImportError> {
    let s = at.str()?;
    DType::parse(s).map_err(|_| err(at.path, format!("unknown dtype `{s}` (expected f32, f16, bf16, i32 or i64)")))
}

fn read_kv_tag(at: &At<'_, '_>) -> Result<(usize, Kv), ImportError> {
    let layer_field = at.field("layer")?;
    let layer = layer_field.at().i64()?;
    let layer = usize::try_from(layer).map_err(|_| err(&layer_field.path, format!("layer {layer} is negative")))?;
    let kv_field = at.field("kv")?;
    let kv = match kv_field.at().str()? {
        "k" => Kv::K,
        "v" => Kv::V,
        other => return Err(err(&kv_field.path, format!("kv must be \"k\" or \"v\", got `{other}`"))),
    };
    Ok((layer, kv))
}

fn read_inputs(dims: &Dims, list: &Child) -> Result<Vec<Input>, ImportError> {
    let mut out = Vec::new();
    for item in list.at().array()? {
        let at = item.at();
        at.only(&["name", "role", "shape", "dtype", "layer", "kv"])?;
        let name = at.field("name")?.at().str()?.to_string();
        let role_field = at.field("role")?;
        let role = match role_field.at().str()? {
            "token_ids" => Role::TokenIds,
            "activation" => Role::Activation,
            "weight" => Role::Weight,
            "position" => Role::Position,
            "context_kv" => {
                let (layer, kv) = read_kv_tag(&at)?;
                Role::ContextKv { layer, kv }
            }
            "decode_kv" => {
                let (layer, kv) = read_kv_tag(&at)?;
                Role::DecodeKv { layer, kv }
            }
            other => {
                return Err(err(
                    &role_field.path,
                    format!(
                        "unknown role `{other}` (expected token_ids, activation, weight, position, context_kv or decode_kv)"
                    ),
                ))
            }
        };
        let shape = read_shape(dims, &at.field("shape")?.at())?;
        let dtype = read_dtype(&at.field("dtype")?.at())?;
        out.push(Input { name, role, shape, dtype });
    }
    Ok(out)
}

/// A node as written, before references are resolved.
struct RawNode<'a> {
    index: usize,
    path: String,
    id: String,
    op: &'a str,
    op_path: String,
    inputs: Vec<(String, String)>,
    attrs: Option<Child<'a>>,
    dtype: Option<DType>,
}

fn read_raw_nodes<'a>(list: &Child<'a>) -> Result<Vec<RawNode<'a>>, ImportError> {
    let mut out = Vec::new();
    for (index, item) in list.at().array()?.into_iter().enumerate() {
        let at = item.at();
        at.only(&["id", "op", "inputs", "attrs", "dtype"])?;
        let id = at.field("id")?.at().str()?.to_string();
        let wrap = |e: ImportError| e.in_node(&id);
        let op_field = at.field("op").map_err(wrap)?;
        let op = op_field.at().str().map_err(wrap)?;
        let mut inputs = Vec::new();
        if let Some(list) = at.opt("inputs").map_err(wrap)? {
            for r in list.at().array().map_err(wrap)? {
                inputs.push((r.at().str().map_err(wrap)?.to_string(), r.path.clone()));
            }
        }
        let attrs = at.opt("attrs").map_err(wrap)?;
        if let Some(a) = &attrs {
            a.at().object().map_err(wrap)?;
        }
        let dtype = match at.opt("dtype").map_err(wrap)? {
            Some(d) => Some(read_dtype(&d.at()).map_err(wrap)?),
            None => None,
        };
        out.push(RawNode { index, path: item.path.clone(), id, op, op_path: op_field.path, inputs, attrs, dtype });
    }
    Ok(out)
}

/// Resolves names, rejects duplicates, undefined references and cycles,
/// orders nodes topologically (stable: file order where possible) and infers
/// every shape.
fn resolve_nodes(dims: &Dims, inputs: &[Input], raw: Vec<RawNode>) -> Result<Vec<Node>, ImportError> {
    let mut names: HashMap<&str, Value> = HashMap::new();
    for (i, inp) in inputs.iter().enumerate() {
        if names.insert(&inp.name, Value::Input(i)).is_some() {
            return Err(err(&format!("inputs[{i}].name"), format!("duplicate name `{}`", inp.name)));
        }
    }
    for r in &raw {
        if names.insert(&r.id, Value::Node(r.index)).is_some() {
            return Err(err(
                &format!("{}.id", r.path),
                format!("duplicate id `{}` (already used by an input or node)", r.id),
            ));
        }
    }
    // Raw references → values (node values are raw indices for now).
    let mut refs: Vec<Vec<Value>> = Vec::with_capacity(raw.len());
    for r in &raw {
        let mut v = Vec::new();
        for (name, path) in &r.inputs {
            let value = names
                .get(name.as_str())
                .copied()
                .ok_or_else(|| err(path, format!("reference to undefined value `{name}`")).in_node(&r.id))?;
            v.push(value);
        }
        refs.push(v);
    }
    let order = topo_order(&raw, &refs)?;
    let mut new_index = vec![usize::MAX; raw.len()];
    let mut nodes: Vec<Node> = Vec::with_capacity(raw.len());
    for &ri in &order {
        let r = &raw[ri];
        let ins: Vec<Value> = refs[ri]
            .iter()
            .map(|v| match v {
                Value::Node(j) => Value::Node(new_index[*j]),
                other => *other,
            })
            .collect();
        let operands: Vec<Operand> = ins
            .iter()
            .map(|v| match v {
                Value::Input(i) => Operand { shape: &inputs[*i].shape, dtype: inputs[*i].dtype },
                Value::Node(j) => Operand { shape: &nodes[*j].shape, dtype: nodes[*j].dtype },
            })
            .collect();
        let rank = operands.first().map_or(0, |o| o.shape.len());
        let op =
            attrs::read_op(dims, r.op, &r.op_path, &r.path, r.attrs.as_ref(), rank).map_err(|e| e.in_node(&r.id))?;
        let (shape, inferred) = infer(dims, &op, &operands).map_err(|m| err(&r.path, m).in_node(&r.id))?;
        for d in &shape {
            check_size(dims, d).map_err(|m| err(&r.path, format!("result {}", m)).in_node(&r.id))?;
        }
        let dtype = match r.dtype {
            Some(d) if d.is_float() != inferred.is_float() => {
                return Err(err(
                    &format!("{}.dtype", r.path),
                    format!("dtype {d} conflicts with the inferred {inferred}"),
                )
                .in_node(&r.id))
            }
            Some(d) => d,
            None => inferred,
        };
        new_index[ri] = nodes.len();
        nodes.push(Node { id: r.id.clone(), op, inputs: ins, shape, dtype });
    }
    Ok(nodes)
}

fn topo_order(raw: &[RawNode], refs: &[Vec<Value>]) -> Result<Vec<usize>, ImportError> {
    let n = raw.len();
    let mut indegree = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, r) in refs.iter().enumerate() {
        for v in r {
            if let Value::Node(j) = v {
                indegree[i] += 1;
                users[*j].push(i);
            }
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indegree[u] -= 1;
            if indegree[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() < n {
        let stuck = cycle_members(refs, &indegree);
        return Err(err(&raw[stuck[0]].path, format!("cycle through nodes {}", fmt_ids(raw, &stuck))));
    }
    Ok(order)
}

/// Walks back from an unsorted node until a node repeats: that loop is a cycle.
fn cycle_members(refs: &[Vec<Value>], indegree: &[usize]) -> Vec<usize> {
    let start = indegree.iter().position(|&d| d > 0).unwrap_or(0);
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let next = refs[cur].iter().find_map(|v| match v {
            Value::Node(j) if indegree[*j] > 0 => Some(*j),
            _ => None,
        });
        let Some(next) = next else { return path };
        if let Some(pos) = path.iter().position(|&p| p == next) {
            let mut cycle = path[pos..].to_vec();
            cycle.reverse();
            return cycle;
        }
        path.push(next);
        cur = next;
    }
}

fn fmt_ids(raw: &[RawNode], idx: &[usize]) -> String {
    let mut parts: Vec<String> = idx.iter().map(|&i| format!("`{}`", raw[i].id)).collect();
    parts.push(format!("`{}`", raw[idx[0]].id));
    parts.join(" -> ")
}

fn read_outputs(graph: &Graph, list: &Child) -> Result<Vec<Output>, ImportError> {
    let mut out: Vec<Output> = Vec::new();
    let items = list.at().array()?;
    if items.is_empty() {
        return Err(err(&list.path, "a graph needs at least one output"));
    }
    for item in items {
        let at = item.at();
        at.only(&["name", "node", "role", "layer", "kv"])?;
        let name = at.field("name")?.at().str()?.to_string();
        if out.iter().any(|o| o.name == name) {
            return Err(err(&item.path, format!("duplicate output name `{name}`")));
        }
        let node_field = at.field("node")?;
        let node = node_field.at().str()?;
        let value = graph.find(node).ok_or_else(|| {
            err(&node_field.path, format!("output `{name}` names `{node}`, which is no node or input"))
        })?;
        let role = match at.opt("role")? {
            None => OutputRole::Other,
            Some(r) => match r.at().str()? {
                "logits" => OutputRole::Logits,
                "other" => OutputRole::Other,
                "new_kv" => {
                    let (layer, kv) = read_kv_tag(&at)?;
                    OutputRole::NewKv { layer, kv }
                }
                other => {
                    return Err(err(
                        &r.path,
                        format!("unknown output role `{other}` (expected logits, new_kv or other)"),
                    ))
                }
            },
        };
        out.push(Output { name, value, role });
    }
    Ok(out)
}
