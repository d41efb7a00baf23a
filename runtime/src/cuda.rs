//! CUDA driver access through cudarc, loaded dynamically at run time.
//!
//! With dynamic loading, cudarc panics rather than erroring when `libcuda`
//! is missing, so every entry point checks [`driver_available`] first.

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

    #[test]
    fn driver_check_is_stable_and_does_not_panic() {
        // True on a GPU machine, false in CI; either way the same answer twice.
        assert_eq!(driver_available(), driver_available());
    }
}
