//! Helpers shared by the integration tests that need the GPU toolchain files
//! or scratch directories.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The path in environment variable `var` (`BIFURC_LIBDEVICE`, `BIFURC_PTXAS`;
/// `source scripts/env.sh` sets both). Without it a test prints a note and
/// skips — except under CI (`CI` set), where a missing toolchain is a failure,
/// so CI can never pass by skipping.
pub fn toolchain_path(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{var} is unset under CI: scripts/test.sh must source scripts/env.sh"
            );
            eprintln!("note: {var} is unset (source scripts/env.sh): skipping");
            None
        }
    }
}

/// A fresh, empty directory for one test, unique per process and call.
pub fn scratch(prefix: &str, tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "bifurc-{prefix}-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}
