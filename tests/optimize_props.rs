//! The optimizer's correctness: every graph it emits computes what its input
//! computes (the reference interpreter on both, same random inputs), it
//! rewrites where bifurcation pays, and it leaves a graph alone where it does
//! not (b = 1, a per-sample context, no attention).
//!
//! Properties run a fixed number of cases from a fixed seed (see [`config`]),
//! so a run is reproducible and a failure prints the same minimal case every
//! time; `PROPTEST_RNG_SEED=N` explores other cases, `PROPTEST_CASES=N`
//! changes the count. Nothing is written to disk (no failure persistence).
//!
//! Numerical agreement is norm-relative: for every output,
//! `max|a - b| <= 1e-5 * max(max|a|, TINY)`. The rewritten graph computes
//! attention as partial einsums whose f32 results are added (`add` nodes),
//! where the original accumulates the whole contraction in f64 and rounds
//! once; the reordered f32 additions differ by a few ulps of the largest
//! partial, so an elementwise relative bound would be wrong near zeros.

use bifurc::hf::{build, HfOptions};
use bifurc::inspect::{find_sites, ShapePoint};
use bifurc::interp::{random_inputs, run, Tensor};
use bifurc::ir::Graph;
use bifurc::optimize::{optimize, Optimized, Options};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Relative bound on `max|a - b|`, as a fraction of `max|a|`.
const RTOL: f32 = 1e-5;
/// Floor of the norm, so an all-zero output must match (almost) exactly.
const TINY: f32 = 1e-30;
/// The seed of every property unless `PROPTEST_RNG_SEED` is set.
const SEED: u64 = 0x00b1_fc5e_ed00_0001;
/// A point where bifurcation surely pays (64 samples over a 4k context), so
/// the rewritten graph is exercised even when the random point is small.
const FORCING: &str = "b=64,m_c=4096,m_d=64";

fn config(cases: u32) -> ProptestConfig {
    let env = ProptestConfig::default();
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases),
        rng_seed: match env.rng_seed {
            RngSeed::Random => RngSeed::Fixed(SEED),
            fixed => fixed,
        },
        failure_persistence: None,
        ..env
    }
}

// ---------------------------------------------------------------- helpers

fn canonical(g: &Graph) -> String {
    bifurc::export::to_string(&bifurc::export::to_json(g))
}

