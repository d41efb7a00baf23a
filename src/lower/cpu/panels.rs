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
//! change measurably (9.6-9.9 ms both ways) until the kernels were
//! launched from the pool (`parts::on_pool`): 82-85% of the FMA peak.
//! Each whole tile then also prefetches its share of the next panel, a
//! line per step of its sum (`emit::panel_ahead`): the MLP's projections
//! 0.97-1.04 -> 0.82-0.89 ms each at b = 32 on two threads (77% -> 88%
//! of the FMA peak), the step 24.9-25.3 -> 22.9-23.1 ms (one thread
//! 44.8-45.5 -> 42.3-42.9).
//!
//! With f32 outputs in wide tiles the sum then runs in chunks of 128
//! steps (32 KiB of the panel, `emit::chunks`): every tile of rows runs
//! a chunk's part of its sums, carried in the output from chunk to
//! chunk, while the chunk stays in L1 (the whole panel, 704 KiB for the
//! down projection's 2816 inputs, was read from L2 by every tile after
//! the first, 256 bytes a step of 16 FMAs), and the whole tiles' steps
//! prefetch the next chunk (the last chunk: the next panel's first rows)
//! instead of the next panel. Each output's sum still runs in input
//! order: the same bits. On the same VM (`scripts/projection-lab.sh`,
//! b = 32): gate_proj 1.10x on two threads and 1.12x on one, down_proj
//! 1.29x and 1.25x, q_proj 1.06x; in cpu_step the step's 15 projections
//! 7.3-7.5 -> 6.0-6.3 ms on two threads. A bf16 output is not chunked
//! (its partial sums would be rounded between chunks).
//!
//! On a CPU that prefers its bf16 dot product (AVX512-BF16 on AMD, see
//! `emit::pair_dot::prefer_bf16_dot`), a bf16 weight multiplied by bf16 inputs is
//! kept in paired panels instead, `[out / PANEL, in / 2, PANEL, 2]`, and
//! read by `..zt,pzxt->..px` with `x` reshaped into pairs: one bf16 dot
//! product per 16 outputs and 2 inputs (`emit::pair_dot`). The bf16
//! cpu_step model's step went from 45.7-47.5 to 39.6-39.8 ms on one
//! thread and from 24.5-27.0 to 21.2-22.0 on two.
//!
//! On a CPU with AMX tiles (Intel's, from Sapphire Rapids), a bf16 weight
//! multiplied by bf16 inputs with `in` a multiple of 32, each input's rows
//! in a buffer in order, is kept in paired panels too: they are the layout
//! `tdpbf16ps` reads its right operand in (`emit::amx`; the bf16 cpu_step
//! model's MLP projections 2.1-3.0 -> 0.91-1.0 ms each at b = 32 on one
//! thread).
//!
//! A tied embedding (`[vocab, d]`, gathered for the input and multiplied
//! as `x @ Wᵀ` for the logits) goes into panels too, the gather reading
//! them back as `[vocab, d]` through views; and a weight whose `out` is
//! not a multiple of [`PANEL`] but within a sixteenth of one (GPT-2's
//! vocabulary of 50257: 47 more) has its last panel padded with zero
//! outputs, the einsum's padded outputs cut off by a slice (a graph
//! output then copied out of it: 0.36 ms for bf16 GPT-2's logits at b =
//! 32). bf16 GPT-2 (2 layers, b = 32, m_c = 2048, one thread): its logits
//! 17.8 -> 12.3-12.5 ms against the dot product on rows of the weight as
//! given (`emit::pair_dot`), the step 26.5-27.2 -> 22.2-23.0 ms (two
//! threads 15.1-15.4 -> 12.9-13.7); in f32 the same within the noise.
//!
//! The caller still binds the weight as the model has it: [`super::CpuStep`]
//! packs it on the way in (see [`super::layout::Kept`]).

use std::collections::BTreeMap;

use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

use crate::interp::Tensor;
use crate::ir::{DType, EinsumSpec, Graph, Node, Op, Poly, Role, Value};
use crate::lower::emit::{dense_source, AMX_INPUTS};
use crate::lower::plan::{classify, NodeKind};
use crate::lower::LowerError;

use super::host::HostData;
use super::layout::Kept;
use super::Stored;

/// Outputs of a panel: 4 vectors of 16 f32, a whole step of the strided
/// contraction's tile (`emit::VECTOR_GROUPS` × the lanes).
pub(crate) const PANEL: usize = 64;

/// Letters of the einsum's leading (row) axes: the input's axes but its
/// last (a projection's input is `[b, n, in]`).
const ROW_LETTERS: &str = "abcdefgh";

