//! Emits a planned [`Program`] as textual MLIR: one function per kernel.
//!
//! # Kernel structure
//!
//! Every kernel computes the elements of one buffer (its `writes`), one
//! element per thread (GPU) or loop iteration (CPU); a softmax planned in
//! place ([`crate::lower::InPlace`], CPU) writes its row's parts over the
//! buffers it reads them from. A flat index
//! `i in [0, extent)`, `extent = numel(buffer)`, is delinearized into the
//! output's multi-index; the body computes that one element in f32 (or i64
//! for integer data) and stores it at offset `i`, row-major.
//!
//! - **Row kernels** (softmax, rms_norm, layer_norm) instead run one loop
//!   iteration (CPU) or one *block* (GPU) per *row* along the reduced axis
//!   (softmax: its axis; the norms: the last), `extent = numel(buffer) /
//!   row length` rows: the row's statistics are computed once, then every
//!   element is stored. The body is the same code on both targets, except
//!   that on the GPU the block's threads split the row (thread `t` takes
//!   elements `t, t + block_dim, …`, see `Kc::lanes`) and combine
//!   their partial statistics with `gpu.all_reduce`.
//!
//! - **Tensor-core kernels** (a bf16 / f16 contraction with a
//!   [`crate::lower::plan::Kernel::mma`] form) compute 16 × 8 output tiles
//!   with `nvvm.mma.sync`, a block of 8 warps per warp's tiles (the warps
//!   splitting the reduction) or per 8 warps' tiles (see `mma`); on the CPU
//!   they are compiled like any contraction, unless emulated
//!   ([`Emulation`]).
//!
//! - Reads go through **views** without copies: transpose permutes the
//!   index, broadcast drops new leading axes and reads index 0 on stretched
//!   size-1 axes, slice adds its start, reshape linearizes and delinearizes
//!   with the (symbolic) sizes (or, over a densely stored value, reads it
//!   at its own row-major offset), and concat picks its part with index
//!   compares in an `scf.if` chain (only the selected part is loaded), or
//!   directly in a CPU row loop split at its parts (see `segments`).
//! - **Inlined** elementwise nodes (see [`crate::lower::plan`](mod@crate::lower::plan)) are
//!   recomputed at every load.
//! - Reductions are `scf.for` loops with an f32 accumulator: einsum /
//!   matmul (contracted letters), reduce_sum / reduce_max, softmax (row max,
//!   sum of `exp(x - max)`, then the row's elements; a fully `-inf` row
//!   gives 0), rms_norm (sum of squares), layer_norm (mean, then variance).
//! - rope reads `x[.., j]` and its partner `x[.., j ± k/2]`, with
//!   `angle = pos * theta^(-2 (j mod k/2) / k)` and `math.cos`/`math.sin`
//!   in f32 (on the CPU from a table per position, see `rope`); gather
//!   reads the id, and yields NaN for an id outside the table
//!   (it never reads out of bounds).
//! - Math: `math.exp` (on the CPU a polynomial, see `exp`), `math.tanh` (on
//!   the CPU a polynomial or `exp`, see `tanh`), `math.erf` (on the CPU a
//!   rational function, see `erf`), `math.sqrt`, `math.powf`, `math.cos`, `math.sin`; gelu = `0.5 x (1 + erf(x / sqrt 2))`, the tanh
//!   form per GPT-2, silu = `x / (1 + exp(-x))`, rsqrt = `1 / sqrt(x)`.
//!   Accumulation is f32 throughout.
//!
//! # ABI (the same for CPU and GPU, plus two CPU parameters)
//!
//! Parameters, in [`crate::lower::plan::Kernel::params`] order: every
//! runtime dim in `graph.dims.runtime` order as `i64` (and the row
//! capacity of a pitched dim), then every buffer the kernel reads
//! (ascending buffer index), then the buffer it writes (unless it reads
//! it too: a softmax planned in place), each as an `!llvm.ptr`: a bare
//! pointer to contiguous row-major data of the buffer's dtype (f32, f16
//! and bf16 as their IEEE / bfloat16 bits, i32, i64). Floats are widened
//! to f32 on load and rounded (to nearest even) on store. A zero-size
//! buffer may be passed as any non-null pointer; nothing is read from or
//! written to it.
//!
//! - CPU ([`Target::Cpu`]): `func.func @k{i}_{node}(params, %part: i64,
//!   %parts: i64) attributes {llvm.emit_c_interface, passthrough = ...}`
//!   (see `CPU_FUNC_ATTRS`) whose body is a nest of `scf.for` loops over
//!   the output (see `walk_index`). Its pointers are
//!   `llvm.noalias`: the buffers of one call must not overlap (each of
//!   `CpuStep`'s is its own allocation; zero-size ones are never accessed).
//! - GPU ([`Target::Gpu`]): `gpu.func @k{i}_{node}(params) kernel` inside
//!   `gpu.module @bifurc_kernels` (module attribute `gpu.container_module`);
//!   `%i = block_id.x * block_dim.x + thread_id.x`, guarded by
//!   `%i < extent`. Launch a 1-D grid of `ceil(extent / block)` blocks.
//!
//! # Parts (CPU)
//!
//! A CPU kernel's outer walk loops (over the output: the outermost when it
//! is long, else all but the innermost, or the only one; a row kernel's
//! all), taken as one loop over their `n` iterations, run only
//! `n·part/parts .. n·(part+1)/parts` (see `walk_index`):
//! calls with `part = 0..parts` (on as many threads) together run the
//! kernel once. Each iteration writes outputs (elements, rows, tiles) that
//! no other iteration reads or writes, so the parts are independent and
//! the result is the same for every `parts`. A kernel without such a loop
//! (every output axis of size 1, or the GPU's structure emulated) runs
//! whole in part 0 and does nothing in the others.
//!
//! The text is deterministic: same graph and program, same bytes.

