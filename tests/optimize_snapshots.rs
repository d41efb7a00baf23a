//! Snapshots (insta) of what the optimizer emits: the optimized attention of
//! every example under examples/, and one minimal graph per rule family,
//! each with the rule firing counts. Review a changed snapshot as a diff of
//! generated code. Timings are never snapshotted (they vary); byte counts,
//! e-graph sizes and firing counts are deterministic (egg's `deterministic`
//! feature, a fixed rule order).
//!
//! Accept new or changed snapshots with `INSTA_UPDATE=always cargo test
//! --test optimize_snapshots` (or `cargo insta review`).

use bifurc::inspect::ShapePoint;
use bifurc::ir::Graph;
use bifurc::optimize::{optimize, OptReport, Optimized, Options};
use std::fmt::Write;
use std::path::Path;

fn canonical(g: &Graph) -> String {
    bifurc::export::to_string(&bifurc::export::to_json(g))
}

fn opt_at(graph: &Graph, at: &str) -> Optimized {
    let opts = Options { point: ShapePoint::parse(at).expect("point"), limits: Default::default() };
    optimize(graph, &opts).unwrap_or_else(|e| panic!("optimize at {at}: {e}"))
}

fn parse(json: &str) -> Graph {
    bifurc::import::parse(json).unwrap_or_else(|e| panic!("import: {e}\n{json}"))
}

/// `name=count` per rule, one line.
fn rules(r: &OptReport) -> String {
    let fired: Vec<String> = r.passes.rules.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("rules fired: {}", fired.join(", "))
}

/// The report without timings: e-graph size, rules, the given sites, totals.
fn summary(r: &OptReport, site_filter: impl Fn(&str) -> bool) -> String {
    let mut s = String::new();
    let p = &r.passes;
    let _ = writeln!(s, "shape point: {}", r.point);
    let _ = writeln!(
        s,
        "e-graph: {} nodes, {} classes, {} iterations, stopped: {}",
        p.egraph_nodes, p.egraph_classes, p.iterations, p.stop_reason
    );
    let _ = writeln!(s, "{}", rules(r));
    let _ = writeln!(s, "attention sites: {} of {} rewritten", r.rewritten(), r.sites.len());
    for site in r.sites.iter().filter(|x| site_filter(&x.node)) {
        let _ = writeln!(
            s,
            "  {} reads {}: {:.0} -> {:.0} bytes, {}",
            site.node, site.context, site.bytes_before, site.bytes_after, site.reason
        );
    }
    let _ = writeln!(s, "total bytes per step: {:.0} -> {:.0}", r.before.total(), r.after.total());
    s
}

// ---------------------------------------------------------------- examples

/// The shape point of the snapshots: the headline point, or for a
/// multi-level example (runtime dims `P, S`) 4 prompts of 8 samples.
fn point_for(graph: &Graph) -> String {
    let values: &[(&str, i64)] = if graph.dims.is_runtime("P") {
        &[("P", 4), ("S", 8), ("m_s", 2048), ("m_c", 1024), ("m_d", 256)]
    } else {
        &[("b", 32), ("m_c", 8192), ("m_d", 256)]
    };
    let parts: Vec<String> =
        values.iter().filter(|(n, _)| graph.dims.is_runtime(n)).map(|(n, v)| format!("{n}={v}")).collect();
    parts.join(",")
}

/// Graphs up to this many nodes (tiny, multilevel) are snapshotted whole;
/// larger ones (the 7B-class models) show layer 0's attention nodes only.
const WHOLE_UP_TO: usize = 200;

