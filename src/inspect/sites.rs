//! Attention sites that read a batch-broadcast context cache: compute ops
//! whose operand reaches a `context_kv` input through a broadcast that
//! stretches an axis of runtime size (one copy per sample). These are the
//! sites the optimizer can bifurcate.

use crate::ir::{Graph, Op, Role, Value};

/// One compute op reading the shared context through a per-sample broadcast.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// The consuming compute node (a matmul or einsum in practice).
    pub node: usize,
    /// Which of its operands reaches the context cache.
    pub operand: usize,
    /// The `context_kv` input read.
    pub context: usize,
    /// The broadcast node that copies it per sample.
    pub broadcast: usize,
}

/// True when the broadcast stretches some axis whose size involves a runtime dim.
pub fn is_batch_broadcast(graph: &Graph, node: usize) -> bool {
    let n = &graph.nodes[node];
    let Op::Broadcast { shape } = &n.op else { return false };
    let src = graph.shape_of(n.inputs[0]);
    let new_axes = shape.len() - src.len();
    shape.iter().enumerate().any(|(i, t)| {
        let stretched = i < new_axes || !graph.dims.same(&src[i - new_axes], t);
        stretched && graph.dims.normalize(t).ok().and_then(|p| p.as_constant()).is_none()
    })
}

fn walk(graph: &Graph, v: Value, via: Option<usize>, out: &mut Vec<(usize, usize)>) {
    match v {
        Value::Input(i) => {
            if let (Role::ContextKv { .. }, Some(b)) = (graph.inputs[i].role, via) {
                out.push((i, b));
            }
        }
        Value::Node(j) if graph.nodes[j].op.is_view() => {
            let via = if via.is_none() && is_batch_broadcast(graph, j) { Some(j) } else { via };
            for &x in &graph.nodes[j].inputs {
                walk(graph, x, via, out);
            }
        }
        Value::Node(_) => {}
    }
}

/// Every site, in node order.
pub fn find_sites(graph: &Graph) -> Vec<Site> {
    let mut sites = Vec::new();
    for (node, n) in graph.nodes.iter().enumerate() {
        if n.op.is_view() {
            continue;
        }
        for (operand, &v) in n.inputs.iter().enumerate() {
            let mut found = Vec::new();
            walk(graph, v, None, &mut found);
            for (context, broadcast) in found {
                sites.push(Site { node, operand, context, broadcast });
            }
        }
    }
    sites
}
