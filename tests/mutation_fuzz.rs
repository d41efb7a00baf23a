//! No panic on a user's file, however it is broken: the examples' model.json,
//! HF config.json and an artifact's manifest, each mutated a few places at
//! a time (a number made 0, -1, huge or `i64::MIN`, a string swapped for
//! another of the document's, an array element dropped, duplicated or
//! swapped, a key removed, a value made null), go through everything that
//! reads them: import, the bytes model, the optimizer, the interpreter,
//! planning and MLIR emission for both targets (model.json); `import-hf`'s
//! builder (config.json); the manifest's validation, launch plan, sizes and
//! launches at a few points (manifest). Each must return, an error or a
//! result; a panic fails the test, naming the mutations and the file
//! written with the document. Debug builds (`cargo test`) also catch
//! integer overflow this way.
//!
//! Deterministic: the mutations follow a fixed seed. `BIFURC_FUZZ_CASES=N`
//! runs N documents per example (default 100; thousands find more) and
//! `BIFURC_FUZZ_SEED` another sequence.

mod common;

use bifurc::ir::Graph;
use serde_json::Value;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The path (keys and indices) of every value in `v`, `v` itself first.
fn paths(v: &Value, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    let children: Vec<(String, &Value)> = match v {
        Value::Array(a) => a.iter().enumerate().map(|(i, x)| (i.to_string(), x)).collect(),
        Value::Object(o) => o.iter().map(|(k, x)| (k.clone(), x)).collect(),
        _ => Vec::new(),
    };
    for (key, child) in children {
        here.push(key);
        paths(child, here, out);
        here.pop();
    }
}

fn at<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |cur, k| match cur {
        Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
        Value::Object(o) => o.get_mut(k),
        _ => None,
    })
}

/// Every string and key of `v`: what a mutation swaps a string for.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push(k.clone());
            strings(x, out)
        }),
        _ => {}
    }
}

/// Mutates one value of `v`; returns what it did, where.
fn mutate(v: &mut Value, rng: &mut Rng, pool: &[String]) -> String {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = all[rng.below(all.len())].clone();
    let Some(node) = at(v, &path) else { return "nothing".into() };
    let numbers: [Value; 12] = [
        0.into(),
        (-1).into(),
        1.into(),
        2.into(),
        3.into(),
        7.into(),
        (1i64 << 40).into(),
        i64::MAX.into(),
        i64::MIN.into(),
        0.5.into(),
        1e300.into(),
        u64::MAX.into(),
    ];
    let what = match (rng.below(6), &mut *node) {
        (0, _) => {
            *node = numbers[rng.below(numbers.len())].clone();
            "a number"
        }
        (1, _) => {
            *node = Value::String(pool[rng.below(pool.len())].clone());
            "another string"
        }
        (2, _) => {
            let odd = [Value::Null, true.into(), Value::Object(Default::default()), Value::Array(vec![]), "".into()];
            *node = odd[rng.below(odd.len())].clone();
            "an odd value"
        }
        (_, Value::Array(a)) if !a.is_empty() => {
            let (i, j) = (rng.below(a.len()), rng.below(a.len()));
            match rng.below(3) {
                0 => {
                    a.remove(i);
                    "an element removed"
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(j, x);
                    "an element duplicated"
                }
                _ => {
                    a.swap(i, j);
                    "two elements swapped"
                }
            }
        }
        (_, Value::Object(o)) if !o.is_empty() => {
            if let Some(k) = o.keys().nth(rng.below(o.len())).cloned() {
                o.shift_remove(&k);
            }
            "a key removed"
        }
        (_, Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                *node = [i.saturating_add(1), i.saturating_sub(1), i.saturating_mul(2), -i.max(-i64::MAX)]
                    [rng.below(4)]
                .into();
            }
            "a number changed"
        }
        (_, Value::String(s)) if !s.is_empty() => {
            let mut chars: Vec<char> = s.chars().collect();
            let i = rng.below(chars.len());
            chars[i] = ['0', '9', 'a', '*', '(', ')', '+', '-', '/', ',', ' ', '_', 'b', 'm'][rng.below(14)];
            *s = chars.into_iter().collect();
            "a character changed"
        }
        _ => "nothing",
    };
    format!("{what} at /{}", path.join("/"))
}

