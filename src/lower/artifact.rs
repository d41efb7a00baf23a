//! `bifurc compile`: a model graph to a GPU artifact — `step.ptx` and the
//! manifest beside it (`step.manifest.json`, see docs/artifact.md).
//!
//! Stages, each a plain function: optimize at the shape point (unless
//! `bifurcate` is off) → [`plan()`](fn@super::plan) → [`emit()`] for the GPU → [`to_shared_ptx`] →
//! manifest ([`bifurc_runtime::manifest::Manifest`]: dims, buffers, kernels
//! in launch order, bifurcated sites, bytes model). Same input, same bytes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use bifurc_runtime::manifest::{
    AttentionSite, Buffer as MBuffer, BufferKind as MBufferKind, ByteCounts, ByteExprs, BytesSummary, Dims as MDims,
    Kernel as MKernel, Manifest, Param as MParam, ParamKind, Pitch as MPitch, Size, BLOCK_SIZE, FORMAT,
};

use super::gpu::{find_libdevice, gpu_pipeline, to_shared_ptx, GpuTarget};
use super::kernel_bytes::{kernel_bytes, KernelBytes};
use super::{emit, emit_shared, plan_tuned, BufferKind, LowerError, Param, Program, Target, Tuning};
use crate::inspect::{bytes_moved, find_sites, Bytes, ShapePoint};
use crate::ir::{shape::numel, DType, Graph, OutputRole, Poly, Role};
use crate::optimize::{optimize, Limits, OptReport, Options};

/// What to compile and how.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// The chip the PTX is for.
    pub target: GpuTarget,
    /// Shape point for the optimizer's cost model and the `*_at_point`
    /// figures of the manifest; runtime dims not given take the defaults
    /// (b=32, m_c=8192, m_d=256).
    pub point: ShapePoint,
    /// Run the optimizer (bifurcate attention where it lowers bytes moved).
    pub bifurcate: bool,
    /// Re-type every float input and node to this storage dtype first.
    pub dtype: Option<DType>,
    /// libdevice.10.bc; `None` reads `BIFURC_LIBDEVICE`.
    pub libdevice: Option<PathBuf>,
    /// Optimizer limits.
    pub limits: Limits,
    /// Run bf16 / f16 contractions on tensor cores where they have enough
    /// rows at `point` (see [`crate::lower::mma`]).
    pub tensor_cores: bool,
    /// The tensor-core choices (defaults unless a tuning experiment sets
    /// them, see [`Tuning`]).
    pub tuning: Tuning,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            target: GpuTarget::default(),
            point: ShapePoint::default(),
            bifurcate: true,
            dtype: None,
            libdevice: None,
            limits: Limits::default(),
            tensor_cores: true,
            tuning: Tuning::default(),
        }
    }
}

/// Errors of [`compile`], by stage.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Point(#[from] crate::inspect::point::PointError),
    #[error("--dtype {0}: {1}")]
    Dtype(DType, String),
    /// (The optimizer's error is in the message, not a source: printed
    /// with its chain, `{:#}`, it came out twice.)
    #[error("optimize: {0}")]
    Optimize(crate::optimize::OptimizeError),
    #[error(transparent)]
    Bytes(#[from] crate::inspect::bytes::BytesError),
    #[error("bytes model of kernel `{kernel}`: {message}")]
    KernelBytes { kernel: String, message: String },
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error("the manifest does not validate (a bug in bifurc): {0}")]
    Manifest(String),
}

impl From<crate::optimize::OptimizeError> for CompileError {
    fn from(e: crate::optimize::OptimizeError) -> Self {
        CompileError::Optimize(e)
    }
}

