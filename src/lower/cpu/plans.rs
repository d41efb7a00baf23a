//! The CPU step's plans: the first, and where an f32 context attention
//! can be fused into one kernel (`lower::fused_attention`), a second that
//! fuses it, which a run takes where enough query rows share a KV head.
//! Both are JIT'd in one module, the kernels of the same code once
//! (`emit::emit_shared_plans`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::host::HostData;
use super::{CpuStep, Engine, Packed};
use crate::ir::{Graph, Poly};
use crate::lower::fused_attention::FUSED_MIN_ROWS;
use crate::lower::kernel_bytes::kernel_bytes;
use crate::lower::plan::{FusedPlan, Program};
use crate::lower::LowerError;

/// One plan of a [`CpuStep`] and what runs it.
pub(super) struct Compiled {
    pub(super) program: Program,
    /// One packed entry point per kernel, in launch order.
    pub(super) entries: Vec<Packed>,
    /// Bytes each kernel moves, by the bytes model (`None` where it has
    /// none).
    pub(super) work: Vec<Option<Poly>>,
    /// The intermediates' memory of the last run, by buffer index, reused
    /// as it is by the next (every kernel writes its whole output before
    /// any kernel reads it): allocating it afresh every step costs a page
    /// fault per 4 KiB on first touch, clearing it a pass over it.
    pub(super) scratch: Mutex<Vec<Option<HostData>>>,
}

impl Compiled {
    /// `program`'s kernels' entry points in `engine` (kernel → function:
    /// `functions`).
    pub(super) fn new(
        graph: &Graph,
        program: Program,
        functions: &BTreeMap<String, String>,
        engine: &Engine,
    ) -> Result<Self, LowerError> {
        let mut entries = Vec::with_capacity(program.kernels.len());
        for kernel in &program.kernels {
            let entry = functions.get(&kernel.name).unwrap_or(&kernel.name);
            entries.push(engine.entry(entry).ok_or_else(|| {
                LowerError::Engine(format!(
                    "kernel `{}` not found in the JIT: its module did not link (the JIT printed why \
                             on stderr, such as a function no library defines)",
                    kernel.name
                ))
            })?);
        }
        let work = match kernel_bytes(graph, &program) {
            Ok(bytes) => bytes.iter().map(|b| b.total().ok()).collect(),
            Err(_) => vec![None; program.kernels.len()],
        };
        Ok(Compiled { program, entries, work, scratch: Mutex::new(Vec::new()) })
    }
}

impl CpuStep {
    /// The plan this step runs: its first, which its inputs and outputs
    /// are those of; where it has a second, with the context attention
    /// fused, a run where enough rows share a KV head takes that one
    /// ([`CpuStep::program_at`]).
    pub fn program(&self) -> &Program {
        &self.plan.program
    }

    /// Every plan compiled: [`CpuStep::program`], then the plan with the
    /// context attention fused where the step has one.
    pub fn programs(&self) -> impl Iterator<Item = &Program> {
        std::iter::once(&self.plan).chain(&self.fused).map(|c| &c.program)
    }

    /// The plan a run at `point` takes: with the context attention fused
    /// ([`crate::lower::FusedPlan`]) where the step was compiled with such a
    /// plan (see [`crate::lower::plans_cpu`]) and at least [`FUSED_MIN_ROWS`]
    /// query rows share each KV head at `point`; its first plan otherwise.
    pub fn program_at(&self, point: &BTreeMap<String, i64>) -> &Program {
        &self.chosen(point).program
    }

    /// The plan a run at `point` takes: the one with the context attention
    /// fused where the step has it and every fused attention has at least
    /// [`FUSED_MIN_ROWS`] rows a KV head there, else the first.
    pub(super) fn chosen(&self, point: &BTreeMap<String, i64>) -> &Compiled {
        let enough = |f: &FusedPlan| self.graph.dims.eval(&f.rows_per_head, point).is_ok_and(|r| r >= FUSED_MIN_ROWS);
        match &self.fused {
            Some(fused) if fused.program.in_place.iter().filter_map(|p| p.fused.as_ref()).all(enough) => fused,
            _ => &self.plan,
        }
    }
}
