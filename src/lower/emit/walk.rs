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
//! - **Cooperative** (GPU contractions with a reduction of at least 32
//!   along the operands' innermost axis: the weight projections, `q·Kᵀ`
//!   over a per-sample cache): one block (under 1024: one warp, see
//!   [`crate::lower::plan::Kernel::warp`]) per index of the axes the
//!   largest operand indexes (a weight row, a cache row), looping over the
//!   reuse axes (the samples: the row is read from DRAM once and from L1
//!   after); for each output its threads split the sum and combine it with
//!   `gpu.all_reduce` (shuffles), thread (lane) 0 stores it. On the CPU these
//!   contractions walk reuse-innermost like any other (or emulate this,
//!   see [`super::Emulation`]).
//!
//! "Largest" is as [`crate::lower::plan::reuse_axes`] decides.

use crate::ir::Graph;

use super::Target;
use crate::lower::plan::{cooperative_contraction, reuse_axes, row_axis};

/// Outputs per CPU iteration of a reuse-innermost kernel.
pub(crate) const CPU_TILE: usize = 8;

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
    /// GPU: one block per index of the `keep` axes (those the largest
    /// operand indexes: a weight row), which walks the `reuse` axes (the
    /// samples) one output at a time, its threads splitting each output's
    /// sum (see [`crate::lower::plan::cooperative_contraction`]).
    Cooperative {
        keep: Vec<usize>,
        reuse: Vec<usize>,
    },
}

/// The walk of the kernel computing node `j` (`None`: a copy kernel).
/// Contractions summing at least `cooperative_min` elements along the
/// operands' innermost axis walk [`Walk::Cooperative`] (`None`: never).
pub(crate) fn walk(graph: &Graph, j: Option<usize>, target: Target, cooperative_min: Option<i64>) -> Walk {
    let Some((j, node)) = j.and_then(|j| Some((j, graph.nodes.get(j)?))) else { return Walk::RowMajor };
    let rank = node.shape.len();
    let cpu = target == Target::Cpu;
    if let Some(axis) = row_axis(&node.op, rank) {
        return Walk::Rows { axis };
    }
    if let Some(min) = cooperative_min {
        if cooperative_contraction(graph, j, min) {
            let reuse = reuse_axes(graph, j).unwrap_or_default();
            let keep = (0..rank).filter(|a| !reuse.contains(a)).collect();
            return Walk::Cooperative { keep, reuse };
        }
    }
    let Some(reuse) = reuse_axes(graph, j) else { return Walk::RowMajor };
    if reuse.is_empty() {
        return Walk::RowMajor;
    }
    let keep = (0..rank).filter(|a| !reuse.contains(a)).collect();
    Walk::Reuse { keep, reuse, tile: if cpu { CPU_TILE } else { 1 } }
}
