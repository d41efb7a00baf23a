//! The artifact manifest: what `bifurc compile` writes beside `step.ptx`
//! (`step.manifest.json`) and what an engine reads to run the kernels.
//!
//! It is the contract between the compiler and whoever launches the code, so
//! it is plain data: dims, a buffer table, kernels in launch order with their
//! parameters (ABI order and types) and launch geometry as size expressions
//! over the dims, the attention sites that were bifurcated, and the
//! bytes-moved model. docs/artifact.md documents every field.
//!
//! Sizes that depend on the runtime dims are [`Size::Expr`] strings in a tiny
//! language — integers, dim names, `+ - * /`, parentheses, `ceil(…)` and
//! `floor(…)` — evaluated by [`eval_expr`] (or [`Manifest::eval`], which binds
//! the model constants for you). `/` is exact rational division; the final
//! value must be a whole number (wrap a division in `ceil` or `floor`).
//!
//! ```
//! use bifurc_runtime::manifest::{eval_expr, Manifest};
//! use std::collections::BTreeMap;
//!
//! let dims = BTreeMap::from([("b".to_string(), 32), ("h".to_string(), 4)]);
//! assert_eq!(eval_expr("ceil((b*h*100)/256)", &dims).unwrap(), 50);
//! assert!(Manifest::from_str("{}").is_err());
//! ```

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// The format tag of the manifests this crate reads and bifurc writes.
pub const FORMAT: &str = "bifurc-artifact/1";

/// Threads per block of every kernel in this format version.
pub const BLOCK_SIZE: i64 = 256;

/// A size: a whole number, or an expression over the dims (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Int(i64),
    Expr(String),
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Int(v) => write!(f, "{v}"),
            Size::Expr(e) => f.write_str(e),
        }
    }
}

impl From<i64> for Size {
    fn from(v: i64) -> Self {
        Size::Int(v)
    }
}

/// The manifest of one compiled decode step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// File name of the PTX module, in the manifest's directory (`step.ptx`).
    pub ptx: String,
    /// The chip the PTX was compiled for: `sm_80`, `sm_90`.
    pub target: String,
    /// Whether the optimizer ran (`false` with `bifurc compile --no-bifurcate`).
    pub bifurcate: bool,
    /// The tensor-core tuning it was compiled with (`bifurc compile
    /// --tune`), as `key=value,...`: the settings that differ from the
    /// defaults; empty (and absent from the file) for the defaults.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tuning: String,
    /// Provenance copied from the model graph's `meta` (architecture, source, …).
    #[serde(default)]
    pub model: BTreeMap<String, String>,
    pub dims: Dims,
    /// The shape point `bifurc compile` optimized for and evaluated the
    /// `*_at_point` figures at (a value for every runtime dim).
    pub point: BTreeMap<String, i64>,
    /// Every buffer a step touches; kernels name them.
    pub buffers: Vec<Buffer>,
    /// In launch order.
    pub kernels: Vec<Kernel>,
    /// Attention sites over a batch-broadcast context cache in the input graph.
    pub attention: Vec<AttentionSite>,
    /// The bytes-moved model of the step at [`Manifest::point`].
    pub bytes: BytesSummary,
}

/// Symbolic sizes: runtime dims vary per step, constants are fixed by the model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dims {
    /// In kernel-ABI order: every kernel takes them first, as `i64`, in this order.
    pub runtime: Vec<String>,
    pub constants: BTreeMap<String, i64>,
}

/// What a buffer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    /// Bound by the caller before the step (weights, caches, token ids, …).
    Input,
    /// Scratch the caller allocates; written and read within the step.
    Intermediate,
    /// Written by the step for the caller (logits, new K/V rows).
    Output,
}

