//! The GPU path: kernels to PTX (checked with ptxas for sm_80 and sm_90),
//! `bifurc::compile` on every example, the manifest, and artifact writes.
//!
//! Needs `BIFURC_LIBDEVICE` (and `BIFURC_PTXAS` for the ptxas checks), which
//! `source scripts/env.sh` sets; without them the tests print a note and
//! skip. scripts/test.sh sets them, so CI runs everything.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bifurc::inspect::ShapePoint;
use bifurc::lower::gpu::{gpu_pipeline, to_ptx, to_shared_ptx, GpuTarget};
use bifurc::{compile, Artifact, CompileOptions};
use bifurc_runtime::manifest::{ByteExprs, Manifest, ParamKind, Size};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Assembles `ptx` with ptxas for `target`; panics with ptxas' output on failure.
fn assemble(ptxas: &Path, ptx: &str, target: GpuTarget, what: &str) {
    let dir = common::scratch("lower-gpu", "ptxas");
    let file = dir.join("k.ptx");
    std::fs::write(&file, ptx).unwrap();
    let out = Command::new(ptxas)
        .arg(format!("-arch={}", target.chip()))
        .arg(&file)
        .arg("-o")
        .arg("/dev/null")
        .output()
        .expect("run ptxas");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "ptxas -arch={} rejected the PTX of {what}:\n{}{}",
        target.chip(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A hand-written module of the emitter's shape: an elementwise kernel with
/// `math.exp` and a row reduction in `scf.for` with `math.tanh`.
const HAND_WRITTEN: &str = r#"
module attributes {gpu.container_module} {
  gpu.module @bifurc_kernels {
    gpu.func @k0_exp(%b: i64, %m: i64, %x: !llvm.ptr, %y: !llvm.ptr) kernel {
      %bid = gpu.block_id x
      %bdim = gpu.block_dim x
      %tid = gpu.thread_id x
      %t0 = arith.muli %bid, %bdim : index
      %t1 = arith.addi %t0, %tid : index
      %i = arith.index_cast %t1 : index to i64
      %ext = arith.muli %b, %m : i64
      %ok = arith.cmpi slt, %i, %ext : i64
      scf.if %ok {
        %p = llvm.getelementptr %x[%i] : (!llvm.ptr, i64) -> !llvm.ptr, f32
        %v = llvm.load %p : !llvm.ptr -> f32
        %e = math.exp %v : f32
        %q = llvm.getelementptr %y[%i] : (!llvm.ptr, i64) -> !llvm.ptr, f32
        llvm.store %e, %q : f32, !llvm.ptr
      }
      gpu.return
    }
    gpu.func @k1_rowsum(%b: i64, %m: i64, %x: !llvm.ptr, %y: !llvm.ptr) kernel {
      %bid = gpu.block_id x
      %bdim = gpu.block_dim x
      %tid = gpu.thread_id x
      %t0 = arith.muli %bid, %bdim : index
      %t1 = arith.addi %t0, %tid : index
      %i = arith.index_cast %t1 : index to i64
      %ok = arith.cmpi slt, %i, %b : i64
      scf.if %ok {
        %c0 = arith.constant 0 : i64
        %c1 = arith.constant 1 : i64
        %z = arith.constant 0.0 : f32
        %base = arith.muli %i, %m : i64
        %s = scf.for %j = %c0 to %m step %c1 iter_args(%acc = %z) -> (f32) : i64 {
          %o = arith.addi %base, %j : i64
          %p = llvm.getelementptr %x[%o] : (!llvm.ptr, i64) -> !llvm.ptr, f32
          %v = llvm.load %p : !llvm.ptr -> f32
          %t = math.tanh %v : f32
          %a = arith.addf %acc, %t : f32
          scf.yield %a : f32
        }
        %q = llvm.getelementptr %y[%i] : (!llvm.ptr, i64) -> !llvm.ptr, f32
        llvm.store %s, %q : f32, !llvm.ptr
      }
      gpu.return
    }
  }
}
"#;

#[test]
fn hand_written_module_assembles_for_both_chips() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    for target in GpuTarget::ALL {
        let ptx = to_ptx(HAND_WRITTEN, target, &libdevice).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert!(ptx.contains(&format!(".target {}", target.chip())), "{ptx}");
        assert!(ptx.contains(".entry k0_exp") && ptx.contains(".entry k1_rowsum"), "{ptx}");
        // libdevice was linked: no calls to undefined math functions remain.
        assert!(!ptx.contains("__nv_"), "{ptx}");
        assert_eq!(to_ptx(HAND_WRITTEN, target, &libdevice).unwrap(), ptx, "PTX is not deterministic");
        if let Some(ptxas) = common::toolchain_path("BIFURC_PTXAS") {
            assemble(&ptxas, &ptx, target, "the hand-written module");
        }
    }
}

#[test]
fn identical_kernels_share_one_entry() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    // k2_exp_again is k0_exp under another name.
    let start = HAND_WRITTEN.find("    gpu.func @k0_exp").unwrap();
    let end = HAND_WRITTEN.find("    gpu.func @k1_rowsum").unwrap();
    let copy = HAND_WRITTEN[start..end].replace("@k0_exp", "@k2_exp_again");
    let at = HAND_WRITTEN.rfind("  }\n}").unwrap();
    let text = format!("{}{copy}{}", &HAND_WRITTEN[..at], &HAND_WRITTEN[at..]);
    let all = to_ptx(&text, GpuTarget::Sm90, &libdevice).unwrap();
    assert_eq!(all.matches(".entry ").count(), 3, "{all}");
    let shared = to_shared_ptx(&text, GpuTarget::Sm90, &libdevice).unwrap();
    assert_eq!(shared.ptx.matches(".entry ").count(), 2, "{}", shared.ptx);
    assert!(!shared.ptx.contains("k2_exp_again"));
    let expected: BTreeMap<String, String> =
        [("k0_exp", "k0_exp"), ("k1_rowsum", "k1_rowsum"), ("k2_exp_again", "k0_exp")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(shared.entries, expected);
    if let Some(ptxas) = common::toolchain_path("BIFURC_PTXAS") {
        assemble(&ptxas, &shared.ptx, GpuTarget::Sm90, "the shared module");
    }
}

#[test]
fn gpu_errors_are_clear() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let e = to_ptx("module { this is not mlir", GpuTarget::Sm90, &libdevice).unwrap_err().to_string();
    assert!(e.contains("does not parse"), "{e}");
    let e = to_ptx(HAND_WRITTEN, GpuTarget::Sm90, Path::new("/nonexistent/libdevice.10.bc")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/libdevice.10.bc"), "{e}");
    let pipeline = gpu_pipeline("sm_90", &libdevice);
    assert!(pipeline.starts_with("builtin.module(nvvm-attach-target{chip=sm_90 O=3 l="), "{pipeline}");
}

fn examples() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path().join("model.json"))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn opts(libdevice: &Path, target: GpuTarget, point: &str) -> CompileOptions {
    CompileOptions {
        target,
        point: ShapePoint::parse(point).unwrap(),
        libdevice: Some(libdevice.to_path_buf()),
        ..CompileOptions::default()
    }
}