fn example_snapshot(name: &str, path: &Path) -> String {
    let graph = bifurc::import::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let opt = opt_at(&graph, &point_for(&graph));
    let text = canonical(&opt.graph);
    if graph.nodes.len() <= WHOLE_UP_TO {
        return format!("{}\n{text}", summary(&opt.report, |_| true));
    }
    let layer0 = |node: &str| node.starts_with("l0.");
    let lines: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with(r#"{"id": "l0.attn"#)).collect();
    assert!(!lines.is_empty(), "{name}: no node id starts with l0.attn");
    format!("{}\nlayer 0 attention nodes of the optimized graph:\n{}\n", summary(&opt.report, layer0), lines.join("\n"))
}

#[test]
fn examples() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.iter().any(|n| n == "tiny"), "examples/tiny is missing");
    for name in &names {
        let snap = example_snapshot(name, &dir.join(name).join("model.json"));
        insta::assert_snapshot!(format!("example_{}", name.replace('-', "_")), snap);
    }
}

// ---------------------------------------------------------------- one graph per rule family

/// A graph over runtime dims `b, m_c, m_d` from JSON fragments.
fn doc(constants: &str, inputs: &[&str], nodes: &[&str], output: &str) -> String {
    format!(
        r#"{{"format": "bifurc-graph/1",
  "dims": {{"runtime": ["b", "m_c", "m_d"], "constants": {{{constants}}}}},
  "inputs": [
    {}
  ],
  "nodes": [
    {}
  ],
  "outputs": [{{"name": "y", "node": "{output}"}}]}}"#,
        inputs.join(",\n    "),
        nodes.join(",\n    ")
    )
}

const Q: &str = r#"{"name": "q", "role": "activation", "shape": ["b", "g", "n", "k"], "dtype": "f32"}"#;
const K_CTX: &str =
    r#"{"name": "k_ctx", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["g", "m_c", "k"], "dtype": "f32"}"#;
const K_DEC: &str =
    r#"{"name": "k_dec", "role": "decode_kv", "layer": 0, "kv": "k", "shape": ["b", "g", "m_d", "k"], "dtype": "f32"}"#;
const K_CTX_B: &str =
    r#"{"id": "k_ctx_b", "op": "broadcast", "inputs": ["k_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#;
const GK: &str = r#""n": 1, "g": 2, "k": 4"#;

/// Optimizes `json` at b=16,m_c=512,m_d=8, asserts each of `must_fire`
/// fired, and snapshots the optimized graph with the firing counts.
fn rule_case(name: &str, json: &str, must_fire: &[&str]) {
    let graph = parse(json);
    let opt = opt_at(&graph, "b=16,m_c=512,m_d=8");
    for rule in must_fire {
        let n = opt.report.passes.rules.get(*rule).copied();
        assert!(n.is_some_and(|n| n > 0), "{name}: rule {rule} fired {n:?} times\n{}", opt.report.render());
    }
    let snap = format!("{}\n{}", summary(&opt.report, |_| true), canonical(&opt.graph));
    insta::assert_snapshot!(format!("rule_{name}"), snap);
}

/// einsum(q, broadcast_b(K_c)): the einsum reads K_c itself.
#[test]
fn rule_einsum_absorb_broadcast() {
    let json = doc(
        GK,
        &[Q, K_CTX],
        &[
            K_CTX_B,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "k_ctx_b"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
        ],
        "scores",
    );
    rule_case("einsum_absorb_broadcast", &json, &["einsum-absorb-broadcast"]);
}

/// einsum(q, transpose(broadcast_b(K_c))): the transpose is absorbed first,
/// which exposes the broadcast.
#[test]
fn rule_einsum_absorb_transpose() {
    let json = doc(
        GK,
        &[Q, K_CTX],
        &[
            K_CTX_B,
            r#"{"id": "k_t", "op": "transpose", "inputs": ["k_ctx_b"], "attrs": {"perm": [0, 1, 3, 2]}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "k_t"], "attrs": {"spec": "bgnk,bgkm->bgnm"}}"#,
        ],
        "scores",
    );
    rule_case("einsum_absorb_transpose", &json, &["einsum-absorb-transpose", "einsum-absorb-broadcast"]);
}

