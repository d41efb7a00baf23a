//! Making room for the intermediates before a run of steps.

use std::collections::BTreeMap;

use rayon::iter::{IndexedParallelIterator, IntoParallelRefIterator, IntoParallelRefMutIterator, ParallelIterator};

use super::host::HostData;
use super::CpuStep;
use crate::lower::plan::BufferKind;
use crate::lower::LowerError;

impl CpuStep {
    /// Makes room for every intermediate at `point`, the largest point of
    /// the runs to come (a decode loop's last step), and maps its pages in
    /// now, so that those runs neither allocate intermediates nor fault
    /// their pages in (and JIT-compiles the plan they take, where it is
    /// the fused plan and not yet compiled: see `plans`). Without it the
    /// first run at a larger point did both: in `bifurc run` (GPT-2 f32,
    /// b = 32, a context of 1000, two threads, 6 alternated runs each) the
    /// first step took 149-333 ms and the second 94-256, against a median
    /// of 51-57 (the second's scores a column longer than the first's, so
    /// allocated again).
    ///
    /// The pages are mapped in on the pool's threads. Done on the calling
    /// thread alone, the first step still took 80-131 ms and the second
    /// 53-79: one core ran the kernels' parts for most of the first step,
    /// the pool's other thread, asleep since the weights were bound,
    /// joining late. On the pool: 65-88 ms (one run 169), the second
    /// 54-68 (one 261: this machine is shared).
    ///
    /// Memory that is already large enough is kept (and mapped in); the
    /// values stay unspecified, as between any two runs. Does nothing
    /// while another thread is running the step (the intermediates are
    /// then in use).
    pub fn reserve(&self, point: &BTreeMap<String, i64>) -> Result<(), LowerError> {
        let dims = self.dims_at(point)?;
        let plan = self.chosen(point);
        // JIT-compiled now if it is not yet, not at the first run.
        plan.entries(&self.engine)?;
        let mut sizes = Vec::with_capacity(plan.program.buffers.len());
        for buf in &plan.program.buffers {
            let n = match buf.kind {
                BufferKind::Intermediate => Some(self.stored_shape(buf, point, &dims)?.1),
                _ => None,
            };
            sizes.push(n);
        }
        let Ok(mut scratch) = plan.scratch.try_lock() else { return Ok(()) };
        scratch.resize_with(plan.program.buffers.len(), || None);
        // Across the pool's threads: the pages map in faster, and the
        // threads the first step splits its kernels over are awake.
        let buffers = &plan.program.buffers;
        scratch.par_iter_mut().zip(buffers.par_iter().zip(sizes)).for_each(|(kept, (buf, n))| {
            let Some(n) = n else { return };
            match kept {
                Some(data) if data.dtype_is(buf.dtype) => data.reserve(n),
                _ => {
                    let mut data = HostData::zeros(buf.dtype, n);
                    data.reserve(n);
                    *kept = Some(data);
                }
            }
        });
        Ok(())
    }

    /// Frees the intermediates kept from the last runs (of every plan: the
    /// next run allocates them again). Does nothing while another thread
    /// is running the step.
    pub fn release_scratch(&self) {
        for plan in self.plans() {
            if let Ok(mut kept) = plan.scratch.try_lock() {
                *kept = Vec::new();
            }
        }
    }

    /// Bytes the step holds when it runs at `point`: every buffer in its
    /// storage dtype (inputs, a decode cache with `capacities` rows where
    /// given, as [`CpuStep::run_with_capacity`] takes them; outputs;
    /// intermediates, each in memory of its own). For asking, before
    /// anything is bound, whether a run fits in memory
    /// ([`bifurc_runtime::memory`]).
    pub fn bytes_at(
        &self,
        point: &BTreeMap<String, i64>,
        capacities: &BTreeMap<String, i64>,
    ) -> Result<usize, LowerError> {
        self.bytes_where(point, capacities, |_| true)
    }

