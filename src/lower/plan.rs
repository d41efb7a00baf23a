//! Planning: which nodes become kernels, which values get buffers, and in
//! what order the kernels run.
//!
//! - **View** nodes (broadcast, reshape, transpose, slice, concat) get no
//!   kernel and no buffer: a kernel reads through them (see
//!   [`crate::lower::emit`](mod@crate::lower::emit)).
//! - **Inlined** nodes: an elementwise node (unary, add/sub/mul/div, scale,
//!   constant, causal_mask) that is not a graph output and whose only
//!   consumer — counting through views, over live nodes and output copies —
//!   is one other kernel that is not a contraction (einsum, matmul re-read
//!   each operand element many times) is recomputed inside that kernel's loads.
//! - Every other live compute node is one kernel writing one buffer: the
//!   output buffer when the node is a graph output, else an intermediate.
//!   Its extent (threads, or CPU loop iterations) is the buffer's element
//!   count, except for a row kernel (softmax, rms_norm, layer_norm): one
//!   per row, which computes the row's statistics once and writes the row
//!   (on the GPU a block of threads per row: [`Kernel::gpu_threads`]). On
//!   the GPU a bf16 / f16 contraction may instead run on tensor cores, by
//!   output tiles ([`Kernel::mma`], [`crate::lower::mma`]).
//! - The CPU's plan ([`plan_cpu`]) writes a softmax over its input's
//!   parts where only it reads them and only slices over them read it
//!   ([`InPlace`]): it then has no buffer of its own.
//! - Graph inputs and outputs always have buffers. An output whose value is
//!   a graph input, a view, or a node already written to another output gets
//!   a `copy` kernel.
//!
//! Buffers are numbered: graph inputs (graph order), then outputs (graph
//! order), then intermediates (node order). Kernels run in node
//! (topological) order, copy kernels last.

use std::collections::{BTreeMap, BTreeSet};

use crate::ir::{shape::numel, DType, Graph, Op, OutputRole, Poly, Role, Value};

use super::mma::{mma_form, Mma, Tuning};
use super::LowerError;

/// What a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BufferKind {
    /// A graph input, bound by the caller.
    Input(Role),
    /// A value only kernels of this program read.
    Intermediate,
    /// A graph output, read back by the caller.
    Output(OutputRole),
}

/// One contiguous, row-major array in device (or host) memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// Graph input name, node id (intermediates), or output name.
    pub name: String,
    pub kind: BufferKind,
    /// Symbolic shape, over runtime dims only (constants substituted).
    pub shape: Vec<Poly>,
    /// Storage element type.
    pub dtype: DType,
    /// Set for a decode cache stored with room for more rows (see [`Pitch`]).
    pub pitch: Option<Pitch>,
}

/// A buffer stored with spare rows: axis `axis`, whose size is the runtime
/// dim `dim`, is laid out with a stride of `capacity(dim)` rows instead of
/// `dim` rows, so a runtime can append a row without moving the others.
/// Kernels reading such a buffer take the capacity as a parameter
/// ([`Param::Capacity`]); a caller passing dense data passes the dim's own
/// value.
///
/// Every KV cache input (`decode_kv`, `context_kv`) whose second-to-last
/// axis is a runtime dim alone (`[b, g, m_d, k]`, `[g, m_c, k]`) gets one:
/// its rows axis. (A prefill step appends each chunk's rows to its context
/// cache in place.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pitch {
    pub axis: usize,
    pub dim: String,
}

/// One kernel parameter, in ABI order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// A runtime dim, passed as `i64`.
    Dim(String),
    /// The row capacity of the buffers pitched along runtime dim `0` (see
    /// [`Pitch`]), passed as `i64`, `>=` the dim.
    Capacity(String),
    /// A buffer (index into [`Program::buffers`]), passed as `!llvm.ptr`.
    Buffer(usize),
}

/// One kernel: one thread (loop iteration) per element of the buffer it
/// writes, or, for a row kernel (softmax, rms_norm, layer_norm), one per
/// row.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// `k{index}_{sanitized node id}` (copy kernels: the output name).
    pub name: String,
    /// The graph node it computes; for a copy kernel, the input or node id
    /// whose value is copied.
    pub node: String,
    /// The node's op name (`matmul`, `rms_norm`, …), or `copy`.
    pub op: String,
    /// Buffers read, ascending.
    pub reads: Vec<usize>,
    /// The buffer written; for a softmax planned in place (see
    /// [`InPlace`]), the first of the buffers it writes over, all of
    /// which it also reads.
    pub writes: usize,
    /// Number of threads (runtime dims only): elements of the written
    /// buffer, or for a row kernel its rows (elements / row length). A
    /// tensor-core kernel's GPU launch is by tiles instead
    /// ([`Mma::tiles`]); its extent stays the element count (the CPU's).
    pub extent: Poly,
    /// On the GPU, one block per item of `extent` whose threads share the
    /// item's reductions: a row kernel (softmax, rms_norm, layer_norm; the
    /// items are rows) or a contraction with a long reduction along the
    /// operands' innermost axis (see `cooperative_contraction`; the items
    /// are the indices of its non-reuse axes, `reuse_axes`, each item
    /// computing the outputs along the reuse axes in turn). See
    /// [`Kernel::gpu_threads`].
    pub cooperative: bool,
    /// A cooperative contraction whose items are warps (32 threads, eight
    /// to a block) instead of blocks: a reduction of at least
    /// `WARP_COOPERATIVE_MIN` and under `COOPERATIVE_MIN`.
    pub warp: bool,
    /// On the GPU, a tensor-core contraction: one block per 16 × 8 output
    /// tile (see [`crate::lower::mma`]; `cooperative` is then false).
    pub mma: Option<Mma>,
    /// Every runtime dim (graph order), then the capacity of every pitched
    /// buffer's dim among `reads` (graph order of the dims), then `reads`,
    /// then `writes` unless it is one of `reads` (each buffer passed once).
    pub params: Vec<Param>,
}