/// `graph` with every float weight `W` of constant sizes, `[out, in]`
/// whose only uses are as the right operand of float `x @ Wᵀ` matmuls (and
/// as the table of gathers: a tied embedding), or `[in, out]` whose only
/// uses are as that of `x @ W`, with `out` a multiple of [`PANEL`] or
/// within a sixteenth of one ([`padded_panels`]), declared
/// `[ceil(out / PANEL), in, PANEL]`, each such `matmul` now an einsum
/// `..k,pkn->..pn` named `<id>.panels` followed by a reshape to the
/// matmul's shape that keeps its id (when `out` is not a multiple: a
/// reshape to `[.., ceil(out / PANEL) · PANEL]`, `<id>.padded`, then a
/// slice of the first `out` that keeps it), and each gather reading the
/// panels back as `[out, in]` through views (`<id>.table`: a transpose,
/// a reshape and, when padded, a slice); `kept` records each such weight
/// as [`Kept::Panels`] (from the caller's `[in, out]` where it is that in
/// `graph` or already held [`Kept::Transposed`]).
///
/// A bf16 weight whose every `x` is bf16 is declared `[ceil(out / PANEL),
/// in / 2, PANEL, 2]` instead (paired panels: each output's inputs `2z`
/// and `2z + 1` side by side), read by the einsum `..zt,pzxt->..px` of `x`
/// reshaped to `[.., in / 2, 2]` (`<id>.pairs`), where `pairs` says (see
/// [`Pairing`]).
pub(super) fn panel_weights(graph: &Graph, kept: &mut BTreeMap<String, Kept>, pairs: Pairing) -> Graph {
    // Whether each input goes into panels, and if so, how, and its `in`.
    let mut packed: Vec<Option<(Kept, i64)>> = vec![None; graph.inputs.len()];
    // How the plan realizes each node (for `all_dense`), once.
    let kinds = std::cell::OnceCell::new();
    for (i, input) in graph.inputs.iter().enumerate() {
        if matches!(kept.get(&input.name), Some(Kept::Panels { .. })) {
            continue;
        }
        if let Some((in_out, outs, ins)) = packable(graph, i) {
            let from_in_out = in_out || kept.get(&input.name) == Some(&Kept::Transposed);
            let paired = ins % 2 == 0
                && all_bf16(graph, i)
                && (pairs.dot
                    || (pairs.amx
                        && ins % AMX_INPUTS == 0
                        && all_dense(graph, kinds.get_or_init(|| classify(graph)), i)));
            kept.insert(input.name.clone(), Kept::Panels { from_in_out, paired, outs });
            // How `graph` itself declares it.
            packed[i] = Some((Kept::Panels { from_in_out: in_out, paired, outs }, ins));
        }
    }
    if packed.iter().all(Option::is_none) {
        return graph.clone();
    }
    let mut out = graph.clone();
    for (input, how) in out.inputs.iter_mut().zip(&packed) {
        if let (Some((Kept::Panels { from_in_out, paired, outs }, ins)), [a, b]) = (*how, input.shape.as_slice()) {
            let panels = Poly::constant(outs.div_ceil(PANEL) as i64);
            input.shape = if paired {
                vec![panels, Poly::constant(ins / 2), Poly::constant(PANEL as i64), Poly::constant(2)]
            } else {
                // `in` as the graph spells it.
                let ins = if from_in_out { a } else { b };
                vec![panels, ins.clone(), Poly::constant(PANEL as i64)]
            };
        }
    }
    let taken = |id: &str| graph.nodes.iter().any(|n| n.id == id) || graph.inputs.iter().any(|n| n.name == id);
    let fresh = |base: String, nodes: &[Node]| {
        let mut id = base;
        while taken(&id) || nodes.iter().any(|n| n.id == id) {
            id.push('_');
        }
        id
    };
    let mut nodes = Vec::with_capacity(graph.nodes.len() * 3);
    // Where each of the graph's nodes is in `nodes`.
    let mut at = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let mut inputs: Vec<Value> = node
            .inputs
            .iter()
            .map(|&v| match v {
                Value::Node(j) => Value::Node(at[j]),
                v => v,
            })
            .collect();
        let weight = match (&node.op, node.inputs.as_slice()) {
            (Op::MatMul { .. }, [_, Value::Input(w)]) => packed[*w].map(|(how, _)| (*w, how)),
            (Op::Gather, [Value::Input(w), _]) => {
                // Gathered only `[out, in]` (see `packable`).
                if let Some((Kept::Panels { paired, outs, .. }, ins)) = packed[*w] {
                    let table = (Value::Input(*w), out.inputs[*w].shape.as_slice(), graph.inputs[*w].dtype);
                    inputs[0] = table_view(&mut nodes, table, (paired, outs, ins), &|b, n| fresh(b, n), &node.id);
                }
                None
            }
            _ => None,
        };
        match weight {
            Some((w, Kept::Panels { paired, outs, .. })) => {
                let rank = node.shape.len();
                let rows: Vec<char> = ROW_LETTERS.chars().take(rank - 1).collect();
                let spec = if paired {
                    // `x` as pairs along its last axis.
                    let x = inputs[0];
                    let mut shape = graph.shape_of(node.inputs[0]).clone();
                    let half = out.inputs[w].shape[1].clone();
                    shape.pop();
                    shape.extend([half, Poly::constant(2)]);
                    let dtype = graph.dtype_of(node.inputs[0]);
                    let id = fresh(format!("{}.pairs", node.id), &nodes);
                    nodes.push(Node { id, op: Op::Reshape { shape: shape.clone() }, inputs: vec![x], shape, dtype });
                    inputs[0] = Value::Node(nodes.len() - 1);
                    EinsumSpec {
                        inputs: vec![[rows.as_slice(), &['z', 't']].concat(), vec!['y', 'z', 'x', 't']],
                        output: [rows.as_slice(), &['y', 'x']].concat(),
                    }
                } else {
                    EinsumSpec {
                        inputs: vec![[rows.as_slice(), &['z']].concat(), vec!['y', 'z', 'x']],
                        output: [rows.as_slice(), &['y', 'x']].concat(),
                    }
                };
                let mut shape = node.shape[..rank - 1].to_vec();
                shape.extend([out.inputs[w].shape[0].clone(), Poly::constant(PANEL as i64)]);
                let id = fresh(format!("{}.panels", node.id), &nodes);
                nodes.push(Node { id, op: Op::Einsum(spec), inputs, shape, dtype: node.dtype });
                if outs % PANEL != 0 {
                    // `[.., panels · PANEL]`, then its first `outs`.
                    let mut shape = node.shape.clone();
                    shape[rank - 1] = Poly::constant((outs.div_ceil(PANEL) * PANEL) as i64);
                    let id = fresh(format!("{}.padded", node.id), &nodes);
                    let padded = Value::Node(nodes.len() - 1);
                    let op = Op::Reshape { shape: shape.clone() };
                    nodes.push(Node { id, op, inputs: vec![padded], shape, dtype: node.dtype });
                    let (start, end) = (Poly::zero(), Poly::constant(outs as i64));
                    nodes.push(Node {
                        op: Op::Slice { axis: rank - 1, start, end },
                        inputs: vec![Value::Node(nodes.len() - 1)],
                        ..node.clone()
                    });
                } else {
                    nodes.push(Node {
                        id: node.id.clone(),
                        op: Op::Reshape { shape: node.shape.clone() },
                        inputs: vec![Value::Node(nodes.len() - 1)],
                        shape: node.shape.clone(),
                        dtype: node.dtype,
                    });
                }
            }
            _ => nodes.push(Node { inputs, ..node.clone() }),
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

/// Panels `(table, its declared shape, dtype)` (`paired` or not, of
/// `outs` outputs of `ins` inputs) read back as the weight `[outs, ins]`
/// a gather node `id` indexes: a transpose bringing each panel's outputs
/// before its inputs, a reshape merging panels and outputs (and inputs
/// and pairs), and a slice of the first `outs` when the last panel is
/// padded; the views pushed onto `nodes` under ids from `fresh`, the last
/// returned.
fn table_view(
    nodes: &mut Vec<Node>,
    (table, shape, dtype): (Value, &[Poly], DType),
    (paired, outs, ins): (bool, usize, i64),
    fresh: &dyn Fn(String, &[Node]) -> String,
    id: &str,
) -> Value {
    let push = |nodes: &mut Vec<Node>, op: Op, input: Value, shape: Vec<Poly>| {
        let id = fresh(format!("{id}.table"), nodes);
        nodes.push(Node { id, op, inputs: vec![input], shape, dtype });
        Value::Node(nodes.len() - 1)
    };
    let perm: Vec<usize> = if paired { vec![0, 2, 1, 3] } else { vec![0, 2, 1] };
    let moved: Vec<Poly> = perm.iter().map(|&a| shape[a].clone()).collect();
    let v = push(nodes, Op::Transpose { perm }, table, moved);
    let (rows, ins) = (Poly::constant((outs.div_ceil(PANEL) * PANEL) as i64), Poly::constant(ins));
    let merged = vec![rows, ins.clone()];
    let v = push(nodes, Op::Reshape { shape: merged.clone() }, v, merged);
    if outs % PANEL == 0 {
        return v;
    }
    let slice = Op::Slice { axis: 0, start: Poly::zero(), end: Poly::constant(outs as i64) };
    push(nodes, slice, v, vec![Poly::constant(outs as i64), ins])
}

/// Whether input `i` of `graph` goes into panels, and its `out` and `in`:
/// `Some((false, out, in))` for a float weight `[out, in]` used only as
/// the right operand of float `x @ Wᵀ` matmuls and as the table of
/// gathers (at least one matmul), `Some((true, out, in))` for one
/// `[in, out]` used only as that of `x @ W`; of constant sizes, `out`
/// fitting panels ([`padded_panels`]), `x` of rank 2 to 9, not a graph
/// output.
fn packable(graph: &Graph, i: usize) -> Option<(bool, usize, i64)> {
    let input = &graph.inputs[i];
    let me = Value::Input(i);
    if input.role != Role::Weight || !input.dtype.is_float() || graph.outputs.iter().any(|o| o.value == me) {
        return None;
    }
    let uses = || graph.nodes.iter().filter(|n| n.inputs.contains(&me));
    let in_out = uses().find_map(|n| match n.op {
        Op::MatMul { transpose_b } => Some(!transpose_b),
        _ => None,
    })?;
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
    // A tied embedding: the gather reads the panels back through views.
    let gathered =
        |n: &Node| n.op == Op::Gather && !in_out && matches!(n.inputs.as_slice(), [t, ids] if *t == me && *ids != me);
    let outs = usize::try_from(outs).ok().filter(|&o| padded_panels(o))?;
    let fits = ins > 0 && uses().all(|n| projection(n) || gathered(n));
    fits.then_some((in_out, outs, ins))
}

/// Whether a weight of `outs` outputs goes into panels: a whole number of
/// them, or a last one padded with at most a sixteenth of `outs` in zeros
/// (a vocabulary of 50257: 47 outputs; 1000: 24), the work spent on them
/// less than the panels save (the tiles of rows × outputs run at 43-79%
/// of the FMA peak where the panels run at 78-85%, bf16 pairs at twice
/// that).
pub(super) fn padded_panels(outs: usize) -> bool {
    outs > 0 && outs.div_ceil(PANEL) * PANEL - outs <= outs / 16
}

/// Which bf16 weights go into paired panels (each with an even `in`, and
/// every `x` bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pairing {
    /// All of them: their sums run on the CPU's bf16 dot product
    /// (`emit::pair_dot`).
    pub dot: bool,
    /// Those whose `in` is a multiple of [`AMX_INPUTS`] and whose every `x`
    /// has its rows in a buffer (see `all_dense`): they run on AMX tiles
    /// (`emit::amx`), which read `x` in place.
    pub amx: bool,
}

/// Whether every left operand input `i` is multiplied by has its elements
/// in its own row-major order in a buffer (a graph input, or a node the
/// plan gives a kernel (`kinds`, `plan::classify`), or order-keeping
/// views of one: `amx::dense_source`),
/// which AMX tiles read in place.
fn all_dense(graph: &Graph, kinds: &[NodeKind], i: usize) -> bool {
    let me = Value::Input(i);
    let stored = |v: Value| match v {
        Value::Input(_) => true,
        Value::Node(k) => kinds.get(k) == Some(&NodeKind::Kernel),
    };
    graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::MatMul { .. }) && n.inputs.contains(&me))
        .all(|n| n.inputs.first().is_some_and(|&x| dense_source(graph, x, &stored).is_some()))
}

