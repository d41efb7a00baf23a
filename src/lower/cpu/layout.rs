//! Weights the CPU step keeps transposed, and how it keeps the weights it
//! takes in another layout than the caller's.
//!
//! A weight stored `[in, out]` and used only as `x @ W` (GPT-2's Conv1D)
//! makes every step of the sum read a row of `W` one row length past the
//! last (16 KB at 4096 outputs: a page per multiply-add group), which ran
//! GPT-2's projections at 20-38% of the FMA peak. Stored once as
//! `[out, in]` at bind time, it is read as `x @ Wᵀ` by the register tiles
//! of a vector sum along both operands' innermost axis, the tiles llama's
//! `nn.Linear` weights get (62-75%). The caller still binds the tensor in
//! the graph's layout: [`super::CpuStep`] transposes it on the way in
//! ([`Kept`]: how each weight it takes is kept; one with a multiple of 64
//! outputs then goes on into panels, see `super::panels`).

use std::collections::BTreeSet;

use crate::interp::Tensor;
use crate::ir::{DType, Graph, Op, Role, Value};
use crate::lower::LowerError;

use super::panels::PANEL;
use super::Stored;

/// How [`super::CpuStep`] keeps a weight it takes in the caller's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Given `[in, out]`, kept `[out, in]` (see [`transpose_right_weights`]).
    Transposed,
    /// Given `[out, in]` (`[in, out]` when `from_in_out`), `outs` being
    /// `out`, kept as panels `[ceil(out / PANEL), in, PANEL]`, or `paired`,
    /// `[ceil(out / PANEL), in / 2, PANEL, 2]`, the last panel's outputs
    /// past `out` zero (see `super::panels`).
    Panels { from_in_out: bool, paired: bool, outs: usize },
}

impl Kept {
    /// A tensor of the caller's `shape` in the kept layout.
    pub(super) fn convert(self, shape: &[usize], values: &[f32], name: &str) -> Result<Tensor, LowerError> {
        match self {
            Kept::Transposed => transposed(shape, values, name),
            Kept::Panels { from_in_out, paired, .. } => super::panels::pack(shape, values, (from_in_out, paired), name),
        }
    }

    /// A tensor of the caller's `shape` in the kept layout and storage
    /// `dtype`: [`Kept::convert`] then stored, but panels are packed
    /// straight into `dtype` (see `super::panels::pack_stored`).
    pub(super) fn store(self, dtype: DType, shape: &[usize], values: &[f32], name: &str) -> Result<Stored, LowerError> {
        match self {
            Kept::Transposed => Stored::new(dtype, transposed(shape, values, name)?, name),
            Kept::Panels { from_in_out, paired, .. } => {
                super::panels::pack_stored(dtype, shape, values, (from_in_out, paired), name)
            }
        }
    }

    /// The caller's shape of a tensor kept as `stored`.
    pub(super) fn callers_shape(self, stored: &[usize]) -> Vec<usize> {
        let (from_in_out, outs, ins) = match (self, stored) {
            (Kept::Transposed, _) => return stored.iter().rev().copied().collect(),
            (Kept::Panels { from_in_out, paired: false, outs }, &[_, ins, _]) => (from_in_out, outs, ins),
            (Kept::Panels { from_in_out, paired: true, outs }, &[_, half, _, two]) => (from_in_out, outs, half * two),
            (Kept::Panels { .. }, _) => return stored.to_vec(),
        };
        if from_in_out {
            vec![ins, outs]
        } else {
            vec![outs, ins]
        }
    }

    /// The kept shape of a tensor of the caller's `shape`.
    pub(super) fn stored_shape(self, shape: &[usize]) -> Vec<usize> {
        match (self, shape) {
            (Kept::Transposed, _) => shape.iter().rev().copied().collect(),
            (Kept::Panels { from_in_out, paired, .. }, &[a, b]) => {
                let (outs, ins) = if from_in_out { (b, a) } else { (a, b) };
                let panels = outs.div_ceil(PANEL);
                if paired {
                    vec![panels, ins / 2, PANEL, 2]
                } else {
                    vec![panels, ins, PANEL]
                }
            }
            (Kept::Panels { .. }, _) => shape.to_vec(),
        }
    }
}

