//! The compiled step on the CPU (plan → emit → CPU pipeline → JIT) against
//! the reference interpreter, on the examples and on small configs of every
//! supported architecture, bifurcated and not, at several points including
//! an empty decode cache (m_d = 0). Each graph is compiled ONCE and run at
//! every point: runtime dims are kernel parameters.
//!
//! Tolerance (f32 graphs): norm-relative, per output,
//! `max|a - b| <= 1e-4 * max(max|b|, 1e-6)`, with `b` the interpreter
//! (f64 accumulation) and `a` the kernels (f32 accumulation, f32 libm).
//!
//! bf16 graphs: the kernels store every intermediate in bf16 (8 mantissa
//! bits, relative rounding 2^-9 ≈ 2e-3 per store) while the interpreter
//! keeps f32 everywhere; a 2-layer model chains ~15 such roundings, so the
//! bound is 3e-2 norm-relative.

use std::collections::BTreeMap;

use bifurc::hf::{build, HfOptions};
use bifurc::inspect::ShapePoint;
use bifurc::interp::{random_inputs, run, Tensor};
use bifurc::ir::{DType, Graph};
use bifurc::lower::{emit, emit_emulating_gpu, plan, plan_with, CpuStep, Emulation, Target, Tuning};
use bifurc::optimize::{optimize, Options};

const F32_TOL: f32 = 1e-4;
const BF16_TOL: f32 = 3e-2;

fn load(path: &str) -> Graph {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    bifurc::import::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn from_config(config: &str, dtype: Option<DType>) -> Graph {
    let doc = build(config, &HfOptions { layers: Some(2), dtype, ..Default::default() })
        .unwrap_or_else(|e| panic!("import-hf: {e}"));
    bifurc::import::from_value(&doc).unwrap_or_else(|e| panic!("import: {e}"))
}

fn bifurcated(g: &Graph, shape: &str) -> Graph {
    let point = ShapePoint::parse(shape).unwrap_or_else(|e| panic!("{e}"));
    let opt = optimize(g, &Options { point, ..Default::default() }).unwrap_or_else(|e| panic!("optimize: {e}"));
    assert!(opt.report.rewritten() > 0, "nothing was bifurcated at {shape}");
    opt.graph
}

fn point(dims: &[(&str, i64)]) -> BTreeMap<String, i64> {
    dims.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// `max|a - b| / max(max|b|, 1e-6)` over finite values; NaN when shapes
/// differ or the non-finite values (inf, NaN) differ.
fn norm_rel(a: &Tensor, b: &Tensor) -> f32 {
    if a.shape != b.shape || a.data.len() != b.data.len() {
        return f32::NAN;
    }
    let mut diff = 0.0f32;
    let mut top = 1e-6f32;
    for (&x, &y) in a.data.iter().zip(&b.data) {
        if x.is_finite() != y.is_finite() || (!y.is_finite() && x != y && !(x.is_nan() && y.is_nan())) {
            return f32::NAN;
        }
        if y.is_finite() {
            diff = diff.max((x - y).abs());
            top = top.max(y.abs());
        }
    }
    diff / top
}

/// Compiles `g` once, runs it at every point against the interpreter.
fn check(name: &str, g: &Graph, points: &[BTreeMap<String, i64>], tol: f32) {
    let step = CpuStep::compile(g).unwrap_or_else(|e| panic!("{name}: compile: {e}"));
    check_step(name, g, &step, points, tol);
}

/// Runs the compiled `step` of `g` at every point against the interpreter.
fn check_step(name: &str, g: &Graph, step: &CpuStep, points: &[BTreeMap<String, i64>], tol: f32) {
    for (seed, p) in points.iter().enumerate() {
        let inputs = random_inputs(g, p, 17 + seed as u64).unwrap_or_else(|e| panic!("{name}: inputs: {e}"));
        let want = run(g, p, &inputs).unwrap_or_else(|e| panic!("{name}: interp at {p:?}: {e}"));
        let got = step.run(p, &inputs).unwrap_or_else(|e| panic!("{name}: run at {p:?}: {e}"));
        assert_eq!(got.len(), want.len(), "{name}: outputs");
        let mut worst = 0.0f32;
        for (out, w) in &want {
            let a = got.get(out).unwrap_or_else(|| panic!("{name}: output `{out}` missing"));
            let err = norm_rel(a, w);
            assert!(err <= tol, "{name}: output `{out}` at {p:?}: norm-relative error {err:e} > {tol:e}");
            worst = worst.max(err);
        }
        eprintln!("{name} at {p:?}: worst norm-relative error {worst:e} over {} outputs", want.len());
    }
}

fn bcd_points() -> Vec<BTreeMap<String, i64>> {
    vec![
        point(&[("b", 1), ("m_c", 3), ("m_d", 0)]),
        point(&[("b", 3), ("m_c", 5), ("m_d", 2)]),
        point(&[("b", 4), ("m_c", 17), ("m_d", 7)]),
    ]
}

const LLAMA_GQA: &str = r#"{"model_type": "llama", "hidden_size": 48, "intermediate_size": 64,
  "num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 97,
  "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 512}"#;

const QWEN2_BIAS: &str = r#"{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
  "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
  "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": true}"#;

const GPT2_MHA: &str = r#"{"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2,
  "n_positions": 128, "vocab_size": 80, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}"#;

const GPT2_HEAD32: &str = r#"{"model_type": "gpt2", "n_embd": 64, "n_head": 2, "n_layer": 2,
  "n_positions": 128, "vocab_size": 80, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}"#;

const BIGCODE_MQA: &str = r#"{"model_type": "gpt_bigcode", "n_embd": 32, "n_head": 4, "n_inner": 64,
  "n_layer": 2, "n_positions": 128, "vocab_size": 72, "layer_norm_epsilon": 1e-5, "multi_query": true,
  "activation_function": "gelu_pytorch_tanh"}"#;