/// A compiled decode step.
#[derive(Clone, Debug)]
pub struct Artifact {
    /// The PTX module: one `.entry` per distinct kernel code (each
    /// kernel's is its manifest `entry`).
    pub ptx: String,
    /// The manifest (its `ptx` field says `step.ptx` until [`Artifact::write`]
    /// names the real file).
    pub manifest: Manifest,
    /// The MLIR of every kernel (output of [`emit()`]); the PTX was compiled
    /// from its kernels of distinct code ([`emit_shared`]).
    pub mlir: String,
    /// The graph that was compiled (optimized unless `bifurcate` was off).
    pub graph: Graph,
    /// The GPU pass pipeline that ran.
    pub pipeline: String,
    /// The optimizer's report (`None` when `bifurcate` was off).
    pub report: Option<OptReport>,
    /// Names of the kernels that run on tensor cores (see
    /// [`crate::lower::mma`]), in launch order.
    pub tensor_core_kernels: Vec<String>,
}

/// The graph stage of [`compile`]: re-type (`dtype`) and optimize (unless
/// `bifurcate` is off). Returns the graph to lower and the report.
pub fn prepare(graph: &Graph, opts: &CompileOptions) -> Result<(Graph, Option<OptReport>), CompileError> {
    let retyped;
    let graph = match opts.dtype {
        Some(dtype) => {
            retyped = retype(graph, dtype)?;
            &retyped
        }
        None => graph,
    };
    let point = opts.point.for_graph(graph)?;
    if !opts.bifurcate {
        return Ok((graph.clone(), None));
    }
    let out = optimize(graph, &Options { point, limits: opts.limits.clone() })?;
    Ok((out.graph, Some(out.report)))
}

/// The MLIR stage of [`compile`]: [`prepare`], [`plan()`](fn@super::plan), [`emit()`] for the
/// GPU. Returns the lowered graph and the kernel module's text.
pub fn lower_mlir(graph: &Graph, opts: &CompileOptions) -> Result<(Graph, String), CompileError> {
    let (lowered, _) = prepare(graph, opts)?;
    let point = opts.point.for_graph(&lowered)?;
    let program = plan_tuned(&lowered, opts.tensor_cores.then_some((&point.0, opts.tuning)))?;
    let mlir = emit(&lowered, &program, Target::Gpu)?;
    Ok((lowered, mlir))
}

/// Compiles `graph` to a GPU artifact: optimize → plan → emit (GPU) → PTX → manifest.
pub fn compile(graph: &Graph, opts: &CompileOptions) -> Result<Artifact, CompileError> {
    let libdevice = find_libdevice(opts.libdevice.as_deref())?;
    let (lowered, report) = prepare(graph, opts)?;
    let point = opts.point.for_graph(&lowered)?;
    let program = plan_tuned(&lowered, opts.tensor_cores.then_some((&point.0, opts.tuning)))?;
    let module = emit_shared(&lowered, &program, Target::Gpu, None)?;
    // Kernels with the same text compile once; the compiled module may
    // merge more (same code, other text).
    let shared = to_shared_ptx(&module.shared, opts.target, &libdevice)?;
    let entries = module
        .entries
        .iter()
        .map(|(kernel, first)| {
            let entry = shared.entries.get(first).ok_or_else(|| {
                CompileError::Lower(LowerError::Ptx(format!("kernel `{first}` has no entry in the compiled module")))
            })?;
            Ok((kernel.clone(), entry.clone()))
        })
        .collect::<Result<BTreeMap<_, _>, CompileError>>()?;
    // Bytes before: the input graph as given (re-typed), at the same point.
    let before_graph = match opts.dtype {
        Some(dtype) => retype(graph, dtype)?,
        None => graph.clone(),
    };
    let manifest = build_manifest(&before_graph, &lowered, &program, &entries, report.as_ref(), &point, opts)?;
    Ok(Artifact {
        ptx: shared.ptx,
        manifest,
        mlir: module.text,
        graph: lowered,
        pipeline: gpu_pipeline(opts.target.chip(), &libdevice),
        report,
        tensor_core_kernels: program.kernels.iter().filter(|k| k.mma.is_some()).map(|k| k.name.clone()).collect(),
    })
}