/// The shape point used for `graph`: the defaults, plus the multi-level
/// dims of examples/multilevel (its README's point).
fn point_for(graph: &bifurc::ir::Graph) -> &'static str {
    if graph.dims.is_runtime("P") {
        "P=4,S=8,m_s=2048,m_c=1024,m_d=256"
    } else {
        ""
    }
}

fn load(path: &Path) -> bifurc::ir::Graph {
    bifurc::import::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every example graph, by directory name (the 7B-class ones at full size:
/// with kernels of identical code compiled once, a 32-layer graph compiles
/// in a few seconds even in a debug build).
fn example_graphs() -> Vec<(String, bifurc::ir::Graph)> {
    examples()
        .into_iter()
        .map(|model| {
            let name = model.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
            (name, load(&model))
        })
        .collect()
}

#[test]
fn every_example_compiles_and_assembles() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let ptxas = common::toolchain_path("BIFURC_PTXAS");
    for (name, graph) in example_graphs() {
        // The full flow for sm_90; the same kernel module (the optimizer's
        // work is target-independent) also to PTX for sm_80.
        let started = std::time::Instant::now();
        let artifact = compile(&graph, &opts(&libdevice, GpuTarget::Sm90, point_for(&graph)))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let sm80 = to_shared_ptx(&artifact.mlir, GpuTarget::Sm80, &libdevice)
            .unwrap_or_else(|e| panic!("{name} for sm_80: {e}"));
        eprintln!(
            "{name}: {} kernels, {} PTX entries, {} bytes of PTX (sm_90), {:.2} s",
            artifact.manifest.kernels.len(),
            artifact.ptx.matches(".entry ").count(),
            artifact.ptx.len(),
            started.elapsed().as_secs_f64()
        );
        // The kernels' bytes add up to the graph-level model for weights and KV caches.
        let m = &artifact.manifest;
        let sum = |field: fn(&ByteExprs) -> &Size| -> i64 {
            m.kernels.iter().map(|k| m.eval(field(&k.bytes), &m.point).unwrap()).sum()
        };
        assert_eq!(sum(|b| &b.weights), m.bytes.after.weights, "{name}: weights");
        assert_eq!(sum(|b| &b.context_kv), m.bytes.after.context_kv, "{name}: context KV");
        assert_eq!(sum(|b| &b.decode_kv), m.bytes.after.decode_kv, "{name}: decode KV");
        let entries: BTreeMap<String, String> =
            artifact.manifest.kernels.iter().map(|k| (k.name.clone(), k.entry.clone())).collect();
        // compile finds the kernels that share an entry on the emitted text
        // (then on the parsed code); sm_80's from the whole module's parsed code.
        assert_eq!(sm80.entries, entries, "{name}: kernels share entries alike both ways, on both chips");
        let distinct: std::collections::BTreeSet<&String> = entries.values().collect();
        for (target, ptx) in [(GpuTarget::Sm90, &artifact.ptx), (GpuTarget::Sm80, &sm80.ptx)] {
            assert!(ptx.contains(&format!(".target {}", target.chip())), "{name}");
            assert_eq!(ptx.matches(".entry ").count(), distinct.len(), "{name}: one .entry per shared kernel");
            for entry in &distinct {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{name}: {entry}");
            }
            if let Some(ptxas) = &ptxas {
                assemble(ptxas, ptx, target, &name);
            }
        }
    }
}

#[test]
fn compiling_twice_gives_identical_bytes() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    for name in ["tiny", "multilevel", "gpt2"] {
        let graph = load(&root().join("examples").join(name).join("model.json"));
        let o = opts(&libdevice, GpuTarget::Sm90, point_for(&graph));
        let a = compile(&graph, &o).unwrap();
        let b = compile(&graph, &o).unwrap();
        assert_eq!(a.ptx, b.ptx, "{name}: PTX differs");
        assert_eq!(a.manifest.to_json(), b.manifest.to_json(), "{name}: manifest differs");
        assert_eq!(a.mlir, b.mlir, "{name}: MLIR differs");
    }
}

