//! The CPU step's plans: the first, and where an f32 context attention
//! can be fused into one kernel (`lower::fused_attention`), two that
//! fuse it, which a run takes where enough query rows share a KV head
//! (one from 9 rows, its tiles of 16 lanes; one from 2 to 8, its tiles of
//! 8). The kernels of the same code as the first plan's are one function
//! (`emit::emit_shared_plans`): the first plan's are JIT-compiled with
//! the step, a fused plan's own (its kernel and merge) at its first run
//! or [`CpuStep::reserve`]: a step that never runs it does not wait for
//! them (`bifurc run` of 4 samples of the tiny example took 1.59-1.63 s,
//! 1.55-1.57 without the fused plan, 2.37-2.47 with both plans compiled
//! at once; of 16 samples, which run it, 2.10-2.20 against 1.63-2.02,
//! the fused plan's module JIT-compiled in 0.28-0.38 s; with three
//! plans, 1.55-1.66 s at 1, 4 and 16 samples, each running one fused
//! plan, its set-up 0.30-0.37 s).

use std::cell::OnceCell;
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
    /// Bytes each kernel moves, by the bytes model (`None` where it has
    /// none).
    pub(super) work: Vec<Option<Poly>>,
    /// The intermediates' memory of the last run, by buffer index, reused
    /// as it is by the next (every kernel writes its whole output before
    /// any kernel reads it): allocating it afresh every step costs a page
    /// fault per 4 KiB on first touch, clearing it a pass over it.
    pub(super) scratch: Mutex<Vec<Option<HostData>>>,
    /// Each kernel → the function that runs it.
    functions: BTreeMap<String, String>,
    /// The functions no earlier plan has, JIT-compiled at the plan's
    /// first run (a module's text; empty for the first plan, whose
    /// functions the step's engine holds from the start).
    module: String,
    /// Once JIT-compiled: the engine of `module` (`None` for the first
    /// plan, whose engine the step owns) and one packed entry point per
    /// kernel, in launch order; or why it could not be.
    jit: OnceCell<Result<Jit, String>>,
}

/// A plan's JIT: the engine of its own functions (`None` for the first
/// plan's, which the step owns) and one entry point per kernel.
type Jit = (Option<Engine>, Vec<Packed>);

impl Compiled {
    /// `program` (planned from `graph`), its kernels run by `functions`,
    /// those no earlier plan has in `module`; not yet JIT-compiled.
    pub(super) fn new(graph: &Graph, program: Program, functions: BTreeMap<String, String>, module: String) -> Self {
        let work = match kernel_bytes(graph, &program) {
            Ok(bytes) => bytes.iter().map(|b| b.total().ok()).collect(),
            Err(_) => vec![None; program.kernels.len()],
        };
        Compiled { program, work, scratch: Mutex::new(Vec::new()), functions, module, jit: OnceCell::new() }
    }

    /// JIT-compiles the first plan: its module is `engine`'s.
    pub(super) fn set_first(&self, engine: &Engine) -> Result<(), LowerError> {
        let entries = self.lookup(&[engine])?;
        // Set once, at compile; a second call keeps the first's entries.
        let _ = self.jit.set(Ok((None, entries)));
        Ok(())
    }

    /// One entry point per kernel, in launch order: JIT-compiling the
    /// plan's own functions at the first call (the others are the first
    /// plan's, in `first`).
    pub(super) fn entries(&self, first: &Engine) -> Result<&[Packed], LowerError> {
        let jit = self.jit.get_or_init(|| {
            let own = Engine::jit(&self.module, "the fused plan's CPU kernels").map_err(|e| e.to_string())?;
            let entries = self.lookup(&[&own, first]).map_err(|e| e.to_string())?;
            Ok((Some(own), entries))
        });
        match jit {
            Ok((_, entries)) => Ok(entries),
            Err(message) => Err(LowerError::Engine(message.clone())),
        }
    }

    /// Each kernel's function in the first of `engines` that has it.
    fn lookup(&self, engines: &[&Engine]) -> Result<Vec<Packed>, LowerError> {
        let mut entries = Vec::with_capacity(self.program.kernels.len());
        for kernel in &self.program.kernels {
            let function = self.functions.get(&kernel.name).unwrap_or(&kernel.name);
            entries.push(engines.iter().find_map(|e| e.entry(function)).ok_or_else(|| {
                LowerError::Engine(format!(
                    "kernel `{}` not found in the JIT: its module did not link (the JIT printed why \
                             on stderr, such as a function no library defines)",
                    kernel.name
                ))
            })?);
        }
        Ok(entries)
    }
}

impl CpuStep {
    /// The plan this step runs: its first, which its inputs and outputs
    /// are those of; where it has others, with the context attention
    /// fused, a run where enough rows share a KV head takes one of them
    /// ([`CpuStep::program_at`]).
    pub fn program(&self) -> &Program {
        &self.plan.program
    }

    /// Every plan compiled: [`CpuStep::program`], then the plans with the
    /// context attention fused where the step has them.
    pub fn programs(&self) -> impl Iterator<Item = &Program> {
        self.plans().map(|c| &c.program)
    }

    /// The step's plans: its first, then the fused ones where it has them.
    pub(super) fn plans(&self) -> impl Iterator<Item = &Compiled> {
        std::iter::once(&self.plan).chain(&self.fused)
    }

    /// The plan a run at `point` takes: with the context attention fused
    /// ([`crate::lower::FusedPlan`]) where the step was compiled with such
    /// plans (see [`crate::lower::plans_cpu`]) and at least
    /// [`FUSED_MIN_ROWS`] query rows share each KV head at `point` (the
    /// one run from the most rows that `point` has); its first plan
    /// otherwise.
    pub fn program_at(&self, point: &BTreeMap<String, i64>) -> &Program {
        &self.chosen(point).program
    }

    /// Whether each fused plan's own functions are JIT-compiled yet.
    #[cfg(test)]
    pub(crate) fn fused_compiled(&self) -> Vec<bool> {
        self.fused.iter().map(|f| f.jit.get().is_some()).collect()
    }

    /// The plan a run at `point` takes: of the plans with the context
    /// attention fused whose every fused attention has its plan's rows a
    /// KV head there ([`FusedPlan::min_rows`], at least
    /// [`FUSED_MIN_ROWS`], to [`FusedPlan::max_rows`]), the one run from
    /// the most; else the first.
    pub(super) fn chosen(&self, point: &BTreeMap<String, i64>) -> &Compiled {
        let enough = |f: &FusedPlan| {
            let least = f.min_rows.max(FUSED_MIN_ROWS);
            let rows = self.graph.dims.eval(&f.rows_per_head, point);
            rows.is_ok_and(|r| r >= least && f.max_rows.is_none_or(|most| r <= most))
        };
        let from = |c: &Compiled| c.program.fused().map(|f| f.min_rows).max().unwrap_or(0);
        let fits = self.fused.iter().filter(|c| c.program.fused().next().is_some() && c.program.fused().all(enough));
        fits.max_by_key(|c| from(c)).unwrap_or(&self.plan)
    }
}
