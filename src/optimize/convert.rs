//! [`Graph`] ⇄ the optimizer's [`Problem`] / [`Solution`].

use crate::ir::{BinaryOp, DType, EinsumSpec, Graph, Node, Op, Output, Value};
use bifurc_passes::{Dtype, Kind, Leaf, Problem, Ref, Solution};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};

fn dtype(d: DType) -> Dtype {
    Dtype { name: d.name().into(), bytes: d.size() as u32 }
}

fn kind(op: &Op) -> Kind {
    match op {
        Op::Einsum(spec) => Kind::Einsum(spec.to_string()),
        Op::MatMul { transpose_b } => Kind::MatMul { transpose_b: *transpose_b },
        Op::Concat { axis } => Kind::Concat(*axis),
        Op::Broadcast { shape } => Kind::Broadcast(shape.clone()),
        Op::Slice { axis, start, end } => Kind::Slice { axis: *axis, start: start.clone(), end: end.clone() },
        Op::Reshape { shape } => Kind::Reshape(shape.clone()),
        Op::Transpose { perm } => Kind::Transpose(perm.clone()),
        Op::Binary(BinaryOp::Add) => Kind::Add,
        Op::Gather => Kind::Opaque { gather: true },
        _ => Kind::Opaque { gather: false },
    }
}

fn to_ref(v: Value) -> Ref {
    match v {
        Value::Input(i) => Ref::Leaf(i),
        Value::Node(i) => Ref::Node(i),
    }
}