/// One buffer: a dense, row-major (C-order), contiguous array.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub name: String,
    pub kind: BufferKind,
    /// For inputs: `token_ids`, `activation`, `weight`, `position`,
    /// `context_kv`, `decode_kv`; for outputs: `logits`, `new_kv`, `other`;
    /// absent for intermediates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Layer of a KV cache input or new-KV output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// `k` or `v`, for KV caches and new-KV outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<String>,
    /// Dimensions, outermost first.
    pub shape: Vec<Size>,
    /// Element type: `f32`, `f16`, `bf16`, `i32`, `i64`.
    pub dtype: String,
    /// Size in bytes: product of the shape times the element size.
    pub bytes: Size,
    /// Set for a KV cache that may be stored with spare rows (see [`Pitch`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pitch: Option<Pitch>,
}

/// A buffer that may be stored with spare rows: axis `axis`, of size
/// runtime dim `dim`, is laid out with a stride of `capacity` rows, where
/// `capacity >= dim` is the kernel parameter of kind
/// [`ParamKind::Capacity`] named `dim`. Passing the dim's own value means
/// dense data; a larger capacity lets a runtime append rows in place (a
/// decode cache `[b, g, m_d, k]` stored as `[b, g, capacity, k]`, a context
/// cache `[g, m_c, k]` as `[g, capacity, k]`). The
/// buffer's `shape` and `bytes` are the dense ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pitch {
    pub axis: usize,
    pub dim: String,
}

/// A kernel parameter, in ABI order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    /// A runtime dim name (kinds `dim` and `capacity`) or a buffer name.
    pub name: String,
    pub kind: ParamKind,
    /// `i64` for dims; `ptr` (a bare 64-bit device pointer) for buffers.
    #[serde(rename = "type")]
    pub ty: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    Dim,
    /// The row capacity (`i64`) of the buffers pitched along the runtime
    /// dim this parameter names (see [`Pitch`]).
    Capacity,
    Buffer,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    /// The kernel's name (`k{index}_{node}`), unique in the manifest.
    pub name: String,
    /// The PTX `.entry` to launch for it. Kernels with identical code share
    /// one entry (the first of them: its `entry` is its own `name`); launch
    /// the entry with this kernel's own arguments.
    pub entry: String,
    /// The graph node it computes.
    pub node: String,
    /// That node's op (`matmul`, `softmax`, …).
    pub op: String,
    /// Parameters in ABI order: the runtime dims, then buffer pointers.
    pub params: Vec<Param>,
    /// Buffers read, by name.
    pub reads: Vec<String>,
    /// The buffer written, by name.
    pub writes: String,
    /// Threads doing work: one per output element (threads at index >= extent exit).
    pub extent: Size,
    /// Blocks: `[ceil((extent)/256), 1, 1]`.
    pub grid: [Size; 3],
    /// Threads per block: `[256, 1, 1]`.
    pub block: [Size; 3],
    /// Bytes this kernel moves in the bytes model, as expressions over the runtime dims.
    pub bytes: ByteExprs,
    /// `bytes.total` at [`Manifest::point`].
    pub bytes_at_point: i64,
}

/// Bytes moved, by where they land, as expressions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ByteExprs {
    pub weights: Size,
    pub context_kv: Size,
    pub decode_kv: Size,
    pub activations: Size,
    pub total: Size,
}

/// An attention site that reads a batch-broadcast context cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionSite {
    /// The compute node of the input graph that read the broadcast context.
    pub node: String,
    /// The context cache input.
    pub context: String,
    /// True when the compiled step reads that cache once per step.
    pub bifurcated: bool,
    pub reason: String,
    /// Bytes read from the context cache per step at the point, before and after.
    pub bytes_before: i64,
    pub bytes_after: i64,
}

/// Bytes moved by one step at a point, by category.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ByteCounts {
    pub weights: i64,
    pub context_kv: i64,
    pub decode_kv: i64,
    pub activations: i64,
    pub total: i64,
}