#[test]
fn tiny_manifest_snapshot() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let graph = load(&root().join("examples/tiny/model.json"));
    let artifact = compile(&graph, &opts(&libdevice, GpuTarget::Sm90, "")).unwrap();
    let manifest = Manifest::from_str(&artifact.manifest.to_json()).expect("the manifest reads back");
    assert_eq!(manifest, artifact.manifest);
    insta::assert_snapshot!("tiny_manifest", artifact.manifest.to_json());
}

fn at(b: i64) -> BTreeMap<String, i64> {
    BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), 8192), ("m_d".to_string(), 256)])
}

/// Context-cache bytes of every kernel that reads a context cache, at b.
fn context_reads(manifest: &Manifest, b: i64) -> Vec<(String, i64)> {
    manifest
        .kernels
        .iter()
        .filter(|k| k.bytes.context_kv != Size::Int(0))
        .map(|k| (k.name.clone(), manifest.eval(&k.bytes.context_kv, &at(b)).unwrap()))
        .collect()
}

#[test]
fn bifurcated_context_kernels_do_not_grow_with_b() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let graph = load(&root().join("examples/tiny/model.json"));
    let artifact = compile(&graph, &opts(&libdevice, GpuTarget::Sm90, "b=32")).unwrap();
    let m = &artifact.manifest;
    assert_eq!(m.attention.len(), 4);
    assert!(m.attention.iter().all(|s| s.bifurcated), "{:?}", m.attention);
    let (at32, at64) = (context_reads(m, 32), context_reads(m, 64));
    assert_eq!(at32.len(), 4, "one kernel per context cache read: {at32:?}");
    assert_eq!(at32, at64, "context-attention kernels read the context once per step");
    // Each reads its cache exactly once: g * m_c * k * 4 bytes.
    let once = 2 * 8192 * 16 * 4;
    assert!(at32.iter().all(|(_, bytes)| *bytes == once), "{at32:?}");
    // The manifest's kernel figures add up to the model's context-KV total.
    let sum: i64 = m.kernels.iter().map(|k| m.eval(&k.bytes.context_kv, &m.point).unwrap()).sum();
    assert_eq!(sum, m.bytes.after.context_kv);
    assert!(m.bytes.after.total < m.bytes.before.total);

    // Without bifurcation, the same kernels read the context once per sample.
    let plain = compile(&graph, &CompileOptions { bifurcate: false, ..opts(&libdevice, GpuTarget::Sm90, "b=32") })
        .unwrap()
        .manifest;
    assert!(plain.attention.iter().all(|s| !s.bifurcated));
    let (p32, p64) = (context_reads(&plain, 32), context_reads(&plain, 64));
    assert_eq!(p32.len(), 4, "{p32:?}");
    for ((_, a), (_, b)) in p32.iter().zip(&p64) {
        assert_eq!(*b, 2 * a, "standard attention reads the context once per sample");
    }
    let sum: i64 = plain.kernels.iter().map(|k| plain.eval(&k.bytes.context_kv, &plain.point).unwrap()).sum();
    assert_eq!(sum, plain.bytes.before.context_kv);
    assert_eq!(plain.bytes.before, plain.bytes.after);
}

