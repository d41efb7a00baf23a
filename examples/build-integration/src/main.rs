//! Prints the kernels of the step compiled by build.rs, read through the
//! runtime's manifest types, with their launch geometry at a shape point.
//!
//! The PTX and the manifest are embedded in the binary: an engine would load
//! `PTX` as a CUDA module and launch each kernel's `entry` in order.

use std::collections::BTreeMap;

use bifurc_runtime::manifest::Manifest;

/// The PTX module compiled at build time.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/step.ptx"));
const MANIFEST: &str = include_str!(concat!(env!("OUT_DIR"), "/step.manifest.json"));

fn main() {
    let manifest = match Manifest::from_str(MANIFEST) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: embedded manifest: {e}");
            std::process::exit(1);
        }
    };
    // A point of our own: 8 samples from a 1024-token context, 16 tokens decoded.
    let dims: BTreeMap<String, i64> =
        [("b", 8), ("m_c", 1024), ("m_d", 16)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    println!(
        "{} for {}: {} kernels, {} PTX entries, {} bytes of PTX",
        manifest.ptx,
        manifest.target,
        manifest.kernels.len(),
        PTX.matches(".entry ").count(),
        PTX.len()
    );
    let bifurcated = manifest.attention.iter().filter(|s| s.bifurcated).count();
    println!("attention sites bifurcated: {bifurcated} of {}", manifest.attention.len());
    println!("launches at b=8, m_c=1024, m_d=16:");
    for kernel in &manifest.kernels {
        let launch = match manifest.launch(kernel, &dims) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
        let args: Vec<&str> = kernel.params.iter().map(|p| p.name.as_str()).collect();
        println!(
            "  {:<32} entry {:<28} grid {:>6} block {:>3}  ({})",
            kernel.name,
            kernel.entry,
            launch.grid[0],
            launch.block[0],
            args.join(", ")
        );
    }
}