impl Kernel {
    /// Threads of the GPU launch with blocks of `block`: one per element
    /// (`extent`), or for a cooperative kernel one block per item
    /// (`extent * block`) or one warp (`extent * 32`). An error for a
    /// tensor-core kernel, whose launch is not a polynomial
    /// ([`Mma::tiles`]).
    pub fn gpu_threads(&self, block: i64) -> Result<Poly, LowerError> {
        if self.mma.is_some() {
            return Err(LowerError::Size {
                what: format!("threads of `{}`", self.name),
                message: "a tensor-core kernel launches by tiles (Mma::tiles)".into(),
            });
        }
        if !self.cooperative {
            return Ok(self.extent.clone());
        }
        self.extent
            .mul(&Poly::constant(if self.warp { 32 } else { block }))
            .map_err(|e| LowerError::Size { what: format!("threads of `{}`", self.name), message: e.to_string() })
    }
}

/// A graph planned into buffers and kernels.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// Runtime dims, in graph order: the first kernel parameters.
    pub dims: Vec<String>,
    pub buffers: Vec<Buffer>,
    /// In launch order.
    pub kernels: Vec<Kernel>,
    /// Softmaxes written over their input's parts: only in a CPU plan
    /// ([`plan_cpu`]).
    pub in_place: Vec<InPlace>,
}

impl Program {
    /// How softmax node `node` is written over its input's parts, when it
    /// is planned in place.
    pub fn in_place_of(&self, node: &str) -> Option<&InPlace> {
        self.in_place.iter().find(|p| p.node == node)
    }

    /// The fused context attentions (the CPU's: [`FusedPlan`]).
    pub fn fused(&self) -> impl Iterator<Item = &FusedPlan> {
        self.in_place.iter().filter_map(|p| p.fused.as_ref())
    }

    /// The fused context attention whose kernel is `kernel` (the one that
    /// writes its partials), if it is one.
    pub fn fused_of(&self, kernel: &Kernel) -> Option<&FusedPlan> {
        let fused = kernel.op == super::fused_attention::FUSED_OP;
        self.fused().find(|f| fused && f.partials == kernel.writes)
    }
}

/// A softmax whose output has no buffer of its own (see
/// `lower::in_place`): its input is a concat along its axis (through
/// inlined elementwise nodes, and reshapes that regroup the axes before
/// the row) of parts that only it reads, and its output is read only by
/// slices over those parts. Its kernel writes part `p` of each row over
/// the buffer of the concat's part `p`, at the element's row-major
/// offset in the softmax's shape with the row cut to the part's length,
/// and the slices over part `p` read that buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct InPlace {
    /// The softmax node.
    pub node: String,
    /// The concat's parts, in order.
    pub parts: Vec<InPlacePart>,
    /// With its context attention fused (the CPU's): the softmax then
    /// merges the fused kernel's partials with the other parts.
    pub fused: Option<FusedPlan>,
}

/// The context attention of an [`InPlace`] softmax fused into one kernel
/// (see `lower::fused_attention`): the first part's buffer is then the
/// fused kernel's partials, `[items, rows…, head + 2]` f32 (per row and
/// item the unnormalized outputs, their max, their sum), and the softmax
/// writes the context output into `context`, the buffer of the `w·V`
/// node `values`, which has no kernel of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedPlan {
    pub partials: usize,
    pub context: usize,
    pub values: String,
    /// The most items a head (the partials' first axis); a run takes
    /// fewer at short contexts (`lower::fused_attention::ITEM_POSITIONS`).
    pub items: i64,
    /// The query rows that share a KV head (the scores' rows but the KV
    /// head's axis): the CPU step runs the fused plan where they are at
    /// least [`FUSED_MIN_ROWS`](crate::lower::FUSED_MIN_ROWS).
    pub rows_per_head: Poly,
    /// The fewest rows a KV head the plan is run with (the step's choice:
    /// `WIDE_TILE_ROWS` or `FUSED_MIN_ROWS` where it picks by the rows, 0
    /// where the plan runs at every point). From `WIDE_TILE_ROWS` (9) the
    /// kernel has its tiles of 16 lanes only (its narrower ones are for
    /// fewer rows; the 16 lanes give the same values there, more slowly).
    pub min_rows: i64,
    /// The most rows a KV head the plan is run with, where the step has
    /// another fused plan for more (`None`: no most). Up to 8 the kernel
    /// has its tiles of 8 lanes only (one width to JIT-compile, not
    /// three).
    pub max_rows: Option<i64>,
    /// The product of the scales between the scores and the softmax.
    pub scale: f64,
}

/// One part of an [`InPlace`] softmax's row.
#[derive(Clone, Debug, PartialEq)]
pub struct InPlacePart {
    /// The buffer of the concat's part, overwritten with the softmax's.
    pub buffer: usize,
    /// Where the part starts along the softmax's axis, and its length
    /// there.
    pub start: Poly,
    pub len: Poly,
    /// The slice nodes that read it.
    pub slices: Vec<String>,
}

/// How a node is realized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeKind {
    /// Not needed by any output.
    Dead,
    /// Read through by index maps.
    View,
    /// Recomputed inside its single consumer.
    Inlined,
    /// Its own kernel and buffer.
    Kernel,
}

/// Ops that may be inlined into their consumer.
pub(crate) fn is_elementwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Scale { .. } | Op::Constant { .. } | Op::CausalMask { .. })
}

/// The axis along which a row kernel computes per-row statistics once
/// (softmax: its axis; rms_norm / layer_norm: the last), for a node of `op`
/// with output rank `rank`; `None` for every other op. Such a kernel runs
/// one thread (loop iteration) per row and writes the whole row.
pub(crate) fn row_axis(op: &Op, rank: usize) -> Option<usize> {
    match *op {
        Op::Softmax { axis } if axis < rank => Some(axis),
        Op::RmsNorm { .. } | Op::LayerNorm { .. } => rank.checked_sub(1),
        _ => None,
    }
}

/// The summed letters of einsum `spec` over `inputs` whose size is 1
/// (multi-query attention's one KV head, `abxy,czy->abxz`): a lowering
/// reads them at index 0 (`Kc::reduced`, `Kc::operand_index`,
/// [`mma_form`]).
pub(crate) fn unit_sums(graph: &Graph, spec: &crate::ir::EinsumSpec, inputs: &[Value]) -> Vec<char> {
    let mut unit = Vec::new();
    for (subs, v) in spec.inputs.iter().zip(inputs) {
        for (c, d) in subs.iter().zip(graph.shape_of(*v)) {
            if !spec.output.contains(c) && is_one(graph, d) && !unit.contains(c) {
                unit.push(*c);
            }
        }
    }
    unit
}