#[test]
fn manifest_kernels_follow_the_abi() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let graph = load(&root().join("examples/multilevel/model.json"));
    let m = compile(&graph, &opts(&libdevice, GpuTarget::Sm80, point_for(&graph))).unwrap().manifest;
    assert_eq!(m.target, "sm_80");
    for k in &m.kernels {
        let dims: Vec<&str> =
            k.params.iter().take_while(|p| p.kind == ParamKind::Dim).map(|p| p.name.as_str()).collect();
        assert_eq!(dims, m.dims.runtime.iter().map(String::as_str).collect::<Vec<_>>(), "{}", k.name);
        // Then the capacities of the pitched caches it reads, then the buffers.
        let caps: Vec<&str> = k.params[dims.len()..]
            .iter()
            .take_while(|p| p.kind == ParamKind::Capacity)
            .map(|p| p.name.as_str())
            .collect();
        // One per runtime dim (in order) that pitches a KV cache the kernel reads.
        let pitched: Vec<&str> = m
            .dims
            .runtime
            .iter()
            .map(String::as_str)
            .filter(|d| {
                k.reads
                    .iter()
                    .any(|r| m.buffers.iter().any(|b| &b.name == r && b.pitch.as_ref().is_some_and(|p| p.dim == *d)))
            })
            .collect();
        assert_eq!(caps, pitched, "{}", k.name);
        let rest = &k.params[dims.len() + caps.len()..];
        assert!(rest.iter().all(|p| p.kind == ParamKind::Buffer && p.ty == "ptr"));
        assert_eq!(k.params.last().unwrap().name, k.writes);
        let launch = m.launch(k, &m.point).unwrap();
        let extent = m.eval(&k.extent, &m.point).unwrap();
        assert_eq!(launch.block, [256, 1, 1]);
        assert_eq!(i64::from(launch.grid[0]), (extent + 255) / 256, "{}", k.name);
    }
}

