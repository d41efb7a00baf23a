//! The GPU pass pipeline: a module of kernels (`gpu.module @bifurc_kernels`)
//! to PTX for one NVIDIA chip.
//!
//! Input: the text [`crate::lower::emit`](mod@crate::lower::emit) writes for [`crate::lower::Target::Gpu`] — a
//! `gpu.container_module` holding `gpu.module @bifurc_kernels { gpu.func … kernel … }`
//! whose kernels take the runtime dims as `i64` and buffers as bare `!llvm.ptr`,
//! and use `arith`, `math`, `scf`, `affine` and `llvm` ops inside.
//!
//! [`GPU_PIPELINE_TEMPLATE`] is the one pipeline: attach an NVVM target (chip,
//! `-O3`, libdevice linked so `math.exp`/`math.tanh`/… become real PTX instead
//! of calls to undefined `__nv_*` functions), lower structured control flow,
//! convert the kernels to NVVM/LLVM, and serialize each `gpu.module` to PTX
//! (`gpu-module-to-binary{format=isa}`, in process: no CUDA toolkit). The PTX
//! is read from the resulting `gpu.binary` op's object attribute through the
//! MLIR C API.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use melior::ir::{
    attribute::{ArrayAttribute, AttributeLike, StringAttribute},
    block::BlockLike,
    operation::{OperationLike, OperationPrintingFlags, OperationRef},
    Module, RegionLike,
};

use super::{new_context, run_pipeline, verify, DiagnosticCapture, LowerError};

/// Environment variable naming libdevice (`libdevice.10.bc`). `scripts/env.sh`
/// sets it to the copy `scripts/setup.sh` installs (PyPI `nvidia-cuda-nvcc-cu12`).
pub const LIBDEVICE_ENV: &str = "BIFURC_LIBDEVICE";

/// The GPU pipeline with two placeholders: `{chip}` (`sm_80`, `sm_90`) and
/// `{libdevice}` (path of `libdevice.10.bc`, quoted). See [`gpu_pipeline`].
pub const GPU_PIPELINE_TEMPLATE: &str = "builtin.module(\
nvvm-attach-target{chip={chip} O=3 l=\"{libdevice}\"},\
gpu.module(lower-affine,convert-scf-to-cf,convert-gpu-to-nvvm,canonicalize,reconcile-unrealized-casts),\
gpu-to-llvm,\
gpu-module-to-binary{format=isa})";

/// A PTX target chip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum GpuTarget {
    /// Ampere (A100).
    Sm80,
    /// Hopper (H100, H200). The default.
    #[default]
    Sm90,
}

impl GpuTarget {
    /// Every supported target, oldest first.
    pub const ALL: [GpuTarget; 2] = [GpuTarget::Sm80, GpuTarget::Sm90];

    /// The chip name as NVVM and ptxas spell it: `sm_80`, `sm_90`.
    pub fn chip(self) -> &'static str {
        match self {
            GpuTarget::Sm80 => "sm_80",
            GpuTarget::Sm90 => "sm_90",
        }
    }

    /// Parses `sm_80` / `sm_90`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.chip() == text)
    }
}

impl std::fmt::Display for GpuTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.chip())
    }
}

/// The GPU pipeline for `chip` linking `libdevice`: [`GPU_PIPELINE_TEMPLATE`]
/// with its placeholders filled. The path is quoted; a path MLIR's option
/// parser cannot carry (it splits list options at `,`) is refused by
/// [`to_ptx`], not here.
pub fn gpu_pipeline(chip: &str, libdevice: &Path) -> String {
    GPU_PIPELINE_TEMPLATE.replace("{chip}", chip).replace("{libdevice}", &libdevice.to_string_lossy())
}

/// Finds libdevice: `explicit` (a `--libdevice` flag) if given, else the
/// `BIFURC_LIBDEVICE` environment variable. The file must exist.
pub fn find_libdevice(explicit: Option<&Path>) -> Result<PathBuf, LowerError> {
    let (path, origin) = match explicit {
        Some(path) => (path.to_path_buf(), "--libdevice"),
        None => match std::env::var_os(LIBDEVICE_ENV) {
            Some(value) if !value.is_empty() => (PathBuf::from(value), LIBDEVICE_ENV),
            _ => {
                return Err(LowerError::Libdevice(format!(
                    "libdevice not found: pass --libdevice PATH/libdevice.10.bc or set {LIBDEVICE_ENV} \
                     (scripts/setup.sh installs it; `source scripts/env.sh` sets {LIBDEVICE_ENV})"
                )))
            }
        },
    };
    check_libdevice(&path).map_err(|why| LowerError::Libdevice(format!("libdevice from {origin}: {why}")))?;
    Ok(path)
}