#[test]
fn tiny_example_matches_interpreter() {
    let g = load("examples/tiny/model.json");
    check("tiny", &g, &bcd_points(), F32_TOL);
}

#[test]
fn tiny_bifurcated_matches_interpreter() {
    let g = bifurcated(&load("examples/tiny/model.json"), "b=64,m_c=4096,m_d=64");
    let step = CpuStep::compile(&g).unwrap_or_else(|e| panic!("{e}"));
    // Layer 1's kernels run compiled functions of kernels before them (same
    // code, other buffers), and still give the interpreter's values.
    let kernels = step.program().kernels.len();
    let layer1 = step.program().kernels.iter().filter(|k| k.node.starts_with("l1.")).count();
    assert!(layer1 > 10 && step.functions() <= kernels - layer1, "{} of {kernels}", step.functions());
    check_step("tiny (bifurcated)", &g, &step, &bcd_points(), F32_TOL);
}

#[test]
fn llama_gqa_matches_interpreter() {
    let g = from_config(LLAMA_GQA, None);
    check("llama", &g, &bcd_points(), F32_TOL);
    let g = bifurcated(&g, "b=64,m_c=4096,m_d=64");
    check("llama (bifurcated)", &g, &bcd_points(), F32_TOL);
}

#[test]
fn qwen2_bias_tied_matches_interpreter() {
    let g = from_config(QWEN2_BIAS, None);
    check("qwen2", &g, &bcd_points(), F32_TOL);
}

#[test]
fn gpt2_mha_matches_interpreter() {
    let g = from_config(GPT2_MHA, None);
    check("gpt2", &g, &bcd_points(), F32_TOL);
    let g = bifurcated(&g, "b=64,m_c=4096,m_d=64");
    check("gpt2 (bifurcated)", &g, &bcd_points(), F32_TOL);
}

#[test]
fn gpt_bigcode_mqa_matches_interpreter() {
    let g = from_config(BIGCODE_MQA, None);
    check("gpt_bigcode", &g, &bcd_points(), F32_TOL);
    let g = bifurcated(&g, "b=64,m_c=4096,m_d=64");
    check("gpt_bigcode (bifurcated)", &g, &bcd_points(), F32_TOL);
}

/// Sample counts that fill the CPU's register tiles (8 rows of samples × 4
/// outputs of a 64-wide projection; 4 rows × 2 vectors of a 32-wide head
/// for w·V; 16 samples in the lanes of the context q·K) and leave a short
/// last tile, on a model whose widths take those paths (d_model 64, head
/// dim 32), f32 and bf16, baseline and bifurcated; the last point also has
/// q·K rows past a whole tile of samples and a context block cut short.
#[test]
fn full_register_tiles_match_interpreter() {
    let points = vec![
        point(&[("b", 9), ("m_c", 20), ("m_d", 3)]),
        point(&[("b", 16), ("m_c", 33), ("m_d", 1)]),
        point(&[("b", 19), ("m_c", 110), ("m_d", 2)]),
    ];
    for dtype in [None, Some(DType::BF16)] {
        let tol = if dtype.is_some() { BF16_TOL } else { F32_TOL };
        let g = from_config(GPT2_HEAD32, dtype);
        check(&format!("gpt2 head 32 {dtype:?}"), &g, &points, tol);
        let g = bifurcated(&g, "b=64,m_c=4096,m_d=64");
        check(&format!("gpt2 head 32 {dtype:?} (bifurcated)"), &g, &points, tol);
    }
}

#[test]
fn multilevel_matches_interpreter() {
    let points = vec![
        point(&[("P", 1), ("S", 1), ("m_s", 2), ("m_c", 3), ("m_d", 0)]),
        point(&[("P", 2), ("S", 3), ("m_s", 4), ("m_c", 5), ("m_d", 2)]),
        point(&[("P", 3), ("S", 2), ("m_s", 9), ("m_c", 6), ("m_d", 7)]),
    ];
    let g = load("examples/multilevel/model.json");
    check("multilevel", &g, &points, F32_TOL);
    let g = bifurcated(&g, "P=8,S=8,m_s=4096,m_c=2048,m_d=64");
    check("multilevel (bifurcated)", &g, &points, F32_TOL);
}

/// A bf16 llama whose widths take the CPU's AMX tiles where it has them
/// (d_model 256, heads of 64: projections, context q·K and w·V), grouped
/// query, bifurcated, at sample counts under, at and past tiles of 16 rows
/// and contexts across blocks of 32 positions with a tail.
#[test]
fn bf16_llama_amx_widths_match_interpreter() {
    const LLAMA_WIDE: &str = r#"{"model_type": "llama", "hidden_size": 256, "intermediate_size": 320,
      "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 96,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 2048}"#;
    let points = vec![
        point(&[("b", 5), ("m_c", 40), ("m_d", 3)]),
        point(&[("b", 16), ("m_c", 64), ("m_d", 1)]),
        point(&[("b", 17), ("m_c", 333), ("m_d", 5)]),
    ];
    let g = bifurcated(&from_config(LLAMA_WIDE, Some(DType::BF16)), "b=64,m_c=4096,m_d=64");
    check("llama 256 bf16 (bifurcated)", &g, &points, BF16_TOL);
}

#[test]
fn bf16_llama_matches_interpreter_loosely() {
    let g = from_config(LLAMA_GQA, Some(DType::BF16));
    assert!(g.inputs.iter().any(|i| i.dtype == DType::BF16));
    check("llama bf16", &g, &bcd_points(), BF16_TOL);
    let g = bifurcated(&g, "b=64,m_c=4096,m_d=64");
    check("llama bf16 (bifurcated)", &g, &bcd_points(), BF16_TOL);
}