/// Whether input `i` and every left operand it is multiplied by are bf16.
fn all_bf16(graph: &Graph, i: usize) -> bool {
    let me = Value::Input(i);
    graph.inputs[i].dtype == DType::BF16
        && graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::MatMul { .. }) && n.inputs.contains(&me))
            .all(|n| n.inputs.first().is_some_and(|&a| graph.dtype_of(a) == DType::BF16))
}

/// `values` of a weight `shape` (`[out, in]`, or `[in, out]` when
/// `from_in_out`) as panels `[out / PANEL, in, PANEL]`: element
/// `[p, k, l]` is the weight's output `p · PANEL + l`, input `k`; or,
/// `paired`, as `[out / PANEL, in / 2, PANEL, 2]`: element `[p, z, l, t]`
/// is output `p · PANEL + l`, input `2z + t`. `name` is the input's, for
/// the errors.
pub(super) fn pack(shape: &[usize], values: &[f32], layout: (bool, bool), name: &str) -> Result<Tensor, LowerError> {
    let packing = Packing::new(shape, values, layout, name)?;
    let mut data = vec![0.0f32; packing.len()];
    // Panels in parallel: a 7B model's weights are packed once, when bound.
    data.par_chunks_exact_mut(packing.panel_len()).enumerate().for_each(|(p, panel)| packing.fill(p, panel));
    Ok(Tensor { shape: packing.shape(), data })
}

