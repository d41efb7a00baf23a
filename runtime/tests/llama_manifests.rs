//! The runtime can drive what the compiler produces for a real model shape:
//! Llama-2-7B, first 2 layers, bf16, baseline and bifurcated
//! (tests/fixtures/llama-2-7b-l2; no GPU needed).

use bifurc_runtime::bench::step_bytes;
use bifurc_runtime::exec::ExecPlan;
use bifurc_runtime::manifest::{BufferKind, Manifest};
use bifurc_runtime::session::DecodeLayout;
use std::collections::BTreeMap;
use std::path::Path;

fn load(which: &str) -> Manifest {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-2-7b-l2");
    Manifest::load(dir.join(format!("llama-2-7b-l2-{which}.manifest.json"))).unwrap()
}

fn dims(b: i64, m_c: i64, m_d: i64) -> BTreeMap<String, i64> {
    BTreeMap::from([("b".into(), b), ("m_c".into(), m_c), ("m_d".into(), m_d)])
}

#[test]
fn both_steps_have_the_decode_interface() {
    for which in ["base", "bif"] {
        let layout = DecodeLayout::from_manifest(&load(which)).unwrap();
        assert_eq!(layout.vocab, 32000);
        assert_eq!(layout.layers.len(), 2);
        assert_eq!((layout.layers[0].g, layout.layers[0].k), (32, 128));
        assert_eq!(layout.weights.len(), 2 * 9 + 3);
    }
    let (base, bif) = (load("base"), load("bif"));
    let inputs = |m: &Manifest| -> Vec<_> {
        m.buffers.iter().filter(|b| b.kind == BufferKind::Input).map(|b| (b.name.clone(), b.shape.clone())).collect()
    };
    assert_eq!(inputs(&base), inputs(&bif), "the bench binds the same inputs to both");
}

#[test]
fn launches_fit_cuda_limits_at_the_bench_shapes() {
    for which in ["base", "bif"] {
        let m = load(which);
        let plan = ExecPlan::new(&m, true).unwrap();
        for (b, m_c) in [(1, 2048), (16, 2048), (32, 2048), (1, 8192), (16, 8192), (32, 8192)] {
            let all = plan.bind_dims(&dims(b, m_c, 256)).unwrap();
            let launches = plan.launches(&all, &BTreeMap::new(), |i| 0x1000 * (i as u64 + 1)).unwrap();
            assert_eq!(launches.len(), m.kernels.len());
            // Memory: a few GB at most for two layers (the cache dominates).
            let needed = plan.bytes_needed(&all).unwrap();
            assert!(needed < 4_000_000_000, "{which} b={b} m_c={m_c}: {needed} bytes");
        }
        // The first step of a fill: only the new token's attention runs.
        let all = plan.bind_dims(&dims(1, 0, 0)).unwrap();
        assert!(plan.launches(&all, &BTreeMap::new(), |_| 1).unwrap().len() < m.kernels.len() || which == "base");
    }
}

#[test]
fn the_bytes_model_predicts_the_bifurcation_gain() {
    let (base, bif) = (load("base"), load("bif"));
    let at = |m: &Manifest, b, m_c| step_bytes(m, &dims(b, m_c, 256)).unwrap();
    // b = 1: nothing to share; b = 32 at 8192: the context is read once instead of 32 times.
    let (b1, f1) = (at(&base, 1, 8192), at(&bif, 1, 8192));
    assert!((b1.total as f64 / f1.total as f64 - 1.0).abs() < 0.05, "{b1:?} {f1:?}");
    let (b32, f32_) = (at(&base, 32, 8192), at(&bif, 32, 8192));
    assert_eq!(b32.context_kv, 32 * f32_.context_kv);
    assert!(b32.total as f64 / f32_.total as f64 > 4.0, "{b32:?} {f32_:?}");
    // At the compile point the sum over kernels is the manifest's own figure.
    assert_eq!(step_bytes(&bif, &bif.point).unwrap().context_kv, bif.bytes.after.context_kv);
}