/// For each operand of contraction node `j` (einsum, matmul): the value and,
/// per output axis, whether the operand indexes it (a matmul operand's
/// broadcast size-1 batch axis does not). `None` for any other node.
pub(crate) fn coverage(graph: &Graph, j: usize) -> Option<Vec<(Value, Vec<bool>)>> {
    let node = graph.nodes.get(j)?;
    let rank = node.shape.len();
    let covered: Vec<(Value, Vec<bool>)> = match &node.op {
        Op::Einsum(spec) if spec.output.len() == rank && spec.inputs.len() == node.inputs.len() => spec
            .inputs
            .iter()
            .zip(&node.inputs)
            .map(|(subs, v)| (*v, spec.output.iter().map(|c| subs.contains(c)).collect()))
            .collect(),
        Op::MatMul { .. } if rank >= 2 && node.inputs.len() == 2 => node
            .inputs
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let shape = graph.shape_of(*v);
                let rb = shape.len().saturating_sub(2);
                let lead = (rank - 2).saturating_sub(rb);
                let cov = (0..rank)
                    .map(|a| {
                        if a >= rank - 2 {
                            a == rank - 2 + k
                        } else {
                            a >= lead && a - lead < rb && !is_one(graph, &shape[a - lead])
                        }
                    })
                    .collect();
                (*v, cov)
            })
            .collect(),
        _ => return None,
    };
    Some(covered)
}

/// Runtime dims at which contraction operands are compared (others: 64).
const TYPICAL: &[(&str, i64)] = &[("b", 32), ("m_c", 8192), ("m_d", 256)];
const TYPICAL_OTHER: i64 = 64;

/// Every runtime dim at its [`TYPICAL`] value.
pub(crate) fn typical_point(graph: &Graph) -> BTreeMap<String, i64> {
    graph
        .dims
        .runtime
        .iter()
        .map(|d| {
            let v = TYPICAL.iter().find(|(n, _)| n == d).map_or(TYPICAL_OTHER, |(_, v)| *v);
            (d.clone(), v)
        })
        .collect()
}

/// The output axes (of size other than 1) of contraction node `j` that its
/// largest operand does not index — its *reuse* axes: the outputs along
/// them read the same slice of that operand (for `x · Wᵀ` the samples, for
/// the context einsums of bifurcated attention `b, p, n`). "Largest" is by
/// elements at a typical point ([`TYPICAL`]), unless streaming another
/// operand reads at most half as many elements (see the comment inside).
/// `None` for a node that is not an einsum or matmul.
pub(crate) fn reuse_axes(graph: &Graph, j: usize) -> Option<Vec<usize>> {
    reuse_axes_for(graph, j, false)
}

/// [`reuse_axes`], or with `keep_last` (the CPU's walk) the reuse axes of
/// streaming an operand that indexes the output's last axis instead, when
/// the chosen one does not and that one moves at most twice the elements:
/// the CPU vectorizes a contraction along its output's last axis (the
/// head dim of `w·V`), which a reuse axis is not. (Grouped-query
/// attention's context `w·V` with a 16-wide head otherwise streamed the
/// probabilities, tiled the head dim, and ran scalar: 5x slower than the
/// baseline's.)
pub(crate) fn reuse_axes_for(graph: &Graph, j: usize, keep_last: bool) -> Option<Vec<usize>> {
    let node = graph.nodes.get(j)?;
    let rank = node.shape.len();
    let covered = coverage(graph, j)?;
    let point = typical_point(graph);
    let elements = |v: Value| -> i64 {
        numel(&graph.dims, graph.shape_of(v)).ok().and_then(|p| graph.dims.eval(&p, &point).ok()).unwrap_or(0)
    };
    let size = |a: usize| graph.dims.eval(&node.shape[a], &point).unwrap_or(1).max(1);
    // Element reads if operand `x` is streamed: it is read once; the output
    // walks its axes (keep) outside, so another operand is re-read once per
    // index of the kept axes it lacks (the innermost kept axis in blocks of
    // `BLOCK_REUSE`), unless it is small enough to stay in cache. (The
    // largest operand alone would stream the probabilities, not V, in the
    // w·V einsum of grouped-query attention, whose V is p times smaller:
    // V would be re-read per sample.)
    let traffic = |x: usize| -> i64 {
        let cov = &covered[x].1;
        let keep: Vec<usize> = (0..rank).filter(|&a| cov[a] && !is_one(graph, &node.shape[a])).collect();
        let mut total = elements(covered[x].0);
        for (y, (v, cov_y)) in covered.iter().enumerate() {
            if y == x || covered[..y].iter().any(|(w, _)| w == v) {
                continue;
            }
            let n = elements(*v);
            let mut reads = n;
            if n.saturating_mul(4) > CACHED_BYTES {
                for (i, &a) in keep.iter().enumerate() {
                    if !cov_y[a] {
                        let s = size(a);
                        let s = if i + 1 == keep.len() { super::ceil_div(s, BLOCK_REUSE) } else { s };
                        reads = reads.saturating_mul(s);
                    }
                }
            }
            total = total.saturating_add(reads);
        }
        total
    };
    // The largest operand (the first on ties), unless another one reads at
    // most half as many elements (the estimate is rough: a broadcast view
    // counts as all its elements, so only a clear win overrides size).
    let mut largest: Option<(i64, usize)> = None;
    for (x, (v, _)) in covered.iter().enumerate() {
        let n = elements(*v);
        if largest.is_none_or(|(m, _)| n > m) {
            largest = Some((n, x));
        }
    }
    let (_, largest) = largest?;
    let base = traffic(largest);
    let (mut x, mut best) = (largest, base);
    for y in 0..covered.len() {
        let t = traffic(y);
        if t.saturating_mul(2) <= base && t < best {
            (x, best) = (y, t);
        }
    }
    let last = rank.checked_sub(1).filter(|&a| !is_one(graph, &node.shape[a]));
    if let Some(a) = last.filter(|&a| keep_last && !covered[x].1[a]) {
        let indexing = (0..covered.len()).filter(|&y| covered[y].1[a]).map(|y| (traffic(y), y));
        if let Some((_, y)) = indexing.filter(|&(t, _)| t <= best.saturating_mul(2)).min() {
            x = y;
        }
    }
    let cov = &covered[x].1;
    Some((0..rank).filter(|&a| !cov[a] && !is_one(graph, &node.shape[a])).collect())
}

