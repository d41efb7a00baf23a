//! Running a CPU kernel in parts on the rayon pool: each call runs its
//! share of the kernel's outermost walk (see `emit`, "Parts"), all of them
//! together the whole kernel.

use std::ffi::c_void;

use super::Packed;

/// Least bytes a kernel moves (by the bytes model) to be split into parts:
/// below it the dispatch to the pool costs more than the part saves.
pub const PARALLEL_MIN_BYTES: i64 = 1 << 18;

/// Kernel arguments shared by the parts (each copies them).
struct SharedArgs<'a>(&'a [*mut c_void]);

// SAFETY: the pointers are only read (copied) by the parts, each of which
// makes its own argument array; what they point at is described at
// `run_parts`.
unsafe impl Sync for SharedArgs<'_> {}

impl SharedArgs<'_> {
    /// A part's own copy of the arguments.
    fn copy(&self) -> Vec<*mut c_void> {
        self.0.to_vec()
    }
}

/// Runs `entry` as `parts` calls on the rayon pool, each with `args` but
/// its own last two arguments: the part (`0..parts`) and `parts`.
///
/// # Safety
///
/// `args` must be valid arguments of `entry` (as for a single call) for
/// the whole of this call, ending with two `i64` slots, and `entry` must
/// split its walk by those two (`emit`, "Parts": the parts write disjoint
/// outputs and read only what no part writes).
pub(super) unsafe fn run_parts(entry: Packed, args: &[*mut c_void], parts: usize) {
    let ids: Vec<i64> = (0..parts as i64).collect();
    let count = parts as i64;
    let shared = SharedArgs(args);
    rayon::iter::ParallelIterator::for_each(rayon::iter::IntoParallelIterator::into_par_iter(0..parts), |p| {
        let mut own = shared.copy();
        let n = own.len();
        own[n - 2] = std::ptr::from_ref(&ids[p]).cast_mut().cast();
        own[n - 1] = std::ptr::from_ref(&count).cast_mut().cast();
        // SAFETY: the caller's contract; `ids` and `count` outlive the
        // parallel loop, which returns after every part did, and the
        // kernel only reads them.
        unsafe { entry(own.as_mut_ptr()) };
    });
}

