//! Weights from safetensors files written here with the `safetensors` crate,
//! checked against the tiny model's manifest (tests/fixtures/tiny).

use bifurc_runtime::manifest::Manifest;
use bifurc_runtime::random::shape_at;
use bifurc_runtime::rng::SplitMix64;
use bifurc_runtime::weights::{
    bind_weights, binding_bytes, candidate_names, load_weights, random_weights, weight_buffers, WeightFiles,
    WeightSource, WeightsError,
};
use bifurc_runtime::{HostTensor, Step, StepError};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn tiny() -> Manifest {
    Manifest::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.manifest.json")).unwrap()
}

/// A fresh temporary directory for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bifurc-weights-{test}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tensor to store: name, dtype, shape, little-endian bytes.
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn stored(name: &str, dtype: Dtype, tensor: &HostTensor) -> Stored {
    let bytes = match dtype {
        Dtype::F32 => tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => tensor.data.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        Dtype::F16 => tensor.data.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        Dtype::I32 => tensor.data.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
        other => panic!("test does not write {other:?}"),
    };
    Stored { name: name.to_string(), dtype, shape: tensor.shape.clone(), bytes }
}

fn write(path: &Path, tensors: &[Stored]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn loads_f32_bf16_and_f16_under_hf_names() {
    let m = tiny();
    let want = random_weights(&m, 11).unwrap();
    assert_eq!(want.len(), weight_buffers(&m).count());
    // Store every third tensor as bf16, every third as f16; drop the `model.`
    // prefix of the layer-1 tensors (as a bare `LlamaModel` checkpoint would).
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let dtype = [Dtype::F32, Dtype::BF16, Dtype::F16][i % 3];
        let stored_name = if name.starts_with("model.layers.1.") { name.trim_start_matches("model.") } else { name };
        tensors.push(stored(stored_name, dtype, &want[*name]));
    }
    let dir = temp_dir("dtypes");
    let path = dir.join("model.safetensors");
    write(&path, &tensors);

    let files = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
    assert_eq!(files.names().len(), want.len());
    let got = load_weights(&m, &files).unwrap();
    for (i, name) in names.iter().enumerate() {
        let (a, b) = (&want[*name], &got[*name]);
        assert_eq!(a.shape, b.shape, "{name}");
        // Exactly the stored value, rounded to nearest-even in its dtype.
        let round = [|x: f32| x, |x| half::bf16::from_f32(x).to_f32(), |x| half::f16::from_f32(x).to_f32()][i % 3];
        for (x, y) in a.data.iter().zip(&b.data) {
            assert_eq!(round(*x), *y, "{name}");
            assert!((x - y).abs() <= x.abs() / 128.0 + 1e-7, "{name}: {x} vs {y}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sharded_checkpoints_and_tied_embeddings() {
    let m = tiny();
    let want = random_weights(&m, 3).unwrap();
    let dir = temp_dir("shards");
    let mut first = Vec::new();
    let mut second = Vec::new();
    for (name, t) in &want {
        if name == "lm_head.weight" {
            continue; // tied to the embeddings
        }
        let shard = if name.contains("layers.1.") { &mut second } else { &mut first };
        shard.push(stored(name, Dtype::F32, t));
    }
    write(&dir.join("model-00001-of-00002.safetensors"), &first);
    write(&dir.join("model-00002-of-00002.safetensors"), &second);
    std::fs::write(dir.join("config.json"), "{}").unwrap();

    let files = WeightFiles::open(std::slice::from_ref(&dir)).unwrap();
    files.check(&m).unwrap();
    let got = load_weights(&m, &files).unwrap();
    assert_eq!(got["model.layers.1.mlp.up_proj.weight"], want["model.layers.1.mlp.up_proj.weight"]);
    assert_eq!(got["lm_head.weight"], want["model.embed_tokens.weight"], "tied lm_head");

    // Bound one at a time to a step.
    #[derive(Default)]
    struct Recorder(HashMap<String, HostTensor>);
    impl Step for Recorder {
        fn runtime_dims(&self) -> Vec<String> {
            vec![]
        }
        fn bind(&mut self, name: &str, t: &HostTensor) -> Result<(), StepError> {
            self.0.insert(name.to_string(), t.clone());
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
    let mut step = Recorder::default();
    let mut seen = 0;
    assert_eq!(bind_weights(&mut step, &m, &files, |_| seen += 1).unwrap(), want.len());
    assert_eq!(seen, want.len());
    assert_eq!(step.0["model.norm.weight"].shape, vec![64]);
    // Each read into the last one's memory, the same values as read afresh.
    assert_eq!(step.0, got);

    // Random weights through a source, each name told before it is bound,
    // in the manifest's order: the seed's values.
    let mut step = Recorder::default();
    let mut names = Vec::new();
    let seeded = random_weights(&m, 5).unwrap();
    assert_eq!(WeightSource::Random(5).bind_with(&mut step, &m, |n| names.push(n.to_string())).unwrap(), seeded.len());
    assert_eq!(names, weight_buffers(&m).map(|b| b.name.clone()).collect::<Vec<_>>());
    assert_eq!(step.0, seeded);

    // Only the weights asked for (those a prefill step does not share),
    // from files and from a seed: each with the values it has among all.
    let layer1 = |name: &str| name.contains("layers.1.");
    let picked = |all: &HashMap<String, HostTensor>| -> HashMap<String, HostTensor> {
        all.iter().filter(|(n, _)| layer1(n)).map(|(n, t)| (n.clone(), t.clone())).collect()
    };
    for (source, all) in [(WeightSource::Files(files), &got), (WeightSource::Random(5), &seeded)] {
        let (mut step, mut names) = (Recorder::default(), Vec::new());
        let n = source.bind_where(&mut step, &m, layer1, |n| names.push(n.to_string())).unwrap();
        assert!(n > 0 && n < all.len() && n == names.len());
        assert!(names.iter().all(|n| layer1(n)));
        assert_eq!(step.0, picked(all));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn errors_name_the_tensor() {
    let m = tiny();
    let want = random_weights(&m, 5).unwrap();
    let dir = temp_dir("errors");
    let path = dir.join("w.safetensors");
    let with = |f: &dyn Fn(&str, &HostTensor) -> Option<Stored>| {
        let tensors: Vec<Stored> = want.iter().filter_map(|(n, t)| f(n, t)).collect();
        write(&path, &tensors);
        let files = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
        let err = load_weights(&m, &files).unwrap_err();
        // The headers alone tell what reading the tensors would.
        assert_eq!(files.check(&m).unwrap_err().to_string(), err.to_string());
        assert_eq!(WeightSource::Files(files).check(&m).unwrap_err().to_string(), err.to_string());
        err
    };

    let err = with(&|n, t| (n != "model.norm.weight").then(|| stored(n, Dtype::F32, t)));
    assert!(matches!(err, WeightsError::Missing { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`model.norm.weight`") && msg.contains("`norm.weight`") && msg.contains("w.safetensors"),
        "{msg}"
    );

    let err = with(&|n, t| {
        let mut t = t.clone();
        if n == "model.layers.0.self_attn.k_proj.weight" {
            t.shape = vec![64, 32];
        }
        Some(stored(n, Dtype::F32, &t))
    })
    .to_string();
    assert!(err.contains("k_proj") && err.contains("[32, 64]") && err.contains("[64, 32]"), "{err}");

    let err = with(&|n, t| Some(stored(n, if n == "model.norm.weight" { Dtype::I32 } else { Dtype::F32 }, t)));
    assert!(err.to_string().contains("I32"), "{err}");

    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = WeightFiles::open(std::slice::from_ref(&path)).err().unwrap().to_string();
    assert!(err.contains("w.safetensors") && err.contains("not a valid safetensors"), "{err}");

    // Broken files are refused when opened, naming the file and what is wrong.
    let open_err = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        let err = WeightFiles::open(std::slice::from_ref(&path)).err().unwrap().to_string();
        assert!(err.contains("w.safetensors") && err.contains("not a valid safetensors"), "{err}");
        err
    };
    let file = |header: &str, data: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        bytes
    };
    let x = |offsets: &str| format!(r#"{{"x":{{"dtype":"F32","shape":[2],"data_offsets":{offsets}}}}}"#);
    assert!(open_err(&[1, 2, 3]).contains("too short"));
    assert!(open_err(&1000u64.to_le_bytes()).contains("a header of 1000 bytes, in a file of 8"));
    assert!(open_err(&file("{not json", 0)).contains("header is not valid"));
    // Truncated: the data the header describes is not all there.
    assert!(open_err(&file(&x("[0,8]"), 5)).contains("take 8 bytes after the header, and the file holds 5"));
    // Bytes left over past the last tensor.
    assert!(open_err(&file(&x("[0,8]"), 9)).contains("and the file holds 9"));
    // Two f32 elements given 6 bytes; a tensor past a gap.
    assert!(open_err(&file(&x("[0,6]"), 6)).contains("header is not valid"));
    assert!(open_err(&file(&x("[4,12]"), 12)).contains("header is not valid"));
    // The same bytes, well formed, open and read.
    std::fs::write(&path, file(&x("[0,8]"), 8)).unwrap();
    let files = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
    assert_eq!(files.tensor("x", &[2]).unwrap().data, [0.0, 0.0]);
    let err = WeightFiles::open(&[dir.join("missing.safetensors")]).err().unwrap().to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(WeightFiles::open(&[empty]).err().unwrap().to_string().contains("no .safetensors"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn names_and_random_weights() {
    assert_eq!(
        candidate_names("model.layers.0.mlp.up_proj.weight"),
        vec![
            "model.layers.0.mlp.up_proj.weight",
            "layers.0.mlp.up_proj.weight",
            "transformer.layers.0.mlp.up_proj.weight"
        ]
    );
    assert_eq!(
        candidate_names("h.0.ln_1.bias"),
        vec!["h.0.ln_1.bias", "transformer.h.0.ln_1.bias", "model.h.0.ln_1.bias"]
    );
    assert!(candidate_names("lm_head.weight").contains(&"model.embed_tokens.weight".to_string()));

    let m = tiny();
    let a = random_weights(&m, 1).unwrap();
    assert_eq!(a, random_weights(&m, 1).unwrap());
    assert_ne!(a, random_weights(&m, 2).unwrap());
    for b in weight_buffers(&m) {
        assert_eq!(a[&b.name].shape, shape_at(&m, b, &m.point).unwrap());
    }
    // Rank-1 norm gains near 1, matrices scaled by 1/sqrt(fan-in).
    assert!(a["model.norm.weight"].data.iter().all(|v| (0.9..=1.1).contains(v)));
    assert!(a["model.layers.0.mlp.down_proj.weight"].data.iter().all(|v| v.abs() <= 1.0 / (128f32).sqrt()));
    // Binding holds the largest weight in f32 at most.
    let largest = a.values().map(|t| t.data.len() * 4).max().unwrap();
    assert!(largest > 4 * 64);
    assert_eq!(binding_bytes(&m).unwrap(), largest);
}

/// Opening and reading a checkpoint whose bytes were flipped, cut short or
/// lengthened returns, an error or tensors: never a panic. Deterministic
/// (a fixed SplitMix64 sequence).
#[test]
fn damaged_checkpoints_never_panic() {
    let m = tiny();
    let want = random_weights(&m, 3).unwrap();
    let dir = temp_dir("damaged");
    let path = dir.join("w.safetensors");
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let tensors: Vec<Stored> = names
        .iter()
        .enumerate()
        .map(|(i, n)| stored(n, [Dtype::F32, Dtype::BF16, Dtype::F16][i % 3], &want[*n]))
        .collect();
    write(&path, &tensors);
    let good = std::fs::read(&path).unwrap();
    let header = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut rng = SplitMix64::new(0x5EED);
    let mut next = |n: usize| rng.below(n as u64) as usize;
    let (mut opened, mut read) = (0, 0);
    for case in 0..1500 {
        let mut bytes = good.clone();
        match case % 4 {
            // A byte of the length or the header's JSON changed.
            0 | 1 => {
                let at = next(header);
                bytes[at] = next(256) as u8;
            }
            // Cut short, or lengthened.
            2 => bytes.truncate(next(bytes.len())),
            _ => bytes.extend(std::iter::repeat_n(0u8, 1 + next(64))),
        }
        std::fs::write(&path, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| {
            let Ok(files) = WeightFiles::open(std::slice::from_ref(&path)) else { return (false, 0) };
            let mut n = 0;
            for b in weight_buffers(&m) {
                let shape = shape_at(&m, b, &m.point).unwrap();
                n += usize::from(files.tensor(&b.name, &shape).is_ok());
            }
            (true, n)
        });
        let Ok((ok, n)) = result else { panic!("case {case}: a panic on a damaged file ({} bytes)", bytes.len()) };
        opened += usize::from(ok);
        read += n;
    }
    // Some damage (a digit of a float's exponent, say) leaves a file that
    // still opens and reads.
    assert!(opened > 0 && read > 0, "opened {opened}, read {read}");
    std::fs::remove_dir_all(&dir).ok();
}
