//! A shape point: concrete values for the runtime dims (`--shape b=32,m_c=8192`).

use crate::ir::Graph;
use std::collections::BTreeMap;
use std::fmt;

/// The default point, where the method's headline numbers are quoted
/// (REFERENCES.md): 32 samples, an 8k context, 256 tokens decoded.
pub const DEFAULT_POINT: &[(&str, i64)] = &[("b", 32), ("m_c", 8192), ("m_d", 256)];

/// Values for runtime dims. Parse with [`ShapePoint::parse`]; bind to a graph
/// with [`ShapePoint::for_graph`] (defaults fill the dims not given).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShapePoint(pub BTreeMap<String, i64>);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    #[error("bad --shape entry `{0}`: expected NAME=VALUE, e.g. b=32,m_c=8192,m_d=256")]
    Syntax(String),
    #[error("bad --shape value for `{name}`: `{value}` is not a non-negative integer")]
    Value { name: String, value: String },
    #[error("--shape names `{name}` twice")]
    Twice { name: String },
    #[error("--shape names `{name}`, which is not a runtime dim of this graph (runtime dims: {known})")]
    Unknown { name: String, known: String },
    /// Every runtime dim without a value (none has a default).
    #[error("{}", missing_message(.names))]
    Missing { names: Vec<String> },
}

impl ShapePoint {
    pub fn parse(text: &str) -> Result<Self, PointError> {
        let mut out = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = part.split_once('=').ok_or_else(|| PointError::Syntax(part.to_string()))?;
            let (name, value) = (name.trim(), value.trim());
            if name.is_empty() {
                return Err(PointError::Syntax(part.to_string()));
            }
            let v: i64 = value
                .parse()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| PointError::Value { name: name.to_string(), value: value.to_string() })?;
            if out.insert(name.to_string(), v).is_some() {
                return Err(PointError::Twice { name: name.to_string() });
            }
        }
        Ok(Self(out))
    }

    /// Binds every runtime dim of `graph`: given values first, then
    /// [`DEFAULT_POINT`]. Names that are not runtime dims are an error.
    pub fn for_graph(&self, graph: &Graph) -> Result<Self, PointError> {
        for name in self.0.keys() {
            if !graph.dims.is_runtime(name) {
                return Err(PointError::Unknown { name: name.clone(), known: graph.dims.runtime.join(", ") });
            }
        }
        let mut out = BTreeMap::new();
        let mut missing = Vec::new();
        for name in &graph.dims.runtime {
            let given = self.0.get(name).copied();
            match given.or_else(|| DEFAULT_POINT.iter().find(|(n, _)| n == name).map(|(_, v)| *v)) {
                Some(v) => {
                    out.insert(name.clone(), v);
                }
                None => missing.push(name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(PointError::Missing { names: missing });
        }
        Ok(Self(out))
    }
}

/// What [`PointError::Missing`] says: the dims, and the `--shape` that
/// gives them.
fn missing_message(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    let shape: Vec<String> = names.iter().map(|n| format!("{n}=N")).collect();
    let (dims, verb, pronoun) = if names.len() == 1 { ("dim", "has", "it") } else { ("dims", "have", "them") };
    format!("runtime {dims} {} {verb} no value: give {pronoun} with --shape {}", quoted.join(", "), shape.join(","))
}

impl fmt::Display for ShapePoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points() {
        let p = ShapePoint::parse("b=32, m_c=8192,m_d=0").unwrap();
        assert_eq!(p.0["b"], 32);
        assert_eq!(p.0["m_d"], 0);
        assert_eq!(p.to_string(), "b=32, m_c=8192, m_d=0");
        assert!(matches!(ShapePoint::parse("b"), Err(PointError::Syntax(_))));
        assert!(matches!(ShapePoint::parse("b=-1"), Err(PointError::Value { .. })));
        assert!(matches!(ShapePoint::parse("b=x"), Err(PointError::Value { .. })));
        assert!(matches!(ShapePoint::parse("b=1,b=2"), Err(PointError::Twice { .. })));
    }

    /// Every runtime dim without a value is named at once.
    #[test]
    fn names_every_missing_dim() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["P", "S", "m_s", "m_c"], "constants": {}},
            "inputs": [{"name": "x", "role": "activation", "shape": ["P", "S", "m_s", "m_c"], "dtype": "f32"}],
            "nodes": [{"id": "y", "op": "exp", "inputs": ["x"]}],
            "outputs": [{"name": "y", "node": "y"}]
        });
        let graph = crate::import::from_value(&doc).unwrap();
        let err = ShapePoint::parse("S=4").unwrap().for_graph(&graph).unwrap_err().to_string();
        assert_eq!(err, "runtime dims `P`, `m_s` have no value: give them with --shape P=N,m_s=N");
        let err = ShapePoint::parse("S=4,m_s=2").unwrap().for_graph(&graph).unwrap_err().to_string();
        assert_eq!(err, "runtime dim `P` has no value: give it with --shape P=N");
        let p = ShapePoint::parse("S=4,m_s=2,P=1").unwrap().for_graph(&graph).unwrap();
        assert_eq!(p.to_string(), "P=1, S=4, m_c=8192, m_s=2");
    }
}