mod amx;
mod amx_scores;
mod amx_values;
mod bodies;
mod builder;
mod chunks;
mod contract;
mod erf;
mod exp;
mod fused;
mod half_panels;
mod half_values;
mod mma;
mod ops;
mod pair_dot;
mod panel_ahead;
mod registers;
#[cfg(test)]
pub(crate) use amx::with_amx;
pub use amx::AMX_ENV;
pub(crate) use amx::{amx_choice, dense_source, AMX_INPUTS};
#[cfg(test)]
pub(crate) use half_panels::with_half_panels;
pub(crate) use pair_dot::bf16_dot_choice;
pub(crate) use pair_dot::cpu_setting;
pub use pair_dot::BF16_DOT_ENV;
#[cfg(test)]
pub(crate) use pair_dot::{host_has_bf16_dot, with_bf16_dot};
#[cfg(test)]
pub(crate) use registers::with_narrow_tiles;
pub use registers::NARROW_TILES_ENV;
pub(crate) use registers::{host_has_avx512, narrow_tiles_choice};
mod rope;
mod round_bf16;
mod rows;
mod rows_in_lanes;
mod segments;
mod share;
mod tanh;
#[cfg(test)]
pub(crate) mod testing;
mod vectors;
mod views;
mod walk;
mod widened_rows;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::ir::{Graph, Value};

use super::fused_attention::FUSED_OP;
use super::plan::{BufferKind, Kernel, Param, Program, COMBINE_OP};
use super::LowerError;
use bodies::Out;
use builder::Builder;
use mma::MmaMode;
use walk::Walk;

/// Which wrapper the kernels get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `func.func` with an `scf.for` over the elements.
    Cpu,
    /// `gpu.func` kernels in `gpu.module @bifurc_kernels`.
    Gpu,
}

/// Lanes of the explicit vector loads of a CPU contraction (see
/// [`Kc::simd`]): 16 f32 = one AVX-512 register (LLVM splits it on
/// narrower hosts).
const CPU_SIMD: usize = 16;

/// LLVM function attributes of every CPU kernel (`passthrough`: carried
/// to the LLVM IR as they are). `prefer-vector-width=512`: LLVM's tuning
/// for Intel's AVX-512 server cores (Skylake-SP to Sapphire and Emerald
/// Rapids) otherwise vectorizes the loops it vectorizes itself (the
/// softmax's and norms' rows, elementwise and RoPE loops; not the explicit
/// `vector<16xf32>` code of the contractions) with 256-bit registers. The
/// softmax of cpu_step at b = 32, m_c = 8192 (both layers, one thread of a
/// 2-core Emerald Rapids VM, alternated runs): f32 5.96-7.30 -> 4.70-5.02
/// ms, bf16 10.4-12.0 -> 6.3-8.3. A host without 512-bit vectors keeps its
/// own width.
const CPU_FUNC_ATTRS: &str = r#"passthrough = [["prefer-vector-width", "512"]]"#;

/// Block of the innermost kept axis of a tiled CPU contraction (16 f32 =
/// one 64-byte cache line of output).
const BLOCK: usize = 16;

/// Outputs of a block computed at once with each row of a tiled CPU
/// contraction's register tile of scalar sums (a tile of `CPU_TILE` × 4:
/// the bf16 / f16 weight projections read each loaded vector of the input
/// for 4 outputs and each of the weight's for 8, instead of 1 and 8; about
/// 2x faster on `mlp_gate_proj` at b = 32). Sums in explicit vectors tile
/// SUM_ROWS × SUM_COLS instead.
const CPU_COLS: usize = 4;

/// The register tile of a CPU contraction whose sum runs in explicit
/// vectors (`q·K`, the weight projections), SUM_ROWS × SUM_COLS outputs:
/// 16 vector accumulators, each step loading 4 + 4 vectors for 16 FMAs,
/// the sums added in one tree of shuffles (see `Kc::lane_tree`). Of 2 × 8,
/// 3 × 8, 4 × 4, 5 × 4, 6 × 4 and 8 × 2, 4 × 4 was fastest on both
/// (cpu_step, b = 32: q·K 7.9 ms a layer, gate_proj 2.2 ms).
const SUM_ROWS: usize = 4;
const SUM_COLS: usize = 4;
/// How far ahead along the output's last axis such a tile prefetches the
/// operands of a short sum (a block: the next block's context K rows) and
/// the outputs it writes (two blocks). Each block of K is a new 4 KiB page
/// (16 rows of a 64-wide head) and each tile row's outputs a new line a
/// reuse stride from the last, which the hardware prefetchers do not
/// follow (q·K at b = 32, m_c = 8192: 11.8 -> 7.5 ms a layer, timed alone).
const SUM_READ_AHEAD: usize = BLOCK;
const SUM_WRITE_AHEAD: usize = 2 * BLOCK;

/// Vectors along the output's last axis one step of a CPU contraction
/// computes when it is vectorized along that axis (see `emit::vectors`,
/// `Kc::out_lanes`) and they divide it: 4 × 16 f32 = a 64-wide head, so
/// the strided operand (V) is walked once instead of once per vector.
const VECTOR_GROUPS: usize = 4;

/// The `gpu.module` that holds the kernels of [`Target::Gpu`].
pub const GPU_MODULE: &str = "bifurc_kernels";

/// Where every value lives, derived from the program.
pub(crate) struct Layout {
    /// Buffer of each graph input.
    input_buf: Vec<Option<usize>>,
    /// Buffer of each node computed by its own kernel.
    node_buf: Vec<Option<usize>>,
}

