//! [`CudaStep`]: one compiled decode step on a CUDA device.
//!
//! - Inputs live in persistent device buffers, one per name, uploaded on
//!   [`Step::bind`] in the buffer's storage dtype (reallocated only when the
//!   byte size grows).
//! - Intermediates share memory by lifetime ([`crate::plan::MemoryPlan`]); outputs have
//!   their own buffers. Both grow on demand with the dims.
//! - Decode caches may be kept on the device with spare rows
//!   ([`Step::reserve_rows`]): each step's new rows are appended by one
//!   2-D device copy per cache ([`Step::append_rows`]), nothing is uploaded.
//! - [`Step::run`] checks every input's shape at the dims, launches every
//!   kernel in manifest order on one stream (arguments in ABI order: the
//!   runtime dims as `i64`, then bare device pointers; launches whose grid is
//!   0 are skipped), synchronizes and downloads the outputs as `f32`
//!   ([`Step::run_for`]: only those asked for; a decode step with its
//!   caches on the device reads back the logits alone).

use super::buffer::DeviceBuffer;
use super::device::{backend, Device, DeviceInfo};
use crate::artifact::Artifact;
use crate::exec::{Bound, ExecPlan, LaunchSpec};
use crate::manifest::{BufferKind, Manifest};
use crate::rows::{dense_host, Relayout, RowCaches};
use crate::{HostTensor, Step, StepError};
use cudarc::driver::{sys, CudaEvent, CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// The time of one kernel in [`CudaStep::profile`].
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub entry: String,
    pub op: String,
    pub ms: f64,
}

/// A compiled decode step on one CUDA device.
pub struct CudaStep {
    plan: ExecPlan,
    device: Device,
    /// One per distinct entry, in [`ExecPlan::entries`] order.
    functions: Vec<CudaFunction>,
    /// Inputs and outputs, by buffer index (intermediates use `slots`).
    memory: Vec<DeviceBuffer>,
    /// The shape each input was last bound with.
    bound: Vec<Option<Vec<usize>>>,
    slots: Vec<DeviceBuffer>,
    /// A small allocation passed for zero-size buffers (the ABI wants a
    /// non-null pointer; nothing is read or written through it).
    dummy: CudaSlice<u8>,
    /// A bound input encoded in its dtype on its way to the device, kept
    /// from bind to bind; freed by [`Step::reserve`], which a session
    /// calls before it fills the context and before it decodes, after
    /// both CLIs have bound the weights (the largest of them had set its
    /// size: 262 MB for a 7B model's bf16 embeddings); the steps' own binds
    /// (ids, positions) are small.
    staging: Vec<u8>,
    /// The dims of the last step run (a timed run right after needs no warm-up).
    last_dims: Option<BTreeMap<String, i64>>,
    /// Decode caches kept on the device with spare rows.
    rows: RowCaches,
}