/// [`pack`] straight into storage `dtype`, a panel at a time: no f32 copy
/// of the packed weight beside the stored one (Llama-3-8B in bf16 on the
/// CPU, random weights: `bifurc run`'s peak resident memory 19.97 -> 17.91
/// GB, its 291 weights bound in 49.9-55.1 -> 39.2-39.6 s on two cores).
pub(super) fn pack_stored(
    dtype: DType,
    shape: &[usize],
    values: &[f32],
    layout: (bool, bool),
    name: &str,
) -> Result<Stored, LowerError> {
    let packing = Packing::new(shape, values, layout, name)?;
    let data = HostData::float_pieces(dtype, packing.len(), packing.panel_len(), |p, panel| packing.fill(p, panel))?;
    Ok(Stored::from_host(dtype, packing.shape(), data))
}

/// A weight's values on their way into panels (see [`pack`]).
struct Packing<'a> {
    values: &'a [f32],
    from_in_out: bool,
    paired: bool,
    outs: usize,
    ins: usize,
}

impl<'a> Packing<'a> {
    /// Checks `values` against `shape` and the layout.
    fn new(
        shape: &[usize],
        values: &'a [f32],
        (from_in_out, paired): (bool, bool),
        name: &str,
    ) -> Result<Self, LowerError> {
        let &[rows, cols] = shape else {
            return Err(LowerError::Run(format!(
                "input `{name}` has shape {shape:?}, expected a matrix (it is stored in panels)"
            )));
        };
        if values.len() != rows * cols {
            return Err(LowerError::Run(format!("input `{name}` has shape {shape:?} but {} values", values.len())));
        }
        let (outs, ins) = if from_in_out { (cols, rows) } else { (rows, cols) };
        if outs == 0 || ins == 0 || (paired && ins % 2 != 0) {
            let what = if paired { " and an even number of inputs" } else { "" };
            return Err(LowerError::Run(format!(
                "input `{name}` has shape {shape:?}: {outs} outputs of {ins} inputs, expected some{what}"
            )));
        }
        Ok(Packing { values, from_in_out, paired, outs, ins })
    }

