//! The compiled step on the CPU: the [`Target::Cpu`] module lowered with
//! [`CPU_PIPELINE`] and JIT-compiled by MLIR's ExecutionEngine.
//!
//! One compilation serves every point: runtime dims are kernel parameters.
//! [`CpuStep::run`] allocates every buffer at the point (storage dtypes:
//! f32, f16/bf16 bits, i32, i64; f32 inputs are read in place), runs the
//! kernels in launch order through their packed wrappers, and returns the
//! outputs as f32 [`Tensor`]s.

mod host;
mod layout;
mod lines;
mod masks;
mod panels;
mod parts;
mod peak;
mod plans;
mod scratch;
mod stored;

pub use host::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use parts::PARALLEL_MIN_BYTES;
pub use peak::{memory_read_rate, peak_multiply_adds};
pub use stored::Stored;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::time::{Duration, Instant};

use melior::ir::Module;

use crate::interp::{Tensor, MAX_ELEMENTS};
use crate::ir::{DType, Graph};
use crate::lower::context::DiagnosticCapture;
use crate::lower::emit::{emit_shared_plans, Emulation, SharedPlans, Target};
use crate::lower::plan::{plan_tuned, plans_cpu, typical_point, Buffer, BufferKind, Param, Program};
use crate::lower::{new_context, run_pipeline, verify, LowerError};
use host::HostData;
use layout::Kept;
pub(crate) use panels::Pairing;
use parts::run_parts;
use plans::Compiled;

/// The pass pipeline that takes the emitted CPU module (func, scf, arith,
/// math, llvm pointer ops) to the LLVM dialect. `arith-expand{include-bf16}`
/// rewrites bf16 `extf`/`truncf` into integer ops (no soft-float calls);
/// `convert-math-to-libm` takes what `convert-math-to-llvm` leaves
/// to libm calls, resolved in the host process (`exp`, `tanh` and `erf`
/// are emitted as arithmetic: see `emit`);
/// `convert-vector-to-llvm` lowers the SIMD contraction loops' broadcasts
/// and reductions.
pub const CPU_PIPELINE: &str = "builtin.module(canonicalize,cse,func.func(convert-scf-to-cf),\
arith-expand{include-bf16=true},convert-math-to-llvm,convert-math-to-libm,convert-vector-to-llvm,convert-arith-to-llvm,\
convert-index-to-llvm,convert-cf-to-llvm,convert-func-to-llvm,reconcile-unrealized-casts)";

/// JIT optimization level (as `-O3`).
const OPT_LEVEL: i32 = 3;

/// Wall time of every kernel of one run, in launch order, by kernel name.
pub type KernelTimes = Vec<(String, Duration)>;

/// The inputs of a run: f32 tensors (converted to their storage dtype by
/// the run) or [`Stored`] ones.
#[derive(Clone, Copy)]
enum Inputs<'a> {
    Tensors(&'a HashMap<String, Tensor>),
    Stored(&'a HashMap<String, Stored>),
}

/// A packed wrapper: `void (void **args)`.
type Packed = unsafe extern "C" fn(*mut *mut c_void);

/// Owns an `MlirExecutionEngine`.
struct Engine(mlir_sys::MlirExecutionEngine);

impl Engine {
    /// Parses and verifies `text` (a module of `func.func`s with
    /// `llvm.emit_c_interface`, `what` in errors), lowers it with
    /// [`CPU_PIPELINE`] and JIT-compiles it for this machine.
    fn jit(text: &str, what: &str) -> Result<Self, LowerError> {
        let context = new_context();
        let capture = DiagnosticCapture::attach(&context);
        let mut module =
            Module::parse(&context, text).ok_or_else(|| LowerError::Parse { diagnostics: capture.take() })?;
        drop(capture);
        verify(&context, &module, what)?;
        run_pipeline(&context, &mut module, CPU_PIPELINE)?;
        let capture = DiagnosticCapture::attach(&context);
        // SAFETY: `module` is a valid, verified LLVM-dialect module that
        // outlives the call; no shared-library paths are passed (count 0,
        // null array). The engine copies what it needs (it translates the
        // module to LLVM IR it owns).
        let raw = unsafe {
            mlir_sys::mlirExecutionEngineCreate(module.to_raw(), OPT_LEVEL, 0, std::ptr::null(), false, false)
        };
        if raw.ptr.is_null() {
            return Err(LowerError::Engine(format!("cannot create the execution engine: {}", capture.take())));
        }
        let engine = Engine(raw);
        engine.register_runtime_calls();
        Ok(engine)
    }

    /// Defines, in the JIT, the compiler-runtime functions that LLVM calls
    /// where the CPU lacks an instruction and that the process may not
    /// have: `__truncsfbf2` (f32 -> bf16), which LLVM calls on a CPU
    /// without AVX512-BF16 for bf16 values it promotes to f32 (a select of
    /// bf16 vectors: the embedding's gather of a bf16 table), and which
    /// Debian 12's libgcc does not define (the kernel was then missing
    /// from the JIT). Before any lookup: the JIT links a module's calls
    /// when it first looks up one of its functions.
    fn register_runtime_calls(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            let name = "__truncsfbf2";
            // SAFETY: the engine is live; the name is a valid string ref for
            // the call; `truncsfbf2` is an `extern "C"` function of the
            // signature the callers expect (see its docs) that lives as long
            // as the process.
            unsafe {
                mlir_sys::mlirExecutionEngineRegisterSymbol(
                    self.0,
                    mlir_sys::MlirStringRef { data: name.as_ptr().cast(), length: name.len() },
                    truncsfbf2 as *mut c_void,
                );
            }
        }
    }

    /// The packed wrapper of function `name` (one with
    /// `llvm.emit_c_interface`), if the module has it.
    fn entry(&self, name: &str) -> Option<Packed> {
        let name = format!("_mlir_ciface_{name}");
        // SAFETY: the engine is live; the name is a valid string ref for
        // the duration of the call.
        let f = unsafe {
            mlir_sys::mlirExecutionEngineLookupPacked(
                self.0,
                mlir_sys::MlirStringRef { data: name.as_ptr().cast(), length: name.len() },
            )
        };
        // SAFETY: `lookupPacked` returns the address of the packed wrapper
        // `_mlir__mlir_ciface_<name>`, whose C signature is `void(void **)`.
        (!f.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, Packed>(f) })
    }
}

