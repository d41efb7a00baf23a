//! The CUDA backend: runs an artifact's kernels through the CUDA driver API
//! (cudarc, loaded dynamically at run time).
//!
//! With dynamic loading, cudarc panics rather than erroring when `libcuda`
//! is missing, so every entry point checks [`driver_available`] first: on a
//! machine without a GPU driver, [`CudaStep::new`] returns an error.
//!
//! | file | what |
//! |---|---|
//! | `device.rs` | context, stream, PTX module (JIT log on failure) |
//! | `buffer.rs` | a growable device allocation |
//! | `step.rs` | [`CudaStep`]: [`crate::Step`] on the device, timing, profiling |

mod buffer;
mod device;
mod step;

pub use device::DeviceInfo;
pub use step::{CudaStep, KernelTime};

use std::sync::OnceLock;

/// Whether the CUDA driver library (`libcuda`) can be loaded on this machine.
///
/// Checked once per process; a machine without a GPU driver gets `false`
/// instead of a panic from cudarc.
pub fn driver_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: this only tries to dlopen the driver library by its usual
        // names and drops the handle again; loading libcuda runs no code of
        // ours and has no preconditions.
        unsafe { cudarc::driver::sys::is_culib_present() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Artifact;
    use std::path::Path;

    #[test]
    fn driver_check_is_stable_and_does_not_panic() {
        // True on a GPU machine, false in CI; either way the same answer twice.
        assert_eq!(driver_available(), driver_available());
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        let artifact =
            Artifact::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.ptx")).unwrap();
        match CudaStep::new(&artifact, 0) {
            Ok(_) => assert!(driver_available(), "a step without a driver"),
            Err(e) => {
                if !driver_available() {
                    assert!(e.to_string().contains("libcuda"), "{e}");
                }
            }
        }
    }
}