/// Bytes of an operand that re-reads serve from cache (about an L2).
const CACHED_BYTES: i64 = 1 << 20;

/// Elements of the innermost kept axis walked together (the CPU's output
/// block), for the traffic estimate of [`reuse_axes`].
const BLOCK_REUSE: i64 = 16;

fn is_one(graph: &Graph, p: &Poly) -> bool {
    graph.dims.same(p, &Poly::constant(1))
}

/// The op of the kernel that adds a split reduction's partial sums (see
/// [`Mma::k_splits`]): `out[i] = Σ_s partials[s, i]`, in order of `s`.
pub const COMBINE_OP: &str = "combine";

/// Suffix of the workspace buffer of a split reduction's partial sums,
/// after the node id.
pub const PARTIALS_SUFFIX: &str = ".partials";

/// Reduction length from which a GPU contraction gets a block per output
/// element (see [`cooperative_contraction`]).
pub(crate) const COOPERATIVE_MIN: i64 = 1024;

/// Reduction length from which a GPU contraction shorter than
/// [`COOPERATIVE_MIN`] gets a warp per output element (the head dim of
/// attention's `q·Kᵀ` over a per-sample cache: a warp reads a cache row in
/// one coalesced pass instead of 32 threads each walking their own row).
pub(crate) const WARP_COOPERATIVE_MIN: i64 = 32;

/// Whether contraction node `j` sums one letter, of constant length at
/// least `min` ([`COOPERATIVE_MIN`] on the GPU), that is the innermost axis of every operand
/// indexing it: the projections `x · Wᵀ` of a decode step (`W [n, d]`, sum
/// over `d`). On the GPU such a kernel runs one block per output element
/// whose threads split the sum — adjacent threads read adjacent weights —
/// instead of one thread walking all of `d`; from [`WARP_COOPERATIVE_MIN`]
/// to [`COOPERATIVE_MIN`] (the head dim of `q·Kᵀ` over a per-sample cache)
/// one warp per element. A reduction over a runtime dim (`m_c`) keeps one
/// thread per element.
pub(crate) fn cooperative_contraction(graph: &Graph, j: usize, min: i64) -> bool {
    let Some(node) = graph.nodes.get(j) else { return false };
    let long = |p: &Poly| graph.dims.normalize(p).ok().and_then(|p| p.as_constant()).is_some_and(|n| n >= min);
    match (&node.op, node.inputs.as_slice()) {
        (Op::MatMul { transpose_b: true }, [a, _]) => graph.shape_of(*a).last().is_some_and(long),
        (Op::Einsum(spec), inputs) if spec.inputs.len() == inputs.len() => {
            let mut reduced: Vec<char> =
                spec.inputs.iter().flatten().copied().filter(|c| !spec.output.contains(c)).collect();
            reduced.sort_unstable();
            reduced.dedup();
            let [c] = reduced.as_slice() else { return false };
            spec.inputs.iter().zip(inputs).all(|(subs, v)| match subs.iter().position(|s| s == c) {
                None => true,
                Some(at) => at + 1 == subs.len() && graph.shape_of(*v).get(at).is_some_and(long),
            })
        }
        _ => false,
    }
}

/// `[A-Za-z0-9_]` only: every other character becomes `_`.
pub fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

/// Classifies every node (see the module doc).
pub(crate) fn classify(graph: &Graph) -> Vec<NodeKind> {
    let n = graph.nodes.len();
    let mut live = vec![false; n];
    for o in &graph.outputs {
        if let Value::Node(j) = o.value {
            if j < n {
                live[j] = true;
            }
        }
    }
    for j in (0..n).rev() {
        if live[j] {
            for v in &graph.nodes[j].inputs {
                if let Value::Node(p) = *v {
                    if p < n {
                        live[p] = true;
                    }
                }
            }
        }
    }
    // Consumers of each node through views: compute nodes by index, output
    // copies as `n + output index`.
    let mut consumers: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    let mut is_output = vec![false; n];
    for j in (0..n).rev() {
        if !live[j] {
            continue;
        }
        let node = &graph.nodes[j];
        // What reading this node means to its producers: itself if it is a
        // compute node, else the consumers of the view.
        let mine: BTreeSet<usize> = if node.op.is_view() { consumers[j].clone() } else { BTreeSet::from([j]) };
        for v in &node.inputs {
            if let Value::Node(p) = *v {
                if p < n {
                    consumers[p].extend(mine.iter().copied());
                }
            }
        }
    }
    for (k, o) in graph.outputs.iter().enumerate() {
        if let Value::Node(j) = o.value {
            if j < n {
                is_output[j] = true;
                // An output that is a view: its copy kernel consumes through it.
                if graph.nodes[j].op.is_view() {
                    propagate_copy(graph, j, n + k, &mut consumers);
                }
            }
        }
    }
    (0..n)
        .map(|j| {
            let op = &graph.nodes[j].op;
            if !live[j] {
                NodeKind::Dead
            } else if op.is_view() {
                NodeKind::View
            } else if is_elementwise(op)
                && !is_output[j]
                && consumers[j].len() == 1
                && reads_few_times(graph, &consumers[j])
            {
                NodeKind::Inlined
            } else {
                NodeKind::Kernel
            }
        })
        .collect()
}

/// True unless the one consumer is a contraction (einsum, matmul): those read
/// each operand element once per element of the other operand's free axes, so
/// an inlined producer would be recomputed that many times.
fn reads_few_times(graph: &Graph, consumers: &BTreeSet<usize>) -> bool {
    consumers.iter().all(|&c| match graph.nodes.get(c) {
        Some(node) => !matches!(node.op, Op::Einsum(_) | Op::MatMul { .. }),
        None => true, // an output copy
    })
}

/// Adds copy consumer `who` to every compute node a view output reads.
fn propagate_copy(graph: &Graph, view: usize, who: usize, consumers: &mut [BTreeSet<usize>]) {
    let mut stack = vec![view];
    while let Some(j) = stack.pop() {
        for v in &graph.nodes[j].inputs {
            if let Value::Node(p) = *v {
                if p < graph.nodes.len() {
                    consumers[p].insert(who);
                    if graph.nodes[p].op.is_view() {
                        stack.push(p);
                    }
                }
            }
        }
    }
}