/// `__bf16 __truncsfbf2(float)`, rounding to nearest even as every bf16
/// conversion of the step does ([`f32_to_bf16`]). The x86-64 calling
/// convention returns a `__bf16` in the low 16 bits of `xmm0`, where an
/// f32 whose bits are the bf16's is returned.
#[cfg(target_arch = "x86_64")]
extern "C" fn truncsfbf2(x: f32) -> f32 {
    f32::from_bits(u32::from(f32_to_bf16(x)))
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a non-null engine from `mlirExecutionEngineCreate`
        // (checked in `Engine::jit`), destroyed exactly once here.
        unsafe { mlir_sys::mlirExecutionEngineDestroy(self.0) }
    }
}

/// A graph compiled for the CPU.
pub struct CpuStep {
    /// The graph compiled: the caller's, with the weights in `kept`
    /// declared in their kept layout (see [`CpuStep::graph`]).
    graph: Graph,
    /// Weights bound in the caller's layout and kept in another (see
    /// `layout`, `panels`).
    kept: BTreeMap<String, Kept>,
    /// The plan a run takes unless one of `fused` is chosen.
    plan: Compiled,
    /// The plans with the context attention fused, each taken from its
    /// rows a KV head (see [`CpuStep::program_at`]).
    fused: Vec<Compiled>,
    pipeline: &'static str,
    /// Distinct functions among the plans' entries.
    functions: usize,
    /// Parts a kernel is split into (see [`CpuStep::set_threads`]).
    threads: usize,
    /// A kernel under it (by the bytes model) runs in one part.
    min_split_bytes: i64,
    /// The first plan's JIT'd code (and the functions the fused plan
    /// shares with it), alive as long as the step.
    engine: Engine,
}

impl CpuStep {
    /// Plans ([`plans_cpu`]: without tensor cores, which the CPU has none
    /// of, and a softmax written over its scores where it can be), emits, verifies,
    /// lowers with [`CPU_PIPELINE`] and JIT-compiles `graph`. An f32
    /// weight only ever multiplied as `x @ W` (stored `[in, out]`, GPT-2's
    /// Conv1D) is kept transposed, read as `x @ Wᵀ`; then a float weight
    /// only ever a projection's (or also a gather's table: a tied
    /// embedding), with a multiple of 64 outputs or nearly, is kept in
    /// panels `[ceil(out/64), in, 64]` (`panels`). Either is still bound in the
    /// graph's layout, and converted once when bound ([`CpuStep::store`];
    /// at every [`CpuStep::run`] for tensors given there). bf16 pairs are
    /// summed by the CPU's bf16 dot product where the host prefers it, or
    /// as [`BF16_DOT_ENV`](crate::lower::BF16_DOT_ENV) says; bf16
    /// projections run on AMX tiles where the host has them, unless
    /// [`AMX_ENV`](crate::lower::AMX_ENV) says `off`; the contractions'
    /// register tiles are sized for 16 registers of 256 bits where the
    /// host has no AVX-512F, unless
    /// [`NARROW_TILES_ENV`](crate::lower::NARROW_TILES_ENV) says otherwise
    /// (each is an error if it says what this CPU cannot do or nothing it
    /// knows). Where an f32 context attention can be fused into one kernel,
    /// the step is compiled with a second plan that fuses it, which a run
    /// takes where enough rows share a KV head ([`CpuStep::program_at`];
    /// [`FUSED_ATTENTION_ENV`](crate::lower::FUSED_ATTENTION_ENV) can say
    /// always or never).
    pub fn compile(graph: &Graph) -> Result<Self, LowerError> {
        // Read here to refuse a value it cannot take; the emitter reads it
        // again (`emit::registers`).
        crate::lower::emit::narrow_tiles_choice()?;
        let pairs = Pairing { dot: crate::lower::emit::bf16_dot_choice()?, amx: crate::lower::emit::amx_choice()? };
        Self::compile_pairing(graph, pairs)
    }

    /// [`CpuStep::compile`], with bf16 weights in paired panels (summed by
    /// the CPU's bf16 dot product, see `panels`) only when `pairs`: where
    /// the host prefers it (`prefer_bf16_dot`), as `compile` does, or not,
    /// to test the other way there.
    pub(crate) fn compile_pairing(graph: &Graph, pairs: Pairing) -> Result<Self, LowerError> {
        let graph = masks::skip_open_masks(graph);
        let (graph, transposed) = layout::transpose_right_weights(&graph);
        let mut kept: BTreeMap<String, Kept> = transposed.into_iter().map(|n| (n, Kept::Transposed)).collect();
        let graph = panels::panel_weights(&graph, &mut kept, pairs);
        let programs = plans_cpu(&graph)?;
        let module = emit_shared_plans(&graph, &programs, Target::Cpu, None)?;
        let mut step = Self::compile_module(&graph, programs, &module, rayon::current_num_threads())?;
        step.kept = kept;
        Ok(step)
    }

    /// `program` (planned from `graph`) compiled as it is, without the
    /// CPU's own graph rewrites and plan: for tests that compare plans.
    #[cfg(test)]
    pub(crate) fn compile_program(graph: &Graph, program: Program) -> Result<Self, LowerError> {
        Self::compile_plans(graph, vec![program])
    }

    /// [`CpuStep::compile_program`] of a plan and, second, a plan with the
    /// context attention fused (see [`CpuStep::program_at`]).
    #[cfg(test)]
    pub(crate) fn compile_plans(graph: &Graph, programs: Vec<Program>) -> Result<Self, LowerError> {
        let module = emit_shared_plans(graph, &programs, Target::Cpu, None)?;
        Self::compile_module(graph, programs, &module, rayon::current_num_threads())
    }