impl Layout {
    fn new(graph: &Graph, program: &Program) -> Result<Self, LowerError> {
        let input_buf = graph
            .inputs
            .iter()
            .map(|inp| {
                program.buffers.iter().position(|b| matches!(b.kind, BufferKind::Input(_)) && b.name == inp.name)
            })
            .collect();
        let mut node_buf = vec![None; graph.nodes.len()];
        for k in program.kernels.iter().filter(|k| k.op != "copy") {
            match graph.find(&k.node) {
                // A softmax planned in place has no buffer of its own.
                Some(Value::Node(_)) if program.in_place_of(&k.node).is_some() => {}
                Some(Value::Node(j)) if k.writes < program.buffers.len() => node_buf[j] = Some(k.writes),
                _ => return Err(mismatch(&k.name, format!("computes `{}`, which is not a node of the graph", k.node))),
            }
        }
        // Its slices read its parts' buffers.
        for part in program.in_place.iter().flat_map(|p| &p.parts) {
            for s in &part.slices {
                match graph.find(s) {
                    Some(Value::Node(j)) if part.buffer < program.buffers.len() => node_buf[j] = Some(part.buffer),
                    _ => return Err(mismatch(s, "slices an in-place softmax, but is not a node of the graph".into())),
                }
            }
        }
        // A fused context attention's merge writes its w·V's buffer.
        for fused in program.fused() {
            match graph.find(&fused.values) {
                Some(Value::Node(j)) if fused.context < program.buffers.len() => node_buf[j] = Some(fused.context),
                _ => return Err(mismatch(&fused.values, "is fused, but is not a node of the graph".into())),
            }
        }
        Ok(Layout { input_buf, node_buf })
    }
}

fn mismatch(kernel: &str, message: String) -> LowerError {
    LowerError::Unsupported { node: kernel.to_owned(), message: format!("program does not match the graph: {message}") }
}

/// Emits every kernel of `program` for `target` as one MLIR module.
pub fn emit(graph: &Graph, program: &Program, target: Target) -> Result<String, LowerError> {
    emit_with(graph, program, target, None)
}

/// [`Target::Cpu`] text whose row kernels and cooperative contractions
/// split their reductions the GPU's way, and whose tensor-core kernels run
/// the GPU's tiles and warps with lanes as loops (see [`Emulation`]): for
/// checking the GPU kernels' structure on a machine without one.
pub fn emit_emulating_gpu(graph: &Graph, program: &Program, emulation: Emulation) -> Result<String, LowerError> {
    emit_with(graph, program, Target::Cpu, Some(emulation))
}

/// An emitted module, and the same module with each kernel's code once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedModule {
    /// Every kernel: what [`emit`] (or [`emit_emulating_gpu`]) gives.
    pub text: String,
    /// The first kernel of each distinct code only (kernels that differ
    /// only in their name and the buffers passed to them have the same
    /// code), for compiling.
    pub shared: String,
    /// Every kernel → the kernel of `shared` that runs it (itself, or the
    /// first with its code).
    pub entries: BTreeMap<String, String>,
}

/// Emits every kernel of `program` for `target` (emulating the GPU's
/// kernels on the CPU when `emulation` is given), and finds the kernels
/// with the same code on the text (see `share`).
pub fn emit_shared(
    graph: &Graph,
    program: &Program,
    target: Target,
    emulation: Option<Emulation>,
) -> Result<SharedModule, LowerError> {
    let funcs = kernel_texts(graph, program, target, emulation)?;
    let text = module_text(funcs.iter().map(String::as_str), target);
    let SharedPlans { mut modules, mut entries } = share_plans(&[(program, funcs)], target);
    Ok(SharedModule { text, shared: modules.pop().unwrap_or_default(), entries: entries.pop().unwrap_or_default() })
}

/// Several plans of one graph as functions of distinct code (the CPU
/// step's: see [`crate::lower::CpuStep`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SharedPlans {
    /// Per plan, a module of the first kernel of each code that the first
    /// plan does not have (a plan's kernels run functions of its module or
    /// of the first plan's: two later plans of the same code each have
    /// it, so that either is JIT-compiled without the other).
    pub modules: Vec<String>,
    /// Per plan, every kernel → the function that runs it.
    pub entries: Vec<BTreeMap<String, String>>,
}

/// [`emit_shared`]'s module of distinct code for several plans of
/// `graph` at once: a kernel whose code an earlier kernel has (of its own
/// plan or the first) runs that kernel's function. Kernel names
/// repeat from plan to plan with other code, so plan `n > 0`'s own
/// functions are named `p{n}_{kernel}`.
pub(crate) fn emit_shared_plans(
    graph: &Graph,
    programs: &[Program],
    target: Target,
    emulation: Option<Emulation>,
) -> Result<SharedPlans, LowerError> {
    let plans = programs
        .iter()
        .map(|p| Ok((p, kernel_texts(graph, p, target, emulation)?)))
        .collect::<Result<Vec<_>, LowerError>>()?;
    Ok(share_plans(&plans, target))
}