pub(crate) fn shape_of(graph: &Graph, shape: &[Poly], what: &str) -> Result<Vec<Poly>, LowerError> {
    shape
        .iter()
        .map(|p| {
            graph.dims.normalize(p).map_err(|e| LowerError::Size { what: what.to_owned(), message: e.to_string() })
        })
        .collect()
}

/// Plans `graph` (see the module doc), with tensor-core contractions where
/// they apply at the typical point (`typical_point`). Deterministic.
pub fn plan(graph: &Graph) -> Result<Program, LowerError> {
    plan_with(graph, Some(&typical_point(graph)))
}

/// [`plan`], choosing tensor-core contractions at `tensor_cores` (a value
/// for every runtime dim: the compile point), or none (`None`: every
/// contraction runs on CUDA cores).
pub fn plan_with(graph: &Graph, tensor_cores: Option<&BTreeMap<String, i64>>) -> Result<Program, LowerError> {
    plan_tuned(graph, tensor_cores.map(|point| (point, Tuning::default())))
}

/// [`plan_with`], the tensor-core choices made with `tuning` (see
/// [`Tuning`]).
pub fn plan_tuned(
    graph: &Graph,
    tensor_cores: Option<(&BTreeMap<String, i64>, Tuning)>,
) -> Result<Program, LowerError> {
    plan_inner(graph, tensor_cores, false, None)
}

/// The first plan of the CPU step ([`plans_cpu`]): [`plan_with`] without
/// tensor cores, and every softmax that can be written over its input's
/// parts planned so ([`InPlace`]; the GPU's plan keeps a buffer for
/// each); its context attention fused ([`FusedPlan`]) only where
/// [`FUSED_ATTENTION_ENV`](crate::lower::FUSED_ATTENTION_ENV) says `on`.
pub fn plan_cpu(graph: &Graph) -> Result<Program, LowerError> {
    let on = super::fused_attention::fused_choice()? == Some(true);
    plan_cpu_fusing(graph, on.then_some(0))
}

/// The CPU step's plans, as
/// [`FUSED_ATTENTION_ENV`](crate::lower::FUSED_ATTENTION_ENV) says (an
/// error for a value it does not know): `auto` (the default), the plan
/// without fusion, then, where a context attention fuses
/// ([`FusedPlan`]), the plans with it, one run from `WIDE_TILE_ROWS` (9)
/// rows a KV head (tiles of 16 lanes alone), one from
/// [`FUSED_MIN_ROWS`](crate::lower::FUSED_MIN_ROWS) to 8 (tiles of 8
/// lanes alone; the step runs the one its rows fall in:
/// [`FusedPlan::rows_per_head`]); `off`, the first alone; `on`, the fused
/// alone, at every point.
pub fn plans_cpu(graph: &Graph) -> Result<Vec<Program>, LowerError> {
    use super::fused_attention::{FUSED_MIN_ROWS, WIDE_TILE_ROWS};
    let first = plan_cpu(graph)?;
    if super::fused_attention::fused_choice()?.is_some() {
        return Ok(vec![first]);
    }
    let wide = plan_cpu_fusing(graph, Some(WIDE_TILE_ROWS))?;
    if wide.fused().next().is_none() {
        return Ok(vec![first]);
    }
    let narrow = plan_cpu_fusing_between(graph, FUSED_MIN_ROWS, WIDE_TILE_ROWS - 1)?;
    Ok(vec![first, wide, narrow])
}

/// [`plan_cpu`] with the context attention fused where it qualifies
/// (`lower::fused_attention`), run from `fuse` rows a KV head
/// ([`FusedPlan::min_rows`]), or not (`None`), whatever the environment
/// says; a bf16 attention only when run at every point (`Some(0)`).
pub(crate) fn plan_cpu_fusing(graph: &Graph, fuse: Option<i64>) -> Result<Program, LowerError> {
    plan_inner(graph, None, true, fuse.map(|min| (min, None)))
}

/// [`plan_cpu_fusing`] run from `min` to `max` rows a KV head
/// ([`FusedPlan::max_rows`]).
pub(crate) fn plan_cpu_fusing_between(graph: &Graph, min: i64, max: i64) -> Result<Program, LowerError> {
    plan_inner(graph, None, true, Some((min, Some(max))))
}

