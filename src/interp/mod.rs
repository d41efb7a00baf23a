//! The reference interpreter: what any valid [`Graph`] computes, in f32.
//!
//! This is the oracle every rewrite and every compiled step is checked
//! against, so it favours being obviously right over being fast:
//!
//! - Tensors are dense row-major `f32` ([`Tensor`]); f16/bf16 nodes are
//!   computed in f32 too (storage precision is not emulated). Integer
//!   tensors (ids, positions) hold exact integers as f32 (exact up to 2^24;
//!   integer inputs are checked).
//! - Every reduction (einsum/matmul contractions, reduce_sum, softmax's sum,
//!   norm statistics) accumulates in f64 and rounds once to f32.
//!   Elementwise math (exp, erf, tanh, rsqrt, …) is done in f64 and rounded.
//! - Softmax subtracts the maximum; a lane that is all `-inf` (a fully
//!   masked row) gives all `0`, not NaN. NaN (and `+inf` in a softmax lane)
//!   gives NaN: it propagates, it is never hidden.
//! - `reduce_max` over an empty axis gives `-inf`; `reduce_sum` gives `0`.
//! - Sizes are evaluated at a point binding every runtime dim; each node's
//!   result is checked against its inferred shape at that point.
//!
//! Entry points: [`run`], [`run_all`], and [`random_inputs`] (or one at a time,
//! [`random_input`]) for test data.

mod contract;
mod error;
mod layout;
mod loops;
mod math;
mod model;
mod random;
mod special;
mod tensor;

pub use error::InterpError;
pub use random::{positions_unusable, random_input, random_inputs, SplitMix64};
pub use special::{erf, erfc};
pub use tensor::{Tensor, MAX_EXACT_INT};

use crate::ir::{fmt_shape, Graph, Op, Poly, Value};
use std::collections::{BTreeMap, HashMap};

/// Most elements a single tensor may have (2^31, 8 GiB of f32): a larger
/// point is refused with [`InterpError::TooLarge`] instead of aborting on
/// allocation.
pub const MAX_ELEMENTS: usize = 1 << 31;

/// Runs `graph` at `point` (a value for every runtime dim) on `inputs`
/// (by input name; extra entries are ignored) and returns every graph
/// output by output name.
pub fn run(
    graph: &Graph,
    point: &BTreeMap<String, i64>,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, InterpError> {
    let (ins, nodes) = evaluate(graph, point, inputs)?;
    graph
        .outputs
        .iter()
        .map(|o| {
            let t = match o.value {
                Value::Input(i) => ins.get(i).copied(),
                Value::Node(i) => nodes.get(i),
            };
            let missing = || InterpError::op(&o.name, "output names no input or node");
            Ok((o.name.clone(), t.ok_or_else(missing)?.clone()))
        })
        .collect()
}

/// Like [`run`], but returns every node's result, in `graph.nodes` order.
pub fn run_all(
    graph: &Graph,
    point: &BTreeMap<String, i64>,
    inputs: &HashMap<String, Tensor>,
) -> Result<Vec<Tensor>, InterpError> {
    Ok(evaluate(graph, point, inputs)?.1)
}

/// Checks the point and inputs, then evaluates every node in order.
fn evaluate<'a>(
    graph: &Graph,
    point: &BTreeMap<String, i64>,
    inputs: &'a HashMap<String, Tensor>,
) -> Result<(Vec<&'a Tensor>, Vec<Tensor>), InterpError> {
    let at = At::new(graph, point)?;
    let ins = graph
        .inputs
        .iter()
        .map(|inp| {
            let t = inputs.get(&inp.name).ok_or_else(|| InterpError::MissingInput { name: inp.name.clone() })?;
            t.check(&inp.name)?;
            let expected = at.shape(&inp.shape, &format!("input `{}`", inp.name))?;
            if t.shape != expected {
                return Err(InterpError::InputShape {
                    name: inp.name.clone(),
                    declared: fmt_shape(&inp.shape),
                    expected,
                    got: t.shape.clone(),
                });
            }
            if !inp.dtype.is_float() {
                check_integers(&inp.name, t)?;
            }
            Ok(t)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut nodes: Vec<Tensor> = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let expected = at.shape(&node.shape, &format!("node `{}`", node.id))?;
        // `get`: a hand-built graph may break the topological order.
        let args = node
            .inputs
            .iter()
            .map(|v| match *v {
                Value::Input(i) => ins.get(i).copied(),
                Value::Node(i) => nodes.get(i),
            })
            .collect::<Option<Vec<&Tensor>>>()
            .ok_or_else(|| InterpError::op(&node.id, "reads a value that is not an input or an earlier node"))?;
        let out = eval_op(&at, &node.id, &node.op, &args)?;
        if out.shape != expected {
            return Err(InterpError::NodeShape {
                node: node.id.clone(),
                declared: fmt_shape(&node.shape),
                expected,
                got: out.shape,
            });
        }
        nodes.push(out);
    }
    Ok((ins, nodes))
}

/// One op on its evaluated operands.
fn eval_op(at: &At, node: &str, op: &Op, args: &[&Tensor]) -> Result<Tensor, InterpError> {
    let what = || format!("node `{node}`");
    let arity = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(InterpError::op(node, format!("`{}` takes {n} inputs, got {}", op.name(), args.len())))
        }
    };
    match op {
        Op::Einsum(spec) => contract::einsum(node, spec, args),
        Op::MatMul { transpose_b } => {
            arity(2)?;
            contract::matmul(node, *transpose_b, args[0], args[1])
        }
        Op::Concat { axis } => layout::concat(node, *axis, args),
        Op::Broadcast { shape } => {
            arity(1)?;
            layout::broadcast(node, args[0], &at.shape(shape, &what())?)
        }
        Op::Slice { axis, start, end } => {
            arity(1)?;
            let (s, e) = (at.size(start, &what())?, at.size(end, &what())?);
            layout::slice(node, args[0], *axis, s, e)
        }
        Op::Reshape { shape } => {
            arity(1)?;
            layout::reshape(node, args[0], at.shape(shape, &what())?)
        }
        Op::Transpose { perm } => {
            arity(1)?;
            layout::transpose(node, args[0], perm)
        }
        Op::Softmax { axis } => {
            arity(1)?;
            math::softmax(node, args[0], *axis)
        }
        Op::Unary(u) => {
            arity(1)?;
            Ok(math::unary(*u, args[0]))
        }
        Op::Scale { value } => {
            arity(1)?;
            Ok(math::map(args[0], |x| x * value))
        }
        Op::Binary(b) => {
            arity(2)?;
            math::binary(node, *b, args[0], args[1])
        }
        Op::Reduce { op, axes, keepdims } => {
            arity(1)?;
            math::reduce(node, *op, args[0], axes, *keepdims)
        }
        Op::RmsNorm { eps } => {
            arity(2)?;
            math::rms_norm(node, args[0], args[1], *eps)
        }
        Op::LayerNorm { eps } => {
            arity(3)?;
            math::layer_norm(node, args[0], args[1], args[2], *eps)
        }
        Op::Rope { theta } => {
            arity(2)?;
            model::rope(node, args[0], args[1], *theta)
        }
        Op::Gather => {
            arity(2)?;
            model::gather(node, args[0], args[1])
        }
        Op::Constant { value, shape } => {
            arity(0)?;
            Ok(Tensor::full(at.shape(shape, &what())?, *value as f32))
        }
        Op::CausalMask { query, key, offset } => {
            arity(0)?;
            let q = at.size(query, &what())?;
            let k = at.size(key, &what())?;
            let off = at.size(offset, &what())?;
            Ok(model::causal_mask(q, k, off))
        }
    }
}

