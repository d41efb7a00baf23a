//! The decode loop over a small, real computation standing in for a compiled
//! step: its new K/V rows are a known function of (token, position, layer,
//! group, column) and its logits favour token `(id + 1) mod V`. Every run
//! records what was bound, so the tests check the cache layout the session
//! builds row by row.

use bifurc_runtime::manifest::Manifest;
use bifurc_runtime::rng::SplitMix64;
use bifurc_runtime::session::{SampleOptions, Session, SessionError};
use bifurc_runtime::{HostTensor, Step, StepError};
use std::collections::{BTreeMap, HashMap};

const G: usize = 2;
const K: usize = 3;
const V: usize = 7;
const LAYERS: usize = 2;

/// A single-level decode manifest with `LAYERS` layers, no kernels.
fn manifest() -> Manifest {
    let buf = |name: &str, kind: &str, role: &str, extra: &str, shape: &str, dtype: &str| {
        format!(
            r#"{{"name": "{name}", "kind": "{kind}", "role": "{role}"{extra}, "shape": {shape}, "dtype": "{dtype}", "bytes": 0}}"#
        )
    };
    let mut buffers = vec![
        buf("token_ids", "input", "token_ids", "", r#"["b", 1]"#, "i32"),
        buf("positions", "input", "position", "", r#"["b", 1]"#, "i32"),
        buf("w", "input", "weight", "", &format!("[{V}]"), "f32"),
    ];
    for l in 0..LAYERS {
        for kv in ["k", "v"] {
            let extra = format!(r#", "layer": {l}, "kv": "{kv}""#);
            buffers.push(buf(
                &format!("cache.{l}.{kv}_ctx"),
                "input",
                "context_kv",
                &extra,
                &format!(r#"[{G}, "m_c", {K}]"#),
                "f32",
            ));
            buffers.push(buf(
                &format!("cache.{l}.{kv}_dec"),
                "input",
                "decode_kv",
                &extra,
                &format!(r#"["b", {G}, "m_d", {K}]"#),
                "f32",
            ));
            buffers.push(buf(
                &format!("layer.{l}.{kv}_new"),
                "output",
                "new_kv",
                &extra,
                &format!(r#"["b", {G}, 1, {K}]"#),
                "f32",
            ));
        }
    }
    buffers.push(buf("logits", "output", "logits", "", &format!(r#"["b", 1, {V}]"#), "f32"));
    let text = format!(
        r#"{{"format": "bifurc-artifact/1", "ptx": "step.ptx", "target": "sm_90", "bifurcate": true, "model": {{}},
        "dims": {{"runtime": ["b", "m_c", "m_d"], "constants": {{}}}}, "point": {{"b": 2, "m_c": 4, "m_d": 1}},
        "buffers": [{}], "kernels": [], "attention": [],
        "bytes": {{"before": {{"weights": 0, "context_kv": 0, "decode_kv": 0, "activations": 0, "total": 0}},
                   "after": {{"weights": 0, "context_kv": 0, "decode_kv": 0, "activations": 0, "total": 0}},
                   "predicted_speedup": 1.0}}}}"#,
        buffers.join(",\n")
    );
    Manifest::from_str(&text).unwrap()
}

/// The new K row value of (token, position, layer, group, column); V rows are its negation.
fn kv_value(token: usize, position: usize, layer: usize, gi: usize, j: usize) -> f32 {
    (token * 100_000 + position * 100 + layer * 10 + gi) as f32 + j as f32 * 0.125
}

/// What one run saw.
#[derive(Clone, Debug)]
struct Run {
    dims: (usize, usize, usize),
    tokens: Vec<usize>,
    positions: Vec<usize>,
    bound: HashMap<String, HostTensor>,
}

#[derive(Default)]
struct FakeStep {
    bound: HashMap<String, HostTensor>,
    binds: HashMap<String, usize>,
    runs: Vec<Run>,
    /// The dims of each `reserve`, with the number of runs before it.
    reserved: Vec<((usize, usize, usize), usize)>,
    /// Return new K rows of a wrong shape (a broken backend).
    broken: bool,
}

impl FakeStep {
    fn expect(&self, name: &str, shape: &[usize]) -> Result<&HostTensor, StepError> {
        let t = self.bound.get(name).ok_or_else(|| StepError::Unbound(name.to_string()))?;
        if t.shape != shape {
            return Err(StepError::Shape { name: name.into(), expected: shape.to_vec(), got: t.shape.clone() });
        }
        Ok(t)
    }
}

impl Step for FakeStep {
    fn runtime_dims(&self) -> Vec<String> {
        vec!["b".into(), "m_c".into(), "m_d".into()]
    }

    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
        *self.binds.entry(name.to_string()).or_default() += 1;
        self.bound.insert(name.to_string(), tensor.clone());
        Ok(())
    }

    fn reserve(&mut self, dims: &BTreeMap<String, i64>) -> Result<(), StepError> {
        self.reserved.push((three(dims)?, self.runs.len()));
        Ok(())
    }

    fn run_selected(
        &mut self,
        dims: &BTreeMap<String, i64>,
        _: Option<&[&str]>,
    ) -> Result<HashMap<String, HostTensor>, StepError> {
        let (b, m_c, m_d) = three(dims)?;
        let tokens: Vec<usize> = self.expect("token_ids", &[b, 1])?.data.iter().map(|v| *v as usize).collect();
        let positions: Vec<usize> = self.expect("positions", &[b, 1])?.data.iter().map(|v| *v as usize).collect();
        self.expect("w", &[V])?;
        for l in 0..LAYERS {
            for kv in ["k", "v"] {
                self.expect(&format!("cache.{l}.{kv}_ctx"), &[G, m_c, K])?;
                self.expect(&format!("cache.{l}.{kv}_dec"), &[b, G, m_d, K])?;
            }
        }
        let mut out = HashMap::new();
        for l in 0..LAYERS {
            let mut k_rows = Vec::new();
            for s in 0..b {
                for gi in 0..G {
                    for j in 0..K {
                        k_rows.push(kv_value(tokens[s], positions[s], l, gi, j));
                    }
                }
            }
            let v_rows = k_rows.iter().map(|x| -x).collect();
            let k_shape = if self.broken { vec![b, G, 2, K] } else { vec![b, G, 1, K] };
            out.insert(format!("layer.{l}.k_new"), HostTensor { shape: k_shape, data: k_rows });
            out.insert(format!("layer.{l}.v_new"), HostTensor { shape: vec![b, G, 1, K], data: v_rows });
        }
        let mut logits = vec![0.0; b * V];
        for s in 0..b {
            logits[s * V + (tokens[s] + 1) % V] = 2.0;
        }
        out.insert("logits".into(), HostTensor { shape: vec![b, 1, V], data: logits });
        self.runs.push(Run { dims: (b, m_c, m_d), tokens, positions, bound: self.bound.clone() });
        Ok(out)
    }
}

/// `(b, m_c, m_d)` of `dims`.
fn three(dims: &BTreeMap<String, i64>) -> Result<(usize, usize, usize), StepError> {
    let d = |n: &str| dims.get(n).map(|v| *v as usize).ok_or_else(|| StepError::Dims(format!("no {n}")));
    Ok((d("b")?, d("m_c")?, d("m_d")?))
}

fn weights() -> HashMap<String, HostTensor> {
    HashMap::from([("w".to_string(), HostTensor::zeros(vec![V]))])
}

/// Checks that `cache` (`[b, G, rows, K]`, or `[G, rows, K]` with `b = None`)
/// holds, for sample s and row r, the K (or V) values of `tokens[s][r]` at
/// position `first_position + r`.
fn check_cache(cache: &HostTensor, tokens: &[Vec<usize>], first_position: usize, layer: usize, is_v: bool) {
    let rows = cache.shape[cache.shape.len() - 2];
    assert_eq!(cache.data.len(), tokens.len() * G * rows * K);
    for (s, sample_tokens) in tokens.iter().enumerate() {
        assert!(sample_tokens.len() >= rows, "sample {s}: {rows} rows but {} tokens", sample_tokens.len());
        for gi in 0..G {
            for (r, &token) in sample_tokens.iter().enumerate().take(rows) {
                for j in 0..K {
                    let at = ((s * G + gi) * rows + r) * K + j;
                    let want = kv_value(token, first_position + r, layer, gi, j);
                    let want = if is_v { -want } else { want };
                    assert_eq!(cache.data[at], want, "sample {s} group {gi} row {r} col {j}");
                }
            }
        }
    }
}

#[test]
fn fills_the_context_by_stepping_and_decodes_greedily() {
    let m = manifest();
    let mut session = Session::new(FakeStep::default(), &m).unwrap();
    session.bind_weights(&weights()).unwrap();
    let prompt = [3u32, 4, 5];
    let mut told = Vec::new();
    let logits = session.fill_context_with(&prompt, |n| told.push(n)).unwrap();
    assert_eq!(told, [1, 2, 3], "the context's length after each step");
    assert_eq!(logits.len(), V);
    assert_eq!(logits.iter().position(|v| *v == 2.0), Some(6), "favours last prompt token + 1");

    // The fill stepped b = 1, m_c = 0, m_d = i at position i, with the
    // growing one-sample cache of the earlier prompt tokens.
    let fill_runs = session.step().runs.clone();
    assert_eq!(fill_runs.len(), 3);
    let prompt_tokens: Vec<usize> = prompt.iter().map(|t| *t as usize).collect();
    for (i, run) in fill_runs.iter().enumerate() {
        assert_eq!(run.dims, (1, 0, i));
        assert_eq!((run.tokens.clone(), run.positions.clone()), (vec![prompt_tokens[i]], vec![i]));
        for l in 0..LAYERS {
            check_cache(&run.bound[&format!("cache.{l}.k_dec")], std::slice::from_ref(&prompt_tokens), 0, l, false);
            check_cache(&run.bound[&format!("cache.{l}.v_dec")], std::slice::from_ref(&prompt_tokens), 0, l, true);
        }
    }
    // The context cache [G, L, K] is that one-sample cache.
    let context = session.context().unwrap().clone();
    assert_eq!(context.len, 3);
    for l in 0..LAYERS {
        assert_eq!(context.caches[l][0].shape, vec![G, 3, K]);
        check_cache(&context.caches[l][0], std::slice::from_ref(&prompt_tokens), 0, l, false);
        check_cache(&context.caches[l][1], std::slice::from_ref(&prompt_tokens), 0, l, true);
    }

    let options = SampleOptions { samples: 4, steps: 5, temperature: 0.0, seed: 1, keep_last_logits: true };
    let mut reports = Vec::new();
    let out = session.sample(&options, |r| reports.push((r.step, r.fed.to_vec()))).unwrap();
    // 5+1 = 6, then (6+1) mod 7 = 0, 1, 2, 3, for every sample.
    assert_eq!(out.tokens, vec![vec![6, 0, 1, 2, 3]; 4]);
    assert_eq!(out.step_ms.len(), 5);
    assert_eq!(reports.len(), 5);
    assert_eq!(reports[1], (1, vec![0; 4]));
    let last = out.last_logits.unwrap();
    assert_eq!(last.shape, vec![4, V]);
    assert_eq!(last.data[4], 2.0, "after feeding 3 the step favours 4");

    let runs = &session.step().runs[3..];
    assert_eq!(runs.len(), 5);
    let generated: Vec<Vec<usize>> = out.tokens.iter().map(|t| t.iter().map(|x| *x as usize).collect()).collect();
    for (s, run) in runs.iter().enumerate() {
        assert_eq!(run.dims, (4, 3, s), "b, m_c = L, m_d = step");
        assert_eq!(run.positions, vec![3 + s; 4]);
        assert_eq!(run.tokens, generated.iter().map(|t| t[s]).collect::<Vec<_>>());
        for l in 0..LAYERS {
            // Context caches as filled; decode caches [b, G, s, K] of the tokens fed so far.
            assert_eq!(run.bound[&format!("cache.{l}.k_ctx")], context.caches[l][0]);
            check_cache(&run.bound[&format!("cache.{l}.k_dec")], &generated, 3, l, false);
            check_cache(&run.bound[&format!("cache.{l}.v_dec")], &generated, 3, l, true);
        }
    }
    // Room made before the fill's first run for its last (b = 1, m_c = 0,
    // m_d = 2), and before sampling's first run for its last (m_d = 4).
    assert_eq!(session.step().reserved, vec![((1, 0, 2), 0), ((4, 3, 4), 3)]);
    // Weights once; context caches once for the fill (empty) and once for sampling.
    let binds = &session.step().binds;
    assert_eq!(binds["w"], 1);
    assert_eq!(binds["cache.0.k_ctx"], 2);
    assert_eq!(binds["cache.1.v_dec"], 3 + 5);

    // A second sampling run re-uses the bound context.
    session.sample(&SampleOptions { samples: 2, steps: 2, ..options }, |_| {}).unwrap();
    assert_eq!(session.step().binds["cache.0.k_ctx"], 2);
}

#[test]
fn temperature_sampling_is_deterministic_per_seed_and_varies_across_samples() {
    let m = manifest();
    let run = |seed: u64, samples: usize| {
        let mut step = FakeStep::default();
        let mut session = Session::new(&mut step as &mut dyn Step, &m).unwrap();
        session.bind_weights(&weights()).unwrap();
        session.fill_context(&[1, 2]).unwrap();
        let options = SampleOptions { samples, steps: 6, temperature: 1.0, seed, keep_last_logits: false };
        let out = session.sample(&options, |_| {}).unwrap();
        assert!(out.last_logits.is_none());
        // Each sample's decode cache holds its own tokens.
        let generated: Vec<Vec<usize>> = out.tokens.iter().map(|t| t.iter().map(|x| *x as usize).collect()).collect();
        let last_run = step.runs.last().unwrap().clone();
        check_cache(&last_run.bound["cache.1.k_dec"], &generated, 2, 1, false);
        out.tokens
    };
    let a = run(7, 16);
    assert_eq!(a, run(7, 16), "same seed, same samples");
    assert_ne!(a, run(8, 16), "another seed, other samples");
    let distinct: std::collections::BTreeSet<_> = a.iter().collect();
    assert!(distinct.len() > 4, "samples differ: {a:?}");
    // Sample i has its own generator: the first 3 of 16 equal a run of 3.
    assert_eq!(a[..3].to_vec(), run(7, 3));
}

#[test]
fn usage_and_backend_errors_are_reported() {
    let m = manifest();
    let mut session = Session::new(FakeStep::default(), &m).unwrap();
    let options = SampleOptions { samples: 2, steps: 2, temperature: 0.0, seed: 0, keep_last_logits: false };
    let err = session.sample(&options, |_| {}).unwrap_err().to_string();
    assert!(err.contains("no context"), "{err}");
    assert!(session.fill_context(&[]).unwrap_err().to_string().contains("empty"));
    // Weights not bound: the step's own error comes through.
    let err = session.fill_context(&[1]).unwrap_err();
    assert!(matches!(err, SessionError::Step(StepError::Unbound(ref n)) if n == "w"), "{err}");
    session.bind_weights(&weights()).unwrap();
    let err = session.fill_context(&[1, 9]).unwrap_err().to_string();
    assert!(err.contains("token id 9") && err.contains("0..7"), "{err}");
    assert!(session.bind_weights(&HashMap::new()).unwrap_err().to_string().contains("`w`"));

    // Contexts installed directly.
    let bad = vec![[HostTensor::zeros(vec![G, 4, K]), HostTensor::zeros(vec![G, 3, K])]; LAYERS];
    let err = session.set_context(bad, vec![0.0; V]).unwrap_err().to_string();
    assert!(err.contains("cache.0.v_ctx"), "{err}");
    session.random_context(5, 3).unwrap();
    let out = session.sample(&options, |_| {}).unwrap();
    assert_eq!(out.tokens.len(), 2);
    assert_eq!(session.step().runs.last().unwrap().dims, (2, 5, 1));
    assert!(session.sample(&SampleOptions { samples: 0, ..options.clone() }, |_| {}).is_err());
    assert!(session.sample(&SampleOptions { temperature: -1.0, ..options.clone() }, |_| {}).is_err());

    // A backend that returns rows of the wrong shape.
    let mut session = Session::new(FakeStep { broken: true, ..FakeStep::default() }, &m).unwrap();
    session.bind_weights(&weights()).unwrap();
    let err = session.fill_context(&[1]).unwrap_err().to_string();
    assert!(err.contains("layer.0.k_new") && err.contains("[1, 2, 1, 3]"), "{err}");

    // A step with other runtime dims, a manifest that is not single-level.
    struct OtherDims;
    impl Step for OtherDims {
        fn runtime_dims(&self) -> Vec<String> {
            vec!["b".into()]
        }
        fn bind(&mut self, _: &str, _: &HostTensor) -> Result<(), StepError> {
            Ok(())
        }
        fn run_selected(
            &mut self,
            _: &BTreeMap<String, i64>,
            _: Option<&[&str]>,
        ) -> Result<HashMap<String, HostTensor>, StepError> {
            Ok(HashMap::new())
        }
    }
    assert!(Session::new(OtherDims, &m).is_err());
    let mut multi = m.clone();
    multi.dims.runtime = vec!["P".into(), "S".into(), "m_s".into(), "m_c".into(), "m_d".into()];
    assert!(matches!(Session::new(FakeStep::default(), &multi), Err(SessionError::Layout(_))));
}

/// Without a host copy of the context (`keep_host_context(false)`): a
/// context is bound as it is installed, filled or random, and the
/// session's copy is empty; sampling decodes the same tokens from the same
/// bound caches, each bound as often as with a copy. After `step_mut` the
/// session asks for the context again instead of trusting what the step
/// holds. Turning the copy off binds the current context, then drops it.
#[test]
fn a_context_without_a_host_copy_is_bound_as_it_is_installed() {
    let m = manifest();
    let options = SampleOptions { samples: 3, steps: 4, temperature: 1.0, seed: 5, keep_last_logits: true };
    let decode = |keep: bool, random: bool| {
        let mut session = Session::new(FakeStep::default(), &m).unwrap();
        session.bind_weights(&weights()).unwrap();
        session.keep_host_context(keep).unwrap();
        if random {
            session.random_context(6, 3).unwrap();
        } else {
            session.fill_context(&[2, 5, 1]).unwrap();
        }
        let held = session.context().unwrap().caches.len();
        let out = session.sample(&options, |_| {}).unwrap();
        (held, out, session)
    };
    for random in [true, false] {
        let (held, kept, with) = decode(true, random);
        let (none, dropped, mut without) = decode(false, random);
        assert_eq!((held, none), (LAYERS, 0), "random {random}: the host copy");
        assert_eq!((kept.tokens, kept.last_logits), (dropped.tokens, dropped.last_logits), "random {random}");
        let (a, b) = (with.step().runs.last().unwrap(), without.step().runs.last().unwrap());
        for l in 0..LAYERS {
            for kv in ["k", "v"] {
                let name = format!("cache.{l}.{kv}_ctx");
                assert_eq!(a.bound[&name], b.bound[&name], "random {random}: `{name}`");
                assert_eq!(with.step().binds[&name], without.step().binds[&name], "random {random}: `{name}` binds");
            }
        }
        without.step_mut();
        let err = without.sample(&options, |_| {}).unwrap_err().to_string();
        assert!(err.contains("install the context again"), "random {random}: {err}");
        without.random_context(6, 3).unwrap();
        assert_eq!(without.sample(&options, |_| {}).unwrap().tokens.len(), 3);
    }

    let mut session = Session::new(FakeStep::default(), &m).unwrap();
    session.bind_weights(&weights()).unwrap();
    let mut told = Vec::new();
    session.random_context_with(4, 9, |n| told.push(n)).unwrap();
    assert_eq!(told, [1, 2], "layers drawn so far, after each");
    let caches = session.context().unwrap().caches.clone();
    let mut rng = bifurc_runtime::rng::SplitMix64::named(9, "cache.1.v_ctx");
    assert!(caches[1][1].data.iter().all(|&v| v == rng.symmetric()), "one generator's values, in order");
    assert!(!session.step().binds.contains_key("cache.0.k_ctx"), "bound when sampling, with a copy");
    session.keep_host_context(false).unwrap();
    assert!(session.context().unwrap().caches.is_empty());
    assert_eq!(session.step().bound["cache.1.v_ctx"], caches[1][1], "bound before its copy went");
    session.sample(&options, |_| {}).unwrap();
    assert_eq!(session.step().binds["cache.0.k_ctx"], 1, "and not again");
    session.keep_host_context(true).unwrap();
    session.random_context(4, 9).unwrap();
    assert_eq!(session.context().unwrap().caches, caches, "kept again");
}

#[test]
fn the_provided_run_timed_warms_up_then_times_each_run() {
    let m = manifest();
    let mut session = Session::new(FakeStep::default(), &m).unwrap();
    session.bind_weights(&weights()).unwrap();
    session.fill_context(&[1]).unwrap();
    let mut step = std::mem::take(session.step_mut());
    let dims = BTreeMap::from([("b".to_string(), 1), ("m_c".to_string(), 0), ("m_d".to_string(), 0)]);
    // The fill left token ids, positions and empty caches bound for b = 1.
    {
        let mut boxed: Box<&mut FakeStep> = Box::new(&mut step);
        let times = boxed.run_timed(&dims, 3).unwrap();
        assert_eq!(times.len(), 3);
        assert!(times.iter().all(|t| *t >= 0.0));
    }
    assert_eq!(step.runs.len(), 1 + 1 + 3, "the fill, one warm-up, three timed runs");
}

/// Any sequence of the session's calls, with arguments in and out of
/// range, returns (an error or a result) and never panics; whenever
/// sampling succeeds it gives `samples` rows of `steps` tokens. A fixed
/// SplitMix64 sequence of 400 sessions of 12 calls each.
#[test]
fn any_sequence_of_calls_returns() {
    let m = manifest();
    let mut rng = SplitMix64::new(0xC0FFEE);
    let mut next = |n: usize| rng.below(n as u64) as usize;
    let (mut sampled, mut refused) = (0, 0);
    for case in 0..400 {
        let mut session = Session::new(FakeStep::default(), &m).unwrap();
        for call in 0..12 {
            let what = next(8);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match what {
                0 => session.bind_weights(&weights()).map(|_| None),
                1 => {
                    let prompt: Vec<u32> = (0..next(5)).map(|_| next(V + 2) as u32).collect();
                    session.fill_context(&prompt).map(|_| None)
                }
                2 => session.random_context(next(6), next(4) as u64).map(|_| None),
                3 => session.keep_host_context(next(2) == 0).map(|_| None),
                4 => {
                    let len = next(4);
                    let rows = [len, if next(4) == 0 { len + 1 } else { len }];
                    let caches = vec![rows.map(|r| HostTensor::zeros(vec![G, r, K])); LAYERS];
                    session.set_context(caches, vec![0.0; if next(4) == 0 { V - 1 } else { V }]).map(|_| None)
                }
                5 => {
                    let _ = session.step_mut();
                    Ok(None)
                }
                _ => {
                    let temperature = [0.0, 0.8, -1.0, f32::NAN, f32::INFINITY][next(5)];
                    let options = SampleOptions {
                        samples: next(4),
                        steps: next(4),
                        temperature,
                        seed: 1,
                        keep_last_logits: true,
                    };
                    session.sample(&options, |_| {}).map(|out| Some((options, out)))
                }
            }));
            let Ok(result) = result else { panic!("case {case}, call {call} ({what}) panicked") };
            match result {
                Ok(Some((options, out))) => {
                    sampled += 1;
                    assert_eq!(out.tokens.len(), options.samples, "case {case}");
                    assert!(out.tokens.iter().all(|t| t.len() == options.steps), "case {case}");
                }
                Ok(None) => {}
                Err(_) => refused += 1,
            }
        }
    }
    // Both kinds happen.
    assert!(sampled > 50 && refused > 50, "sampled {sampled}, refused {refused}");
}

/// Tokens a second leave the sampling call's set-up out: 2 samples of 3
/// tokens over 1.5 s, 0.5 of them set-up, are 6 a second; no time left
/// after the set-up gives 0, not infinity.
#[test]
fn tokens_per_second_leave_the_set_up_out() {
    let out = bifurc_runtime::session::SampleOutput {
        tokens: vec![vec![1, 2, 3], vec![4, 5, 6]],
        step_ms: vec![100.0; 3],
        last_logits: None,
        setup_ms: 500.0,
    };
    assert_eq!(out.tokens_per_s(1.5), 6.0);
    assert_eq!(out.tokens_per_s(0.5), 0.0);
}