/// The optimizer's view of `graph`, with bytes counted at `point`.
pub fn to_problem(graph: &Graph, point: &BTreeMap<String, i64>) -> Problem {
    Problem {
        constants: graph.dims.constants.iter().cloned().collect(),
        point: point.clone(),
        leaves: graph
            .inputs
            .iter()
            .map(|i| Leaf { name: i.name.clone(), shape: i.shape.clone(), dtype: dtype(i.dtype) })
            .collect(),
        nodes: graph
            .nodes
            .iter()
            .map(|n| bifurc_passes::Node {
                kind: kind(&n.op),
                inputs: n.inputs.iter().map(|v| to_ref(*v)).collect(),
                shape: n.shape.clone(),
                dtype: dtype(n.dtype),
            })
            .collect(),
        roots: graph.outputs.iter().map(|o| to_ref(o.value)).collect(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("optimizer produced an invalid graph (a bug in bifurc): {0}")]
pub struct ConvertError(pub String);

fn op_of(graph: &Graph, s: &bifurc_passes::SNode) -> Result<Op, ConvertError> {
    Ok(match &s.kind {
        Kind::Einsum(spec) => Op::Einsum(EinsumSpec::parse(spec).map_err(ConvertError)?),
        Kind::MatMul { transpose_b } => Op::MatMul { transpose_b: *transpose_b },
        Kind::Concat(axis) => Op::Concat { axis: *axis },
        Kind::Broadcast(shape) => Op::Broadcast { shape: shape.clone() },
        Kind::Slice { axis, start, end } => Op::Slice { axis: *axis, start: start.clone(), end: end.clone() },
        Kind::Reshape(shape) => Op::Reshape { shape: shape.clone() },
        Kind::Transpose(perm) => Op::Transpose { perm: perm.clone() },
        Kind::Add => Op::Binary(BinaryOp::Add),
        Kind::Opaque { .. } => {
            let i = s.opaque_of.ok_or_else(|| ConvertError("opaque node without origin".into()))?;
            graph.nodes.get(i).ok_or_else(|| ConvertError(format!("opaque origin {i} out of range")))?.op.clone()
        }
    })
}

/// Builds the optimized graph: kept nodes keep their ids; a node that now
/// computes an original node's value differently takes that node's id; new
/// nodes are named after the node that consumes them (`l0.attn.scores.einsum1`).
/// Nodes are ordered like the original (new nodes just before their first
/// consumer), so an unchanged solution gives back the same graph.
pub fn from_solution(graph: &Graph, sol: &Solution) -> Result<Graph, ConvertError> {
    let n = sol.nodes.len();
    let mut parent: Vec<Option<usize>> = vec![None; n];
    for (i, s) in sol.nodes.iter().enumerate() {
        for r in &s.inputs {
            if let Ref::Node(j) = r {
                parent[*j].get_or_insert(i);
            }
        }
    }
    // Names and order keys, parents before children (reverse topological order).
    let mut taken: HashSet<String> = graph.inputs.iter().map(|i| i.name.clone()).collect();
    taken.extend(sol.nodes.iter().filter_map(|s| s.origin.map(|o| graph.nodes[o].id.clone())));
    let mut names: Vec<String> = vec![String::new(); n];
    let mut keys: Vec<usize> = vec![usize::MAX; n];
    let mut anchor: Vec<Option<usize>> = vec![None; n];
    for i in (0..n).rev() {
        if let Some(o) = sol.nodes[i].origin {
            names[i] = graph.nodes[o].id.clone();
            keys[i] = o;
            anchor[i] = Some(i);
            continue;
        }
        let p = parent[i].ok_or_else(|| ConvertError(format!("new node {i} has no consumer")))?;
        keys[i] = keys[p];
        anchor[i] = anchor[p];
    }
    // Number new nodes per (anchor, kind) in graph order: `l0.attn.context.einsum1` is the first.
    let mut counters: BTreeMap<(usize, &'static str), usize> = BTreeMap::new();
    for i in 0..n {
        let (Some(a), None) = (anchor[i], sol.nodes[i].origin) else { continue };
        let kind = kind_name(&sol.nodes[i].kind);
        let c = counters.entry((a, kind)).or_insert(0);
        names[i] = loop {
            *c += 1;
            let candidate = format!("{}.{kind}{c}", names[a]);
            if !taken.contains(&candidate) {
                break candidate;
            }
        };
        taken.insert(names[i].clone());
    }
    // Kahn's algorithm, smallest (key, index) first.
    let mut indegree = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in sol.nodes.iter().enumerate() {
        for r in &s.inputs {
            if let Ref::Node(j) = r {
                indegree[i] += 1;
                users[*j].push(i);
            }
        }
    }
    let mut heap: BinaryHeap<Reverse<(usize, usize)>> =
        (0..n).filter(|&i| indegree[i] == 0).map(|i| Reverse((keys[i], i))).collect();
    let mut new_index = vec![usize::MAX; n];
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    while let Some(Reverse((_, i))) = heap.pop() {
        let s = &sol.nodes[i];
        let inputs: Vec<Value> = s
            .inputs
            .iter()
            .map(|r| match r {
                Ref::Leaf(l) => Value::Input(*l),
                Ref::Node(j) => Value::Node(new_index[*j]),
            })
            .collect();
        let mut dtype = DType::parse(s.dtype.name.as_str()).map_err(|e| ConvertError(e.to_string()))?;
        // Partial results the rewrite introduces (an einsum per part, the adds
        // that sum them) stay in f32 in a half-precision graph, so the split
        // does not round where the original accumulated in one piece; the
        // node that takes the original value back rounds once. When that
        // node is a view (grouped-query attention reshapes the sum back to
        // the heads), a view does not round: the last add, its only input,
        // does. Parts that are not summed but only moved into the original
        // (the scores' parts, concatenated) round where they are computed,
        // as the original would (`only_moved_into`).
        let feeds_original_view = matches!(s.kind, Kind::Add)
            && !sol.roots.contains(&Ref::Node(i))
            && matches!(users[i].as_slice(), [u] if sol.nodes[*u].origin.is_some() && is_view_kind(&sol.nodes[*u].kind));
        if s.origin.is_none()
            && matches!(s.kind, Kind::Einsum(_) | Kind::Add)
            && dtype.size() == 2
            && !feeds_original_view
            && !only_moved_into(sol, &users, i, s.dtype.name.as_str())
        {
            dtype = DType::F32;
        }
        // A new view (the concat of partial scores) has the dtype of what it views.
        if s.origin.is_none() && is_view_kind(&s.kind) {
            if let Some(Value::Node(first)) = inputs.first() {
                dtype = nodes[*first].dtype;
            }
        }
        new_index[i] = nodes.len();
        nodes.push(Node { id: names[i].clone(), op: op_of(graph, s)?, inputs, shape: s.shape.clone(), dtype });
        for &u in &users[i] {
            indegree[u] -= 1;
            if indegree[u] == 0 {
                heap.push(Reverse((keys[u], u)));
            }
        }
    }
    let outputs = graph
        .outputs
        .iter()
        .zip(&sol.roots)
        .map(|(o, r)| Output {
            name: o.name.clone(),
            value: match r {
                Ref::Leaf(l) => Value::Input(*l),
                Ref::Node(j) => Value::Node(new_index[*j]),
            },
            role: o.role,
        })
        .collect();
    Ok(Graph { meta: graph.meta.clone(), dims: graph.dims.clone(), inputs: graph.inputs.clone(), nodes, outputs })
}

/// Whether new node `i`'s values reach an original node of dtype `dtype`
/// only through views, each the one user of the one before: the context
/// and decode parts of a bifurcated attention's scores, concatenated (and,
/// with grouped-query heads, reshaped) back into the original scores. A
/// view moves elements and an element comes from one part, so rounding
/// each part to `dtype` where it is computed gives the bits the original
/// node's rounding gives, and the parts are stored at its width (half the
/// bytes of f32 scores in a bf16 model, and the softmax can then be
/// written over them on the CPU).
fn only_moved_into(sol: &Solution, users: &[Vec<usize>], i: usize, dtype: &str) -> bool {
    let mut at = i;
    loop {
        if sol.roots.contains(&Ref::Node(at)) {
            return false;
        }
        let [u] = users[at].as_slice() else { return false };
        let user = &sol.nodes[*u];
        if !is_view_kind(&user.kind) {
            return false;
        }
        if user.origin.is_some() {
            return user.dtype.name.as_str() == dtype;
        }
        at = *u;
    }
}

fn is_view_kind(k: &Kind) -> bool {
    matches!(k, Kind::Concat(_) | Kind::Broadcast(_) | Kind::Slice { .. } | Kind::Reshape(_) | Kind::Transpose(_))
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Einsum(_) => "einsum",
        Kind::MatMul { .. } => "matmul",
        Kind::Concat(_) => "concat",
        Kind::Broadcast(_) => "broadcast",
        Kind::Slice { .. } => "slice",
        Kind::Reshape(_) => "reshape",
        Kind::Transpose(_) => "transpose",
        Kind::Add => "add",
        Kind::Opaque { .. } => "op",
    }
}