fn share_plans(plans: &[(&Program, Vec<String>)], target: Target) -> SharedPlans {
    let function = |n: usize, kernel: &str| if n == 0 { kernel.to_string() } else { format!("p{n}_{kernel}") };
    // Each plan's kernels: the function each would be, itself, its text.
    let kernels = |n: usize| {
        let (program, funcs) = &plans[n];
        program.kernels.iter().zip(funcs).map(move |(k, t)| (function(n, &k.name), k, t)).collect::<Vec<_>>()
    };
    let mut modules = Vec::with_capacity(plans.len());
    let mut entries = vec![BTreeMap::new(); plans.len()];
    let base = if plans.is_empty() { Vec::new() } else { kernels(0) };
    // The first plan's code keys, once for every plan.
    let base_keys: Vec<(&str, String)> =
        base.iter().map(|(f, k, text)| (f.as_str(), share::code_key(k, text))).collect();
    for (n, plan_entries) in entries.iter_mut().enumerate() {
        // Shared with the first plan alone: a later plan is JIT-compiled
        // on its own, whether or not another later one is.
        let mine = if n == 0 { Vec::new() } else { kernels(n) };
        let keys = mine.iter().map(|(f, k, text)| (f.as_str(), share::code_key(k, text)));
        let first = share::first_with_same_code(base_keys.iter().cloned().chain(keys));
        // The plan's functions of its own, named as `first` names them.
        let own_of = if n == 0 { &base } else { &mine };
        let own = own_of.iter().filter(|(f, _, _)| first.get(f) == Some(f));
        let texts: Vec<String> =
            own.map(|(f, k, text)| text.replacen(&format!("@{}(", k.name), &format!("@{f}("), 1)).collect();
        modules.push(module_text(texts.iter().map(String::as_str), target));
        for (f, k, _) in own_of {
            // `first` names every function it was given.
            let entry = first.get(f).unwrap_or(f);
            plan_entries.insert(k.name.clone(), entry.clone());
        }
    }
    SharedPlans { modules, entries }
}

fn emit_with(
    graph: &Graph,
    program: &Program,
    target: Target,
    emulation: Option<Emulation>,
) -> Result<String, LowerError> {
    let funcs = kernel_texts(graph, program, target, emulation)?;
    Ok(module_text(funcs.iter().map(String::as_str), target))
}

/// Each kernel's function, in program order.
fn kernel_texts(
    graph: &Graph,
    program: &Program,
    target: Target,
    emulation: Option<Emulation>,
) -> Result<Vec<String>, LowerError> {
    let layout = Layout::new(graph, program)?;
    // Chosen once for every kernel (it reads the host and the environment).
    let host = target == Target::Cpu && emulation.is_none();
    let bf16_dot = host && pair_dot::prefer_bf16_dot();
    let amx = host && amx::prefer_amx();
    let narrow = host && registers::prefer_narrow_tiles();
    program
        .kernels
        .iter()
        .map(|kernel| kernel_fn(graph, program, &layout, kernel, target, emulation, Host { bf16_dot, amx, narrow }))
        .collect()
}

/// The module holding `funcs` for `target`.
fn module_text<'a>(funcs: impl Iterator<Item = &'a str>, target: Target) -> String {
    let funcs: String = funcs.collect();
    match target {
        Target::Cpu => format!("module {{\n{funcs}}}\n"),
        Target::Gpu => format!(
            "module attributes {{gpu.container_module}} {{\n  gpu.module @{GPU_MODULE} {{\n{}  }}\n}}\n",
            indent(&funcs, 2)
        ),
    }
}

/// Per-kernel emission state.
pub(crate) struct Kc<'a> {
    pub graph: &'a Graph,
    pub program: &'a Program,
    pub layout: &'a Layout,
    pub b: Builder,
    /// Buffer index → its pointer parameter.
    pub ptrs: HashMap<usize, String>,
    /// Kernel name, for errors.
    pub kernel: &'a str,
    /// Vector width of contraction loops over contiguous f32 data (CPU:
    /// explicit SIMD loads; 0 = scalar loops only).
    pub simd: usize,
    /// How a block-shared kernel (a row kernel, a cooperative contraction)
    /// splits its reduction; see [`Lanes`].
    pub lanes: Lanes,
    /// Emulated lanes: the open lane loops (result, accumulator), innermost
    /// last.
    pub lane_loops: Vec<(String, String)>,
    /// Whether the outermost walk loop is split into parts (CPU).
    pub partition: Partition,
    /// Whether bf16 contractions summed in pairs use the CPU's bf16 dot
    /// product (see `emit::pair_dot`): the CPU target, not emulating the
    /// GPU, on a host where it is the faster way (`prefer_bf16_dot`).
    pub bf16_dot: bool,
    /// Whether bf16 projections in paired panels run on AMX tiles (see
    /// `emit::amx`): the CPU target, not emulating the GPU, on a host
    /// that has them and may use them, unless turned off (`prefer_amx`).
    pub amx: bool,
    /// Whether the CPU contractions' register tiles are sized for 16
    /// registers of 256 bits rather than AVX-512's 32 of 512 (see
    /// `emit::registers`): the CPU target, not emulating the GPU, on a
    /// host without AVX-512F, unless turned off (`prefer_narrow_tiles`).
    pub narrow: bool,
    /// Loop indices known to stay in a range `[lo, hi)` (a row loop split
    /// at a concat's boundaries, see `emit::segments`): a concat along
    /// that index with a part exactly there reads the part directly.
    pub pinned: Vec<(String, crate::ir::Poly, crate::ir::Poly)>,
}

/// Whether a CPU kernel's outermost walk loop runs only the call's part
/// (see "Parts" in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Partition {
    /// Not split: the GPU, and the CPU emulating it (part 0 runs it all).
    Off,
    /// The next walk loop opened is split.
    Pending,
    /// The walk's outermost loop was split.
    Done,
}

/// How the reduction of a block-shared kernel is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lanes {
    /// One thread (CPU: iteration) does the whole reduction.
    Whole,
    /// GPU: the block's threads (`thread_id.x` of `block_dim.x`) each take
    /// every `block_dim`-th element; `gpu.all_reduce` combines them.
    Block,
    /// GPU: the warp's lanes (`%lane`, the thread id mod 32) each take every
    /// 32nd element; a butterfly of `gpu.shuffle xor` combines them (every
    /// lane gets the sum, in the same order).
    Warp,
    /// CPU emulation of [`Lanes::Block`] with this many lanes: a loop over
    /// the lanes around each lane's strided loop, combining as it goes
    /// (same element split, sequential combination).
    Emulated(usize),
}