    /// [`CpuStep::bytes_at`] of the buffers named by `which` alone (the
    /// inputs some other step holds for this one, say).
    pub fn bytes_where(
        &self,
        point: &BTreeMap<String, i64>,
        capacities: &BTreeMap<String, i64>,
        which: impl Fn(&str) -> bool,
    ) -> Result<usize, LowerError> {
        let mut caps = self.dims_at(point)?;
        for (d, &cap) in capacities {
            if let Some(k) = self.plan.program.dims.iter().position(|x| x == d) {
                caps[k] = caps[k].max(cap);
            }
        }
        let mut total = 0usize;
        for buf in self.chosen(point).program.buffers.iter().filter(|b| which(&b.name)) {
            let n = self.stored_shape(buf, point, &caps)?.1;
            total = n
                .checked_mul(buf.dtype.size())
                .and_then(|b| total.checked_add(b))
                .ok_or_else(|| LowerError::Run(format!("the step's buffers at {point:?} overflow a byte count")))?;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::super::host::HostData;
    use super::super::CpuStep;
    use crate::ir::Graph;

    fn point(b: i64, m_c: i64, m_d: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)])
    }

    /// Where each kept intermediate's memory starts (`None`: nothing kept).
    fn addresses(step: &mut CpuStep) -> Vec<Option<usize>> {
        let kept = step.plan.scratch.get_mut().unwrap_or_else(|e| panic!("{e}"));
        kept.iter()
            .map(|k| {
                k.as_ref().map(|d| match d {
                    HostData::F32(v) => v.as_ptr() as usize,
                    HostData::U16(v) => v.as_ptr() as usize,
                    HostData::I32(v) => v.as_ptr() as usize,
                    HostData::I64(v) => v.as_ptr() as usize,
                })
            })
            .collect()
    }

    /// `bytes_at` counts every buffer in its storage dtype: the inputs at
    /// least (their bytes from the graph), a decode cache's spare rows
    /// exactly (the capacity's rows less the point's, times a row's bytes
    /// over both layers' K and V), and a context grown by a token by at
    /// least its K and V rows.
    #[test]
    fn bytes_at_counts_the_buffers_at_a_point() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let tiny: Graph = crate::import::load(&root.join("examples/tiny/model.json")).unwrap_or_else(|e| panic!("{e}"));
        let step = CpuStep::compile(&tiny).unwrap_or_else(|e| panic!("{e}"));
        let bytes = |p: &BTreeMap<String, i64>, caps: &[(&str, i64)]| {
            let caps = caps.iter().map(|(d, v)| (d.to_string(), *v)).collect();
            step.bytes_at(p, &caps).unwrap_or_else(|e| panic!("{e}"))
        };
        let p = point(3, 40, 5);
        let inputs: usize = tiny
            .inputs
            .iter()
            .map(|i| i.shape.iter().map(|d| tiny.dims.eval(d, &p).unwrap_or(0) as usize).product::<usize>() * 4)
            .sum();
        assert!(bytes(&p, &[]) > inputs, "{} <= the inputs' {inputs}", bytes(&p, &[]));
        // 3 rows x 2 layers x (K, V) x b = 3 x g = 2 x k = 16, f32.
        assert_eq!(bytes(&p, &[("m_d", 8)]) - bytes(&p, &[]), 3 * 2 * 2 * 3 * 2 * 16 * 4);
        assert_eq!(bytes(&p, &[("m_d", 2)]), bytes(&p, &[]), "a capacity under the rows is the rows");
        // 2 layers x (K, V) x g = 2 x k = 16, f32.
        assert!(bytes(&point(3, 41, 5), &[]) - bytes(&p, &[]) >= 2 * 2 * 2 * 16 * 4);
        let e = step.bytes_at(&point(3, 3_000_000_000, 5), &BTreeMap::new()).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("too large")), "{e:?}");
    }

    /// After `reserve` at a decode loop's last point, the steps of the loop
    /// (m_d growing from 0) run in the reserved memory, none moved, and
    /// give the outputs of a step without it; without `reserve`, the same
    /// loop moves some (the scores grow with m_d), so the check can fail.
    #[test]
    fn reserved_intermediates_stay_put_through_a_decode_loop() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let tiny: Graph = crate::import::load(&root.join("examples/tiny/model.json")).unwrap_or_else(|e| panic!("{e}"));
        let steps = 6;
        let inputs: Vec<_> = (0..steps)
            .map(|m_d| crate::interp::random_inputs(&tiny, &point(3, 40, m_d), 7).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let run = |step: &CpuStep, m_d: i64, inputs: &HashMap<String, crate::interp::Tensor>| {
            step.run(&point(3, 40, m_d), inputs).unwrap_or_else(|e| panic!("{e}"))
        };
        let mut plain = CpuStep::compile(&tiny).unwrap_or_else(|e| panic!("{e}"));
        let mut reserved = CpuStep::compile(&tiny).unwrap_or_else(|e| panic!("{e}"));
        reserved.reserve(&point(3, 40, steps - 1)).unwrap_or_else(|e| panic!("{e}"));
        let at = addresses(&mut reserved);
        assert!(at.iter().flatten().count() > 0, "nothing reserved");
        let mut moved_without = false;
        for (m_d, inputs) in (0..steps).zip(&inputs) {
            let before = addresses(&mut plain);
            let want = run(&plain, m_d, inputs);
            let after = addresses(&mut plain);
            moved_without |= before.iter().zip(&after).any(|(a, b)| a.is_some() && a != b);
            let got = run(&reserved, m_d, inputs);
            assert_eq!(addresses(&mut reserved), at, "m_d = {m_d}: an intermediate moved");
            for (name, t) in &want {
                assert_eq!(got[name].data, t.data, "m_d = {m_d}: `{name}` differs");
            }
        }
        assert!(moved_without, "without reserve nothing moved: the test shows nothing");
        // A point outside the dims is an error naming the dim.
        let err = reserved.reserve(&BTreeMap::from([("b".to_string(), 1)])).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("m_c")), "a missing dim is named");
    }
}
