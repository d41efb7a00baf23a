//! Emits a planned [`Program`] as textual MLIR: one function per kernel.
//!
//! # Kernel structure
//!
//! Every kernel computes the elements of one buffer (its `writes`), one
//! element per thread (GPU) or loop iteration (CPU). A flat index
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
//!   with the (symbolic) sizes, and concat picks its part with index
//!   compares in an `scf.if` chain (only the selected part is loaded).
//! - **Inlined** elementwise nodes (see [`crate::lower::plan`]) are
//!   recomputed at every load.
//! - Reductions are `scf.for` loops with an f32 accumulator: einsum /
//!   matmul (contracted letters), reduce_sum / reduce_max, softmax (row max,
//!   sum of `exp(x - max)`, then the row's elements; a fully `-inf` row
//!   gives 0), rms_norm (sum of squares), layer_norm (mean, then variance).
//! - rope reads `x[.., j]` and its partner `x[.., j ± k/2]`, with
//!   `angle = pos * theta^(-2 (j mod k/2) / k)` and `math.cos`/`math.sin`
//!   in f32; gather reads the id, and yields NaN for an id outside the table
//!   (it never reads out of bounds).
//! - Math: `math.exp`, `math.tanh`, `math.erf`, `math.sqrt`, `math.powf`,
//!   `math.cos`, `math.sin`; gelu = `0.5 x (1 + erf(x / sqrt 2))`, the tanh
//!   form per GPT-2, silu = `x / (1 + exp(-x))`, rsqrt = `1 / sqrt(x)`.
//!   Accumulation is f32 throughout.
//!
//! # ABI (identical for CPU and GPU)
//!
//! Parameters, in [`crate::lower::plan::Kernel::params`] order: every
//! runtime dim in `graph.dims.runtime` order as `i64`, then every buffer the
//! kernel reads (ascending buffer index), then the buffer it writes, each as
//! an `!llvm.ptr`: a bare pointer to contiguous row-major data of the
//! buffer's dtype (f32, f16 and bf16 as their IEEE / bfloat16 bits, i32,
//! i64). Floats are widened to f32 on load and rounded (to nearest even) on
//! store. A zero-size buffer may be passed as any non-null pointer; nothing
//! is read from or written to it.
//!
//! - CPU ([`Target::Cpu`]): `func.func @k{i}_{node}(params) attributes
//!   {llvm.emit_c_interface}` whose body is `scf.for %i = 0 to extent`.
//! - GPU ([`Target::Gpu`]): `gpu.func @k{i}_{node}(params) kernel` inside
//!   `gpu.module @bifurc_kernels` (module attribute `gpu.container_module`);
//!   `%i = block_id.x * block_dim.x + thread_id.x`, guarded by
//!   `%i < extent`. Launch a 1-D grid of `ceil(extent / block)` blocks.
//!
//! The text is deterministic: same graph and program, same bytes.

mod builder;
mod mma;
mod ops;
mod views;
mod walk;

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::ir::{shape::numel, DType, Graph, Poly, Value};

use super::plan::{BufferKind, Kernel, Param, Program, COMBINE_OP};
use super::LowerError;
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

/// Block of the innermost kept axis of a tiled CPU contraction (16 f32 =
/// one 64-byte cache line of output).
const BLOCK: usize = 16;

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
                Some(Value::Node(j)) if k.writes < program.buffers.len() => node_buf[j] = Some(k.writes),
                _ => return Err(mismatch(&k.name, format!("computes `{}`, which is not a node of the graph", k.node))),
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

fn emit_with(
    graph: &Graph,
    program: &Program,
    target: Target,
    emulation: Option<Emulation>,
) -> Result<String, LowerError> {
    let layout = Layout::new(graph, program)?;
    let mut funcs = String::new();
    for kernel in &program.kernels {
        funcs.push_str(&kernel_fn(graph, program, &layout, kernel, target, emulation)?);
    }
    Ok(match target {
        Target::Cpu => format!("module {{\n{funcs}}}\n"),
        Target::Gpu => format!(
            "module attributes {{gpu.container_module}} {{\n  gpu.module @{GPU_MODULE} {{\n{}  }}\n}}\n",
            indent(&funcs, 2)
        ),
    })
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
/// [`Lanes::Emulated`]), so that the reference interpreter can check them:
/// `lanes` threads per block, and contractions over at least
/// `cooperative_min` elements made cooperative (the GPU uses
/// [`crate::lower::plan::COOPERATIVE_MIN`]). Tensor-core kernels (the
/// program's [`crate::lower::plan::Kernel::mma`]) are always emulated with
/// their 8 warps of 32 lanes (see `emit::mma`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emulation {
    pub lanes: usize,
    pub cooperative_min: i64,
    /// The tensor-core choices the program is planned with.
    pub tuning: crate::lower::mma::Tuning,
}

