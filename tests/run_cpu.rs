//! `bifurc run` on the CPU: examples/tiny compiled twice (baseline, and
//! bifurcated at b=32, m_c=512, m_d=4), written as artifacts (PTX +
//! manifest + compiled graph), then
//!
//! - end to end through the CLI binary: sampling is deterministic for a seed
//!   and changes with it; greedy decoding gives identical samples;
//! - through the library (`Session` over `CpuBackend` of each artifact's
//!   graph.json, the same random weights and prompt): the bifurcated step
//!   gives the baseline's outputs at every step, fill and decode, within
//!   tolerance, and the same token ids exactly;
//! - error cases: one line on stderr, exit status 1.
//!
//! Tolerance: norm-relative per output and step, as in tests/lower_cpu.rs:
//! `max|a - b| <= 1e-4 * max(max|b|, 1e-6)`, `b` the baseline. Both sides
//! are f32 kernels; the bifurcated one sums the context and decode parts of
//! attention separately, so they differ by f32 rounding only.
//!
//! Needs `BIFURC_LIBDEVICE` (`source scripts/env.sh`) to compile the
//! artifacts; without it the tests print a note and skip.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bifurc::inspect::ShapePoint;
use bifurc::ir::DType;
use bifurc::lower::gpu::GpuTarget;
use bifurc::{compile, CompileOptions};
use bifurc_runtime::rng::SplitMix64;
use bifurc_runtime::session::{SampleOptions, SampleOutput, Session};
use bifurc_runtime::weights::random_weights;
use bifurc_runtime::{BoundCaches, HostTensor, Step, StepError};
use serde_json::Value;

