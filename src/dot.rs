//! Graphviz rendering of a decode graph (via petgraph), for `bifurc graph`.

use crate::ir::{fmt_shape, Graph, Role, Value};
use petgraph::dot::{Config, Dot};
use petgraph::graph::{DiGraph, NodeIndex};

/// The graph as Graphviz `dot` text: one box per node (`id`, op, shape), one
/// ellipse per input (name, role, shape); weights are grey, KV caches blue.
/// Deterministic: nodes and edges in graph order.
pub fn to_dot(g: &Graph) -> String {
    let mut pg: DiGraph<String, ()> = DiGraph::new();
    let mut styles: Vec<&str> = Vec::new();
    let input_ix: Vec<NodeIndex> = g
        .inputs
        .iter()
        .map(|i| {
            styles.push(match i.role {
                Role::Weight => "shape=ellipse, style=filled, fillcolor=\"#e8e8e8\"",
                Role::ContextKv { .. } | Role::DecodeKv { .. } => "shape=ellipse, style=filled, fillcolor=\"#cfe2ff\"",
                _ => "shape=ellipse",
            });
            pg.add_node(format!("{}\n{} {} {}", i.name, i.role.name(), fmt_shape(&i.shape), i.dtype))
        })
        .collect();
    let mut node_ix: Vec<NodeIndex> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        styles.push(if n.op.is_view() { "shape=box, style=dashed" } else { "shape=box" });
        let ix = pg.add_node(format!("{}\n{} {} {}", n.id, n.op.name(), fmt_shape(&n.shape), n.dtype));
        for &v in &n.inputs {
            let from = match v {
                Value::Input(i) => input_ix[i],
                Value::Node(j) => node_ix[j],
            };
            pg.add_edge(from, ix, ());
        }
        node_ix.push(ix);
    }
    let attr = |_: &DiGraph<String, ()>, (ix, _): (NodeIndex, &String)| styles[ix.index()].to_string();
    let dot = Dot::with_attr_getters(&pg, &[Config::EdgeNoLabel], &|_, _| String::new(), &attr);
    format!("{dot:?}")
}