fn check_libdevice(path: &Path) -> Result<(), String> {
    let text = path.to_str().ok_or_else(|| format!("{} is not valid UTF-8", path.display()))?;
    if let Some(c) = text.chars().find(|c| matches!(c, ',' | '"' | '{' | '}') || c.is_control()) {
        return Err(format!(
            "{text}: the path contains `{}`, which an MLIR pass option cannot carry",
            c.escape_default()
        ));
    }
    if !path.is_file() {
        return Err(format!("{text} does not exist or is not a file"));
    }
    Ok(())
}

/// Compiles a GPU kernel module (MLIR text) to PTX for `target`, linking
/// `libdevice`: parse, verify, run [`gpu_pipeline`], take the PTX out of the
/// one `gpu.binary` op. Every kernel becomes a PTX `.entry` of its own name.
/// Deterministic: the same input gives the same bytes.
pub fn to_ptx(mlir_text: &str, target: GpuTarget, libdevice: &Path) -> Result<String, LowerError> {
    Ok(compile_module(mlir_text, target, libdevice, false)?.ptx)
}

/// PTX in which kernels with identical code share one `.entry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedPtx {
    /// The PTX module.
    pub ptx: String,
    /// For every kernel (`gpu.func … kernel`) of the input, the `.entry` that
    /// runs it: its own name, or that of the first kernel with the same code.
    pub entries: BTreeMap<String, String>,
}

/// Like [`to_ptx`], but kernels whose code is identical apart from their
/// name (layer after layer of a model: same shapes, same ops, different
/// buffers passed in) are compiled once: the first keeps its `.entry`, the
/// others are dropped and [`SharedPtx::entries`] maps them to it. Launching
/// the shared entry with a kernel's own arguments runs that kernel. For a
/// 32-layer model this compiles ~20 kernels instead of ~700.
pub fn to_shared_ptx(mlir_text: &str, target: GpuTarget, libdevice: &Path) -> Result<SharedPtx, LowerError> {
    compile_module(mlir_text, target, libdevice, true)
}

fn compile_module(mlir_text: &str, target: GpuTarget, libdevice: &Path, share: bool) -> Result<SharedPtx, LowerError> {
    check_libdevice(libdevice).map_err(LowerError::Libdevice)?;
    let context = new_context();
    let mut module = {
        let capture = DiagnosticCapture::attach(&context);
        let parsed = Module::parse(&context, mlir_text);
        let diagnostics = capture.take();
        parsed.ok_or(LowerError::Parse { diagnostics })?
    };
    verify(&context, &module, "GPU kernel module as emitted")?;
    let entries = kernel_entries(&module, share)?;
    if share {
        verify(&context, &module, "GPU kernel module with shared kernels")?;
    }
    run_pipeline(&context, &mut module, &gpu_pipeline(target.chip(), libdevice))?;
    let ptx = extract_ptx(&module)?;
    Ok(SharedPtx { ptx, entries })
}

