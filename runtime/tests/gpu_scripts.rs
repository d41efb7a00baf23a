//! The scripts that sum up a GPU machine's run (scripts/gpu-check.sh runs
//! them there, once, on what `bifurc-run bench` wrote) read what this crate
//! writes: they are run here on the manifests the compiler makes for that
//! run (tests/fixtures/llama-2-7b-l2) and on profiles and bench tables
//! written by this crate's own writers, with device times made up from the
//! bytes model at a chosen bandwidth, so that what they must conclude is
//! known. Needs `python3` (scripts/setup.sh needs it too); no GPU.

use bifurc_runtime::bench::{profile_csv, profile_dims_json, step_bytes, write_csv, BenchRow, Measurement, ProfileRow};
use bifurc_runtime::manifest::Manifest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// H100 SXM's datasheet bandwidth in `attention_targets.py`, bytes/s.
const H100: f64 = 3.35e12;
const DEVICE: &str = "NVIDIA H100 80GB HBM3";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest_path(which: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/llama-2-7b-l2/llama-2-7b-l2-{which}.manifest.json"))
}

fn load(which: &str) -> Manifest {
    Manifest::load(manifest_path(which)).unwrap_or_else(|e| panic!("{which}: {e}"))
}

/// gpu-check's largest bench shape, where it takes the profiles.
fn dims() -> BTreeMap<String, i64> {
    BTreeMap::from([("b".into(), 32), ("m_c".into(), 8192), ("m_d".into(), 256)])
}

/// An empty directory of a test's own, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("bifurc-gpu-scripts-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    Scratch(dir)
}

/// Every kernel of `m` at `dims`, each taking its bytes' time at `bandwidth`
/// (bytes/s), as the CSV `bifurc-run bench` writes.
fn profile(m: &Manifest, dims: &BTreeMap<String, i64>, bandwidth: f64) -> String {
    let ms: Vec<f64> = m
        .kernels
        .iter()
        .map(|k| m.eval(&k.bytes.total, dims).unwrap_or_else(|e| panic!("{}: {e}", k.name)) as f64 / bandwidth * 1e3)
        .collect();
    let rows: Vec<ProfileRow> = m
        .kernels
        .iter()
        .zip(&ms)
        .map(|(k, &ms)| ProfileRow { kernel: &k.name, entry: &k.entry, op: &k.op, ms })
        .collect();
    profile_csv(&rows)
}

/// Runs `python3 scripts/<script> args`: its exit status and stdout (it
/// must not have raised).
fn python(script: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("python3")
        .arg(repo().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python3 (which scripts/setup.sh needs too): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("Traceback"), "{script} raised:\n{stdout}\n{stderr}");
    (out.status.code().unwrap_or(-1), stdout)
}

/// A bench directory holding the bifurcated profile at `bandwidth`.
fn bench_dir(name: &str, bandwidth: f64) -> Scratch {
    let dir = scratch(name);
    let write = |file: &str, text: String| {
        std::fs::write(dir.join(file), text).unwrap_or_else(|e| panic!("{file}: {e}"));
    };
    write("profile-dims.json", profile_dims_json(&dims()));
    write("profile-bifurcated.csv", profile(&load("bif"), &dims(), bandwidth));
    dir
}

fn targets(bench: &Path, torch: Option<&Path>) -> (i32, String) {
    let (bench, manifest) = (bench.to_string_lossy(), manifest_path("bif"));
    let manifest = manifest.to_string_lossy();
    let mut args = vec!["--bench", &bench, "--manifest", &manifest, "--device", DEVICE];
    let torch = torch.map(|t| t.to_string_lossy().into_owned());
    if let Some(t) = &torch {
        args.extend(["--torch", t.as_str()]);
    }
    python("attention_targets.py", &args)
}

/// Target 1 (the attention within 2x of the HBM time for its bytes) is met
/// at 2.5 TB/s (1.34x of the H100's 3.35) and not at 1 TB/s (3.35x); the
/// per-kernel table names the split attention's kernels.
#[test]
fn attention_targets_read_the_manifest_and_the_profile() {
    let fast = bench_dir("fast", 2.5e12);
    let (code, out) = targets(&fast, None);
    assert_eq!(code, 0, "{out}");
    let ratio = H100 / 2.5e12;
    assert!(out.contains(&format!("measured {ratio:.2}x of it: **met**")), "{out}");
    assert!(out.contains("over 2 layers"), "{out}");
    for kernel in ["attn_scores_einsum1", "attn_probs", "attn_context_einsum1_combine"] {
        assert!(out.lines().any(|l| l.starts_with(&format!("| {kernel} |"))), "{kernel} missing:\n{out}");
    }
    assert!(!out.contains("target 2"), "no PyTorch table, no target 2:\n{out}");

    let slow = bench_dir("slow", 1.0e12);
    let (code, out) = targets(&slow, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("measured {:.2}x of it: **not met**", H100 / 1.0e12)), "{out}");
}

