//! The order in which a kernel's flat index walks its output.
//!
//! - **Row-major** (the default): the flat index is the output offset.
//! - **Reuse-innermost** (einsum / matmul): the output axes that the
//!   contraction's largest operand does not index (its *reuse* axes) are
//!   walked innermost, the others outside in their order. Consecutive
//!   iterations (CPU) or adjacent threads (GPU) then read the same slice of
//!   that operand. For the context einsum of bifurcated attention,
//!   `q [b,g,p,n,k] x K_ctx [g,m_c,k]`, the reuse axes are b, p, n: the
//!   context cache is streamed once per step instead of once per sample.
//!   On the CPU the reuse index is also tiled: one iteration computes
//!   [`CPU_TILE`] outputs that share every load of the large operand (a
//!   register tile). Kept when the largest operand indexes every output
//!   axis of size other than 1 (the baseline's attention over a broadcast
//!   cache, elementwise-like contractions).
//! - **Rows** (softmax, rms / layer norm, both targets): one iteration
//!   (GPU: block) per lane: its statistics once, then a loop storing the
//!   lane's elements. The kernel's extent is the number of lanes (see
//!   [`crate::lower::plan::Kernel::extent`]).
//! - **Cooperative** (GPU contractions with a long reduction along the
//!   operands' innermost axis, the weight projections): one block per
//!   output element; its threads split the sum and combine it with
//!   `gpu.all_reduce`, thread 0 stores it. On the CPU these contractions
//!   walk reuse-innermost like any other.
//!
//! "Largest" is by elements at a typical point ([`TYPICAL`]; other runtime
//! dims 64).

use std::collections::BTreeMap;

use crate::ir::{shape::numel, Graph, Op, Poly, Value};

use super::Target;
use crate::lower::plan::{cooperative_contraction, row_axis};

/// Outputs per CPU iteration of a reuse-innermost kernel.
pub(crate) const CPU_TILE: usize = 8;

/// Runtime dims at which operand sizes are compared.
const TYPICAL: &[(&str, i64)] = &[("b", 32), ("m_c", 8192), ("m_d", 256)];
const TYPICAL_OTHER: i64 = 64;

/// How a kernel walks its output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Walk {
    RowMajor,
    /// Output axes `keep` (outer, in order) then `reuse` (inner, in
    /// order); the reuse index is tiled by `tile`.
    Reuse {
        keep: Vec<usize>,
        reuse: Vec<usize>,
        tile: usize,
    },
    /// One iteration per lane along `axis`.
    Rows {
        axis: usize,
    },
    /// GPU: one block per output element, its threads splitting the
    /// contraction (see [`crate::lower::plan::cooperative_contraction`]).
    Cooperative,
}

/// The walk of the kernel computing node `j` (`None`: a copy kernel).
/// Contractions summing at least `cooperative_min` elements along the
/// operands' innermost axis walk [`Walk::Cooperative`] (`None`: never).
pub(crate) fn walk(graph: &Graph, j: Option<usize>, target: Target, cooperative_min: Option<i64>) -> Walk {
    let Some(node) = j.and_then(|j| graph.nodes.get(j)) else { return Walk::RowMajor };
    let rank = node.shape.len();
    let cpu = target == Target::Cpu;
    // Per operand: which output axes it indexes.
    if let Some(axis) = row_axis(&node.op, rank) {
        return Walk::Rows { axis };
    }
    if let (Some(min), Some(j)) = (cooperative_min, j) {
        if cooperative_contraction(graph, j, min) {
            return Walk::Cooperative;
        }
    }
    let covered: Vec<(Value, Vec<bool>)> = match &node.op {
        Op::Einsum(spec) if spec.output.len() == rank && spec.inputs.len() == node.inputs.len() => spec
            .inputs
            .iter()
            .zip(&node.inputs)
            .map(|(subs, v)| (*v, spec.output.iter().map(|c| subs.contains(c)).collect()))
            .collect(),
        Op::MatMul { .. } if rank >= 2 && node.inputs.len() == 2 => node
            .inputs
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let shape = graph.shape_of(*v);
                let rb = shape.len().saturating_sub(2);
                let lead = (rank - 2).saturating_sub(rb);
                let cov = (0..rank)
                    .map(|a| {
                        if a >= rank - 2 {
                            a == rank - 2 + k
                        } else {
                            a >= lead && a - lead < rb && !is_one(graph, &shape[a - lead])
                        }
                    })
                    .collect();
                (*v, cov)
            })
            .collect(),
        _ => return Walk::RowMajor,
    };
    let point: BTreeMap<String, i64> = graph
        .dims
        .runtime
        .iter()
        .map(|d| {
            let v = TYPICAL.iter().find(|(n, _)| n == d).map_or(TYPICAL_OTHER, |(_, v)| *v);
            (d.clone(), v)
        })
        .collect();
    let elements = |v: Value| -> i64 {
        numel(&graph.dims, graph.shape_of(v)).ok().and_then(|p| graph.dims.eval(&p, &point).ok()).unwrap_or(0)
    };
    // The largest operand (the first on ties).
    let mut best: Option<(i64, &Vec<bool>)> = None;
    for (v, cov) in &covered {
        let n = elements(*v);
        if best.is_none_or(|(m, _)| n > m) {
            best = Some((n, cov));
        }
    }
    let Some((_, cov)) = best else { return Walk::RowMajor };
    let reuse: Vec<usize> = (0..rank).filter(|&a| !cov[a] && !is_one(graph, &node.shape[a])).collect();
    if reuse.is_empty() {
        return Walk::RowMajor;
    }
    let keep = (0..rank).filter(|a| !reuse.contains(a)).collect();
    Walk::Reuse { keep, reuse, tile: if cpu { CPU_TILE } else { 1 } }
}

fn is_one(graph: &Graph, p: &Poly) -> bool {
    graph.dims.same(p, &Poly::constant(1))
}
