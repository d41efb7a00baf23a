//! Weight projections run from weights kept in panels.
//!
//! `x @ Wᵀ` with an f32 `W` stored `[out, in]` sums along both operands'
//! rows: each register tile (4 rows of `x` × 4 outputs) loads 8 vectors for
//! 16 FMAs and adds its 16 vector sums in a tree of shuffles, and the
//! tile's 4 weight rows and 4 input rows (16 KiB each at 1024 inputs) do
//! not stay in L1 across the tiles that share them; a bf16 / f16 `W` takes
//! a scalar tile that LLVM vectorizes. Kept instead as panels of [`PANEL`]
//! outputs, `[out / PANEL, in, PANEL]` (each step of the sum one contiguous
//! stretch of a panel, 256 bytes in f32, a panel walked front to back),
//! the projection is the einsum `..k,pkn->..pn` (then a reshape back to
//! `[.., out]`, a view): the strided contraction of `emit::vectors`, whose
//! tiles of 4 rows × 4 output vectors load 4 vectors of the panel and 4
//! broadcast elements of `x` for 16 FMAs, with no tree, and find the
//! panel (256 KiB at 1024 f32 inputs) in L2 for every tile of rows after
//! the first. Each output's sum runs in input order. A weight stored
//! `[in, out]` (GPT-2's Conv1D) is packed the same way.
//!
//! On the cpu_step model (2-layer llama, d_model 1024, ffn 2816, b = 32,
//! one thread) the 14 projections in panels took 16.6-18.1 ms a step
//! against 18.8-20.4 the other ways in f32, and 16.6 against 20.6 in bf16;
//! a 6-row tile (24 accumulators) and a software prefetch of the panel
//! 32 steps ahead were both slower. With 2 threads the f32 step did not
//! change measurably (9.6-9.9 ms both ways).
//!
//! The caller still binds the weight as the model has it: [`super::CpuStep`]
//! packs it on the way in (see [`super::layout::Kept`]).

use std::collections::BTreeMap;

use crate::interp::Tensor;
use crate::ir::{EinsumSpec, Graph, Node, Op, Poly, Role, Value};
use crate::lower::LowerError;

use super::layout::Kept;

/// Outputs of a panel: 4 vectors of 16 f32, a whole step of the strided
/// contraction's tile (`emit::VECTOR_GROUPS` × the lanes).
pub(crate) const PANEL: usize = 64;

/// Letters of the einsum's leading (row) axes: the input's axes but its
/// last (a projection's input is `[b, n, in]`).
const ROW_LETTERS: &str = "abcdefgh";