/// Target 2 (faster than PyTorch's SDPA over the expanded cache at b >= 16)
/// from torch_attention_bench.py's CSV at the profile's shape: one layer's
/// attention against SDPA's time.
#[test]
fn attention_targets_compare_one_layer_with_sdpa() {
    let bench = bench_dir("sdpa", 2.5e12);
    let m = load("bif");
    // One layer's attention kernels at 2.5 TB/s, as the script picks them.
    let sites: Vec<&str> = m.attention.iter().map(|a| a.node.as_str()).collect();
    let attention: f64 = m
        .kernels
        .iter()
        .filter(|k| k.op == "softmax" || sites.iter().any(|s| k.node == *s || k.node.starts_with(&format!("{s}."))))
        .map(|k| m.eval(&k.bytes.total, &dims()).unwrap_or(0) as f64 / 2.5e12 * 1e3)
        .sum::<f64>()
        / 2.0;
    let header = "b,m_c,m_d,standard_ms,bifurcated_ms,speedup,predicted_speedup,standard_kv_bytes,\
                  bifurcated_kv_bytes,standard_gbps,bifurcated_gbps,max_abs_diff,allclose,note";
    for (sdpa, code, verdict) in [(attention * 3.0, 0, "**met**"), (attention / 3.0, 1, "**not met**")] {
        let csv = bench.join("torch_attention.csv");
        let row = format!("32,8192,256,{sdpa},,,,,,,,,,\n16,8192,256,1.0,,,,,,,,,,\n");
        std::fs::write(&csv, format!("{header}\n{row}")).unwrap_or_else(|e| panic!("{e}"));
        let (got, out) = targets(&bench, Some(&csv));
        assert_eq!(got, code, "{out}");
        let line = out.lines().find(|l| l.contains("target 2")).unwrap_or_default();
        assert!(line.contains(&format!("vs SDPA {sdpa:.3} ms")) && line.ends_with(verdict), "{out}");
    }
    // A table without the profile's shape: target 2 is not evaluated.
    let csv = bench.join("torch_attention.csv");
    std::fs::write(&csv, format!("{header}\n16,8192,256,1.0,,,,,,,,,,\n")).unwrap_or_else(|e| panic!("{e}"));
    let (got, out) = targets(&bench, Some(&csv));
    assert_eq!(got, 0, "{out}");
    assert!(out.contains("- target 2: no SDPA time at b=32, m_c=8192, m_d=256 with b >= 16"), "{out}");
}

/// No profile (the bench did not reach it): exit status 2, saying so.
#[test]
fn attention_targets_without_a_profile_evaluate_nothing() {
    let empty = scratch("empty");
    let (code, out) = targets(&empty, None);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no profile"), "{out}");
}

/// The tuning sweep's summary reads the variants file (its format:
/// scripts/tuning-variants.txt) and each variant's bench table (this
/// crate's `write_csv`) and profiles: a variant 10% faster is suggested,
/// one 1% faster is not, one that did not run says so.
#[test]
fn tuning_summary_reads_the_bench_tables() {
    let dir = scratch("tune");
    let (bif, d) = (load("bif"), dims());
    let variants = "# name  settings\nfaster  stage=off,unroll=8  # a comment\nsame  unroll=2\nmissing  stage-b=on\n";
    std::fs::write(dir.join("variants.txt"), variants).unwrap_or_else(|e| panic!("{e}"));
    for (name, variant_ms) in [("faster", 10.0), ("same", 10.89)] {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("{e}"));
        let row = BenchRow {
            b: 32,
            m_c: 8192,
            m_d: 256,
            baseline: Measurement::Timed(vec![11.0]),
            bifurcated: Measurement::Timed(vec![variant_ms]),
            baseline_bytes: step_bytes(&bif, &d).unwrap_or_else(|e| panic!("{e}")),
            bifurcated_bytes: step_bytes(&bif, &d).unwrap_or_else(|e| panic!("{e}")),
            logits_max_abs_diff: Some(0.0),
            logits_max_abs: Some(1.0),
        };
        std::fs::write(sub.join("bench.csv"), write_csv(&[row])).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(sub.join("profile-baseline.csv"), profile(&bif, &d, 2.0e12)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(sub.join("profile-bifurcated.csv"), profile(&bif, &d, 2.2e12)).unwrap_or_else(|e| panic!("{e}"));
    }
    let out = dir.join("tune.md");
    let (v, o) = (dir.join("variants.txt").to_string_lossy().into_owned(), out.to_string_lossy().into_owned());
    let (code, text) = python("tuning_summary.py", &["--variants", &v, "--dir", &dir.to_string_lossy(), "--out", &o]);
    assert_eq!(code, 0, "{text}");
    let md = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(md.trim_end(), text.trim_end(), "the file and stdout differ");
    assert!(md.contains("| faster | `stage=off,unroll=8` | 32 | 8192 | 11.0000 | 10.0000 | 1.100 |"), "{md}");
    assert!(md.contains("| missing | `stage-b=on` | | | | | not run | |"), "{md}");
    assert!(md.contains("- `faster` (`stage=off,unroll=8`) is 1.10x the default"), "{md}");
    assert!(!md.contains("- `same`"), "{md}");
    assert!(md.contains("Try `bifurc compile --tune stage=off,unroll=8`"), "{md}");
    // Both profiles summed over layers: the variant's kernels 2.2/2.0 = 1.10x.
    assert!(md.lines().any(|l| l.starts_with("| faster | attn_scores_einsum1 |") && l.ends_with("| 1.10 |")), "{md}");
}
