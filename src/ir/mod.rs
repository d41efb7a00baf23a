//! The decode-graph IR: dims, typed inputs, a topologically ordered list of
//! nodes, and named outputs. Built by [`crate::import`] (which checks it) and
//! printed back by [`crate::export`].

pub mod op;
pub mod poly;
pub mod shape;

pub use op::{BinaryOp, EinsumSpec, Op, ReduceOp, Shape, UnaryOp};
pub use poly::Poly;

use std::collections::BTreeMap;

/// The format tag written in and required of every model.json.
pub const FORMAT: &str = "bifurc-graph/1";

/// Symbolic sizes. Runtime dims vary per call; constants are model sizes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dims {
    /// In declaration order (`b`, `m_c`, `m_d`, …).
    pub runtime: Vec<String>,
    /// In declaration order; every value is `> 0`.
    pub constants: Vec<(String, i64)>,
}

impl Dims {
    pub fn constant(&self, name: &str) -> Option<i64> {
        self.constants.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    pub fn is_runtime(&self, name: &str) -> bool {
        self.runtime.iter().any(|n| n == name)
    }

    pub fn is_known(&self, name: &str) -> bool {
        self.is_runtime(name) || self.constant(name).is_some()
    }

    /// Substitutes every constant: the result mentions runtime dims only.
    pub fn normalize(&self, p: &Poly) -> Result<Poly, poly::Overflow> {
        p.substitute(&|s| self.constant(s).map(Poly::constant))
    }

    /// True when the two sizes are equal for every value of the runtime dims.
    pub fn same(&self, a: &Poly, b: &Poly) -> bool {
        matches!((self.normalize(a), self.normalize(b)), (Ok(x), Ok(y)) if x == y)
    }

    pub fn same_shape(&self, a: &[Poly], b: &[Poly]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| self.same(x, y))
    }

    /// Evaluates a size at a point that binds every runtime dim.
    pub fn eval(&self, p: &Poly, point: &BTreeMap<String, i64>) -> Result<i64, poly::EvalError> {
        p.eval(&|s| self.constant(s).or_else(|| point.get(s).copied()))
    }
}

/// An element type: the runtime's (the manifest names buffers' dtypes the
/// same way), so the compiler and the runtime share one type.
pub use bifurc_runtime::dtype::DType;

/// Which half of a KV cache a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kv {
    K,
    V,
}

impl Kv {
    pub fn name(self) -> &'static str {
        match self {
            Kv::K => "k",
            Kv::V => "v",
        }
    }
}

/// What an input is for. The runtime binds inputs by role; the optimizer
/// looks for broadcasts of `ContextKv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Token ids of the new tokens, `[b, n]`.
    TokenIds,
    /// Any other per-step activation.
    Activation,
    Weight,
    /// Absolute positions of the new tokens, `[b, n]`.
    Position,
    /// Cache of the shared context: no `b` axis, stored once.
    ContextKv {
        layer: usize,
        kv: Kv,
    },
    /// Cache of the tokens decoded so far, one per sample.
    DecodeKv {
        layer: usize,
        kv: Kv,
    },
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::TokenIds => "token_ids",
            Role::Activation => "activation",
            Role::Weight => "weight",
            Role::Position => "position",
            Role::ContextKv { .. } => "context_kv",
            Role::DecodeKv { .. } => "decode_kv",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    pub name: String,
    pub role: Role,
    pub shape: Shape,
    pub dtype: DType,
}

/// A value: a graph input or a node's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Input(usize),
    Node(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub id: String,
    pub op: Op,
    pub inputs: Vec<Value>,
    /// Inferred at import (or given and checked).
    pub shape: Shape,
    pub dtype: DType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputRole {
    Logits,
    /// The new rows to append to layer `layer`'s decode cache.
    NewKv {
        layer: usize,
        kv: Kv,
    },
    Other,
}

impl OutputRole {
    pub fn name(self) -> &'static str {
        match self {
            OutputRole::Logits => "logits",
            OutputRole::NewKv { .. } => "new_kv",
            OutputRole::Other => "other",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub name: String,
    pub value: Value,
    pub role: OutputRole,
}

/// A checked decode graph. Nodes are in topological order: a node's inputs
/// are graph inputs or earlier nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// Free-form provenance (`"llama"`, the config's name, …).
    pub meta: BTreeMap<String, String>,
    pub dims: Dims,
    pub inputs: Vec<Input>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<Output>,
}

impl Graph {
    pub fn name_of(&self, v: Value) -> &str {
        match v {
            Value::Input(i) => &self.inputs[i].name,
            Value::Node(i) => &self.nodes[i].id,
        }
    }

    pub fn shape_of(&self, v: Value) -> &Shape {
        match v {
            Value::Input(i) => &self.inputs[i].shape,
            Value::Node(i) => &self.nodes[i].shape,
        }
    }

    pub fn dtype_of(&self, v: Value) -> DType {
        match v {
            Value::Input(i) => self.inputs[i].dtype,
            Value::Node(i) => self.nodes[i].dtype,
        }
    }

    /// Looks a value up by input name or node id.
    pub fn find(&self, name: &str) -> Option<Value> {
        self.inputs
            .iter()
            .position(|i| i.name == name)
            .map(Value::Input)
            .or_else(|| self.nodes.iter().position(|n| n.id == name).map(Value::Node))
    }

    /// Number of transformer layers: one more than the highest layer index of
    /// a KV input, or 0.
    pub fn layers(&self) -> usize {
        self.inputs
            .iter()
            .filter_map(|i| match i.role {
                Role::ContextKv { layer, .. } | Role::DecodeKv { layer, .. } => Some(layer + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Formats a shape as `[b, h, n, k]`.
pub fn fmt_shape(shape: &[Poly]) -> String {
    let parts: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("[{}]", parts.join(", "))
}
