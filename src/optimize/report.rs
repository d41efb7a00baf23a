//! The optimizer's report: per attention site, bytes, rules, e-graph size, time.

use crate::inspect::{group_digits, human_bytes, Bytes, ShapePoint};
use bifurc_passes::Report;
use std::fmt::Write;

/// One attention site of the input graph.
#[derive(Clone, Debug)]
pub struct SiteReport {
    /// The compute node that read the broadcast context.
    pub node: String,
    /// The context cache it reads.
    pub context: String,
    pub rewritten: bool,
    /// Why (not) rewritten.
    pub reason: String,
    /// Bytes read from this context cache per step, before and after.
    pub bytes_before: f64,
    pub bytes_after: f64,
}

#[derive(Clone, Debug)]
pub struct OptReport {
    pub point: ShapePoint,
    pub sites: Vec<SiteReport>,
    pub before: Bytes,
    pub after: Bytes,
    pub passes: Report,
}

impl OptReport {
    /// Predicted step speedup if the step is bound by memory traffic.
    pub fn predicted_speedup(&self) -> f64 {
        let after = self.after.total();
        if after > 0.0 {
            self.before.total() / after
        } else {
            1.0
        }
    }

    pub fn rewritten(&self) -> usize {
        self.sites.iter().filter(|s| s.rewritten).count()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "shape point: {}", self.point);
        let _ = writeln!(s, "attention sites: {} of {} rewritten", self.rewritten(), self.sites.len());
        for site in &self.sites {
            let _ = writeln!(
                s,
                "  {:<28} {:<20} {:>10} -> {:>10}  {}",
                site.node,
                site.context,
                human_bytes(site.bytes_before),
                human_bytes(site.bytes_after),
                site.reason
            );
        }
        let _ = writeln!(s, "bytes moved per step:      before          after");
        for (name, b, a) in [
            ("weights", self.before.weights, self.after.weights),
            ("context KV", self.before.context_kv, self.after.context_kv),
            ("decode KV", self.before.decode_kv, self.after.decode_kv),
            ("activations", self.before.activations, self.after.activations),
            ("total", self.before.total(), self.after.total()),
        ] {
            let _ = writeln!(s, "  {name:<12} {:>16} {:>14}", human_bytes(b), human_bytes(a));
        }
        let _ = writeln!(s, "predicted step speedup (bytes before / after): {:.2}x", self.predicted_speedup());
        let p = &self.passes;
        let _ = writeln!(
            s,
            "e-graph: {} nodes, {} classes, {} iterations, stopped: {}{}",
            group_digits(p.egraph_nodes as i64),
            group_digits(p.egraph_classes as i64),
            p.iterations,
            p.stop_reason,
            if p.hit_limit { " (LIMIT HIT: the result is correct but may be less optimized)" } else { "" }
        );
        let fired: Vec<String> = p.rules.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(s, "rules fired: {}", fired.join(", "));
        let _ = writeln!(
            s,
            "time: saturate {:.1} ms, extract {:.1} ms",
            p.saturate_time.as_secs_f64() * 1e3,
            p.extract_time.as_secs_f64() * 1e3
        );
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let bytes = |b: &Bytes| {
            serde_json::json!({"weights": b.weights, "context_kv": b.context_kv, "decode_kv": b.decode_kv,
                "activations": b.activations, "total": b.total()})
        };
        let p = &self.passes;
        serde_json::json!({
            "point": self.point.0,
            "sites": self.sites.iter().map(|s| serde_json::json!({
                "node": s.node, "context": s.context, "rewritten": s.rewritten, "reason": s.reason,
                "bytes_before": s.bytes_before, "bytes_after": s.bytes_after,
            })).collect::<Vec<_>>(),
            "bytes_before": bytes(&self.before),
            "bytes_after": bytes(&self.after),
            "predicted_speedup": self.predicted_speedup(),
            "egraph": {"nodes": p.egraph_nodes, "classes": p.egraph_classes, "iterations": p.iterations,
                "stop_reason": p.stop_reason, "hit_limit": p.hit_limit},
            "rules": p.rules,
            "time_ms": {"saturate": p.saturate_time.as_secs_f64() * 1e3, "extract": p.extract_time.as_secs_f64() * 1e3},
        })
    }
}