/// Maps every kernel of every `gpu.module` to its entry; with `share`,
/// erases each kernel whose code (printed with its name blanked) equals an
/// earlier kernel's, mapping it to that one.
fn kernel_entries(module: &Module, share: bool) -> Result<BTreeMap<String, String>, LowerError> {
    let mut entries = BTreeMap::new();
    let mut next = module.body().first_operation();
    while let Some(gpu_module) = next {
        next = gpu_module.next_in_block();
        if gpu_module.name().as_string_ref().as_str() != Ok("gpu.module") {
            continue;
        }
        let body = gpu_module.region(0)?.first_block().ok_or_else(|| LowerError::Ptx("empty gpu.module".into()))?;
        let mut first_with_code: HashMap<String, String> = HashMap::new();
        let mut op = body.first_operation();
        while let Some(func) = op {
            op = func.next_in_block();
            if func.name().as_string_ref().as_str() != Ok("gpu.func") || func.attribute("gpu.kernel").is_err() {
                continue;
            }
            let name = StringAttribute::try_from(func.attribute("sym_name")?)
                .map_err(|_| LowerError::Ptx("gpu.func without a string sym_name".into()))?
                .value()
                .to_string();
            if !share {
                entries.insert(name.clone(), name);
                continue;
            }
            // Printed alone (local scope), an op numbers its values from
            // zero: equal code prints equally. The module was verified above.
            let flags = OperationPrintingFlags::new().use_local_scope();
            // SAFETY: `flags` is live for the call and only read by MLIR.
            unsafe { mlir_sys::mlirOpPrintingFlagsAssumeVerified(flags.to_raw()) };
            let code = func.to_string_with_flags(flags)?.replacen(&format!("@{name}("), "@(", 1);
            match first_with_code.get(&code) {
                Some(entry) => {
                    entries.insert(name, entry.clone());
                    // SAFETY: `func` is a kernel of this module that nothing
                    // refers to (kernels are launched by name, there is no
                    // host code here); no reference to it is used after this.
                    unsafe { mlir_sys::mlirOperationDestroy(func.to_raw()) };
                }
                None => {
                    first_with_code.insert(code, name.clone());
                    entries.insert(name.clone(), name);
                }
            }
        }
    }
    Ok(entries)
}

/// The PTX of the single `gpu.binary` op at the top of `module`.
fn extract_ptx(module: &Module) -> Result<String, LowerError> {
    let mut found = Vec::new();
    let mut next = module.body().first_operation();
    while let Some(op) = next {
        if op.name().as_string_ref().as_str() == Ok("gpu.binary") {
            found.push(binary_ptx(&op)?);
        }
        next = op.next_in_block();
    }
    match found.len() {
        1 => Ok(found.pop().unwrap_or_default()),
        n => Err(LowerError::Ptx(format!("expected one gpu.binary after the GPU pipeline, found {n}"))),
    }
}

fn binary_ptx(op: &OperationRef) -> Result<String, LowerError> {
    let objects = op.attribute("objects")?;
    let objects = ArrayAttribute::try_from(objects)
        .map_err(|_| LowerError::Ptx("gpu.binary `objects` is not an array".to_string()))?;
    if objects.len() != 1 {
        return Err(LowerError::Ptx(format!("expected one object in gpu.binary, found {}", objects.len())));
    }
    let object = objects.element(0)?;
    let raw = object.to_raw();
    // SAFETY: `raw` is a live attribute of `module`; the string it returns is
    // owned by the context and copied out before the module is dropped.
    let bytes = unsafe {
        if !mlir_sys::mlirAttributeIsAGPUObjectAttr(raw) {
            return Err(LowerError::Ptx("gpu.binary object is not a #gpu.object".to_string()));
        }
        let data = mlir_sys::mlirGPUObjectAttrGetObject(raw);
        if data.data.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data.data.cast::<u8>(), data.length).to_vec()
        }
    };
    let ptx = String::from_utf8(bytes).map_err(|_| LowerError::Ptx("the PTX is not UTF-8".to_string()))?;
    if !ptx.contains(".entry") {
        return Err(LowerError::Ptx("the gpu.binary object holds no PTX kernel (.entry)".to_string()));
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_fills_placeholders() {
        let text = gpu_pipeline("sm_80", Path::new("/x/libdevice.10.bc"));
        assert!(text.contains("chip=sm_80"), "{text}");
        assert!(text.contains("l=\"/x/libdevice.10.bc\""), "{text}");
        assert!(!text.contains('{') || !text.contains("{chip}"), "{text}");
        assert!(text.ends_with("gpu-module-to-binary{format=isa})"), "{text}");
    }

    #[test]
    fn targets_parse() {
        assert_eq!(GpuTarget::parse("sm_80"), Some(GpuTarget::Sm80));
        assert_eq!(GpuTarget::parse("sm_90"), Some(GpuTarget::Sm90));
        assert_eq!(GpuTarget::parse("sm_75"), None);
        assert_eq!(GpuTarget::default().to_string(), "sm_90");
    }

    #[test]
    fn missing_libdevice_names_flag_and_env() {
        let error = find_libdevice(Some(Path::new("/nonexistent/libdevice.10.bc"))).unwrap_err().to_string();
        assert!(error.contains("--libdevice") && error.contains("does not exist"), "{error}");
        let error = check_libdevice(Path::new("/a,b/libdevice.10.bc")).unwrap_err();
        assert!(error.contains("`,`"), "{error}");
    }
}
