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
//! - Reads go through **views** without copies: transpose permutes the
//!   index, broadcast drops new leading axes and reads index 0 on stretched
//!   size-1 axes, slice adds its start, reshape linearizes and delinearizes
//!   with the (symbolic) sizes, and concat picks its part with index
//!   compares in an `scf.if` chain (only the selected part is loaded).
//! - **Inlined** elementwise nodes (see [`crate::lower::plan`]) are
//!   recomputed at every load.
//! - Reductions are `scf.for` loops with an f32 accumulator: einsum /
//!   matmul (contracted letters), reduce_sum / reduce_max, softmax (row max,
//!   sum of `exp(x - max)`, then the element; a fully `-inf` row gives 0),
//!   rms_norm (sum of squares), layer_norm (mean, then variance).
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
mod ops;
mod views;

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::ir::{Graph, Value};

use super::plan::{BufferKind, Kernel, Param, Program};
use super::LowerError;
use builder::Builder;

/// Which wrapper the kernels get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `func.func` with an `scf.for` over the elements.
    Cpu,
    /// `gpu.func` kernels in `gpu.module @bifurc_kernels`.
    Gpu,
}

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
    let layout = Layout::new(graph, program)?;
    let mut funcs = String::new();
    for kernel in &program.kernels {
        funcs.push_str(&kernel_fn(graph, program, &layout, kernel, target)?);
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
}

fn kernel_fn(
    graph: &Graph,
    program: &Program,
    layout: &Layout,
    kernel: &Kernel,
    target: Target,
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
    let mut kc = Kc { graph, program, layout, b: Builder::new(&dims), ptrs, kernel: &kernel.name };
    let sizes = kc.sizes(&out.shape)?;
    let extent = kc.b.size(&kernel.extent)?;
    let flat = "%i".to_owned();
    let idx = kc.b.delinearize(&flat, &sizes);
    let value = if kernel.op == "copy" {
        let v = graph
            .find(&kernel.node)
            .ok_or_else(|| mismatch(&kernel.name, format!("copies unknown `{}`", kernel.node)))?;
        kc.load(v, &idx)?
    } else {
        match graph.find(&kernel.node) {
            Some(Value::Node(j)) => kc.compute(j, &idx)?,
            _ => return Err(mismatch(&kernel.name, format!("computes unknown `{}`", kernel.node))),
        }
    };
    let out_ptr = kc.ptr(kernel.writes)?;
    kc.b.store(&out_ptr, &flat, out.dtype, value);
    let (hoist, body) = kc.b.finish();
    let sig = sig.join(", ");
    let name = &kernel.name;
    let mut f = String::new();
    match target {
        Target::Cpu => {
            let _ = writeln!(f, "  func.func @{name}({sig}) attributes {{llvm.emit_c_interface}} {{");
            f.push_str(&indent(&hoist, 2));
            let _ = writeln!(f, "    %c0_i = arith.constant 0 : index\n    %c1_i = arith.constant 1 : index");
            let _ = writeln!(f, "    scf.for {flat} = %c0_i to {extent} step %c1_i {{");
            f.push_str(&indent(&body, 3));
            let _ = writeln!(f, "    }}\n    return\n  }}");
        }
        Target::Gpu => {
            let _ = writeln!(f, "  gpu.func @{name}({sig}) kernel {{");
            f.push_str(&indent(&hoist, 2));
            let _ = writeln!(f, "    %bid = gpu.block_id x\n    %bdim = gpu.block_dim x\n    %tid = gpu.thread_id x");
            let _ =
                writeln!(f, "    %base = arith.muli %bid, %bdim : index\n    {flat} = arith.addi %base, %tid : index");
            let _ = writeln!(f, "    %inb = arith.cmpi ult, {flat}, {extent} : index\n    scf.if %inb {{");
            f.push_str(&indent(&body, 3));
            let _ = writeln!(f, "    }}\n    gpu.return\n  }}");
        }
    }
    Ok(f)
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
