//! How to run a manifest at concrete dims, without a device: buffer shapes
//! and sizes, input checks, the intermediates' shared slots, and every
//! launch's geometry and argument values in ABI order (docs/artifact.md):
//! the runtime dims as `i64`, then one device pointer per buffer parameter.
//! Kernels whose grid is 0 at the dims are left out.
//!
//! A device backend supplies the pointers (`pointer(buffer index)`) and
//! launches [`LaunchSpec`]s in order; the CUDA backend does exactly that.

use crate::dtype::DType;
use crate::manifest::{parse_expr, BufferKind, Expr, ExprError, Manifest, ParamKind, Size};
use crate::plan::MemoryPlan;
use crate::StepError;
use std::collections::{BTreeMap, HashMap};

/// Largest grid in x and in y/z (CUDA limits), and threads per block.
const MAX_GRID_X: i64 = (1 << 31) - 1;
const MAX_GRID_YZ: i64 = 65535;
const MAX_THREADS: i64 = 1024;

/// A buffer of the manifest with its shape parsed.
#[derive(Clone, Debug)]
pub struct BufferInfo {
    pub name: String,
    pub kind: BufferKind,
    pub dtype: DType,
    /// The rows axis and its runtime dim, for a buffer that may be stored
    /// with spare rows ([`crate::manifest::Pitch`]).
    pub pitch: Option<(usize, String)>,
    /// Each axis's size, by index in [`ExecPlan`]'s expression table.
    shape: Vec<usize>,
}

/// Where a kernel argument comes from.
#[derive(Clone, Debug)]
enum Arg {
    /// A runtime dim, by index in the manifest's `dims.runtime`.
    Dim(usize),
    /// The row capacity of the buffers pitched along this runtime dim.
    Capacity(usize),
    /// A buffer, by index in the manifest's table.
    Buffer(usize),
}

/// A kernel of the manifest, resolved.
#[derive(Clone, Debug)]
pub struct KernelInfo {
    pub name: String,
    pub entry: String,
    pub op: String,
    /// Index of its entry in [`ExecPlan::entries`].
    pub function: usize,
    /// By index in [`ExecPlan`]'s expression table.
    grid: [usize; 3],
    block: [usize; 3],
    args: Vec<Arg>,
}

/// One launch at concrete dims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchSpec {
    /// Index in [`ExecPlan::kernels`].
    pub kernel: usize,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// One 64-bit value per parameter: an `i64` dim (two's complement) or a pointer.
    pub args: Vec<u64>,
}

/// A manifest resolved for execution.
#[derive(Clone, Debug)]
pub struct ExecPlan {
    manifest: Manifest,
    pub buffers: Vec<BufferInfo>,
    pub kernels: Vec<KernelInfo>,
    /// Distinct PTX entries, in first-use order.
    pub entries: Vec<String>,
    by_name: HashMap<String, usize>,
    /// Every distinct size expression of the buffers and kernels (layer
    /// after layer repeats the same few): [`ExecPlan::bind_dims`] evaluates
    /// each once.
    exprs: Vec<Expr>,
    /// Intermediate buffer index → slot.
    slot_of: Vec<Option<usize>>,
    slot_members: Vec<Vec<usize>>,
}

/// The dims of one step, bound: every dim's value (constants and runtime
/// dims; it derefs to that map) and the value of every expression of the
/// plan at them.
#[derive(Clone, Debug)]
pub struct Bound {
    dims: BTreeMap<String, i64>,
    /// The runtime dims' values, in the manifest's `dims.runtime` order.
    runtime: Vec<i64>,
    values: Vec<Result<i64, ExprError>>,
}

impl std::ops::Deref for Bound {
    type Target = BTreeMap<String, i64>;

    fn deref(&self) -> &Self::Target {
        &self.dims
    }
}

impl Bound {
    /// Expression `index`'s value; `what` names it in the error.
    fn value(&self, index: usize, what: impl Fn() -> String) -> Result<i64, StepError> {
        match self.values.get(index) {
            Some(Ok(v)) => Ok(*v),
            Some(Err(e)) => Err(StepError::Dims(format!("{}: {e}", what()))),
            None => Err(StepError::Backend(format!("{}: dims bound for another plan", what()))),
        }
    }
}

