//! The CPU backend of the runtime's [`Step`] interface: the compiled step
//! JIT-compiled for the host through MLIR ([`crate::lower::CpuStep`]). It
//! lives in this crate, not in `bifurc-runtime`, because it links MLIR.

use crate::interp::Tensor;
use crate::ir::Graph;
use crate::lower::{CpuStep, LowerError};
use bifurc_runtime::{HostTensor, Step, StepError};
use std::collections::{BTreeMap, HashMap};

/// A graph compiled for the CPU, with its bound inputs.
pub struct CpuBackend {
    step: CpuStep,
    runtime: Vec<String>,
    bound: HashMap<String, Tensor>,
}

impl CpuBackend {
    /// JIT-compiles `graph` (one compilation serves every value of the runtime dims).
    pub fn compile(graph: &Graph) -> Result<Self, LowerError> {
        Ok(Self { step: CpuStep::compile(graph)?, runtime: graph.dims.runtime.clone(), bound: HashMap::new() })
    }

    /// Binds a reference-interpreter tensor without copying through [`HostTensor`].
    pub fn bind_tensor(&mut self, name: &str, tensor: Tensor) {
        self.bound.insert(name.to_string(), tensor);
    }
}

impl Step for CpuBackend {
    fn runtime_dims(&self) -> Vec<String> {
        self.runtime.clone()
    }

    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
        let t =
            Tensor::new(tensor.shape.clone(), tensor.data.clone()).map_err(|e| StepError::Backend(e.to_string()))?;
        self.bound.insert(name.to_string(), t);
        Ok(())
    }

    fn run(&mut self, dims: &BTreeMap<String, i64>) -> Result<HashMap<String, HostTensor>, StepError> {
        let out = self.step.run(dims, &self.bound).map_err(|e| StepError::Backend(e.to_string()))?;
        Ok(out.into_iter().map(|(k, t)| (k, HostTensor { shape: t.shape, data: t.data })).collect())
    }
}