fn plan_inner(
    graph: &Graph,
    tensor_cores: Option<(&BTreeMap<String, i64>, Tuning)>,
    in_place: bool,
    fuse: Option<(i64, Option<i64>)>,
) -> Result<Program, LowerError> {
    let kinds = classify(graph);
    let found = if in_place { super::in_place::find(graph, &kinds) } else { Vec::new() };
    // bf16 attentions only in a plan fused at every point (`on`: see
    // `lower::fused_attention`).
    let fusions = match fuse {
        Some((min_rows, _)) => super::fused_attention::find(graph, &kinds, &found, min_rows == 0),
        None => Vec::new(),
    };
    let mut buffers = Vec::new();
    for inp in &graph.inputs {
        let shape = shape_of(graph, &inp.shape, &format!("input `{}`", inp.name))?;
        let pitch = pitch_of(graph, inp.role, &shape);
        buffers.push(Buffer {
            name: inp.name.clone(),
            kind: BufferKind::Input(inp.role),
            shape,
            dtype: inp.dtype,
            pitch,
        });
    }
    // Which buffer holds each node's value, and which outputs need a copy.
    let mut node_buf: Vec<Option<usize>> = vec![None; graph.nodes.len()];
    let mut copies: Vec<(usize, Value)> = Vec::new();
    for o in &graph.outputs {
        let shape = shape_of(graph, graph.shape_of(o.value), &format!("output `{}`", o.name))?;
        let b = buffers.len();
        buffers.push(Buffer {
            name: o.name.clone(),
            kind: BufferKind::Output(o.role),
            shape,
            dtype: graph.dtype_of(o.value),
            pitch: None,
        });
        match o.value {
            Value::Node(j) if kinds.get(j) == Some(&NodeKind::Kernel) && node_buf[j].is_none() => {
                node_buf[j] = Some(b);
            }
            v => copies.push((b, v)),
        }
    }
    for (j, node) in graph.nodes.iter().enumerate() {
        let fused_away = fusions.iter().any(|f| f.scores == j);
        if kinds[j] == NodeKind::Kernel && node_buf[j].is_none() && !found.iter().any(|f| f.softmax == j) && !fused_away
        {
            let shape = shape_of(graph, &node.shape, &format!("node `{}`", node.id))?;
            node_buf[j] = Some(buffers.len());
            buffers.push(Buffer {
                name: node.id.clone(),
                kind: BufferKind::Intermediate,
                shape,
                dtype: node.dtype,
                pitch: None,
            });
        }
    }
    // A fused context attention's partials stand for its scores.
    for f in &fusions {
        let scores = &graph.nodes[f.scores];
        let shape = super::fused_attention::partials_shape(graph, f);
        let shape = shape_of(graph, &shape, &format!("the partials of `{}`", scores.id))?;
        node_buf[f.scores] = Some(buffers.len());
        buffers.push(Buffer {
            name: format!("{}{}", scores.id, super::fused_attention::FUSED_SUFFIX),
            kind: BufferKind::Intermediate,
            shape,
            dtype: DType::F32,
            pitch: None,
        });
    }
    // The slices of a softmax planned in place read its parts' buffers.
    let mut in_place = Vec::with_capacity(found.len());
    for f in &found {
        let mut parts = Vec::with_capacity(f.parts.len());
        for part in &f.parts {
            let p = part.node;
            let buffer = node_buf[p].ok_or_else(|| LowerError::Unsupported {
                node: graph.nodes[p].id.clone(),
                message: "a part of an in-place softmax has no buffer".into(),
            })?;
            for &s in &part.slices {
                node_buf[s] = Some(buffer);
            }
            let slices = part.slices.iter().map(|&s| graph.nodes[s].id.clone()).collect();
            let what = format!("the row of `{}` in `{}`", graph.nodes[p].id, graph.nodes[f.softmax].id);
            let normalize = |x: &Poly| {
                graph.dims.normalize(x).map_err(|e| LowerError::Size { what: what.clone(), message: e.to_string() })
            };
            let (start, len) = (normalize(&part.start)?, normalize(&part.len)?);
            parts.push(InPlacePart { buffer, start, len, slices });
        }
        let fused = match fusions.iter().find(|x| x.softmax == f.softmax) {
            Some(x) => {
                let missing = |what: &str| LowerError::Unsupported {
                    node: graph.nodes[f.softmax].id.clone(),
                    message: format!("a fused context attention without {what}"),
                };
                Some(FusedPlan {
                    partials: node_buf[x.scores].ok_or_else(|| missing("partials"))?,
                    context: node_buf[x.values].ok_or_else(|| missing("a context buffer"))?,
                    values: graph.nodes[x.values].id.clone(),
                    items: super::fused_attention::ITEMS,
                    rows_per_head: x.rows_per_head.clone(),
                    min_rows: fuse.map_or(0, |(min, _)| min),
                    max_rows: fuse.and_then(|(_, max)| max),
                    scale: x.scale,
                })
            }
            None => None,
        };
        in_place.push(InPlace { node: graph.nodes[f.softmax].id.clone(), parts, fused });
    }
    let copies: Vec<(usize, Value, String)> =
        copies.into_iter().map(|(b, v)| (b, v, buffers[b].name.clone())).collect();
    let mut kernels = Vec::new();
    let mut add = |name: &str,
                   node: &str,
                   op: &str,
                   inputs: &[Value],
                   writes: usize,
                   row: Option<usize>,
                   node_index: Option<usize>,
                   shape: Option<Vec<Poly>>|
     -> Result<(), LowerError> {
        let mut reads = BTreeSet::new();
        for v in inputs {
            collect_reads(graph, &kinds, &node_buf, *v, &mut reads);
        }
        // A row kernel: one lane per row (the row axis left out). A
        // cooperative contraction: one item per index of its kept axes
        // (the reuse axes left out).
        let mut threads = shape.unwrap_or_else(|| buffers[writes].shape.clone());
        if let Some(axis) = row.filter(|&a| a < threads.len()) {
            threads.remove(axis);
        }
        let dtypes: Vec<DType> = reads.iter().map(|&r| buffers[r].dtype).collect();
        let mma = match (node_index, tensor_cores) {
            (Some(j), Some((point, tuning))) if row.is_none() => mma_form(graph, j, &dtypes, (point, &tuning)),
            _ => None,
        };
        let contraction =
            |min: i64| mma.is_none() && node_index.is_some_and(|j| cooperative_contraction(graph, j, min));
        let warp = row.is_none() && !contraction(COOPERATIVE_MIN) && contraction(WARP_COOPERATIVE_MIN);
        let cooperative = row.is_some() || contraction(COOPERATIVE_MIN) || warp;
        if let Some(reuse) = node_index.filter(|_| row.is_none() && cooperative).and_then(|j| reuse_axes(graph, j)) {
            threads = threads.iter().enumerate().filter(|(a, _)| !reuse.contains(a)).map(|(_, p)| p.clone()).collect();
        }
        let extent = numel(&graph.dims, &threads)
            .map_err(|message| LowerError::Size { what: format!("kernel for `{node}`"), message })?;
        // A reduction split across blocks: partial sums into a workspace,
        // added by a `combine` kernel after it (see `Mma::k_splits`).
        let workspace = match &mma {
            Some(m) if m.k_splits > 1 => {
                let mut shape = vec![Poly::constant(m.k_splits)];
                shape.extend(buffers[writes].shape.iter().cloned());
                let ws = buffers.len();
                buffers.push(Buffer {
                    name: format!("{node}{PARTIALS_SUFFIX}"),
                    kind: BufferKind::Intermediate,
                    shape,
                    dtype: DType::F32,
                    pitch: None,
                });
                Some(ws)
            }
            _ => None,
        };
        let mma_writes = workspace.unwrap_or(writes);
        let params_of = |reads: &BTreeSet<usize>, writes: usize| -> Vec<Param> {
            let mut params: Vec<Param> = graph.dims.runtime.iter().cloned().map(Param::Dim).collect();
            let pitched: BTreeSet<&str> =
                reads.iter().filter_map(|&r| buffers[r].pitch.as_ref()).map(|p| p.dim.as_str()).collect();
            params.extend(
                graph.dims.runtime.iter().filter(|d| pitched.contains(d.as_str())).cloned().map(Param::Capacity),
            );
            params.extend(reads.iter().copied().map(Param::Buffer));
            if !reads.contains(&writes) {
                params.push(Param::Buffer(writes));
            }
            params
        };
        let params = params_of(&reads, mma_writes);
        let index = kernels.len();
        kernels.push(Kernel {
            name: format!("k{index}_{}", sanitize(name)),
            node: node.to_owned(),
            op: op.to_owned(),
            reads: reads.into_iter().collect(),
            writes: mma_writes,
            extent: extent.clone(),
            cooperative,
            warp,
            mma,
            params,
        });
        if let Some(ws) = workspace {
            let reads = BTreeSet::from([ws]);
            let params = params_of(&reads, writes);
            let index = kernels.len();
            kernels.push(Kernel {
                name: format!("k{index}_{}_combine", sanitize(name)),
                node: node.to_owned(),
                op: COMBINE_OP.to_owned(),
                reads: reads.into_iter().collect(),
                writes,
                extent,
                cooperative: false,
                warp: false,
                mma: None,
                params,
            });
        }
        Ok(())
    };
    for (j, node) in graph.nodes.iter().enumerate() {
        let row = row_axis(&node.op, node.shape.len());
        if let Some(f) = found.iter().find(|f| f.softmax == j) {
            // Writes over its parts: the first one stands for them, and
            // the walk is over the softmax's own shape.
            let first = f.parts.first().and_then(|p| node_buf[p.node]).ok_or_else(|| LowerError::Unsupported {
                node: node.id.clone(),
                message: "an in-place softmax without parts".into(),
            })?;
            let shape = shape_of(graph, &node.shape, &format!("node `{}`", node.id))?;
            // Fused: the partials are read, the context output written.
            let writes = match fusions.iter().find(|x| x.softmax == j).and_then(|x| node_buf[x.values]) {
                Some(context) => context,
                None => first,
            };
            add(&node.id, &node.id, node.op.name(), &node.inputs, writes, row, Some(j), Some(shape))?;
        } else if let Some(x) = fusions.iter().find(|x| x.scores == j) {
            // The context attention in one kernel: q, K and V read, the
            // partials written (`lower::fused_attention`).
            let v = graph.nodes[x.values].inputs.get(1).copied().ok_or_else(|| LowerError::Unsupported {
                node: graph.nodes[x.values].id.clone(),
                message: "a fused w·V without its V".into(),
            })?;
            let mut inputs = node.inputs.clone();
            inputs.push(v);
            let b = node_buf[j].ok_or_else(|| LowerError::Unsupported {
                node: node.id.clone(),
                message: "a fused context attention without partials".into(),
            })?;
            let name = format!("{}{}", node.id, super::fused_attention::FUSED_SUFFIX);
            add(&name, &node.id, super::fused_attention::FUSED_OP, &inputs, b, None, None, None)?;
        } else if fusions.iter().any(|x| x.values == j) {
            // Written by the merge in the softmax's kernel.
        } else if let (NodeKind::Kernel, Some(b)) = (kinds[j], node_buf[j]) {
            add(&node.id, &node.id, node.op.name(), &node.inputs, b, row, Some(j), None)?;
        }
    }
    for (b, v, out) in copies {
        add(&out, graph.name_of(v), "copy", &[v], b, None, None, None)?;
    }
    Ok(Program { dims: graph.dims.runtime.clone(), buffers, kernels, in_place })
}

