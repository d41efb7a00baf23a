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
    /// their pages in. Without it the first run at a larger point did
    /// both: in `bifurc run` (GPT-2 f32, b = 32, a context of 1000, two
    /// threads, 6 alternated runs each) the first step took 149-333 ms and
    /// the second 94-256, against a median of 51-57 (the second's scores a
    /// column longer than the first's, so allocated again).
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
        let mut sizes = Vec::with_capacity(self.program.buffers.len());
        for buf in &self.program.buffers {
            let n = match buf.kind {
                BufferKind::Intermediate => Some(self.stored_shape(buf, point, &dims)?.1),
                _ => None,
            };
            sizes.push(n);
        }
        let Ok(mut scratch) = self.scratch.try_lock() else { return Ok(()) };
        scratch.resize_with(self.program.buffers.len(), || None);
        // Across the pool's threads: the pages map in faster, and the
        // threads the first step splits its kernels over are awake.
        let buffers = &self.program.buffers;
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
        let kept = step.scratch.get_mut().unwrap_or_else(|e| panic!("{e}"));
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