fn cases() -> usize {
    std::env::var("BIFURC_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(100)
}

/// Feeds `cases()` mutations of the JSON file `seed` to `check`; returns a
/// line per panic (its message, the mutations, the file written).
fn fuzz(name: &str, seed: &Path, check: &dyn Fn(&str)) -> Vec<String> {
    let text = std::fs::read_to_string(seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
    let base: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
    let mut pool = Vec::new();
    strings(&base, &mut pool);
    pool.sort();
    pool.dedup();
    let salt: u64 = std::env::var("BIFURC_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rng =
        Rng(salt ^ name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)));
    let mut failures = Vec::new();
    for case in 0..cases() {
        let mut doc = base.clone();
        let done: Vec<String> = (0..1 + rng.below(3)).map(|_| mutate(&mut doc, &mut rng, &pool)).collect();
        let text = doc.to_string();
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| check(&text))) {
            let message = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let file = common::scratch("mutation-fuzz", &format!("{name}-{case}")).join("case.json");
            let _ = std::fs::write(&file, &text);
            failures.push(format!(
                "{name} #{case}: {message}\n  after {}\n  document: {}",
                done.join("; "),
                file.display()
            ));
        }
    }
    failures
}

thread_local! {
    /// Set while a thread feeds mutated documents: their panics are
    /// reported together, not printed one by one.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `fuzz` over each example, its panics kept quiet.
fn fuzz_all(examples: &[(&str, PathBuf)], check: &dyn Fn(&str)) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                default(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let failures: Vec<String> = examples.iter().flat_map(|(name, path)| fuzz(name, path, check)).collect();
    QUIET.with(|q| q.set(false));
    assert!(failures.is_empty(), "{} panics:\n{}", failures.len(), failures.join("\n"));
}

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// What `bifurc inspect / optimize / compile` and the tests do with a graph.
fn through_the_compiler(g: &Graph) {
    let point: BTreeMap<String, i64> = g.dims.runtime.iter().map(|d| (d.clone(), 3)).collect();
    let at = bifurc::inspect::point::ShapePoint(point.clone());
    let _ = bifurc::inspect::bytes::bytes_moved(g, &at);
    let opts = bifurc::optimize::Options { point: at, limits: Default::default() };
    let mut graphs = vec![g.clone()];
    if let Ok(o) = bifurc::optimize::optimize(g, &opts) {
        graphs.push(o.graph);
    }
    for g in &graphs {
        if let Ok(inputs) = bifurc::interp::random_inputs(g, &point, 1) {
            let _ = bifurc::interp::run(g, &point, &inputs);
        }
        for tensor_cores in [None, Some(&point)] {
            if let Ok(program) = bifurc::lower::plan_with(g, tensor_cores) {
                let _ = bifurc::lower::emit(g, &program, bifurc::lower::Target::Gpu);
                let _ = bifurc::lower::emit(g, &program, bifurc::lower::Target::Cpu);
            }
        }
    }
}

/// The tiny model in bf16 (`import-hf examples/tiny/config.json --dtype
/// bf16`): its contractions take the tensor-core forms, which an f32 graph
/// never plans. Written to a scratch file for [`fuzz`].
fn tiny_bf16() -> (Value, PathBuf) {
    let config = std::fs::read_to_string(example("examples/tiny/config.json")).unwrap();
    let opts = bifurc::hf::HfOptions { dtype: Some(bifurc::ir::DType::BF16), ..Default::default() };
    let doc = bifurc::hf::build(&config, &opts).unwrap();
    let path = std::env::temp_dir().join(format!("bifurc-mutation-fuzz-{}-tiny-bf16.json", std::process::id()));
    std::fs::write(&path, serde_json::to_string(&doc).unwrap()).unwrap();
    (doc, path)
}

#[test]
fn mutated_model_json_never_panics() {
    let (_, bf16) = tiny_bf16();
    let examples = [
        ("tiny", example("examples/tiny/model.json")),
        ("multilevel", example("examples/multilevel/model.json")),
        ("tiny-bf16", bf16.clone()),
    ];
    fuzz_all(&examples, &|text| {
        if let Ok(g) = bifurc::import::parse(text) {
            through_the_compiler(&g)
        }
    });
    // A large graph: import only (the compiler passes above are per node).
    fuzz_all(&[("gpt2", example("examples/gpt2/model.json"))], &|text| {
        let _ = bifurc::import::parse(text);
    });
    std::fs::remove_file(bf16).ok();
}

/// Constants at the top of i64 (what a longer run found,
/// `BIFURC_FUZZ_CASES=3000 BIFURC_FUZZ_SEED=99173`, and its neighbours),
/// each through the compiler as above: ceilings counted as `(n + d - 1) /
/// d` overflowed in the CPU walk's blocks (the logits' vocabulary), the
/// reuse estimate of the plan (multi-level `d_model`) and the tensor-core
/// form's block count (bf16 `d_model`, `ffn`, `vocab`).
#[test]
fn constants_at_the_top_of_i64_never_panic() {
    let read =
        |path: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(example(path)).unwrap()).unwrap() };
    let (bf16, path) = tiny_bf16();
    std::fs::remove_file(path).ok();
    let cases = [
        (read("examples/tiny/model.json"), "vocab"),
        (read("examples/multilevel/model.json"), "d_model"),
        (bf16.clone(), "d_model"),
        (bf16.clone(), "ffn"),
        (bf16, "vocab"),
    ];
    for (base, name) in cases {
        for size in [i64::MAX, i64::MAX - 1] {
            let mut doc = base.clone();
            doc["dims"]["constants"][name] = Value::from(size);
            through_the_compiler(&bifurc::import::from_value(&doc).unwrap());
        }
    }
}

