//! `bifurc inspect`: what a decode graph holds and what one step of it moves.

pub mod bytes;
pub mod macs;
pub mod point;
pub mod sites;

pub use bytes::{bytes_moved, Bytes};
pub use macs::{multiply_adds, node_multiply_adds, MacsError};
pub use point::{ShapePoint, DEFAULT_POINT};
pub use sites::{find_sites, Site};

use crate::ir::{shape::numel, Graph, Role};
use std::fmt::Write;

/// Everything `inspect` prints, computed once.
#[derive(Clone, Debug)]
pub struct Report {
    pub layers: usize,
    pub parameters: i64,
    pub parameter_bytes: i64,
    pub sites: Vec<Site>,
    pub point: ShapePoint,
    pub bytes: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Point(#[from] point::PointError),
    #[error(transparent)]
    Bytes(#[from] bytes::BytesError),
    #[error("weight `{name}`: {message}")]
    Weight { name: String, message: String },
}

/// Analyses `graph` at `point` (runtime dims not given take their defaults).
pub fn inspect(graph: &Graph, point: &ShapePoint) -> Result<Report, InspectError> {
    let point = point.for_graph(graph)?;
    let mut parameters: i64 = 0;
    let mut parameter_bytes: i64 = 0;
    for input in graph.inputs.iter().filter(|i| i.role == Role::Weight) {
        let err = |message: String| InspectError::Weight { name: input.name.clone(), message };
        let n = numel(&graph.dims, &input.shape).map_err(err)?;
        let n = graph.dims.eval(&n, &point.0).map_err(|e| err(e.to_string()))?;
        parameters = parameters.saturating_add(n);
        parameter_bytes = parameter_bytes.saturating_add(n.saturating_mul(input.dtype.size() as i64));
    }
    let layers = graph.meta.get("layers").and_then(|l| l.parse().ok()).unwrap_or_else(|| graph.layers());
    Ok(Report {
        layers,
        parameters,
        parameter_bytes,
        sites: find_sites(graph),
        bytes: bytes_moved(graph, &point)?,
        point,
    })
}

/// `1234567` → `1,234,567`.
pub fn group_digits(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Bytes in decimal units: `13.48 GB`.
pub fn human_bytes(b: f64) -> String {
    const UNITS: &[&str] = &["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

impl Report {
    /// The human-readable report.
    pub fn render(&self, graph: &Graph) -> String {
        let mut s = String::new();
        let arch = graph.meta.get("architecture").map(String::as_str).unwrap_or("unknown architecture");
        let _ = writeln!(
            s,
            "model: {arch}, {} layers, {} nodes, {} inputs",
            self.layers,
            graph.nodes.len(),
            graph.inputs.len()
        );
        let _ = writeln!(
            s,
            "parameters: {} ({:.3e}), {}",
            group_digits(self.parameters),
            self.parameters as f64,
            human_bytes(self.parameter_bytes as f64)
        );
        let _ = writeln!(s, "runtime dims: {}", graph.dims.runtime.join(", "));
        let _ = writeln!(s, "attention sites reading a batch-broadcast context cache: {}", self.sites.len());
        for site in &self.sites {
            let _ = writeln!(
                s,
                "  {} (operand {}) reads {} through broadcast {}",
                graph.nodes[site.node].id,
                site.operand,
                graph.inputs[site.context].name,
                graph.nodes[site.broadcast].id
            );
        }
        let b = &self.bytes;
        let total = b.total();
        let _ = writeln!(s, "bytes moved per decode step at {}:", self.point);
        for (name, v) in [
            ("weights", b.weights),
            ("context KV", b.context_kv),
            ("decode KV", b.decode_kv),
            ("activations", b.activations),
            ("total", total),
        ] {
            let pct = if total > 0.0 { 100.0 * v / total } else { 0.0 };
            let _ = writeln!(
                s,
                "  {name:<12} {:>16} B  {:>10}  {pct:5.1}%",
                group_digits(v.round() as i64),
                human_bytes(v)
            );
        }
        s
    }

    /// The same report as JSON (for scripts).
    pub fn to_json(&self, graph: &Graph) -> serde_json::Value {
        let sites: Vec<serde_json::Value> = self
            .sites
            .iter()
            .map(|site| {
                serde_json::json!({
                    "node": graph.nodes[site.node].id,
                    "operand": site.operand,
                    "context": graph.inputs[site.context].name,
                    "broadcast": graph.nodes[site.broadcast].id,
                })
            })
            .collect();
        serde_json::json!({
            "layers": self.layers,
            "parameters": self.parameters,
            "parameter_bytes": self.parameter_bytes,
            "point": self.point.0,
            "sites": sites,
            "bytes": {
                "weights": self.bytes.weights,
                "context_kv": self.bytes.context_kv,
                "decode_kv": self.bytes.decode_kv,
                "activations": self.bytes.activations,
                "total": self.bytes.total(),
            },
        })
    }
}
