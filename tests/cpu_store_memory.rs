//! Binding a weight that the CPU step keeps in panels packs it straight
//! into its storage dtype: no f32 copy of the packed weight beside the
//! stored one. Its own test binary, so that no other test's allocations
//! move this process's peak resident memory while it is measured.
#![cfg(target_os = "linux")]

use bifurc::lower::CpuStep;

/// Outputs and inputs of the weight: 16M values, 64 MiB in f32, 32 in bf16.
const OUTS: usize = 4096;
const INS: usize = 4096;

/// A `/proc/self/status` field, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_bf16_weight_in_panels_is_packed_without_an_f32_copy() {
    let doc = serde_json::json!({
        "format": "bifurc-graph/1",
        "dims": {"runtime": ["b"], "constants": {}},
        "inputs": [
            {"name": "x", "role": "activation", "shape": ["b", INS], "dtype": "bf16"},
            {"name": "w", "role": "weight", "shape": [OUTS, INS], "dtype": "bf16"}
        ],
        "nodes": [
            {"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}}
        ],
        "outputs": [{"name": "y", "node": "y"}]
    });
    let graph = bifurc::import::from_value(&doc).unwrap();
    let step = CpuStep::compile(&graph).unwrap();
    let values: Vec<f32> = (0..OUTS * INS).map(|i| (i % 251) as f32 - 125.0).collect();

    // Reset the peak (VmHWM) to what the process holds now, values included.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmHWM:");
    let stored = step.store_values("w", &[OUTS, INS], &values).unwrap();
    let peak = status_kib("VmHWM:").saturating_sub(before);
    assert_ne!(stored.shape, [OUTS, INS], "the weight is kept in panels");
    // The bf16 panels take 32 MiB; an f32 copy first would add 64.
    eprintln!("peak rose by {peak} KiB");
    assert!(peak < 56 << 10, "storing a 32 MiB bf16 weight raised the peak by {peak} KiB");

    // The values are all there (their layout is `panels`' unit tests').
    let back = stored.to_tensor();
    assert_eq!(back.data.len(), OUTS * INS);
    assert_eq!(back.data.iter().map(|&v| f64::from(v)).sum::<f64>(), values.iter().map(|&v| f64::from(v)).sum::<f64>());
}
