//! Softmaxes written over their scores (a CPU plan: [`super::plan_cpu`]).
//!
//! Bifurcated attention's softmax reads `concat(scores_context,
//! scores_decode, scores_new)` along its axis (scaled, maybe masked: ops
//! inlined into it), and its output is read only as those parts again,
//! by slices, one `w·V` each. Written to a buffer of its own, each line
//! of its output is first read for ownership (a plain store to a line
//! not in cache), a third more traffic than the scores it reads: the
//! softmax is bound by memory (16 MB of f32 scores a layer at b = 32,
//! m_c = 8192). Planned in place, the softmax writes part `p` of each row
//! over the buffer of the concat's part `p`, which it has just read and
//! nothing else reads, and each slice reads that buffer.
//!
//! A softmax qualifies when, over live nodes only:
//! - its input is a chain of inlined elementwise nodes and reshapes
//!   (each the one user of the one before) ending at a concat along the
//!   row, the chain's one user (so nothing else reads the parts: a mask
//!   reading them would be another user); a reshape keeps the row as the
//!   last axis, regrouping the axes before it (grouped-query heads);
//! - each part of the concat is a node with a kernel of its own, of the
//!   softmax's dtype (a float), whose one user is the concat;
//! - every user of the softmax is a slice along the row exactly over one
//!   part, or a reshape that keeps the row whose users are;
//! - none of these is a graph output.
//!
//! The softmax then reads every element before it writes it, at the
//! same place (its max pass reads the row, its exp pass reads an element
//! and stores its `exp` there, its last pass scales what it stored), so
//! it computes what it did with its own buffer. In f16 / bf16 the `exp`s
//! are kept in f32 in a row on the stack instead, as with a buffer of its
//! own (a row longer than that computes each again), and only the final
//! values are rounded and stored over the parts: the bf16 cpu_step's
//! softmax no longer writes a buffer of its own (8 MB a layer at b = 32,
//! m_c = 8192, each line first read for ownership). Its row's sum is
//! reassociable, as before, and LLVM may vectorize it in another order
//! here: the last bits can differ (a grouped-query test graph: within a
//! few ulps of the attention's output).
//!
//! cpu_step (b = 32, m_c = 8192, f32) on one thread of a 2-core Emerald
//! Rapids VM, where the softmax is bound by memory: 3.9-5.1 -> 2.9-3.6 ms
//! a layer (see DESIGN.md).

use crate::ir::{Graph, Op, Poly, Value};

use super::plan::NodeKind;

/// One softmax to plan in place: its node, and its input concat's parts,
/// in order.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Found {
    pub softmax: usize,
    pub parts: Vec<FoundPart>,
}

/// A part of a [`Found`] softmax's input concat.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FoundPart {
    /// The part's node.
    pub node: usize,
    /// Where it starts along the row, and its length there.
    pub start: Poly,
    pub len: Poly,
    /// The slices that read this part of the softmax.
    pub slices: Vec<usize>,
}

/// Every softmax of `graph` (classified as `kinds`) that qualifies (see
/// the module docs), in node order.
pub(crate) fn find(graph: &Graph, kinds: &[NodeKind]) -> Vec<Found> {
    let n = graph.nodes.len();
    let users = live_users(graph, kinds);
    let output = |j: usize| is_output(graph, j);
    (0..n)
        .filter(|&j| kinds.get(j) == Some(&NodeKind::Kernel) && !output(j))
        .filter_map(|j| qualifies(graph, kinds, &users, &output, j))
        .collect()
}

/// Each node's live users (nodes not [`NodeKind::Dead`] that read it),
/// each once, in node order.
pub(crate) fn live_users(graph: &Graph, kinds: &[NodeKind]) -> Vec<Vec<usize>> {
    let n = graph.nodes.len();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, node) in graph.nodes.iter().enumerate() {
        if kinds.get(k).is_none_or(|kind| *kind == NodeKind::Dead) {
            continue;
        }
        for v in &node.inputs {
            if let Value::Node(p) = *v {
                if p < n && !users[p].contains(&k) {
                    users[p].push(k);
                }
            }
        }
    }
    users
}

/// Whether node `j` is one of `graph`'s outputs.
pub(crate) fn is_output(graph: &Graph, j: usize) -> bool {
    graph.outputs.iter().any(|o| o.value == Value::Node(j))
}