#[test]
fn artifact_writes_are_atomic() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let graph = load(&root().join("examples/tiny/model.json"));
    let artifact = compile(&graph, &opts(&libdevice, GpuTarget::Sm90, "")).unwrap();
    let dir = common::scratch("lower-gpu", "write");
    let ptx = dir.join("out.ptx");
    artifact.write(&ptx).unwrap();
    let manifest_path = dir.join("out.manifest.json");
    assert_eq!(Artifact::manifest_path(&ptx), manifest_path);
    assert_eq!(std::fs::read_to_string(&ptx).unwrap(), artifact.ptx);
    let loaded = Manifest::load(&manifest_path).unwrap();
    assert_eq!(loaded.ptx, "out.ptx");
    // The compiled graph beside them: canonical model.json that imports back.
    let graph_path = dir.join("out.graph.json");
    assert_eq!(Artifact::graph_path(&ptx), graph_path);
    let graph_text = std::fs::read_to_string(&graph_path).unwrap();
    assert_eq!(graph_text, bifurc::export::to_string(&bifurc::export::to_json(&artifact.graph)));
    let reloaded = bifurc::import::parse(&graph_text).unwrap();
    assert_eq!(bifurc::export::to_json(&reloaded), bifurc::export::to_json(&artifact.graph));
    let names = |dir: &Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&dir), ["out.graph.json", "out.manifest.json", "out.ptx"]);

    // A failing write (the manifest path is taken by a directory) changes nothing.
    let ptx2 = dir.join("two.ptx");
    std::fs::write(&ptx2, "previous ptx").unwrap();
    std::fs::create_dir(dir.join("two.manifest.json")).unwrap();
    assert!(artifact.write(&ptx2).is_err());
    assert_eq!(std::fs::read_to_string(&ptx2).unwrap(), "previous ptx");
    assert_eq!(names(&dir), ["out.graph.json", "out.manifest.json", "out.ptx", "two.manifest.json", "two.ptx"]);
    // A missing directory is an error, not a panic.
    assert!(artifact.write(&dir.join("missing/x.ptx")).is_err());
    assert_eq!(names(&dir).len(), 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bf16 grouped-query llama (2 layers, head dim 64), bifurcated: its
/// projections and attention contractions run on tensor cores;
/// `tensor_cores: false` keeps them on CUDA cores. The MLIR of the context
/// scores einsum (warps side by side), of the context einsum (`m_c` split
/// across blocks into a workspace) and its combine kernel, of the MLP's
/// down projection (warps splitting its reduction, partials added in shared
/// memory) and of the new token's scores (a warp per output) is
/// snapshotted: review it as generated code.
#[test]
fn tensor_core_kernels() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let config = r#"{"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
      "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 128,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 512}"#;
    let options = bifurc::hf::HfOptions { dtype: Some(bifurc::ir::DType::BF16), ..Default::default() };
    let doc = bifurc::hf::build(config, &options).unwrap();
    let graph = bifurc::import::from_value(&doc).unwrap();
    let o = opts(&libdevice, GpuTarget::Sm90, "");
    let artifact = compile(&graph, &o).unwrap();
    let tiles: Vec<(&str, String)> = artifact
        .manifest
        .kernels
        .iter()
        .filter(|k| ["einsum", "matmul", "combine"].contains(&k.op.as_str()))
        .map(|k| (k.name.as_str(), k.grid[0].to_string()))
        .collect();
    let want = [
        // Short reductions (d_model 256, head dim 64): a block is 32 x 64, a
        // warp per two 16 x 8 tiles (over 16 rows at the compile point, b = 32).
        ("k3_l0_attn_q_proj", "4*ceil((b)/32)"),
        ("k4_l0_attn_k_proj", "2*ceil((b)/32)"),
        ("k5_l0_attn_v_proj", "2*ceil((b)/32)"),
        // The context scores (over m_c): 256 blocks at the compile point
        // even with two column tiles a warp, so a block is 32 x 128.
        ("k8_l0_attn_scores_einsum1", "2*ceil((2*b)/32)*ceil((m_c)/128)"),
        // The decode cache: a tile's rows are a sample's 2 queries (the
        // other 14 repeat them), one block per sample and group per 64 rows.
        ("k9_l0_attn_scores_einsum2", "(2*b)*ceil((m_d)/64)"),
        // The new token's score (one key): CUDA cores, a warp per output,
        // the lanes splitting the head dim.
        ("k10_l0_attn_scores_einsum3", "ceil((128*b)/256)"),
        // A long constant one (the MLP's 512): a block per warp's tiles (32 x
        // 8: too few blocks for two column tiles), its warps splitting it.
        ("k24_l0_mlp_down_proj", "32*ceil((b)/32)"),
        // Runtime ones (m_c, m_d): eight warps side by side cover the head
        // dim, the reduction split across 32 blocks per group (8 per sample
        // and group), each followed by a combine kernel.
        ("k12_l0_attn_context_einsum1", "64*ceil((2*b)/32)"),
        ("k13_l0_attn_context_einsum1_combine", "ceil((256*b)/256)"),
        ("k14_l0_attn_context_einsum2", "8*(2*b)"),
        // It reads the heads' context rounded to bf16 by the last add.
        ("k18_l0_attn_o_proj", "4*ceil((b)/32)"),
        ("k50_logits", "2*ceil((b)/32)"),
    ];
    for (name, grid) in want {
        assert!(tiles.iter().any(|(n, g)| *n == name && g == grid), "{name}: want grid {grid}, kernels {tiles:?}");
    }
    assert!(artifact.ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    // Per layer q, k, v, o, gate, up, down, two scores and three context
    // einsums; the logits.
    assert_eq!(artifact.tensor_core_kernels.len(), 2 * 12 + 1, "{:?}", artifact.tensor_core_kernels);
    let kernel = |name: &str| {
        let start = artifact.mlir.find(&format!("gpu.func @{name}(")).expect("the kernel");
        let end = start + artifact.mlir[start..].find("gpu.return").expect("its end");
        artifact.mlir[start..end].to_string()
    };
    insta::assert_snapshot!("tensor_core_scores_einsum", kernel("k8_l0_attn_scores_einsum1"));
    insta::assert_snapshot!("tensor_core_context_einsum", kernel("k12_l0_attn_context_einsum1"));
    insta::assert_snapshot!("tensor_core_context_combine", kernel("k13_l0_attn_context_einsum1_combine"));
    insta::assert_snapshot!("tensor_core_split_projection", kernel("k24_l0_mlp_down_proj"));
    // The new token's scores: a warp per output, lanes splitting the head
    // dim, a shuffle butterfly adding their sums, lane 0 storing.
    let warp = kernel("k10_l0_attn_scores_einsum3");
    let shuffles: Vec<&str> = warp.lines().filter(|l| l.contains("gpu.shuffle xor")).collect();
    assert_eq!(shuffles.len(), 5, "{warp}");
    insta::assert_snapshot!("warp_new_token_scores_einsum", warp);

    // The command line: the count in compile's summary, and the flag.
    let dir = common::scratch("lower-gpu", "tensor-cores");
    let model = dir.join("model.json");
    std::fs::write(&model, bifurc::export::to_string(&bifurc::export::to_json(&graph))).unwrap();
    for (flag, want) in [(None, "(25 on tensor cores)"), (Some("--no-tensor-cores"), "(0 on tensor cores)")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bifurc"));
        cmd.arg("compile").arg(&model).arg("-o").arg(dir.join("step.ptx")).args(flag);
        let out = cmd.env("BIFURC_LIBDEVICE", &libdevice).output().expect("run bifurc");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(want),
            "{flag:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A tuning experiment: the settings echoed, the staging gone from the
    // kernels; a bad setting is a clear error.
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bifurc"));
        cmd.arg("compile").arg(&model).args(args).env("BIFURC_LIBDEVICE", &libdevice);
        let out = cmd.output().expect("run bifurc");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let out_path = dir.join("tuned.ptx");
    let (ok, stdout, stderr) = run(&["-o", out_path.to_str().unwrap(), "--tune", "stage=off,unroll=2"]);
    assert!(ok && stdout.contains("tensor-core tuning: unroll=2,stage=off"), "{stdout}{stderr}");
    // The manifest records it (and only then: the default one has no key).
    let tuned = Manifest::load(bifurc::Artifact::manifest_path(&out_path)).unwrap();
    assert_eq!(tuned.tuning, "unroll=2,stage=off");
    let plain = std::fs::read_to_string(bifurc::Artifact::manifest_path(&dir.join("step.ptx"))).unwrap();
    assert!(!plain.contains("\"tuning\""), "{plain}");
    let (ok, staged, _) = run(&["--emit", "mlir"]);
    assert!(ok && staged.contains("workgroup(%sa"), "staged by default");
    let (ok, plain, _) = run(&["--emit", "mlir", "--tune", "stage=off"]);
    assert!(ok && !plain.contains("workgroup(%sa") && plain.contains("nvvm.mma.sync"), "stage=off");
    let (ok, _, stderr) = run(&["--emit", "mlir", "--tune", "bogus=1"]);
    assert!(!ok && stderr.contains("--tune: unknown key `bogus`"), "{stderr}");

    // Compiled for one sample (not bifurcated: nothing to share), every
    // contraction but the new token's score runs on tensor cores too (one
    // row of each tile used), each warp with one row tile: per layer the
    // seven projections, q·K and w·V over the one cache; the logits.
    let single = compile(&graph, &opts(&libdevice, GpuTarget::Sm90, "b=1")).unwrap();
    assert_eq!(single.tensor_core_kernels.len(), 2 * 9 + 1, "{:?}", single.tensor_core_kernels);
    let q_proj = single.manifest.kernels.iter().find(|k| k.name == "k3_l0_attn_q_proj").map(|k| k.grid[0].to_string());
    assert_eq!(q_proj.as_deref(), Some("4*ceil((b)/16)"));

    let off = compile(&graph, &CompileOptions { tensor_cores: false, ..o }).unwrap();
    assert!(!off.mlir.contains("nvvm.mma.sync") && !off.ptx.contains("mma.sync"), "tensor cores off");
    assert!(off.tensor_core_kernels.is_empty());
    // On CUDA cores the context scores einsum takes a warp per context-cache
    // row (2 groups x m_c), which computes every sample's score in turn.
    let grid =
        off.manifest.kernels.iter().find(|k| k.name == "k8_l0_attn_scores_einsum1").map(|k| k.grid[0].to_string());
    assert_eq!(grid.as_deref(), Some("ceil((64*m_c)/256)"));
}

/// `w·V` with a head dim of 128: each warp takes two column tiles, and V
/// (the head dim innermost) is read two columns at a time: a 32-bit load
/// per reduction index, each tile's register pair picked from two of them
/// (`bifurc::lower::emit` "interleaved columns"); the numbers are checked
/// by tests/mma_random.rs.
#[test]
fn interleaved_columns_read_pairs() {
    let Some(libdevice) = common::toolchain_path("BIFURC_LIBDEVICE") else { return };
    let text = r#"{"format": "bifurc-graph/1", "dims": {"runtime": ["b", "m_c"], "constants": {}},
      "inputs": [{"name": "w", "role": "activation", "shape": [4, "b", "m_c"], "dtype": "bf16"},
                 {"name": "v", "role": "activation", "shape": [4, "m_c", 128], "dtype": "bf16"}],
      "nodes": [{"id": "y", "op": "einsum", "inputs": ["w", "v"], "attrs": {"spec": "zmk,zkn->zmn"}, "dtype": "f32"}],
      "outputs": [{"name": "y", "node": "y"}]}"#;
    let graph = bifurc::import::parse(text).unwrap();
    let artifact = compile(&graph, &opts(&libdevice, GpuTarget::Sm90, "")).unwrap();
    let mlir = &artifact.mlir;
    let pairs = ["[0, 2] : vector<2xbf16>", "[1, 3] : vector<2xbf16>"];
    for p in pairs {
        assert!(mlir.lines().any(|l| l.contains("llvm.shufflevector") && l.contains(p)), "{p}: {mlir}");
    }
    // Before: each of V's elements was a 2-byte load.
    let v_loads = mlir.lines().filter(|l| l.contains("llvm.load") && l.contains("-> vector<2xbf16>")).count();
    assert!(v_loads >= 4, "{mlir}");
    // With `--tune stage-b=on` V's rows go through shared memory too: 16-byte
    // loads by the block's threads, the pairs read from `%sb`.
    let tuning = bifurc::lower::Tuning { stage_b: true, ..Default::default() };
    let staged = compile(&graph, &CompileOptions { tuning, ..opts(&libdevice, GpuTarget::Sm90, "") }).unwrap();
    let mlir = &staged.mlir;
    assert!(mlir.contains("%sb : memref<") && mlir.contains("-> vector<8xbf16>"), "{mlir}");
    assert!(mlir.lines().any(|l| l.contains("vector.store") && l.contains("%sb[")), "{mlir}");
    assert!(mlir.lines().any(|l| l.contains("memref.load %sb[")), "{mlir}");
    assert!(staged.ptx.contains("st.shared.v4.b32"), "16-byte shared stores");
}

/// Every tuning variant gpu-check benches (scripts/tuning-variants.txt)
/// parses, differs from the defaults and has a unique name: a typo there
/// would otherwise surface only on a GPU machine.
#[test]
fn tuning_variants_parse() {
    let text = std::fs::read_to_string(root().join("scripts/tuning-variants.txt")).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()) {
        let (name, settings) = line.split_once(char::is_whitespace).unwrap_or_else(|| panic!("`{line}`"));
        let tuning = bifurc::lower::Tuning::parse(settings.trim()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_ne!(tuning, bifurc::lower::Tuning::default(), "{name}: the defaults");
        assert!(names.insert(name.to_string()), "{name} twice");
    }
    assert!(names.len() >= 2, "{names:?}");
}