impl CudaStep {
    /// Opens device `ordinal`, loads the artifact's PTX module once and looks
    /// up each distinct kernel entry. Errors (not panics) when the CUDA
    /// driver is missing, the device does not exist or the PTX does not load.
    pub fn new(artifact: &Artifact, ordinal: usize) -> Result<Self, StepError> {
        // Resolve the manifest first: its errors need no device.
        let plan = ExecPlan::new(&artifact.manifest, true)?;
        let device = Device::open(ordinal, &artifact.ptx)?;
        let functions = plan.entries.iter().map(|e| device.function(e)).collect::<Result<Vec<_>, _>>()?;
        // SAFETY: uninitialized memory that no kernel reads (zero-size buffers only).
        let dummy = unsafe { device.stream.alloc::<u8>(256) }.map_err(|e| backend("allocation", e))?;
        let n = plan.buffers.len();
        Ok(CudaStep {
            memory: (0..n).map(|_| DeviceBuffer::default()).collect(),
            bound: vec![None; n],
            slots: (0..plan.slot_count()).map(|_| DeviceBuffer::default()).collect(),
            plan,
            device,
            functions,
            dummy,
            staging: Vec::new(),
            last_dims: None,
            rows: RowCaches::default(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        self.plan.manifest()
    }

    pub fn device_info(&self) -> &DeviceInfo {
        &self.device.info
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), StepError> {
        self.device.memory()
    }

    /// Device bytes this step holds now.
    pub fn allocated_bytes(&self) -> usize {
        self.memory.iter().chain(&self.slots).map(DeviceBuffer::capacity).sum()
    }

    /// Device bytes a step at `dims` needs: every input at its shape there,
    /// the outputs, and the intermediates' shared slots.
    pub fn bytes_needed(&self, dims: &BTreeMap<String, i64>) -> Result<usize, StepError> {
        self.plan.bytes_needed(&self.plan.bind_dims(dims)?)
    }

    /// Device bytes this step could hold: the device's free memory and
    /// what the step holds already (its own to reuse).
    pub fn available_bytes(&self) -> Result<usize, StepError> {
        let (free, _) = self.memory_info()?;
        Ok(free.saturating_add(self.allocated_bytes()))
    }

    /// `Err` when a step at `dims` ([`CudaStep::bytes_needed`]) needs more
    /// than the device's free memory and what this step holds already:
    /// asked before binding, so that a run too large for the GPU stops
    /// with the figures instead of an allocation error part way.
    /// `what` names the run in the message.
    pub fn check_fits(&self, what: &str, dims: &BTreeMap<String, i64>) -> Result<(), StepError> {
        let needed = self.bytes_needed(dims)?;
        let available = self.available_bytes()?;
        let device = format!("GPU {} ({})", self.device_info().ordinal, self.device_info().name);
        crate::memory::check(what, needed, Some(available), &device).map_err(|e| StepError::Backend(e.to_string()))
    }

    /// Frees the intermediates and outputs (inputs stay bound).
    pub fn release_scratch(&mut self) {
        for slot in &mut self.slots {
            slot.release();
        }
        for (i, b) in self.plan.buffers.iter().enumerate() {
            if b.kind == BufferKind::Output {
                self.memory[i].release();
            }
        }
    }

    /// Checks the inputs, sizes the scratch and outputs, and resolves every
    /// launch at `dims`; also returns the dims bound (for reading outputs).
    fn prepare(&mut self, dims: &BTreeMap<String, i64>) -> Result<(Vec<LaunchSpec>, Bound), StepError> {
        let all = self.plan.bind_dims(dims)?;
        self.plan.check_inputs(&all, &self.bound)?;
        let pitched = self.plan.buffers.iter().filter(|b| b.kind == BufferKind::Input);
        self.rows.check_dense(pitched.filter_map(|b| Some((b.name.as_str(), b.pitch.as_ref()?.1.as_str()))))?;
        self.size_memory(&all, true)?;
        let stream = self.device.stream.clone();
        let (dummy, _sync) = self.dummy.device_ptr(&stream);
        let mut pointers = Vec::with_capacity(self.plan.buffers.len());
        for i in 0..self.plan.buffers.len() {
            let ptr = if self.plan.bytes_at(i, &all)? == 0 {
                dummy
            } else {
                match self.plan.slot_of(i) {
                    Some(slot) => self.slots[slot].ptr(&stream, dummy),
                    None => self.memory[i].ptr(&stream, dummy),
                }
            };
            pointers.push(ptr);
        }
        let launches = self.plan.launches(&all, &self.rows.capacities(), |i| pointers[i])?;
        Ok((launches, all))
    }

    /// Sizes the outputs and the intermediates' slots for a step at `all`
    /// (with room to grow by an eighth when `headroom` and a buffer grows).
    fn size_memory(&mut self, all: &Bound, headroom: bool) -> Result<(), StepError> {
        let stream = self.device.stream.clone();
        for (i, b) in self.plan.buffers.iter().enumerate() {
            if b.kind == BufferKind::Output {
                self.memory[i].ensure(&stream, self.plan.bytes_at(i, all)?, headroom)?;
            }
        }
        for (slot, bytes) in self.slots.iter_mut().zip(self.plan.slot_bytes(all)?) {
            slot.ensure(&stream, bytes, headroom)?;
        }
        Ok(())
    }

    /// Input `name`'s index, checked to be a pitched input.
    fn pitched(&self, name: &str) -> Result<(usize, usize, String), StepError> {
        let i = self.plan.index(name).ok_or_else(|| StepError::UnknownBuffer(name.to_string()))?;
        let b = &self.plan.buffers[i];
        match (&b.kind, &b.pitch) {
            (BufferKind::Input, Some((axis, dim))) => Ok((i, *axis, dim.clone())),
            _ => Err(StepError::Backend(format!("`{name}` is not an input with spare rows (a decode cache)"))),
        }
    }

    /// Moves a resident cache's rows to its dim's new capacity.
    fn relayout(&mut self, m: &Relayout) -> Result<(), StepError> {
        let (i, _, _) = self.pitched(&m.name)?;
        let es = self.plan.buffers[i].dtype.size();
        let stream = self.device.stream.clone();
        let mut fresh = DeviceBuffer::default();
        fresh.ensure(&stream, m.new.stored() * es, false)?;
        let (old_pitch, new_pitch) = (m.old.capacity * m.old.row * es, m.new.capacity * m.new.row * es);
        let width = m.old.rows * m.old.row * es;
        fresh.copy_2d(&stream, 0, new_pitch, &self.memory[i], 0, old_pitch, width, m.old.outer)?;
        self.memory[i] = fresh;
        Ok(())
    }

    /// Queues one launch on the stream.
    fn launch(&self, launch: &LaunchSpec) -> Result<(), StepError> {
        let kernel = &self.plan.kernels[launch.kernel];
        let function = &self.functions[kernel.function];
        let config = LaunchConfig {
            grid_dim: (launch.grid[0], launch.grid[1], launch.grid[2]),
            block_dim: (launch.block[0], launch.block[1], launch.block[2]),
            shared_mem_bytes: 0,
        };
        let mut builder = self.device.stream.launch_builder(function);
        for value in &launch.args {
            builder.arg(value);
        }
        // SAFETY: the arguments follow the kernel ABI of docs/artifact.md that
        // the PTX entry was compiled for: one 64-bit value per parameter, in
        // the manifest's `params` order (the `i64` runtime dims and
        // capacities, then device pointers); `Artifact::load` checked that
        // the entry takes that many 64-bit parameters. Every pointer is a
        // live allocation of this context at least as large as its buffer at
        // these dims (`prepare` sized them; a reserved cache holds
        // `capacity` rows, the capacity passed), or the 256-byte dummy for
        // zero-size buffers, which the kernel does not touch; kernels index
        // only within the extents the dims imply. The argument values
        // outlive the call (`launch` borrows them).
        unsafe { builder.launch(config) }.map_err(|e| backend(&format!("launch of kernel `{}`", kernel.name), e))?;
        Ok(())
    }

    fn synchronize(&self, what: &str) -> Result<(), StepError> {
        self.device.stream.synchronize().map_err(|e| backend(what, e))?;
        self.device.ctx.check_err().map_err(|e| backend(what, e))
    }

    fn new_timing_event(&self) -> Result<CudaEvent, StepError> {
        self.device.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| backend("event creation", e))
    }

    /// Per-kernel device times of one step at `dims` (after one warm-up
    /// step), from events recorded between launches. Kernels skipped at
    /// these dims are left out.
    pub fn profile(&mut self, dims: &BTreeMap<String, i64>) -> Result<Vec<KernelTime>, StepError> {
        let (launches, _) = self.prepare(dims)?;
        for l in &launches {
            self.launch(l)?;
        }
        self.synchronize("warm-up step")?;
        let events = (0..=launches.len()).map(|_| self.new_timing_event()).collect::<Result<Vec<_>, _>>()?;
        let stream = &self.device.stream;
        events[0].record(stream).map_err(|e| backend("event record", e))?;
        for (l, event) in launches.iter().zip(&events[1..]) {
            self.launch(l)?;
            event.record(stream).map_err(|e| backend("event record", e))?;
        }
        self.synchronize("profiled step")?;
        launches
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let k = &self.plan.kernels[l.kernel];
                let ms = event_ms(&events[i], &events[i + 1])?
                    .ok_or_else(|| StepError::Backend("this CUDA driver cannot time events".into()))?;
                Ok(KernelTime { name: k.name.clone(), entry: k.entry.clone(), op: k.op.clone(), ms })
            })
            .collect()
    }
}