fn point(b: i64, m_c: i64, m_d: i64) -> BTreeMap<String, i64> {
    [("b", b), ("m_c", m_c), ("m_d", m_d)].into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn opt_at(graph: &Graph, at: &str) -> Optimized {
    let opts = Options { point: ShapePoint::parse(at).expect("point"), limits: Default::default() };
    optimize(graph, &opts).unwrap_or_else(|e| panic!("optimize at {at}: {e}"))
}

fn parse(json: &str) -> Graph {
    bifurc::import::parse(json).unwrap_or_else(|e| panic!("import: {e}\n{json}"))
}

/// `Err` describing the first output where `got` is not within the
/// norm-relative tolerance of `want` (see the module doc).
fn agree(want: &BTreeMap<String, Tensor>, got: &BTreeMap<String, Tensor>) -> Result<(), String> {
    if want.keys().ne(got.keys()) {
        return Err(format!("outputs differ: {:?} vs {:?}", want.keys(), got.keys()));
    }
    for (name, a) in want {
        let b = &got[name];
        if a.shape != b.shape {
            return Err(format!("output `{name}`: shape {:?} vs {:?}", a.shape, b.shape));
        }
        let norm = a.data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let mut worst = (0.0f32, 0usize);
        for (i, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
            // Equal values (infinities included) and NaN in both agree; NaN
            // in one only, or inf - inf, is an infinite difference.
            let d = if x == y || (x.is_nan() && y.is_nan()) {
                0.0
            } else {
                let d = (x - y).abs();
                if d.is_nan() {
                    f32::INFINITY
                } else {
                    d
                }
            };
            if d > worst.0 {
                worst = (d, i);
            }
        }
        if worst.0 > RTOL * norm.max(TINY) {
            let i = worst.1;
            return Err(format!(
                "output `{name}`: max|a-b| = {:e} at element {i} ({} vs {}) > {RTOL:e} * max|a| = {:e}",
                worst.0,
                a.data[i],
                b.data[i],
                RTOL * norm.max(TINY)
            ));
        }
    }
    Ok(())
}

fn outputs(g: &Graph, at: &BTreeMap<String, i64>, seed: u64) -> BTreeMap<String, Tensor> {
    let inputs = random_inputs(g, at, seed).unwrap_or_else(|e| panic!("random inputs: {e}"));
    run(g, at, &inputs).unwrap_or_else(|e| panic!("run at {at:?}: {e}")).into_iter().collect()
}

/// Runs `original` and `rewritten` at `at` on the same random inputs.
fn check_same(original: &Graph, rewritten: &Graph, at: &BTreeMap<String, i64>, seed: u64) -> Result<(), String> {
    agree(&outputs(original, at, seed), &outputs(rewritten, at, seed))
        .map_err(|e| format!("{e}\n--- rewritten graph ---\n{}", canonical(rewritten)))
}

/// Every attention site rewritten and no compute op left reading a context
/// cache through a per-sample broadcast.
fn assert_bifurcated(opt: &Optimized, what: &str) {
    let r = &opt.report;
    assert!(!r.sites.is_empty(), "{what}: no attention sites found");
    for s in &r.sites {
        assert!(s.rewritten, "{what}: site {} ({}) not rewritten: {}", s.node, s.context, s.reason);
        assert!(
            s.bytes_after < s.bytes_before,
            "{what}: site {} reads {} -> {} bytes",
            s.node,
            s.bytes_before,
            s.bytes_after
        );
    }
    let left = find_sites(&opt.graph);
    assert!(
        left.is_empty(),
        "{what}: the optimized graph still reads a context cache per sample: {left:?}\n{}",
        canonical(&opt.graph)
    );
}

/// Nothing rewritten and the emitted graph is the input, text for text.
fn assert_untouched(graph: &Graph, opt: &Optimized, what: &str) {
    assert_eq!(opt.report.rewritten(), 0, "{what}: {}", opt.report.render());
    let (a, b) = (canonical(graph), canonical(&opt.graph));
    assert!(a == b, "{what}: the optimized graph differs from the input\n--- input ---\n{a}\n--- optimized ---\n{b}");
}

// ---------------------------------------------------------------- models from HF configs

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// llama: RMSNorm, rotary, SwiGLU; `repeat_kv` for g < h.
    Llama,
    /// gpt2: LayerNorm, learned positions, fused c_attn; multi-head.
    Gpt2,
    /// gpt_bigcode with `multi_query`: one KV head.
    BigCode,
}

#[derive(Clone, Copy, Debug)]
struct Model {
    family: Family,
    /// Query heads.
    h: usize,
    /// KV heads (groups).
    g: usize,
    /// Head dim.
    k: usize,
}

impl Model {
    /// A one-layer HF config.json for this model.
    fn config(&self) -> String {
        let Model { h, g, k, .. } = *self;
        match self.family {
            Family::Llama => format!(
                r#"{{"model_type": "llama", "hidden_size": {d}, "num_attention_heads": {h},
                    "num_key_value_heads": {g}, "head_dim": {k}, "num_hidden_layers": 1,
                    "intermediate_size": 16, "vocab_size": 32, "rms_norm_eps": 1e-5}}"#,
                d = h * k
            ),
            Family::Gpt2 => format!(
                r#"{{"model_type": "gpt2", "n_embd": {d}, "n_head": {h}, "n_layer": 1,
                    "n_inner": 16, "vocab_size": 32, "n_positions": 128}}"#,
                d = h * k
            ),
            Family::BigCode => format!(
                r#"{{"model_type": "gpt_bigcode", "multi_query": true, "n_embd": {d}, "n_head": {h},
                    "n_layer": 1, "n_inner": 16, "vocab_size": 32, "n_positions": 128}}"#,
                d = h * k
            ),
        }
    }

    fn graph(&self) -> Graph {
        let doc = build(&self.config(), &HfOptions { layers: Some(1), ..Default::default() })
            .unwrap_or_else(|e| panic!("{self:?}: {e}"));
        bifurc::import::from_value(&doc).unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }
}

fn head_dim() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![2usize, 4, 8])
}

