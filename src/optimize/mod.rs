//! `bifurc optimize`: the e-graph pass (crate `bifurc-passes`) applied to a
//! checked graph, verified, and reported per attention site.
//!
//! Stages: graph → problem → saturate + extract (passes) → graph' → verify
//! (export and re-import: shapes re-inferred) → report (bytes model of
//! `inspect` on both graphs).

mod convert;
mod report;

pub use bifurc_passes::Limits;
pub use convert::ConvertError;
pub use report::{OptReport, SiteReport};

use crate::inspect::{bytes_moved, find_sites, ShapePoint};
use crate::ir::Graph;
use std::collections::BTreeSet;

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Shape point for the cost model; runtime dims not given take the defaults.
    pub point: ShapePoint,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error(transparent)]
    Point(#[from] crate::inspect::point::PointError),
    #[error(transparent)]
    Passes(#[from] bifurc_passes::OptimizeError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error("optimized graph does not verify (a bug in bifurc): {0}")]
    Verify(String),
    #[error(transparent)]
    Bytes(#[from] crate::inspect::bytes::BytesError),
}

/// The optimized graph and what was done.
pub struct Optimized {
    pub graph: Graph,
    pub report: OptReport,
}

/// Optimizes `graph`: bifurcates attention where that lowers bytes moved at the point.
pub fn optimize(graph: &Graph, opts: &Options) -> Result<Optimized, OptimizeError> {
    let point = opts.point.for_graph(graph)?;
    let problem = convert::to_problem(graph, &point.0);
    let solution = bifurc_passes::optimize(&problem, &opts.limits)?;
    let candidate = convert::from_solution(graph, &solution)?;
    let doc = crate::export::to_json(&candidate);
    let optimized = crate::import::from_value(&doc).map_err(|e| OptimizeError::Verify(e.to_string()))?;

    let before = bytes_moved(graph, &point)?;
    let after = bytes_moved(&optimized, &point)?;
    let remaining: BTreeSet<usize> = find_sites(&optimized).iter().map(|s| s.context).collect();
    let sites = find_sites(graph)
        .into_iter()
        .map(|site| {
            let rewritten = !remaining.contains(&site.context);
            let name = &graph.inputs[site.context].name;
            let found = solution.report.read_directly.contains(name);
            let reason = if rewritten {
                "bifurcated: the context cache is read once per step".to_string()
            } else if !found {
                "no bifurcated form found (the laws did not apply)".to_string()
            } else {
                format!("kept: the bifurcated form moves no fewer bytes at {point}")
            };
            SiteReport {
                node: graph.nodes[site.node].id.clone(),
                context: name.clone(),
                rewritten,
                reason,
                bytes_before: before.per_input.get(&site.context).copied().unwrap_or(0.0),
                bytes_after: after.per_input.get(&site.context).copied().unwrap_or(0.0),
            }
        })
        .collect();
    Ok(Optimized { graph: optimized, report: OptReport { point, sites, before, after, passes: solution.report } })
}
