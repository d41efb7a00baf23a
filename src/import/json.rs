//! A path-tracking reader over `serde_json::Value`: every error names the
//! JSON path at fault (`nodes[3].attrs.axis`).

use super::ImportError;
use serde_json::{Map, Value};

/// A JSON value and the path that led to it.
#[derive(Clone, Copy)]
pub struct At<'a, 'p> {
    pub value: &'a Value,
    pub path: &'p str,
}

/// An owned path for children (paths are built as strings on demand).
pub struct Child<'a> {
    pub value: &'a Value,
    pub path: String,
}

impl<'a> Child<'a> {
    pub fn at(&self) -> At<'a, '_> {
        At { value: self.value, path: &self.path }
    }
}

pub fn err(path: &str, message: impl Into<String>) -> ImportError {
    ImportError::At { path: path.to_string(), message: message.into() }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> At<'a, '_> {
    pub fn object(&self) -> Result<&'a Map<String, Value>, ImportError> {
        self.value
            .as_object()
            .ok_or_else(|| err(self.path, format!("expected an object, got {}", type_name(self.value))))
    }

    pub fn array(&self) -> Result<Vec<Child<'a>>, ImportError> {
        let items = self
            .value
            .as_array()
            .ok_or_else(|| err(self.path, format!("expected an array, got {}", type_name(self.value))))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, v)| Child { value: v, path: format!("{}[{i}]", if self.path == ROOT { "" } else { self.path }) })
            .collect())
    }

    pub fn str(&self) -> Result<&'a str, ImportError> {
        self.value.as_str().ok_or_else(|| err(self.path, format!("expected a string, got {}", type_name(self.value))))
    }

    pub fn i64(&self) -> Result<i64, ImportError> {
        self.value.as_i64().ok_or_else(|| {
            let what =
                if self.value.is_number() { "a non-integer or out-of-range number" } else { type_name(self.value) };
            err(self.path, format!("expected an integer, got {what}"))
        })
    }

    pub fn f64(&self) -> Result<f64, ImportError> {
        self.value.as_f64().ok_or_else(|| err(self.path, format!("expected a number, got {}", type_name(self.value))))
    }

    pub fn bool(&self) -> Result<bool, ImportError> {
        self.value.as_bool().ok_or_else(|| err(self.path, format!("expected a boolean, got {}", type_name(self.value))))
    }

    /// A required field of an object.
    pub fn field(&self, name: &str) -> Result<Child<'a>, ImportError> {
        self.opt(name)?.ok_or_else(|| err(self.path, format!("missing field `{name}`")))
    }

    /// An optional field of an object (`null` counts as absent).
    pub fn opt(&self, name: &str) -> Result<Option<Child<'a>>, ImportError> {
        let obj = self.object()?;
        Ok(obj.get(name).filter(|v| !v.is_null()).map(|v| Child { value: v, path: join(self.path, name) }))
    }

    /// Rejects keys outside `allowed` (catches typos such as `atrs`).
    pub fn only(&self, allowed: &[&str]) -> Result<(), ImportError> {
        for key in self.object()?.keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(err(self.path, format!("unknown field `{key}` (expected one of: {})", allowed.join(", "))));
            }
        }
        Ok(())
    }
}

/// The path of the document itself, as printed in errors.
pub const ROOT: &str = "top level";

pub fn join(path: &str, name: &str) -> String {
    if path == ROOT {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}