/// CPU text that runs the GPU's block-shared kernels the GPU's way (see
/// `Lanes::Emulated`), so that the reference interpreter can check them:
/// `lanes` threads per block, and contractions over at least
/// `cooperative_min` elements made cooperative (the GPU uses
/// `plan::COOPERATIVE_MIN`). Tensor-core kernels (the
/// program's [`crate::lower::plan::Kernel::mma`]) are always emulated with
/// their 8 warps of 32 lanes (see `emit::mma`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emulation {
    pub lanes: usize,
    pub cooperative_min: i64,
    /// The tensor-core choices the program is planned with.
    pub tuning: crate::lower::mma::Tuning,
}

/// The host's choices every CPU kernel is emitted with (see the fields of
/// the same names on [`Kc`]); all `false` on the GPU and when emulating it.
#[derive(Clone, Copy)]
struct Host {
    bf16_dot: bool,
    amx: bool,
    narrow: bool,
}

fn kernel_fn(
    graph: &Graph,
    program: &Program,
    layout: &Layout,
    kernel: &Kernel,
    target: Target,
    emulation: Option<Emulation>,
    Host { bf16_dot, amx, narrow }: Host,
) -> Result<String, LowerError> {
    let mut sig = Vec::new();
    let mut dims = Vec::new();
    let mut ptrs = HashMap::new();
    for (n, p) in kernel.params.iter().enumerate() {
        match p {
            Param::Dim(d) => {
                let name = format!("%d{n}");
                sig.push(format!("{name}: i64"));
                dims.push((d.clone(), name));
            }
            Param::Capacity(d) => {
                let name = format!("%c{n}");
                sig.push(format!("{name}: i64"));
                dims.push((capacity_key(d), name));
            }
            Param::Buffer(b) => {
                let name = format!("%b{b}");
                if ptrs.insert(*b, name.clone()).is_some() {
                    return Err(mismatch(&kernel.name, format!("buffer {b} is passed twice")));
                }
                // CPU: every buffer is its own allocation (CpuStep, the only
                // caller), so no two pointers of a call overlap; LLVM may then
                // keep loads across the kernel's stores (q in registers across
                // a block of keys).
                match target {
                    Target::Cpu => sig.push(format!("{name}: !llvm.ptr {{llvm.noalias}}")),
                    Target::Gpu => sig.push(format!("{name}: !llvm.ptr")),
                }
            }
        }
    }
    if target == Target::Cpu {
        // The part of the walk this call runs (see "Parts" above).
        for (key, name) in [(PART_KEY, "%part"), (PARTS_KEY, "%parts")] {
            sig.push(format!("{name}: i64"));
            dims.push((key.to_owned(), name.to_owned()));
        }
    }
    let out = program.buffers.get(kernel.writes).ok_or_else(|| {
        mismatch(&kernel.name, format!("writes buffer {} of {}", kernel.writes, program.buffers.len()))
    })?;
    let simd = if target == Target::Cpu { CPU_SIMD } else { 0 };
    let mut kc = Kc {
        graph,
        program,
        layout,
        b: Builder::new(&dims),
        ptrs,
        kernel: &kernel.name,
        simd,
        lanes: Lanes::Whole,
        lane_loops: Vec::new(),
        partition: match (target, emulation) {
            (Target::Cpu, None) => Partition::Pending,
            _ => Partition::Off,
        },
        bf16_dot,
        amx,
        narrow,
        pinned: Vec::new(),
    };
    kc.b.bf16_in_ints = target == Target::Cpu;
    let node = if kernel.op == "copy" || kernel.op == COMBINE_OP {
        None
    } else {
        match graph.find(&kernel.node) {
            Some(Value::Node(j)) => Some(j),
            _ => return Err(mismatch(&kernel.name, format!("computes unknown `{}`", kernel.node))),
        }
    };
    // Loops opened by `walk_index` (CPU), closed after the body.
    let mut opened = 0;
    let cooperative_min = match (target, emulation) {
        (Target::Gpu, _) => Some(crate::lower::plan::WARP_COOPERATIVE_MIN),
        (Target::Cpu, e) => e.map(|e| e.cooperative_min),
    };
    // A tensor-core contraction (GPU, or its CPU emulation).
    let mma_mode = match (target, emulation) {
        (Target::Gpu, _) => Some(MmaMode::Gpu),
        (Target::Cpu, Some(_)) => Some(MmaMode::Emulated),
        (Target::Cpu, None) => None,
    };
    let mma = match (&kernel.mma, mma_mode, node) {
        (Some(m), Some(mode), Some(j)) => Some((m, mode, j)),
        (Some(m), None, _) if m.k_splits > 1 => {
            // Its partial sums are the tensor-core kernel's; plan the CPU
            // step without tensor cores.
            return Err(mismatch(&kernel.name, "a reduction split across blocks needs its tensor-core kernel".into()));
        }
        _ => None,
    };
    // A softmax planned in place walks its own shape; it writes over its
    // parts (see `rows`), as only the CPU's row loops do.
    let in_place = node.filter(|_| program.in_place_of(&kernel.node).is_some());
    let shape = match in_place {
        Some(j) => super::plan::shape_of(graph, &graph.nodes[j].shape, &format!("kernel `{}`", kernel.name))?,
        None => out.shape.clone(),
    };
    let dest = Out {
        kernel,
        target,
        emulation,
        flat: "%i".to_owned(),
        sizes: kc.sizes(&shape)?,
        shape,
        ptr: kc.ptr(kernel.writes)?,
        dtype: out.dtype,
    };
    let walk = walk::walk(graph, node, target, cooperative_min);
    if let Some(j) = in_place {
        let rows = matches!(walk, Walk::Rows { axis } if kc.row_axis(j) == Some(axis));
        if target != Target::Cpu || emulation.is_some() || mma.is_some() || !rows {
            return Err(mismatch(&kernel.name, "a softmax planned in place runs only as the CPU's row loops".into()));
        }
    }
    // CPU: a contraction with no operand to reuse across outputs whose sum
    // is strided, in vectors along the output's last axis (`vectors`).
    let vector = match (mma, node) {
        (None, Some(j)) => kc.vector_lanes(j, &walk, &dest),
        _ => None,
    };
    // CPU: a bf16 projection or context attention on AMX tiles (`amx`).
    let tiles = match (mma, node) {
        (None, Some(j)) => kc.amx_kernel(j, &dest),
        _ => None,
    };
    let extent = match (mma, walk, node) {
        (None, _, Some(j)) if kernel.op == FUSED_OP => kc.fused_attention_body(&dest, j)?,
        (None, _, Some(_)) if let Some(t) = &tiles => kc.amx_kernel_body(&dest, t, &mut opened)?,
        (None, _, Some(j)) if let Some(h) = kc.half_panels(j, &dest) => kc.half_panels_body(&dest, &h, &mut opened)?,
        (None, _, Some(j)) if let Some(v) = kc.half_values(j, &dest) => kc.half_values_body(&dest, &v, &mut opened)?,
        (None, _, Some(j)) if let Some(lanes) = vector => kc.vector_body(&dest, j, lanes, &mut opened)?,
        (Some((m, mode, j)), _, _) => {
            if mode == MmaMode::Gpu {
                // The block id is the item: a tile, or eight along n (see `mma`).
                kc.lanes = Lanes::Block;
            }
            kc.mma_kernel(j, m, &dest.flat, (&dest.ptr, dest.dtype, dest.sizes.clone()), mode, &mut opened)?
        }
        _ if kernel.op == COMBINE_OP => kc.combine_body(&dest, &mut opened)?,
        (_, Walk::Rows { axis }, Some(j)) if axis < dest.sizes.len() && kc.row_axis(j) == Some(axis) => {
            kc.row_body(&dest, j, axis, &mut opened)?
        }
        (_, Walk::Reuse { keep, reuse, tile }, Some(j)) => match kc.rows_in_lanes(j, &dest, &keep, &reuse) {
            Some(t) => kc.rows_in_lanes_body(&dest, j, &t, (keep, reuse, tile))?,
            None => kc.reuse_body(&dest, j, (keep, reuse, tile), &mut opened)?,
        },
        (_, Walk::Cooperative { keep, reuse }, Some(j)) => kc.cooperative_body(&dest, j, (keep, reuse), &mut opened)?,
        (None, _, Some(j)) if let Some(r) = kc.rope_vectors(j, &dest) => kc.rope_body(&dest, &r, &mut opened)?,
        (_, _, node) => kc.plain_body(&dest, node, &mut opened)?,
    };
    for _ in 0..opened {
        kc.b.close();
    }
    let flat = dest.flat;
    let partitioned = kc.partition == Partition::Done;
    // Shared memory of a tensor-core kernel (GPU): a split kernel's partial
    // tiles, or the staged operands.
    let workgroup = match mma.and_then(|(m, _, j)| mma::workgroup(m, kc.stages_b(j, m))) {
        Some(w) => format!(" {w}"),
        None => String::new(),
    };
    let (hoist, body) = kc.b.finish();
    let sig = sig.join(", ");
    let name = &kernel.name;
    let mut f = String::new();
    match target {
        Target::Cpu => {
            let _ = writeln!(f, "  func.func @{name}({sig}) attributes {{llvm.emit_c_interface, {CPU_FUNC_ATTRS}}} {{");
            f.push_str(&indent(&hoist, 2));
            // The walk is the loop nest in `body` (see `walk_index`).
            let _ = extent;
            if partitioned {
                f.push_str(&indent(&body, 2));
            } else {
                // No loop to split: part 0 runs the whole body.
                let _ = writeln!(
                    f,
                    "    %part_zero = arith.constant 0 : i64\n    \
                     %part_first = arith.cmpi eq, %part, %part_zero : i64\n    scf.if %part_first {{"
                );
                f.push_str(&indent(&body, 3));
                let _ = writeln!(f, "    }}");
            }
            let _ = writeln!(f, "    return\n  }}");
        }
        Target::Gpu => {
            let _ = writeln!(f, "  gpu.func @{name}({sig}){workgroup} kernel {{");
            f.push_str(&indent(&hoist, 2));
            let _ = writeln!(f, "    %bid = gpu.block_id x\n    %bdim = gpu.block_dim x\n    %tid = gpu.thread_id x");
            if kc.lanes == Lanes::Block {
                // One block per item (row, output element), its threads share it.
                let _ = writeln!(f, "    {flat} = gpu.block_id x");
            } else if kc.lanes == Lanes::Warp {
                // One warp per item, its lanes share it.
                let _ = writeln!(
                    f,
                    "    %c32 = arith.constant 32 : index\n    %base = arith.muli %bid, %bdim : index\n    \
                     %thread = arith.addi %base, %tid : index\n    {flat} = arith.divui %thread, %c32 : index\n    \
                     %lane = arith.remui %tid, %c32 : index"
                );
            } else {
                let _ = writeln!(
                    f,
                    "    %base = arith.muli %bid, %bdim : index\n    {flat} = arith.addi %base, %tid : index"
                );
            }
            let _ = writeln!(f, "    %inb = arith.cmpi ult, {flat}, {extent} : index\n    scf.if %inb {{");
            f.push_str(&indent(&body, 3));
            let _ = writeln!(f, "    }}\n    gpu.return\n  }}");
        }
    }
    Ok(f)
}

