//! The CPU backend of the runtime's [`Step`] interface: the compiled step
//! JIT-compiled for the host through MLIR ([`crate::lower::CpuStep`]). It
//! lives in this crate, not in `bifurc-runtime`, because it links MLIR.
//!
//! Inputs are kept in their storage dtype ([`crate::lower::cpu::Stored`]):
//! a bf16 weight or context cache is converted once, when bound, not at
//! every step. Decode caches can be kept in the backend with spare rows
//! ([`Step::reserve_rows`]), as on CUDA: the same pitched kernels read them
//! with the capacity as row stride, and a step's new rows are copied in
//! place.

use crate::interp::Tensor;
use crate::ir::Graph;
use crate::lower::cpu::Stored;
use crate::lower::{BufferKind, CpuStep, LowerError};
use bifurc_runtime::rows::RowCaches;
use bifurc_runtime::{HostTensor, Step, StepError};
use std::collections::{BTreeMap, HashMap};

/// A graph compiled for the CPU, with its bound inputs.
pub struct CpuBackend {
    step: CpuStep,
    runtime: Vec<String>,
    /// Inputs by name, in their storage dtype; a reserved cache is stored
    /// with its capacity's rows.
    bound: HashMap<String, Stored>,
    rows: RowCaches,
    /// Outputs of the last run while caches are reserved (the new rows to
    /// append).
    last: HashMap<String, HostTensor>,
}

impl CpuBackend {
    /// JIT-compiles `graph` (one compilation serves every value of the runtime dims).
    pub fn compile(graph: &Graph) -> Result<Self, LowerError> {
        Ok(Self {
            step: CpuStep::compile(graph)?,
            runtime: graph.dims.runtime.clone(),
            bound: HashMap::new(),
            rows: RowCaches::default(),
            last: HashMap::new(),
        })
    }

    /// The compiled step (its plans: [`CpuStep::program_at`]).
    pub fn step(&self) -> &CpuStep {
        &self.step
    }

    /// The parts the step's large kernels are split into
    /// ([`CpuStep::set_threads`]).
    pub fn threads(&self) -> usize {
        self.step.threads()
    }

    /// Bytes the step's kernels move at `dims`, by the bytes model applied
    /// to its plan ([`CpuStep::moved_at`]).
    pub fn moved_at(&self, dims: &BTreeMap<String, i64>) -> f64 {
        self.step.moved_at(dims)
    }

    /// Bytes this backend holds when it runs at `dims` with every input
    /// bound, a decode cache kept with `capacities` rows where given
    /// ([`CpuStep::bytes_at`]).
    pub fn bytes_at(
        &self,
        dims: &BTreeMap<String, i64>,
        capacities: &BTreeMap<String, i64>,
    ) -> Result<usize, StepError> {
        self.step.bytes_at(dims, capacities).map_err(|e| StepError::Backend(e.to_string()))
    }

    /// [`CpuBackend::bytes_at`] of the buffers named by `which` alone
    /// ([`CpuStep::bytes_where`]).
    pub fn bytes_where(&self, dims: &BTreeMap<String, i64>, which: impl Fn(&str) -> bool) -> Result<usize, StepError> {
        self.step.bytes_where(dims, &BTreeMap::new(), which).map_err(|e| StepError::Backend(e.to_string()))
    }

    /// Unbinds every input and frees the intermediates: the backend holds
    /// nothing large until inputs are bound and it runs again.
    pub fn release(&mut self) {
        self.release_but(|_| false);
    }

    /// [`CpuBackend::release`], but the inputs named by `keep` stay bound
    /// (a bench's weights, from one point of its sweep to the next); a
    /// cache kept with spare rows ([`Step::reserve_rows`]) is released
    /// all the same.
    pub fn release_but(&mut self, keep: impl Fn(&str) -> bool) {
        let rows = &self.rows;
        self.bound.retain(|name, _| keep(name) && rows.geometry(name).is_err());
        self.rows = RowCaches::default();
        self.last.clear();
        self.step.release_scratch();
    }

    /// Whether input `name` is bound.
    pub fn is_bound(&self, name: &str) -> bool {
        self.bound.contains_key(name)
    }