/// `graph` with every f32 weight whose only uses are as the right operand
/// of an f32 `matmul` without `transpose_b` declared `[out, in]` and read
/// with `transpose_b`; and the names of those weights. Weights read any
/// other way (a gather, a view, a left operand, a graph output) and
/// f16/bf16 ones (whose transposed sum has no vector tile) keep their
/// layout.
pub(super) fn transpose_right_weights(graph: &Graph) -> (Graph, BTreeSet<String>) {
    let mut out = graph.clone();
    let mut names = BTreeSet::new();
    for (i, input) in graph.inputs.iter().enumerate() {
        if input.role != Role::Weight || input.dtype != DType::F32 || input.shape.len() != 2 {
            continue;
        }
        let me = Value::Input(i);
        if graph.outputs.iter().any(|o| o.value == me) {
            continue;
        }
        let uses: Vec<usize> = (0..graph.nodes.len()).filter(|&j| graph.nodes[j].inputs.contains(&me)).collect();
        let right_of_matmul = |j: &usize| {
            let node = &graph.nodes[*j];
            matches!(node.op, Op::MatMul { transpose_b: false })
                && matches!(node.inputs.as_slice(), [a, w] if *w == me && *a != me && graph.dtype_of(*a) == DType::F32)
        };
        if uses.is_empty() || !uses.iter().all(right_of_matmul) {
            continue;
        }
        out.inputs[i].shape.reverse();
        for j in uses {
            out.nodes[j].op = Op::MatMul { transpose_b: true };
        }
        names.insert(input.name.clone());
    }
    (out, names)
}