/// The index of `dim` in the manifest's runtime dims (kernel `kernel` takes
/// `what` it).
fn runtime_dim(manifest: &Manifest, kernel: &str, dim: &str, what: &str) -> Result<usize, StepError> {
    manifest.dims.runtime.iter().position(|d| d == dim).ok_or_else(|| {
        StepError::Backend(format!("kernel `{kernel}` takes {what} `{dim}`, which is not a runtime dim"))
    })
}

/// Distinct size expressions, parsed once each.
#[derive(Default)]
struct Interner {
    exprs: Vec<Expr>,
    index: HashMap<String, usize>,
}

impl Interner {
    fn intern(&mut self, size: &Size, what: impl Fn() -> String) -> Result<usize, StepError> {
        let text = match size {
            Size::Int(v) => v.to_string(),
            Size::Expr(text) => text.clone(),
        };
        if let Some(&i) = self.index.get(&text) {
            return Ok(i);
        }
        let expr = match size {
            Size::Int(v) => Expr::Int(*v),
            Size::Expr(text) => parse_expr(text).map_err(|e| StepError::Backend(format!("{}: {e}", what())))?,
        };
        self.exprs.push(expr);
        self.index.insert(text, self.exprs.len() - 1);
        Ok(self.exprs.len() - 1)
    }
}

