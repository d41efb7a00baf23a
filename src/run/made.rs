//! The steps of a run, made before anything is bound: the decode step on
//! its device with what it needs, a prefill step beside it, and how the
//! prefill step comes by its weights.

use super::load::jit;
use super::{fail, Device, RunError};
use crate::cpu_backend::CpuBackend;
use bifurc_runtime::manifest::Manifest;
use bifurc_runtime::session::DecodeLayout;
use bifurc_runtime::weights::WeightSource;
use bifurc_runtime::{Artifact, Step};
use std::collections::BTreeMap;
use std::path::Path;

/// A step made for a run, nothing bound yet: its device's name, the bytes
/// it needs at the run's largest point and what its device has available
/// (`None`: unknown).
pub(super) struct Made {
    pub(super) step: MadeStep,
    pub(super) device: String,
    pub(super) needed: usize,
    pub(super) available: Option<usize>,
}

/// A step as made: on the CPU the backend itself until its weights are
/// bound, so that a prefill step can share the decode step's
/// ([`CpuBackend::bind_shared`]) instead of holding a second copy.
pub(super) enum MadeStep {
    Cpu(Box<CpuBackend>),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Other(Box<dyn Step>),
}

impl MadeStep {
    pub(super) fn step(&mut self) -> &mut dyn Step {
        match self {
            MadeStep::Cpu(step) => step.as_mut(),
            MadeStep::Other(step) => step.as_mut(),
        }
    }

    pub(super) fn boxed(self) -> Box<dyn Step> {
        match self {
            MadeStep::Cpu(step) => step,
            MadeStep::Other(step) => step,
        }
    }

    /// The weights of `manifest` (this step's) that it can share with
    /// `decode`, stored alike by both: CPU steps only.
    pub(super) fn shares_with(&self, decode: &MadeStep, manifest: &Manifest) -> Vec<String> {
        match (self, decode) {
            (MadeStep::Cpu(this), MadeStep::Cpu(decode)) => bifurc_runtime::weights::weight_buffers(manifest)
                .filter(|b| this.stores_alike(decode, &b.name))
                .map(|b| b.name.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Bytes of the weights named by `names` as this step stores them.
    pub(super) fn bytes_of(&self, names: &[String], manifest: &Manifest) -> Result<usize, RunError> {
        match self {
            MadeStep::Cpu(step) => step
                .bytes_where(&manifest.point, |name| names.iter().any(|n| n == name))
                .map_err(|e| fail(e.to_string())),
            MadeStep::Other(_) => Ok(0),
        }
    }

    /// Binds the weights of `manifest` (this step's) from `source`, those
    /// named by `shared` by sharing `decode`'s (bound already): the same
    /// values, one copy. Returns the number shared.
    pub(super) fn bind_beside(
        &mut self,
        decode: &MadeStep,
        shared: &[String],
        source: &WeightSource,
        manifest: &Manifest,
    ) -> Result<usize, RunError> {
        let mut count = 0;
        if let (MadeStep::Cpu(this), MadeStep::Cpu(decode)) = (&mut *self, decode) {
            for name in shared {
                if this.bind_shared(decode, name).map_err(|e| fail(e.to_string()))? {
                    count += 1;
                }
            }
        }
        let is_bound = |name: &str| matches!(&*self, MadeStep::Cpu(step) if step.is_bound(name));
        let unshared: Vec<String> = bifurc_runtime::weights::weight_buffers(manifest)
            .filter(|b| !is_bound(&b.name))
            .map(|b| b.name.clone())
            .collect();
        source
            .bind_where(self.step(), manifest, |name| unshared.iter().any(|n| n == name), |_| {})
            .map_err(|e| fail(e.to_string()))?;
        Ok(count)
    }
}

/// The step of `artifact` on `device`, with what it needs at `dims`
/// (a decode cache with `capacities` rows where given).
pub(super) fn make_step(
    artifact: &Artifact,
    device: Device,
    dims: &BTreeMap<String, i64>,
    capacities: &BTreeMap<String, i64>,
) -> Result<Made, RunError> {
    match device {
        Device::Cpu => {
            let step = jit(artifact)?;
            let needed = step.bytes_at(dims, capacities).map_err(|e| fail(e.to_string()))?;
            let threads = step.threads();
            let plural = if threads == 1 { "" } else { "s" };
            let device = format!("cpu (MLIR JIT, {threads} thread{plural})");
            let available = bifurc_runtime::memory::host_available();
            Ok(Made { step: MadeStep::Cpu(Box::new(step)), device, needed, available })
        }
        Device::Cuda { ordinal } => cuda_step(artifact, ordinal, dims),
    }
}

#[cfg(feature = "cuda")]
fn cuda_step(artifact: &Artifact, ordinal: usize, dims: &BTreeMap<String, i64>) -> Result<Made, RunError> {
    let step = bifurc_runtime::cuda::CudaStep::new(artifact, ordinal)
        .map_err(|e| fail(format!("{}: {e}", artifact.ptx_path.display())))?;
    let device = step.device_info().name.clone();
    let needed = step.bytes_needed(dims).map_err(|e| fail(e.to_string()))?;
    let available = Some(step.available_bytes().map_err(|e| fail(e.to_string()))?);
    Ok(Made { step: MadeStep::Other(Box::new(step)), device, needed, available })
}

#[cfg(not(feature = "cuda"))]
fn cuda_step(_artifact: &Artifact, _ordinal: usize, _dims: &BTreeMap<String, i64>) -> Result<Made, RunError> {
    Err(fail(
        "--device cuda: this bifurc was built without CUDA support; rebuild with `cargo build --release --features cuda`, \
         or run the artifact with `bifurc-run run` (see docs/gpu-machine.md)",
    ))
}

/// The prefill step of `path` on `device`, checked to take more than one
/// token a step and to be the model of `decode` (before it is compiled or
/// any weight is bound), with what it needs at the end of a context of
/// `context_len` tokens: its last chunk's run (b = 1, m_c = the chunks
/// before it, m_d = 0), the context cache with room for every chunk's
/// rows (as `Session::fill_context_prefill` runs it).
pub(super) fn prefill_step(
    path: &Path,
    device: Device,
    context_len: usize,
    decode: &DecodeLayout,
) -> Result<(Made, (Artifact, DecodeLayout)), RunError> {
    let artifact = Artifact::load(path).map_err(|e| fail(e.to_string()))?;
    let layout = DecodeLayout::from_manifest(&artifact.manifest)
        .map_err(|e| fail(format!("{}: not a prefill step: {e}", artifact.manifest_path.display())))?;
    if layout.n < 2 {
        return Err(fail(format!(
            "{}: --prefill wants a step with n > 1 new tokens (bifurc import-hf --new-tokens N), this one has n = {}",
            artifact.manifest_path.display(),
            layout.n
        )));
    }
    decode.check_prefill(&layout).map_err(|e| fail(format!("{}: {e}", artifact.manifest_path.display())))?;
    let chunks = layout.prefill_chunks(context_len);
    let (full, last) = (chunks.whole, chunks.last);
    let end = BTreeMap::from([("b".to_string(), 1), ("m_c".to_string(), last as i64), ("m_d".to_string(), 0)]);
    let made = make_step(&artifact, device, &end, &BTreeMap::from([("m_c".to_string(), full as i64)]))?;
    Ok((made, (artifact, layout)))
}