/// `graph` with every float input and node stored as `dtype` (checked by re-import).
fn retype(graph: &Graph, dtype: DType) -> Result<Graph, CompileError> {
    if !dtype.is_float() {
        return Err(CompileError::Dtype(dtype, "not a float type (use f32, f16 or bf16)".to_string()));
    }
    let mut out = graph.clone();
    for input in &mut out.inputs {
        if input.dtype.is_float() {
            input.dtype = dtype;
        }
    }
    for node in &mut out.nodes {
        if node.dtype.is_float() {
            node.dtype = dtype;
        }
    }
    if out.meta.contains_key("dtype") {
        out.meta.insert("dtype".to_string(), dtype.name().to_string());
    }
    crate::import::from_value(&crate::export::to_json(&out)).map_err(|e| CompileError::Dtype(dtype, e.to_string()))
}

fn size(p: &Poly) -> Size {
    match p.as_constant() {
        Some(c) => Size::Int(c),
        None => Size::Expr(p.to_string()),
    }
}

fn counts(b: &Bytes) -> ByteCounts {
    let r = |x: f64| x.round() as i64;
    ByteCounts {
        weights: r(b.weights),
        context_kv: r(b.context_kv),
        decode_kv: r(b.decode_kv),
        activations: r(b.activations),
        total: r(b.total()),
    }
}

fn kv_name(kv: crate::ir::Kv) -> Option<String> {
    Some(kv.name().to_string())
}