    /// [`CpuStep::compile`] with the GPU's way of splitting the row
    /// kernels' and cooperative contractions' reductions, and its
    /// tensor-core tiles and warps, emulated (see [`Emulation`]): runs the
    /// structure of the GPU kernels on the CPU, so tests can check it
    /// against the reference interpreter.
    pub fn compile_emulating_gpu(graph: &Graph, emulation: Emulation) -> Result<Self, LowerError> {
        let point = typical_point(graph);
        let program = plan_tuned(graph, Some((&point, emulation.tuning)))?;
        let module = emit_shared_plans(graph, std::slice::from_ref(&program), Target::Cpu, Some(emulation))?;
        // The emulated kernels are not split into parts (see `emit`, "Parts").
        Self::compile_module(graph, vec![program], &module, 1)
    }

    /// JIT-compiles `emitted`'s kernels of distinct code (of `programs`,
    /// planned from `graph`: a plan, then maybe plans with the context
    /// attention fused); every kernel runs the one with its code, with its
    /// own arguments, in up to `threads` parts.
    fn compile_module(
        graph: &Graph,
        programs: Vec<Program>,
        emitted: &SharedPlans,
        threads: usize,
    ) -> Result<Self, LowerError> {
        let mut plans = programs.into_iter().zip(&emitted.entries).zip(&emitted.modules).enumerate().map(
            |(n, ((program, functions), module))| {
                // The first plan's module is JIT-compiled below, into the step's engine.
                let own = if n == 0 { String::new() } else { module.clone() };
                Compiled::new(graph, program, functions.clone(), own)
            },
        );
        let plan = plans.next().ok_or_else(|| LowerError::Engine("no plan to compile".into()))?;
        let fused = plans.collect();
        let first = emitted.modules.first().ok_or_else(|| LowerError::Engine("no plan to compile".into()))?;
        let engine = Engine::jit(first, "emitted CPU kernels")?;
        plan.set_first(&engine)?;
        let functions =
            emitted.entries.iter().flat_map(|e| e.values()).collect::<std::collections::BTreeSet<_>>().len();
        Ok(CpuStep {
            graph: graph.clone(),
            kept: BTreeMap::new(),
            plan,
            fused,
            pipeline: CPU_PIPELINE,
            functions,
            threads: threads.max(1),
            min_split_bytes: PARALLEL_MIN_BYTES,
            engine,
        })
    }

    /// Splits each kernel that moves at least [`PARALLEL_MIN_BYTES`] (see
    /// [`CpuStep::set_min_split_bytes`]) into `threads` parts, run at once
    /// on the rayon pool (see `emit`, "Parts"; more parts than the pool
    /// has threads run in turn); 1 runs every kernel whole on the calling
    /// thread. The results do not depend on it. The default is the pool's
    /// size (`RAYON_NUM_THREADS`, else one per core); a step emulating the
    /// GPU runs on one thread.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// The parts a kernel is split into ([`CpuStep::set_threads`]).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Least bytes (by the bytes model) a kernel moves to be split into
    /// parts; [`PARALLEL_MIN_BYTES`] unless set (0 splits every kernel).
    pub fn set_min_split_bytes(&mut self, bytes: i64) {
        self.min_split_bytes = bytes;
    }

    /// How many parts kernel `k` of `plan` runs in at `point`.
    fn parts(&self, plan: &Compiled, k: usize, point: &BTreeMap<String, i64>) -> usize {
        let threads = self.threads();
        if threads < 2 {
            return 1;
        }
        match self.work_at(plan, k, point) {
            Some(bytes) if bytes < self.min_split_bytes => 1,
            _ => threads,
        }
    }

    /// Bytes kernel `k` of `plan` moves at `point` by the bytes model
    /// (`None` where the model has no figure or it does not evaluate
    /// there).
    fn work_at(&self, plan: &Compiled, k: usize, point: &BTreeMap<String, i64>) -> Option<i64> {
        plan.work.get(k)?.as_ref().and_then(|bytes| self.graph.dims.eval(bytes, point).ok())
    }

    /// Bytes each kernel (in the [`Program::kernels`] order of
    /// [`CpuStep::program_at`]) moves at `point` by the bytes model
    /// applied to the plan (`lower::kernel_bytes`: a softmax written over
    /// its scores reads and writes them once; `None` where the model has no
    /// figure). Their sum over a step's time is the rate the step moved
    /// memory at, to set beside [`super::memory_read_rate`].
    pub fn kernel_bytes_at(&self, point: &BTreeMap<String, i64>) -> Vec<Option<i64>> {
        let plan = self.chosen(point);
        (0..plan.work.len()).map(|k| self.work_at(plan, k, point)).collect()
    }

    /// The sum of [`CpuStep::kernel_bytes_at`]: the bytes a step at
    /// `point` moves by its plan's model (kernels without a figure count 0).
    pub fn moved_at(&self, point: &BTreeMap<String, i64>) -> f64 {
        self.kernel_bytes_at(point).into_iter().flatten().map(|b| b as f64).sum()
    }

