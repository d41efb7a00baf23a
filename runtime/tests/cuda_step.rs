//! The CUDA backend on a device: decode caches kept on the device — reserved
//! with room for one row, so every fill and sampling run grows them
//! (re-laid out with 2-D device copies) and appends each step's rows in
//! place — decode exactly like caches uploaded from the host every step.
//! Same kernels, same arithmetic; only the row stride differs, so tokens
//! and logits must be identical.
//!
//! Built with `--features cuda` (CI compiles it); it runs where a CUDA
//! driver and device exist and says it skipped otherwise, unless
//! `BIFURC_REQUIRE_GPU=1`, which makes no usable device a failure.
//! scripts/prepare-gpu-carry.sh carries the test binary and
//! scripts/gpu-check.sh runs it from the repository root on the GPU machine,
//! with that set: there a skip would hide that the device is not usable.
#![cfg(feature = "cuda")]

use bifurc_runtime::cuda::{driver_available, CudaStep};
use bifurc_runtime::session::{SampleOptions, Session};
use bifurc_runtime::weights::bind_random_weights;
use bifurc_runtime::{Artifact, BoundCaches, HostTensor, Step, StepError};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// examples/tiny compiled (the fixture), found from the crate or from the
/// repository root (where the carried binary runs).
fn fixture() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.ptx");
    if here.exists() {
        here
    } else {
        PathBuf::from("runtime/tests/fixtures/tiny/step.ptx")
    }
}

/// Reserves every cache with room for one row: the growth path runs at
/// every power of two.
struct OneRow<S>(S);

impl<S: Step> Step for OneRow<S> {
    fn runtime_dims(&self) -> Vec<String> {
        self.0.runtime_dims()
    }

    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
        self.0.bind(name, tensor)
    }

    fn run_selected(
        &mut self,
        dims: &BTreeMap<String, i64>,
        wanted: Option<&[&str]>,
    ) -> Result<HashMap<String, HostTensor>, StepError> {
        self.0.run_selected(dims, wanted)
    }

    fn reserve_rows(&mut self, name: &str, shape: &[usize], _capacity: usize) -> Result<bool, StepError> {
        self.0.reserve_rows(name, shape, 1)
    }

    fn append_rows(&mut self, name: &str, rows: &str) -> Result<(), StepError> {
        self.0.append_rows(name, rows)
    }

    fn read_rows(&mut self, name: &str) -> Result<HostTensor, StepError> {
        self.0.read_rows(name)
    }
}

/// What [`decode`] saw.
#[derive(Debug, PartialEq)]
struct Decoded {
    fill: Vec<f32>,
    greedy: Vec<Vec<u32>>,
    greedy_logits: Option<HostTensor>,
    sampled: Vec<Vec<u32>>,
}

/// Greedy from a 5-token prompt, then sampled from a 7-token random
/// context.
fn decode(step: Box<dyn Step>, artifact: &Artifact) -> Decoded {
    let mut session = Session::new(step, &artifact.manifest).unwrap();
    bind_random_weights(session.step_mut(), &artifact.manifest, 3).unwrap();
    let fill = session.fill_context(&[1, 2, 3, 4, 5]).unwrap();
    let options = SampleOptions { samples: 4, steps: 6, temperature: 0.0, seed: 1, keep_last_logits: true };
    let greedy = session.sample(&options, |_| {}).unwrap();
    session.random_context(7, 11).unwrap();
    let sampled = session.sample(&SampleOptions { temperature: 0.8, ..options }, |_| {}).unwrap();
    Decoded { fill, greedy: greedy.tokens, greedy_logits: greedy.last_logits, sampled: sampled.tokens }
}

/// Says why the test cannot run, and skips it, or fails it where
/// `BIFURC_REQUIRE_GPU=1` asks for a device.
fn skip(why: &str) {
    assert!(std::env::var("BIFURC_REQUIRE_GPU").as_deref() != Ok("1"), "BIFURC_REQUIRE_GPU=1, but {why}");
    eprintln!("{why}: skipped");
}

#[test]
fn device_kept_caches_decode_like_host_caches() {
    if !driver_available() {
        return skip("no CUDA driver");
    }
    let artifact = Artifact::load(fixture()).unwrap();
    let kept = match CudaStep::new(&artifact, 0) {
        Ok(step) => step,
        Err(e) => return skip(&format!("no usable CUDA device ({e})")),
    };
    let host = CudaStep::new(&artifact, 0).unwrap();
    let a = decode(Box::new(OneRow(kept)), &artifact);
    let b = decode(Box::new(BoundCaches(host)), &artifact);
    assert_eq!(a.fill, b.fill, "fill logits");
    assert_eq!(a.greedy, b.greedy, "greedy tokens");
    assert_eq!(a.greedy_logits, b.greedy_logits, "greedy last logits");
    assert_eq!(a.sampled, b.sampled, "sampled tokens");
    assert!(a.greedy.iter().all(|s| s == &a.greedy[0]), "greedy samples from one context agree");
    eprintln!("kept (grown from 1 row) and host caches agree: tokens {:?}", a.greedy[0]);
}