/// The multi-index of a walk over `sizes` (outermost first). CPU: a nest
/// of `scf.for` loops, one per axis of size other than 1 (counted in
/// `opened`; the caller closes them): no division per element. The first
/// walk of a CPU kernel runs only the call's part ([`Partition`]): its
/// outermost loop alone when that has at least [`SPLIT_ALONE`] iterations
/// (a constant), else its loops but the innermost (all of them when there
/// is one, or when `rows`: an iteration is a whole row) as one loop over
/// their product, its index delinearized once per iteration.
/// GPU: the flat thread index delinearized.
fn walk_index(
    kc: &mut Kc,
    target: Target,
    flat: &str,
    sizes: &[String],
    rows: bool,
    opened: &mut usize,
) -> Vec<String> {
    walk_index_within(kc, target, flat, (sizes, 0), rows, opened)
}

/// [`walk_index`] whose split into parts leaves out the last `within`
/// axes of `sizes` (a chunked sum's chunks: one part must run them all,
/// each chunk adding to what the one before stored): only loops before
/// them are split, all of them together unless the first is wide enough
/// alone. With no such loop, nothing is split (part 0 runs the walk).
fn walk_index_within(
    kc: &mut Kc,
    target: Target,
    flat: &str,
    (sizes, within): (&[String], usize),
    rows: bool,
    opened: &mut usize,
) -> Vec<String> {
    if target != Target::Cpu {
        return kc.b.delinearize(flat, sizes);
    }
    let outer = sizes.len().saturating_sub(within);
    let loops: Vec<usize> = (0..sizes.len()).filter(|&a| kc.b.known(&sizes[a]) != Some(1)).collect();
    let splittable = loops.iter().filter(|&&a| a < outer).count();
    let mut idx: Vec<String> = sizes.iter().map(|_| kc.b.index(0)).collect();
    let mut inner = &loops[..];
    if kc.partition == Partition::Pending && splittable > 0 {
        kc.partition = Partition::Done;
        // The outermost loop alone when it has enough iterations for the
        // parts at any point (no index to delinearize).
        let wide = kc.b.known(&sizes[loops[0]]).is_some_and(|n| n >= SPLIT_ALONE);
        let split = if rows {
            loops.len()
        } else if wide {
            1
        } else if within > 0 {
            splittable
        } else {
            loops.len().saturating_sub(1).max(1)
        };
        let (outer, rest) = loops.split_at(split);
        let outer_sizes: Vec<String> = outer.iter().map(|&a| sizes[a].clone()).collect();
        let (f, regions) = kc.open_part_loop(&outer_sizes);
        *opened += regions;
        for (&a, v) in outer.iter().zip(kc.b.delinearize(&f, &outer_sizes)) {
            idx[a] = v;
        }
        inner = rest;
    }
    for &a in inner {
        *opened += 1;
        idx[a] = kc.b.open_loop(&sizes[a]);
    }
    idx
}

