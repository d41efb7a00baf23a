//! Tensor-core contractions of random shapes and layouts, their GPU
//! structure emulated on the CPU (`CpuStep::compile_emulating_gpu`: the
//! blocks, warps, lanes, fragments, chunked / split / across-block walks of
//! `bifurc::lower::mma`) against the reference interpreter.
//!
//! Each case is one bf16 or f16 einsum `A · B` over a batch `z`, rows from
//! the runtime dim `b`, columns `n` and a reduction `k` that is a constant
//! (ragged, a multiple of 16 or of 32, short or long) or the runtime dim
//! `m_c`; each operand has the reduction innermost or not. The compile
//! point is the typical one (b = 32, m_c = 8192), so the warp tiles, the
//! unrolled walks and the split of `m_c` across blocks are those of a real
//! model, and the points (b 1..40, m_c 0..333) leave tiles, steps and
//! split blocks ragged or empty. Inputs are rounded to the operand type
//! first and outputs are f32, so the kernels differ from the interpreter by
//! summation order alone: norm-relative 1e-5.

use std::collections::BTreeMap;

use bifurc::interp::{random_inputs, run};
use bifurc::lower::{plan, CpuStep, Emulation, Tuning};

/// A small deterministic generator (the cases must not change between runs).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Rounds to the nearest bf16 (even on ties), or to the nearest f16 value
/// in f16's normal range (the inputs are in [-1, 1]).
fn round_to(dtype: &str, x: f32) -> f32 {
    let bits = x.to_bits();
    match dtype {
        "bf16" => f32::from_bits(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16),
        _ => {
            if x.abs() < 6.2e-5 {
                return 0.0;
            }
            f32::from_bits(((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13)
        }
    }
}

struct Case {
    text: String,
    label: String,
    /// B has n innermost: with two column tiles it is read two columns
    /// at a time ("interleaved columns").
    b_n_last: bool,
    /// The reduction is walked in chunks of 32 (a constant multiple of 32).
    chunked: bool,
    /// B's columns are innermost, a multiple of 128: `stage-b` may apply.
    stage_b: bool,
}

fn case(rng: &mut Lcg) -> Case {
    let dtype = rng.pick(&["bf16", "f16"]);
    let z = rng.pick(&[1, 2, 3, 130]);
    let n = rng.pick(&[8, 24, 40, 96, 150]);
    let k = rng.pick(&["20", "48", "64", "128", "300", "512", "\"m_c\"", "\"m_c\""]);
    let a_k_last = rng.pick(&[true, true, false]);
    let b_k_last = rng.pick(&[true, false]);
    case_of(dtype, z, n, k, (a_k_last, b_k_last))
}

/// The einsum of one case: operand type, batch, columns, reduction, and
/// whether each operand has the reduction innermost.
fn case_of(dtype: &str, z: i64, n: i64, k: &str, (a_k_last, b_k_last): (bool, bool)) -> Case {
    let (a_shape, a_subs) =
        if a_k_last { (format!("[{z}, \"b\", {k}]"), "zmk") } else { (format!("[{z}, {k}, \"b\"]"), "zkm") };
    let (b_shape, b_subs) =
        if b_k_last { (format!("[{z}, {n}, {k}]"), "znk") } else { (format!("[{z}, {k}, {n}]"), "zkn") };
    let text = format!(
        r#"{{"format": "bifurc-graph/1", "dims": {{"runtime": ["b", "m_c"], "constants": {{}}}},
          "inputs": [{{"name": "a", "role": "activation", "shape": {a_shape}, "dtype": "{dtype}"}},
                     {{"name": "w", "role": "activation", "shape": {b_shape}, "dtype": "{dtype}"}}],
          "nodes": [{{"id": "y", "op": "einsum", "inputs": ["a", "w"], "attrs": {{"spec": "{a_subs},{b_subs}->zmn"}}, "dtype": "f32"}}],
          "outputs": [{{"name": "y", "node": "y"}}]}}"#
    );
    let label = format!("{dtype} z={z} n={n} k={k} A {a_subs} B {b_subs}");
    let chunked = k.parse::<i64>().is_ok_and(|k| k % 32 == 0);
    Case { text, label, b_n_last: !b_k_last, chunked, stage_b: !b_k_last && n % 128 == 0 }
}

