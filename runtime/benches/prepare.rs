//! Host time to prepare one decode step, without a device:
//! `cargo bench -p bifurc-runtime --bench prepare`.
//!
//! Before every step a backend binds the dims, checks the inputs, sizes
//! the buffers and resolves every launch (grid, block, arguments); on a GPU
//! the device idles meanwhile (the previous step was synchronized), so this
//! adds to every step's latency. Measured on the Llama-2-7B 2-layer
//! manifests of the runtime's fixtures (baseline and bifurcated) at b = 32,
//! m_c = 8192, m_d = 256, and on any manifest named by
//! `BIFURC_BENCH_MANIFEST` (e.g. a whole 32-layer model's, from `bifurc
//! compile examples/llama-2-7b/model.json`). Prints the median over 200
//! preparations, per step and per kernel.

use bifurc_runtime::exec::ExecPlan;
use bifurc_runtime::manifest::{BufferKind, Manifest};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

const RUNS: usize = 200;

fn prepare_us(plan: &ExecPlan, dims: &BTreeMap<String, i64>) -> f64 {
    let start = Instant::now();
    // What CudaStep::prepare does, with fake device pointers.
    let all = plan.bind_dims(dims).expect("dims");
    let bound: Vec<Option<Vec<usize>>> = (0..plan.buffers.len())
        .map(|i| (plan.buffers[i].kind == BufferKind::Input).then(|| plan.shape_at(i, &all).expect("shape")))
        .collect();
    plan.check_inputs(&all, &bound).expect("inputs");
    let mut sized = 0usize;
    for (i, b) in plan.buffers.iter().enumerate() {
        if b.kind == BufferKind::Output {
            sized += plan.bytes_at(i, &all).expect("bytes");
        }
    }
    sized += plan.slot_bytes(&all).expect("slots").iter().sum::<usize>();
    let pointers: Vec<u64> = (0..plan.buffers.len())
        .map(|i| if plan.bytes_at(i, &all).expect("bytes") == 0 { 1 } else { 0x1000 * (i as u64 + 1) })
        .collect();
    let launches = plan.launches(&all, &BTreeMap::new(), |i| pointers[i]).expect("launches");
    let elapsed = start.elapsed().as_secs_f64() * 1e6;
    std::hint::black_box((sized, launches));
    elapsed
}

fn main() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-2-7b-l2");
    let mut manifests: Vec<PathBuf> =
        ["base", "bif"].iter().map(|w| fixtures.join(format!("llama-2-7b-l2-{w}.manifest.json"))).collect();
    if let Some(extra) = std::env::var_os("BIFURC_BENCH_MANIFEST") {
        manifests.push(PathBuf::from(extra));
    }
    let dims = BTreeMap::from([("b".to_string(), 32i64), ("m_c".to_string(), 8192), ("m_d".to_string(), 256)]);
    println!("prepare: host time of one step's preparation (bind dims, check inputs, sizes, launches), b=32, m_c=8192, m_d=256; median of {RUNS}");
    for path in manifests {
        let manifest = match Manifest::load(&path) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                std::process::exit(1);
            }
        };
        let plan = ExecPlan::new(&manifest, true).expect("plan");
        let mut times: Vec<f64> = (0..RUNS).map(|_| prepare_us(&plan, &dims)).collect();
        times.sort_by(f64::total_cmp);
        let median = times[RUNS / 2];
        println!(
            "  {}: {} kernels, {} buffers: {median:.1} us a step, {:.3} us a kernel",
            path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            manifest.kernels.len(),
            manifest.buffers.len(),
            median / manifest.kernels.len() as f64
        );
    }
}
