//! bifurc's optimizer: an e-graph (egg) over decode-graph ops, with symbolic
//! shapes in the analysis, algebraic rewrite rules, and a bytes-moved cost
//! model with DAG extraction. It depends on nothing else of bifurc: callers
//! describe their graph as a [`Problem`] and get a [`Solution`] back.
//!
//! Stages: build the e-graph ([`Problem`] → e-graph) → saturate
//! ([`rules::all`], bounded by [`Limits`]) → extract ([`extract::extract`],
//! bytes at [`Problem::point`]) → [`Solution`].

pub mod analysis;
pub mod cost;
pub mod extract;
pub mod lang;
pub mod poly;
pub mod rules;
pub mod shape;
mod solve;

pub use analysis::Dtype;
pub use solve::{optimize, Limits, OptimizeError, Report, SNode, Solution};

use poly::Poly;
use shape::Shape;
use std::collections::BTreeMap;

/// An op as the optimizer sees it. Ops it does not reason about are `Opaque`:
/// the caller keeps their meaning and gets them back by index.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Einsum(String),
    MatMul {
        transpose_b: bool,
    },
    Concat(usize),
    Broadcast(Shape),
    Slice {
        axis: usize,
        start: Poly,
        end: Poly,
    },
    Reshape(Shape),
    Transpose(Vec<usize>),
    /// Elementwise add with numpy broadcasting.
    Add,
    /// Any other op; `gather` marks an embedding lookup (reads only the rows it picks).
    Opaque {
        gather: bool,
    },
}

/// A reference to a problem input or node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ref {
    Leaf(usize),
    Node(usize),
}

/// A graph input.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub name: String,
    pub shape: Shape,
    pub dtype: Dtype,
}

/// A node of the input graph, with its (already checked) result shape.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    pub inputs: Vec<Ref>,
    pub shape: Shape,
    pub dtype: Dtype,
}

/// What to optimize: a checked DAG in topological order, the model
/// constants, and the shape point at which bytes are counted.
#[derive(Clone, Debug)]
pub struct Problem {
    pub constants: BTreeMap<String, i64>,
    pub point: BTreeMap<String, i64>,
    pub leaves: Vec<Leaf>,
    pub nodes: Vec<Node>,
    pub roots: Vec<Ref>,
}