fn build_manifest(
    before_graph: &Graph,
    graph: &Graph,
    program: &Program,
    entries: &BTreeMap<String, String>,
    report: Option<&OptReport>,
    point: &ShapePoint,
    opts: &CompileOptions,
) -> Result<Manifest, CompileError> {
    let dims = MDims {
        runtime: program.dims.clone(),
        constants: graph.dims.constants.iter().cloned().collect::<BTreeMap<_, _>>(),
    };

    let buffers = program
        .buffers
        .iter()
        .map(|b| {
            let (kind, role, layer, kv) = match b.kind {
                BufferKind::Input(role) => {
                    let (layer, kv) = match role {
                        Role::ContextKv { layer, kv } | Role::DecodeKv { layer, kv } => (Some(layer), kv_name(kv)),
                        _ => (None, None),
                    };
                    (MBufferKind::Input, Some(role.name().to_string()), layer, kv)
                }
                BufferKind::Output(role) => {
                    let (layer, kv) = match role {
                        OutputRole::NewKv { layer, kv } => (Some(layer), kv_name(kv)),
                        _ => (None, None),
                    };
                    (MBufferKind::Output, Some(role.name().to_string()), layer, kv)
                }
                BufferKind::Intermediate => (MBufferKind::Intermediate, None, None, None),
            };
            let elements = numel(&graph.dims, &b.shape)
                .map_err(|message| LowerError::Size { what: format!("buffer `{}`", b.name), message })?;
            let bytes = elements
                .mul(&Poly::constant(b.dtype.size() as i64))
                .map_err(|e| LowerError::Size { what: format!("buffer `{}`", b.name), message: e.to_string() })?;
            Ok(MBuffer {
                name: b.name.clone(),
                kind,
                role,
                layer,
                kv,
                shape: b.shape.iter().map(size).collect(),
                dtype: b.dtype.name().to_string(),
                bytes: size(&bytes),
                pitch: b.pitch.as_ref().map(|p| MPitch { axis: p.axis, dim: p.dim.clone() }),
            })
        })
        .collect::<Result<Vec<_>, CompileError>>()?;

    let per_kernel = kernel_bytes(graph, program)
        .map_err(|message| CompileError::KernelBytes { kernel: "(all)".to_string(), message })?;
    let mut kernels = Vec::with_capacity(program.kernels.len());
    for (kernel, bytes) in program.kernels.iter().zip(&per_kernel) {
        let fail = |message: String| CompileError::KernelBytes { kernel: kernel.name.clone(), message };
        let total = bytes.total().map_err(fail)?;
        let at_point = graph.dims.eval(&total, &point.0).map_err(|e| fail(e.to_string()))?;
        // A cooperative kernel: one block per item (warp items: eight to a
        // block); a tensor-core kernel: one block per output tile.
        let (extent, grid) = match &kernel.mma {
            Some(mma) => {
                let tiles = mma.tiles();
                match tiles.parse::<i64>() {
                    Ok(t) => (Size::Int(t * BLOCK_SIZE), Size::Int(t)),
                    Err(_) => (Size::Expr(format!("{BLOCK_SIZE}*{tiles}")), Size::Expr(tiles)),
                }
            }
            None => {
                let threads = kernel.gpu_threads(BLOCK_SIZE)?;
                let grid = if kernel.cooperative && !kernel.warp { size(&kernel.extent) } else { grid_size(&threads) };
                (size(&threads), grid)
            }
        };
        let entry = entries
            .get(&kernel.name)
            .ok_or_else(|| LowerError::Ptx(format!("kernel `{}` has no .entry in the compiled module", kernel.name)))?;
        kernels.push(MKernel {
            name: kernel.name.clone(),
            entry: entry.clone(),
            node: kernel.node.clone(),
            op: kernel.op.clone(),
            params: kernel
                .params
                .iter()
                .map(|p| match p {
                    Param::Dim(name) => MParam { name: name.clone(), kind: ParamKind::Dim, ty: "i64".to_string() },
                    Param::Capacity(name) => {
                        MParam { name: name.clone(), kind: ParamKind::Capacity, ty: "i64".to_string() }
                    }
                    Param::Buffer(i) => MParam {
                        name: program.buffers[*i].name.clone(),
                        kind: ParamKind::Buffer,
                        ty: "ptr".to_string(),
                    },
                })
                .collect(),
            reads: kernel.reads.iter().map(|&i| program.buffers[i].name.clone()).collect(),
            writes: program.buffers[kernel.writes].name.clone(),
            extent,
            grid: [grid, Size::Int(1), Size::Int(1)],
            block: [Size::Int(BLOCK_SIZE), Size::Int(1), Size::Int(1)],
            bytes: byte_exprs(bytes, &total),
            bytes_at_point: at_point,
        });
    }

    let before = bytes_moved(before_graph, point)?;
    let after = match report {
        Some(r) => r.after.clone(),
        None => before.clone(),
    };
    let attention = match report {
        Some(r) => r
            .sites
            .iter()
            .map(|s| AttentionSite {
                node: s.node.clone(),
                context: s.context.clone(),
                bifurcated: s.rewritten,
                reason: s.reason.clone(),
                bytes_before: s.bytes_before.round() as i64,
                bytes_after: s.bytes_after.round() as i64,
            })
            .collect(),
        None => find_sites(before_graph)
            .into_iter()
            .map(|s| {
                let read = before.per_input.get(&s.context).copied().unwrap_or(0.0).round() as i64;
                AttentionSite {
                    node: before_graph.nodes[s.node].id.clone(),
                    context: before_graph.inputs[s.context].name.clone(),
                    bifurcated: false,
                    reason: "not optimized (--no-bifurcate)".to_string(),
                    bytes_before: read,
                    bytes_after: read,
                }
            })
            .collect(),
    };
    let predicted_speedup = if after.total() > 0.0 { before.total() / after.total() } else { 1.0 };

    let manifest = Manifest {
        format: FORMAT.to_string(),
        ptx: "step.ptx".to_string(),
        target: opts.target.chip().to_string(),
        bifurcate: opts.bifurcate,
        tuning: if opts.tensor_cores { opts.tuning.describe() } else { String::new() },
        model: graph.meta.clone(),
        dims,
        point: point.0.clone(),
        buffers,
        kernels,
        attention,
        bytes: BytesSummary { before: counts(&before), after: counts(&after), predicted_speedup },
    };
    manifest.validate().map_err(|e| CompileError::Manifest(e.to_string()))?;
    Ok(manifest)
}