    /// Input `name` as bound, in its storage dtype and kept layout.
    pub fn stored(&self, name: &str) -> Option<&Stored> {
        self.bound.get(name)
    }

    /// Whether `other` stores input `name` as this backend does
    /// ([`CpuStep::stores_alike`]), so that one copy serves both
    /// ([`CpuBackend::bind_shared`]).
    pub fn stores_alike(&self, other: &CpuBackend, name: &str) -> bool {
        self.step.stores_alike(&other.step, name)
    }

    /// Binds input `name` to the elements `from` holds for it, without a
    /// copy, where both steps store it alike ([`CpuStep::stores_alike`]):
    /// `Ok(false)` where they do not (bind this step's own then). Rows
    /// cannot be appended to a shared input.
    pub fn bind_shared(&mut self, from: &CpuBackend, name: &str) -> Result<bool, StepError> {
        let stored = from.bound.get(name).ok_or_else(|| StepError::Unbound(name.to_string()))?;
        if !self.stores_alike(from, name) {
            return Ok(false);
        }
        self.rows.forget(name);
        self.bound.insert(name.to_string(), stored.clone());
        Ok(true)
    }

    /// Binds a reference-interpreter tensor without copying through
    /// [`HostTensor`] (converted to the input's storage dtype once).
    pub fn bind_tensor(&mut self, name: &str, tensor: Tensor) -> Result<(), StepError> {
        let stored = self.step.store(name, tensor).map_err(|e| StepError::Backend(e.to_string()))?;
        self.rows.forget(name);
        self.bound.insert(name.to_string(), stored);
        Ok(())
    }

    /// The rows axis and dim of pitched input `name`.
    fn pitch(&self, name: &str) -> Result<(usize, String), StepError> {
        let b = self.step.program().buffers.iter().find(|b| b.name == name);
        match b {
            Some(b) if matches!(b.kind, BufferKind::Input(_)) => match &b.pitch {
                Some(p) => Ok((p.axis, p.dim.clone())),
                None => Err(StepError::Backend(format!("`{name}` is not an input with spare rows (a decode cache)"))),
            },
            _ => Err(StepError::UnknownBuffer(name.to_string())),
        }
    }

    /// Appends the rows `new` (an output of the last run) to kept cache `name`.
    fn append_from(&mut self, name: &str, new: &HostTensor) -> Result<(), StepError> {
        let (r, g, moves) = self.rows.prepare_append(name, &new.shape)?;
        self.relayout(&moves)?;
        let t = self.bound.get_mut(name).ok_or_else(|| StepError::Unbound(name.to_string()))?;
        t.append(&g, &new.data, r, name).map_err(|e| StepError::Backend(e.to_string()))?;
        self.rows.appended(name, r);
        Ok(())
    }

    /// Applies the re-layouts `RowCaches` asks for to the stored tensors.
    fn relayout(&mut self, moves: &[bifurc_runtime::rows::Relayout]) -> Result<(), StepError> {
        for m in moves {
            let (axis, _) = self.pitch(&m.name)?;
            let t = self.bound.get_mut(&m.name).ok_or_else(|| StepError::Unbound(m.name.clone()))?;
            t.relayout(axis, &m.old, &m.new);
        }
        Ok(())
    }
}

