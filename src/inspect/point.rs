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
    #[error("runtime dim `{name}` has no value: give it with --shape {name}=N")]
    Missing { name: String },
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
        for name in &graph.dims.runtime {
            let v = self
                .0
                .get(name)
                .copied()
                .or_else(|| DEFAULT_POINT.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
                .ok_or_else(|| PointError::Missing { name: name.clone() })?;
            out.insert(name.clone(), v);
        }
        Ok(Self(out))
    }
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
}