/// `ceil((extent)/256)`, folded when the extent is a constant.
fn grid_size(extent: &Poly) -> Size {
    match extent.as_constant() {
        Some(c) => Size::Int((c + BLOCK_SIZE - 1).div_euclid(BLOCK_SIZE)),
        None => Size::Expr(format!("ceil(({extent})/{BLOCK_SIZE})")),
    }
}

fn byte_exprs(b: &KernelBytes, total: &Poly) -> ByteExprs {
    ByteExprs {
        weights: size(&b.weights),
        context_kv: size(&b.context_kv),
        decode_kv: size(&b.decode_kv),
        activations: size(&b.activations),
        total: size(total),
    }
}

impl Artifact {
    /// Where [`Artifact::write`] puts the manifest for a PTX path:
    /// `dir/step.ptx` → `dir/step.manifest.json`.
    pub fn manifest_path(ptx_path: &Path) -> PathBuf {
        let stem = ptx_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "step".into());
        ptx_path.with_file_name(format!("{stem}.manifest.json"))
    }

    /// Where [`Artifact::write`] puts the compiled graph for a PTX path:
    /// `dir/step.ptx` → `dir/step.graph.json` (the canonical model.json of
    /// [`Artifact::graph`], which `bifurc run --device cpu` JIT-compiles).
    pub fn graph_path(ptx_path: &Path) -> PathBuf {
        let stem = ptx_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "step".into());
        ptx_path.with_file_name(format!("{stem}.graph.json"))
    }

    /// The manifest as written beside `ptx_path` (its `ptx` field names that file).
    pub fn manifest_for(&self, ptx_path: &Path) -> Manifest {
        let mut manifest = self.manifest.clone();
        if let Some(name) = ptx_path.file_name() {
            manifest.ptx = name.to_string_lossy().into_owned();
        }
        manifest
    }

    /// Writes the PTX to `ptx_path`, and beside it the compiled graph
    /// ([`Artifact::graph_path`]) and the manifest
    /// ([`Artifact::manifest_path`]). All three files are staged as
    /// temporaries in the same directory and renamed into place only when
    /// all are written: a failure leaves any previous artifact as it was and
    /// no temporary files behind.
    pub fn write(&self, ptx_path: &Path) -> std::io::Result<()> {
        if ptx_path.file_name().is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: not a file path", ptx_path.display()),
            ));
        }
        let manifest_path = Self::manifest_path(ptx_path);
        let manifest = self.manifest_for(ptx_path).to_json();
        let graph_path = Self::graph_path(ptx_path);
        let graph = crate::export::to_string(&crate::export::to_json(&self.graph));
        let files = [
            (ptx_path, self.ptx.as_bytes()),
            (graph_path.as_path(), graph.as_bytes()),
            (manifest_path.as_path(), manifest.as_bytes()),
        ];
        for (path, _) in &files {
            if path.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    format!("{} is a directory", path.display()),
                ));
            }
        }
        let mut staged: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for (path, bytes) in &files {
                let tmp = temp_path(path);
                staged.push(tmp.clone());
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(bytes)?;
                file.sync_all()?;
            }
            // Manifest last: an engine that finds the new manifest finds the new PTX and graph.
            for ((path, _), tmp) in files.iter().zip(&staged) {
                std::fs::rename(tmp, path)?;
            }
            Ok(())
        })();
        if result.is_err() {
            for tmp in &staged {
                let _ = std::fs::remove_file(tmp);
            }
        }
        result
    }
}

/// `.{name}.{pid}.tmp` beside `path` (the pattern of [`crate::fsio::write_atomic`]).
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}