impl Kc<'_> {
    /// Opens a loop over `0..n`, `n` the product of `sizes` (hoisted
    /// values), and in it a guard that keeps this call's part,
    /// `n·part/parts .. n·(part+1)/parts`. The loop keeps the whole
    /// walk's bounds, a constant where the sizes are: LLVM then compiles the
    /// body as without parts (with the part's bounds as the loop's, a
    /// context einsum ran 20% slower). Returns the loop's index and the
    /// regions opened (the caller closes them).
    fn open_part_loop(&mut self, sizes: &[String]) -> (String, usize) {
        let (n, bounds) = self.part_bounds(sizes);
        let f = self.b.open_loop(&n);
        // Not a CPU kernel: no parts.
        let Some((lo, hi)) = bounds else { return (f, 1) };
        let ge = self.b.op(&format!("arith.cmpi uge, {f}, {lo} : index"));
        let lt = self.b.ult(&f, &hi);
        let inside = self.b.op(&format!("arith.andi {ge}, {lt} : i1"));
        self.b.open_guard(&inside);
        (f, 2)
    }

    /// `n`, the product of `sizes` (hoisted values), and this call's part
    /// of `0..n`, `n·part/parts .. n·(part+1)/parts` (hoisted), where the
    /// kernel has parts (the CPU's).
    fn part_bounds(&mut self, sizes: &[String]) -> (String, Option<(String, String)>) {
        let mut n = sizes.first().cloned().unwrap_or_else(|| self.b.index(1));
        for s in sizes.iter().skip(1) {
            n = self.b.hoist(&format!("arith.muli {n}, {s} : index"));
        }
        let (Some(part), Some(parts)) = (self.b.dim(PART_KEY), self.b.dim(PARTS_KEY)) else { return (n, None) };
        let one = self.b.index(1);
        let next = self.b.hoist(&format!("arith.addi {part}, {one} : index"));
        let [lo, hi] = [part, next].map(|p| {
            let scaled = self.b.hoist(&format!("arith.muli {n}, {p} : index"));
            self.b.hoist(&format!("arith.divui {scaled}, {parts} : index"))
        });
        (n, Some((lo, hi)))
    }
}

/// Least constant trip count of a CPU kernel's outermost walk loop that is
/// split into parts alone, not flattened with the loops inside it.
const SPLIT_ALONE: i64 = 16;

/// The builder's names of the CPU kernels' parameters `%part` (the part
/// of the walk a call runs) and `%parts` (how many there are; see "Parts"
/// in the module docs): not valid dim names, so they never clash with one.
const PART_KEY: &str = "(part)";
const PARTS_KEY: &str = "(parts)";

/// The builder's name for the capacity parameter of runtime dim `dim` (not
/// a valid dim name, so it never clashes with one).
fn capacity_key(dim: &str) -> String {
    format!("capacity({dim})")
}