/// The bytes model of the whole step: the input graph (`before`) and the
/// compiled one (`after`), at [`Manifest::point`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BytesSummary {
    pub before: ByteCounts,
    pub after: ByteCounts,
    /// `before.total / after.total`: the step speedup if it is bound by memory traffic.
    pub predicted_speedup: f64,
}

/// A kernel's launch geometry at concrete dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

/// Each message says its cause; none is also given as the `source()`, so
/// an error chain (`anyhow`'s `{:#}`) words each error once.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("manifest is not valid JSON of the expected shape: {0}")]
    Json(serde_json::Error),
    #[error("unsupported manifest format `{found}` (this runtime reads `{FORMAT}`)")]
    Format { found: String },
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("{context}: {error}")]
    Expr { context: String, error: ExprError },
}

/// Said in the message, not also given as the source (each error is
/// worded once in a chain).
impl From<serde_json::Error> for ManifestError {
    fn from(e: serde_json::Error) -> Self {
        ManifestError::Json(e)
    }
}

impl std::str::FromStr for Manifest {
    type Err = ManifestError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // Check the tag first, so a manifest of another version says so
        // instead of failing on a missing field.
        let value: serde_json::Value = serde_json::from_str(text)?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) => return Err(ManifestError::Format { found: other.to_string() }),
            None => return Err(ManifestError::Invalid("missing string field `format`".to_string())),
        }
        let manifest: Manifest = serde_json::from_value(value)?;
        manifest.validate()?;
        Ok(manifest)
    }
}

