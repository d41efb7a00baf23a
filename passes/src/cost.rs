//! The cost model: bytes moved by one decode step at a shape point.
//!
//! Views (concat, broadcast, slice, reshape, transpose) move nothing. Every
//! other op reads each operand once and writes its result once; reading a
//! value that repeats along constant-size broadcast axes (the heads of a KV
//! group) costs its distinct elements only, while a broadcast over a runtime
//! dim (the samples) is paid per copy — that is the traffic bifurcation
//! removes. A gather reads one table row per output row. Costs are `f64`
//! bytes; the same model as `bifurc inspect`.

use crate::analysis::{Data, Graph};
use crate::lang::Expr;
use crate::poly::Poly;
use egg::Id;
use std::collections::BTreeMap;

/// Values of the runtime dims.
pub type Point = BTreeMap<String, i64>;

/// Evaluates a size at `point` (constants substituted). Unbound or
/// overflowing sizes count as infinitely large, so they are never chosen.
pub fn eval(eg: &Graph, p: &Poly, point: &Point) -> f64 {
    let Ok(n) = eg.analysis.constants.normalize(p) else { return f64::INFINITY };
    match n.eval(&|s| point.get(s).copied()) {
        Ok(v) => v as f64,
        Err(_) => f64::INFINITY,
    }
}

fn elements(eg: &Graph, shape: &[Poly], point: &Point) -> f64 {
    shape.iter().map(|d| eval(eg, d, point)).product()
}

/// Bytes to read the whole value of class `id` once.
pub fn read_bytes(eg: &Graph, id: Id, point: &Point) -> f64 {
    match &eg[id].data {
        Data::Tensor { shape, dtype, replication } => {
            elements(eg, shape, point) * f64::from(dtype.bytes) / (*replication).max(1) as f64
        }
        Data::Attr(_) => 0.0,
    }
}

/// The bytes one e-node moves itself (its operands' own costs excluded).
pub fn node_cost(eg: &Graph, node: &Expr, class: Id, point: &Point) -> f64 {
    if node.is_view() || matches!(node, Expr::In(_) | Expr::Attr(_)) {
        return 0.0;
    }
    let write = read_bytes(eg, class, point);
    let gather = match node {
        Expr::Op(c) => {
            eg[c[0]].data.attr().and_then(|k| eg.analysis.known.get(&egg::Symbol::from(k))).is_some_and(|k| k.gather)
        }
        _ => false,
    };
    let mut reads = 0.0;
    for (i, &op) in node.operands().iter().enumerate() {
        reads += if gather && i == 0 {
            // One table row per output row: bytes of the output, in the table's dtype.
            match (&eg[op].data, &eg[class].data) {
                (Data::Tensor { dtype, .. }, Data::Tensor { shape, .. }) => {
                    elements(eg, shape, point) * f64::from(dtype.bytes)
                }
                _ => 0.0,
            }
        } else {
            read_bytes(eg, op, point)
        };
    }
    reads + write
}