/// A half-precision model's bifurcated scores: the context, decode and
/// new-token parts are stored in the model's dtype, as the original scores
/// were (a view only moves their elements to the concat, so each part
/// rounds as the original did), while the `w·V` parts, which are summed,
/// stay f32; the CPU then writes the softmax over them (half the bytes,
/// no buffer of its own). Grouped-query bf16 and multi-head f16, the step
/// against the interpreter.
#[test]
fn half_precision_scores_parts_keep_their_dtype() {
    for (config, dtype) in [(LLAMA_GQA, DType::BF16), (GPT2_MHA, DType::F16)] {
        let g = from_config(config, Some(dtype));
        let opt = bifurcated(&g, "b=64,m_c=4096,m_d=64");
        let parts = |what: &str| -> Vec<DType> {
            opt.nodes.iter().filter(|n| n.id.contains(what) && n.id.contains(".einsum")).map(|n| n.dtype).collect()
        };
        let (scores, context) = (parts("attn.scores"), parts("attn.context"));
        assert!(!scores.is_empty() && scores.iter().all(|&d| d == dtype), "{dtype:?}: scores parts {scores:?}");
        assert!(!context.is_empty() && context.iter().all(|&d| d == DType::F32), "{dtype:?}: w·V parts {context:?}");
        let program = bifurc::lower::plan_cpu(&opt).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(program.in_place.len(), 2, "{dtype:?}: a softmax a layer written over its scores");
        check(&format!("{dtype:?} (bifurcated)"), &opt, &bcd_points(), BF16_TOL);
    }
}

#[test]
fn f16_gpt2_matches_interpreter_loosely() {
    // f16 keeps 11 mantissa bits (rounding 2^-12 per store): 8x finer than bf16.
    let g = from_config(GPT2_MHA, Some(DType::F16));
    assert!(g.inputs.iter().any(|i| i.dtype == DType::F16));
    check("gpt2 f16", &g, &bcd_points(), BF16_TOL / 4.0);
}