impl ExecPlan {
    /// Resolves names, parses every size, plans the intermediates' memory
    /// (`share`: let intermediates with disjoint lifetimes share a slot).
    pub fn new(manifest: &Manifest, share: bool) -> Result<Self, StepError> {
        let mut buffers = Vec::new();
        let mut by_name = HashMap::new();
        let mut interner = Interner::default();
        for (i, b) in manifest.buffers.iter().enumerate() {
            let dtype = DType::parse(&b.dtype).map_err(|e| StepError::Backend(format!("buffer `{}`: {e}", b.name)))?;
            let shape = b
                .shape
                .iter()
                .enumerate()
                .map(|(axis, s)| interner.intern(s, || format!("buffer `{}` shape[{axis}]", b.name)))
                .collect::<Result<_, _>>()?;
            by_name.insert(b.name.clone(), i);
            let pitch = b.pitch.as_ref().map(|p| (p.axis, p.dim.clone()));
            buffers.push(BufferInfo { name: b.name.clone(), kind: b.kind, dtype, pitch, shape });
        }
        let mut entries: Vec<String> = Vec::new();
        let mut kernels = Vec::new();
        for k in &manifest.kernels {
            let function = match entries.iter().position(|e| *e == k.entry) {
                Some(i) => i,
                None => {
                    entries.push(k.entry.clone());
                    entries.len() - 1
                }
            };
            let mut axis = |sizes: &[Size; 3], what: &str| -> Result<[usize; 3], StepError> {
                let mut p = |i: usize| interner.intern(&sizes[i], || format!("kernel `{}` {what}[{i}]", k.name));
                Ok([p(0)?, p(1)?, p(2)?])
            };
            let mut args = Vec::new();
            for p in &k.params {
                args.push(match p.kind {
                    ParamKind::Dim => Arg::Dim(runtime_dim(manifest, &k.name, &p.name, "dim")?),
                    ParamKind::Capacity => Arg::Capacity(runtime_dim(manifest, &k.name, &p.name, "the capacity of")?),
                    ParamKind::Buffer => Arg::Buffer(*by_name.get(&p.name).ok_or_else(|| {
                        StepError::Backend(format!("kernel `{}` names unknown buffer `{}`", k.name, p.name))
                    })?),
                });
            }
            let (grid, block) = (axis(&k.grid, "grid")?, axis(&k.block, "block")?);
            kernels.push(KernelInfo {
                name: k.name.clone(),
                entry: k.entry.clone(),
                op: k.op.clone(),
                function,
                grid,
                block,
                args,
            });
        }
        let plan = MemoryPlan::new(manifest, share).map_err(|e| StepError::Backend(format!("memory plan: {e}")))?;
        let mut slot_of = vec![None; buffers.len()];
        let mut slot_members = Vec::new();
        for (slot, members) in plan.slots.iter().enumerate() {
            let mut indices = Vec::new();
            for name in members {
                let i = *by_name
                    .get(name.as_str())
                    .ok_or_else(|| StepError::Backend(format!("memory plan names unknown buffer `{name}`")))?;
                slot_of[i] = Some(slot);
                indices.push(i);
            }
            slot_members.push(indices);
        }
        Ok(ExecPlan {
            manifest: manifest.clone(),
            buffers,
            kernels,
            entries,
            by_name,
            exprs: interner.exprs,
            slot_of,
            slot_members,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// A buffer's index in the manifest's table.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The slot of an intermediate.
    pub fn slot_of(&self, buffer: usize) -> Option<usize> {
        self.slot_of.get(buffer).copied().flatten()
    }

    pub fn slot_count(&self) -> usize {
        self.slot_members.len()
    }

    /// Every dim bound (constants and runtime dims) and every size
    /// expression evaluated at them; rejects negative values, missing
    /// runtime dims and unknown names (an expression that cannot be
    /// evaluated is an error where it is used).
    pub fn bind_dims(&self, dims: &BTreeMap<String, i64>) -> Result<Bound, StepError> {
        if let Some((name, v)) = dims.iter().find(|(_, v)| **v < 0) {
            return Err(StepError::Dims(format!("`{name}` = {v} is negative")));
        }
        let dims = self.manifest.bind(dims).map_err(|e| StepError::Dims(e.to_string()))?;
        let values = self.exprs.iter().map(|e| e.eval(&dims)).collect();
        let runtime = self.manifest.dims.runtime.iter().map(|d| dims.get(d).copied().unwrap_or(0)).collect();
        Ok(Bound { dims, runtime, values })
    }

    /// Buffer `i`'s shape at the bound dims.
    pub fn shape_at(&self, i: usize, all: &Bound) -> Result<Vec<usize>, StepError> {
        self.axes_at(i, all).collect()
    }

    /// Buffer `i`'s size along each axis at the bound dims (not collected:
    /// [`ExecPlan::bytes_at`] runs for every buffer at every step).
    fn axes_at<'a>(&'a self, i: usize, all: &'a Bound) -> impl Iterator<Item = Result<usize, StepError>> + 'a {
        let b = &self.buffers[i];
        b.shape.iter().map(move |&e| {
            let v = all.value(e, || format!("buffer `{}` shape", b.name))?;
            usize::try_from(v).map_err(|_| StepError::Dims(format!("buffer `{}` has size {v} at these dims", b.name)))
        })
    }

    /// Buffer `i`'s size in bytes at the bound dims.
    pub fn bytes_at(&self, i: usize, all: &Bound) -> Result<usize, StepError> {
        let b = &self.buffers[i];
        let mut bytes = Some(b.dtype.size());
        for v in self.axes_at(i, all) {
            let v = v?;
            bytes = bytes.and_then(|n| n.checked_mul(v));
        }
        bytes.ok_or_else(|| StepError::Dims(format!("buffer `{}` is too large at these dims", b.name)))
    }

    /// Bytes of each intermediate slot at the bound dims (its largest member).
    pub fn slot_bytes(&self, all: &Bound) -> Result<Vec<usize>, StepError> {
        self.slot_members
            .iter()
            .map(|members| members.iter().try_fold(0usize, |acc, &i| Ok(acc.max(self.bytes_at(i, all)?))))
            .collect()
    }

    /// Device bytes a step needs at the bound dims: inputs, outputs, slots.
    pub fn bytes_needed(&self, all: &Bound) -> Result<usize, StepError> {
        let mut total = 0usize;
        for (i, b) in self.buffers.iter().enumerate() {
            if b.kind != BufferKind::Intermediate {
                total = total.saturating_add(self.bytes_at(i, all)?);
            }
        }
        Ok(total.saturating_add(self.slot_bytes(all)?.iter().sum::<usize>()))
    }

    /// Checks that every input was bound (`bound[i]`: the shape it was
    /// bound with) with its shape at the dims; a zero-size input may be unbound.
    pub fn check_inputs(&self, all: &Bound, bound: &[Option<Vec<usize>>]) -> Result<(), StepError> {
        for (i, b) in self.buffers.iter().enumerate() {
            if b.kind != BufferKind::Input {
                continue;
            }
            let expected = self.shape_at(i, all)?;
            match bound.get(i).and_then(Option::as_ref) {
                Some(shape) if *shape == expected => {}
                Some(shape) => return Err(StepError::Shape { name: b.name.clone(), expected, got: shape.clone() }),
                None if expected.contains(&0) => {}
                None => return Err(StepError::Unbound(b.name.clone())),
            }
        }
        Ok(())
    }

    /// Every launch at the bound dims, in order, grid-0 kernels left out.
    /// `capacities` gives the row capacity of the pitched buffers along a
    /// dim (at least the dim's value); a dim without one is dense (its
    /// value). `pointer(i)` is the device address of buffer `i` (any
    /// non-null value for a zero-size buffer).
    pub fn launches(
        &self,
        all: &Bound,
        capacities: &BTreeMap<String, i64>,
        pointer: impl Fn(usize) -> u64,
    ) -> Result<Vec<LaunchSpec>, StepError> {
        for (dim, &cap) in capacities {
            match all.get(dim) {
                Some(&v) if self.manifest.dims.runtime.contains(dim) && cap >= v => {}
                _ => {
                    return Err(StepError::Dims(format!(
                        "capacity {cap} for `{dim}`, which is not a runtime dim of at most that value"
                    )))
                }
            }
        }
        if all.values.len() != self.exprs.len() || all.runtime.len() != self.manifest.dims.runtime.len() {
            return Err(StepError::Backend("launches: dims bound for another plan".into()));
        }
        // Each runtime dim's capacity: given, else the dim's value (dense).
        let caps: Vec<i64> = self
            .manifest
            .dims
            .runtime
            .iter()
            .zip(&all.runtime)
            .map(|(d, v)| capacities.get(d).copied().unwrap_or(*v))
            .collect();
        let mut launches = Vec::with_capacity(self.kernels.len());
        for (index, k) in self.kernels.iter().enumerate() {
            let mut grid = [0i64; 3];
            let mut block = [0i64; 3];
            for axis in 0..3 {
                grid[axis] = all.value(k.grid[axis], || format!("kernel `{}` grid[{axis}]", k.name))?;
                block[axis] = all.value(k.block[axis], || format!("kernel `{}` block[{axis}]", k.name))?;
            }
            if grid.contains(&0) {
                continue; // nothing to compute at these dims (e.g. m_d = 0)
            }
            let bad_grid = grid[0] < 0 || grid[0] > MAX_GRID_X || grid[1..].iter().any(|g| *g < 0 || *g > MAX_GRID_YZ);
            let threads = block.iter().try_fold(1i64, |t, b| t.checked_mul(*b)).unwrap_or(i64::MAX);
            if bad_grid || block.iter().any(|b| *b <= 0) || threads > MAX_THREADS {
                return Err(StepError::Dims(format!(
                    "kernel `{}`: grid {grid:?} / block {block:?} exceed CUDA's launch limits at these dims",
                    k.name
                )));
            }
            let args = k
                .args
                .iter()
                .map(|a| match *a {
                    Arg::Dim(d) => all.runtime[d] as u64,
                    Arg::Capacity(d) => caps[d] as u64,
                    Arg::Buffer(i) => pointer(i),
                })
                .collect();
            launches.push(LaunchSpec {
                kernel: index,
                grid: grid.map(|g| g as u32),
                block: block.map(|b| b as u32),
                args,
            });
        }
        Ok(launches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{ptx_entry_params, Artifact};
    use std::path::Path;

    fn tiny() -> Artifact {
        Artifact::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.ptx")).unwrap()
    }

    fn dims(b: i64, m_c: i64, m_d: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([("b".into(), b), ("m_c".into(), m_c), ("m_d".into(), m_d)])
    }

    /// A fake address per buffer: index i at 0x1000 * (i + 1); zero-size: 0xdead00.
    fn fake_pointer<'a>(plan: &'a ExecPlan, all: &Bound) -> impl Fn(usize) -> u64 + 'a {
        let all = all.clone();
        move |i| if plan.bytes_at(i, &all).unwrap() == 0 { 0xdead00 } else { 0x1000 * (i as u64 + 1) }
    }

    #[test]
    fn launches_follow_the_abi() {
        let a = tiny();
        let m = &a.manifest;
        let plan = ExecPlan::new(m, true).unwrap();
        let all = plan.bind_dims(&dims(3, 100, 5)).unwrap();
        let launches = plan.launches(&all, &BTreeMap::new(), fake_pointer(&plan, &all)).unwrap();
        assert_eq!(launches.len(), m.kernels.len(), "every kernel runs when no dim is 0");
        let params = ptx_entry_params(&a.ptx);
        for l in &launches {
            let k = &m.kernels[l.kernel];
            // Arguments: b, m_c, m_d, the capacity of m_d for kernels that
            // read a decode cache (dense here: m_d itself), then one pointer
            // per buffer parameter.
            assert_eq!(&l.args[..3], &[3, 100, 5], "{}", k.name);
            assert_eq!(l.args.len(), k.params.len());
            assert_eq!(params[&k.entry], k.params.len(), "PTX entry {} parameter count", k.entry);
            for (p, v) in k.params.iter().zip(&l.args).skip(3) {
                if p.kind == ParamKind::Capacity {
                    let dense = [("m_c", 100), ("m_d", 5)].into_iter().find(|(d, _)| *d == p.name).map(|(_, v)| v);
                    assert_eq!(Some(*v), dense, "{} capacity of {}", k.name, p.name);
                    continue;
                }
                let i = plan.index(&p.name).unwrap();
                assert_eq!(*v, 0x1000 * (i as u64 + 1), "{} {}", k.name, p.name);
            }
            // A capacity per dim of the KV caches it reads (pitched rows).
            let mut cache_dims: Vec<&str> = k
                .reads
                .iter()
                .filter_map(|r| {
                    if r.contains("_dec") {
                        Some("m_d")
                    } else if r.contains("_ctx") {
                        Some("m_c")
                    } else {
                        None
                    }
                })
                .collect();
            cache_dims.sort_unstable();
            cache_dims.dedup();
            let caps: Vec<&str> =
                k.params.iter().filter(|p| p.kind == ParamKind::Capacity).map(|p| p.name.as_str()).collect();
            assert_eq!(caps, cache_dims, "{}", k.name);
            // One thread per output element, 256 per block.
            let extent = m.eval(&k.extent, &dims(3, 100, 5)).unwrap();
            assert_eq!(l.block, [256, 1, 1]);
            assert_eq!(l.grid, [((extent + 255) / 256) as u32, 1, 1], "{}", k.name);
        }
    }

    #[test]
    fn skips_empty_launches_and_passes_a_pointer_for_empty_buffers() {
        let a = tiny();
        let plan = ExecPlan::new(&a.manifest, true).unwrap();
        // The first decode step of a fill: no context, no decoded rows.
        let all = plan.bind_dims(&dims(1, 0, 0)).unwrap();
        let launches = plan.launches(&all, &BTreeMap::new(), fake_pointer(&plan, &all)).unwrap();
        let ran: Vec<&str> = launches.iter().map(|l| a.manifest.kernels[l.kernel].name.as_str()).collect();
        assert!(!ran.iter().any(|n| n.contains("scores_einsum1") || n.contains("scores_einsum2")), "{ran:?}");
        assert!(ran.iter().any(|n| n.contains("scores_einsum3")), "the new token's own score runs");
        let softmax = launches.iter().find(|l| a.manifest.kernels[l.kernel].op == "softmax").unwrap();
        assert!(softmax.args.contains(&0xdead00), "empty context scores get the placeholder pointer");
        assert!(!softmax.args[3..].contains(&0));
    }

    #[test]
    fn checks_inputs_and_dims() {
        let a = tiny();
        let plan = ExecPlan::new(&a.manifest, true).unwrap();
        let all = plan.bind_dims(&dims(2, 4, 0)).unwrap();
        let mut bound: Vec<Option<Vec<usize>>> = vec![None; plan.buffers.len()];
        for (i, b) in plan.buffers.iter().enumerate() {
            if b.kind == BufferKind::Input {
                bound[i] = Some(plan.shape_at(i, &all).unwrap());
            }
        }
        plan.check_inputs(&all, &bound).unwrap();
        // Zero-size inputs (the decode caches at m_d = 0) may stay unbound.
        let dec = plan.index("cache.0.k_dec").unwrap();
        bound[dec] = None;
        plan.check_inputs(&all, &bound).unwrap();
        let ctx = plan.index("cache.1.v_ctx").unwrap();
        bound[ctx] = Some(vec![2, 5, 16]);
        let err = plan.check_inputs(&all, &bound).unwrap_err().to_string();
        assert!(err.contains("cache.1.v_ctx") && err.contains("[2, 4, 16]") && err.contains("[2, 5, 16]"), "{err}");
        bound[ctx] = None;
        assert!(matches!(plan.check_inputs(&all, &bound), Err(StepError::Unbound(n)) if n == "cache.1.v_ctx"));

        assert!(plan.bind_dims(&dims(-1, 0, 0)).unwrap_err().to_string().contains("negative"));
        assert!(plan.bind_dims(&BTreeMap::from([("b".into(), 1)])).is_err());
        let all = plan.bind_dims(&dims(2, 4, 3)).unwrap();
        let caps = BTreeMap::from([("m_d".to_string(), 2)]);
        let err = plan.launches(&all, &caps, |_| 1).unwrap_err().to_string();
        assert!(err.contains("capacity 2 for `m_d`"), "{err}");
        let caps = BTreeMap::from([("m_d".to_string(), 9)]);
        let launches = plan.launches(&all, &caps, |_| 1).unwrap();
        assert!(launches.iter().any(|l| l.args.contains(&9)), "a capacity reaches the kernels");
        let huge = plan.bind_dims(&dims(1 << 40, 1, 1)).unwrap();
        let err = plan.launches(&huge, &BTreeMap::new(), |_| 1).unwrap_err().to_string();
        assert!(err.contains("launch limits"), "{err}");
        // A block whose threads overflow i64 (a corrupt manifest): the
        // same error, not an overflow.
        let mut m = a.manifest.clone();
        m.kernels[2].block[1] = Size::Int(i64::MAX);
        let plan = ExecPlan::new(&m, true).unwrap();
        let err = plan.launches(&plan.bind_dims(&dims(2, 4, 3)).unwrap(), &BTreeMap::new(), |_| 1).unwrap_err();
        assert!(err.to_string().contains(&m.kernels[2].name) && err.to_string().contains("launch limits"), "{err}");
    }

    #[test]
    fn each_expression_is_evaluated_once_and_errors_name_their_use() {
        let a = tiny();
        let plan = ExecPlan::new(&a.manifest, true).unwrap();
        // Far fewer distinct expressions than sizes: the two layers repeat them.
        let sizes = plan.buffers.iter().map(|b| b.shape.len()).sum::<usize>() + 6 * plan.kernels.len();
        assert!(plan.exprs.len() * 4 < sizes, "{} expressions for {sizes} sizes", plan.exprs.len());
        // Values and kernel arguments as the expressions give them.
        let all = plan.bind_dims(&dims(3, 7, 2)).unwrap();
        let launches = plan.launches(&all, &BTreeMap::new(), |_| 1).unwrap();
        for l in &launches {
            let k = &a.manifest.kernels[l.kernel];
            let grid: Vec<u32> = k.grid.iter().map(|g| a.manifest.eval(g, &dims(3, 7, 2)).unwrap() as u32).collect();
            assert_eq!(l.grid.to_vec(), grid, "{}", k.name);
            assert_eq!(&l.args[..3], &[3, 7, 2], "{}: the runtime dims first", k.name);
        }

        // A grid that is not whole at these dims: an error naming the kernel.
        let mut m = a.manifest.clone();
        m.kernels[1].grid[0] = Size::Expr("b/2".into());
        let plan = ExecPlan::new(&m, true).unwrap();
        let all = plan.bind_dims(&dims(3, 7, 2)).unwrap();
        let err = plan.launches(&all, &BTreeMap::new(), |_| 1).unwrap_err().to_string();
        assert!(err.contains(&format!("kernel `{}` grid[0]", m.kernels[1].name)) && err.contains("whole"), "{err}");
        assert!(plan.launches(&plan.bind_dims(&dims(4, 7, 2)).unwrap(), &BTreeMap::new(), |_| 1).is_ok());

        // A dim parameter that is not a runtime dim: an error at load.
        let mut m = a.manifest.clone();
        m.kernels[0].params[0].name = "h".into();
        let err = ExecPlan::new(&m, true).unwrap_err().to_string();
        assert!(err.contains(&m.kernels[0].name) && err.contains("`h`, which is not a runtime dim"), "{err}");
    }

    #[test]
    fn sizes_and_slots() {
        let a = tiny();
        let plan = ExecPlan::new(&a.manifest, true).unwrap();
        let all = plan.bind_dims(&dims(2, 8, 3)).unwrap();
        let logits = plan.index("logits").unwrap();
        assert_eq!(plan.shape_at(logits, &all).unwrap(), vec![2, 1, 256]);
        assert_eq!(plan.bytes_at(logits, &all).unwrap(), 2 * 256 * 4);
        let slots = plan.slot_bytes(&all).unwrap();
        assert_eq!(slots.len(), plan.slot_count());
        for (i, b) in plan.buffers.iter().enumerate() {
            match plan.slot_of(i) {
                Some(s) => assert!(plan.bytes_at(i, &all).unwrap() <= slots[s]),
                None => assert_ne!(b.kind, BufferKind::Intermediate),
            }
        }
        let needed = plan.bytes_needed(&all).unwrap();
        let unshared = ExecPlan::new(&a.manifest, false).unwrap().bytes_needed(&all).unwrap();
        assert!(needed < unshared, "{needed} < {unshared}");
    }
}
