//! Opening a CUDA device and loading a PTX module on it.

use super::driver_available;
use crate::StepError;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// What the device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor): (9, 0) for H100/H200.
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
}

/// A context on one device, the stream every kernel runs on, and a module.
pub(super) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub module: Arc<CudaModule>,
    pub info: DeviceInfo,
}

pub(super) fn backend(what: &str, e: DriverError) -> StepError {
    StepError::Backend(format!("CUDA {what}: {e}"))
}

impl Device {
    /// Opens device `ordinal` and loads `ptx` (the driver JIT-compiles it).
    pub fn open(ordinal: usize, ptx: &str) -> Result<Self, StepError> {
        if !driver_available() {
            return Err(StepError::Backend(
                "the CUDA driver library (libcuda.so) cannot be loaded: no NVIDIA driver on this machine".into(),
            ));
        }
        // cudarc panics on a symbol the driver lacks; turn that into an error too.
        catch_unwind(AssertUnwindSafe(|| Self::open_unchecked(ordinal, ptx)))
            .map_err(|panic| StepError::Backend(format!("the CUDA driver failed: {}", panic_message(&panic))))?
    }

    fn open_unchecked(ordinal: usize, ptx: &str) -> Result<Self, StepError> {
        let count = CudaContext::device_count().map_err(|e| backend("cannot count devices", e))?;
        if count <= 0 {
            return Err(StepError::Backend("the CUDA driver reports no devices".into()));
        }
        if ordinal >= count as usize {
            return Err(StepError::Backend(format!(
                "CUDA device {ordinal} does not exist ({count} device{} present)",
                if count == 1 { "" } else { "s" }
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| backend(&format!("cannot open device {ordinal}"), e))?;
        // One stream, in order: buffers need no event tracking between streams
        // (and launches get cheaper without it).
        // SAFETY: every buffer of this context is created after this call and
        // used only on `stream`, the context's default stream, so no
        // cross-stream synchronization is needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(|e| backend("device name", e))?,
            compute_capability: ctx.compute_capability().map_err(|e| backend("compute capability", e))?,
            total_bytes: ctx.total_mem().map_err(|e| backend("device memory size", e))?,
        };
        let module = load_module(&ctx, ptx)?;
        Ok(Device { ctx, stream, module, info })
    }

    /// The function `.entry name` of the module.
    pub fn function(&self, name: &str) -> Result<CudaFunction, StepError> {
        if name.contains('\0') {
            return Err(StepError::Backend(format!("kernel entry {name:?} contains a NUL byte")));
        }
        self.module.load_function(name).map_err(|e| backend(&format!("no function `{name}` in the PTX module"), e))
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), StepError> {
        self.ctx.mem_get_info().map_err(|e| backend("memory info", e))
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic in cudarc".into())
}

/// Loads a PTX module; on failure, loads it again through
/// `cuModuleLoadDataEx` to report the JIT compiler's error log.
fn load_module(ctx: &Arc<CudaContext>, ptx: &str) -> Result<Arc<CudaModule>, StepError> {
    if ptx.contains('\0') {
        return Err(StepError::Backend("the PTX contains a NUL byte".into()));
    }
    match ctx.load_module(Ptx::from_src(ptx)) {
        Ok(module) => Ok(module),
        Err(e) => {
            let log = jit_error_log(ctx, ptx).unwrap_or_default();
            let log = if log.trim().is_empty() { String::new() } else { format!("\nPTX JIT log:\n{}", log.trim_end()) };
            Err(StepError::Backend(format!(
                "CUDA cannot load the PTX module (target {}; this GPU is sm_{}{}): {e}{log}",
                ptx_target(ptx).unwrap_or("?"),
                ctx.compute_capability().map(|c| c.0).unwrap_or(0),
                ctx.compute_capability().map(|c| c.1).unwrap_or(0),
            )))
        }
    }
}

/// The `.target` line of a PTX module (`sm_90`).
fn ptx_target(ptx: &str) -> Option<&str> {
    ptx.lines().find_map(|l| l.trim().strip_prefix(".target").map(|t| t.trim().split(',').next().unwrap_or("").trim()))
}

/// The JIT compiler's error log for `ptx`, if it fails to load.
fn jit_error_log(ctx: &Arc<CudaContext>, ptx: &str) -> Option<String> {
    ctx.bind_to_thread().ok()?;
    let source = std::ffi::CString::new(ptx).ok()?;
    let mut log = vec![0u8; 1 << 16];
    let mut options =
        [sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER, sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
    let mut values: [*mut std::ffi::c_void; 2] = [log.as_mut_ptr().cast(), log.len() as *mut std::ffi::c_void];
    let mut module: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: `source` is a NUL-terminated PTX image that outlives the call;
    // `options` and `values` are arrays of 2 elements, as `numOptions` says;
    // the error-log buffer option points at `log`, whose length the size
    // option gives (an integer option value is passed in the pointer, as the
    // driver API specifies); `module` is a valid out pointer. The context was
    // made current above.
    let result = unsafe {
        sys::cuModuleLoadDataEx(&mut module, source.as_ptr().cast(), 2, options.as_mut_ptr(), values.as_mut_ptr())
    };
    if result == sys::CUresult::CUDA_SUCCESS && !module.is_null() {
        // SAFETY: `module` was just loaded by the call above and is not used again.
        unsafe { sys::cuModuleUnload(module) };
    }
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    Some(String::from_utf8_lossy(&log[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ptx_target() {
        assert_eq!(ptx_target(".version 7.8\n.target sm_90\n.address_size 64"), Some("sm_90"));
        assert_eq!(ptx_target(".target sm_80, debug"), Some("sm_80"));
        assert_eq!(ptx_target("nothing"), None);
    }
}
