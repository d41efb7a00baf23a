//! A deep bf16 model, bifurcated: how far its logits are from the
//! baseline step's, measured against how far both are from exact.
//!
//! In bf16 the two steps round differently (the bifurcated w·V sums its
//! context and decode parts in f32 where the baseline sums one row, so a
//! value on the edge of a bf16 step now and then rounds the other way), and
//! over many layers those flips grow into differences of a few bf16 steps
//! of the logits: a real model's bench (Llama-3-8B, 32 layers, `bifurc
//! bench`) shows 3% of the logits' scale. This test pins down what that
//! is: the interpreter (f32 throughout) is the exact side, and the two
//! compiled bf16 steps must be much closer to each other than either is
//! to it.
//!
//! Measured here (16 layers, b = 16, m_c = 333, m_d = 3, three seeds; RMS
//! over the logits): each step is 1.5-1.8e-2 from the interpreter, and the
//! two steps 1.8-4.4e-3 from each other (a sixth of that noise). One extra
//! bf16 rounding a layer in the bifurcated path (its w·V parts stored in
//! bf16 before their sum) leaves its distance from exact where it was
//! (1.6-1.8e-2) but moves it 1.6-1.7e-2 from the baseline: as far as the
//! rounding noise itself. So the bound below, 0.4 of the noise, fails on
//! such a rounding, which a bound on the distance from exact would not see.
//! A missing one moves it as far: with the context attention fused in bf16
//! (`BIFURC_CPU_FUSED_ATTENTION=on` on a CPU without AVX-512, whose kernel
//! never rounds the probabilities to bf16) the bifurcated step was
//! 1.58-2.09e-2 from exact and 1.52-1.77e-2 from the baseline, and this
//! test failed: why `auto` leaves bf16 attention to the three kernels.

use std::collections::BTreeMap;

use bifurc::hf::{build, HfOptions};
use bifurc::inspect::ShapePoint;
use bifurc::interp::{random_inputs, run, Tensor};
use bifurc::ir::{DType, Graph};
use bifurc::lower::CpuStep;
use bifurc::optimize::{optimize, Options};

const DEEP_LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 128, "intermediate_size": 344,
  "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 16, "vocab_size": 256,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 4096}"#;

/// Root mean square of `a - b`.
fn rms(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let sum: f64 = a.data.iter().zip(&b.data).map(|(&x, &y)| f64::from(x - y).powi(2)).sum();
    (sum / a.data.len().max(1) as f64).sqrt()
}

/// The bifurcated step of `graph` at `point`, or `graph`'s own, with the
/// w·V parts of every layer rounded to bf16 before their sum when
/// `extra_rounding` (the fault this test must see).
fn bifurcated(graph: &Graph, extra_rounding: bool) -> Graph {
    let point = ShapePoint::parse("b=16,m_c=128,m_d=16").unwrap_or_else(|e| panic!("{e}"));
    let opt = optimize(graph, &Options { point, ..Default::default() }).unwrap_or_else(|e| panic!("optimize: {e}"));
    assert_eq!(opt.report.rewritten(), 2 * 16, "q·K and w·V of every layer bifurcated");
    let mut g = opt.graph;
    if extra_rounding {
        let parts = g
            .nodes
            .iter_mut()
            .filter(|n| n.id.contains("attn.context.") && (n.id.contains(".einsum") || n.id.contains(".add1")));
        let rounded: Vec<_> = parts.map(|n| n.dtype = DType::BF16).collect();
        assert_eq!(rounded.len(), 16 * 4, "three w·V parts and their first sum a layer");
    }
    g
}

/// Per seed, for each of `bifurcated`: (RMS of baseline − interpreter, of
/// bifurcated − interpreter, of baseline − bifurcated) over the logits.
fn distances(graph: &Graph, bifurcated: &[Graph]) -> Vec<Vec<(f64, f64, f64)>> {
    let compile = |g: &Graph| CpuStep::compile(g).unwrap_or_else(|e| panic!("compile: {e}"));
    let base = compile(graph);
    let steps: Vec<CpuStep> = bifurcated.iter().map(compile).collect();
    let point: BTreeMap<String, i64> =
        [("b", 16), ("m_c", 333), ("m_d", 3)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut out = vec![Vec::new(); steps.len()];
    for seed in 7..10 {
        let inputs = random_inputs(graph, &point, seed).unwrap_or_else(|e| panic!("inputs: {e}"));
        let exact = &run(graph, &point, &inputs).unwrap_or_else(|e| panic!("interp: {e}"))["logits"];
        let a = &base.run(&point, &inputs).unwrap_or_else(|e| panic!("baseline: {e}"))["logits"];
        for (step, out) in steps.iter().zip(&mut out) {
            let c = &step.run(&point, &inputs).unwrap_or_else(|e| panic!("bifurcated: {e}"))["logits"];
            let d = (rms(a, exact), rms(c, exact), rms(a, c));
            eprintln!("seed {seed}: baseline {:.2e}, bifurcated {:.2e} from exact; {:.2e} apart", d.0, d.1, d.2);
            out.push(d);
        }
    }
    out
}

/// Whether the two steps are within 0.4 of the rounding noise of each
/// other over the seeds (RMS over all of them).
fn close(d: &[(f64, f64, f64)]) -> bool {
    let mean = |f: fn(&(f64, f64, f64)) -> f64| (d.iter().map(|x| f(x).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
    let noise = mean(|x| x.0).min(mean(|x| x.1));
    mean(|x| x.2) <= 0.4 * noise
}

#[test]
fn deep_bf16_bifurcated_steps_differ_by_less_than_their_rounding() {
    let doc = build(DEEP_LLAMA, &HfOptions { dtype: Some(DType::BF16), ..Default::default() })
        .unwrap_or_else(|e| panic!("import-hf: {e}"));
    let graph = bifurc::import::from_value(&doc).unwrap_or_else(|e| panic!("import: {e}"));
    let found = distances(&graph, &[bifurcated(&graph, false), bifurcated(&graph, true)]);
    let (honest, faulty) = (&found[0], &found[1]);
    for &(a, c, _) in honest {
        assert!(a < 0.1 && c < 0.1, "both steps within bf16 reach of exact: {a:e}, {c:e}");
    }
    assert!(close(honest), "the bifurcated step rounds more than the baseline: {honest:?}");
    assert!(!close(faulty), "one extra bf16 rounding a layer is not seen: {faulty:?}");
}
