//! Faithfulness to the real model: for small random-weight checkpoints made
//! with Hugging Face transformers' own model code (scripts/make_hf_fixtures.py;
//! committed under tests/fixtures/hf/ with the reference ids and logits, so CI
//! needs no torch), `bifurc import-hf` + `bifurc compile` + `bifurc run
//! --weights model.safetensors` reproduces transformers' greedy continuation
//! exactly and its logits within 1e-4 (norm-relative: max|a-b| <= 1e-4 *
//! max|ref|), bifurcated and not, and with the context filled by a prefill
//! step (`import-hf --new-tokens 3`: the 7-token prompt in two chunks of 3
//! and one more run padded to 3).

mod common;

use bifurc::hf::{build, HfOptions};
use bifurc::inspect::ShapePoint;
use bifurc::{compile, CompileOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

const STEPS: usize = 5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("expected an array: {v}")).iter().filter_map(|x| x.as_f64()).collect()
}

fn check(name: &str) {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let dir = fixture(name);
    let reference = json(&dir.join("reference.json"));
    let prompt: Vec<String> = numbers(&reference["prompt"]).iter().map(|x| (*x as i64).to_string()).collect();
    let generated: Vec<f64> = numbers(&reference["generated"]);
    let expected_logits = numbers(&reference["logits"][STEPS]);
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let doc = build(&config, &HfOptions::default()).unwrap_or_else(|e| panic!("{name}: import-hf: {e}"));
    let graph = bifurc::import::from_value(&doc).expect("generated graph imports");
    let out = common::scratch("hf", name);
    // The prefill step: the same model with 3 new tokens per run.
    let doc3 = build(&config, &HfOptions { new_tokens: Some(3), ..HfOptions::default() })
        .unwrap_or_else(|e| panic!("{name}: import-hf --new-tokens 3: {e}"));
    let graph3 = bifurc::import::from_value(&doc3).expect("generated prefill graph imports");
    let prefill_opts = CompileOptions { libdevice: Some(libdevice.clone()), ..CompileOptions::default() };
    let prefill = out.join("prefill.ptx");
    compile(&graph3, &prefill_opts)
        .unwrap_or_else(|e| panic!("{name}: compile prefill: {e}"))
        .write(&prefill)
        .expect("write prefill artifact");
    for (bifurcate, with_prefill) in [(false, false), (true, false), (true, true)] {
        let opts = CompileOptions {
            point: ShapePoint::parse("b=64,m_c=4096,m_d=64").expect("point"),
            bifurcate,
            libdevice: Some(libdevice.clone()),
            ..CompileOptions::default()
        };
        let artifact = compile(&graph, &opts).unwrap_or_else(|e| panic!("{name}: compile: {e}"));
        if bifurcate {
            let report = artifact.report.as_ref().expect("an optimizer report");
            assert!(report.rewritten() > 0, "{name}: the forcing point bifurcates attention");
        }
        let ptx = out.join(format!("step-{bifurcate}.ptx"));
        artifact.write(&ptx).expect("write artifact");
        let mut run = Command::new(env!("CARGO_BIN_EXE_bifurc"));
        run.arg("run");
        if with_prefill {
            run.arg("--prefill").arg(&prefill);
        }
        let run = run
            .arg(&ptx)
            .arg("--weights")
            .arg(dir.join("model.safetensors"))
            .args(["--prompt-ids", &prompt.join(","), "--samples", "2", "--steps", &STEPS.to_string()])
            .args(["--temperature", "0", "--device", "cpu", "--json", "--logits"])
            .output()
            .expect("run bifurc");
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let got: serde_json::Value = serde_json::from_slice(&run.stdout).expect("--json output");
        for sample in got["samples"].as_array().expect("samples") {
            assert_eq!(numbers(sample), generated[..STEPS], "{name} ({bifurcate}, {with_prefill}): greedy ids");
        }
        // The last step's logits: those transformers used to pick token STEPS.
        let logits = numbers(&got["logits"][0]);
        assert_eq!(logits.len(), expected_logits.len(), "{name}: vocab");
        let scale = expected_logits.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = logits.iter().zip(&expected_logits).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "{name} ({bifurcate}, {with_prefill}): logits differ by {err} (scale {scale})");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn llama_grouped_query_matches_transformers() {
    check("llama");
}

#[test]
fn gpt2_matches_transformers() {
    check("gpt2");
}

#[test]
fn gpt_bigcode_multi_query_matches_transformers() {
    check("gpt_bigcode");
}