    /// The graph this step runs: the one compiled, with the weights kept
    /// transposed declared `[out, in]` and read by `matmul`s with
    /// `transpose_b`, and those kept in panels declared `[ceil(out/64),
    /// in, 64]` and read by einsums (and gathers, through views) (what
    /// [`CpuStep::program`] was planned from).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Input `name` of the caller's layout in the step's (see [`Kept`]).
    fn step_layout<'t>(&self, name: &str, t: &'t Tensor) -> Result<Cow<'t, Tensor>, LowerError> {
        match self.kept.get(name) {
            Some(kept) => Ok(Cow::Owned(kept.convert(&t.shape, &t.data, name)?)),
            None => Ok(Cow::Borrowed(t)),
        }
    }

    /// How many functions the JIT compiles for the plans' kernels:
    /// kernels with the same code (layer after layer, plan after plan)
    /// share one (the fused plan's own are compiled at its first run).
    pub fn functions(&self) -> usize {
        self.functions
    }

    /// The pass pipeline it was lowered with ([`CPU_PIPELINE`]).
    pub fn pipeline(&self) -> &'static str {
        self.pipeline
    }

    /// Runs one step at `point` (a value `>= 0` for every runtime dim) on
    /// `inputs` (f32 tensors by input name; integer inputs must hold
    /// integers; extra entries are ignored) and returns every output by name.
    ///
    /// f32 inputs are read in place (kernels never write an input buffer);
    /// other dtypes are converted once per call. Intermediates live in the
    /// memory of the last run when it is free (it is kept between runs, and
    /// not cleared: each kernel writes every element of its output before
    /// a later kernel reads it); f32 outputs are moved out, not copied.
    pub fn run(
        &self,
        point: &BTreeMap<String, i64>,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, LowerError> {
        self.run_inner(point, &BTreeMap::new(), Inputs::Tensors(inputs), None)
    }

    /// [`CpuStep::run`] with decode caches stored with spare rows: a
    /// pitched input (see [`crate::lower::plan::Pitch`]) along runtime dim
    /// `d` is given with `capacities[d]` rows on its rows axis (`>=` the
    /// dim; of which the first `d` are read). Dims not in `capacities` are
    /// dense.
    pub fn run_with_capacity(
        &self,
        point: &BTreeMap<String, i64>,
        capacities: &BTreeMap<String, i64>,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, LowerError> {
        self.run_inner(point, capacities, Inputs::Tensors(inputs), None)
    }

    /// Input `name` in its buffer's storage dtype, for
    /// [`CpuStep::run_stored`] (converted once, not at every run; f32 data
    /// is moved). Errors for a name that is not an input and, for an
    /// integer input, a value that is not an integer.
    pub fn store(&self, name: &str, tensor: Tensor) -> Result<Stored, LowerError> {
        let dtype = self.input_dtype(name)?;
        let tensor = match self.step_layout(name, &tensor)? {
            Cow::Owned(t) => t,
            Cow::Borrowed(_) => tensor,
        };
        Stored::new(dtype, tensor, name)
    }

    /// [`CpuStep::store`] of borrowed values of `shape` (converted, or for
    /// f32 copied, once).
    pub fn store_values(&self, name: &str, shape: &[usize], values: &[f32]) -> Result<Stored, LowerError> {
        let dtype = self.input_dtype(name)?;
        if let Some(kept) = self.kept.get(name) {
            return kept.store(dtype, shape, values, name);
        }
        Stored::from_values(dtype, shape, values, name)
    }

    /// Zeros of `shape` (the caller's layout) for input `name`, in its
    /// storage dtype.
    pub fn store_zeros(&self, name: &str, shape: Vec<usize>) -> Result<Stored, LowerError> {
        let dtype = self.input_dtype(name)?;
        let shape = match self.kept.get(name) {
            Some(kept) => kept.stored_shape(&shape),
            None => shape,
        };
        Ok(Stored::zeros(dtype, shape))
    }

    /// Whether `other` stores input `name` as this step does (the same
    /// storage dtype, shape and kept layout, see [`CpuStep::compile`]), so
    /// that one [`Stored`] can serve both: a clone of it shares its
    /// elements.
    pub fn stores_alike(&self, other: &CpuStep, name: &str) -> bool {
        match (self.input_buffer(name), other.input_buffer(name)) {
            (Some(a), Some(b)) => {
                a.dtype == b.dtype && a.shape == b.shape && self.kept.get(name) == other.kept.get(name)
            }
            _ => false,
        }
    }

    fn input_buffer(&self, name: &str) -> Option<&Buffer> {
        self.plan.program.buffers.iter().find(|b| b.name == name && matches!(b.kind, BufferKind::Input(_)))
    }

    fn input_dtype(&self, name: &str) -> Result<DType, LowerError> {
        self.input_buffer(name)
            .map(|b| b.dtype)
            .ok_or_else(|| LowerError::Run(format!("`{name}` is not an input of this step")))
    }

    /// [`CpuStep::run_with_capacity`] on inputs already in their storage
    /// dtype ([`CpuStep::store`]), read in place.
    pub fn run_stored(
        &self,
        point: &BTreeMap<String, i64>,
        capacities: &BTreeMap<String, i64>,
        inputs: &HashMap<String, Stored>,
    ) -> Result<HashMap<String, Tensor>, LowerError> {
        self.run_inner(point, capacities, Inputs::Stored(inputs), None)
    }

    /// [`CpuStep::run_stored`], also returning the wall time of every
    /// kernel (in launch order, by kernel name): the kernels as a bound
    /// step runs them (inputs on cache lines, in their storage dtypes).
    pub fn run_stored_profiled(
        &self,
        point: &BTreeMap<String, i64>,
        capacities: &BTreeMap<String, i64>,
        inputs: &HashMap<String, Stored>,
    ) -> Result<(HashMap<String, Tensor>, KernelTimes), LowerError> {
        let mut times = Vec::with_capacity(self.program_at(point).kernels.len());
        let out = self.run_inner(point, capacities, Inputs::Stored(inputs), Some(&mut times))?;
        Ok((out, times))
    }

    /// [`CpuStep::run`], also returning the wall time of every kernel (in
    /// launch order, by kernel name).
    pub fn run_profiled(
        &self,
        point: &BTreeMap<String, i64>,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<(HashMap<String, Tensor>, KernelTimes), LowerError> {
        let mut times = Vec::with_capacity(self.program_at(point).kernels.len());
        let out = self.run_inner(point, &BTreeMap::new(), Inputs::Tensors(inputs), Some(&mut times))?;
        Ok((out, times))
    }

    fn run_inner(
        &self,
        point: &BTreeMap<String, i64>,
        capacities: &BTreeMap<String, i64>,
        inputs: Inputs<'_>,
        times: Option<&mut KernelTimes>,
    ) -> Result<HashMap<String, Tensor>, LowerError> {
        let plan = self.chosen(point);
        let entries = plan.entries(&self.engine)?;
        let mut dims = self.dims_at(point)?;
        let mut caps = dims.clone();
        for (d, &cap) in capacities {
            let k = self.plan.program.dims.iter().position(|x| x == d);
            match k {
                Some(k) if cap >= dims[k] => caps[k] = cap,
                Some(k) => {
                    return Err(LowerError::Run(format!(
                        "capacity {cap} of runtime dim `{d}` is less than its value {}",
                        dims[k]
                    )))
                }
                None => return Err(LowerError::Run(format!("capacity for `{d}`, which is not a runtime dim"))),
            }
        }
        // The last run's intermediates (none when another thread is running).
        let mut scratch = match plan.scratch.try_lock() {
            Ok(mut kept) => std::mem::take(&mut *kept),
            Err(_) => Vec::new(),
        };
        scratch.resize_with(plan.program.buffers.len(), || None);
        let mut shapes = Vec::with_capacity(plan.program.buffers.len());
        // Owned storage, or the data of an input read in place.
        let mut host: Vec<Result<HostData, *const c_void>> = Vec::with_capacity(plan.program.buffers.len());
        for (b, buf) in plan.program.buffers.iter().enumerate() {
            let (shape, n) = self.stored_shape(buf, point, &caps)?;
            let data = match buf.kind {
                BufferKind::Input(_) => {
                    let missing = || LowerError::Run(format!("input `{}` is missing", buf.name));
                    // Shapes in the caller's layout (a weight kept
                    // transposed is given and named `[in, out]`).
                    let kept = self.kept.get(&buf.name).copied();
                    let callers = |s: &[usize]| kept.map_or_else(|| s.to_vec(), |k| k.callers_shape(s));
                    let bad_shape = |got: &[usize], len: usize| {
                        LowerError::Run(format!(
                            "input `{}` has shape {got:?} ({len} values), expected {:?}",
                            buf.name,
                            callers(&shape)
                        ))
                    };
                    match inputs {
                        Inputs::Tensors(map) => {
                            let given = map.get(&buf.name).ok_or_else(missing)?;
                            // Checked in the caller's layout before it is
                            // converted to the step's.
                            if kept.is_some() && given.shape != callers(&shape) {
                                return Err(bad_shape(&given.shape, given.data.len()));
                            }
                            let t = self.step_layout(&buf.name, given)?;
                            if t.shape != shape || t.data.len() != n {
                                return Err(bad_shape(&given.shape, given.data.len()));
                            }
                            match t {
                                Cow::Borrowed(t) if buf.dtype == DType::F32 && !t.data.is_empty() => {
                                    Err(t.data.as_ptr().cast())
                                }
                                t => Ok(HostData::from_tensor(buf.dtype, &t, &buf.name)?),
                            }
                        }
                        Inputs::Stored(map) => {
                            let t = map.get(&buf.name).ok_or_else(missing)?;
                            if t.shape != shape || t.len() < n.max(1) {
                                return Err(bad_shape(&callers(&t.shape), t.len()));
                            }
                            if t.dtype() != buf.dtype {
                                return Err(LowerError::Run(format!(
                                    "input `{}` is stored as {}, not {}",
                                    buf.name,
                                    t.dtype().name(),
                                    buf.dtype.name()
                                )));
                            }
                            Err(t.ptr())
                        }
                    }
                }
                BufferKind::Intermediate => Ok(match scratch[b].take() {
                    Some(mut kept) if kept.dtype_is(buf.dtype) => {
                        kept.reuse(n);
                        kept
                    }
                    _ => HostData::zeros(buf.dtype, n),
                }),
                // Handed back: moved into the returned tensor, not copied.
                BufferKind::Output(_) => Ok(HostData::returned(buf.dtype, n)),
            };
            shapes.push((shape, n));
            host.push(data);
        }
        // An f32 input is passed as its tensor's data pointer: no kernel
        // writes an input buffer, so it is only ever read through.
        let mut ptrs: Vec<*mut c_void> =
            host.iter_mut().map(|h| h.as_mut().map_or_else(|p| p.cast_mut(), HostData::ptr)).collect();
        // SAFETY (both calls): `launch`'s contract: `ptrs` holds a data
        // pointer per buffer, to a live allocation of the buffer's dtype
        // holding at least `max(numel, 1)` elements at `point`: an owned
        // buffer in `host`, or the data of an input read in place (an f32
        // tensor of `inputs`, or a `Stored` input of the buffer's dtype
        // and shape, checked above), borrowed for this whole call and
        // never written: a kernel writes only its output or an
        // intermediate, which are owned. A pitched buffer's rows axis
        // holds its capacity in `caps` (checked above). `dims`, `caps`,
        // `ptrs`, `host` and `inputs` are not moved, resized or otherwise
        // used until it returns.
        if self.threads > 1 {
            // On a thread of the pool (see `on_pool`): `launch` reads
            // `self` (plain data and the JIT's entry points, which any
            // thread may call: `run_parts` does) and the slots above, and
            // writes `times` and the kernels' outputs, while this thread
            // waits for it.
            let launch = || unsafe { self.launch((plan, entries), point, &mut dims, &mut caps, &mut ptrs, times) };
            unsafe { parts::on_pool(launch) }?;
        } else {
            unsafe { self.launch((plan, entries), point, &mut dims, &mut caps, &mut ptrs, times) }?;
        }
        let mut out = HashMap::new();
        for (b, buf) in plan.program.buffers.iter().enumerate() {
            let data = std::mem::replace(&mut host[b], Err(std::ptr::null()));
            match (&buf.kind, data) {
                (BufferKind::Output(_), Ok(data)) => {
                    let (shape, n) = std::mem::take(&mut shapes[b]);
                    out.insert(buf.name.clone(), data.into_tensor(buf.dtype, shape, n));
                }
                (BufferKind::Intermediate, Ok(data)) => scratch[b] = Some(data),
                _ => {}
            }
        }
        if let Ok(mut kept) = plan.scratch.try_lock() {
            *kept = scratch;
        }
        Ok(out)
    }

    /// The value at `point` of each runtime dim of the program, in order:
    /// an error names a dim with no value or a negative one.
    fn dims_at(&self, point: &BTreeMap<String, i64>) -> Result<Vec<i64>, LowerError> {
        self.plan
            .program
            .dims
            .iter()
            .map(|d| match point.get(d) {
                None => Err(LowerError::Run(format!("runtime dim `{d}` has no value"))),
                Some(&v) if v < 0 => Err(LowerError::Run(format!("runtime dim `{d}` = {v} is negative"))),
                Some(&v) => Ok(v),
            })
            .collect()
    }

    /// Buffer `buf`'s shape as stored at `point` (a pitched axis holds its
    /// capacity, from `caps`: one value per runtime dim of the program) and
    /// its element count.
    fn stored_shape(
        &self,
        buf: &Buffer,
        point: &BTreeMap<String, i64>,
        caps: &[i64],
    ) -> Result<(Vec<usize>, usize), LowerError> {
        let mut shape =
            buf.shape
                .iter()
                .map(|p| {
                    let v = self.graph.dims.eval(p, point).map_err(|e| LowerError::Size {
                        what: format!("buffer `{}`", buf.name),
                        message: e.to_string(),
                    })?;
                    usize::try_from(v)
                        .map_err(|_| LowerError::Run(format!("buffer `{}`: size `{p}` = {v} is negative", buf.name)))
                })
                .collect::<Result<Vec<usize>, _>>()?;
        if let Some(p) = &buf.pitch {
            let k = self.plan.program.dims.iter().position(|x| *x == p.dim);
            if let (Some(&cap), Some(s)) = (k.and_then(|k| caps.get(k)), shape.get_mut(p.axis)) {
                *s = cap as usize;
            }
        }
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= MAX_ELEMENTS).ok_or_else(|| {
            LowerError::Run(format!(
                "buffer `{}` of shape {shape:?} is too large: a CPU step's buffer holds at most {MAX_ELEMENTS} elements",
                buf.name
            ))
        })?;
        Ok((shape, n))
    }

    /// Runs every kernel of `plan` (through `entries`, its entry points)
    /// in order at `point`, each with its
    /// parameters' slots among `dims` and `caps` (one value per runtime
    /// dim of the program) and `ptrs` (one data pointer per buffer), split
    /// into parts on the pool where it moves enough bytes; each kernel's
    /// wall time goes into `times`.
    ///
    /// # Safety
    ///
    /// Each of `ptrs` points at a live allocation of its buffer's dtype
    /// holding at least `max(numel, 1)` elements at `point` and `caps`
    /// (a pitched buffer's rows axis holds its capacity), and only an
    /// output's or an intermediate's is written; none of them is moved,
    /// resized or otherwise used until this returns.
    unsafe fn launch(
        &self,
        (plan, entries): (&Compiled, &[Packed]),
        point: &BTreeMap<String, i64>,
        dims: &mut [i64],
        caps: &mut [i64],
        ptrs: &mut [*mut c_void],
        mut times: Option<&mut KernelTimes>,
    ) -> Result<(), LowerError> {
        let (dim_ptr, cap_ptr, buf_ptr) = (dims.as_mut_ptr(), caps.as_mut_ptr(), ptrs.as_mut_ptr());
        // The last two arguments: the part a call runs, of how many.
        let (mut part, mut whole) = (0i64, 1i64);
        let tail = [std::ptr::addr_of_mut!(part).cast::<c_void>(), std::ptr::addr_of_mut!(whole).cast::<c_void>()];
        let mut args: Vec<*mut c_void> = Vec::new();
        for (k, (kernel, entry)) in plan.program.kernels.iter().zip(entries).enumerate() {
            args.clear();
            for p in &kernel.params {
                let slot = match p {
                    Param::Dim(d) => {
                        self.plan.program.dims.iter().position(|x| x == d).filter(|&k| k < dims.len()).map(|k| {
                            // SAFETY: `k < dims.len()`: an element of `dims`.
                            unsafe { dim_ptr.add(k) }.cast::<c_void>()
                        })
                    }
                    Param::Capacity(d) => {
                        self.plan.program.dims.iter().position(|x| x == d).filter(|&k| k < caps.len()).map(|k| {
                            // SAFETY: `k < caps.len()`: an element of `caps`.
                            unsafe { cap_ptr.add(k) }.cast::<c_void>()
                        })
                    }
                    Param::Buffer(b) => (*b < ptrs.len()).then(|| {
                        // SAFETY: `b < ptrs.len()`: an element of `ptrs`.
                        unsafe { buf_ptr.add(*b) }.cast::<c_void>()
                    }),
                };
                args.push(
                    slot.ok_or_else(|| LowerError::Run(format!("kernel `{}`: bad parameter {p:?}", kernel.name)))?,
                );
            }
            args.extend(tail);
            let parts = self.parts(plan, k, point);
            let start = times.is_some().then(Instant::now);
            // SAFETY: `entry` is the packed wrapper of this kernel; it reads
            // one pointer per parameter: `args[k]` points at an `i64` (a
            // dim, in `dims`, or a capacity, in `caps`) or at a data
            // pointer (in `ptrs`) to an allocation as this function's
            // contract says. The kernel only touches elements inside its
            // buffers' shapes at these dims (gather checks its ids), a
            // pitched buffer's rows axis below the dim's value (`<=` its
            // capacity). The last two arguments point at `part` = 0 and
            // `whole` = 1 (the whole walk), or, in `run_parts`, at each
            // part's own values: every CPU kernel is emitted to run its
            // part only, so the parts, running at once on the pool's
            // threads, write disjoint elements of the kernel's output and
            // read what no part writes (`emit`, "Parts"); the arguments
            // they share are only read.
            if parts > 1 {
                unsafe { run_parts(*entry, &args, parts) };
            } else {
                unsafe { entry(args.as_mut_ptr()) };
            }
            if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
                times.push((kernel.name.clone(), start.elapsed()));
            }
        }
        Ok(())
    }
}