impl Manifest {
    /// Parses and validates a manifest.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str) -> Result<Self, ManifestError> {
        text.parse()
    }

    /// Reads, parses and validates a manifest file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ManifestError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|error| ManifestError::Read { path: path.display().to_string(), error })?;
        text.parse()
    }

    /// Deterministic pretty JSON with a trailing newline: the same manifest
    /// always gives the same bytes (fields in declaration order, maps sorted).
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        text.push('\n');
        text
    }

    /// Checks references and expressions: every param names a runtime dim or
    /// a buffer, reads/writes name buffers, every size parses and mentions
    /// only dims, the point binds every runtime dim.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |s: String| Err(ManifestError::Invalid(s));
        if self.format != FORMAT {
            return Err(ManifestError::Format { found: self.format.clone() });
        }
        let mut known: BTreeSet<&str> = BTreeSet::new();
        for name in &self.dims.runtime {
            if !known.insert(name) {
                return invalid(format!("runtime dim `{name}` is listed twice"));
            }
        }
        for name in self.dims.constants.keys() {
            if !known.insert(name) {
                return invalid(format!("dim `{name}` is both a runtime dim and a constant"));
            }
        }
        for name in &self.dims.runtime {
            if !self.point.contains_key(name) {
                return invalid(format!("`point` has no value for runtime dim `{name}`"));
            }
        }
        let check = |size: &Size, what: &dyn Fn() -> String| -> Result<(), ManifestError> {
            if let Size::Expr(text) = size {
                let expr = parse_expr(text).map_err(|error| ManifestError::Expr { context: what(), error })?;
                if let Some(name) = expr.names().into_iter().find(|n| !known.contains(n.as_str())) {
                    return Err(ManifestError::Expr { context: what(), error: ExprError::Unbound(name) });
                }
            }
            Ok(())
        };
        let mut buffers: BTreeSet<&str> = BTreeSet::new();
        for buffer in &self.buffers {
            if !buffers.insert(&buffer.name) {
                return invalid(format!("buffer `{}` is listed twice", buffer.name));
            }
            for (axis, size) in buffer.shape.iter().enumerate() {
                check(size, &|| format!("buffer `{}` shape[{axis}]", buffer.name))?;
            }
            check(&buffer.bytes, &|| format!("buffer `{}` bytes", buffer.name))?;
            if let Some(p) = &buffer.pitch {
                let rows = buffer.shape.get(p.axis);
                if rows != Some(&Size::Expr(p.dim.clone())) || !self.dims.runtime.contains(&p.dim) {
                    return invalid(format!(
                        "buffer `{}`: pitch on axis {} needs that axis to be runtime dim `{}`",
                        buffer.name, p.axis, p.dim
                    ));
                }
            }
        }
        let mut kernels: BTreeSet<&str> = BTreeSet::new();
        let entries: BTreeSet<&str> =
            self.kernels.iter().filter(|k| k.entry == k.name).map(|k| k.name.as_str()).collect();
        for kernel in &self.kernels {
            let name = &kernel.name;
            if !kernels.insert(name) {
                return invalid(format!("kernel `{name}` is listed twice"));
            }
            if !entries.contains(kernel.entry.as_str()) {
                return invalid(format!(
                    "kernel `{name}`: entry `{}` is not a kernel that is its own entry",
                    kernel.entry
                ));
            }
            for param in &kernel.params {
                let ok = match param.kind {
                    ParamKind::Dim | ParamKind::Capacity => {
                        self.dims.runtime.contains(&param.name) && param.ty == "i64"
                    }
                    ParamKind::Buffer => buffers.contains(param.name.as_str()) && param.ty == "ptr",
                };
                if !ok {
                    return invalid(format!(
                        "kernel `{name}`: parameter `{}` ({:?}, {}) is not a runtime dim (or its capacity) of type i64 or a buffer of type ptr",
                        param.name, param.kind, param.ty
                    ));
                }
            }
            for read in kernel.reads.iter().chain(std::iter::once(&kernel.writes)) {
                if !buffers.contains(read.as_str()) {
                    return invalid(format!("kernel `{name}` names unknown buffer `{read}`"));
                }
            }
            check(&kernel.extent, &|| format!("kernel `{name}` extent"))?;
            for axis in 0..3 {
                check(&kernel.grid[axis], &|| format!("kernel `{name}` grid[{axis}]"))?;
                check(&kernel.block[axis], &|| format!("kernel `{name}` block[{axis}]"))?;
            }
            let b = &kernel.bytes;
            for (field, size) in [
                ("weights", &b.weights),
                ("context_kv", &b.context_kv),
                ("decode_kv", &b.decode_kv),
                ("activations", &b.activations),
                ("total", &b.total),
            ] {
                check(size, &|| format!("kernel `{name}` bytes.{field}"))?;
            }
        }
        Ok(())
    }

    /// All dims bound: the constants plus `runtime`, which must give every
    /// runtime dim (and nothing else).
    pub fn bind(&self, runtime: &BTreeMap<String, i64>) -> Result<BTreeMap<String, i64>, ManifestError> {
        for name in runtime.keys() {
            if !self.dims.runtime.contains(name) {
                return Err(ManifestError::Invalid(format!(
                    "`{name}` is not a runtime dim (runtime dims: {})",
                    self.dims.runtime.join(", ")
                )));
            }
        }
        let mut all = self.dims.constants.clone();
        for name in &self.dims.runtime {
            let value = runtime
                .get(name)
                .copied()
                .ok_or_else(|| ManifestError::Invalid(format!("runtime dim `{name}` has no value")))?;
            all.insert(name.clone(), value);
        }
        Ok(all)
    }

    /// Evaluates a size at the runtime dims (constants are bound for you).
    pub fn eval(&self, size: &Size, runtime: &BTreeMap<String, i64>) -> Result<i64, ManifestError> {
        let dims = self.bind(runtime)?;
        eval_size(size, &dims).map_err(|error| ManifestError::Expr { context: format!("`{size}`"), error })
    }

    /// Grid and block of `kernel` at the runtime dims.
    pub fn launch(&self, kernel: &Kernel, runtime: &BTreeMap<String, i64>) -> Result<Launch, ManifestError> {
        let dims = self.bind(runtime)?;
        let mut launch = Launch { grid: [1; 3], block: [1; 3] };
        for axis in 0..3 {
            for (size, out, what) in [
                (&kernel.grid[axis], &mut launch.grid[axis], "grid"),
                (&kernel.block[axis], &mut launch.block[axis], "block"),
            ] {
                let context = || format!("kernel `{}` {what}[{axis}]", kernel.name);
                let v = eval_size(size, &dims).map_err(|error| ManifestError::Expr { context: context(), error })?;
                *out = u32::try_from(v).map_err(|_| ManifestError::Expr {
                    context: context(),
                    error: ExprError::Range(format!("{v} does not fit a launch dimension")),
                })?;
            }
        }
        Ok(launch)
    }

    /// A buffer by name.
    pub fn buffer(&self, name: &str) -> Option<&Buffer> {
        self.buffers.iter().find(|b| b.name == name)
    }
}