/// `graph` with every float weight `W` of constant sizes, `[out, in]`
/// (`out` a multiple of [`PANEL`]) whose only uses are as the right operand
/// of float `x @ Wᵀ` matmuls, or `[in, out]` whose only uses are as that of
/// `x @ W`, declared `[out / PANEL, in, PANEL]`, each such `matmul` now an
/// einsum `..k,pkn->..pn` named `<id>.panels` followed by a reshape to the
/// matmul's shape that keeps its id; `kept` records each such weight as
/// [`Kept::Panels`] (from the caller's `[in, out]` where it is that in
/// `graph` or already held [`Kept::Transposed`]).
pub(super) fn panel_weights(graph: &Graph, kept: &mut BTreeMap<String, Kept>) -> Graph {
    // Whether each input goes into panels, and if so, whether `graph`
    // declares it `[in, out]`.
    let mut packed = vec![None; graph.inputs.len()];
    for (i, input) in graph.inputs.iter().enumerate() {
        if matches!(kept.get(&input.name), Some(Kept::Panels { .. })) {
            continue;
        }
        packed[i] = packable(graph, i);
        if let Some(in_out) = packed[i] {
            let from_in_out = in_out || kept.get(&input.name) == Some(&Kept::Transposed);
            kept.insert(input.name.clone(), Kept::Panels { from_in_out });
        }
    }
    if packed.iter().all(Option::is_none) {
        return graph.clone();
    }
    let mut out = graph.clone();
    for (input, in_out) in out.inputs.iter_mut().zip(&packed) {
        if let (Some(in_out), [a, b]) = (*in_out, input.shape.as_slice()) {
            let (outs, ins) = if in_out { (b, a) } else { (a, b) };
            let outs = graph.dims.normalize(outs).ok().and_then(|p| p.as_constant()).unwrap_or(0);
            input.shape = vec![Poly::constant(outs / PANEL as i64), ins.clone(), Poly::constant(PANEL as i64)];
        }
    }
    let taken = |id: &str| graph.nodes.iter().any(|n| n.id == id) || graph.inputs.iter().any(|n| n.name == id);
    let mut nodes = Vec::with_capacity(graph.nodes.len() * 2);
    // Where each of the graph's nodes is in `nodes`.
    let mut at = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let inputs: Vec<Value> = node
            .inputs
            .iter()
            .map(|&v| match v {
                Value::Node(j) => Value::Node(at[j]),
                v => v,
            })
            .collect();
        let weight = match node.inputs.as_slice() {
            [_, Value::Input(w)] if packed[*w].is_some() => Some(*w),
            _ => None,
        };
        match weight {
            Some(w) => {
                let rank = node.shape.len();
                let rows: Vec<char> = ROW_LETTERS.chars().take(rank - 1).collect();
                let spec = EinsumSpec {
                    inputs: vec![[rows.as_slice(), &['z']].concat(), vec!['y', 'z', 'x']],
                    output: [rows.as_slice(), &['y', 'x']].concat(),
                };
                let mut shape = node.shape[..rank - 1].to_vec();
                shape.extend([out.inputs[w].shape[0].clone(), Poly::constant(PANEL as i64)]);
                let mut id = format!("{}.panels", node.id);
                while taken(&id) {
                    id.push('_');
                }
                nodes.push(Node { id, op: Op::Einsum(spec), inputs, shape, dtype: node.dtype });
                nodes.push(Node {
                    id: node.id.clone(),
                    op: Op::Reshape { shape: node.shape.clone() },
                    inputs: vec![Value::Node(nodes.len() - 1)],
                    shape: node.shape.clone(),
                    dtype: node.dtype,
                });
            }
            None => nodes.push(Node { inputs, ..node.clone() }),
        }
        at.push(nodes.len() - 1);
    }
    for o in &mut out.outputs {
        if let Value::Node(j) = o.value {
            o.value = Value::Node(at[j]);
        }
    }
    out.nodes = nodes;
    out
}

/// Whether input `i` of `graph` goes into panels: `Some(false)` for a
/// float weight `[out, in]` used only as the right operand of float
/// `x @ Wᵀ` matmuls, `Some(true)` for one `[in, out]` used only as that of
/// `x @ W`; of constant sizes, `out` a multiple of [`PANEL`], `x` of rank
/// 2 to 9, not a graph output.
fn packable(graph: &Graph, i: usize) -> Option<bool> {
    let input = &graph.inputs[i];
    let me = Value::Input(i);
    if input.role != Role::Weight || !input.dtype.is_float() || graph.outputs.iter().any(|o| o.value == me) {
        return None;
    }
    let mut uses = graph.nodes.iter().filter(|n| n.inputs.contains(&me));
    let in_out = match uses.next()?.op {
        Op::MatMul { transpose_b } => !transpose_b,
        _ => return None,
    };
    let constant = |p: &Poly| graph.dims.normalize(p).ok().and_then(|p| p.as_constant());
    let (outs, ins) = match input.shape.as_slice() {
        [a, b] if in_out => (constant(b)?, constant(a)?),
        [a, b] => (constant(a)?, constant(b)?),
        _ => return None,
    };
    let projection = |n: &Node| {
        n.op == Op::MatMul { transpose_b: !in_out }
            && n.dtype.is_float()
            && (2..=ROW_LETTERS.len() + 1).contains(&n.shape.len())
            && matches!(n.inputs.as_slice(), [a, w] if *w == me && *a != me && graph.dtype_of(*a).is_float())
    };
    let whole = outs > 0 && outs % PANEL as i64 == 0 && ins > 0;
    (whole && graph.nodes.iter().filter(|n| n.inputs.contains(&me)).all(projection)).then_some(in_out)
}

