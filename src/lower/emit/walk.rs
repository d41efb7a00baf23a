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
//!   up to [`CPU_TILE`] outputs that share every load of the large
//!   operand (a register tile; fewer rows where each output is a vector
//!   or a vector sum, see `bodies.rs`); and the output's last axis, along
//!   which the CPU vectorizes, stays a kept axis when streaming an operand
//!   that indexes it moves at most twice the elements (grouped-query
//!   `w·V`, see [`crate::lower::plan::reuse_axes_for`]). Kept when the
//!   largest operand indexes every output axis of size other than 1 (the
//!   baseline's attention over a broadcast cache, elementwise-like
//!   contractions).
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
use crate::lower::plan::{cooperative_contraction, reuse_axes, reuse_axes_for, row_axis};

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
    let Some(reuse) = reuse_axes_for(graph, j, cpu) else { return Walk::RowMajor };
    if reuse.is_empty() {
        return Walk::RowMajor;
    }
    let keep = (0..rank).filter(|a| !reuse.contains(a)).collect();
    Walk::Reuse { keep, reuse, tile: if cpu { CPU_TILE } else { 1 } }
}

#[cfg(test)]
mod tests {
    use super::{walk, Walk};
    use crate::lower::emit::testing::{check_output, cpu_step, point};
    use crate::lower::emit::Target;

    /// Grouped-query attention's context `w·V` with a 16-wide head: the
    /// probabilities `[b, g, p, 1, m]` outnumber V `[g, m, k]`, so the
    /// GPU's walk streams them and re-reads V along k; the CPU's keeps k
    /// (the samples and the group's heads reuse V) and computes the head
    /// as one vector. Against the interpreter at b on either side of the
    /// 8-row tile.
    #[test]
    fn cpu_walk_keeps_a_vectorizable_last_axis() {
        let (graph, step, text) = cpu_step(&serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"g": 2, "p": 2, "k": 16}},
            "inputs": [
                {"name": "probs", "role": "activation", "shape": ["b", "g", "p", 1, "m"], "dtype": "f32"},
                {"name": "v", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["g", "m", "k"], "dtype": "f32"}
            ],
            "nodes": [{"id": "o", "op": "einsum", "inputs": ["probs", "v"], "attrs": {"spec": "bgpnm,gmk->bgpnk"}}],
            "outputs": [{"name": "o", "node": "o"}]
        }));
        let gpu = Walk::Reuse { keep: vec![0, 1, 2, 3], reuse: vec![4], tile: 1 };
        assert_eq!(walk(&graph, Some(0), Target::Gpu, None), gpu);
        let cpu = Walk::Reuse { keep: vec![1, 3, 4], reuse: vec![0, 2], tile: 8 };
        assert_eq!(walk(&graph, Some(0), Target::Cpu, None), cpu);
        assert!(text.contains(": vector<16xf32>, !llvm.ptr"), "k stored as a vector:\n{text}");
        for (b, m) in [(1, 37), (3, 100), (5, 16)] {
            check_output(&graph, &step, &point(&[("b", b), ("m", m)]), 2, "o", (1e-5, 1e-5));
        }
    }
}