fn kernel_fn(
    graph: &Graph,
    program: &Program,
    layout: &Layout,
    kernel: &Kernel,
    target: Target,
    emulation: Option<Emulation>,
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
                sig.push(format!("{name}: !llvm.ptr"));
            }
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
    };
    let sizes = kc.sizes(&out.shape)?;
    let flat = "%i".to_owned();
    let out_ptr = kc.ptr(kernel.writes)?;
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
    let extent = if let Some((m, mode, j)) = mma {
        if mode == MmaMode::Gpu {
            // The block id is the item: a tile, or eight along n (see `mma`).
            kc.lanes = Lanes::Block;
        }
        kc.mma_kernel(j, m, &flat, (&out_ptr, out.dtype, sizes.clone()), mode, &mut opened)?
    } else if kernel.op == COMBINE_OP {
        // A split reduction's partial sums, added in order of the split.
        let ws = match kernel.reads.as_slice() {
            [ws] => *ws,
            _ => return Err(mismatch(&kernel.name, "a combine kernel reads one workspace".to_string())),
        };
        let splits = program.buffers[ws].shape.first().and_then(Poly::as_constant).unwrap_or(0);
        let ws_ptr = kc.ptr(ws)?;
        let idx = walk_index(&mut kc, target, &flat, &sizes, &mut opened);
        let off = if target == Target::Cpu { kc.b.linearize(&idx, &sizes) } else { flat.clone() };
        let count = kc.b.size(&kernel.extent)?;
        let mut total: Option<String> = None;
        for s in 0..splits {
            let at = if s == 0 {
                off.clone()
            } else {
                let sc = kc.b.index(s);
                let base = kc.b.muli(&count, &sc);
                kc.b.addi(&base, &off)
            };
            let v = kc.b.load(&ws_ptr, &at, DType::F32).ssa;
            total = Some(kc.b.add_in_order(total, v));
        }
        let total = total.ok_or_else(|| mismatch(&kernel.name, "a workspace of no partial sums".to_string()))?;
        kc.b.store(&out_ptr, &off, out.dtype, builder::Val::f32(total));
        kc.b.size(&kernel.extent)?
    } else {
        match (walk::walk(graph, node, target, cooperative_min), node) {
            (Walk::Rows { axis }, Some(j)) if axis < sizes.len() && kc.row_axis(j) == Some(axis) => {
                // One iteration (CPU) or thread (GPU) per lane: the same body
                // on both targets.
                let mut outer_shape = out.shape.clone();
                outer_shape.remove(axis);
                let lanes = numel(&graph.dims, &outer_shape)
                    .map_err(|message| LowerError::Size { what: format!("lanes of `{}`", kernel.name), message })?;
                if !graph.dims.same(&lanes, &kernel.extent) {
                    return Err(mismatch(
                        &kernel.name,
                        format!("row kernel has extent `{}`, not its {lanes} lanes", kernel.extent),
                    ));
                }
                let mut outer = sizes.clone();
                outer.remove(axis);
                kc.lanes = match (target, emulation) {
                    (Target::Gpu, _) => Lanes::Block,
                    (Target::Cpu, Some(e)) => Lanes::Emulated(e.lanes.max(1)),
                    (Target::Cpu, None) => Lanes::Whole,
                };
                let mut idx = walk_index(&mut kc, target, &flat, &outer, &mut opened);
                idx.insert(axis, kc.b.index(0));
                kc.row_lane(j, &idx, &sizes, &out_ptr, out.dtype)?;
                kc.b.size(&lanes)?
            }
            (Walk::Reuse { keep, reuse, tile }, Some(j)) => {
                let pick = |axes: &[usize]| -> Vec<Poly> { axes.iter().map(|&a| out.shape[a].clone()).collect() };
                let (keep_sizes, reuse_sizes) = (kc.sizes(&pick(&keep))?, kc.sizes(&pick(&reuse))?);
                let size = |kc: &mut Kc, shape: &[Poly]| -> Result<String, LowerError> {
                    let p = numel(&graph.dims, shape)
                        .map_err(|message| LowerError::Size { what: format!("kernel `{}`", kernel.name), message })?;
                    kc.b.size(&p)
                };
                let (outer, inner) = (size(&mut kc, &pick(&keep))?, size(&mut kc, &pick(&reuse))?);
                // Tiles along the reuse index: `tiles = ceil(inner / tile)`.
                let tile = tile.max(1);
                let tiles = if tile == 1 {
                    inner.clone()
                } else {
                    let t1 = kc.b.index(tile as i64 - 1);
                    let t = kc.b.index(tile as i64);
                    let up = kc.b.hoist(&format!("arith.addi {inner}, {t1} : index"));
                    kc.b.hoist(&format!("arith.divui {up}, {t} : index"))
                };
                // CPU: the innermost kept axis of size other than 1 is walked in
                // blocks of BLOCK, the reuse tiles inside a block, the block's
                // elements innermost: a tile's stores then fill whole cache
                // lines, and the block's slice of the large operand stays in L1
                // across the tiles (without blocking, consecutive stores are a
                // reuse stride apart: cache-set conflicts).
                let block = match target {
                    Target::Cpu if tile > 1 => keep_sizes.iter().rposition(|s| kc.b.known(s) != Some(1)),
                    _ => None,
                };
                let mut walk_sizes = keep_sizes.clone();
                if let Some(pos) = block {
                    let (b1, bn) = (kc.b.index(BLOCK as i64 - 1), kc.b.index(BLOCK as i64));
                    let up = kc.b.hoist(&format!("arith.addi {}, {b1} : index", keep_sizes[pos]));
                    walk_sizes[pos] = kc.b.hoist(&format!("arith.divui {up}, {bn} : index"));
                }
                walk_sizes.push(tiles.clone());
                let mut at = walk_index(&mut kc, target, &flat, &walk_sizes, &mut opened);
                let tile_index = at.pop().unwrap_or_default();
                // A block along the output's last axis whose outputs are one
                // vector (see `Kc::out_lanes`): no loop over its elements.
                let vector = block
                    .filter(|&pos| keep[pos] + 1 == sizes.len() && BLOCK == CPU_SIMD)
                    .and_then(|pos| kc.out_lanes(j, kc.b.known(&keep_sizes[pos]), out.dtype == crate::ir::DType::F32));
                if let Some(pos) = block {
                    let bn = kc.b.index(BLOCK as i64);
                    let start = kc.b.muli(&at[pos], &bn);
                    if vector.is_some() {
                        at[pos] = start;
                    } else {
                        let left = kc.b.subi(&keep_sizes[pos], &start);
                        let ub = kc.b.op(&format!("arith.minui {left}, {bn} : index"));
                        let inner = kc.b.open_loop(&ub);
                        opened += 1;
                        at[pos] = kc.b.addi(&start, &inner);
                    }
                }
                let mut idxs = Vec::with_capacity(tile);
                let mut guards = Vec::with_capacity(tile);
                let last = if tile == 1 {
                    None
                } else {
                    let one = kc.b.index(1);
                    Some(kc.b.hoist(&format!("arith.subi {inner}, {one} : index")))
                };
                let base = if tile == 1 {
                    tile_index.clone()
                } else {
                    let t = kc.b.index(tile as i64);
                    kc.b.muli(&tile_index, &t)
                };
                for t in 0..tile {
                    // Lanes past the end compute the last valid output again
                    // (in bounds) and do not store it.
                    let r = match &last {
                        None => base.clone(),
                        Some(last) => {
                            let off = kc.b.index(t as i64);
                            let r = if t == 0 { base.clone() } else { kc.b.addi(&base, &off) };
                            let divides = kc.b.known(&inner).is_some_and(|n| n % tile as i64 == 0);
                            guards.push(if t == 0 || divides { None } else { Some(kc.b.ult(&r, &inner)) });
                            kc.b.op(&format!("arith.minui {r}, {last} : index"))
                        }
                    };
                    let inner_idx = kc.b.delinearize(&r, &reuse_sizes);
                    let mut idx = vec![String::new(); sizes.len()];
                    for (a, v) in keep.iter().zip(&at).chain(reuse.iter().zip(&inner_idx)) {
                        idx[*a] = v.clone();
                    }
                    idxs.push(idx);
                }
                let values = match vector {
                    Some(lanes) => kc.einsum_out_vec(j, &idxs, lanes)?.into_iter().map(builder::Val::f32).collect(),
                    None => kc.compute_tile(j, &idxs)?,
                };
                for (t, (idx, v)) in idxs.iter().zip(values).enumerate() {
                    let guard = guards.get(t).cloned().flatten();
                    if let Some(g) = &guard {
                        kc.b.open_guard(g);
                    }
                    let off = kc.b.linearize(idx, &sizes);
                    match vector {
                        Some(lanes) => kc.b.store_f32_vector(&out_ptr, &off, &v.ssa, lanes),
                        None => kc.b.store(&out_ptr, &off, out.dtype, v),
                    }
                    if guard.is_some() {
                        kc.b.close();
                    }
                }
                if tile == 1 {
                    kc.b.size(&kernel.extent)?
                } else {
                    kc.b.hoist(&format!("arith.muli {outer}, {tiles} : index"))
                }
            }
            (Walk::Cooperative { keep, reuse }, Some(j)) => {
                // GPU: one block (or warp) per index of the kept axes (`flat`
                // is the block id, or the warp's index); it computes the
                // outputs along the reuse axes in turn, its threads splitting
                // each one's sum, `gpu.all_reduce` (shuffles) adding the
                // parts, thread (lane) 0 storing it. CPU: the emulation of
                // that, one iteration per kept index.
                let gpu = target == Target::Gpu;
                kc.lanes = match (gpu, kernel.warp) {
                    (true, false) => Lanes::Block,
                    (true, true) => Lanes::Warp,
                    (false, _) => Lanes::Emulated(emulation.map_or(1, |e| e.lanes.max(1))),
                };
                let pick = |axes: &[usize]| -> Vec<String> { axes.iter().map(|&a| sizes[a].clone()).collect() };
                let (keep_sizes, reuse_sizes) = (pick(&keep), pick(&reuse));
                let at = walk_index(&mut kc, target, &flat, &keep_sizes, &mut opened);
                let mut count = kc.b.index(1);
                for s in &reuse_sizes {
                    count = kc.b.muli(&count, s);
                }
                let r = kc.b.open_loop(&count);
                opened += 1;
                let inner = kc.b.delinearize(&r, &reuse_sizes);
                let mut idx = vec![String::new(); sizes.len()];
                for (a, v) in keep.iter().zip(&at).chain(reuse.iter().zip(&inner)) {
                    idx[*a] = v.clone();
                }
                let value = kc.compute(j, &idx)?;
                let off = kc.b.linearize(&idx, &sizes);
                if gpu {
                    let c0 = kc.b.index(0);
                    let thread = if kernel.warp { "%lane" } else { "%tid" };
                    let first = kc.b.op(&format!("arith.cmpi eq, {thread}, {c0} : index"));
                    kc.b.open_guard(&first);
                    kc.b.store(&out_ptr, &off, out.dtype, value);
                    kc.b.close();
                } else {
                    kc.b.store(&out_ptr, &off, out.dtype, value);
                }
                kc.b.size(&kernel.extent)?
            }
            (_, node) => {
                if let Some(j) = node.filter(|&j| kc.row_axis(j).is_some()) {
                    return Err(kc.unsupported(j, "row kernel without a row walk"));
                }
                let idx = walk_index(&mut kc, target, &flat, &sizes, &mut opened);
                let value = match node {
                    Some(j) => kc.compute(j, &idx)?,
                    None => {
                        let v = graph
                            .find(&kernel.node)
                            .ok_or_else(|| mismatch(&kernel.name, format!("copies unknown `{}`", kernel.node)))?;
                        kc.load(v, &idx)?
                    }
                };
                let off = if target == Target::Cpu { kc.b.linearize(&idx, &sizes) } else { flat.clone() };
                kc.b.store(&out_ptr, &off, out.dtype, value);
                kc.b.size(&kernel.extent)?
            }
        }
    };
    for _ in 0..opened {
        kc.b.close();
    }
    let (hoist, body) = kc.b.finish();
    let sig = sig.join(", ");
    let name = &kernel.name;
    let mut f = String::new();
    match target {
        Target::Cpu => {
            let _ = writeln!(f, "  func.func @{name}({sig}) attributes {{llvm.emit_c_interface}} {{");
            f.push_str(&indent(&hoist, 2));
            // The walk is the loop nest in `body` (see `walk_index`).
            let _ = extent;
            f.push_str(&indent(&body, 2));
            let _ = writeln!(f, "    return\n  }}");
        }
        Target::Gpu => {
            // Shared memory for the partial tiles of a split tensor-core kernel.
            let workgroup = match mma.and_then(|(m, _, _)| mma::workgroup(m)) {
                Some(w) => format!(" {w}"),
                None => String::new(),
            };
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
/// `opened`; the caller closes them): no division per element. GPU: the
/// flat thread index delinearized.
fn walk_index(kc: &mut Kc, target: Target, flat: &str, sizes: &[String], opened: &mut usize) -> Vec<String> {
    if target != Target::Cpu {
        return kc.b.delinearize(flat, sizes);
    }
    sizes
        .iter()
        .map(|s| {
            if kc.b.known(s) == Some(1) {
                kc.b.index(0)
            } else {
                *opened += 1;
                kc.b.open_loop(s)
            }
        })
        .collect()
}

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
    /// empty decode cache.
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