/// `values` of a weight `shape` (`[out, in]`, or `[in, out]` when
/// `from_in_out`) as panels `[out / PANEL, in, PANEL]`: element
/// `[p, k, l]` is the weight's output `p · PANEL + l`, input `k`. `name`
/// is the input's, for the errors.
pub(super) fn pack(shape: &[usize], values: &[f32], from_in_out: bool, name: &str) -> Result<Tensor, LowerError> {
    let &[rows, cols] = shape else {
        return Err(LowerError::Run(format!(
            "input `{name}` has shape {shape:?}, expected a matrix (it is stored in panels)"
        )));
    };
    if values.len() != rows * cols {
        return Err(LowerError::Run(format!("input `{name}` has shape {shape:?} but {} values", values.len())));
    }
    let (outs, ins) = if from_in_out { (cols, rows) } else { (rows, cols) };
    if outs % PANEL != 0 {
        return Err(LowerError::Run(format!(
            "input `{name}` has shape {shape:?}: {outs} outputs, expected a multiple of {PANEL}"
        )));
    }
    let mut data = vec![0.0f32; values.len()];
    for (p, panel) in data.chunks_exact_mut(ins * PANEL).enumerate() {
        if from_in_out {
            // Each step of a panel is a stretch of one row of W.
            for (k, step) in panel.chunks_exact_mut(PANEL).enumerate() {
                step.copy_from_slice(&values[k * outs + p * PANEL..][..PANEL]);
            }
        } else {
            // In blocks of 16 inputs, so each row of W is read a line at
            // a time.
            const BLOCK: usize = 16;
            for k0 in (0..ins).step_by(BLOCK) {
                for l in 0..PANEL {
                    let row = &values[(p * PANEL + l) * ins..][..ins];
                    for k in k0..(k0 + BLOCK).min(ins) {
                        panel[k * PANEL + l] = row[k];
                    }
                }
            }
        }
    }
    Ok(Tensor { shape: vec![outs / PANEL, ins, PANEL], data })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::lower::emit::testing;

    #[test]
    fn packs_either_layout_into_panels() {
        for (outs, ins) in [(64, 1), (64, 17), (128, 40), (192, 3)] {
            let w = |o: usize, k: usize| (o * 1000 + k) as f32;
            let out_in: Vec<f32> = (0..outs * ins).map(|i| w(i / ins, i % ins)).collect();
            let in_out: Vec<f32> = (0..outs * ins).map(|i| w(i % outs, i / outs)).collect();
            let a = pack(&[outs, ins], &out_in, false, "w").unwrap_or_else(|e| panic!("{e}"));
            let b = pack(&[ins, outs], &in_out, true, "w").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(a.shape, [outs / PANEL, ins, PANEL]);
            assert_eq!(a, b, "{outs} x {ins}: both layouts give the same panels");
            for (i, &v) in a.data.iter().enumerate() {
                let (p, k, l) = (i / (ins * PANEL), i / PANEL % ins, i % PANEL);
                assert_eq!(v, w(p * PANEL + l, k), "{outs} x {ins} at [{p}, {k}, {l}]");
            }
            for kept in [Kept::Panels { from_in_out: false }, Kept::Panels { from_in_out: true }] {
                let given = kept.callers_shape(&a.shape);
                assert_eq!(kept.stored_shape(&given), a.shape, "{kept:?}");
            }
        }
        let err = |r: Result<Tensor, LowerError>| r.map(|_| ()).unwrap_err().to_string();
        let e = err(pack(&[96, 2], &[0.0; 192], false, "w_up"));
        assert!(e.contains("`w_up`") && e.contains("96 outputs") && e.contains("multiple of 64"), "{e}");
        let e = err(pack(&[2, 96], &[0.0; 192], true, "w_up"));
        assert!(e.contains("96 outputs"), "{e}");
        assert!(err(pack(&[64, 2, 1], &[0.0; 128], false, "w")).contains("expected a matrix"));
        assert!(err(pack(&[64, 2], &[0.0; 127], false, "w")).contains("127 values"));
    }

    fn graph(extra_node: &str) -> Graph {
        let doc = format!(
            r#"{{"format": "bifurc-graph/1", "dims": {{"runtime": ["b"], "constants": {{"d": 32, "f": 128}}}},
            "inputs": [
              {{"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": "f32"}},
              {{"name": "w_up", "role": "weight", "shape": ["f", "d"], "dtype": "f32"}},
              {{"name": "w_odd", "role": "weight", "shape": [96, "d"], "dtype": "f32"}},
              {{"name": "w_half", "role": "weight", "shape": ["f", "d"], "dtype": "bf16"}},
              {{"name": "w_conv", "role": "weight", "shape": ["d", "f"], "dtype": "f32"}}
            ],
            "nodes": [
              {{"id": "up", "op": "matmul", "inputs": ["x", "w_up"], "attrs": {{"transpose_b": true}}}},
              {{"id": "up.panels", "op": "silu", "inputs": ["up"]}},
              {{"id": "odd", "op": "matmul", "inputs": ["x", "w_odd"], "attrs": {{"transpose_b": true}}}},
              {{"id": "half", "op": "matmul", "inputs": ["x", "w_half"], "attrs": {{"transpose_b": true}}}},
              {{"id": "conv", "op": "matmul", "inputs": ["x", "w_conv"]}},
              {{"id": "y", "op": "add", "inputs": ["up.panels", "conv"]}}{extra_node}
            ],
            "outputs": [{{"name": "y", "node": "y"}}, {{"name": "up", "node": "up"}},
                        {{"name": "odd", "node": "odd"}}, {{"name": "half", "node": "half"}}]}}"#
        );
        crate::import::parse(&doc).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Which weights go into panels (float, `out` a multiple of 64, only
    /// ever `x @ Wᵀ`; a Conv1D weight once transposed), and the rewrite:
    /// each such matmul an einsum under a fresh id and a reshape that
    /// keeps the matmul's id, shape and uses (a graph output too).
    #[test]
    fn only_whole_panel_projections_are_rewritten() {
        let g = graph("");
        let (t, transposed) = super::super::layout::transpose_right_weights(&g);
        let mut kept: BTreeMap<String, Kept> = transposed.into_iter().map(|n| (n, Kept::Transposed)).collect();
        let p = panel_weights(&t, &mut kept);
        let want = [
            ("w_conv", Kept::Panels { from_in_out: true }),
            ("w_half", Kept::Panels { from_in_out: false }),
            ("w_up", Kept::Panels { from_in_out: false }),
        ];
        assert_eq!(kept.iter().map(|(n, k)| (n.as_str(), *k)).collect::<Vec<_>>(), want);
        let shape = |g: &Graph, name: &str| g.shape_of(g.find(name).unwrap_or_else(|| panic!("{name}"))).clone();
        let c = |v: i64| Poly::constant(v);
        assert_eq!(shape(&p, "w_up"), [c(2), Poly::symbol("d"), c(64)]);
        assert_eq!(shape(&p, "w_conv"), [c(2), Poly::symbol("d"), c(64)]);
        assert_eq!(shape(&p, "w_odd"), shape(&g, "w_odd"));
        assert_eq!(p.nodes.len(), g.nodes.len() + 3);
        // The einsum's id is new (`up.panels` is taken).
        let up = p.find("up").unwrap_or_else(|| panic!("up"));
        let Value::Node(j) = up else { panic!("up is a node") };
        assert_eq!(p.nodes[j].op, Op::Reshape { shape: shape(&g, "up") });
        let einsum = &p.nodes[j - 1];
        assert_eq!(
            (einsum.id.as_str(), einsum.op.clone()),
            ("up.panels_", Op::Einsum(EinsumSpec::parse("abz,yzx->abyx").unwrap_or_else(|e| panic!("{e}"))))
        );
        assert_eq!(einsum.shape, [Poly::symbol("b"), c(1), c(2), c(64)]);
        for name in ["y", "up", "odd", "half", "conv", "up.panels"] {
            assert_eq!(shape(&p, name), shape(&g, name), "{name}");
        }
        let out = p.outputs.iter().find(|o| o.name == "up").map(|o| o.value);
        assert_eq!(out, Some(up), "the output reads the reshape");

        // A weight read another way too keeps its layout.
        let slice = r#", {"id": "s", "op": "slice", "inputs": ["w_up"], "attrs": {"axis": 0, "start": 0, "end": 1}}"#;
        let mut kept = BTreeMap::new();
        panel_weights(&graph(slice), &mut kept);
        assert!(!kept.contains_key("w_up"), "{kept:?}");
    }

    /// A llama MLP (`x @ W_upᵀ`, silu, `@ W_downᵀ`) and a GPT-2 Conv1D
    /// (`[in, out]`) by weights in panels, f32 and bf16: the output-vector
    /// tiles (no tree of shuffles), against the interpreter across tiles of
    /// rows; the weights bound in the caller's layout by every way in, and
    /// the caller's layout named when a shape is wrong.
    #[test]
    fn projections_by_panels_match_interpreter() {
        for (dtype, tol) in [("f32", 1e-4), ("bf16", 2e-2)] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": 48, "f": 128}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": dtype},
                    {"name": "w_up", "role": "weight", "shape": ["f", "d"], "dtype": dtype},
                    {"name": "w_down", "role": "weight", "shape": [64, "f"], "dtype": dtype},
                    {"name": "w_conv", "role": "weight", "shape": [64, "f"], "dtype": dtype}
                ],
                "nodes": [
                    {"id": "up", "op": "matmul", "inputs": ["x", "w_up"], "attrs": {"transpose_b": true}},
                    {"id": "a", "op": "silu", "inputs": ["up"]},
                    {"id": "down", "op": "matmul", "inputs": ["a", "w_down"], "attrs": {"transpose_b": true}},
                    {"id": "conv", "op": "matmul", "inputs": ["down", "w_conv"]}
                ],
                "outputs": [{"name": "conv", "node": "conv"}, {"name": "up", "node": "up"}]
            });
            let (graph, step, text) = testing::cpu_step(&doc);
            let kept: Vec<&str> = step.kept.keys().map(String::as_str).collect();
            // w_conv is `[in, out]`: an f32 one is transposed, then packed.
            assert_eq!(kept, ["w_conv", "w_down", "w_up"], "{dtype}");
            assert!(!text.contains("vector.shuffle"), "{dtype}: no tree of lane sums:\n{text}");
            let out_vec_tile = format!("-> ({}) {{", vec!["vector<16xf32>"; 16].join(", "));
            assert_eq!(text.matches(&out_vec_tile).count(), 3, "{dtype}: a 4 x 4 output-vector tile each:\n{text}");
            for b in [1, 3, 4, 5, 9] {
                let at = testing::point(&[("b", b)]);
                for out in ["conv", "up"] {
                    testing::check_output(&graph, &step, &at, 5, out, (tol, tol));
                }
                let inputs = crate::interp::random_inputs(&graph, &at, 5).unwrap_or_else(|e| panic!("{e}"));
                let by_tensor = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let mut stored = HashMap::new();
                for (name, t) in &inputs {
                    let s = match name.as_str() {
                        "w_down" => step.store_values(name, &t.shape, &t.data),
                        _ => step.store(name, t.clone()),
                    };
                    stored.insert(name.clone(), s.unwrap_or_else(|e| panic!("{e}")));
                }
                let by_stored = step.run_stored(&at, &BTreeMap::new(), &stored).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(by_stored["conv"].data, by_tensor["conv"].data, "{dtype}: stored and given at b = {b}");
            }
            let at = testing::point(&[("b", 2)]);
            let mut inputs = crate::interp::random_inputs(&graph, &at, 5).unwrap_or_else(|e| panic!("{e}"));
            inputs.insert("w_up".into(), Tensor { shape: vec![48, 128], data: vec![0.0; 48 * 128] });
            let err = step.run(&at, &inputs).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("`w_up` has shape [48, 128]") && err.contains("expected [128, 48]"), "{err}");
            let zeros = step.store_zeros("w_conv", vec![64, 128]).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(zeros.shape, [2, 64, 64], "{dtype}: kept as panels");
        }
    }
}