const TOL: f32 = 1e-4;
const PROMPT: [u32; 5] = [1, 2, 3, 4, 5];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &Path) -> bifurc::ir::Graph {
    bifurc::import::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compiles `examples/{example}/model.json` for sm_90 and writes it as
/// `dir/{name}.ptx` (+ manifest, graph).
fn write_artifact(libdevice: &Path, dir: &Path, example: &str, name: &str, bifurcate: bool, point: &str) -> PathBuf {
    write_artifact_as(libdevice, dir, example, name, bifurcate, point, None)
}

/// [`write_artifact`], re-typed to `dtype` when given.
fn write_artifact_as(
    libdevice: &Path,
    dir: &Path,
    example: &str,
    name: &str,
    bifurcate: bool,
    point: &str,
    dtype: Option<DType>,
) -> PathBuf {
    let graph = load(&root().join("examples").join(example).join("model.json"));
    let opts = CompileOptions {
        target: GpuTarget::Sm90,
        point: ShapePoint::parse(point).unwrap(),
        bifurcate,
        libdevice: Some(libdevice.to_path_buf()),
        dtype,
        ..CompileOptions::default()
    };
    let artifact = compile(&graph, &opts).unwrap_or_else(|e| panic!("compiling {example}: {e}"));
    if bifurcate {
        assert!(artifact.manifest.attention.iter().all(|s| s.bifurcated), "{example} at {point}: not bifurcated");
    }
    let ptx = dir.join(format!("{name}.ptx"));
    artifact.write(&ptx).unwrap();
    ptx
}

/// The baseline and the bifurcated tiny artifacts in `dir`.
fn tiny_artifacts(libdevice: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let base = write_artifact(libdevice, dir, "tiny", "base", false, "");
    let bif = write_artifact(libdevice, dir, "tiny", "bif", true, "b=32,m_c=512,m_d=4");
    (base, bif)
}

fn bifurc(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bifurc"));
    cmd.args(args);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs every command at once (each JIT-compiles its step) and waits for all.
fn run_all(cmds: Vec<Command>) -> Vec<Output> {
    let children: Vec<_> = cmds
        .into_iter()
        .map(|mut c| c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap())
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "bifurc run failed: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

fn samples_of(v: &Value) -> Vec<Vec<u64>> {
    let samples = v["samples"].as_array().expect("`samples` is an array");
    samples
        .iter()
        .map(|s| s.as_array().expect("a sample is an array").iter().map(|t| t.as_u64().unwrap()).collect())
        .collect()
}

#[test]
fn cli_samples_deterministically_for_a_seed() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "cli");
    let (_, bif) = tiny_artifacts(&libdevice, &dir);
    let bif = bif.to_str().unwrap();
    let common = [
        "run",
        bif,
        "--random-weights",
        "--weights-seed",
        "3",
        "--prompt-ids",
        "1,2,3,4,5",
        "--samples",
        "4",
        "--steps",
        "4",
        "--json",
    ];
    let with = |extra: &[&str]| bifurc(&[&common[..], extra].concat());
    let outs = run_all(vec![
        with(&["--temperature", "0.8", "--seed", "7"]),
        with(&["--temperature", "0.8", "--seed", "7"]),
        with(&["--temperature", "0.8", "--seed", "8"]),
        with(&["--temperature", "0", "--seed", "7", "--logits"]),
        with(&["--temperature", "0.8", "--seed", "7", "--threads", "1"]),
    ]);
    let [a, b, c, greedy, one] = [&outs[0], &outs[1], &outs[2], &outs[3], &outs[4]].map(json_of);
    assert_eq!(samples_of(&one), samples_of(&a), "one thread gives the same samples");
    assert_eq!(one["device"], "cpu (MLIR JIT, 1 thread)");

    let ids = samples_of(&a);
    assert_eq!(ids.len(), 4, "{a}");
    assert!(ids.iter().all(|s| s.len() == 4 && s.iter().all(|&t| t < 256)), "{ids:?}");
    assert_eq!(ids, samples_of(&b), "the same seed gives the same samples");
    assert_eq!(a["tokens"], a["samples"], "`tokens` (bifurc-run's key) holds the same ids");
    // 16 draws at T=0.8 over 256 tokens: equal for two seeds with negligible probability.
    assert_ne!(ids, samples_of(&c), "another seed gives other samples");
    assert!(ids.iter().any(|s| s != &ids[0]), "independent samples differ: {ids:?}");

    let step_ms = a["step_ms"].as_array().unwrap();
    assert_eq!(step_ms.len(), 4);
    assert!(step_ms.iter().all(|t| t.as_f64().unwrap() > 0.0));
    assert!(a["tokens_per_s"].as_f64().unwrap() > 0.0);
    // The decode's set-up (the plan for 4 samples JIT-compiled) is
    // reported on its own, not in the rate: at most the steps' own time.
    assert!(a["decode_setup_ms"].as_f64().unwrap() >= 0.0, "{a}");
    let steps_s: f64 = step_ms.iter().map(|t| t.as_f64().unwrap()).sum::<f64>() / 1e3;
    assert!(a["tokens_per_s"].as_f64().unwrap() <= 16.0 / steps_s * 1.0001, "{a}");
    assert!(a.get("logits").is_none(), "logits only with --logits");

    let g = samples_of(&greedy);
    assert_eq!(g.len(), 4);
    assert!(g.iter().all(|s| s == &g[0]), "greedy: every sample the same: {g:?}");
    let logits = greedy["logits"].as_array().expect("--logits gives `logits`");
    assert_eq!(logits.len(), 4);
    assert!(logits.iter().all(|row| row.as_array().unwrap().len() == 256));
    assert!(logits.iter().all(|row| row == &logits[0]), "greedy samples have the same last logits");
    assert!(logits[0].as_array().unwrap().iter().all(|x| x.as_f64().unwrap().is_finite()));

    // Text output: tokens, latency, throughput.
    let out = bifurc(&["run", bif, "--random-weights", "--context-len", "6", "--samples", "2", "--steps", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let wants =
        ["context: 6 tokens (random", "decoded 2 samples x 3 steps", "median", "p90", "tokens/s after", "of set-up"];
    for want in wants.into_iter().chain(["sample 1: "]) {
        assert!(stdout.contains(want), "`{want}` missing from:\n{stdout}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A step that records every output of every run (also of a run for some
/// outputs only, and which it was for); with `keep_caches` false it keeps
/// no decode caches (the session binds them every step).
struct Recorder<S> {
    inner: S,
    runs: Vec<(BTreeMap<String, i64>, HashMap<String, HostTensor>)>,
    keep_caches: bool,
    /// Reserve kept caches with this many rows instead of the session's
    /// (1: they grow at every power of two).
    capacity: Option<usize>,
    /// Names bound, in order.
    binds: Vec<String>,
    /// The outputs asked for by each run for some outputs only.
    wanted: Vec<Vec<String>>,
}

impl<S: Step> Step for Recorder<S> {
    fn runtime_dims(&self) -> Vec<String> {
        self.inner.runtime_dims()
    }

    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
        self.binds.push(name.to_string());
        self.inner.bind(name, tensor)
    }

    /// Records every output of the run (and what the caller wanted).
    fn run_selected(
        &mut self,
        dims: &BTreeMap<String, i64>,
        wanted: Option<&[&str]>,
    ) -> Result<HashMap<String, HostTensor>, StepError> {
        let mut out = self.inner.run(dims)?;
        self.runs.push((dims.clone(), out.clone()));
        if let Some(wanted) = wanted {
            self.wanted.push(wanted.iter().map(|w| w.to_string()).collect());
            out.retain(|name, _| wanted.contains(&name.as_str()));
        }
        Ok(out)
    }

    fn reserve_rows(&mut self, name: &str, shape: &[usize], capacity: usize) -> Result<bool, StepError> {
        if self.keep_caches {
            self.inner.reserve_rows(name, shape, self.capacity.unwrap_or(capacity))
        } else {
            Ok(false)
        }
    }

    fn append_rows(&mut self, name: &str, rows: &str) -> Result<(), StepError> {
        self.inner.append_rows(name, rows)
    }

    fn release_rows(&mut self, name: &str) -> Result<(), StepError> {
        self.inner.release_rows(name)
    }

    fn read_rows(&mut self, name: &str) -> Result<HostTensor, StepError> {
        self.inner.read_rows(name)
    }
}

type Runs = Vec<(BTreeMap<String, i64>, HashMap<String, HostTensor>)>;

/// Decodes with the artifact at `ptx` on the CPU: greedy from PROMPT, then
/// sampled at T=0.8 from a random context, with the decode caches kept in
/// the backend or by the session (`keep_caches`). Returns both outputs and
/// every step's outputs.
fn decode(
    ptx: &Path,
    weights: &HashMap<String, HostTensor>,
    keep_caches: bool,
) -> (Vec<f32>, SampleOutput, SampleOutput, Runs) {
    let (fill, greedy, sampled, runs, _) = decode_with(ptx, weights, keep_caches, None, 4);
    (fill, greedy, sampled, runs)
}

/// [`decode`], kept caches reserved with `capacity` rows when given, of
/// `samples` samples; also how many runs took the step's plan with the
/// context attention fused.
fn decode_with(
    ptx: &Path,
    weights: &HashMap<String, HostTensor>,
    keep_caches: bool,
    capacity: Option<usize>,
    samples: usize,
) -> (Vec<f32>, SampleOutput, SampleOutput, Runs, usize) {
    let (artifact, cpu) = bifurc::run::cpu_step(ptx).unwrap_or_else(|e| panic!("{}: {e}", ptx.display()));
    let recorder =
        Recorder { inner: cpu, runs: Vec::new(), keep_caches, capacity, binds: Vec::new(), wanted: Vec::new() };
    let mut session = Session::new(recorder, &artifact.manifest).unwrap();
    session.bind_weights(weights).unwrap();
    let fill = session.fill_context(&PROMPT).unwrap();
    let options = SampleOptions { samples, steps: 6, temperature: 0.0, seed: 1, keep_last_logits: true };
    let greedy = session.sample(&options, |_| {}).unwrap();
    session.random_context(7, 11).unwrap();
    let options = SampleOptions { temperature: 0.8, ..options };
    let sampled = session.sample(&options, |_| {}).unwrap();
    let recorder = session.into_step();
    // Kept caches are never bound; the others are bound at every step.
    let cache_binds = recorder.binds.iter().filter(|n| n.ends_with("_dec")).count();
    assert_eq!(cache_binds, if keep_caches { 0 } else { 4 * recorder.runs.len() }, "decode-cache binds");
    // With the caches in the backend a decode step reads back the logits
    // alone (the new rows are appended there): every step, filling the
    // context included.
    let logits_only = recorder.wanted.iter().filter(|w| *w == &["logits".to_string()]).count();
    let steps = recorder.runs.len();
    assert_eq!((logits_only, recorder.wanted.len()), if keep_caches { (steps, steps) } else { (0, 0) });
    let fuses = |dims: &BTreeMap<String, i64>| {
        recorder.inner.step().program_at(dims).kernels.iter().any(|k| k.op == bifurc::lower::FUSED_OP)
    };
    let fused = recorder.runs.iter().filter(|(dims, _)| fuses(dims)).count();
    (fill, greedy, sampled, recorder.runs, fused)
}

/// `max|a - b| / max(max|b|, 1e-6)`.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    diff / scale.max(1e-6)
}

/// The bifurcated artifact decodes as the baseline does, step by step,
/// at 4 samples and at 16, where 8 and 32 query rows share each KV head
/// of the tiny model (2 query heads a KV head; the fill's steps at b = 1,
/// 2) and every step takes the plan with the context attention fused
/// (`lower::fused_attention`, from 2 rows: tiles of 4, 8 and 16 lanes),
/// which the baseline has none of.
#[test]
fn bifurcated_decodes_like_the_baseline() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "equal");
    let (base, bif) = tiny_artifacts(&libdevice, &dir);
    let manifest = bifurc_runtime::Artifact::load(&base).unwrap().manifest;
    let weights = random_weights(&manifest, 5).unwrap();
    for samples in [4, 16] {
        let (fill_a, greedy_a, sampled_a, runs_a, fused_a) = decode_with(&base, &weights, true, None, samples);
        let (fill_b, greedy_b, sampled_b, runs_b, fused_b) = decode_with(&bif, &weights, true, None, samples);
        // 5 fill steps, 6 greedy and 6 sampled decode steps, all fused.
        assert_eq!((fused_a, fused_b), (0, 5 + 6 + 6), "{samples} samples");

        // 5 fill steps at b=1, then 6 greedy and 6 sampled steps.
        assert_eq!(runs_a.len(), 5 + 6 + 6);
        assert_eq!(runs_a.len(), runs_b.len());
        let mut worst = 0.0f32;
        for (i, ((dims_a, out_a), (dims_b, out_b))) in runs_a.iter().zip(&runs_b).enumerate() {
            assert_eq!(dims_a, dims_b, "step {i}");
            let mut names: Vec<&String> = out_a.keys().collect();
            names.sort();
            let mut names_b: Vec<&String> = out_b.keys().collect();
            names_b.sort();
            assert_eq!(names, names_b, "step {i}: outputs");
            for name in names {
                let (a, b) = (&out_a[name], &out_b[name]);
                assert_eq!(a.shape, b.shape, "step {i} `{name}`");
                let d = rel_diff(&b.data, &a.data);
                assert!(d <= TOL, "step {i} at {dims_a:?}: `{name}` differs by {d:e} (norm-relative) > {TOL:e}");
                worst = worst.max(d);
            }
        }
        eprintln!("{samples} samples: largest norm-relative difference over {} steps: {worst:e}", runs_a.len());
        assert!(rel_diff(&fill_b, &fill_a) <= TOL);

        assert_eq!(greedy_a.tokens, greedy_b.tokens, "greedy ids");
        assert!(greedy_a.tokens.iter().all(|s| s == &greedy_a.tokens[0]), "greedy: identical samples");
        assert_eq!(sampled_a.tokens, sampled_b.tokens, "sampled ids (same seed)");
        assert!(sampled_a.tokens.iter().any(|s| s != &sampled_a.tokens[0]), "sampled: the samples differ");
        for (a, b) in [(&greedy_a, &greedy_b), (&sampled_a, &sampled_b)] {
            let (la, lb) = (a.last_logits.as_ref().unwrap(), b.last_logits.as_ref().unwrap());
            assert_eq!(la.shape, [samples, 256]);
            assert!(rel_diff(&lb.data, &la.data) <= TOL);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Decode caches kept inside the backend with spare rows (reserved with
/// the run's capacity, or with one row so that they are re-laid out at
/// every power of two; appended in place) give exactly the outputs of caches the
/// session keeps and binds densely every step: same kernels, same
/// arithmetic, only the row stride differs.
#[test]
fn backend_kept_caches_decode_exactly_like_bound_caches() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "kept");
    let (base, bif) = tiny_artifacts(&libdevice, &dir);
    let manifest = bifurc_runtime::Artifact::load(&base).unwrap().manifest;
    let weights = random_weights(&manifest, 9).unwrap();
    // bf16 storage: the backend keeps the caches (and the weights) as
    // bf16 bits, appending the new rows converted; the session binds f32
    // caches that the run converts. The same bits either way.
    let bf16 = write_artifact_as(&libdevice, &dir, "tiny", "bif16", true, "b=32,m_c=512,m_d=4", Some(DType::BF16));
    for (ptx, capacity) in [(&base, None), (&bif, None), (&bif, Some(1)), (&bf16, Some(1))] {
        let (fill_a, greedy_a, sampled_a, runs_a, _) = decode_with(ptx, &weights, true, capacity, 4);
        let (fill_b, greedy_b, sampled_b, runs_b) = decode(ptx, &weights, false);
        assert_eq!(fill_a, fill_b);
        assert_eq!(greedy_a.tokens, greedy_b.tokens);
        assert_eq!(sampled_a.tokens, sampled_b.tokens);
        assert_eq!(greedy_a.last_logits, greedy_b.last_logits);
        assert_eq!(runs_a.len(), runs_b.len());
        for (i, ((dims_a, out_a), (dims_b, out_b))) in runs_a.iter().zip(&runs_b).enumerate() {
            assert_eq!(dims_a, dims_b, "step {i}");
            assert_eq!(out_a, out_b, "step {i} of {}: outputs differ", ptx.display());
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each run of the decode loop reserves its decode caches afresh. All the
/// caches along `m_d` share one capacity, so keeping the fill's one-sample
/// caches (a row for each prompt token) gave sampling's b samples room for
/// that many rows: b times the context's bytes. The fill's go before its
/// context is bound, and sampling's have room for its own steps.
#[test]
fn each_run_reserves_decode_caches_for_its_own_rows() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "own-rows");
    let (_, bif) = tiny_artifacts(&libdevice, &dir);
    let (artifact, cpu) = bifurc::run::cpu_step(&bif).unwrap_or_else(|e| panic!("{e}"));
    let weights = random_weights(&artifact.manifest, 9).unwrap();
    let mut session = Session::new(cpu, &artifact.manifest).unwrap();
    session.bind_weights(&weights).unwrap();
    let decode: Vec<String> = session.layout().layers.iter().flat_map(|l| l.decode.clone()).collect();
    let prompt: Vec<u32> = (0..40).map(|t| t % 50 + 1).collect();
    for samples in [4, 2] {
        session.fill_context(&prompt).unwrap();
        assert!(decode.iter().all(|n| !session.step().is_bound(n)), "the fill's caches are released");
        let options = SampleOptions { samples, steps: 3, temperature: 0.0, seed: 1, keep_last_logits: false };
        session.sample(&options, |_| {}).unwrap();
        for name in &decode {
            let shape = &session.step().stored(name).unwrap_or_else(|| panic!("`{name}` kept")).shape;
            assert_eq!((shape[0], shape[2]), (samples, 3), "`{name}`: samples and rows of room");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `bifurc run` and checks that it fails with one line on stderr that
/// contains every one of `wants`, and exit status 1.
fn fails(args: &[&str], wants: &[&str]) {
    fails_as(bifurc(args), args, wants);
}

/// [`fails`] for command `cmd` (`bifurc` with `args`, and its environment).
fn fails_as(mut cmd: Command, args: &[&str], wants: &[&str]) {
    let out = cmd.output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: status {:?}, stderr:\n{stderr}", out.status);
    assert!(out.stdout.is_empty(), "{args:?}: stdout {}", text(&out.stdout));
    assert_eq!(stderr.lines().count(), 1, "{args:?}: not one line:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    for want in wants {
        assert!(stderr.contains(want), "{args:?}: `{want}` missing from: {stderr}");
    }
}

/// `run PTX EXTRA...`
fn run<'a>(ptx: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", ptx];
    args.extend_from_slice(extra);
    args
}

#[test]
fn run_errors_are_one_line() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "errors");
    let bif = write_artifact(&libdevice, &dir, "tiny", "bif", true, "b=32,m_c=512,m_d=4");
    let bif = bif.to_str().unwrap();
    // Valid flags (every case below fails before a step runs).
    let ok = ["--random-weights", "--prompt-ids", "1,2,3"];

    let missing = dir.join("missing.ptx");
    fails(&run(missing.to_str().unwrap(), &ok), &["missing.ptx"]);
    fails(&run(bif, &["--random-weights", "--prompt-ids", "1,x,3"]), &["--prompt-ids", "#2 `x`"]);
    fails(&run(bif, &["--random-weights", "--prompt-ids", ","]), &["empty"]);
    fails(&run(bif, &["--random-weights", "--prompt-ids", "-1"]), &["`-1`"]);
    fails(&run(bif, &["--random-weights", "--prompt-ids", "1,256"]), &["256", "outside", "vocabulary", "0..256"]);
    let ids_file = dir.join("nope.txt");
    fails(&run(bif, &["--random-weights", "--prompt-ids-file", ids_file.to_str().unwrap()]), &["nope.txt"]);
    std::fs::write(&ids_file, "[1, 2, 999]\n").unwrap();
    fails(&run(bif, &["--random-weights", "--prompt-ids-file", ids_file.to_str().unwrap()]), &["999", "vocabulary"]);
    fails(
        &run(bif, &["--weights", dir.join("w.safetensors").to_str().unwrap(), "--prompt-ids", "1"]),
        &["w.safetensors"],
    );
    std::fs::write(dir.join("bad.safetensors"), b"not a safetensors file").unwrap();
    fails(
        &run(bif, &["--weights", dir.join("bad.safetensors").to_str().unwrap(), "--prompt-ids", "1", "--steps", "1"]),
        &["bad.safetensors"],
    );
    fails(&run(bif, &[&ok[..], &["--samples", "0"]].concat()), &["--samples"]);
    fails(&run(bif, &[&ok[..], &["--steps", "0"]].concat()), &["--steps"]);
    fails(&run(bif, &[&ok[..], &["--temperature", "-1"]].concat()), &["--temperature"]);
    fails(&run(bif, &[&ok[..], &["--threads", "0"]].concat()), &["--threads must be at least 1"]);
    // A typo's million threads are refused, not started.
    fails(&run(bif, &[&ok[..], &["--threads", "1000000"]].concat()), &["--threads 1000000: at most", "cores"]);
    // Counts past i64 are refused in words, not wrapped or overflowed.
    let huge = u64::MAX.to_string();
    fails(&run(bif, &[&ok[..], &["--samples", &huge]].concat()), &["--samples 18446744073709551615: too many"]);
    let wants = ["18446744073709551615 positions", "use at most 16777217 tokens"];
    fails(&run(bif, &["--random-weights", "--context-len", "8", "--steps", &huge]), &wants);
    if !cfg!(feature = "cuda") {
        fails(&run(bif, &[&ok[..], &["--device", "cuda"]].concat()), &["--features cuda", "bifurc-run"]);
    }
    // Positions past 2^24 (not exact in the f32 that carries them); more
    // than a CPU buffer holds; and, where the host has less than 50 GB
    // available, more memory than it has (about 55 GB at b = 3000000; a
    // larger b would make the fused attention's partials, 576 elements a
    // sample here, more than a buffer holds): said before anything large
    // is allocated.
    let ctx = ["--random-weights", "--steps", "2", "--samples", "2", "--context-len"];
    let wants = ["the last, 17000001, is past 16777216 (2^24)", "use at most 16777217 tokens"];
    fails(&run(bif, &[&ctx[..], &["17000000"]].concat()), &wants);
    let samples = ["--random-weights", "--steps", "2", "--context-len", "8", "--samples"];
    let wants = ["`logits` of shape [9000000, 1, 256] is too large", "at most 2147483648 elements"];
    fails(&run(bif, &[&samples[..], &["9000000"]].concat()), &wants);
    if bifurc_runtime::memory::host_available().is_some_and(|n| n < 50_000_000_000) {
        let wants = [
            "not enough memory for the decode step at b = 3000000, m_c = 8, m_d = 1",
            "and a weight in f32 while it is bound",
            "GB available",
        ];
        fails(&run(bif, &[&samples[..], &["3000000"]].concat()), &wants);
    }
    // The CPU backend's override of the bf16 dot product, misspelt.
    let args = run(bif, &ok);
    let mut cmd = bifurc(&args);
    cmd.env("BIFURC_CPU_BF16_DOT", "yes");
    fails_as(cmd, &args, &["BIFURC_CPU_BF16_DOT=\"yes\"", "`auto`", "`on`", "`off`"]);
    // And of the fused context attention.
    let mut cmd = bifurc(&args);
    cmd.env("BIFURC_CPU_FUSED_ATTENTION", "yes");
    fails_as(cmd, &args, &["BIFURC_CPU_FUSED_ATTENTION=\"yes\"", "`auto`", "`on`", "`off`"]);
    // And of AMX tiles.
    let mut cmd = bifurc(&args);
    cmd.env("BIFURC_CPU_AMX", "tiles");
    fails_as(cmd, &args, &["BIFURC_CPU_AMX=\"tiles\"", "`auto`", "`on`", "`off`"]);

    // A multi-level artifact (runtime dims P, S, m_s, m_c, m_d).
    let multi = write_artifact(&libdevice, &dir, "multilevel", "multi", false, "P=4,S=8,m_s=2048,m_c=1024,m_d=256");
    fails(&run(multi.to_str().unwrap(), &ok), &["multi.manifest.json", "single-level"]);

    // No graph beside the PTX (an artifact from before the sidecar), and a
    // graph from another compile.
    for name in ["nograph", "other"] {
        for ext in ["ptx", "manifest.json"] {
            std::fs::copy(dir.join(format!("bif.{ext}")), dir.join(format!("{name}.{ext}"))).unwrap();
        }
    }
    fails(&run(dir.join("nograph.ptx").to_str().unwrap(), &ok), &["nograph.graph.json is missing"]);
    std::fs::copy(dir.join("multi.graph.json"), dir.join("other.graph.json")).unwrap();
    fails(&run(dir.join("other.ptx").to_str().unwrap(), &ok), &["other.graph.json does not match"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GPT-2 learns its positions (a table of `n_positions` rows, 128 in the
/// fixture's config): a context and decoded steps past it are a one-line
/// error before any work, naming the table, not NaN logits at the step
/// that crosses it; up to it the run decodes.
#[test]
fn learned_positions_bound_the_tokens() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "positions");
    let config = root().join("tests/fixtures/hf/gpt2/config.json");
    let (graph, ptx) = (dir.join("gpt2.json"), dir.join("gpt2.ptx"));
    let (graph, ptx) = (graph.to_str().unwrap(), ptx.to_str().unwrap());
    let libdevice = libdevice.to_str().unwrap();
    for args in [
        vec!["import-hf", config.to_str().unwrap(), "-o", graph],
        vec!["compile", graph, "-o", ptx, "--libdevice", libdevice],
    ] {
        let out = bifurc(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let wants = ["129 positions", "128 learned positions", "`transformer.wpe.weight`"];
    fails(&run(ptx, &["--random-weights", "--context-len", "120", "--steps", "9"]), &wants);
    fails(&run(ptx, &["--random-weights", "--prompt-ids", "1,2,3", "--steps", "126"]), &wants);
    let out =
        bifurc(&run(ptx, &["--random-weights", "--context-len", "120", "--steps", "8", "--json"])).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(samples_of(&json_of(&out))[0].len(), 8);
    // A prefill step of 3 tokens over 127 of the 128 positions: 42 runs,
    // then the last token in a run padded past the table's end (its
    // padding held at the last row, where a row past it would give NaN
    // keys that no mask hides): the tokens and logits of stepping.
    let (pre_graph, pre_ptx) = (dir.join("gpt2-pre.json"), dir.join("gpt2-pre.ptx"));
    let (pre_graph, pre_ptx) = (pre_graph.to_str().unwrap(), pre_ptx.to_str().unwrap());
    for args in [
        vec!["import-hf", config.to_str().unwrap(), "--new-tokens", "3", "-o", pre_graph],
        vec!["compile", pre_graph, "-o", pre_ptx, "--libdevice", libdevice],
    ] {
        let out = bifurc(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let ids: Vec<String> = (0..127).map(|i| ((i * 7 + 1) % 50).to_string()).collect();
    let ids = ids.join(",");
    let greedy = ["--random-weights", "--prompt-ids", &ids, "--steps", "1", "--samples", "2", "--temperature", "0"];
    let greedy = [&greedy[..], &["--json", "--logits"]].concat();
    let stepped = bifurc(&run(ptx, &greedy)).output().unwrap();
    let prefilled = bifurc(&run(ptx, &[&greedy[..], &["--prefill", pre_ptx]].concat())).output().unwrap();
    assert!(stepped.status.success() && prefilled.status.success(), "{}", text(&prefilled.stderr));
    let (a, b) = (json_of(&stepped), json_of(&prefilled));
    assert_eq!((&b["prefill"]["whole_runs"], &b["prefill"]["padded_tokens"]), (&42.into(), &1.into()));
    assert_eq!(samples_of(&a), samples_of(&b));
    let logits = |v: &Value| -> Vec<f32> {
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap())
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (la, lb) = (logits(&a), logits(&b));
    assert!(lb.iter().all(|x| x.is_finite()), "NaN logits after a padded run past the table");
    assert!(rel_diff(&lb, &la) <= TOL, "logits differ by {:e}", rel_diff(&lb, &la));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_names_every_flag() {
    let out = bifurc(&["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--weights <FILE>...",
        "--random-weights",
        "--weights-seed",
        "--prompt-ids <IDS>",
        "--prompt-ids-file <FILE>",
        "--context-len <N>",
        "--samples",
        "--steps",
        "--temperature",
        "--seed",
        "--device",
        "--json",
        "--logits",
        "--host-caches",
        "--prefill <PTX>",
        "--threads <N>",
    ] {
        assert!(help.contains(flag), "`{flag}` missing from:\n{help}");
    }
}

/// A prefill step (examples/tiny imported with `--new-tokens 4`, and 8)
/// fills the context like stepping the decode step over the prompt: the
/// same caches and last logits (to f32 rounding, norm-relative 1e-4) and
/// the same greedy tokens after, for a prompt shorter than one chunk, a
/// whole number of chunks, and chunks plus a rest, run padded to a whole
/// chunk or stepped (under a quarter of a chunk).
#[test]
fn prefill_fills_the_context_like_stepping() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "prefill");
    let bif = write_artifact(&libdevice, &dir, "tiny", "bif", true, "b=32,m_c=512,m_d=4");
    let config = std::fs::read_to_string(root().join("examples/tiny/config.json")).unwrap();
    let opts = CompileOptions { libdevice: Some(libdevice.clone()), ..CompileOptions::default() };
    let manifest = bifurc_runtime::Artifact::load(&bif).unwrap().manifest;
    let weights = random_weights(&manifest, 5).unwrap();
    // The prefill step taking `n` tokens a run, its weights bound.
    let prefill_step = |n: usize| {
        let hf = bifurc::hf::HfOptions { new_tokens: Some(n), ..Default::default() };
        let doc = bifurc::hf::build(&config, &hf).unwrap_or_else(|e| panic!("import-hf --new-tokens {n}: {e}"));
        let ptx = dir.join(format!("pre{n}.ptx"));
        compile(&bifurc::import::from_value(&doc).unwrap(), &opts).unwrap().write(&ptx).unwrap();
        let (artifact, mut step) = bifurc::run::cpu_step(&ptx).unwrap();
        let layout = bifurc_runtime::session::DecodeLayout::from_manifest(&artifact.manifest).unwrap();
        assert_eq!(layout.n, n);
        for name in &layout.weights {
            step.bind(name, &weights[name]).unwrap();
        }
        (ptx, step, layout)
    };
    let session = || {
        let (artifact, cpu) = bifurc::run::cpu_step(&bif).unwrap();
        let mut s = Session::new(cpu, &artifact.manifest).unwrap();
        s.bind_weights(&weights).unwrap();
        s
    };
    let (mut stepped, mut prefilled) = (session(), session());
    let options = SampleOptions { samples: 4, steps: 4, temperature: 0.0, seed: 1, keep_last_logits: false };
    let (mut splits, mut pre4) = (Vec::new(), None);
    // n = 4: a rest is always padded; n = 8: one of 1 token is stepped.
    for (n, lens) in [(4, &[3, 8, 10, 13][..]), (8, &[1, 9, 11][..])] {
        let (ptx, mut pre, pre_layout) = prefill_step(n);
        for &len in lens {
            let prompt: Vec<u32> = (0..len).map(|i| (7 * i + 3) % 256).collect();
            let chunks = pre_layout.prefill_chunks(len as usize);
            splits.push((chunks.padded > 0, chunks.stepped > 0));
            // Progress: the context's length after each step, and after each
            // prefill run (whole chunks, a padded one) then each step of the rest.
            let mut told = Vec::new();
            let a = stepped.fill_context_with(&prompt, |n| told.push(n)).unwrap();
            assert_eq!(told, (1..=len as usize).collect::<Vec<_>>(), "prompt of {len}: stepping's progress");
            // The context kept in the prefill step (appended in place), then
            // bound from the host every chunk: the same.
            let mut told = Vec::new();
            let b = prefilled.fill_context_prefill_with(&mut pre, &pre_layout, &prompt, |n| told.push(n)).unwrap();
            let done = chunks.whole + chunks.padded;
            let want: Vec<usize> = (n..=chunks.whole)
                .step_by(n)
                .chain((chunks.padded > 0).then_some(done))
                .chain(done + 1..=len as usize)
                .collect();
            assert_eq!(told, want, "n = {n}, prompt of {len}: prefill's progress");
            let held = pre_layout.layers.iter().flat_map(|l| &l.context).filter(|n| pre.is_bound(n)).count();
            assert_eq!(held, 0, "n = {n}, prompt of {len}: the prefill step lets go of the context it kept, once read");
            let kept = prefilled.context().unwrap().clone();
            let b2 = prefilled.fill_context_prefill(&mut BoundCaches(&mut pre), &pre_layout, &prompt).unwrap();
            assert_eq!(b, b2, "n = {n}, prompt of {len}: kept vs bound prefill logits");
            assert_eq!(&kept, prefilled.context().unwrap(), "n = {n}, prompt of {len}: kept vs bound prefill context");
            assert!(rel_diff(&b, &a) <= TOL, "n = {n}, prompt of {len}: last logits differ by {:e}", rel_diff(&b, &a));
            let (ca, cb) = (stepped.context().unwrap(), prefilled.context().unwrap());
            assert_eq!(ca.len, cb.len);
            for (la, lb) in ca.caches.iter().zip(&cb.caches) {
                for (ta, tb) in la.iter().zip(lb) {
                    assert_eq!(ta.shape, tb.shape);
                    let d = rel_diff(&tb.data, &ta.data);
                    assert!(d <= TOL, "n = {n}, prompt of {len}: context caches differ by {d:e}");
                }
            }
            let ta = stepped.sample(&options, |_| {}).unwrap().tokens;
            let tb = prefilled.sample(&options, |_| {}).unwrap().tokens;
            assert_eq!(ta, tb, "n = {n}, prompt of {len}: greedy tokens");
        }
        if n == 4 {
            pre4 = Some((ptx, pre_layout));
        }
    }
    // Both ways of taking the rest were run.
    assert!(splits.contains(&(true, false)) && splits.contains(&(false, true)), "{splits:?}");
    let Some((pre_ptx, pre_layout)) = pre4 else { panic!("no n = 4 prefill step") };
    // A decode step is not a prefill step, a prefill step not a decode step.
    let ok = ["--random-weights", "--prompt-ids", "1,2,3", "--device", "cpu"];
    let (bif_s, pre_s) = (bif.to_str().unwrap(), pre_ptx.to_str().unwrap());
    fails(&run(bif_s, &[&ok[..], &["--prefill", bif_s]].concat()), &["--prefill wants a step with n > 1"]);
    fails(&run(pre_s, &ok), &["prefill step", "not a decode step"]);
    let random = ["--random-weights", "--context-len", "5", "--device", "cpu", "--prefill", pre_s];
    fails(&run(bif_s, &random), &["--prefill", "--context-len"]);
    // A prefill step of another model (one layer instead of two): said
    // of its manifest, before its step is compiled or a weight is bound.
    let one_layer = bifurc::hf::HfOptions { layers: Some(1), new_tokens: Some(4), ..Default::default() };
    let doc = bifurc::hf::build(&config, &one_layer).unwrap();
    let other = dir.join("other.ptx");
    compile(&bifurc::import::from_value(&doc).unwrap(), &opts).unwrap().write(&other).unwrap();
    fails(
        &run(bif_s, &[&ok[..], &["--prefill", other.to_str().unwrap()]].concat()),
        &["other.manifest.json: the prefill step is not the same model"],
    );
    // Through the CLI: the f32 prefill step shares every weight with the
    // decode step; one stored in bf16 shares none and binds its own.
    let greedy =
        ["--random-weights", "--prompt-ids", "1,2,3,4,5,6,7,8,9", "--samples", "2", "--temperature", "0", "--json"];
    let bf16 =
        bifurc::hf::HfOptions { new_tokens: Some(4), dtype: Some(bifurc::ir::DType::BF16), ..Default::default() };
    let doc = bifurc::hf::build(&config, &bf16).unwrap();
    let pre16 = dir.join("pre16.ptx");
    compile(&bifurc::import::from_value(&doc).unwrap(), &opts).unwrap().write(&pre16).unwrap();
    let weights = pre_layout.weights.len();
    for (prefill, shared) in [(pre_s, weights), (pre16.to_str().unwrap(), 0)] {
        let out = bifurc(&run(bif_s, &[&greedy[..], &["--prefill", prefill]].concat())).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let report = json_of(&out);
        assert_eq!(report["prefill"]["shared_weights"], shared, "--prefill {prefill}");
        // 9 tokens: two runs of 4, the last token in one more, padded.
        let runs = &report["prefill"];
        assert_eq!((&runs["n"], &runs["whole_runs"], &runs["padded_tokens"]), (&4.into(), &2.into(), &1.into()));
        assert_eq!(runs["stepped_tokens"], 0);
        assert_eq!(report["context"], "prompt, prefilled");
        assert_eq!(samples_of(&report).len(), 2);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Any sequence of the session's calls over the real CPU step (decode
/// caches kept in the backend, released and reserved between runs; a
/// context bound with or without a host copy; one step handed from
/// session to session, as an engine would) returns, an error or a result,
/// and never panics. Sampling gives `samples` rows of `steps` tokens, and
/// greedy sampling from a context gives the tokens it gave the last time.
/// Contexts are filled by stepping, by a prefill step of 3 tokens a run
/// (whole runs and padded ones) or drawn. A fixed SplitMix64 sequence
/// of 200 sessions of 10 calls.
#[test]
fn any_sequence_of_session_calls_returns() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = common::scratch("run-cpu", "sequences");
    let (_, bif) = tiny_artifacts(&libdevice, &dir);
    let (artifact, cpu) = bifurc::run::cpu_step(&bif).unwrap();
    let weights = random_weights(&artifact.manifest, 3).unwrap();
    let config = std::fs::read_to_string(root().join("examples/tiny/config.json")).unwrap();
    let doc = bifurc::hf::build(&config, &bifurc::hf::HfOptions { new_tokens: Some(3), ..Default::default() }).unwrap();
    let pre_ptx = dir.join("pre3.ptx");
    let opts = CompileOptions { libdevice: Some(libdevice.clone()), ..CompileOptions::default() };
    compile(&bifurc::import::from_value(&doc).unwrap(), &opts).unwrap().write(&pre_ptx).unwrap();
    let (pre_artifact, mut pre) = bifurc::run::cpu_step(&pre_ptx).unwrap();
    let pre_layout = bifurc_runtime::session::DecodeLayout::from_manifest(&pre_artifact.manifest).unwrap();
    for name in &pre_layout.weights {
        pre.bind(name, &weights[name]).unwrap();
    }
    let prefill_prompts: [&[u32]; 6] = [&[], &[5], &[7, 300], &[1, 2, 3], &[1, 2, 3, 4], &[9, 8, 7, 6, 5, 4, 3]];
    let mut prefilled = 0;
    let mut rng = SplitMix64::new(0x5E55_1011);
    let mut next = |n: usize| rng.below(n as u64) as usize;
    let prompts: [&[u32]; 4] = [&[], &[5], &[7, 300], &[1, 2, 3]];
    // Greedy tokens by (context, samples, steps), to compare repeats.
    let mut greedy: HashMap<(String, usize, usize), Vec<Vec<u32>>> = HashMap::new();
    let (mut sampled, mut repeated, mut refused) = (0, 0, 0);
    let mut step = Some(cpu);
    for case in 0..200 {
        let Some(cpu) = step.take() else { break };
        let mut session = Session::new(cpu, &artifact.manifest).unwrap();
        // The session's context, where one was installed ("" for none).
        let mut context = String::new();
        for call in 0..10 {
            let what = next(8);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match what {
                0 => session.bind_weights(&weights).map(|_| None),
                1 => {
                    let prompt = prompts[next(prompts.len())];
                    let r = session.fill_context(prompt);
                    context = if r.is_ok() { format!("prompt {prompt:?}") } else { String::new() };
                    r.map(|_| None)
                }
                2 => {
                    let (len, seed) = ([0, 6][next(2)], next(2) as u64);
                    let r = session.random_context(len, seed);
                    context = if r.is_ok() { format!("random {len} {seed}") } else { String::new() };
                    r.map(|_| None)
                }
                3 => session.keep_host_context(next(2) == 0).map(|_| None),
                4 => {
                    let _ = session.step_mut();
                    Ok(None)
                }
                5 => {
                    let prompt = prefill_prompts[next(prefill_prompts.len())];
                    let r = session.fill_context_prefill(&mut pre, &pre_layout, prompt);
                    prefilled += usize::from(r.is_ok());
                    context = if r.is_ok() { format!("prefilled {prompt:?}") } else { String::new() };
                    r.map(|_| None)
                }
                _ => {
                    let temperature = [0.0, 0.0, 0.8, -1.0][next(4)];
                    let (samples, steps) = (next(3), next(3));
                    let options = SampleOptions { samples, steps, temperature, seed: 1, keep_last_logits: false };
                    let key = (context.clone(), samples, steps);
                    session.sample(&options, |_| {}).map(|out| Some((options, out, key)))
                }
            }));
            let Ok(result) = result else { panic!("case {case}, call {call} ({what}) panicked") };
            match result {
                Ok(Some((options, out, key))) => {
                    sampled += 1;
                    assert_eq!(out.tokens.len(), options.samples, "case {case}");
                    assert!(out.tokens.iter().all(|t| t.len() == options.steps), "case {case}");
                    if options.temperature == 0.0 && !key.0.is_empty() {
                        if let Some(before) = greedy.get(&key) {
                            repeated += 1;
                            assert_eq!(&out.tokens, before, "case {case}, call {call}: {key:?}");
                        }
                        greedy.insert(key, out.tokens);
                    }
                }
                Ok(None) => {}
                Err(_) => refused += 1,
            }
        }
        step = Some(session.into_step());
    }
    assert!(
        sampled > 20 && refused > 20 && repeated > 10 && prefilled > 20,
        "sampled {sampled}, refused {refused}, repeated {repeated}, prefilled {prefilled}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