fn qualifies(
    graph: &Graph,
    kinds: &[NodeKind],
    users: &[Vec<usize>],
    output: &dyn Fn(usize) -> bool,
    j: usize,
) -> Option<Found> {
    let node = &graph.nodes[j];
    let Op::Softmax { axis } = node.op else { return None };
    if !node.dtype.is_float() {
        return None;
    }
    // A reshape keeps the row where the row is the last axis on both
    // sides: it regroups the axes before it (grouped-query heads, `[b, g,
    // p, n, m]` as `[b, h, n, m]`), and an element's row-major offset is
    // the same in either shape.
    let keeps_row = |shape: &[Poly], row: usize, other: &[Poly]| {
        row + 1 == shape.len() && shape.last().zip(other.last()).is_some_and(|(a, b)| graph.dims.same(a, b))
    };
    // From the softmax's input back to the concat: inlined elementwise
    // nodes (through their operand of the same shape) and reshapes.
    let mut at = match node.inputs.as_slice() {
        [Value::Node(x)] => *x,
        _ => return None,
    };
    let (mut user, mut row) = (j, axis);
    let concat = loop {
        if users[at] != [user] || output(at) {
            return None;
        }
        let here = &graph.nodes[at];
        let next = match (&here.op, kinds[at]) {
            (Op::Concat { axis: a }, NodeKind::View) if *a == row => break at,
            (Op::Reshape { .. }, NodeKind::View) => {
                let [next] = here.inputs.as_slice() else { return None };
                let from = graph.shape_of(*next);
                if !keeps_row(&here.shape, row, from) {
                    return None;
                }
                row = from.len() - 1;
                *next
            }
            (op, NodeKind::Inlined) if crate::lower::plan::is_elementwise(op) => {
                let same = |v: &&Value| graph.dims.same_shape(graph.shape_of(**v), &here.shape);
                *here.inputs.iter().find(same)?
            }
            _ => return None,
        };
        let Value::Node(next) = next else { return None };
        user = at;
        at = next;
    };
    let mut parts = Vec::new();
    let mut start = Poly::zero();
    for part in &graph.nodes[concat].inputs {
        let Value::Node(p) = *part else { return None };
        // A part twice: the first one's writes would be read as the second.
        if parts.iter().any(|q: &FoundPart| q.node == p) {
            return None;
        }
        let ok =
            kinds[p] == NodeKind::Kernel && graph.nodes[p].dtype == node.dtype && users[p] == [concat] && !output(p);
        if !ok {
            return None;
        }
        let len = graph.shape_of(*part).get(row)?.clone();
        let end = start.add(&len).ok()?;
        parts.push(FoundPart { node: p, start: start.clone(), len, slices: Vec::new() });
        start = end;
    }
    // Every user a slice over one part: of the softmax, or of a reshape
    // of it that keeps the row.
    let mut take = |s: usize, row: usize| -> Option<()> {
        let Op::Slice { axis: a, start, end } = &graph.nodes[s].op else { return None };
        if *a != row || output(s) {
            return None;
        }
        let end_of = |p: &FoundPart| p.start.add(&p.len).ok();
        let p = parts
            .iter()
            .position(|p| graph.dims.same(&p.start, start) && end_of(p).is_some_and(|e| graph.dims.same(&e, end)))?;
        parts[p].slices.push(s);
        Some(())
    };
    for &u in &users[j] {
        let used = &graph.nodes[u];
        match used.op {
            Op::Slice { .. } => take(u, axis)?,
            Op::Reshape { .. } if !output(u) && keeps_row(&node.shape, axis, &used.shape) => {
                for &s in &users[u] {
                    take(s, used.shape.len() - 1)?;
                }
            }
            _ => return None,
        }
    }
    Some(Found { softmax: j, parts })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use serde_json::{json, Value as Json};

    use crate::ir::Graph;
    use crate::lower::{emit, plan_cpu, plan_with, BufferKind, CpuStep, Param, Target};

    /// The query `[b, h, 1, k]`, and the context's and the new token's K
    /// and V with `kv` heads, all of `dtype`.
    fn inputs(kv: &str, dtype: &str) -> Json {
        let input =
            |name: &str, shape: Json| json!({"name": name, "role": "activation", "shape": shape, "dtype": dtype});
        json!([
            input("q", json!(["b", "h", 1, "k"])),
            input("kc", json!([kv, "m", "k"])),
            input("kn", json!(["b", kv, 1, "k"])),
            input("vc", json!([kv, "m", "k"])),
            input("vn", json!(["b", kv, 1, "k"]))
        ])
    }

    /// One head-split attention over a shared context (`kc`, `vc`) and a
    /// new token (`kn`, `vn`), bifurcated: scores of both, their concat
    /// scaled, the softmax, and each part's `w·V` through a slice; f32.
    fn attention() -> Json {
        attention_in("f32")
    }

    /// [`attention`] in `dtype`.
    pub(crate) fn attention_in(dtype: &str) -> Json {
        json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 2, "k": 8}},
            "inputs": inputs("h", dtype),
            "nodes": [
                {"id": "s1", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "abxy,bzy->abxz"}},
                {"id": "s2", "op": "einsum", "inputs": ["q", "kn"], "attrs": {"spec": "abxy,abzy->abxz"}},
                {"id": "s", "op": "concat", "inputs": ["s1", "s2"], "attrs": {"axis": 3}},
                {"id": "sc", "op": "scale", "inputs": ["s"], "attrs": {"value": 0.35}},
                {"id": "p", "op": "softmax", "inputs": ["sc"], "attrs": {"axis": 3}},
                {"id": "p1", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": 0, "end": "m"}},
                {"id": "p2", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": "m", "end": "m+1"}},
                {"id": "o1", "op": "einsum", "inputs": ["p1", "vc"], "attrs": {"spec": "abxy,byz->abxz"}},
                {"id": "o2", "op": "einsum", "inputs": ["p2", "vn"], "attrs": {"spec": "abxy,abyz->abxz"}},
                {"id": "o", "op": "add", "inputs": ["o1", "o2"]}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        })
    }

    /// [`attention`] with grouped-query heads (2 KV heads of 3 query
    /// heads): the scores `[b, g, p, 1, m]` concatenated, then read as `[b,
    /// h, 1, m + 1]` by a reshape; the probabilities read back as `[b, g,
    /// p, 1, m + 1]` by another before the slices; in `dtype`.
    pub(crate) fn grouped_attention(dtype: &str) -> Json {
        json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"g": 2, "p": 3, "h": 6, "k": 8}},
            "inputs": inputs("g", dtype),
            "nodes": [
                {"id": "qg", "op": "reshape", "inputs": ["q"], "attrs": {"shape": ["b", "g", "p", 1, "k"]}},
                {"id": "s1", "op": "einsum", "inputs": ["qg", "kc"], "attrs": {"spec": "acdxy,czy->acdxz"}},
                {"id": "s2", "op": "einsum", "inputs": ["qg", "kn"], "attrs": {"spec": "acdxy,aczy->acdxz"}},
                {"id": "cat", "op": "concat", "inputs": ["s1", "s2"], "attrs": {"axis": 4}},
                {"id": "s", "op": "reshape", "inputs": ["cat"], "attrs": {"shape": ["b", "h", 1, "m+1"]}},
                {"id": "sc", "op": "scale", "inputs": ["s"], "attrs": {"value": 0.35}},
                {"id": "p", "op": "softmax", "inputs": ["sc"], "attrs": {"axis": 3}},
                {"id": "r", "op": "reshape", "inputs": ["p"], "attrs": {"shape": ["b", "g", "p", 1, "m+1"]}},
                {"id": "p1", "op": "slice", "inputs": ["r"], "attrs": {"axis": 4, "start": 0, "end": "m"}},
                {"id": "p2", "op": "slice", "inputs": ["r"], "attrs": {"axis": 4, "start": "m", "end": "m+1"}},
                {"id": "o1", "op": "einsum", "inputs": ["p1", "vc"], "attrs": {"spec": "acdxy,cyz->acdxz"}},
                {"id": "o2", "op": "einsum", "inputs": ["p2", "vn"], "attrs": {"spec": "acdxy,acyz->acdxz"}},
                {"id": "o", "op": "add", "inputs": ["o1", "o2"]}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        })
    }

    pub(crate) fn graph(doc: &Json) -> Graph {
        crate::import::from_value(doc).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The CPU plan writes the softmax over its two parts' buffers: no
    /// buffer of its own, each buffer passed to its kernel once, the
    /// slices reading the parts; the GPU's plan keeps its buffer. The
    /// step's output is the interpreter's at ragged points (an empty
    /// context included), run whole and in parts.
    #[test]
    fn the_softmax_is_written_over_its_scores() {
        check_in_place(&graph(&attention()), F32);
    }

    /// The same with grouped-query heads, through the reshapes.
    #[test]
    fn a_grouped_query_softmax_is_written_over_its_scores() {
        check_in_place(&graph(&grouped_attention("f32")), F32);
    }

    /// The same in bf16 (the `exp`s kept in f32 on the stack, the values
    /// rounded once, over the parts; computed again for a row past the
    /// stack's, m = 16400), and in f16, grouped-query: within
    /// an ulp of the softmax with a buffer of its own (the row's sum may be
    /// added in another order), and of the interpreter as bf16 rounds.
    #[test]
    fn a_half_precision_softmax_is_written_over_its_scores() {
        check_in_place(&graph(&attention_in("bf16")), BF16);
        check_in_place(&graph(&grouped_attention("f16")), BF16);
    }

    /// Tolerances `(against its own buffer, against the interpreter)`, each
    /// `(abs, rel)`.
    type Tol = ((f32, f32), (f32, f32));
    const F32: Tol = ((1e-7, 1e-6), (1e-5, 1e-5));
    const BF16: Tol = ((1e-3, 1e-2), (3e-2, 3e-2));

    fn check_in_place(g: &Graph, ((own_abs, own_rel), (abs, rel)): Tol) {
        // The plan without the fused context attention (the step below
        // has it where the softmax is f32: `lower::fused_attention`).
        let program = crate::lower::plan::plan_cpu_fusing(g, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(program.in_place.len(), 1, "{:?}", program.in_place);
        let plan = &program.in_place[0];
        assert_eq!(plan.node, "p");
        let names: Vec<&str> = plan.parts.iter().map(|p| program.buffers[p.buffer].name.as_str()).collect();
        assert_eq!(names, ["s1", "s2"]);
        let slices: Vec<&[String]> = plan.parts.iter().map(|p| p.slices.as_slice()).collect();
        assert_eq!(slices, [["p1".to_string()], ["p2".to_string()]]);
        assert!(program.buffers.iter().all(|b| b.name != "p"), "the softmax has no buffer");
        let kernel = program.kernels.iter().find(|k| k.node == "p").unwrap_or_else(|| panic!("no softmax kernel"));
        let passed: Vec<usize> =
            kernel.params.iter().filter_map(|p| if let Param::Buffer(b) = p { Some(*b) } else { None }).collect();
        assert_eq!(passed, plan.parts.iter().map(|p| p.buffer).collect::<Vec<_>>(), "each part once");
        assert!(kernel.reads.contains(&kernel.writes));
        for (node, part) in [("o1", 0), ("o2", 1)] {
            let k = program.kernels.iter().find(|k| k.node == node).unwrap_or_else(|| panic!("{node}"));
            assert!(k.reads.contains(&plan.parts[part].buffer), "{node} reads its part: {:?}", k.reads);
        }
        // Only the CPU's row loops write over the parts: the plan emitted
        // for the GPU, or the GPU's structure emulated, is an error.
        let emulation = crate::lower::Emulation { lanes: 4, cooperative_min: 64, tuning: Default::default() };
        for text in [emit(g, &program, Target::Gpu), crate::lower::emit_emulating_gpu(g, &program, emulation)] {
            match text {
                Err(e) => assert!(e.to_string().contains("only as the CPU's row loops"), "{e}"),
                Ok(_) => panic!("a softmax planned in place emitted for the GPU"),
            }
        }
        assert!(emit(g, &program, Target::Cpu).is_ok());
        let gpu = plan_with(g, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(gpu.in_place.is_empty());
        assert!(gpu.buffers.iter().any(|b| b.name == "p" && b.kind == BufferKind::Intermediate));

        let mut step = CpuStep::compile(g).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(step.program().in_place.len(), 1);
        // The values of the softmax with a buffer of its own, up to the
        // order of its row's sum (see the module docs).
        let own = CpuStep::compile_program(g, gpu.clone()).unwrap_or_else(|e| panic!("{e}"));
        for (b, m) in [(3, 37), (1, 0), (2, 300), (5, 16), (1, 16400)] {
            let point = BTreeMap::from([("b".to_string(), b), ("m".to_string(), m)]);
            let inputs = crate::interp::random_inputs(g, &point, 5).unwrap_or_else(|e| panic!("{e}"));
            let want = crate::interp::run(g, &point, &inputs).unwrap_or_else(|e| panic!("{e}"));
            for threads in [1, 3] {
                step.set_threads(threads);
                step.set_min_split_bytes(0);
                let got = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let mine = own.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                for (i, (x, y)) in got["o"].data.iter().zip(&mine["o"].data).enumerate() {
                    assert!(
                        (x - y).abs() <= own_abs + own_rel * y.abs(),
                        "b={b} m={m}: [{i}] {x} vs its own buffer's {y}"
                    );
                }
                assert_eq!(got["o"].shape, want["o"].shape);
                for (i, (x, y)) in got["o"].data.iter().zip(&want["o"].data).enumerate() {
                    assert!((x - y).abs() <= abs + rel * y.abs(), "b={b} m={m} {threads}: [{i}] {x} vs {y}");
                }
            }
        }
    }

    /// Where anything else would read a part, or the softmax other than
    /// as one part, the softmax keeps its own buffer.
    #[test]
    fn a_softmax_read_otherwise_keeps_its_buffer() {
        let edits: [(&str, Json, Edit); 8] = [
            ("a part is an output", attention(), |d| push(d, "outputs", json!({"name": "s1", "node": "s1"}))),
            ("the softmax is an output", attention(), |d| push(d, "outputs", json!({"name": "p", "node": "p"}))),
            ("a slice over both parts", attention(), |d| {
                push(
                    d,
                    "nodes",
                    json!({"id": "pb", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": 1, "end": "m+1"}}),
                );
                push(d, "outputs", json!({"name": "pb", "node": "pb"}));
            }),
            ("the scaled scores are read again", attention(), |d| {
                push(d, "nodes", json!({"id": "e", "op": "exp", "inputs": ["sc"]}));
                push(d, "outputs", json!({"name": "e", "node": "e"}));
            }),
            ("a part is read again", attention(), |d| {
                push(d, "nodes", json!({"id": "e", "op": "exp", "inputs": ["s2"]}));
                push(d, "outputs", json!({"name": "e", "node": "e"}));
            }),
            ("a grouped part is an output", grouped_attention("f32"), |d| {
                push(d, "outputs", json!({"name": "s2", "node": "s2"}));
            }),
            ("the grouped probabilities are an output", grouped_attention("f32"), |d| {
                push(d, "outputs", json!({"name": "r", "node": "r"}));
            }),
            ("a reshape that moves the row", grouped_attention("f32"), |d| {
                // Its slice spans the first part's offsets, on another row.
                let flat = json!({"id": "f", "op": "reshape", "inputs": ["p"], "attrs": {"shape": ["b", "h*m+h"]}});
                let cut =
                    json!({"id": "fs", "op": "slice", "inputs": ["f"], "attrs": {"axis": 1, "start": 0, "end": "m"}});
                push(d, "nodes", flat);
                push(d, "nodes", cut);
                push(d, "nodes", json!({"id": "fe", "op": "exp", "inputs": ["fs"]}));
                push(d, "outputs", json!({"name": "fe", "node": "fe"}));
            }),
        ];
        let twice = json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"h": 2, "k": 8}},
            "inputs": [
                {"name": "q", "role": "activation", "shape": ["b", "h", 1, "k"], "dtype": "f32"},
                {"name": "kn", "role": "activation", "shape": ["b", "h", 1, "k"], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "s2", "op": "einsum", "inputs": ["q", "kn"], "attrs": {"spec": "abxy,abzy->abxz"}},
                {"id": "s", "op": "concat", "inputs": ["s2", "s2"], "attrs": {"axis": 3}},
                {"id": "p", "op": "softmax", "inputs": ["s"], "attrs": {"axis": 3}},
                {"id": "p1", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": 0, "end": 1}},
                {"id": "p2", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": 1, "end": 2}},
                {"id": "o", "op": "add", "inputs": ["p1", "p2"]}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        });
        let edits = edits.into_iter().chain([("one part twice", twice, (|_| {}) as Edit)]);
        for (what, mut doc, edit) in edits {
            edit(&mut doc);
            let g = graph(&doc);
            let program = plan_cpu(&g).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(program.in_place.is_empty(), "{what}: {:?}", program.in_place);
            assert!(program.buffers.iter().any(|b| b.name == "p"), "{what}");
        }
    }

    /// A change to [`attention`]'s or [`grouped_attention`]'s document.
    type Edit = fn(&mut Json);

    fn push(doc: &mut Json, list: &str, item: Json) {
        match doc.get_mut(list).and_then(Json::as_array_mut) {
            Some(items) => items.push(item),
            None => panic!("no {list}"),
        }
    }
}
