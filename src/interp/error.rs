//! What can go wrong while interpreting a graph.

use crate::ir::poly::EvalError;

/// An interpreter error. Each names the dim, input or node at fault.
#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    /// The point binds no value for a runtime dim.
    #[error("runtime dim `{dim}` has no value (the point must bind every runtime dim: {all})")]
    MissingDim { dim: String, all: String },
    /// The point binds a runtime dim to a negative value.
    #[error("runtime dim `{dim}` = {value} is negative")]
    NegativeDim { dim: String, value: i64 },
    /// A symbolic size could not be evaluated (overflow, unbound symbol).
    #[error("{what}: size `{size}` cannot be evaluated: {source}")]
    Size {
        what: String,
        size: String,
        #[source]
        source: EvalError,
    },
    /// A symbolic size is negative at this point.
    #[error("{what}: size `{size}` = {value} is negative at this point")]
    NegativeSize { what: String, size: String, value: i64 },
    /// A shape has more than [`crate::interp::MAX_ELEMENTS`] elements.
    #[error("{what}: shape {shape:?} has more than {max} elements")]
    TooLarge { what: String, shape: Vec<usize>, max: usize },
    /// No tensor was given for a graph input.
    #[error("input `{name}` is missing")]
    MissingInput { name: String },
    /// An input's shape differs from its declared shape at the point.
    #[error("input `{name}` has shape {got:?}, but the graph declares {declared} = {expected:?} at this point")]
    InputShape { name: String, declared: String, expected: Vec<usize>, got: Vec<usize> },
    /// A tensor's data length is not the product of its shape.
    #[error("tensor `{name}` has shape {shape:?} but {len} values")]
    TensorLength { name: String, shape: Vec<usize>, len: usize },
    /// An integer tensor holds a fraction, a non-finite value or a magnitude
    /// beyond 2^24 (not exact in f32).
    #[error("integer tensor `{name}`: element {index} is {value}, not an integer of magnitude <= 2^24")]
    NotInteger { name: String, index: usize, value: f64 },
    /// A gather id is outside `0..rows`.
    #[error("node `{node}`: gather id {id} (element {index} of the ids) is out of range for a table of {rows} rows")]
    GatherId { node: String, index: usize, id: f32, rows: usize },
    /// An op cannot run on its operands at this point (slice out of range,
    /// odd rope head dim, mismatched sizes, …).
    #[error("node `{node}`: {message}")]
    Op { node: String, message: String },
    /// A node's result disagrees with its inferred shape: an interpreter or
    /// shape-inference bug, never the user's.
    #[error(
        "node `{node}` computed shape {got:?} but its inferred shape is {declared} = {expected:?} (interpreter bug)"
    )]
    NodeShape { node: String, declared: String, expected: Vec<usize>, got: Vec<usize> },
}

impl InterpError {
    /// An [`InterpError::Op`] for node `node`.
    pub(crate) fn op(node: &str, message: impl Into<String>) -> Self {
        InterpError::Op { node: node.into(), message: message.into() }
    }
}
