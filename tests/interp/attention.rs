//! Framework-style attention and contractions against plain loops; the
//! shipped tiny Llama end to end.

use super::point;
use bifurc::interp::{random_inputs, run, Tensor};
use std::collections::HashMap;

/// Attention as frameworks export it: the context cache broadcast over the
/// batch, concatenated with the decode cache and the new rows.
pub(crate) const ATTENTION: &str = include_str!("attention.json");

/// Softmax attention written as loops, in f64.
fn plain_attention(ins: &HashMap<String, Tensor>, b: usize, m_c: usize, m_d: usize) -> Tensor {
    let (h, n, k) = (2, 2, 8);
    let at = |name: &str, idx: &[usize]| f64::from(ins[name].get(idx).expect("index"));
    // Key/value row j of sample bi, head hi, over [context, decoded, new].
    let row = |kind: &str, bi: usize, hi: usize, j: usize, c: usize| {
        if j < m_c {
            at(&format!("{kind}_c"), &[hi, j, c])
        } else if j < m_c + m_d {
            at(&format!("{kind}_d"), &[bi, hi, j - m_c, c])
        } else {
            at(&format!("{kind}_new"), &[bi, hi, j - m_c - m_d, c])
        }
    };
    Tensor::from_fn(vec![b, h, n, k], |i| {
        let (bi, hi, t, c) = (i[0], i[1], i[2], i[3]);
        let visible = m_c + m_d + t + 1;
        let scores: Vec<f64> = (0..visible)
            .map(|j| (0..k).map(|e| at("q", &[bi, hi, t, e]) * row("k", bi, hi, j, e)).sum::<f64>() / (k as f64).sqrt())
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = w.iter().sum();
        ((0..visible).map(|j| w[j] * row("v", bi, hi, j, c)).sum::<f64>() / total) as f32
    })
}

#[test]
fn interp_framework_attention_equals_plain_loop() {
    let g = bifurc::import::parse(ATTENTION).expect("attention graph");
    for (m_d, seed) in [(4, 1), (0, 2)] {
        let p = point(&[("b", 3), ("m_c", 5), ("m_d", m_d)]);
        let ins = random_inputs(&g, &p, seed).expect("inputs");
        assert_eq!(ins["k_d"].shape, vec![3, 2, m_d as usize, 8]);
        let got = &run(&g, &p, &ins).expect("run")["o"];
        let want = plain_attention(&ins, 3, 5, m_d as usize);
        let scale = want.data.iter().fold(0f32, |a, v| a.max(v.abs()));
        if let Err(e) = got.check_close(&want, 1e-5, 1e-5 * scale) {
            panic!("m_d = {m_d}: {e}");
        }
    }
}

/// matmul (both layouts of b) and the equivalent einsums, at sizes that
/// include 0, against a plain f64 loop.
const CONTRACTIONS: &str = include_str!("contractions.json");

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn interp_contractions_equal_plain_loops(
        bb in 0usize..3, m in 0usize..4, k in 0usize..5, n in 0usize..4, seed in 0u64..1000,
    ) {
        let g = bifurc::import::parse(CONTRACTIONS).expect("graph");
        let p = point(&[("bb", bb as i64), ("m", m as i64), ("k", k as i64), ("n", n as i64)]);
        let ins = random_inputs(&g, &p, seed).expect("inputs");
        let out = run(&g, &p, &ins).expect("run");
        let at = |name: &str, idx: &[usize]| f64::from(ins[name].get(idx).expect("index"));
        let want_t = Tensor::from_fn(vec![bb, m, n], |i| {
            (0..k).map(|e| at("a", &[i[0], i[1], e]) * at("bt", &[i[0], i[2], e])).sum::<f64>() as f32
        });
        let want_w = Tensor::from_fn(vec![bb, m, n], |i| {
            (0..k).map(|e| at("a", &[i[0], i[1], e]) * at("w", &[e, i[2]])).sum::<f64>() as f32
        });
        for (name, want) in [("mm_t", &want_t), ("es_t", &want_t), ("mm_w", &want_w), ("es_w", &want_w)] {
            proptest::prop_assert!(out[name].check_close(want, 0.0, 0.0).is_ok(), "{name}: {:?} vs {:?}", out[name], want);
        }
    }
}

/// The shipped tiny Llama (GQA, 2 layers) runs at test-sized points and
/// gives finite outputs of the declared shapes.
#[test]
fn interp_runs_the_tiny_llama_example() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny/model.json");
    let g = bifurc::import::load(std::path::Path::new(path)).expect("examples/tiny/model.json");
    for m_d in [0, 64] {
        let p = point(&[("b", 8), ("m_c", 64), ("m_d", m_d)]);
        let ins = random_inputs(&g, &p, 11).expect("inputs");
        let start = std::time::Instant::now();
        let out = run(&g, &p, &ins).expect("run");
        eprintln!("tiny llama at m_d = {m_d}: {:?}", start.elapsed());
        assert_eq!(out.len(), g.outputs.len());
        for (name, t) in &out {
            assert!(t.data.iter().all(|v| v.is_finite()), "{name} has non-finite values");
        }
    }
}