    fn panels(&self) -> usize {
        self.outs.div_ceil(PANEL)
    }

    /// Elements of one panel.
    fn panel_len(&self) -> usize {
        self.ins * PANEL
    }

    /// Elements of all the panels.
    fn len(&self) -> usize {
        self.panels() * self.panel_len()
    }

    /// The packed shape.
    fn shape(&self) -> Vec<usize> {
        if self.paired {
            vec![self.panels(), self.ins / 2, PANEL, 2]
        } else {
            vec![self.panels(), self.ins, PANEL]
        }
    }

    /// Writes panel `p` into `panel` (zeros: the last panel's outputs
    /// past the weight's stay so).
    fn fill(&self, p: usize, panel: &mut [f32]) {
        let (values, outs, ins, paired) = (self.values, self.outs, self.ins, self.paired);
        // Where input `k` of output `l` of a panel goes in it.
        let slot = |k: usize, l: usize| if paired { (k / 2 * PANEL + l) * 2 + k % 2 } else { k * PANEL + l };
        // The outputs of this panel the weight has.
        let real = PANEL.min(outs - p * PANEL);
        if self.from_in_out {
            // Row `k` of W holds input `k` of every output.
            for k in 0..ins {
                let row = &values[k * outs + p * PANEL..][..real];
                for (l, &v) in row.iter().enumerate() {
                    panel[slot(k, l)] = v;
                }
            }
        } else {
            // In blocks of 16 inputs, so each row of W is read a line at
            // a time.
            const BLOCK: usize = 16;
            for k0 in (0..ins).step_by(BLOCK) {
                for l in 0..real {
                    let row = &values[(p * PANEL + l) * ins..][..ins];
                    for k in k0..(k0 + BLOCK).min(ins) {
                        panel[slot(k, l)] = row[k];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::lower::emit::testing;

    /// Pairs for the bf16 dot product; none.
    const DOT: Pairing = Pairing { dot: true, amx: false };
    const NONE: Pairing = Pairing { dot: false, amx: false };

    #[test]
    fn packs_either_layout_into_panels() {
        // A whole number of panels, and a last one padded (100: 28 zero
        // outputs, 65: 63).
        for (outs, ins) in [(64, 1), (64, 17), (128, 40), (192, 4), (100, 6), (65, 3)] {
            let w = |o: usize, k: usize| (o * 1000 + k) as f32;
            let out_in: Vec<f32> = (0..outs * ins).map(|i| w(i / ins, i % ins)).collect();
            let in_out: Vec<f32> = (0..outs * ins).map(|i| w(i % outs, i / outs)).collect();
            for paired in [false, true].into_iter().filter(|&p| !p || ins % 2 == 0) {
                let a = pack(&[outs, ins], &out_in, (false, paired), "w").unwrap_or_else(|e| panic!("{e}"));
                let b = pack(&[ins, outs], &in_out, (true, paired), "w").unwrap_or_else(|e| panic!("{e}"));
                let what = format!("{outs} x {ins}, paired {paired}");
                assert_eq!(a, b, "{what}: both layouts give the same panels");
                let panels = outs.div_ceil(PANEL);
                if paired {
                    assert_eq!(a.shape, [panels, ins / 2, PANEL, 2]);
                } else {
                    assert_eq!(a.shape, [panels, ins, PANEL]);
                }
                assert_eq!(a.data.len(), panels * PANEL * ins, "{what}");
                for (i, &v) in a.data.iter().enumerate() {
                    let p = i / (ins * PANEL);
                    let (k, l) = if paired {
                        (i / (2 * PANEL) % (ins / 2) * 2 + i % 2, i / 2 % PANEL)
                    } else {
                        (i / PANEL % ins, i % PANEL)
                    };
                    let o = p * PANEL + l;
                    let want = if o < outs { w(o, k) } else { 0.0 };
                    assert_eq!(v, want, "{what}: element {i} is output {o}, input {k}");
                }
                // Packed straight into a storage dtype, the same panels
                // as packed in f32 and then stored (values that round in
                // bf16 and f16: 1000 o + k).
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let want = Stored::new(dtype, a.clone(), "w").unwrap_or_else(|e| panic!("{e}"));
                    for (shape, values, from_in_out) in [([outs, ins], &out_in, false), ([ins, outs], &in_out, true)] {
                        let got = pack_stored(dtype, &shape, values, (from_in_out, paired), "w")
                            .unwrap_or_else(|e| panic!("{e}"));
                        assert_eq!(got.shape, want.shape, "{what}, {dtype:?}");
                        let (g, w) = (got.to_tensor(), want.to_tensor());
                        let same = g.data.iter().zip(&w.data).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(
                            same && g.data.len() == w.data.len(),
                            "{what}, {dtype:?}, from [in, out] {from_in_out}"
                        );
                    }
                }
                for from_in_out in [false, true] {
                    let kept = Kept::Panels { from_in_out, paired, outs };
                    let given = kept.callers_shape(&a.shape);
                    assert_eq!(given, if from_in_out { [ins, outs] } else { [outs, ins] }, "{kept:?}");
                    assert_eq!(kept.stored_shape(&given), a.shape, "{kept:?}");
                }
            }
        }
        let err = |r: Result<Tensor, LowerError>| r.map(|_| ()).unwrap_err().to_string();
        let e = err(pack(&[0, 2], &[], (false, false), "w_up"));
        assert!(e.contains("`w_up`") && e.contains("0 outputs") && e.contains("expected some"), "{e}");
        let e = err(pack(&[64, 3], &[0.0; 192], (false, true), "w_up"));
        assert!(e.contains("an even number of inputs"), "{e}");
        assert!(padded_panels(64) && padded_panels(1000) && padded_panels(50257) && padded_panels(49280));
        assert!(!padded_panels(96) && !padded_panels(900) && !padded_panels(0), "a third, a fifteenth");
        assert!(err(pack(&[64, 2, 1], &[0.0; 128], (false, false), "w")).contains("expected a matrix"));
        assert!(err(pack(&[64, 2], &[0.0; 127], (false, false), "w")).contains("127 values"));
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

    /// Which weights go into panels (float, `out` a multiple of 64 (96 is
    /// a third short of 128, too far to pad), only
    /// ever `x @ Wᵀ`; a Conv1D weight once transposed), and the rewrite:
    /// each such matmul an einsum under a fresh id and a reshape that
    /// keeps the matmul's id, shape and uses (a graph output too).
    #[test]
    fn only_whole_panel_projections_are_rewritten() {
        let g = graph("");
        let (t, transposed) = super::super::layout::transpose_right_weights(&g);
        let mut kept: BTreeMap<String, Kept> = transposed.into_iter().map(|n| (n, Kept::Transposed)).collect();
        let p = panel_weights(&t, &mut kept, DOT);
        // No pairs: `x` is f32, also for the bf16 weight.
        let want = [
            ("w_conv", Kept::Panels { from_in_out: true, paired: false, outs: 128 }),
            ("w_half", Kept::Panels { from_in_out: false, paired: false, outs: 128 }),
            ("w_up", Kept::Panels { from_in_out: false, paired: false, outs: 128 }),
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
        panel_weights(&graph(slice), &mut kept, DOT);
        assert!(!kept.contains_key("w_up"), "{kept:?}");
    }

    /// A bf16 weight multiplied by a bf16 `x` goes into paired panels when
    /// asked: `x` reshaped into pairs under a fresh id, the einsum summing
    /// both letters, the same values as the matmul (against the
    /// interpreter, by kernels that know nothing of pairs); into plain
    /// panels when not.
    #[test]
    fn bf16_projections_pair_their_inputs() {
        let doc = r#"{"format": "bifurc-graph/1", "dims": {"runtime": ["b"], "constants": {"d": 32, "f": 128}},
            "inputs": [
              {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": "bf16"},
              {"name": "w", "role": "weight", "shape": ["f", "d"], "dtype": "bf16"}
            ],
            "nodes": [{"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}}],
            "outputs": [{"name": "y", "node": "y"}]}"#;
        let g = crate::import::parse(doc).unwrap_or_else(|e| panic!("{e}"));
        let c = |v: i64| Poly::constant(v);
        let mut kept = BTreeMap::new();
        let p = panel_weights(&g, &mut kept, DOT);
        assert_eq!(kept["w"], Kept::Panels { from_in_out: false, paired: true, outs: 128 });
        assert_eq!(p.shape_of(p.find("w").unwrap_or_else(|| panic!("w"))), &[c(2), c(16), c(64), c(2)]);
        let ids: Vec<&str> = p.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["y.pairs", "y.panels", "y"]);
        assert_eq!(p.nodes[0].shape, [Poly::symbol("b"), c(1), c(16), c(2)]);
        assert_eq!(p.nodes[0].op, Op::Reshape { shape: p.nodes[0].shape.clone() });
        let spec = EinsumSpec::parse("abzt,yzxt->abyx").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (p.nodes[1].op.clone(), p.nodes[1].inputs.clone()),
            (Op::Einsum(spec), vec![Value::Node(0), p.find("w").unwrap_or_else(|| panic!("w"))])
        );
        // The rewritten graph computes what the matmul did: run here by
        // the emulated GPU's kernels (no bf16 dot product, no layouts of
        // the step), the weight packed by hand.
        let emulation = crate::lower::emit::Emulation {
            lanes: 4,
            cooperative_min: 1,
            tuning: crate::lower::mma::Tuning::default(),
        };
        let step = crate::lower::CpuStep::compile_emulating_gpu(&p, emulation).unwrap_or_else(|e| panic!("{e}"));
        for b in [1, 5] {
            let at = testing::point(&[("b", b)]);
            let mut inputs = crate::interp::random_inputs(&g, &at, 9).unwrap_or_else(|e| panic!("{e}"));
            let want = crate::interp::run(&g, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let w = &inputs["w"];
            let packed = pack(&w.shape, &w.data, (false, true), "w").unwrap_or_else(|e| panic!("{e}"));
            inputs.insert("w".into(), packed);
            let got = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            for (x, y) in got["y"].data.iter().zip(&want["y"].data) {
                assert!((x - y).abs() <= 1e-2 * (1.0 + y.abs()), "b = {b}: {x} vs {y}");
            }
        }
        let mut kept = BTreeMap::new();
        let p = panel_weights(&g, &mut kept, NONE);
        assert_eq!(kept["w"], Kept::Panels { from_in_out: false, paired: false, outs: 128 });
        assert_eq!(p.nodes.len(), 2, "no pairs");
    }

    /// A tied embedding with a vocabulary not a multiple of 64 (250: the
    /// last panel padded with 6 zero outputs), f32 and bf16: kept in
    /// panels, the logits' einsum followed by a reshape to the padded
    /// width and a slice that keeps the matmul's id, the gather reading
    /// the panels back through a transpose, a reshape and a slice; both
    /// against the interpreter across tiles of rows, the weight bound in
    /// the caller's layout (its shape named when wrong).
    #[test]
    fn tied_embeddings_in_padded_panels_match_interpreter() {
        for (dtype, tol) in [("f32", 1e-4), ("bf16", 2e-2)] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": 32, "v": 250}},
                "inputs": [
                    {"name": "ids", "role": "token_ids", "shape": ["b", 1], "dtype": "i32"},
                    {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": dtype},
                    {"name": "wte", "role": "weight", "shape": ["v", "d"], "dtype": dtype}
                ],
                "nodes": [
                    {"id": "e", "op": "gather", "inputs": ["wte", "ids"]},
                    {"id": "h", "op": "add", "inputs": ["e", "x"]},
                    {"id": "logits", "op": "matmul", "inputs": ["h", "wte"], "attrs": {"transpose_b": true}},
                    {"id": "p", "op": "softmax", "inputs": ["logits"], "attrs": {"axis": 2}}
                ],
                "outputs": [{"name": "logits", "node": "logits"}, {"name": "p", "node": "p"}, {"name": "e", "node": "e"}]
            });
            let (graph, step, _) = testing::cpu_step(&doc);
            let paired = dtype == "bf16" && crate::lower::emit::host_has_bf16_dot();
            assert_eq!(step.kept.get("wte"), Some(&Kept::Panels { from_in_out: false, paired, outs: 250 }), "{dtype}");
            let g = step.graph();
            let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
            let mut want = vec!["e.table", "e.table_", "e.table__", "e", "h"];
            want.extend(if paired { &["logits.pairs"][..] } else { &[] });
            want.extend(["logits.panels", "logits.padded", "logits", "p"]);
            assert_eq!(ids, want, "{dtype}");
            let c = |v: i64| Poly::constant(v);
            let node = |id: &str| &g.nodes[ids.iter().position(|n| *n == id).unwrap_or_else(|| panic!("{id}"))];
            assert_eq!(node("e.table__").shape, [c(250), c(32)], "{dtype}: the table as the caller's");
            assert_eq!(node("logits.padded").shape, [Poly::symbol("b"), c(1), c(256)]);
            assert_eq!(node("logits").op, Op::Slice { axis: 2, start: Poly::zero(), end: c(250) });
            for b in [1, 3, 4, 5, 9] {
                let at = testing::point(&[("b", b)]);
                for out in ["logits", "p", "e"] {
                    testing::check_output(&graph, &step, &at, 3, out, (tol, tol));
                }
            }
            let at = testing::point(&[("b", 2)]);
            let mut inputs = crate::interp::random_inputs(&graph, &at, 5).unwrap_or_else(|e| panic!("{e}"));
            inputs.insert("wte".into(), Tensor { shape: vec![256, 32], data: vec![0.0; 256 * 32] });
            let err = step.run(&at, &inputs).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("`wte` has shape [256, 32]") && err.contains("expected [250, 32]"), "{err}");
        }
    }

    /// A llama MLP (`x @ W_upᵀ`, silu, `@ W_downᵀ`) and a GPT-2 Conv1D
    /// (`[in, out]`) by weights in panels, f32 and bf16 (in paired panels
    /// summed by `vdpbf16ps` where this CPU has it, and in plain ones): the
    /// output-vector tiles (no tree of shuffles), against the interpreter
    /// across tiles of rows; the weights bound in the caller's layout by
    /// every way in, and the caller's layout named when a shape is wrong.
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
            // The tiles' walk of panels: not a chunk of a half panel widened
            // at once for all of them (`emit::half_panels`).
            let (graph, paired, text) = crate::lower::emit::with_half_panels(false, || testing::cpu_step(&doc));
            // The other way of bf16 weights on this host: paired panels
            // summed by the bf16 dot product where it has one, plain ones
            // widened to f32.
            let pairs = dtype == "bf16" && crate::lower::emit::host_has_bf16_dot();
            let (plain, plain_text) = crate::lower::emit::with_half_panels(false, || {
                crate::lower::emit::with_narrow_tiles(false, || {
                    crate::lower::emit::with_bf16_dot(true, || {
                        let plain =
                            crate::lower::CpuStep::compile_pairing(&graph, NONE).unwrap_or_else(|e| panic!("{e}"));
                        let text = crate::lower::emit::emit(plain.graph(), plain.program(), crate::lower::Target::Cpu)
                            .unwrap_or_else(|e| panic!("{e}"));
                        (plain, text)
                    })
                })
            });
            // Plain bf16 panels are summed by it too, each step's pairs
            // interleaved from two of a panel's rows (`Kc::pair_rows`).
            let dot = "llvm.x86.avx512bf16.dpbf16ps.512";
            assert_eq!(text.contains(dot), pairs, "{dtype}: paired panels summed by vdpbf16ps:\n{text}");
            assert_eq!(plain_text.contains(dot), pairs, "{dtype}: plain panels:\n{plain_text}");
            let interleaved = plain_text.contains(": vector<16xbf16>, vector<16xbf16>");
            assert_eq!(interleaved, pairs, "{dtype}: rows interleaved:\n{plain_text}");
            for (step, text) in [(&paired, &text), (&plain, &plain_text)] {
                let kept: Vec<&str> = step.kept.keys().map(String::as_str).collect();
                // w_conv is `[in, out]`: an f32 one is transposed, then packed.
                assert_eq!(kept, ["w_conv", "w_down", "w_up"], "{dtype}");
                // A tree's lane sums end in extracts or reductions.
                let trees = text.contains("vector.extract") || text.contains("vector.reduction");
                assert!(!trees, "{dtype}: no tree of lane sums:\n{text}");
                // Pairs interleaved from rows take two loops a tile: the
                // pairs, then an odd length's last element; rows widened
                // a stretch at a time (bf16 without the dot product) the
                // stretch's and its steps' (`emit::widened_rows`).
                let interleaved = text.contains(": vector<16xbf16>, vector<16xbf16>");
                let loops = if interleaved || (dtype == "bf16" && !pairs) { 2 } else { 1 };
                let out_vec_tile = format!("-> ({}) {{", vec!["vector<16xf32>"; 16].join(", "));
                let tiles = text.matches(&out_vec_tile).count();
                assert_eq!(tiles, 3 * loops, "{dtype}: a 4 x 4 output-vector tile each:\n{text}");
                for b in [1, 3, 4, 5, 9] {
                    let at = testing::point(&[("b", b)]);
                    for out in ["conv", "up"] {
                        testing::check_output(&graph, step, &at, 5, out, (tol, tol));
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
                let pairs = step.kept.get("w_conv").is_some_and(|k| matches!(k, Kept::Panels { paired: true, .. }));
                let want: &[usize] = if pairs { &[2, 32, 64, 2] } else { &[2, 64, 64] };
                assert_eq!(zeros.shape, want, "{dtype}: kept as panels");
            }
        }
    }
}