/// The rows axis of a decode cache (see [`Pitch`]).
fn pitch_of(graph: &Graph, role: Role, shape: &[Poly]) -> Option<Pitch> {
    if !matches!(role, Role::DecodeKv { .. } | Role::ContextKv { .. }) {
        return None;
    }
    let axis = shape.len().checked_sub(2)?;
    let dim = graph.dims.runtime.iter().find(|d| shape[axis] == Poly::symbol(d))?;
    Some(Pitch { axis, dim: dim.clone() })
}

/// Buffers a kernel touches when it reads `v`.
fn collect_reads(graph: &Graph, kinds: &[NodeKind], node_buf: &[Option<usize>], v: Value, out: &mut BTreeSet<usize>) {
    match v {
        Value::Input(i) => {
            out.insert(i);
        }
        Value::Node(j) => match (kinds.get(j), node_buf.get(j).copied().flatten()) {
            // A slice of an in-place softmax reads its part's buffer.
            (Some(NodeKind::Kernel | NodeKind::View), Some(b)) => {
                out.insert(b);
            }
            (Some(NodeKind::View | NodeKind::Inlined), _) => {
                for w in &graph.nodes[j].inputs {
                    collect_reads(graph, kinds, node_buf, *w, out);
                }
            }
            _ => {}
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(nodes: &str, outputs: &str) -> Graph {
        let text = format!(
            r#"{{"format": "bifurc-graph/1", "dims": {{"runtime": ["b"], "constants": {{"d": 4}}}},
              "inputs": [{{"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "f32"}},
                         {{"name": "w", "role": "weight", "shape": ["d", "d"], "dtype": "f32"}}],
              "nodes": [{nodes}], "outputs": [{outputs}]}}"#
        );
        match crate::import::parse(&text) {
            Ok(g) => g,
            Err(e) => panic!("{e}\n{text}"),
        }
    }

    #[test]
    fn views_inline_dead_and_copies() {
        let g = graph(
            r#"{"id": "a", "op": "exp", "inputs": ["x"]},
               {"id": "t", "op": "transpose", "inputs": ["a"], "attrs": {"perm": [1, 0]}},
               {"id": "m", "op": "matmul", "inputs": ["w", "t"]},
               {"id": "dead", "op": "softmax", "inputs": ["x"], "attrs": {"axis": 1}},
               {"id": "s", "op": "scale", "inputs": ["m"], "attrs": {"value": 2.0}},
               {"id": "r", "op": "reshape", "inputs": ["s"], "attrs": {"shape": ["4*b"]}}"#,
            r#"{"name": "out", "node": "r"}, {"name": "m_out", "node": "m"}, {"name": "x_copy", "node": "x"}"#,
        );
        let kinds = classify(&g);
        use NodeKind::*;
        // `a` feeds a matmul, which would recompute it per output column: it gets a kernel.
        // `s` feeds only the output copy: inlined.
        assert_eq!(kinds, vec![Kernel, View, Kernel, Dead, Inlined, View]);
        let p = match plan(&g) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let names: Vec<&str> = p.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["k0_a", "k1_m", "k2_out", "k3_x_copy"]);
        let ops: Vec<&str> = p.kernels.iter().map(|k| k.op.as_str()).collect();
        assert_eq!(ops, ["exp", "matmul", "copy", "copy"]);
        // Buffers: inputs, then outputs, then intermediates; `m` writes its output buffer.
        let bufs: Vec<&str> = p.buffers.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(bufs, ["x", "w", "out", "m_out", "x_copy", "a"]);
        assert_eq!(p.kernels[1].writes, 3);
        assert_eq!(p.kernels[1].reads, [1, 5], "m reads w and the buffer of a");
        assert_eq!(p.kernels[1].params, [Param::Dim("b".into()), Param::Buffer(1), Param::Buffer(5), Param::Buffer(3)]);
        assert_eq!(p.kernels[2].extent.to_string(), "4*b");
        assert_eq!(p.kernels[2].reads, [3], "the output copy recomputes the inlined scale from m");
        assert_eq!(p.kernels[3].extent.to_string(), "4*b");
    }

    #[test]
    fn row_kernels_run_one_thread_per_row() {
        let g = graph(
            r#"{"id": "s0", "op": "softmax", "inputs": ["x"], "attrs": {"axis": 0}},
               {"id": "s1", "op": "softmax", "inputs": ["x"], "attrs": {"axis": 1}},
               {"id": "g", "op": "reduce_sum", "inputs": ["w"], "attrs": {"axes": [0]}},
               {"id": "r", "op": "rms_norm", "inputs": ["x", "g"], "attrs": {"eps": 1e-6}},
               {"id": "e", "op": "exp", "inputs": ["x"]}"#,
            r#"{"name": "s0", "node": "s0"}, {"name": "s1", "node": "s1"}, {"name": "r", "node": "r"},
               {"name": "e", "node": "e"}, {"name": "c", "node": "s1"}"#,
        );
        let p = match plan(&g) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let extents: Vec<(&str, String)> = p.kernels.iter().map(|k| (k.op.as_str(), k.extent.to_string())).collect();
        // Rows of `[b, 4]`: 4 along axis 0, b along axis 1 (and the last axis
        // for the norm); an elementwise kernel and a copy of a softmax count
        // elements.
        let want = [
            ("softmax", "4"),
            ("softmax", "b"),
            ("reduce_sum", "4"),
            ("rms_norm", "b"),
            ("exp", "4*b"),
            ("copy", "4*b"),
        ];
        let want: Vec<(&str, String)> = want.iter().map(|(o, e)| (*o, e.to_string())).collect();
        assert_eq!(extents, want);
    }

    #[test]
    fn long_projections_are_cooperative() {
        // x [b, 1, 1024] · Wᵀ (W [2048, 1024]): one GPU block per weight row,
        // looping over the samples; over 64 (z · Uᵀ, U [256, 64]): one warp
        // per row; a short contraction (over 4) is neither.
        let text = r#"{"format": "bifurc-graph/1", "dims": {"runtime": ["b"], "constants": {"d": 1024, "e": 4, "f": 64}},
          "inputs": [{"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": "f32"},
                     {"name": "w", "role": "weight", "shape": [2048, "d"], "dtype": "bf16"},
                     {"name": "y", "role": "activation", "shape": ["b", 1, "e"], "dtype": "f32"},
                     {"name": "v", "role": "weight", "shape": [8, "e"], "dtype": "f32"},
                     {"name": "z", "role": "activation", "shape": ["b", 1, "f"], "dtype": "f32"},
                     {"name": "u", "role": "weight", "shape": [256, "f"], "dtype": "f32"}],
          "nodes": [{"id": "p", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}},
                    {"id": "q", "op": "matmul", "inputs": ["y", "v"], "attrs": {"transpose_b": true}},
                    {"id": "r", "op": "einsum", "inputs": ["x", "w"], "attrs": {"spec": "bnd,md->bnm"}},
                    {"id": "s", "op": "einsum", "inputs": ["x", "w"], "attrs": {"spec": "bnd,md->bnmd"}},
                    {"id": "t", "op": "matmul", "inputs": ["z", "u"], "attrs": {"transpose_b": true}}],
          "outputs": [{"name": "p", "node": "p"}, {"name": "q", "node": "q"}, {"name": "r", "node": "r"},
                      {"name": "s", "node": "s"}, {"name": "t", "node": "t"}]}"#;
        let g = crate::import::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let p = plan(&g).unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<(bool, bool, String)> =
            p.kernels.iter().map(|k| (k.cooperative, k.warp, k.extent.to_string())).collect();
        let want = [
            (true, false, "2048"),
            (false, false, "8*b"),
            (true, false, "2048"),
            (false, false, "2097152*b"),
            (true, true, "256"),
        ];
        assert_eq!(got, want.map(|(c, w, e)| (c, w, e.to_string())));
        assert_eq!(p.kernels[0].gpu_threads(256).map(|t| t.to_string()).ok(), Some("524288".to_string()));
        assert_eq!(p.kernels[4].gpu_threads(256).map(|t| t.to_string()).ok(), Some("8192".to_string()), "a warp a row");
        assert_eq!(reuse_axes(&g, 0), Some(vec![0]), "the samples reuse each weight row");
    }

    #[test]
    fn elementwise_with_two_consumers_gets_a_buffer() {
        let g = graph(
            r#"{"id": "a", "op": "exp", "inputs": ["x"]},
               {"id": "p", "op": "add", "inputs": ["a", "x"]},
               {"id": "q", "op": "mul", "inputs": ["a", "p"]}"#,
            r#"{"name": "q", "node": "q"}"#,
        );
        assert_eq!(classify(&g), vec![NodeKind::Kernel, NodeKind::Inlined, NodeKind::Kernel]);
        assert_eq!(sanitize("l0.attn/q-proj"), "l0_attn_q_proj");
    }
}