/// Llama-family head layouts: MQA (g = 1), GQA (g = 2, 2 or 3 heads per
/// group), MHA (g = h).
fn llama() -> impl Strategy<Value = Model> {
    prop_oneof![
        (2usize..=4, head_dim()).prop_map(|(h, k)| Model { family: Family::Llama, h, g: 1, k }),
        (2usize..=3, head_dim()).prop_map(|(p, k)| Model { family: Family::Llama, h: 2 * p, g: 2, k }),
        (1usize..=4, head_dim()).prop_map(|(h, k)| Model { family: Family::Llama, h, g: h, k }),
    ]
}

fn gpt2() -> impl Strategy<Value = Model> {
    (1usize..=4, head_dim()).prop_map(|(h, k)| Model { family: Family::Gpt2, h, g: h, k })
}

fn bigcode() -> impl Strategy<Value = Model> {
    (2usize..=4, head_dim()).prop_map(|(h, k)| Model { family: Family::BigCode, h, g: 1, k })
}

/// b, m_c, m_d and a data seed.
fn small_point() -> impl Strategy<Value = (i64, i64, i64, u64)> {
    (1i64..=8, 1i64..64, 0i64..16, any::<u64>())
}

/// Multi-query graphs (g = 1) are not bifurcated today: see
/// `mqa_broadcast_over_heads_of_a_concat_is_bifurcated` below (ignored).
/// Until that is fixed the properties check only that their output agrees;
/// set this to `true` with the fix.
const MQA_IS_BIFURCATED: bool = true;