/// Evaluates a [`Size`] with every name in `dims`.
pub fn eval_size(size: &Size, dims: &BTreeMap<String, i64>) -> Result<i64, ExprError> {
    match size {
        Size::Int(v) => Ok(*v),
        Size::Expr(text) => eval_expr(text, dims),
    }
}

// --- size expressions -------------------------------------------------------

pub use crate::expr::{eval_expr, parse_expr, Expr, ExprError};

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn evaluates_expressions() {
        let d = dims(&[("b", 32), ("m_c", 8192), ("m_d", 256), ("h", 4), ("k", 16)]);
        assert_eq!(eval_expr("b*h*k", &d).unwrap(), 2048);
        assert_eq!(eval_expr("m_c+m_d+1", &d).unwrap(), 8449);
        assert_eq!(eval_expr("2*(b-1) - -3", &d).unwrap(), 65);
        assert_eq!(eval_expr("ceil((b*h*k+1)/256)", &d).unwrap(), 9);
        assert_eq!(eval_expr("floor((b*h*k+1)/256)", &d).unwrap(), 8);
        assert_eq!(eval_expr("ceil(0/256)", &d).unwrap(), 0);
        assert_eq!(eval_expr("b/2", &d).unwrap(), 16);
        assert_eq!(eval_expr("ceil(-3/2)", &d).unwrap(), -1);
        assert_eq!(eval_expr("4096*b*m_c+8*b", &d).unwrap(), 4096 * 32 * 8192 + 256);
    }

    #[test]
    fn reports_errors() {
        let d = dims(&[("b", 3)]);
        assert_eq!(eval_expr("x+1", &d), Err(ExprError::Unbound("x".into())));
        assert!(matches!(eval_expr("b/2", &d), Err(ExprError::NotWhole(_))));
        assert_eq!(eval_expr("b/(b-3)", &d), Err(ExprError::DivisionByZero));
        for bad in ["", "b+", "(b", "b)", "sqrt(b)", "b % 2", "ceil b", "99999999999999999999"] {
            assert!(matches!(parse_expr(bad), Err(ExprError::Syntax { .. })), "{bad}");
        }
        assert_eq!(eval_expr("9223372036854775807*9223372036854775807*4", &d), Err(ExprError::Overflow));
    }

    fn sample() -> Manifest {
        let bytes = |e: &str| ByteExprs {
            weights: Size::Int(0),
            context_kv: Size::Int(0),
            decode_kv: Size::Int(0),
            activations: Size::Expr(e.into()),
            total: Size::Expr(e.into()),
        };
        Manifest {
            format: FORMAT.into(),
            ptx: "step.ptx".into(),
            target: "sm_90".into(),
            bifurcate: true,
            tuning: String::new(),
            model: BTreeMap::new(),
            dims: Dims { runtime: vec!["b".into()], constants: BTreeMap::from([("d".into(), 8)]) },
            point: BTreeMap::from([("b".into(), 2)]),
            buffers: vec![
                Buffer {
                    name: "x".into(),
                    kind: BufferKind::Input,
                    role: Some("activation".into()),
                    layer: None,
                    kv: None,
                    shape: vec![Size::Expr("b".into()), Size::Expr("d".into())],
                    dtype: "f32".into(),
                    bytes: Size::Expr("4*b*d".into()),
                    pitch: None,
                },
                Buffer {
                    name: "y".into(),
                    kind: BufferKind::Output,
                    role: Some("other".into()),
                    layer: None,
                    kv: None,
                    shape: vec![Size::Expr("b".into()), Size::Expr("d".into())],
                    dtype: "f32".into(),
                    bytes: Size::Expr("4*b*d".into()),
                    pitch: None,
                },
            ],
            kernels: vec![Kernel {
                name: "k0_y".into(),
                entry: "k0_y".into(),
                node: "y".into(),
                op: "exp".into(),
                params: vec![
                    Param { name: "b".into(), kind: ParamKind::Dim, ty: "i64".into() },
                    Param { name: "x".into(), kind: ParamKind::Buffer, ty: "ptr".into() },
                    Param { name: "y".into(), kind: ParamKind::Buffer, ty: "ptr".into() },
                ],
                reads: vec!["x".into()],
                writes: "y".into(),
                extent: Size::Expr("b*d".into()),
                grid: [Size::Expr("ceil((b*d)/256)".into()), Size::Int(1), Size::Int(1)],
                block: [Size::Int(256), Size::Int(1), Size::Int(1)],
                bytes: bytes("64*b"),
                bytes_at_point: 128,
            }],
            attention: vec![],
            bytes: BytesSummary::default(),
        }
    }

    #[test]
    fn round_trips_and_launches() {
        let m = sample();
        let text = m.to_json();
        let back = Manifest::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_json(), text);
        let launch = m.launch(&m.kernels[0], &dims(&[("b", 100)])).unwrap();
        assert_eq!(launch, Launch { grid: [4, 1, 1], block: [256, 1, 1] });
        assert_eq!(m.eval(&m.kernels[0].bytes.total, &dims(&[("b", 3)])).unwrap(), 192);
        assert!(m.eval(&m.kernels[0].extent, &dims(&[])).unwrap_err().to_string().contains("`b` has no value"));
        assert!(m.eval(&m.kernels[0].extent, &dims(&[("b", 1), ("d", 2)])).is_err());
    }

    #[test]
    fn rejects_bad_manifests() {
        let err = Manifest::from_str("not json").unwrap_err();
        assert!(matches!(err, ManifestError::Json(_)), "{err}");
        let err = Manifest::from_str(r#"{"format": "bifurc-artifact/9"}"#).unwrap_err();
        assert!(err.to_string().contains("bifurc-artifact/9"), "{err}");
        let err = Manifest::from_str(r#"{"format": "bifurc-artifact/1"}"#).unwrap_err();
        assert!(matches!(err, ManifestError::Json(_)), "{err}");

        let mut m = sample();
        m.kernels[0].params[1].name = "nope".into();
        let err = Manifest::from_str(&m.to_json()).unwrap_err().to_string();
        assert!(err.contains("`nope`"), "{err}");

        let mut m = sample();
        m.kernels[0].entry = "k9_other".into();
        let err = Manifest::from_str(&m.to_json()).unwrap_err().to_string();
        assert!(err.contains("k9_other"), "{err}");

        let mut m = sample();
        m.kernels[0].extent = Size::Expr("b*q".into());
        let err = Manifest::from_str(&m.to_json()).unwrap_err().to_string();
        assert!(err.contains("extent") && err.contains("`q`"), "{err}");

        let mut m = sample();
        m.point.clear();
        assert!(Manifest::from_str(&m.to_json()).unwrap_err().to_string().contains("point"));

        let err = Manifest::load("/nonexistent/step.manifest.json").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/step.manifest.json"), "{err}");
    }
}
