//! A device allocation that grows on demand and is reused otherwise.

use super::device::backend;
use crate::StepError;
use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr};
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

    /// Copies `height` runs of `width` bytes from `src` (run `y` at byte
    /// `src_at + y * src_pitch`) into `self` (run `y` at byte
    /// `dst_at + y * dst_pitch`), ordered on `stream`. Nothing happens for
    /// an empty copy.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_2d(
        &mut self,
        stream: &Arc<CudaStream>,
        dst_at: usize,
        dst_pitch: usize,
        src: &DeviceBuffer,
        src_at: usize,
        src_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<(), StepError> {
        if width == 0 || height == 0 {
            return Ok(());
        }
        let end = |at: usize, pitch: usize| at.checked_add((height - 1).checked_mul(pitch)?)?.checked_add(width);
        let fits = |at, pitch, cap| width <= pitch && end(at, pitch).is_some_and(|e| e <= cap);
        if !fits(dst_at, dst_pitch, self.capacity()) || !fits(src_at, src_pitch, src.capacity()) {
            return Err(StepError::Backend(format!(
                "2-D copy of {height} x {width} bytes out of bounds (from {src_at} pitch {src_pitch} of {}, to {dst_at} pitch {dst_pitch} of {})",
                src.capacity(),
                self.capacity()
            )));
        }
        let (Some(from), Some(to)) = (src.mem.as_ref(), self.mem.as_mut()) else {
            return Err(StepError::Backend("2-D copy with an unallocated buffer".into()));
        };
        let (src_ptr, _src_sync) = from.device_ptr(stream);
        let (dst_ptr, _dst_sync) = to.device_ptr(stream);
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src_ptr + src_at as u64,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst_ptr + dst_at as u64,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: width,
            Height: height,
        };
        // SAFETY: both ranges were checked above to lie inside live device
        // allocations of this context (`width <= pitch`, last run ending
        // within the allocation); `copy` outlives the call (the driver reads
        // the descriptor before returning); the copy is queued on `stream`,
        // the stream every kernel of the step uses, so it is ordered after
        // the kernels that wrote `src` and before later ones that read `self`.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
            .result()
            .map_err(|e| super::device::backend("2-D device copy", e))
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