/// `values` of the 2-D `shape` (`[rows, cols]`, row-major) transposed:
/// `[cols, rows]`. `name` is the input's, for the error on another rank.
pub(super) fn transposed(shape: &[usize], values: &[f32], name: &str) -> Result<Tensor, LowerError> {
    let &[rows, cols] = shape else {
        return Err(LowerError::Run(format!(
            "input `{name}` has shape {shape:?}, expected a matrix (it is stored transposed)"
        )));
    };
    if values.len() != rows * cols {
        return Err(LowerError::Run(format!("input `{name}` has shape {shape:?} but {} values", values.len())));
    }
    let mut data = vec![0.0f32; values.len()];
    // In blocks of 16 x 16, so both sides are walked a cache line at a time.
    const BLOCK: usize = 16;
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    data[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    Ok(Tensor { shape: vec![cols, rows], data })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    fn graph(w_dtype: &str, extra_use: &str) -> Graph {
        let doc = format!(
            r#"{{"format": "bifurc-graph/1", "dims": {{"runtime": ["b"], "constants": {{"d": 4, "f": 6}}}},
            "inputs": [
              {{"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "f32"}},
              {{"name": "w_in", "role": "weight", "shape": ["d", "f"], "dtype": "{w_dtype}"}},
              {{"name": "w_out", "role": "weight", "shape": ["f", "d"], "dtype": "f32"}},
              {{"name": "w_t", "role": "weight", "shape": ["f", "d"], "dtype": "f32"}}
            ],
            "nodes": [
              {{"id": "h", "op": "matmul", "inputs": ["x", "w_in"]}},
              {{"id": "h2", "op": "matmul", "inputs": ["x", "w_t"], "attrs": {{"transpose_b": true}}}},
              {{"id": "y", "op": "matmul", "inputs": ["h", "w_out"]}}{extra_use}
            ],
            "outputs": [{{"name": "y", "node": "y"}}, {{"name": "h2", "node": "h2"}}]}}"#
        );
        crate::import::parse(&doc).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_f32_right_operands_of_plain_matmuls_are_transposed() {
        let g = graph("f32", "");
        let (t, names) = transpose_right_weights(&g);
        assert_eq!(names, BTreeSet::from(["w_in".to_string(), "w_out".to_string()]));
        let shape = |name: &str| t.shape_of(t.find(name).unwrap_or_else(|| panic!("{name}"))).clone();
        assert_eq!(shape("w_in"), g.shape_of(g.find("w_in").expect("w_in")).iter().rev().cloned().collect::<Vec<_>>());
        assert_eq!(shape("w_t"), g.shape_of(g.find("w_t").expect("w_t")).clone());
        assert!(t.nodes.iter().all(|n| n.op == Op::MatMul { transpose_b: true }));
        // Node shapes (what the kernels write) do not change.
        assert!(t.nodes.iter().zip(&g.nodes).all(|(a, b)| a.shape == b.shape));

        // bf16 weights, and a weight also read another way, keep their layout.
        let (_, names) = transpose_right_weights(&graph("bf16", ""));
        assert_eq!(names, BTreeSet::from(["w_out".to_string()]));
        let slice = r#", {"id": "s", "op": "slice", "inputs": ["w_out"], "attrs": {"axis": 0, "start": 0, "end": 1}}"#;
        let (_, names) = transpose_right_weights(&graph("f32", slice));
        assert_eq!(names, BTreeSet::from(["w_in".to_string()]));
    }

    /// GPT-2's MLP (`x @ W_fc`, gelu, `@ W_proj`, both `[in, out]`): the
    /// step runs both matmuls as vector sums over the transposed weights
    /// (the tree of lane shuffles, no output-vector tile), still takes the
    /// weights in their `[in, out]` layout by every way in (tensors at
    /// each run; stored once, from a tensor or from values), agrees with
    /// the interpreter, and names the caller's layout when a weight's
    /// shape is wrong.
    #[test]
    fn conv1d_weights_run_transposed_and_bind_as_given() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"d": 48, "f": 96}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": "f32"},
                {"name": "w_fc", "role": "weight", "shape": ["d", "f"], "dtype": "f32"},
                {"name": "w_proj", "role": "weight", "shape": ["f", "d"], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "h", "op": "matmul", "inputs": ["x", "w_fc"]},
                {"id": "a", "op": "gelu", "inputs": ["h"]},
                {"id": "y", "op": "matmul", "inputs": ["a", "w_proj"]}
            ],
            "outputs": [{"name": "y", "node": "y"}]
        });
        let (graph, step, text) = crate::lower::emit::testing::cpu_step(&doc);
        // Neither has a multiple of 64 outputs: no panels (see `panels`).
        let kept: Vec<(&str, Kept)> = step.kept.iter().map(|(n, k)| (n.as_str(), *k)).collect();
        assert_eq!(kept, [("w_fc", Kept::Transposed), ("w_proj", Kept::Transposed)]);
        assert!(text.contains("vector.shuffle"), "vector sums added in a tree:\n{text}");
        let out_vec_tile = format!("-> ({}) {{", vec!["vector<16xf32>"; 16].join(", "));
        assert_eq!(text.matches(&out_vec_tile).count(), 2, "two 4 x 4 vector-sum tiles, no other:\n{text}");
        for b in [1, 4, 7] {
            let at = crate::lower::emit::testing::point(&[("b", b)]);
            crate::lower::emit::testing::check_output(&graph, &step, &at, 3, "y", (1e-4, 1e-4));
            let inputs = crate::interp::random_inputs(&graph, &at, 3).unwrap_or_else(|e| panic!("{e}"));
            let want = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let by_tensor = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let mut stored = HashMap::new();
            for (name, t) in &inputs {
                let s = if name == "w_proj" {
                    step.store_values(name, &t.shape, &t.data)
                } else {
                    step.store(name, t.clone())
                };
                stored.insert(name.clone(), s.unwrap_or_else(|e| panic!("{e}")));
            }
            let by_stored = step.run_stored(&at, &BTreeMap::new(), &stored).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(by_stored["y"].data, by_tensor["y"].data, "stored and given weights at b = {b}");
            for (x, y) in by_tensor["y"].data.iter().zip(&want["y"].data) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "b = {b}: {x} vs {y}");
            }
        }
        let at = crate::lower::emit::testing::point(&[("b", 2)]);
        let mut inputs = crate::interp::random_inputs(&graph, &at, 3).unwrap_or_else(|e| panic!("{e}"));
        let w = inputs["w_fc"].clone();
        inputs.insert("w_fc".into(), transposed(&w.shape, &w.data, "w_fc").unwrap_or_else(|e| panic!("{e}")));
        let err = step.run(&at, &inputs).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("`w_fc` has shape [96, 48]") && err.contains("expected [48, 96]"), "{err}");
        let zeros = step.store_zeros("w_fc", vec![48, 96]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(zeros.shape, [96, 48], "kept as [out, in]");
    }

    #[test]
    fn transposes_across_block_edges() {
        for (rows, cols) in [(1, 1), (3, 17), (33, 16), (16, 40)] {
            let t = Tensor { shape: vec![rows, cols], data: (0..rows * cols).map(|v| v as f32).collect() };
            let u = transposed(&t.shape, &t.data, "w").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(u.shape, vec![cols, rows]);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(u.data[c * rows + r], t.data[r * cols + c], "{rows}x{cols} at {r},{c}");
                }
            }
            assert_eq!(transposed(&u.shape, &u.data, "w").unwrap_or_else(|e| panic!("{e}")).data, t.data);
        }
        let cube = Tensor { shape: vec![1, 2, 2], data: vec![0.0; 4] };
        assert!(transposed(&cube.shape, &cube.data, "w").is_err_and(|e| e.to_string().contains("`w`")));
    }
}