impl Step for CpuBackend {
    fn runtime_dims(&self) -> Vec<String> {
        self.runtime.clone()
    }

    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
        tensor.check(name)?;
        // Converted straight from the caller's values (no f32 copy first).
        let stored =
            self.step.store_values(name, &tensor.shape, &tensor.data).map_err(|e| StepError::Backend(e.to_string()))?;
        self.rows.forget(name);
        self.bound.insert(name.to_string(), stored);
        Ok(())
    }

    /// Runs one step; returns the outputs named in `wanted` (all: `None`),
    /// and keeps every output while caches are reserved (append_rows reads
    /// them), copying only what both need.
    fn run_selected(
        &mut self,
        dims: &BTreeMap<String, i64>,
        wanted: Option<&[&str]>,
    ) -> Result<HashMap<String, HostTensor>, StepError> {
        let program = self.step.program();
        let pitched = program.buffers.iter().filter(|b| matches!(b.kind, BufferKind::Input(_)));
        self.rows.check_dense(pitched.filter_map(|b| Some((b.name.as_str(), b.pitch.as_ref()?.dim.as_str()))))?;
        let caps = self.rows.capacities();
        let out = self.step.run_stored(dims, &caps, &self.bound).map_err(|e| StepError::Backend(e.to_string()))?;
        let mut out: HashMap<String, HostTensor> =
            out.into_iter().map(|(k, t)| (k, HostTensor { shape: t.shape, data: t.data })).collect();
        let keep = |name: &str| wanted.is_none_or(|w| w.contains(&name));
        if self.rows.is_empty() {
            self.last.clear();
            out.retain(|name, _| keep(name));
            return Ok(out);
        }
        let picked = out.iter().filter(|(n, _)| keep(n)).map(|(n, t)| (n.clone(), t.clone())).collect();
        self.last = out;
        Ok(picked)
    }

    /// Makes room for the intermediates at `dims` ([`CpuStep::reserve`]).
    fn reserve(&mut self, dims: &BTreeMap<String, i64>) -> Result<(), StepError> {
        self.step.reserve(dims).map_err(|e| StepError::Backend(e.to_string()))
    }

    fn reserve_rows(&mut self, name: &str, shape: &[usize], capacity: usize) -> Result<bool, StepError> {
        let (axis, dim) = self.pitch(name)?;
        self.bound.remove(name);
        let (g, moves) = self.rows.reserve(name, axis, &dim, shape, capacity)?;
        self.relayout(&moves)?;
        let mut stored = shape.to_vec();
        stored[axis] = g.capacity;
        let zeros = self.step.store_zeros(name, stored).map_err(|e| StepError::Backend(e.to_string()))?;
        self.bound.insert(name.to_string(), zeros);
        Ok(true)
    }

    fn release_rows(&mut self, name: &str) -> Result<(), StepError> {
        if self.rows.contains(name) {
            self.rows.forget(name);
            self.bound.remove(name);
        }
        Ok(())
    }

    fn append_rows(&mut self, name: &str, rows: &str) -> Result<(), StepError> {
        // Taken out while the cache is re-laid out (no copy), then put back.
        let new =
            self.last.remove(rows).ok_or_else(|| StepError::Backend(format!("no output `{rows}` from a last step")))?;
        let appended = self.append_from(name, &new);
        self.last.insert(rows.to_string(), new);
        appended
    }

    fn read_rows(&mut self, name: &str) -> Result<HostTensor, StepError> {
        let g = self.rows.geometry(name)?;
        let t = self.bound.get(name).ok_or_else(|| StepError::Unbound(name.to_string()))?;
        let shape = self.rows.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        let dense = t.dense(&g, shape);
        Ok(HostTensor { shape: dense.shape, data: dense.data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_stored_in_their_dtype_when_bound() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"d": 4}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "f32"},
                {"name": "w", "role": "weight", "shape": ["d"], "dtype": "bf16"}
            ],
            "nodes": [{"id": "y", "op": "mul", "inputs": ["x", "w"], "dtype": "f32"}],
            "outputs": [{"name": "y", "node": "y"}]
        });
        let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
        let mut cpu = CpuBackend::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
        let w = HostTensor { shape: vec![4], data: vec![0.1, 0.2, 0.3, 0.4] };
        cpu.bind("w", &w).unwrap_or_else(|e| panic!("{e}"));
        cpu.bind("x", &HostTensor { shape: vec![1, 4], data: vec![1.0; 4] }).unwrap_or_else(|e| panic!("{e}"));
        // Converted once, at the bind: the step reads the bf16 bits in place.
        assert_eq!(cpu.bound["w"].dtype(), crate::ir::DType::BF16);
        assert_eq!(cpu.bound["x"].dtype(), crate::ir::DType::F32);
        let y = cpu.run(&BTreeMap::from([("b".to_string(), 1)])).unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<f32> =
            w.data.iter().map(|&v| crate::lower::cpu::bf16_to_f32(crate::lower::cpu::f32_to_bf16(v))).collect();
        assert_eq!(y["y"].data, want);
        let err = cpu.bind("nope", &w).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("`nope` is not an input"), "{err}");
    }

    /// A weight two steps store alike (the same graph twice: kept in
    /// panels by both) is bound once and shared, and both steps compute
    /// the same from it; a step that keeps it otherwise (`x @ W`, not in
    /// panels of `x @ Wᵀ`) is told to bind its own.
    /// Released but the weight, a backend keeps the weight alone.
    #[test]
    fn inputs_stored_alike_are_shared() {
        let graph = |nodes: serde_json::Value| {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"d": 64}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "f32"},
                    {"name": "w", "role": "weight", "shape": ["d", "d"], "dtype": "bf16"}
                ],
                "nodes": nodes,
                "outputs": [{"name": "y", "node": "y"}]
            });
            crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"))
        };
        let proj = graph(serde_json::json!([
            {"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}}
        ]));
        let other = graph(serde_json::json!([
            {"id": "y", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": false}}
        ]));
        let compile = |g: &Graph| CpuBackend::compile(g).unwrap_or_else(|e| panic!("{e}"));
        let (mut a, mut b, mut c) = (compile(&proj), compile(&proj), compile(&other));
        let dims = BTreeMap::from([("b".to_string(), 4)]);
        let inputs = crate::interp::random_inputs(&proj, &dims, 3).unwrap_or_else(|e| panic!("{e}"));
        for (name, t) in &inputs {
            a.bind_tensor(name, t.clone()).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(b.bind_shared(&a, "x").unwrap_or_else(|e| panic!("{e}")));
        assert!(b.bind_shared(&a, "w").unwrap_or_else(|e| panic!("{e}")));
        assert!(a.bound["w"].shares_elements(&b.bound["w"]), "one copy of the weight");
        let (ya, yb) = (a.run(&dims), b.run(&dims));
        let (ya, yb) = (ya.unwrap_or_else(|e| panic!("{e}")), yb.unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(ya["y"].data, yb["y"].data);
        assert!(!c.stores_alike(&a, "w"), "panels of `x @ Wᵀ` against `x @ W`");
        assert!(!c.bind_shared(&a, "w").unwrap_or_else(|e| panic!("{e}")));
        assert!(!c.is_bound("w"));
        let err = c.bind_shared(&b, "nope").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("nope"), "{err}");
        a.release_but(|name| name == "w");
        assert!(a.is_bound("w") && !a.is_bound("x"));
        a.release();
        assert!(!a.is_bound("w"));
    }

    /// The bytes a bifurcated step's kernels move: every weight and the
    /// whole context cache read at least once, and less than the graph's
    /// bytes model, which counts the scores' concat and slices as copies
    /// that the CPU plan does not make (its softmax over the scores in
    /// place). The baseline's plan moves the broadcast context once per
    /// sample, as the graph's model does.
    #[test]
    fn moved_bytes_follow_the_plan() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny/model.json");
        let graph = crate::import::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let dims = BTreeMap::from([("b".to_string(), 16), ("m_c".to_string(), 64), ("m_d".to_string(), 4)]);
        let options = crate::optimize::Options {
            point: crate::inspect::ShapePoint(dims.clone()),
            ..crate::optimize::Options::default()
        };
        let optimized = crate::optimize::optimize(&graph, &options).unwrap_or_else(|e| panic!("{e}")).graph;
        let model = |g: &Graph| {
            crate::inspect::bytes_moved(g, &crate::inspect::ShapePoint(dims.clone())).unwrap_or_else(|e| panic!("{e}"))
        };
        let (bif, base) = (model(&optimized), model(&graph));
        let compile = |g: &Graph| CpuBackend::compile(g).unwrap_or_else(|e| panic!("{e}"));
        let moved = compile(&optimized).moved_at(&dims);
        assert!(moved >= bif.weights + bif.context_kv, "{moved} vs {bif:?}");
        assert!(moved < bif.total(), "{moved} vs {bif:?}");
        let base_moved = compile(&graph).moved_at(&dims);
        assert!(base_moved >= base.context_kv && base.context_kv > 8.0 * bif.context_kv, "{base_moved} vs {base:?}");
    }
}
