//! A device allocation that grows on demand and is reused otherwise.

use super::device::backend;
use crate::StepError;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;

/// Allocations are rounded up to this many bytes (and are at least this
/// aligned: the driver aligns to 256 or more).
const GRANULE: usize = 256;

/// Device memory for one buffer (or one shared slot).
#[derive(Default)]
pub(super) struct DeviceBuffer {
    mem: Option<CudaSlice<u8>>,
}

impl DeviceBuffer {
    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.mem.as_ref().map_or(0, |m| m.len())
    }

    /// Makes room for `bytes`. A buffer that has to grow gets 1/8 headroom
    /// when `headroom` (a cache or scratch that grows by a row per step does
    /// not reallocate every step); the first allocation is exact.
    pub fn ensure(&mut self, stream: &Arc<CudaStream>, bytes: usize, headroom: bool) -> Result<(), StepError> {
        if bytes <= self.capacity() {
            return Ok(());
        }
        let grown = if headroom && self.mem.is_some() { bytes.saturating_add(bytes / 8) } else { bytes };
        let size = grown.div_ceil(GRANULE).saturating_mul(GRANULE);
        // Free first (stream-ordered: after the kernels already queued that use it).
        self.mem = None;
        // SAFETY: the memory is uninitialized; every user writes it before
        // reading it (inputs are uploaded in full, kernels write every element
        // of their output before any later kernel reads it).
        let mem = unsafe { stream.alloc::<u8>(size) }
            .map_err(|e| backend(&format!("cannot allocate {size} bytes of device memory"), e))?;
        self.mem = Some(mem);
        Ok(())
    }

    /// Drops the allocation.
    pub fn release(&mut self) {
        self.mem = None;
    }

    /// The device pointer, or `fallback` when nothing is allocated.
    pub fn ptr(&self, stream: &CudaStream, fallback: u64) -> u64 {
        match &self.mem {
            Some(mem) => {
                let (ptr, _sync) = mem.device_ptr(stream);
                ptr
            }
            None => fallback,
        }
    }

    /// Copies `bytes` to the start of the buffer (which must hold them).
    pub fn upload(&mut self, stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<(), StepError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mem = self
            .mem
            .as_mut()
            .filter(|m| m.len() >= bytes.len())
            .ok_or_else(|| StepError::Backend(format!("upload of {} bytes to a smaller buffer", bytes.len())))?;
        let mut view = mem.slice_mut(0..bytes.len());
        stream.memcpy_htod(bytes, &mut view).map_err(|e| backend("host-to-device copy", e))
    }

    /// Copies the first `len` bytes back to the host.
    pub fn download(&self, stream: &Arc<CudaStream>, len: usize) -> Result<Vec<u8>, StepError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mem = self
            .mem
            .as_ref()
            .filter(|m| m.len() >= len)
            .ok_or_else(|| StepError::Backend(format!("download of {len} bytes from a smaller buffer")))?;
        stream.clone_dtoh(&mem.slice(0..len)).map_err(|e| backend("device-to-host copy", e))
    }
}
