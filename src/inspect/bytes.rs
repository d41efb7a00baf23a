//! The bytes-moved model of one decode step at a shape point.
//!
//! View ops (broadcast, reshape, transpose, concat, slice) move no data: the
//! compute op that consumes a view reads through it to the stored tensors.
//! Each compute op reads its operands and writes its result once. Through a
//! broadcast, a consumer re-reads the source once per copy along expanded
//! axes whose size involves a runtime dim (once per *sample*), but not along
//! expanded axes of constant size (the heads of a KV group): that is what a
//! grouped-query kernel such as FlashAttention shares, and what the method
//! does not claim. A `gather` reads only the table rows it picks.
//!
//! Traffic is split by where it lands: weights, the context KV cache, the
//! decode KV cache, and activations (every other input and every
//! intermediate result, reads and writes).

use super::point::ShapePoint;
use crate::ir::{shape::numel, Graph, Op, Role, Value};
use std::collections::BTreeMap;

/// Bytes moved per step, by category.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bytes {
    pub weights: f64,
    pub context_kv: f64,
    pub decode_kv: f64,
    pub activations: f64,
    /// Bytes read from each graph input, by input index.
    pub per_input: BTreeMap<usize, f64>,
}

impl Bytes {
    pub fn total(&self) -> f64 {
        self.weights + self.context_kv + self.decode_kv + self.activations
    }

    fn add_input(&mut self, input: usize, role: Role, bytes: f64) {
        *self.per_input.entry(input).or_insert(0.0) += bytes;
        self.add(Some(role), bytes);
    }

    fn add(&mut self, role: Option<Role>, bytes: f64) {
        match role {
            Some(Role::Weight) => self.weights += bytes,
            Some(Role::ContextKv { .. }) => self.context_kv += bytes,
            Some(Role::DecodeKv { .. }) => self.decode_kv += bytes,
            _ => self.activations += bytes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bytes model: {0}")]
pub struct BytesError(String);

struct Model<'g> {
    graph: &'g Graph,
    point: BTreeMap<String, i64>,
}

impl Model<'_> {
    fn elements(&self, v: Value) -> Result<f64, BytesError> {
        let shape = self.graph.shape_of(v);
        let n = numel(&self.graph.dims, shape).map_err(BytesError)?;
        let e =
            self.graph.dims.eval(&n, &self.point).map_err(|e| BytesError(format!("{}: {e}", self.graph.name_of(v))))?;
        Ok(e as f64)
    }

    /// Product of the broadcast axes that stretch to a constant size.
    fn constant_expansion(&self, input: Value, target: &[crate::ir::Poly]) -> f64 {
        let dims = &self.graph.dims;
        let src = self.graph.shape_of(input);
        let new_axes = target.len() - src.len();
        let mut c = 1.0;
        for (i, t) in target.iter().enumerate() {
            let stretched = i < new_axes || (!dims.same(&src[i - new_axes], t));
            if stretched {
                if let Some(v) = dims.normalize(t).ok().and_then(|p| p.as_constant()) {
                    c *= v as f64;
                }
            }
        }
        c
    }

    /// Charges `count` elements read from `v`, through views, to `acc`.
    fn read(&self, v: Value, count: f64, acc: &mut Bytes) -> Result<(), BytesError> {
        let node = match v {
            Value::Node(i) if self.graph.nodes[i].op.is_view() => &self.graph.nodes[i],
            _ => {
                let bytes = count * self.graph.dtype_of(v).size() as f64;
                match v {
                    Value::Input(i) => acc.add_input(i, self.graph.inputs[i].role, bytes),
                    Value::Node(_) => acc.add(None, bytes),
                }
                return Ok(());
            }
        };
        match &node.op {
            Op::Concat { .. } => {
                let total = self.elements(v)?;
                for &part in &node.inputs {
                    let share = if total > 0.0 { self.elements(part)? / total } else { 0.0 };
                    self.read(part, count * share, acc)?;
                }
                Ok(())
            }
            Op::Broadcast { shape } => {
                let c = self.constant_expansion(node.inputs[0], shape);
                self.read(node.inputs[0], count / c, acc)
            }
            Op::Slice { axis, start, end } => self.read_slice(node.inputs[0], *axis, start, end, count, acc),
            _ => self.read(node.inputs[0], count, acc),
        }
    }

    /// A slice of a concat on the same axis reads only the parts it overlaps,
    /// each in proportion to the overlap; any other slice reads through.
    fn read_slice(
        &self,
        input: Value,
        axis: usize,
        start: &crate::ir::Poly,
        end: &crate::ir::Poly,
        count: f64,
        acc: &mut Bytes,
    ) -> Result<(), BytesError> {
        let concat = match input {
            Value::Node(i) => match &self.graph.nodes[i].op {
                Op::Concat { axis: a } if *a == axis => Some(&self.graph.nodes[i]),
                _ => None,
            },
            Value::Input(_) => None,
        };
        let Some(concat) = concat else { return self.read(input, count, acc) };
        let at = |p: &crate::ir::Poly| {
            self.graph.dims.eval(p, &self.point).map_err(|e| BytesError(format!("{}: {e}", concat.id)))
        };
        let (s, e) = (at(start)?, at(end)?);
        if e <= s {
            return Ok(());
        }
        let mut lo = 0;
        for &part in &concat.inputs {
            let hi = lo + at(&self.graph.shape_of(part)[axis])?;
            let overlap = (e.min(hi) - s.max(lo)).max(0);
            if overlap > 0 {
                self.read(part, count * overlap as f64 / (e - s) as f64, acc)?;
            }
            lo = hi;
        }
        Ok(())
    }
}

/// Bytes moved by one step of `graph` at `point` (which binds every runtime dim).
pub fn bytes_moved(graph: &Graph, point: &ShapePoint) -> Result<Bytes, BytesError> {
    let model = Model { graph, point: point.0.clone() };
    let mut acc = Bytes::default();
    for (i, node) in graph.nodes.iter().enumerate() {
        if node.op.is_view() {
            continue;
        }
        let out = model.elements(Value::Node(i))?;
        for (j, &input) in node.inputs.iter().enumerate() {
            let count = match (&node.op, j) {
                // A gather reads the rows it picks: one row per output row.
                (Op::Gather, 0) => out,
                _ => model.elements(input)?,
            };
            model.read(input, count, &mut acc)?;
        }
        acc.add(None, out * node.dtype.size() as f64);
    }
    Ok(acc)
}