#[test]
fn random_tensor_core_forms_match_interpreter() {
    let mut rng = Lcg(0x5eed_b1f0);
    let points: Vec<BTreeMap<String, i64>> = [(1, 0), (17, 5), (40, 333), (33, 40)]
        .iter()
        .map(|&(b, m_c)| BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c)]))
        .collect();
    let mut forms = Vec::new();
    let mut interleaved = Vec::new();
    let mut staged_b = 0;
    // Twenty drawn, then four the draw misses: a short constant reduction
    // over enough blocks for two column tiles a warp, in chunks and in
    // steps of 16 (the latter staged and interleaved); B's rows a multiple
    // of 128 columns, staged as well with `stage-b` (over m_c, and ragged).
    let mut cases: Vec<Case> = (0..20).map(|_| case(&mut rng)).collect();
    cases.push(case_of("bf16", 130, 150, "64", (true, true)));
    cases.push(case_of("f16", 130, 150, "48", (false, false)));
    cases.push(case_of("bf16", 3, 256, "\"m_c\"", (true, false)));
    cases.push(case_of("f16", 130, 256, "40", (false, false)));
    for (i, c) in cases.into_iter().enumerate() {
        let i = i as u64;
        let g = bifurc::import::parse(&c.text).unwrap_or_else(|e| panic!("{}: {e}", c.label));
        let program = plan(&g).unwrap_or_else(|e| panic!("{}: {e}", c.label));
        let mma = program.kernels.iter().find_map(|k| k.mma.clone());
        let mma = mma.unwrap_or_else(|| panic!("{}: not on tensor cores", c.label));
        forms.push((mma.split_k, mma.rows, mma.cols, mma.k_splits));
        if mma.cols == 2 && c.b_n_last {
            interleaved.push(c.chunked);
        }
        let compile = |tuning: Tuning| {
            let emulation = Emulation { lanes: 3, cooperative_min: 1 << 40, tuning };
            CpuStep::compile_emulating_gpu(&g, emulation).unwrap_or_else(|e| panic!("{}: {e}", c.label))
        };
        // Each build, the points it runs at (skip, step): the defaults at
        // all; the reads they replaced (A from global memory in every warp,
        // B one column at a time) and one iteration at a time at two;
        // staged B where it applies at all.
        let mut builds = vec![(compile(Tuning::default()), "", (0, 1))];
        let plain = Tuning { stage: false, interleave: false, unroll: 1, ..Tuning::default() };
        builds.push((compile(plain), " (stage, interleave off, unroll 1)", (1, 2)));
        if c.stage_b {
            builds.push((compile(Tuning { stage_b: true, ..Tuning::default() }), " (stage-b on)", (0, 1)));
            staged_b += 1;
        }
        let dtype = if c.label.starts_with("bf16") { "bf16" } else { "f16" };
        let runs = builds.iter().flat_map(|(step, tuned, (skip, by))| {
            points.iter().enumerate().skip(*skip).step_by(*by).map(move |(s, p)| (s, p, step, *tuned))
        });
        for (s, p, step, tuned) in runs {
            let mut inputs = random_inputs(&g, p, 100 + i * 7 + s as u64).unwrap_or_else(|e| panic!("{e}"));
            for t in inputs.values_mut() {
                t.data.iter_mut().for_each(|x| *x = round_to(dtype, *x));
            }
            let want = run(&g, p, &inputs).unwrap_or_else(|e| panic!("{}: interp at {p:?}: {e}", c.label));
            let got = step.run(p, &inputs).unwrap_or_else(|e| panic!("{}: run at {p:?}: {e}", c.label));
            let (a, w) = (&got["y"], &want["y"]);
            assert_eq!(a.shape, w.shape, "{}", c.label);
            let top = w.data.iter().fold(1e-6f32, |m, y| m.max(y.abs()));
            let diff = a.data.iter().zip(&w.data).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff / top <= 1e-5,
                "{}{tuned} ({:?}) at {p:?}: norm-relative error {:e}",
                c.label,
                forms[i as usize],
                diff / top
            );
        }
    }
    // The cases reach every walk: split among warps, split across blocks,
    // unsplit; one and two row and column tiles.
    assert!(forms.iter().any(|f| f.0), "an in-block split: {forms:?}");
    assert!(forms.iter().any(|f| f.3 > 1), "a split across blocks: {forms:?}");
    assert!(forms.iter().any(|f| !f.0 && f.3 == 1), "an unsplit walk: {forms:?}");
    assert!(forms.iter().rev().skip(2).take(2).all(|f| !f.0 && f.2 == 2 && f.3 == 1), "short, wide: {forms:?}");
    assert_eq!(staged_b, 2, "cases with B's rows staged");
    assert!(forms.iter().any(|f| f.2 == 2) && forms.iter().any(|f| f.2 == 1), "column tiles: {forms:?}");
    // B read two columns at a time, in chunks and in steps of 16.
    assert!(interleaved.contains(&true) && interleaved.contains(&false), "interleaved columns: {interleaved:?}");
}