/// Prefixes every non-empty line with `levels` two-space indents.
fn indent(text: &str, levels: usize) -> String {
    let pad = "  ".repeat(levels);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if !line.is_empty() {
            out.push_str(&pad);
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl Kc<'_> {
    /// The pointer parameter of buffer `b`.
    pub(crate) fn ptr(&self, b: usize) -> Result<String, LowerError> {
        self.ptrs
            .get(&b)
            .cloned()
            .ok_or_else(|| mismatch(self.kernel, format!("reads buffer {b}, which is not one of its parameters")))
    }

    /// Index-typed sizes of stored buffer `b` as laid out in memory: its
    /// shape, with a pitched axis (see [`crate::lower::plan::Pitch`]) sized
    /// by its capacity parameter.
    pub(crate) fn storage_sizes(&mut self, b: usize) -> Result<Vec<String>, LowerError> {
        let buf = &self.program.buffers[b];
        let (shape, pitch) = (buf.shape.clone(), buf.pitch.clone());
        let mut sizes = self.sizes(&shape)?;
        if let Some(p) = pitch {
            let cap = self.b.dim(&capacity_key(&p.dim)).ok_or_else(|| {
                mismatch(self.kernel, format!("reads pitched buffer {b} without the capacity of `{}`", p.dim))
            })?;
            match sizes.get_mut(p.axis) {
                Some(s) => *s = cap,
                None => return Err(mismatch(self.kernel, format!("buffer {b} is pitched on axis {}", p.axis))),
            }
        }
        Ok(sizes)
    }

    /// `ceil(x / d)` for a hoisted `x` (hoisted).
    pub(crate) fn ceil_div(&mut self, x: &str, d: i64) -> String {
        let (dm1, dd) = (self.b.index(d - 1), self.b.index(d));
        let up = self.b.hoist(&format!("arith.addi {x}, {dm1} : index"));
        self.b.hoist(&format!("arith.divui {up}, {dd} : index"))
    }

    /// `ceil(x / d)` for a hoisted `x` and `d` (hoisted; `d` above 0).
    pub(crate) fn ceil_div_by(&mut self, x: &str, d: &str) -> String {
        let one = self.b.index(1);
        let up = self.b.hoist(&format!("arith.addi {x}, {d} : index"));
        let up = self.b.hoist(&format!("arith.subi {up}, {one} : index"));
        self.b.hoist(&format!("arith.divui {up}, {d} : index"))
    }

    /// `ceil(n / d)` computed where it is emitted (`n` or `d` a value of
    /// the body).
    pub(crate) fn ceil_div_here(&mut self, n: &str, d: &str) -> String {
        let one = self.b.index(1);
        let up = self.b.addi(n, d);
        let up = self.b.subi(&up, &one);
        self.b.op(&format!("arith.divui {up}, {d} : index"))
    }

    /// Index-typed sizes of a shape.
    pub(crate) fn sizes(&mut self, shape: &[crate::ir::Poly]) -> Result<Vec<String>, LowerError> {
        shape
            .iter()
            .map(|p| {
                let n = self
                    .graph
                    .dims
                    .normalize(p)
                    .map_err(|e| LowerError::Size { what: format!("size `{p}`"), message: e.to_string() })?;
                self.b.size(&n)
            })
            .collect()
    }

    /// An error about node `j`.
    pub(crate) fn unsupported(&self, j: usize, message: impl Into<String>) -> LowerError {
        let id = self.graph.nodes.get(j).map_or("?", |n| n.id.as_str());
        LowerError::Unsupported { node: id.to_owned(), message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::hf::{build, HfOptions};
    use crate::inspect::ShapePoint;
    use crate::interp::{random_inputs, run};
    use crate::lower::{plan, CpuStep};
    use crate::optimize::{optimize, Options};

    /// Head dim 64 (larger than the typical b, so V is the largest
    /// operand): the context einsum `acdxy,cyz->acdxz` of the bifurcated
    /// graph takes the output-vector path (four vectors per row), checked
    /// against the interpreter with b not a multiple of the tile and an
    /// empty decode cache; its pointers `noalias` on the CPU only.
    #[test]
    fn output_vector_contraction_matches_interpreter() {
        let config = r#"{"model_type": "llama", "hidden_size": 128, "intermediate_size": 48,
          "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 40,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 512}"#;
        let doc = build(config, &HfOptions { layers: Some(1), ..Default::default() }).expect("import-hf");
        let g = crate::import::from_value(&doc).expect("import");
        let point = ShapePoint::parse("b=64,m_c=4096,m_d=64").expect("point");
        let g = optimize(&g, &Options { point, ..Default::default() }).expect("optimize").graph;
        let program = plan(&g).expect("plan");
        let text = super::emit(&g, &program, super::Target::Cpu).expect("emit");
        assert!(text.contains("vector<16xf32>, !llvm.ptr"), "no output-vector store");
        // CPU kernels' buffers never overlap (see the ABI); the GPU's keep plain pointers.
        assert!(text.contains("!llvm.ptr {llvm.noalias}"), "CPU pointers are noalias");
        let gpu = super::emit(&g, &program, super::Target::Gpu).expect("emit");
        assert!(!gpu.contains("noalias"), "GPU pointers unchanged");
        let step = CpuStep::compile(&g).expect("compile");
        for (seed, (b, m_c, m_d)) in [(3, 5, 0), (9, 17, 2), (8, 1, 3)].into_iter().enumerate() {
            let p: BTreeMap<String, i64> =
                [("b", b), ("m_c", m_c), ("m_d", m_d)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let inputs = random_inputs(&g, &p, 5 + seed as u64).expect("inputs");
            let want = run(&g, &p, &inputs).expect("interp");
            let got = step.run(&p, &inputs).expect("run");
            for (out, w) in &want {
                let a = &got[out];
                assert_eq!(a.shape, w.shape, "{out} at {p:?}");
                let (mut diff, mut top) = (0.0f32, 1e-6f32);
                for (&x, &y) in a.data.iter().zip(&w.data) {
                    diff = diff.max((x - y).abs());
                    top = top.max(y.abs());
                }
                assert!(diff / top <= 1e-4, "{out} at {p:?}: {:e}", diff / top);
            }
        }
    }
}