/// matmul(q, broadcast_b(K_c^T)) with K_c stored `[g, k, m_c]`.
#[test]
fn rule_matmul_to_einsum() {
    let json = doc(
        GK,
        &[
            Q,
            r#"{"name": "k_ctx_t", "role": "context_kv", "layer": 0, "kv": "k", "shape": ["g", "k", "m_c"], "dtype": "f32"}"#,
        ],
        &[
            r#"{"id": "k_b", "op": "broadcast", "inputs": ["k_ctx_t"], "attrs": {"shape": ["b", "g", "k", "m_c"]}}"#,
            r#"{"id": "scores", "op": "matmul", "inputs": ["q", "k_b"]}"#,
        ],
        "scores",
    );
    rule_case("matmul_to_einsum", &json, &["matmul-to-einsum", "einsum-absorb-broadcast"]);
}

/// matmul_t(q, broadcast_b(K_c)): a `transpose_b` matmul (PyTorch Linear style).
#[test]
fn rule_matmul_t_to_einsum() {
    let json = doc(
        GK,
        &[Q, K_CTX],
        &[K_CTX_B, r#"{"id": "scores", "op": "matmul", "inputs": ["q", "k_ctx_b"], "attrs": {"transpose_b": true}}"#],
        "scores",
    );
    rule_case("matmul_t_to_einsum", &json, &["matmul-t-to-einsum", "einsum-absorb-broadcast"]);
}

/// einsum over `repeat_kv(broadcast_b(K_c))` (reshape, expand, reshape):
/// h is split into g, p on every operand, the expand over p is absorbed, the
/// reshapes collapse, then the broadcast over b is absorbed.
#[test]
fn rule_einsum_split_merged_axis() {
    let json = doc(
        r#""n": 1, "g": 2, "p": 2, "h": 4, "k": 4"#,
        &[r#"{"name": "q", "role": "activation", "shape": ["b", "h", "n", "k"], "dtype": "f32"}"#, K_CTX],
        &[
            K_CTX_B,
            r#"{"id": "k_grouped", "op": "reshape", "inputs": ["k_ctx_b"], "attrs": {"shape": ["b", "g", 1, "m_c", "k"]}}"#,
            r#"{"id": "k_expanded", "op": "broadcast", "inputs": ["k_grouped"], "attrs": {"shape": ["b", "g", "p", "m_c", "k"]}}"#,
            r#"{"id": "k_rep", "op": "reshape", "inputs": ["k_expanded"], "attrs": {"shape": ["b", "h", "m_c", "k"]}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "k_rep"], "attrs": {"spec": "bhnk,bhmk->bhnm"}}"#,
        ],
        "scores",
    );
    rule_case(
        "einsum_split_merged_axis",
        &json,
        &["einsum-split-merged-axis", "einsum-absorb-broadcast", "reshape-of-reshape", "reshape-identity"],
    );
}

/// Scores over concat(broadcast_b(K_c), K_d) on the key axis (free in the
/// scores einsum): one einsum per part, the context part reads K_c once.
#[test]
fn rule_einsum_concat_free_axis() {
    let json = doc(
        GK,
        &[Q, K_CTX, K_DEC],
        &[
            K_CTX_B,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec"], "attrs": {"axis": 2}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "keys"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
        ],
        "scores",
    );
    rule_case("einsum_concat_free_axis", &json, &["einsum-concat-free-axis", "einsum-absorb-broadcast"]);
}

/// w · concat(broadcast_b(V_c), V_d) on the key axis (contracted): the
/// weights are sliced and the partial products summed.
#[test]
fn rule_einsum_concat_contracted_axis() {
    let json = doc(
        GK,
        &[
            r#"{"name": "w", "role": "activation", "shape": ["b", "g", "n", "m_c+m_d"], "dtype": "f32"}"#,
            r#"{"name": "v_ctx", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["g", "m_c", "k"], "dtype": "f32"}"#,
            r#"{"name": "v_dec", "role": "decode_kv", "layer": 0, "kv": "v", "shape": ["b", "g", "m_d", "k"], "dtype": "f32"}"#,
        ],
        &[
            r#"{"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "values", "op": "concat", "inputs": ["v_ctx_b", "v_dec"], "attrs": {"axis": 2}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["w", "values"], "attrs": {"spec": "bgnm,bgmk->bgnk"}}"#,
        ],
        "attn",
    );
    rule_case("einsum_concat_contracted_axis", &json, &["einsum-concat-contracted-axis", "einsum-absorb-broadcast"]);
}

/// The user graph slices the context part back out of a concat.
#[test]
fn rule_slice_of_concat() {
    let json = doc(
        GK,
        &[Q, K_CTX, K_DEC],
        &[
            K_CTX_B,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec"], "attrs": {"axis": 2}}"#,
            r#"{"id": "ctx_keys", "op": "slice", "inputs": ["keys"], "attrs": {"axis": 2, "start": 0, "end": "m_c"}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "ctx_keys"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
        ],
        "scores",
    );
    rule_case("slice_of_concat", &json, &["slice-of-concat", "einsum-absorb-broadcast"]);
}

/// Through the pipeline: attention without a softmax (linear attention).
/// The scores become a concat of per-part einsums (free axis); the weighted
/// sum slices those scores per part (contracted axis), and each slice of
/// the concat is the part's einsum.
#[test]
fn rule_slice_of_concat_in_linear_attention() {
    let json = doc(
        GK,
        &[
            Q,
            K_CTX,
            K_DEC,
            r#"{"name": "v_ctx", "role": "context_kv", "layer": 0, "kv": "v", "shape": ["g", "m_c", "k"], "dtype": "f32"}"#,
            r#"{"name": "v_dec", "role": "decode_kv", "layer": 0, "kv": "v", "shape": ["b", "g", "m_d", "k"], "dtype": "f32"}"#,
        ],
        &[
            K_CTX_B,
            r#"{"id": "v_ctx_b", "op": "broadcast", "inputs": ["v_ctx"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "keys", "op": "concat", "inputs": ["k_ctx_b", "k_dec"], "attrs": {"axis": 2}}"#,
            r#"{"id": "values", "op": "concat", "inputs": ["v_ctx_b", "v_dec"], "attrs": {"axis": 2}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "keys"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
            r#"{"id": "attn", "op": "einsum", "inputs": ["scores", "values"], "attrs": {"spec": "bgnm,bgmk->bgnk"}}"#,
        ],
        "attn",
    );
    rule_case(
        "slice_of_concat_in_linear_attention",
        &json,
        &["slice-of-concat", "einsum-concat-free-axis", "einsum-concat-contracted-axis"],
    );
}

/// einsum(q, reshape(reshape(broadcast_b(K_c)))) where the two reshapes
/// cancel: they collapse to the broadcast, which is then absorbed.
#[test]
fn rule_reshape_of_reshape_and_identity() {
    let json = doc(
        GK,
        &[Q, K_CTX],
        &[
            K_CTX_B,
            r#"{"id": "k_5d", "op": "reshape", "inputs": ["k_ctx_b"], "attrs": {"shape": ["b", "g", 1, "m_c", "k"]}}"#,
            r#"{"id": "k_4d", "op": "reshape", "inputs": ["k_5d"], "attrs": {"shape": ["b", "g", "m_c", "k"]}}"#,
            r#"{"id": "scores", "op": "einsum", "inputs": ["q", "k_4d"], "attrs": {"spec": "bgnk,bgmk->bgnm"}}"#,
        ],
        "scores",
    );
    rule_case(
        "reshape_of_reshape_and_identity",
        &json,
        &["reshape-of-reshape", "reshape-identity", "einsum-absorb-broadcast"],
    );
}