#[test]
fn emit_is_deterministic_and_gpu_text_verifies() {
    let g = bifurcated(&load("examples/tiny/model.json"), "b=64,m_c=4096,m_d=64");
    let p = plan(&g).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p, plan(&g).unwrap_or_else(|e| panic!("{e}")));
    for target in [Target::Cpu, Target::Gpu] {
        let a = emit(&g, &p, target).unwrap_or_else(|e| panic!("{e}"));
        let b = emit(&g, &p, target).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b, "{target:?} text differs between runs");
        // For pipeline experiments with mlir-opt: BIFURC_DUMP_MLIR=/some/dir.
        if let Some(dir) = std::env::var_os("BIFURC_DUMP_MLIR") {
            let path = std::path::Path::new(&dir).join(format!("tiny_bifurcated_{target:?}.mlir").to_lowercase());
            std::fs::write(&path, &a).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        let context = bifurc::lower::new_context();
        let module =
            melior::ir::Module::parse(&context, &a).unwrap_or_else(|| panic!("{target:?} text does not parse"));
        bifurc::lower::verify(&context, &module, "emitted").unwrap_or_else(|e| panic!("{target:?}: {e}"));
    }
    // Every op family and bf16 storage also verify as GPU kernels.
    let ops = bifurc::import::parse(OPS_GRAPH).unwrap_or_else(|e| panic!("{e}"));
    let bf16 = from_config(GPT2_MHA, Some(DType::BF16));
    for (name, g) in [("ops", &ops), ("gpt2_bf16", &bf16)] {
        let text = emit(g, &plan(g).unwrap_or_else(|e| panic!("{e}")), Target::Gpu).unwrap_or_else(|e| panic!("{e}"));
        if let Some(dir) = std::env::var_os("BIFURC_DUMP_MLIR") {
            let path = std::path::Path::new(&dir).join(format!("{name}_gpu.mlir"));
            std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        let context = bifurc::lower::new_context();
        let module =
            melior::ir::Module::parse(&context, &text).unwrap_or_else(|| panic!("{name}: GPU text does not parse"));
        bifurc::lower::verify(&context, &module, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let gpu = emit(&g, &p, Target::Gpu).unwrap_or_else(|e| panic!("{e}"));
    assert!(gpu.contains("gpu.container_module") && gpu.contains("gpu.module @bifurc_kernels"));
    assert_eq!(gpu.matches(" kernel {").count(), p.kernels.len());
    // Row kernels (softmax, rms_norm): on the GPU one block per row, its
    // threads combining their partial statistics with gpu.all_reduce; on the
    // CPU one iteration per row, no cross-thread step.
    let rows: Vec<_> = p.kernels.iter().filter(|k| ["softmax", "rms_norm"].contains(&k.op.as_str())).collect();
    assert_eq!(rows.len(), 3 * 2 + 1, "tiny: 2 norms + 1 softmax per layer, 2 layers, a final norm");
    for k in &rows {
        let start = gpu.find(&format!("gpu.func @{}(", k.name)).unwrap_or_else(|| panic!("{} missing", k.name));
        let body = &gpu[start..start + gpu[start..].find("gpu.return").unwrap_or(0)];
        assert!(body.contains("%i = gpu.block_id x"), "{}: not one block per row", k.name);
        let reduces = body.matches("gpu.all_reduce").count();
        assert_eq!(reduces, if k.op == "softmax" { 2 } else { 1 }, "{}", k.name);
    }
    let cpu = emit(&g, &p, Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cpu.contains("gpu.all_reduce"));
}

/// Every op family, odd layouts and output kinds in one graph: inlined
/// chains, broadcasting, reductions with and without keepdims, softmax on a
/// non-last axis, einsum, batched matmul both ways, gather, integer concat,
/// and outputs that are an input, a view, a node twice, a constant mask.
const OPS_GRAPH: &str = r#"{
  "format": "bifurc-graph/1",
  "dims": {"runtime": ["m"], "constants": {"d": 4, "v": 5, "e": 3}},
  "inputs": [
    {"name": "x", "role": "activation", "shape": ["m", "d"], "dtype": "f32"},
    {"name": "y", "role": "weight", "shape": ["d"], "dtype": "f32"},
    {"name": "bias", "role": "weight", "shape": ["d"], "dtype": "f32"},
    {"name": "ids", "role": "token_ids", "shape": ["m"], "dtype": "i32"},
    {"name": "table", "role": "weight", "shape": ["v", "e"], "dtype": "f32"},
    {"name": "w3", "role": "weight", "shape": [2, "e", "d"], "dtype": "f32"}
  ],
  "nodes": [
    {"id": "ex", "op": "exp", "inputs": ["x"]},
    {"id": "ng", "op": "neg", "inputs": ["ex"]},
    {"id": "sq", "op": "mul", "inputs": ["x", "x"]},
    {"id": "one", "op": "constant", "inputs": [], "attrs": {"value": 1.0, "shape": []}},
    {"id": "sq1", "op": "add", "inputs": ["sq", "one"]},
    {"id": "rs", "op": "rsqrt", "inputs": ["sq1"]},
    {"id": "th", "op": "tanh", "inputs": ["x"]},
    {"id": "ge", "op": "gelu", "inputs": ["x"], "attrs": {"approximate": "none"}},
    {"id": "gt", "op": "gelu", "inputs": ["x"], "attrs": {"approximate": "tanh"}},
    {"id": "si", "op": "silu", "inputs": ["x"]},
    {"id": "dv", "op": "div", "inputs": ["x", "y"]},
    {"id": "sb", "op": "sub", "inputs": ["y", "x"]},
    {"id": "sc", "op": "scale", "inputs": ["sb"], "attrs": {"value": -0.5}},
    {"id": "rsum", "op": "reduce_sum", "inputs": ["x"], "attrs": {"axes": [0], "keepdims": true}},
    {"id": "rmax", "op": "reduce_max", "inputs": ["x"], "attrs": {"axes": [0, 1]}},
    {"id": "rmax_row", "op": "reduce_max", "inputs": ["ex"], "attrs": {"axes": [1]}},
    {"id": "sm", "op": "softmax", "inputs": ["x"], "attrs": {"axis": 0}},
    {"id": "ln", "op": "layer_norm", "inputs": ["x", "y", "bias"], "attrs": {"eps": 1e-5}},
    {"id": "rn", "op": "rms_norm", "inputs": ["sc", "y"], "attrs": {"eps": 1e-6}},
    {"id": "es", "op": "einsum", "inputs": ["x", "y"], "attrs": {"spec": "md,d->m"}},
    {"id": "eo", "op": "einsum", "inputs": ["x", "y"], "attrs": {"spec": "md,e->dem"}},
    {"id": "xt", "op": "transpose", "inputs": ["x"], "attrs": {"perm": [1, 0]}},
    {"id": "mm", "op": "matmul", "inputs": ["w3", "xt"]},
    {"id": "mmt", "op": "matmul", "inputs": ["x", "w3"], "attrs": {"transpose_b": true}},
    {"id": "g", "op": "gather", "inputs": ["table", "ids"]},
    {"id": "cat", "op": "concat", "inputs": ["ids", "ids"], "attrs": {"axis": 0}},
    {"id": "sl", "op": "slice", "inputs": ["x"], "attrs": {"axis": 1, "start": 1, "end": 3}},
    {"id": "rsh", "op": "reshape", "inputs": ["x"], "attrs": {"shape": [2, "2*m"]}},
    {"id": "rsh2", "op": "reshape", "inputs": ["sl"], "attrs": {"shape": ["m", 1, 2, 1]}},
    {"id": "bc", "op": "broadcast", "inputs": ["y"], "attrs": {"shape": [2, "m", "d"]}},
    {"id": "cm", "op": "causal_mask", "inputs": [], "attrs": {"query": "m", "key": "m+2", "offset": 1}}
  ],
  "outputs": [
    {"name": "ng", "node": "ng"}, {"name": "ng_again", "node": "ng"}, {"name": "rs", "node": "rs"},
    {"name": "th", "node": "th"}, {"name": "ge", "node": "ge"}, {"name": "gt", "node": "gt"},
    {"name": "si", "node": "si"}, {"name": "dv", "node": "dv"}, {"name": "rsum", "node": "rsum"},
    {"name": "rmax", "node": "rmax"}, {"name": "rmax_row", "node": "rmax_row"}, {"name": "sm", "node": "sm"},
    {"name": "ln", "node": "ln"}, {"name": "rn", "node": "rn"}, {"name": "es", "node": "es"},
    {"name": "eo", "node": "eo"}, {"name": "mm", "node": "mm"}, {"name": "mmt", "node": "mmt"},
    {"name": "g", "node": "g"}, {"name": "cat", "node": "cat"}, {"name": "sl", "node": "sl"},
    {"name": "bc", "node": "bc"}, {"name": "cm", "node": "cm"}, {"name": "x_out", "node": "x"},
    {"name": "xt", "node": "xt"}, {"name": "rsh", "node": "rsh"}, {"name": "rsh2", "node": "rsh2"}
  ]
}"#;

#[test]
fn every_op_family_matches_interpreter() {
    let g = bifurc::import::parse(OPS_GRAPH).unwrap_or_else(|e| panic!("{e}"));
    let points: Vec<_> = [0, 1, 2, 7].iter().map(|&m| point(&[("m", m)])).collect();
    check("ops", &g, &points, F32_TOL);
    let p = plan(&g).unwrap_or_else(|e| panic!("{e}"));
    let ops: Vec<&str> = p.kernels.iter().map(|k| k.op.as_str()).collect();
    // `ex` (used by `ng` and `rmax_row`) gets a kernel; `sq`, `one`, `sq1`,
    // `sb`, `sc` are inlined; views, inputs and repeated outputs are copies.
    assert!(ops.contains(&"exp") && !ops.contains(&"constant") && !ops.contains(&"scale"), "{ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "copy").count(), 8, "{ops:?}");
    assert!(p.kernels.iter().all(|k| k.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')));
}

#[test]
fn softmax_of_a_fully_masked_row_is_zero_and_bad_ids_give_nan() {
    let g = bifurc::import::parse(
        r#"{"format": "bifurc-graph/1", "dims": {"runtime": ["m"], "constants": {"d": 3}},
          "inputs": [{"name": "x", "role": "activation", "shape": ["m", "d"], "dtype": "f32"},
                     {"name": "ids", "role": "token_ids", "shape": ["m"], "dtype": "i64"}],
          "nodes": [{"id": "p", "op": "softmax", "inputs": ["x"], "attrs": {"axis": 1}},
                    {"id": "g", "op": "gather", "inputs": ["x", "ids"]}],
          "outputs": [{"name": "p", "node": "p"}, {"name": "g", "node": "g"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let step = CpuStep::compile(&g).unwrap_or_else(|e| panic!("{e}"));
    let ninf = f32::NEG_INFINITY;
    let x = Tensor::new(vec![2, 3], vec![ninf, ninf, ninf, 0.0, 1.0, ninf]).unwrap_or_else(|e| panic!("{e}"));
    let ids = Tensor::new(vec![2], vec![1.0, 2.0]).unwrap_or_else(|e| panic!("{e}"));
    let p = point(&[("m", 2)]);
    let inputs = std::collections::HashMap::from([("x".to_string(), x.clone()), ("ids".to_string(), ids)]);
    let got = step.run(&p, &inputs).unwrap_or_else(|e| panic!("{e}"));
    let want = run(&g, &std::collections::BTreeMap::from([("m".to_string(), 2)]), &{
        let mut ok = inputs.clone();
        ok.insert("ids".into(), Tensor::new(vec![2], vec![1.0, 0.0]).unwrap_or_else(|e| panic!("{e}")));
        ok
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&got["p"].data[..3], &[0.0, 0.0, 0.0]);
    assert!(norm_rel(&got["p"], &want["p"]) <= F32_TOL);
    // Row 1 of the table is row 1 of x; id 2 is outside the 2-row table.
    assert_eq!(&got["g"].data[..3], &x.data[3..6]);
    assert!(got["g"].data[3..].iter().all(|v| v.is_nan()), "{:?}", got["g"].data);
    // The interpreter refuses the bad id.
    assert!(run(&g, &p, &inputs).is_err());
}

#[test]
fn run_rejects_bad_points_and_inputs() {
    let g = load("examples/tiny/model.json");
    let step = CpuStep::compile(&g).unwrap_or_else(|e| panic!("{e}"));
    let p = point(&[("b", 2), ("m_c", 3), ("m_d", 1)]);
    let inputs = random_inputs(&g, &p, 1).unwrap_or_else(|e| panic!("{e}"));
    assert!(step.run(&point(&[("b", 2), ("m_c", 3)]), &inputs).is_err(), "missing dim");
    assert!(step.run(&point(&[("b", -1), ("m_c", 3), ("m_d", 1)]), &inputs).is_err(), "negative dim");
    assert!(step.run(&point(&[("b", 3), ("m_c", 3), ("m_d", 1)]), &inputs).is_err(), "shape mismatch");
    let mut missing = inputs.clone();
    missing.remove("token_ids");
    assert!(step.run(&p, &missing).is_err(), "missing input");
    let mut frac = inputs.clone();
    frac.insert("token_ids".into(), Tensor::new(vec![2, 1], vec![0.5, 1.0]).unwrap_or_else(|e| panic!("{e}")));
    assert!(step.run(&p, &frac).is_err(), "fractional id");
    assert!(step.run(&p, &inputs).is_ok());
}

/// KV caches stored with spare rows (decode `[b, g, capacity, k]`, context
/// `[g, capacity, k]`, the capacities kernel parameters): the kernels read
/// only the first `m_d` / `m_c` rows of each block — the spare rows hold NaN
/// here — and give exactly the dense run's outputs, f32 and bf16,
/// bifurcated and not.
#[test]
fn pitched_kv_caches_read_only_their_rows() {
    for dtype in [None, Some(DType::BF16)] {
        let plain = from_config(LLAMA_GQA, dtype);
        for (name, g) in [("plain", plain.clone()), ("bifurcated", bifurcated(&plain, "b=64,m_c=4096,m_d=64"))] {
            let step = CpuStep::compile(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
            let pitched: Vec<_> =
                step.program().buffers.iter().filter_map(|b| Some((&b.name, b.pitch.clone()?))).collect();
            assert_eq!(pitched.len(), 8, "{name}: every KV cache of 2 layers is pitched");
            let p = point(&[("b", 3), ("m_c", 5), ("m_d", 2)]);
            let dense = random_inputs(&g, &p, 3).unwrap_or_else(|e| panic!("{e}"));
            let want = step.run(&p, &dense).unwrap_or_else(|e| panic!("{name}: {e}"));
            let caps = point(&[("m_c", 9), ("m_d", 6)]);
            let mut padded = dense.clone();
            for (buf, pitch) in &pitched {
                let t = &dense[buf.as_str()];
                let cap = caps[&pitch.dim] as usize;
                let outer: usize = t.shape[..pitch.axis].iter().product();
                let (rows, row) = (t.shape[pitch.axis], t.shape[pitch.axis + 1..].iter().product::<usize>());
                let mut data = vec![f32::NAN; outer * cap * row];
                for o in 0..outer {
                    data[o * cap * row..(o * cap + rows) * row]
                        .copy_from_slice(&t.data[o * rows * row..(o + 1) * rows * row]);
                }
                let mut shape = t.shape.clone();
                shape[pitch.axis] = cap;
                padded.insert(buf.to_string(), Tensor { shape, data });
            }
            let got = step.run_with_capacity(&p, &caps, &padded).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name} {dtype:?}: pitched caches change the outputs");
            // A capacity below the dim, or dense data with a capacity, is an error.
            let err = step.run_with_capacity(&p, &point(&[("m_d", 1)]), &padded).unwrap_err().to_string();
            assert!(err.contains("capacity 1 of runtime dim `m_d` is less than its value 2"), "{err}");
            let err = step.run_with_capacity(&p, &caps, &dense).unwrap_err().to_string();
            assert!(err.contains("expected [2, 9, 8]") || err.contains("expected [3, 2, 6, 8]"), "{err}");
        }
    }
}

/// The GPU's block-shared kernels, run the GPU's way on the CPU
/// (`Emulation`): row kernels (softmax, rms_norm, layer_norm) and
/// contractions summing along the operands' innermost axis split their
/// reductions over 3 or 7 lanes (lane `t` takes elements `t, t + lanes, …`,
/// the partials combined afterwards) — the element split of the GPU's
/// 256-thread blocks, with lane counts that divide none of the lengths.
/// Every contraction long enough is made cooperative (threshold 1 instead
/// of the GPU's 1024) so the small models exercise them. Same tolerance as
/// the plain CPU kernels.
#[test]
fn gpu_block_kernels_emulated_match_interpreter() {
    let ops = bifurc::import::parse(OPS_GRAPH).unwrap_or_else(|e| panic!("{e}"));
    let tiny = load("examples/tiny/model.json");
    type Points = Vec<BTreeMap<String, i64>>;
    let cases: Vec<(&str, Graph, Points, f32)> = vec![
        ("tiny (bifurcated)", bifurcated(&tiny, "b=64,m_c=4096,m_d=64"), bcd_points(), F32_TOL),
        ("llama gqa", from_config(LLAMA_GQA, None), bcd_points(), F32_TOL),
        ("gpt2 (layer_norm)", from_config(GPT2_MHA, None), bcd_points(), F32_TOL),
        ("bf16 llama", from_config(LLAMA_GQA, Some(DType::BF16)), bcd_points(), BF16_TOL),
        // Multi-query, bifurcated: the one KV head a summed letter of size
        // 1 (read at 0, no loop) in the cooperative contractions too.
        (
            "gpt_bigcode mqa (bifurcated)",
            bifurcated(&from_config(BIGCODE_MQA, None), "b=64,m_c=4096,m_d=64"),
            bcd_points(),
            F32_TOL,
        ),
        ("ops", ops, vec![point(&[("m", 1)]), point(&[("m", 5)])], F32_TOL),
    ];
    for (name, g, points, tol) in cases {
        // Tensor cores off (the CPU's plan): their emulation is tested below.
        let program = plan_with(&g, None).unwrap_or_else(|e| panic!("{e}"));
        let plain = emit(&g, &program, Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
        for lanes in [3, 7] {
            let emulation = Emulation { lanes, cooperative_min: 1, tuning: Tuning::default() };
            let text = emit_emulating_gpu(&g, &program, emulation).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_ne!(text, plain, "{name}: nothing was split");
            let step = CpuStep::compile_emulating_gpu(&g, emulation).unwrap_or_else(|e| panic!("{name}: {e}"));
            check_step(&format!("{name}, {lanes} lanes"), &g, &step, &points, tol);
        }
    }
}

/// Tensor-core contractions (bf16 / f16 operands; see `bifurc::lower::mma`)
/// run on the CPU the GPU's way: 16 × 8 output tiles, eight warps splitting
/// the reduction in steps of 16, each lane's `mma.sync` fragments scattered
/// into the tile by the PTX fragment layout, partials added in warp order.
/// Shapes leave every tile ragged: samples past 16 (two row tiles, the
/// second nearly empty), context lengths that are not multiples of 8 or 16
/// (the context einsums' columns and the w·V reduction), head dim 8 (a
/// reduction shorter than one step), an empty decode cache, an empty
/// context (no step at all for w·V_ctx); head dim 32
/// walks q·K in chunks (16-byte loads from the pitched context cache).
#[test]
fn tensor_core_kernels_emulated_match_interpreter() {
    let points = vec![
        point(&[("b", 1), ("m_c", 3), ("m_d", 0)]),
        point(&[("b", 17), ("m_c", 33), ("m_d", 5)]),
        point(&[("b", 3), ("m_c", 16), ("m_d", 1)]),
        point(&[("b", 2), ("m_c", 0), ("m_d", 2)]),
    ];
    let at = "b=32,m_c=4096,m_d=64";
    // Per layer: the projections (llama 7, gpt2 4), the attention's
    // contractions but the new token's score (one output per row): the
    // bifurcated step's q·K over both caches and w·V over both caches and
    // the new value, the baseline's q·K and w·V.
    let cases: Vec<(&str, Graph, usize)> = vec![
        ("bf16 llama gqa (bifurcated)", bifurcated(&from_config(LLAMA_GQA, Some(DType::BF16)), at), 2 * 12 + 1),
        ("f16 gpt2 (bifurcated)", bifurcated(&from_config(GPT2_MHA, Some(DType::F16)), at), 2 * 9 + 1),
        ("bf16 llama gqa", from_config(LLAMA_GQA, Some(DType::BF16)), 2 * 9 + 1),
        ("bf16 gpt2 head dim 32 (bifurcated)", bifurcated(&from_config(GPT2_HEAD32, Some(DType::BF16)), at), 2 * 9 + 1),
        // Multi-query: the one KV head a summed letter of size 1, read at
        // 0; the new value's `w · v` sums two such letters and stays off.
        ("bf16 gpt_bigcode mqa (bifurcated)", bifurcated(&from_config(BIGCODE_MQA, Some(DType::BF16)), at), 2 * 8 + 1),
    ];
    for (name, g, want) in cases {
        let program = plan(&g).unwrap_or_else(|e| panic!("{e}"));
        let mma: Vec<&str> = program.kernels.iter().filter(|k| k.mma.is_some()).map(|k| k.name.as_str()).collect();
        assert_eq!(mma.len(), want, "{name}: tensor-core kernels {mma:?}");
        let off = plan_with(&g, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(off.kernels.iter().all(|k| k.mma.is_none()), "{name}: tensor cores off");
        let emulation = Emulation { lanes: 3, cooperative_min: 1 << 40, tuning: Tuning::default() };
        let step = CpuStep::compile_emulating_gpu(&g, emulation).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_step(name, &g, &step, &points, BF16_TOL);
    }
}

/// Tensor-core forms beyond attention and `x · Wᵀ`, each against the
/// interpreter (emulated warp, as above): numpy matmul with a broadcast
/// batch and without `transpose_b` (B read across rows), a batched
/// `transpose_b` matmul, an einsum whose row and column axes interleave in
/// the output, one summing its first axis; A is the second operand in those
/// and the first in the last one. Reductions of 20 (a ragged last step),
/// 300 and 320 (split among warps), 32, 64 and 320 (the chunked walk: its
/// 16-byte loads, alone or against an operand read across rows); warps of
/// 2 × 2 tiles over both walks, ragged along rows and columns; a reduction
/// of runtime length split across blocks (1 to 2 steps over 4 blocks: empty
/// blocks, the tail in the second); an operand whose reduction is innermost
/// only through a transpose (element loads, not vectors).
#[test]
fn tensor_core_forms_match_interpreter() {
    let text = r#"{"format": "bifurc-graph/1", "dims": {"runtime": ["m"], "constants": {"k": 20}},
      "inputs": [
        {"name": "x", "role": "activation", "shape": ["m", 3, "k"], "dtype": "bf16"},
        {"name": "w", "role": "weight", "shape": ["k", 24], "dtype": "bf16"},
        {"name": "a", "role": "activation", "shape": [2, "m", "k"], "dtype": "bf16"},
        {"name": "b", "role": "weight", "shape": [2, 24, "k"], "dtype": "bf16"},
        {"name": "p", "role": "activation", "shape": ["m", 4, "k"], "dtype": "bf16"},
        {"name": "q", "role": "weight", "shape": [5, 3, "k"], "dtype": "bf16"},
        {"name": "r", "role": "activation", "shape": ["k", "m", 4], "dtype": "bf16"},
        {"name": "s", "role": "weight", "shape": ["k", 10], "dtype": "bf16"},
        {"name": "big", "role": "weight", "shape": [40, "k"], "dtype": "bf16"},
        {"name": "t", "role": "activation", "shape": ["m", 2, "k"], "dtype": "bf16"},
        {"name": "u", "role": "activation", "shape": ["m", 300], "dtype": "bf16"},
        {"name": "v", "role": "weight", "shape": [12, 300], "dtype": "bf16"},
        {"name": "e", "role": "activation", "shape": ["m", 32], "dtype": "bf16"},
        {"name": "f", "role": "weight", "shape": [24, 32], "dtype": "bf16"},
        {"name": "h", "role": "activation", "shape": ["m", 320], "dtype": "bf16"},
        {"name": "o", "role": "weight", "shape": [12, 320], "dtype": "bf16"},
        {"name": "c", "role": "activation", "shape": ["m", 64], "dtype": "bf16"},
        {"name": "d", "role": "weight", "shape": [64, 24], "dtype": "bf16"},
        {"name": "l", "role": "weight", "shape": [320, 12], "dtype": "bf16"},
        {"name": "ws", "role": "activation", "shape": [128, "m", 320], "dtype": "bf16"},
        {"name": "wt", "role": "weight", "shape": [128, 24, 320], "dtype": "bf16"},
        {"name": "rs", "role": "activation", "shape": [128, "m", 300], "dtype": "bf16"},
        {"name": "rt", "role": "weight", "shape": [128, 24, 300], "dtype": "bf16"},
        {"name": "ka", "role": "activation", "shape": ["m", 24], "dtype": "bf16"},
        {"name": "kb", "role": "activation", "shape": ["m", 40], "dtype": "bf16"},
        {"name": "xt", "role": "activation", "shape": [64, "m"], "dtype": "bf16"},
        {"name": "w2", "role": "weight", "shape": [24, 64], "dtype": "bf16"}],
      "nodes": [
        {"id": "mm", "op": "matmul", "inputs": ["x", "w"], "dtype": "f32"},
        {"id": "bmm", "op": "matmul", "inputs": ["a", "b"], "attrs": {"transpose_b": true}, "dtype": "f32"},
        {"id": "mix", "op": "einsum", "inputs": ["p", "q"], "attrs": {"spec": "abk,cdk->acbd"}, "dtype": "f32"},
        {"id": "first", "op": "einsum", "inputs": ["r", "s"], "attrs": {"spec": "kab,kc->abc"}, "dtype": "f32"},
        {"id": "swap", "op": "einsum", "inputs": ["big", "t"], "attrs": {"spec": "nk,mik->min"}, "dtype": "f32"},
        {"id": "long", "op": "einsum", "inputs": ["u", "v"], "attrs": {"spec": "mk,nk->mn"}, "dtype": "f32"},
        {"id": "pairs", "op": "matmul", "inputs": ["e", "f"], "attrs": {"transpose_b": true}, "dtype": "f32"},
        {"id": "split_pairs", "op": "matmul", "inputs": ["h", "o"], "attrs": {"transpose_b": true}, "dtype": "f32"},
        {"id": "chunks", "op": "matmul", "inputs": ["c", "d"], "dtype": "f32"},
        {"id": "split_chunks", "op": "matmul", "inputs": ["h", "l"], "dtype": "f32"},
        {"id": "tiles", "op": "einsum", "inputs": ["ws", "wt"], "attrs": {"spec": "zak,zbk->zab"}, "dtype": "f32"},
        {"id": "ragged_tiles", "op": "einsum", "inputs": ["rs", "rt"], "attrs": {"spec": "zak,zbk->zab"}, "dtype": "f32"},
        {"id": "runtime_k", "op": "einsum", "inputs": ["ka", "kb"], "attrs": {"spec": "mc,md->cd"}, "dtype": "f32"},
        {"id": "tv", "op": "transpose", "inputs": ["xt"], "attrs": {"perm": [1, 0]}},
        {"id": "transposed", "op": "matmul", "inputs": ["tv", "w2"], "attrs": {"transpose_b": true}, "dtype": "f32"}],
      "outputs": [{"name": "mm", "node": "mm"}, {"name": "bmm", "node": "bmm"}, {"name": "mix", "node": "mix"},
                  {"name": "first", "node": "first"}, {"name": "swap", "node": "swap"}, {"name": "long", "node": "long"},
                  {"name": "pairs", "node": "pairs"}, {"name": "split_pairs", "node": "split_pairs"},
                  {"name": "chunks", "node": "chunks"}, {"name": "split_chunks", "node": "split_chunks"},
                  {"name": "tiles", "node": "tiles"}, {"name": "ragged_tiles", "node": "ragged_tiles"},
                  {"name": "runtime_k", "node": "runtime_k"}, {"name": "transposed", "node": "transposed"}]}"#;
    let g = bifurc::import::parse(text).unwrap_or_else(|e| panic!("{e}"));
    let program = plan(&g).unwrap_or_else(|e| panic!("{e}"));
    let forms: Vec<(&str, usize, bool)> = program
        .kernels
        .iter()
        .map(|k| (k.node.as_str(), k.mma.as_ref().map_or(9, |m| m.a), k.mma.as_ref().is_some_and(|m| m.split_k)))
        .collect();
    // A is the side with fewer rows at the typical point (m = 64); the
    // reductions over 300 and 320 are split among a block's warps.
    let want = [
        ("mm", 1, false),
        ("bmm", 1, false),
        ("mix", 1, false),
        ("first", 1, false),
        ("swap", 0, false),
        ("long", 1, true),
        ("pairs", 1, false),
        ("split_pairs", 1, true),
        ("chunks", 1, false),
        ("split_chunks", 1, true),
        ("tiles", 1, true),
        ("ragged_tiles", 1, true),
        ("runtime_k", 0, false),
        ("runtime_k", 9, false), // its combine kernel
        ("transposed", 1, false),
    ];
    assert_eq!(forms, want, "A operands, split");
    // A warp's tiles: two row tiles where A has over 16 rows (24; 12 and
    // fewer keep one); two column tiles in a split walk with blocks to
    // spare (128 batches).
    let warp_tiles: Vec<(&str, i64, i64)> = program
        .kernels
        .iter()
        .filter_map(|k| k.mma.as_ref().map(|m| (k.node.as_str(), m.rows, m.cols)))
        .filter(|(node, _, _)| ["long", "split_pairs", "tiles", "ragged_tiles"].contains(node))
        .collect();
    let want = [("long", 1, 1), ("split_pairs", 1, 1), ("tiles", 2, 2), ("ragged_tiles", 2, 2)];
    assert_eq!(warp_tiles, want, "warp tiles");
    // A reduction of runtime length (m: 4 steps at the typical point, one
    // block of outputs) is split across 4 blocks: partial sums into a
    // workspace, then a combine kernel.
    let split = program.kernels.iter().find(|k| k.node == "runtime_k").and_then(|k| k.mma.as_ref());
    assert_eq!(split.map(|m| (m.rows, m.cols, m.k_splits)), Some((2, 1, 4)), "runtime_k");
    assert!(program.kernels.iter().any(|k| k.node == "runtime_k" && k.op == "combine"));
    let emulation = Emulation { lanes: 3, cooperative_min: 1 << 40, tuning: Tuning::default() };
    let step = CpuStep::compile_emulating_gpu(&g, emulation).unwrap_or_else(|e| panic!("{e}"));
    let points: Vec<_> = [1, 5, 17].iter().map(|&m| point(&[("m", m)])).collect();
    // Inputs rounded to bf16 first (the interpreter does not emulate
    // storage precision): the outputs then differ by summation order alone.
    let bf16 = |x: f32| {
        let b = x.to_bits();
        f32::from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16)
    };
    for p in &points {
        let mut inputs = random_inputs(&g, p, 17).unwrap_or_else(|e| panic!("{e}"));
        for t in inputs.values_mut() {
            t.data.iter_mut().for_each(|x| *x = bf16(*x));
        }
        let want = run(&g, p, &inputs).unwrap_or_else(|e| panic!("{e}"));
        let got = step.run(p, &inputs).unwrap_or_else(|e| panic!("{e}"));
        for (out, w) in &want {
            let err = norm_rel(&got[out], w);
            assert!(err <= 1e-5, "tensor-core forms: `{out}` at {p:?}: norm-relative error {err:e}");
        }
    }
}