#[test]
fn mutated_config_json_never_panics() {
    let examples: Vec<(&str, PathBuf)> = ["tiny", "gpt2", "santacoder", "multilevel", "qwen2-7b"]
        .iter()
        .map(|m| (*m, example(&format!("examples/{m}/config.json"))))
        .collect();
    fuzz_all(&examples, &|text| {
        for opts in [
            bifurc::hf::HfOptions { layers: Some(1), ..Default::default() },
            bifurc::hf::HfOptions { layers: Some(1), new_tokens: Some(2), ..Default::default() },
            bifurc::hf::HfOptions { layers: Some(1), multi_level: true, ..Default::default() },
        ] {
            let _ = bifurc::hf::build(text, &opts);
        }
    });
}

#[test]
fn mutated_manifest_never_panics() {
    let examples = [("manifest", example("runtime/tests/fixtures/tiny/step.manifest.json"))];
    fuzz_all(&examples, &|text| {
        let Ok(m) = bifurc_runtime::manifest::Manifest::from_str(text) else { return };
        let _ = m.validate();
        let Ok(plan) = bifurc_runtime::exec::ExecPlan::new(&m, true) else { return };
        for v in [0, 1, 3] {
            let dims: BTreeMap<String, i64> = m.dims.runtime.iter().map(|d| (d.clone(), v)).collect();
            if let Ok(all) = plan.bind_dims(&dims) {
                let _ = plan.bytes_needed(&all);
                let _ = plan.launches(&all, &BTreeMap::new(), |_| 1);
                for i in 0..plan.buffers.len() {
                    let _ = plan.shape_at(i, &all);
                }
            }
        }
    });
}