/// Integer inputs must hold integers of magnitude `<= 2^24`.
fn check_integers(name: &str, t: &Tensor) -> Result<(), InterpError> {
    let limit = MAX_EXACT_INT as f32;
    match t.data.iter().position(|v| v.fract() != 0.0 || v.abs() > limit || !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(InterpError::NotInteger { name: name.into(), index, value: f64::from(t.data[index]) }),
    }
}

/// Sizes evaluated at a checked point.
pub(crate) struct At<'g> {
    graph: &'g Graph,
    point: &'g BTreeMap<String, i64>,
}

impl<'g> At<'g> {
    /// Checks that every runtime dim has a non-negative value.
    pub(crate) fn new(graph: &'g Graph, point: &'g BTreeMap<String, i64>) -> Result<Self, InterpError> {
        for dim in &graph.dims.runtime {
            match point.get(dim) {
                None => return Err(InterpError::MissingDim { dim: dim.clone(), all: graph.dims.runtime.join(", ") }),
                Some(&value) if value < 0 => return Err(InterpError::NegativeDim { dim: dim.clone(), value }),
                Some(_) => {}
            }
        }
        Ok(At { graph, point })
    }

    /// One size; `what` names its owner for errors.
    pub(crate) fn size(&self, p: &Poly, what: &str) -> Result<usize, InterpError> {
        let v = self.graph.dims.eval(p, self.point).map_err(|source| InterpError::Size {
            what: what.into(),
            size: p.to_string(),
            source,
        })?;
        usize::try_from(v).map_err(|_| InterpError::NegativeSize { what: what.into(), size: p.to_string(), value: v })
    }

    /// A whole shape, refused beyond [`MAX_ELEMENTS`].
    pub(crate) fn shape(&self, s: &[Poly], what: &str) -> Result<Vec<usize>, InterpError> {
        let shape = s.iter().map(|p| self.size(p, what)).collect::<Result<Vec<_>, _>>()?;
        match tensor::checked_numel(&shape) {
            Some(n) if n <= MAX_ELEMENTS => Ok(shape),
            _ => Err(InterpError::TooLarge { what: what.into(), shape, max: MAX_ELEMENTS }),
        }
    }
}