impl Step for CudaStep {
    fn runtime_dims(&self) -> Vec<String> {
        self.manifest().dims.runtime.clone()
    }

    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
        let i = self.plan.index(name).ok_or_else(|| StepError::UnknownBuffer(name.to_string()))?;
        let info = &self.plan.buffers[i];
        if info.kind != BufferKind::Input {
            return Err(StepError::Backend(format!("`{name}` is an {:?} buffer, not an input", info.kind)));
        }
        tensor.check(name)?;
        info.dtype
            .encode_into(&tensor.data, &mut self.staging)
            .map_err(|e| StepError::Backend(format!("`{name}` ({}): {e}", info.dtype)))?;
        let stream = self.device.stream.clone();
        // A re-bind that grows (a decode cache, each step) gets headroom.
        // Until the upload succeeds the input counts as unbound.
        let rebind = self.bound[i].take().is_some();
        self.rows.forget(name);
        self.memory[i].ensure(&stream, self.staging.len(), rebind)?;
        self.memory[i].upload(&stream, &self.staging)?;
        self.bound[i] = Some(tensor.shape.clone());
        Ok(())
    }

    /// Runs one step and downloads the outputs named in `wanted` (all:
    /// `None`): a decode step with its caches on the device needs the
    /// logits alone, not every layer's new rows.
    fn run_selected(
        &mut self,
        dims: &BTreeMap<String, i64>,
        wanted: Option<&[&str]>,
    ) -> Result<HashMap<String, HostTensor>, StepError> {
        self.last_dims = None;
        let (launches, all) = self.prepare(dims)?;
        for l in &launches {
            self.launch(l)?;
        }
        self.synchronize("step")?;
        self.last_dims = Some(dims.clone());
        let stream = self.device.stream.clone();
        let mut outputs = HashMap::new();
        for (i, b) in self.plan.buffers.iter().enumerate() {
            if b.kind != BufferKind::Output || wanted.is_some_and(|w| !w.contains(&b.name.as_str())) {
                continue;
            }
            let shape = self.plan.shape_at(i, &all)?;
            let bytes = self.memory[i].download(&stream, self.plan.bytes_at(i, &all)?)?;
            let data = b.dtype.decode(&bytes).map_err(|e| StepError::Backend(format!("output `{}`: {e}", b.name)))?;
            outputs.insert(b.name.clone(), HostTensor { shape, data });
        }
        Ok(outputs)
    }

    /// Allocates the outputs and the intermediates' slots for a step at
    /// `dims` (exactly: the largest to come), so the steps allocate none.
    fn reserve(&mut self, dims: &BTreeMap<String, i64>) -> Result<(), StepError> {
        self.staging = Vec::new();
        let all = self.plan.bind_dims(dims)?;
        self.size_memory(&all, false)
    }

    fn reserve_rows(&mut self, name: &str, shape: &[usize], capacity: usize) -> Result<bool, StepError> {
        let (i, axis, dim) = self.pitched(name)?;
        let es = self.plan.buffers[i].dtype.size();
        self.bound[i] = None;
        let (geometry, moves) = self.rows.reserve(name, axis, &dim, shape, capacity)?;
        for m in &moves {
            self.relayout(m)?;
        }
        let stream = self.device.stream.clone();
        self.memory[i].ensure(&stream, geometry.stored() * es, false)?;
        self.bound[i] = Some(shape.to_vec());
        Ok(true)
    }

    fn release_rows(&mut self, name: &str) -> Result<(), StepError> {
        if self.rows.contains(name) {
            let (i, _, _) = self.pitched(name)?;
            self.rows.forget(name);
            self.bound[i] = None;
            // Freed in stream order, after the kernels queued that read it.
            self.memory[i].release();
        }
        Ok(())
    }

    fn append_rows(&mut self, name: &str, rows: &str) -> Result<(), StepError> {
        let (i, _, _) = self.pitched(name)?;
        let o = self.plan.index(rows).ok_or_else(|| StepError::UnknownBuffer(rows.to_string()))?;
        if self.plan.buffers[o].kind != BufferKind::Output || self.plan.buffers[o].dtype != self.plan.buffers[i].dtype {
            return Err(StepError::Backend(format!("`{rows}` is not an output of `{name}`'s dtype")));
        }
        let dims = self
            .last_dims
            .clone()
            .ok_or_else(|| StepError::Backend(format!("no step ran before appending `{rows}`")))?;
        let shape = self.plan.shape_at(o, &self.plan.bind_dims(&dims)?)?;
        let (r, g, moves) = self.rows.prepare_append(name, &shape)?;
        for m in &moves {
            self.relayout(m)?;
        }
        let es = self.plan.buffers[i].dtype.size();
        let stream = self.device.stream.clone();
        // `r` rows per block: `r * row` contiguous bytes from the output.
        let (row, pitch) = (g.row * es, g.capacity * g.row * es);
        let chunk = r * row;
        let (memory, src) = if i < o {
            let (a, b) = self.memory.split_at_mut(o);
            (&mut a[i], &b[0])
        } else {
            let (a, b) = self.memory.split_at_mut(i);
            (&mut b[0], &a[o])
        };
        memory.copy_2d(&stream, g.rows * row, pitch, src, 0, chunk, chunk, g.outer)?;
        self.rows.appended(name, r);
        self.bound[i] = self.rows.shape(name).map(<[usize]>::to_vec);
        Ok(())
    }

    fn read_rows(&mut self, name: &str) -> Result<HostTensor, StepError> {
        let (i, _, _) = self.pitched(name)?;
        let g = self.rows.geometry(name)?;
        let info = &self.plan.buffers[i];
        let stream = self.device.stream.clone();
        let bytes = self.memory[i].download(&stream, g.stored() * info.dtype.size())?;
        let data = info.dtype.decode(&bytes).map_err(|e| StepError::Backend(format!("`{name}`: {e}")))?;
        let shape = self.rows.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        Ok(HostTensor { shape, data: dense_host(&data, &g) })
    }

    /// Device time of the step alone (CUDA events around the launches; no
    /// uploads or downloads), after one warm-up step unless the last step
    /// already ran at these dims.
    fn run_timed(&mut self, dims: &BTreeMap<String, i64>, repeats: usize) -> Result<Vec<f64>, StepError> {
        let warm = self.last_dims.as_ref() == Some(dims);
        self.last_dims = None;
        let (launches, _) = self.prepare(dims)?;
        if !warm {
            for l in &launches {
                self.launch(l)?;
            }
            self.synchronize("warm-up step")?;
        }
        let (start, end) = (self.new_timing_event()?, self.new_timing_event()?);
        let stream = &self.device.stream;
        let mut times = Vec::with_capacity(repeats);
        // Event timing, or the wall clock around launch + synchronize if the
        // driver cannot time events (cudarc panics on a missing symbol).
        let mut events_work = true;
        for _ in 0..repeats {
            let wall = Instant::now();
            start.record(stream).map_err(|e| backend("event record", e))?;
            for l in &launches {
                self.launch(l)?;
            }
            end.record(stream).map_err(|e| backend("event record", e))?;
            end.synchronize().map_err(|e| backend("timed step", e))?;
            let wall_ms = wall.elapsed().as_secs_f64() * 1e3;
            let ms = if events_work { event_ms(&start, &end)? } else { None };
            events_work = ms.is_some();
            times.push(ms.unwrap_or(wall_ms));
        }
        self.synchronize("timed steps")?;
        self.last_dims = Some(dims.clone());
        Ok(times)
    }
}

/// Milliseconds between two recorded events; `None` when the driver lacks
/// the timing call (cudarc panics on a missing symbol).
fn event_ms(start: &CudaEvent, end: &CudaEvent) -> Result<Option<f64>, StepError> {
    match catch_unwind(AssertUnwindSafe(|| start.elapsed_ms(end))) {
        Ok(Ok(ms)) => Ok(Some(f64::from(ms))),
        Ok(Err(e)) => Err(backend("event timing", e)),
        Err(_) => Ok(None),
    }
}

impl Drop for CudaStep {
    fn drop(&mut self) {
        // Let queued work finish before the buffers are freed (the frees are
        // stream-ordered, but a clean exit reports errors here, not later).
        let _ = self.device.stream.synchronize();
    }
}