/// Runs `f` on a thread of the rayon pool, the caller waiting for it (at
/// once, on this thread, where this is one of the pool's).
///
/// The step launches its kernels from there, so a kernel split into parts
/// runs one on that thread and hands the others to the pool's other
/// threads, which are still spinning from the last kernel. From any other
/// thread, each split kernel woke the pool and put the caller to sleep
/// until the last part was done: about 1 ms a step of such wake-ups with
/// 2 threads (cpu_step at b = 32, m_c = 64: 11.4-12.0 -> 10.1-10.7 ms;
/// m_c = 8192: 24.2-24.8 -> 23.5-23.8 ms).
///
/// # Safety
///
/// `f` runs on another thread than the caller's although it need not be
/// `Send`: everything it touches must be valid to use from another thread
/// while the caller is blocked in this call (its borrows last until `f`
/// returns, which this call waits for, panics included).
pub(super) unsafe fn on_pool<R: Send>(f: impl FnOnce() -> R) -> R {
    struct Job<F>(F);
    // SAFETY: the caller's contract: `f` may run on another thread.
    unsafe impl<F> Send for Job<F> {}
    impl<F: FnOnce() -> R, R> Job<F> {
        fn run(self) -> R {
            (self.0)()
        }
    }
    let job = Job(f);
    // `rayon::scope` runs its closure on a pool thread (this one, if it is
    // one) and returns when it has.
    rayon::scope(move |_| job.run())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::ffi::c_void;

    use crate::interp::Tensor;
    use crate::ir::{DType, Graph};
    use crate::lower::plan::{BufferKind, Param};
    use crate::lower::CpuStep;

    fn graph(doc: serde_json::Value) -> Graph {
        crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every buffer after a run of the step's kernels, each whole but
    /// kernel `k`, of which only part `part` of `parts` runs (on zeros).
    /// Every input from `inputs`; all buffers f32.
    fn run_part(
        step: &CpuStep,
        point: &BTreeMap<String, i64>,
        inputs: &HashMap<String, Tensor>,
        k: usize,
        (part, parts): (i64, i64),
    ) -> Vec<Vec<f32>> {
        let program = step.program();
        let dims: Vec<i64> = program.dims.iter().map(|d| point[d]).collect();
        let mut data: Vec<Vec<f32>> = program
            .buffers
            .iter()
            .map(|b| {
                assert_eq!(b.dtype, DType::F32, "{}", b.name);
                match b.kind {
                    BufferKind::Input(_) => inputs[&b.name].data.clone(),
                    _ => {
                        let n: i64 = b.shape.iter().map(|p| step.graph.dims.eval(p, point).unwrap_or(0)).product();
                        vec![0.0; n.max(1) as usize]
                    }
                }
            })
            .collect();
        let mut ptrs: Vec<*mut f32> = data.iter_mut().map(|d| d.as_mut_ptr()).collect();
        let (mut part, mut parts, mut zero, mut one) = (part, parts, 0i64, 1i64);
        let mut dims = dims;
        for (j, (kernel, entry)) in
            program.kernels.iter().zip(step.plan.entries(&step.engine).unwrap_or_else(|e| panic!("{e}"))).enumerate()
        {
            let mut args: Vec<*mut c_void> = kernel
                .params
                .iter()
                .map(|p| match p {
                    Param::Dim(d) | Param::Capacity(d) => {
                        let k = program.dims.iter().position(|x| x == d).unwrap_or_else(|| panic!("{d}"));
                        std::ptr::addr_of_mut!(dims[k]).cast()
                    }
                    Param::Buffer(b) => std::ptr::addr_of_mut!(ptrs[*b]).cast(),
                })
                .collect();
            if j == k {
                args.push(std::ptr::addr_of_mut!(part).cast());
                args.push(std::ptr::addr_of_mut!(parts).cast());
            } else {
                args.push(std::ptr::addr_of_mut!(zero).cast());
                args.push(std::ptr::addr_of_mut!(one).cast());
            }
            // SAFETY: the kernel's arguments as `CpuStep::run` passes them,
            // every buffer f32 and dense at `point` (asserted above).
            unsafe { entry(args.as_mut_ptr()) };
        }
        data
    }

    /// A plain, a row and a reuse-walk kernel: each part writes its own
    /// share of the output (disjoint, none taking all), the parts together
    /// all of it, with the values of the whole run. Ragged: parts do not
    /// divide the walks.
    #[test]
    fn each_part_writes_its_share() {
        let g = graph(serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m"], "constants": {"h": 3, "k": 8}},
            "inputs": [
                {"name": "q", "role": "activation", "shape": ["b", "h", 1, "k"], "dtype": "f32"},
                {"name": "kc", "role": "weight", "shape": ["h", "m", "k"], "dtype": "f32"}
            ],
            "nodes": [
                {"id": "e", "op": "exp", "inputs": ["q"]},
                {"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "abxy,bzy->abxz"}},
                {"id": "p", "op": "softmax", "inputs": ["s"], "attrs": {"axis": 3}}
            ],
            "outputs": [{"name": "e", "node": "e"}, {"name": "s", "node": "s"}, {"name": "p", "node": "p"}]
        }));
        let step = CpuStep::compile(&g).unwrap_or_else(|e| panic!("{e}"));
        for (b, m) in [(5, 37), (1, 70), (2, 3)] {
            let point = BTreeMap::from([("b".to_string(), b), ("m".to_string(), m)]);
            let inputs = crate::interp::random_inputs(&g, &point, 3).unwrap_or_else(|e| panic!("{e}"));
            let whole = run_part(&step, &point, &inputs, 0, (0, 1));
            let parts = 4;
            assert_eq!(step.program().kernels.len(), 3);
            for (k, kernel) in step.program().kernels.iter().enumerate() {
                let i = kernel.writes;
                let buf = &step.program().buffers[i];
                let each: Vec<_> = (0..parts).map(|p| run_part(&step, &point, &inputs, k, (p, parts))).collect();
                let written: Vec<usize> = each.iter().map(|d| d[i].iter().filter(|&&x| x != 0.0).count()).collect();
                assert!(whole[i].iter().all(|&x| x != 0.0), "{}: the whole run leaves zeros", buf.name);
                assert_eq!(written.iter().sum::<usize>(), whole[i].len(), "{} at b={b} m={m}: {written:?}", buf.name);
                assert!(written.iter().filter(|&&n| n > 0).count() >= 2, "{} at b={b} m={m}: {written:?}", buf.name);
                for (j, x) in whole[i].iter().enumerate() {
                    let by: Vec<f32> = each.iter().map(|d| d[i][j]).filter(|&y| y != 0.0).collect();
                    assert_eq!(by, vec![*x], "{}[{j}] at b={b} m={m}", buf.name);
                }
            }
        }
    }

    /// The tiny model, as given and bifurcated, gives the same bytes run
    /// whole and in 1 to 7 parts of every kernel, at ragged points; so do
    /// the test checkpoints' gpt2 (layer norm, gelu, learned positions) and
    /// gpt_bigcode (multi-query) graphs.
    /// `on_pool` runs its closure on a thread of the pool, with the
    /// caller's borrows, and returns its result; from a pool thread, on
    /// that thread.
    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        assert_eq!(rayon::current_thread_index(), None, "the test runs off the pool");
        let mut seen = Vec::new();
        let caller = std::thread::current().id();
        // SAFETY: the closure only touches `seen` and `caller`, which
        // outlive the call.
        let got = unsafe {
            super::on_pool(|| {
                seen.push(rayon::current_thread_index());
                std::thread::current().id() != caller
            })
        };
        assert!(got, "ran on another thread");
        assert!(matches!(seen.as_slice(), [Some(_)]), "on a pool thread: {seen:?}");
        let (outer, inner) = rayon::scope(|_| {
            let outer = (std::thread::current().id(), rayon::current_thread_index());
            // SAFETY: as above.
            let inner = unsafe { super::on_pool(|| (std::thread::current().id(), rayon::current_thread_index())) };
            (outer, inner)
        });
        assert_eq!(outer, inner, "from a pool thread, at once on it");
    }

    #[test]
    fn splitting_changes_no_output() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut graphs = vec![crate::import::load(&root.join("examples/tiny/model.json"))];
        for arch in ["gpt2", "gpt_bigcode"] {
            let config = std::fs::read_to_string(root.join(format!("tests/fixtures/hf/{arch}/config.json")))
                .unwrap_or_else(|e| panic!("{arch}: {e}"));
            let doc = crate::hf::build(&config, &Default::default()).unwrap_or_else(|e| panic!("{arch}: {e}"));
            graphs.push(crate::import::from_value(&doc));
        }
        for base in graphs {
            check_splitting(&base.unwrap_or_else(|e| panic!("{e}")));
        }
    }

    fn check_splitting(base: &Graph) {
        let point = BTreeMap::from([("b".to_string(), 5), ("m_c".to_string(), 13), ("m_d".to_string(), 3)]);
        let opts =
            crate::optimize::Options { point: crate::inspect::point::ShapePoint(point.clone()), ..Default::default() };
        let bif = crate::optimize::optimize(base, &opts).unwrap_or_else(|e| panic!("{e}")).graph;
        for g in [base, &bif] {
            let mut step = CpuStep::compile(g).unwrap_or_else(|e| panic!("{e}"));
            for point in [point.clone(), BTreeMap::from([("b".into(), 1), ("m_c".into(), 2), ("m_d".into(), 0)])] {
                let inputs = crate::interp::random_inputs(g, &point, 9).unwrap_or_else(|e| panic!("{e}"));
                step.set_threads(1);
                let want = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                step.set_min_split_bytes(0);
                for threads in [2, 3, 7] {
                    step.set_threads(threads);
                    let got = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    for (name, w) in &want {
                        let bits = |t: &Tensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got[name]), bits(w), "{name} in {threads} parts at {point:?}");
                    }
                }
                step.set_min_split_bytes(super::PARALLEL_MIN_BYTES);
            }
        }
    }
}