/// Test code: JIT-compiles `text` (a module with `name(%in, %out)`, two
/// pointers, `llvm.emit_c_interface`), runs it once with `input` (f32) at
/// `in` and room for `out_len` 16-bit values at `out`, and returns them.
#[cfg(test)]
pub(crate) fn run_in_out_test(text: &str, name: &str, input: &[f32], out_len: usize) -> Vec<u16> {
    let engine = Engine::jit(text, "a test module").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let entry = engine.entry(name).unwrap_or_else(|| panic!("`{name}` not found in the JIT"));
    let mut input = input.to_vec();
    let mut out = vec![0u16; out_len];
    let (mut pin, mut pout) = (input.as_mut_ptr(), out.as_mut_ptr());
    let mut args = [std::ptr::addr_of_mut!(pin).cast::<c_void>(), std::ptr::addr_of_mut!(pout).cast::<c_void>()];
    // SAFETY: `entry` is the packed wrapper of `name(ptr, ptr)`: it reads
    // the two pointers through `args`; the test's module reads at most
    // `input.len()` f32 at the first and writes at most `out_len` 16-bit
    // values at the second (the caller's contract), both alive here.
    unsafe { entry(args.as_mut_ptr()) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::emit::emit;

    /// A kernel that calls `__truncsfbf2` (as LLVM does for bf16 values it
    /// promotes on a CPU without AVX512-BF16) links in the JIT, and the
    /// call rounds to nearest even, ties to even, NaN kept a NaN.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_jit_defines_the_bf16_rounding_call() {
        let text = "module {
  llvm.func @__truncsfbf2(f32) -> bf16
  func.func @round(%x: f32, %out: !llvm.ptr) attributes {llvm.emit_c_interface} {
    %h = llvm.call @__truncsfbf2(%x) : (f32) -> bf16
    llvm.store %h, %out : bf16, !llvm.ptr
    return
  }
}
";
        let engine = Engine::jit(text, "the rounding test").unwrap_or_else(|e| panic!("{e}"));
        let entry = engine.entry("round").unwrap_or_else(|| panic!("`round` not found in the JIT"));
        let cases = [
            (1.0f32, 0x3f80u16),
            // Halfway between 0x3f80 and 0x3f81: to the even one.
            (f32::from_bits(0x3f80_8000), 0x3f80),
            // Halfway between 0x3f81 and 0x3f82: to the even one.
            (f32::from_bits(0x3f81_8000), 0x3f82),
            (f32::from_bits(0x3f80_8001), 0x3f81),
            (-2.5, 0xc020),
            (f32::INFINITY, 0x7f80),
        ];
        let round = |x: f32| {
            let (mut x, mut out) = (x, 0u16);
            let mut ptr = std::ptr::addr_of_mut!(out);
            let mut args = [std::ptr::addr_of_mut!(x).cast::<c_void>(), std::ptr::addr_of_mut!(ptr).cast::<c_void>()];
            // SAFETY: `entry` is the packed wrapper of `round(f32, ptr)`: it
            // reads an f32 through `args[0]` and a pointer through
            // `args[1]`, which points at `out`, the two bytes it writes.
            unsafe { entry(args.as_mut_ptr()) };
            out
        };
        for (x, want) in cases {
            assert_eq!(round(x), want, "{x}");
        }
        let nan = round(f32::NAN);
        assert!(nan & 0x7f80 == 0x7f80 && nan & 0x7f != 0, "NaN -> {nan:#x}");
    }

    /// The context einsums of bifurcated attention take the tiled,
    /// blocked walk (b innermost, ragged tiles and blocks) and, with a head
    /// dim of 32, the SIMD contraction loop: same values as the interpreter.
    #[test]
    fn tiled_and_simd_contractions_match_interpreter() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 3, "k": 32}},
            "inputs": [
                {"name": "q", "role": "activation", "shape": ["b", "h", 1, "k"], "dtype": "f32"},
                {"name": "kc", "role": "weight", "shape": ["h", "m", "k"], "dtype": "f32"},
                {"name": "vc", "role": "weight", "shape": ["h", "m", "k"], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "abxy,bzy->abxz"}},
                {"id": "p", "op": "softmax", "inputs": ["s"], "attrs": {"axis": 3}},
                {"id": "o", "op": "einsum", "inputs": ["p", "vc"], "attrs": {"spec": "abxz,bzy->abxy"}}
            ],
            "outputs": [{"name": "s", "node": "s"}, {"name": "o", "node": "o"}]
        });
        let graph = match crate::import::from_value(&doc) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let step = match CpuStep::compile(&graph) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let text = match emit(step.graph(), step.program(), Target::Cpu) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(text.contains("vector<16xf32>") && text.contains("arith.minui"), "{text}");
        for (b, m) in [(1, 1), (3, 5), (9, 17), (16, 33), (0, 4), (2, 0)] {
            let point = BTreeMap::from([("b".to_string(), b), ("m".to_string(), m)]);
            let inputs = match crate::interp::random_inputs(&graph, &point, 5) {
                Ok(i) => i,
                Err(e) => panic!("{e}"),
            };
            let (got, want) = match (step.run(&point, &inputs), crate::interp::run(&graph, &point, &inputs)) {
                (Ok(g), Ok(w)) => (g, w),
                (g, w) => panic!("b={b} m={m}: {:?} / {:?}", g.err(), w.err()),
            };
            for (name, w) in &want {
                let a = &got[name];
                assert_eq!(a.shape, w.shape, "{name}");
                let top = w.data.iter().fold(1e-6f32, |t, x| t.max(x.abs()));
                for (x, y) in a.data.iter().zip(&w.data) {
                    assert!((x - y).abs() <= 1e-4 * top, "{name} at b={b} m={m}: {x} vs {y}");
                }
            }
        }
        // The softmax's intermediate is kept between runs, grown to the
        // largest point (b=16, h=3, m=33) and reused, not cleared, at the
        // smaller ones after it (which still gave the interpreter's values above;
        // the last, m=0, has no elements: one is allocated).
        let p = step.program().buffers.iter().position(|b| b.kind == BufferKind::Intermediate);
        let kept = match step.plan.scratch.lock() {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        };
        match p.and_then(|p| kept.get(p)) {
            Some(Some(HostData::F32(v))) => assert!(v.capacity() >= 16 * 3 * 33 && v.len() == 1, "{}", v.len()),
            _ => panic!("no kept intermediate"),
        }
    }

    /// Intermediates are reused without clearing, so every kernel must
    /// write its whole output before any kernel reads it: with every kept
    /// intermediate set to NaN between runs, the tiny model (as given and
    /// bifurcated), the llama fixture in bf16 (GQA, tensor-core kernels
    /// compiled as contractions) and the gpt2 and gpt_bigcode fixtures
    /// give the bits of runs on fresh memory, at a point after a larger
    /// one (the memory is longer than the buffer) and at the larger one,
    /// whole and in 3 parts.
    #[test]
    fn poisoned_intermediates_change_no_output() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let load = |r: Result<Graph, crate::import::ImportError>| r.unwrap_or_else(|e| panic!("{e}"));
        let tiny = load(crate::import::load(&root.join("examples/tiny/model.json")));
        let point = |b: i64, m_c: i64, m_d: i64| {
            BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)])
        };
        let opts = crate::optimize::Options {
            point: crate::inspect::point::ShapePoint(point(5, 13, 3)),
            ..Default::default()
        };
        let bifurcated = crate::optimize::optimize(&tiny, &opts).unwrap_or_else(|e| panic!("{e}")).graph;
        let mut graphs = vec![tiny, bifurcated];
        for (arch, dtype) in [("llama", Some(DType::BF16)), ("gpt2", None), ("gpt_bigcode", None)] {
            let config = std::fs::read_to_string(root.join(format!("tests/fixtures/hf/{arch}/config.json")))
                .unwrap_or_else(|e| panic!("{arch}: {e}"));
            let opts = crate::hf::HfOptions { dtype, ..Default::default() };
            let doc = crate::hf::build(&config, &opts).unwrap_or_else(|e| panic!("{arch}: {e}"));
            graphs.push(load(crate::import::from_value(&doc)));
        }
        let bits = |out: &HashMap<String, Tensor>| -> BTreeMap<String, Vec<u32>> {
            out.iter().map(|(k, t)| (k.clone(), t.data.iter().map(|x| x.to_bits()).collect())).collect()
        };
        for graph in &graphs {
            // Each point's inputs, and its outputs from a step of its own
            // (fresh, zeroed memory).
            let fresh: Vec<_> = [point(4, 11, 6), point(2, 5, 1)]
                .into_iter()
                .map(|p| {
                    let inputs = crate::interp::random_inputs(graph, &p, 4).unwrap_or_else(|e| panic!("{e}"));
                    let step = CpuStep::compile(graph).unwrap_or_else(|e| panic!("{e}"));
                    let want = bits(&step.run(&p, &inputs).unwrap_or_else(|e| panic!("{e}")));
                    (p, inputs, want)
                })
                .collect();
            let mut step = CpuStep::compile(graph).unwrap_or_else(|e| panic!("{e}"));
            step.set_min_split_bytes(0);
            for threads in [1, 3] {
                step.set_threads(threads);
                for (p, inputs, want) in [&fresh[0], &fresh[1], &fresh[0]] {
                    for plan in std::iter::once(&mut step.plan).chain(step.fused.iter_mut()) {
                        let kept = match plan.scratch.get_mut() {
                            Ok(k) => k,
                            Err(e) => panic!("{e}"),
                        };
                        kept.iter_mut().flatten().for_each(HostData::poison);
                    }
                    let got = bits(&step.run(p, inputs).unwrap_or_else(|e| panic!("{e}")));
                    assert!(got == *want, "{threads} parts at {p:?}: outputs differ on poisoned memory");
                }
            }
            // In the plan the points ran (the first, or a fused one).
            let mut kept = 0;
            for plan in std::iter::once(&mut step.plan).chain(step.fused.iter_mut()) {
                kept += match plan.scratch.get_mut() {
                    Ok(k) => k.iter().flatten().count(),
                    Err(e) => panic!("{e}"),
                };
            }
            assert!(kept > 0, "the step keeps no intermediates: nothing was checked");
        }
    }

    /// Every kernel reaches LLVM preferring 512-bit vectors (see
    /// `emit::CPU_FUNC_ATTRS`): the attribute survives the CPU pipeline,
    /// whose `convert-func-to-llvm` carries it to the `llvm.func` that the
    /// engine translates. Without it a softmax's rows were vectorized in
    /// 256-bit registers on Intel's AVX-512 server cores.
    #[test]
    fn cpu_kernels_prefer_512_bit_vectors() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"d": 37}},
            "inputs": [{"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "f32"}],
            "nodes": [
                {"id": "p", "op": "softmax", "inputs": ["x"], "attrs": {"axis": 1}},
                {"id": "y", "op": "exp", "inputs": ["p"]}
            ],
            "outputs": [{"name": "y", "node": "y"}]
        });
        let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
        let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
        let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let context = new_context();
        let mut module = Module::parse(&context, &text).unwrap_or_else(|| panic!("unparsable:\n{text}"));
        run_pipeline(&context, &mut module, CPU_PIPELINE).unwrap_or_else(|e| panic!("{e}"));
        let lowered = module.as_operation().to_string();
        let kernels: Vec<&str> = lowered.lines().filter(|l| l.trim_start().starts_with("llvm.func @k")).collect();
        assert_eq!(kernels.len(), step.program().kernels.len(), "{lowered}");
        for k in kernels {
            assert!(k.contains(r#"passthrough = [["prefer-vector-width", "512"]]"#), "{k}");
        }
    }

    #[test]
    fn cpu_pipeline_is_the_one_used() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"d": 3}},
            "inputs": [{"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "f32"}],
            "nodes": [{"id": "y", "op": "exp", "inputs": ["x"]}],
            "outputs": [{"name": "y", "node": "y"}]
        });
        let graph = match crate::import::from_value(&doc) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let step = match CpuStep::compile(&graph) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(step.pipeline(), CPU_PIPELINE);
        let point = BTreeMap::from([("b".to_string(), 2)]);
        let x = Tensor { shape: vec![2, 3], data: vec![0.0, 1.0, -1.0, 2.0, 0.5, -0.5] };
        let out = match step.run(&point, &HashMap::from([("x".to_string(), x.clone())])) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        let y = &out["y"];
        for (a, b) in y.data.iter().zip(&x.data) {
            assert!((a - b.exp()).abs() <= 1e-6 * b.exp(), "{a} vs {}", b.exp());
        }
    }
}
