//! The interface every backend implements: bind named host tensors, run one
//! decode step at given runtime dims, get the outputs back.
//!
//! Names are the graph's input names (weights under their Hugging Face
//! names, `token_ids`, `positions`, `cache.{layer}.k_ctx`, …) and output
//! names (`logits`, `layer.{layer}.k_new`, …), as listed in the manifest's
//! buffer table. Data crosses the interface as `f32` (integers as exact
//! `f32` values below 2^24); a backend converts to the storage dtype.

use std::collections::{BTreeMap, HashMap};

/// A dense row-major host tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`; `None` when the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self { shape, data: vec![0.0; n] }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Errors a backend reports. Messages name the buffer, kernel or dim at fault.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("input `{0}` is not bound")]
    Unbound(String),
    #[error("`{name}`: expected shape {expected:?} at these dims, got {got:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("no buffer named `{0}` in this artifact")]
    UnknownBuffer(String),
    #[error("runtime dims: {0}")]
    Dims(String),
    #[error("{0}")]
    Backend(String),
}

/// One compiled decode step on some device.
pub trait Step {
    /// The runtime dims the step takes (`b`, `m_c`, `m_d`, …), in order.
    fn runtime_dims(&self) -> Vec<String>;

    /// Binds input `name` to `tensor` until it is bound again. A backend may
    /// keep it on the device (weights are bound once).
    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError>;

    /// Runs one step with every input bound, at `dims` (each runtime dim),
    /// and returns every output by name.
    fn run(&mut self, dims: &BTreeMap<String, i64>) -> Result<HashMap<String, HostTensor>, StepError>;
}
