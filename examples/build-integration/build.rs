//! Compiles ../tiny/model.json into `$OUT_DIR/step.ptx` and
//! `$OUT_DIR/step.manifest.json` with the bifurc library.
//!
//! libdevice comes from `BIFURC_LIBDEVICE` (set by `source scripts/env.sh`).

use std::path::PathBuf;
use std::process::exit;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let model = manifest_dir.join("../tiny/model.json");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("step.ptx");
    println!("cargo:rerun-if-changed={}", model.display());
    println!("cargo:rerun-if-env-changed=BIFURC_LIBDEVICE");

    let fail = |message: String| -> ! {
        eprintln!("error: {message}");
        exit(1)
    };
    let graph = bifurc::import::load(&model).unwrap_or_else(|e| fail(format!("{}: {e}", model.display())));
    // sm_90, the default shape point (b=32, m_c=8192, m_d=256), bifurcation on.
    let opts = bifurc::CompileOptions::default();
    let artifact = bifurc::compile(&graph, &opts).unwrap_or_else(|e| fail(format!("{}: {e}", model.display())));
    artifact.write(&out).unwrap_or_else(|e| fail(format!("cannot write {}: {e}", out.display())));
}
