//! Typed reads of config.json fields. A field that is absent or `null` is
//! "not set" for optional reads; a required field must be present and well
//! typed. Every error names the field.

use super::HfError;
use serde_json::{Map, Value as Json};

/// The top-level object of a config.json.
pub(super) struct Config<'a> {
    map: &'a Map<String, Json>,
}

/// A short description of a JSON value for error messages.
fn found(v: &Json) -> String {
    match v {
        Json::Null => "null".into(),
        Json::Bool(b) => format!("the boolean {b}"),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) => format!("the string {}", Json::String(s.clone())),
        Json::Array(_) => "an array".into(),
        Json::Object(_) => "an object".into(),
    }
}

impl<'a> Config<'a> {
    /// Parses config.json text; the top level must be an object.
    pub(super) fn parse(text: &str) -> Result<serde_json::Value, HfError> {
        let value: Json = serde_json::from_str(text).map_err(|e| HfError::Json(e.to_string()))?;
        if !value.is_object() {
            return Err(HfError::NotObject(found(&value)));
        }
        Ok(value)
    }

    pub(super) fn new(value: &'a Json) -> Result<Self, HfError> {
        value.as_object().map(|map| Config { map }).ok_or_else(|| HfError::NotObject(found(value)))
    }

    /// True when the field is present, even as `null`.
    pub(super) fn has(&self, field: &str) -> bool {
        self.map.contains_key(field)
    }

    /// The raw value of a field, `None` when absent or `null`.
    pub(super) fn get(&self, field: &str) -> Option<&'a Json> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn bad(field: &str, expected: &'static str, v: &Json) -> HfError {
        HfError::BadField { field: field.to_string(), expected, found: found(v) }
    }

    /// A required positive integer.
    pub(super) fn req_usize(&self, field: &str) -> Result<usize, HfError> {
        match self.map.get(field) {
            None => Err(HfError::MissingField { field: field.to_string() }),
            Some(v) => Self::positive(field, v),
        }
    }

    /// An optional positive integer.
    pub(super) fn opt_usize(&self, field: &str) -> Result<Option<usize>, HfError> {
        self.get(field).map(|v| Self::positive(field, v)).transpose()
    }

    fn positive(field: &str, v: &Json) -> Result<usize, HfError> {
        v.as_u64()
            .filter(|&n| n > 0 && i64::try_from(n).is_ok())
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Self::bad(field, "a positive integer", v))
    }

    /// An optional positive, finite number.
    pub(super) fn opt_f64(&self, field: &str) -> Result<Option<f64>, HfError> {
        self.get(field)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| Self::bad(field, "a positive number", v))
            })
            .transpose()
    }

    pub(super) fn opt_bool(&self, field: &str) -> Result<Option<bool>, HfError> {
        self.get(field).map(|v| v.as_bool().ok_or_else(|| Self::bad(field, "true or false", v))).transpose()
    }

    pub(super) fn opt_str(&self, field: &str) -> Result<Option<&'a str>, HfError> {
        self.get(field).map(|v| v.as_str().ok_or_else(|| Self::bad(field, "a string", v))).transpose()
    }

    /// A required string (present, not `null`).
    pub(super) fn req_str(&self, field: &str) -> Result<&'a str, HfError> {
        match self.map.get(field) {
            None => Err(HfError::MissingField { field: field.to_string() }),
            Some(v) => v.as_str().ok_or_else(|| Self::bad(field, "a string", v)),
        }
    }

    /// The first entry of `architectures` when it is a list of strings.
    pub(super) fn architecture_class(&self) -> Option<&'a str> {
        self.get("architectures")?.as_array()?.first()?.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_and_rejects_fields() {
        let v = json!({"a": 4, "b": 0, "c": "4", "d": null, "e": 1e-5, "f": -1.0, "g": true, "h": 4.5});
        let c = Config::new(&v).unwrap();
        assert_eq!(c.req_usize("a").unwrap(), 4);
        assert_eq!(c.opt_usize("d").unwrap(), None);
        assert_eq!(c.opt_usize("zz").unwrap(), None);
        assert_eq!(c.req_usize("zz").unwrap_err().to_string(), "config field `zz` is missing");
        assert_eq!(
            c.req_usize("b").unwrap_err().to_string(),
            "config field `b` must be a positive integer, got the number 0"
        );
        assert_eq!(
            c.req_usize("c").unwrap_err().to_string(),
            "config field `c` must be a positive integer, got the string \"4\""
        );
        assert_eq!(c.req_usize("d").unwrap_err().to_string(), "config field `d` must be a positive integer, got null");
        assert!(c.opt_usize("h").is_err());
        assert_eq!(c.opt_f64("e").unwrap(), Some(1e-5));
        assert!(c.opt_f64("f").is_err());
        assert_eq!(c.opt_bool("g").unwrap(), Some(true));
        assert!(c.opt_bool("a").is_err());
        assert!(c.opt_str("a").is_err());
    }

    #[test]
    fn top_level_must_be_an_object() {
        assert!(matches!(Config::parse("[1]"), Err(HfError::NotObject(_))));
        assert!(matches!(Config::parse("{"), Err(HfError::Json(_))));
    }
}