/// The property: optimized at the random point and at [`FORCING`], each
/// result computes the input's outputs at the random point.
fn check_model(m: Model, (b, m_c, m_d, seed): (i64, i64, i64, u64)) -> Result<(), TestCaseError> {
    let graph = m.graph();
    let here = format!("b={b},m_c={m_c},m_d={m_d}");
    let small = opt_at(&graph, &here);
    let forced = opt_at(&graph, FORCING);
    if m.g > 1 || MQA_IS_BIFURCATED {
        assert_bifurcated(&forced, &format!("{m:?} at {FORCING}"));
    }
    if b == 1 {
        assert_untouched(&graph, &small, &format!("{m:?} at {here}"));
    }
    let at = point(b, m_c, m_d);
    let want = outputs(&graph, &at, seed);
    for (opt, name) in [(&small, here.as_str()), (&forced, FORCING)] {
        let got = outputs(&opt.graph, &at, seed);
        if let Err(e) = agree(&want, &got) {
            return Err(TestCaseError::fail(format!(
                "{m:?} optimized at {name}, run at {here} (seed {seed}): {e}\n--- optimized graph ---\n{}",
                canonical(&opt.graph)
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn llama_family_rewrites_agree(m in llama(), p in small_point()) {
        check_model(m, p)?;
    }
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn gpt2_rewrites_agree(m in gpt2(), p in small_point()) {
        check_model(m, p)?;
    }

    #[test]
    fn gpt_bigcode_rewrites_agree(m in bigcode(), p in small_point()) {
        check_model(m, p)?;
    }
}

// ---------------------------------------------------------------- multi-level sharing

/// A one-layer llama with multi-level sharing (`import-hf --multi-level`):
/// a system prompt shared by all `P*S` samples, a context per prompt shared
/// by its `S` samples.
fn multi_level_graph(m: Model) -> Graph {
    let doc = build(&m.config(), &HfOptions { layers: Some(1), multi_level: true, ..Default::default() })
        .unwrap_or_else(|e| panic!("{m:?} multi-level: {e}"));
    bifurc::import::from_value(&doc).unwrap_or_else(|e| panic!("{m:?} multi-level: {e}"))
}

/// P, S, m_s, m_c, m_d and a data seed.
fn multi_level_point() -> impl Strategy<Value = (i64, i64, i64, i64, i64, u64)> {
    (1i64..=3, 1i64..=4, 1i64..32, 1i64..32, 0i64..8, any::<u64>())
}

proptest! {
    #![proptest_config(config(16))]

    /// Optimized at the random point and at a forcing point (4 prompts of 16
    /// samples, a 2k system prompt, 1k contexts), each result computes the
    /// input's outputs at the random point; with one sample in all
    /// (P = S = 1) nothing changes.
    #[test]
    fn multi_level_rewrites_agree(m in llama(), (pp, ss, m_s, m_c, m_d, seed) in multi_level_point()) {
        let graph = multi_level_graph(m);
        let here = format!("P={pp},S={ss},m_s={m_s},m_c={m_c},m_d={m_d}");
        let forcing = "P=4,S=16,m_s=2048,m_c=1024,m_d=64";
        let small = opt_at(&graph, &here);
        let forced = opt_at(&graph, forcing);
        if m.g > 1 || MQA_IS_BIFURCATED {
            assert_bifurcated(&forced, &format!("{m:?} multi-level at {forcing}"));
        }
        if pp * ss == 1 {
            assert_untouched(&graph, &small, &format!("{m:?} multi-level at {here}"));
        }
        let at: BTreeMap<String, i64> = [("P", pp), ("S", ss), ("m_s", m_s), ("m_c", m_c), ("m_d", m_d)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        for (opt, name) in [(&small, here.as_str()), (&forced, forcing)] {
            if let Err(e) = check_same(&graph, &opt.graph, &at, seed) {
                return Err(TestCaseError::fail(format!("{m:?} multi-level optimized at {name}, run at {here}: {e}")));
            }
        }
    }
}

// ---------------------------------------------------------------- hand-written layouts

/// A graph document from its parts (JSON fragments, one per entry).
fn doc(constants: &str, inputs: &[String], nodes: &[&str], outputs: &[&str]) -> String {
    format!(
        r#"{{"format": "bifurc-graph/1",
  "dims": {{"runtime": ["b", "m_c", "m_d"], "constants": {{{constants}}}}},
  "inputs": [
    {}
  ],
  "nodes": [
    {}
  ],
  "outputs": [
    {}
  ]}}"#,
        inputs.join(",\n    "),
        nodes.join(",\n    "),
        outputs.join(",\n    ")
    )
}

/// An input; `role` is `activation`, `context_kv:k`, `decode_kv:v`, ….
fn input(name: &str, role: &str, shape: &str) -> String {
    match role.split_once(':') {
        Some((r, kv)) => {
            format!(
                r#"{{"name": "{name}", "role": "{r}", "layer": 0, "kv": "{kv}", "shape": {shape}, "dtype": "f32"}}"#
            )
        }
        None => format!(r#"{{"name": "{name}", "role": "{role}", "shape": {shape}, "dtype": "f32"}}"#),
    }
}

const OUTPUTS: &[&str] = &[r#"{"name": "attn", "node": "attn"}"#];

/// Multi-head attention with K/V stored `[b, g, m, k]` (the standard) and
/// written with explicit `einsum` ops (the docs' example).
fn bgmk_einsum() -> String {
    doc(
        r#""n": 1, "g": 2, "k": 4"#,
        &[
            input("q", "activation", r#"["b", "g", "n", "k"]"#),
            input("k_new", "activation", r#"["b", "g", "n", "k"]"#),
            input("v_new", "activation", r#"["b", "g", "n", "k"]"#),
            input("k_ctx", "context_kv:k", r#"["g", "m_c", "k"]"#),
            input("v_ctx", "context_kv:v", r#"["g", "m_c", "k"]"#),
            input("k_dec", "decode_kv:k", r#"["b", "g", "m_d", "k"]"#),
            input("v_dec", "decode_kv:v", r#"["b", "g", "m_d", "k"]"#),
        ],
        &[
            r#"{"id": "k_ctx_b", "op": "broadcast", "inputs": ["k_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec", "k_new"], "attrs": {"axis": 2}}"#,
            r#"{"id": "values", "op": "concat", "inputs": ["v_ctx_b", "v_dec", "v_new"], "attrs": {"axis": 2}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "keys"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
            r#"{"id": "scaled", "op": "scale", "inputs": ["scores"], "attrs": {"value": 0.5}}"#,
            r#"{"id": "mask", "op": "causal_mask", "attrs": {"query": "n", "key": "m_c+m_d+n", "offset": "m_c+m_d"}}"#,
            r#"{"id": "masked", "op": "add", "inputs": ["scaled", "mask"]}"#,
            r#"{"id": "probs", "op": "softmax", "inputs": ["masked"], "attrs": {"axis": -1}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["probs", "values"], "attrs": {"spec": "bgnm,bgmk->bgnk"}}"#,
        ],
        OUTPUTS,
    )
}

/// Grouped-query attention written with einsums over a `[b, g, p, n, k]`
/// query (no `repeat_kv`: the einsum shares K across the group's heads).
fn bgmk_einsum_gqa() -> String {
    doc(
        r#""n": 1, "g": 2, "p": 3, "k": 4"#,
        &[
            input("q", "activation", r#"["b", "g", "p", "n", "k"]"#),
            input("k_new", "activation", r#"["b", "g", "n", "k"]"#),
            input("v_new", "activation", r#"["b", "g", "n", "k"]"#),
            input("k_ctx", "context_kv:k", r#"["g", "m_c", "k"]"#),
            input("v_ctx", "context_kv:v", r#"["g", "m_c", "k"]"#),
            input("k_dec", "decode_kv:k", r#"["b", "g", "m_d", "k"]"#),
            input("v_dec", "decode_kv:v", r#"["b", "g", "m_d", "k"]"#),
        ],
        &[
            r#"{"id": "k_ctx_b", "op": "broadcast", "inputs": ["k_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec", "k_new"], "attrs": {"axis": 2}}"#,
            r#"{"id": "values", "op": "concat", "inputs": ["v_ctx_b", "v_dec", "v_new"], "attrs": {"axis": 2}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "keys"], "attrs": {"spec": "bgpnk,bgmk->bgpnm"}}"#,
            r#"{"id": "scaled", "op": "scale", "inputs": ["scores"], "attrs": {"value": 0.5}}"#,
            r#"{"id": "mask", "op": "causal_mask", "attrs": {"query": "n", "key": "m_c+m_d+n", "offset": "m_c+m_d"}}"#,
            r#"{"id": "masked", "op": "add", "inputs": ["scaled", "mask"]}"#,
            r#"{"id": "probs", "op": "softmax", "inputs": ["masked"], "attrs": {"axis": -1}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["probs", "values"], "attrs": {"spec": "bgpnm,bgmk->bgpnk"}}"#,
        ],
        OUTPUTS,
    )
}

/// Multi-head attention over K/V stored `[b, g, m, k]`, written with
/// `matmul` over a transposed K (the way PyTorch code reads).
fn bgmk_matmul() -> String {
    doc(
        r#""n": 1, "g": 2, "k": 4"#,
        &[
            input("q", "activation", r#"["b", "g", "n", "k"]"#),
            input("k_new", "activation", r#"["b", "g", "n", "k"]"#),
            input("v_new", "activation", r#"["b", "g", "n", "k"]"#),
            input("k_ctx", "context_kv:k", r#"["g", "m_c", "k"]"#),
            input("v_ctx", "context_kv:v", r#"["g", "m_c", "k"]"#),
            input("k_dec", "decode_kv:k", r#"["b", "g", "m_d", "k"]"#),
            input("v_dec", "decode_kv:v", r#"["b", "g", "m_d", "k"]"#),
        ],
        &[
            r#"{"id": "k_ctx_b", "op": "broadcast", "inputs": ["k_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec", "k_new"], "attrs": {"axis": 2}}"#,
            r#"{"id": "values", "op": "concat", "inputs": ["v_ctx_b", "v_dec", "v_new"], "attrs": {"axis": 2}}"#,
            r#"{"id": "keys_t", "op": "transpose", "inputs": ["keys"], "attrs": {"perm": [0, 1, 3, 2]}}"#,
            r#"{"id": "scores", "op": "matmul", "inputs": ["q", "keys_t"]}"#,
            r#"{"id": "scaled", "op": "scale", "inputs": ["scores"], "attrs": {"value": 0.5}}"#,
            r#"{"id": "mask", "op": "causal_mask", "attrs": {"query": "n", "key": "m_c+m_d+n", "offset": "m_c+m_d"}}"#,
            r#"{"id": "masked", "op": "add", "inputs": ["scaled", "mask"]}"#,
            r#"{"id": "probs", "op": "softmax", "inputs": ["masked"], "attrs": {"axis": -1}}"#,
            r#"{"id": "attn", "op": "matmul", "inputs": ["probs", "values"]}"#,
        ],
        OUTPUTS,
    )
}

/// K/V stored `[b, m, g, k]`: the context `[m_c, g, k]` is broadcast to
/// `[b, m_c, g, k]`, concatenated on axis 1, then transposed to
/// `[b, g, M, k]` before the scores and the weighted sum. `scores_op`:
/// `matmul` (over a second transpose) or `einsum`.
fn bmgk(scores_op: &str) -> String {
    let (scores, attn) = match scores_op {
        "matmul" => (
            r#"{"id": "scores", "op": "matmul", "inputs": ["q", "keys_t"], "attrs": {"transpose_b": true}}"#,
            r#"{"id": "attn", "op": "matmul", "inputs": ["probs", "values_t"]}"#,
        ),
        _ => (
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "keys_t"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["probs", "values_t"], "attrs": {"spec": "bgnm,bgmk->bgnk"}}"#,
        ),
    };
    doc(
        r#""n": 1, "g": 2, "k": 4"#,
        &[
            input("q", "activation", r#"["b", "g", "n", "k"]"#),
            input("k_new", "activation", r#"["b", "n", "g", "k"]"#),
            input("v_new", "activation", r#"["b", "n", "g", "k"]"#),
            input("k_ctx", "context_kv:k", r#"["m_c", "g", "k"]"#),
            input("v_ctx", "context_kv:v", r#"["m_c", "g", "k"]"#),
            input("k_dec", "decode_kv:k", r#"["b", "m_d", "g", "k"]"#),
            input("v_dec", "decode_kv:v", r#"["b", "m_d", "g", "k"]"#),
        ],
        &[
            r#"{"id": "k_ctx_b", "op": "broadcast", "inputs": ["k_ctx"], "attrs": {"shape": ["b", "m_c", "g", "k"]}}"#,
            r#"{"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "m_c", "g", "k"]}}"#,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec", "k_new"], "attrs": {"axis": 1}}"#,
            r#"{"id": "values", "op": "concat", "inputs": ["v_ctx_b", "v_dec", "v_new"], "attrs": {"axis": 1}}"#,
            r#"{"id": "keys_t", "op": "transpose", "inputs": ["keys"], "attrs": {"perm": [0, 2, 1, 3]}}"#,
            r#"{"id": "values_t", "op": "transpose", "inputs": ["values"], "attrs": {"perm": [0, 2, 1, 3]}}"#,
            scores,
            r#"{"id": "scaled", "op": "scale", "inputs": ["scores"], "attrs": {"value": 0.5}}"#,
            r#"{"id": "mask", "op": "causal_mask", "attrs": {"query": "n", "key": "m_c+m_d+n", "offset": "m_c+m_d"}}"#,
            r#"{"id": "masked", "op": "add", "inputs": ["scaled", "mask"]}"#,
            r#"{"id": "probs", "op": "softmax", "inputs": ["masked"], "attrs": {"axis": -1}}"#,
            attn,
        ],
        OUTPUTS,
    )
}

/// Small points the hand-written graphs are run at (m_d = 0 and b = 1 included).
const SMALL: &[(i64, i64, i64)] = &[(3, 5, 2), (2, 1, 0), (1, 4, 3), (5, 7, 1)];

/// Rewritten at b=16,m_c=512,m_d=8; same outputs at every [`SMALL`] point.
fn check_layout(name: &str, json: &str) {
    let graph = parse(json);
    let opt = opt_at(&graph, "b=16,m_c=512,m_d=8");
    assert_eq!(opt.report.sites.len(), 2, "{name}: {}", opt.report.render());
    assert_bifurcated(&opt, name);
    for (i, &(b, m_c, m_d)) in SMALL.iter().enumerate() {
        if let Err(e) = check_same(&graph, &opt.graph, &point(b, m_c, m_d), 7 + i as u64) {
            panic!("{name} at b={b},m_c={m_c},m_d={m_d}: {e}");
        }
    }
    let at_one = opt_at(&graph, "b=1,m_c=512,m_d=8");
    assert_untouched(&graph, &at_one, &format!("{name} at b=1"));
}

#[test]
fn layout_bgmk_einsum_is_bifurcated() {
    check_layout("[b, g, m, k], einsum", &bgmk_einsum());
}

#[test]
fn layout_bgmk_einsum_grouped_is_bifurcated() {
    check_layout("[b, g, m, k], einsum over [b, g, p, n, k] queries", &bgmk_einsum_gqa());
}

#[test]
fn layout_bgmk_matmul_is_bifurcated() {
    check_layout("[b, g, m, k], matmul", &bgmk_matmul());
}

#[test]
fn layout_bmgk_matmul_is_bifurcated() {
    check_layout("[b, m, g, k] transposed, matmul", &bmgk("matmul"));
}

#[test]
fn layout_bmgk_einsum_is_bifurcated() {
    check_layout("[b, m, g, k] transposed, einsum", &bmgk("einsum"));
}

/// Multi-query attention (one KV head) written as frameworks do: the
/// concatenated `[b, 1, M, k]` cache broadcast over the `h` query heads.
/// Found by the properties asserting bifurcation at the forcing point for
/// every g = 1 model (llama with `num_key_value_heads: 1`, gpt_bigcode with
/// `multi_query`, smallest case `Model { Llama, h: 2, g: 1, k: 2 }`) and
/// seen in the santacoder / starcoder examples: nothing is rewritten, the
/// report says "no bifurcated form found (the laws did not apply)". Root
/// cause: `einsum_over_reshape_dropping_size_one_axis_of_a_concat_is_bifurcated`.
#[test]
fn mqa_broadcast_over_heads_of_a_concat_is_bifurcated() {
    let json = doc(
        r#""n": 1, "g": 1, "h": 2, "k": 2"#,
        &[
            input("q", "activation", r#"["b", "h", "n", "k"]"#),
            input("k_ctx", "context_kv:k", r#"["g", "m_c", "k"]"#),
            input("k_dec", "decode_kv:k", r#"["b", "g", "m_d", "k"]"#),
        ],
        &[
            r#"{"id": "k_ctx_b", "op": "broadcast", "inputs": ["k_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec"], "attrs": {"axis": 2}}"#,
            r#"{"id": "keys_h", "op": "broadcast", "inputs": ["keys"], "attrs": {"shape": ["b", "h", "m_c+m_d", "k"]}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["q", "keys_h"], "attrs": {"spec": "bhnk,bhmk->bhnm"}}"#,
        ],
        OUTPUTS,
    );
    let graph = parse(&json);
    let opt = opt_at(&graph, "b=16,m_c=512,m_d=8");
    assert_bifurcated(&opt, "MQA: einsum over broadcast_h(concat(broadcast_b(K_c), K_d))");
    check_same(&graph, &opt.graph, &point(3, 5, 2), 1).unwrap();
}

/// A broadcast that stretches a size-1 axis whose letter only the output
/// has (`m`: here the keys are one row `[g, 1, k]` read at every position)
/// cannot be absorbed: dropping `m` would leave the einsum without its
/// size. `einsum-absorb-broadcast` did, and building that einsum tripped
/// the e-graph's shape invariant (a panic); found by mutating the
/// multi-level example (`m_s` → 1 in a system-prompt cache's shape).
#[test]
fn broadcast_of_an_output_only_axis_is_not_absorbed() {
    let json = doc(
        r#""n": 1, "g": 2, "k": 4"#,
        &[input("q", "activation", r#"["b", "g", "n", "k"]"#), input("row", "activation", r#"["g", 1, "k"]"#)],
        &[
            r#"{"id": "keys", "op": "broadcast", "inputs": ["row"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["q", "keys"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
        ],
        OUTPUTS,
    );
    let graph = parse(&json);
    let opt = opt_at(&graph, "b=16,m_c=512,m_d=8");
    check_same(&graph, &opt.graph, &point(3, 5, 2), 1).unwrap();
}

/// The root cause of the multi-query miss, minimized: after
/// `einsum-absorb-broadcast` drops the stretched size-1 head axis, the einsum
/// reads `reshape([b, M, k], concat(..))` and no law sees through a reshape
/// that only removes a size-1 axis, so the concat laws never match (no rule
/// fires at all on this graph). The same graph without the size-1 axis
/// (K stored `[b, M, k]`, spec `bhnk,bmk->bhnm`) is bifurcated.
#[test]
fn einsum_over_reshape_dropping_size_one_axis_of_a_concat_is_bifurcated() {
    let json = doc(
        r#""n": 1, "g": 1, "h": 2, "k": 2"#,
        &[
            input("q", "activation", r#"["b", "h", "n", "k"]"#),
            input("k_ctx", "context_kv:k", r#"["g", "m_c", "k"]"#),
            input("k_dec", "decode_kv:k", r#"["b", "g", "m_d", "k"]"#),
        ],
        &[
            r#"{"id": "k_ctx_b", "op": "broadcast", "inputs": ["k_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec"], "attrs": {"axis": 2}}"#,
            r#"{"id": "keys_r", "op": "reshape", "inputs": ["keys"], "attrs": {"shape": ["b", "m_c+m_d", "k"]}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["q", "keys_r"], "attrs": {"spec": "bhnk,bmk->bhnm"}}"#,
        ],
        OUTPUTS,
    );
    let graph = parse(&json);
    let opt = opt_at(&graph, "b=16,m_c=512,m_d=8");
    assert_bifurcated(&opt, "einsum over reshape(concat) dropping a size-1 axis");
    check_same(&graph, &opt.graph, &point(3, 5, 2), 1).unwrap();
}

// ---------------------------------------------------------------- where nothing may change

/// (a) A context cache that is distinct per sample (`[b, g, m_c, k]`, no
/// broadcast) offers nothing to share: the graph comes out unchanged.
#[test]
fn per_sample_context_is_left_alone() {
    for role in ["activation", "decode_kv:k"] {
        let vrole = role.replace(":k", ":v");
        let json = doc(
            r#""n": 1, "g": 2, "k": 4"#,
            &[
                input("q", "activation", r#"["b", "g", "n", "k"]"#),
                input("k_new", "activation", r#"["b", "g", "n", "k"]"#),
                input("v_new", "activation", r#"["b", "g", "n", "k"]"#),
                input("k_ctx", role, r#"["b", "g", "m_c", "k"]"#),
                input("v_ctx", &vrole, r#"["b", "g", "m_c", "k"]"#),
                input("k_dec", "decode_kv:k", r#"["b", "g", "m_d", "k"]"#),
                input("v_dec", "decode_kv:v", r#"["b", "g", "m_d", "k"]"#),
            ],
            &[
                r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx", "k_dec", "k_new"], "attrs": {"axis": 2}}"#,
                r#"{"id": "values", "op": "concat", "inputs": ["v_ctx", "v_dec", "v_new"], "attrs": {"axis": 2}}"#,
                r#"{"id": "keys_t", "op": "transpose", "inputs": ["keys"], "attrs": {"perm": [0, 1, 3, 2]}}"#,
                r#"{"id": "scores", "op": "matmul", "inputs": ["q", "keys_t"]}"#,
                r#"{"id": "probs", "op": "softmax", "inputs": ["scores"], "attrs": {"axis": -1}}"#,
                r#"{"id": "attn", "op": "einsum", "inputs": ["probs", "values"], "attrs": {"spec": "bgnm,bgmk->bgnk"}}"#,
            ],
            OUTPUTS,
        );
        let graph = parse(&json);
        for at in ["b=16,m_c=512,m_d=8", "b=32,m_c=8192,m_d=256"] {
            assert_untouched(&graph, &opt_at(&graph, at), &format!("per-sample context ({role}) at {at}"));
        }
    }
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path().join("model.json")))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// (b) At b = 1 bifurcation saves nothing: every example comes out
/// unchanged (examples without a runtime dim `b`, e.g. multi-level ones
/// with `P, S`, are skipped).
#[test]
fn every_example_is_unchanged_at_b1() {
    let mut checked = 0;
    for path in examples() {
        let graph = bifurc::import::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !graph.dims.is_runtime("b") {
            continue;
        }
        let opt = opt_at(&graph, "b=1,m_c=8192,m_d=256");
        assert_untouched(&graph, &opt, &path.display().to_string());
        checked += 1;
    }
    assert!(checked > 0, "no example with a runtime dim b");
}

/// (c) A graph without attention (an MLP) comes out unchanged at b = 32.
#[test]
fn mlp_is_left_alone() {
    let json = r#"{"format": "bifurc-graph/1",
      "dims": {"runtime": ["b"], "constants": {"n": 1, "d": 8, "f": 16}},
      "inputs": [
        {"name": "x", "role": "activation", "shape": ["b", "n", "d"], "dtype": "f32"},
        {"name": "w_up", "role": "weight", "shape": ["f", "d"], "dtype": "f32"},
        {"name": "w_down", "role": "weight", "shape": ["d", "f"], "dtype": "f32"}
      ],
      "nodes": [
        {"id": "up", "op": "matmul", "inputs": ["x", "w_up"], "attrs": {"transpose_b": true}},
        {"id": "act", "op": "silu", "inputs": ["up"]},
        {"id": "down", "op": "matmul", "inputs": ["act", "w_down"], "attrs": {"transpose_b": true}}
      ],
      "outputs": [{"name": "y", "node": "down"}]}"#;
    let graph = parse(json);
    let opt = opt_at(&graph, "b=32");
    assert!(opt.report.sites.is_empty());
    assert_untouched(&graph, &opt, "MLP at b=32");
}
