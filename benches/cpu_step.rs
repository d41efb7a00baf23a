//! Benchmark of the compiled step on the CPU: `cargo bench --bench cpu_step`.
//!
//! A 2-layer multi-head llama (hidden 1024, 16 heads of 64, 16 KV heads, ffn
//! 2816, vocab 1000, f32 unless `BIFURC_BENCH_DTYPE` says), imported through
//! `bifurc::hf::build`, is optimized at b=32, m_c=8192, m_d=16 (bifurcated
//! attention), and both the baseline (the un-optimized graph) and the
//! bifurcated graph are compiled once with `CpuStep`. At each point (b = 32
//! first, then 16 and 1 unless `BIFURC_BENCH_POINTS` names others, e.g.
//! `32,1`; m_c = 8192 unless `BIFURC_BENCH_CONTEXT` gives another, m_d = 16
//! unless `BIFURC_BENCH_DECODE` does): random
//! inputs, one warm-up run each (and one check that both give the same
//! logits, norm-relative 1e-4), then, on the inputs converted once to each
//! step's storage dtypes (as the runtime binds weights and caches),
//! `BIFURC_BENCH_RUNS` (default 5) timed runs alternating baseline /
//! bifurcated so both see the same noise. Prints the median ms of each, the
//! measured ratio, the bytes-model prediction
//! (`bifurc::inspect::bytes_moved` of both graphs at the point), and the
//! FMA floor: the step's multiply-adds (`bifurc::inspect::multiply_adds`,
//! the same on both sides) at this machine's peak rate for the thread
//! count (`bifurc::lower::peak_multiply_adds`), with the bifurcated step's
//! share of that peak; and the bifurcated step's memory time: the bytes
//! its kernels move by the bytes model of its own plan (`plan MB`:
//! `CpuStep::moved_at`, its softmax over the scores in place,
//! where the graph's model counts the concat and slices as copies) at
//! this machine's read rate for the thread count
//! (`bifurc::lower::memory_read_rate`, printed first), with its share of
//! the step (`% mem`: near 100, the step waits on memory).
//!
//! Kernels run split across the cores (`CpuStep::set_threads`, the rayon
//! pool: `RAYON_NUM_THREADS`); `BIFURC_BENCH_THREADS=1,2` times each of
//! these thread counts instead, alternating them too (one row each).
//!
//! `BIFURC_BENCH_DTYPE=bfloat16` (or `float16`) builds the model in that
//! dtype instead of f32 (weights, caches and activations; the logits check
//! then allows norm-relative 2e-2, as for a config in half precision: the
//! two graphs round differently).
//! `BIFURC_BENCH_KV_HEADS=4` (a divisor of 16) makes it grouped-query.
//! `BIFURC_BENCH_CONFIG=config.json` builds the first 2 layers of that
//! Hugging Face config instead (any architecture `bifurc import-hf`
//! supports; give it `n_positions` / `max_position_embeddings` past the
//! context and a small `vocab_size` to time the layers, not the logits):
//! the dtype and KV-head settings then come from the file.
//!
//! `BIFURC_BENCH_PROFILE=1` also prints the slowest kernels of each side
//! (8, or `BIFURC_BENCH_PROFILE_TOP`; each its median over as many runs
//! as timed, of the bound step's kernels), each contraction with its
//! share of the FMA peak (its multiply-adds at the peak rate over its
//! time; the f32 FMAs' peak, which a bf16 kernel on AMX tiles exceeds)
//! and the bytes it moves a second (its plan's bytes model over its time,
//! beside the printed read rate), at the last thread count timed;
//! `BIFURC_BENCH_DUMP=DIR` writes both CPU modules (MLIR) there (making DIR);
//! with `BIFURC_BENCH_RUNS=0` too, only that (no run, no check of the
//! outputs: what the kernel labs use).
//!
//! Target (b = 32): the bifurcated step at least 4x faster than the baseline
//! (measured on a 2-core Emerald Rapids VM, f32: 3.23-6.91x on one thread,
//! 2.09-4.38x on two, 9.5x and 8.8x at m_c = 32768; bf16 4.66-6.91x: see
//! the README's "Speed on the CPU").

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use bifurc::hf::{build, HfOptions};
use bifurc::inspect::{bytes_moved, multiply_adds, node_multiply_adds, ShapePoint};
use bifurc::interp::{random_inputs, Tensor};
use bifurc::ir::Graph;
use bifurc::lower::cpu::Stored;
use bifurc::lower::{BufferKind, CpuStep};
use bifurc::optimize::{optimize, Options};
use bifurc_runtime::bench::median;

/// The model's config.json, with `DTYPE` standing for `torch_dtype` and
/// `KV_HEADS` for `num_key_value_heads`.
const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
  "num_attention_heads": 16, "num_key_value_heads": KV_HEADS, "num_hidden_layers": 2, "vocab_size": 1000,
  "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 16384,
  "torch_dtype": "DTYPE"}"#;

const OPT_POINT: &str = "b=32,m_c=8192,m_d=16";
const TOL: f32 = 1e-4;
const TOL_HALF: f32 = 2e-2;

/// `max|a - b| / max(max|b|, 1e-6)`; NaN when shapes differ.
fn norm_rel(a: &Tensor, b: &Tensor) -> f32 {
    if a.shape != b.shape {
        return f32::NAN;
    }
    let (mut diff, mut top) = (0.0f32, 1e-6f32);
    for (&x, &y) in a.data.iter().zip(&b.data) {
        diff = diff.max((x - y).abs());
        top = top.max(y.abs());
    }
    diff / top
}

/// The value of environment variable `name`, `default` where it is unset;
/// a value that does not parse stops the bench with its name (where it
/// used to be taken for the default without a word).
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| bad_env(name, &v, "a number")),
        Err(_) => default,
    }
}

/// The comma-separated list in environment variable `name`, `default`
/// where it is unset; an entry that does not parse stops the bench (a
/// point `32x8192` used to be dropped, leaving no point to time).
fn env_list<T: std::str::FromStr>(name: &str, default: impl FnOnce() -> Vec<T>) -> Vec<T> {
    let Ok(v) = std::env::var(name) else { return default() };
    let list: Option<Vec<T>> = v.split(',').map(|x| x.trim().parse().ok()).collect();
    list.filter(|l| !l.is_empty()).unwrap_or_else(|| bad_env(name, &v, "numbers separated by commas"))
}

fn bad_env(name: &str, value: &str, what: &str) -> ! {
    eprintln!("cpu_step: {name}={value:?}: expected {what}");
    std::process::exit(2)
}

fn compile(name: &str, g: &Graph) -> CpuStep {
    let t = Instant::now();
    let step = CpuStep::compile(g).unwrap_or_else(|e| panic!("{name}: compile: {e}"));
    let kernels: Vec<String> = step.programs().map(|p| p.kernels.len().to_string()).collect();
    println!(
        "  compiled {name}: {} kernels ({} functions) in {:.1} s",
        kernels.join(" / "),
        step.functions(),
        t.elapsed().as_secs_f64()
    );
    step
}

fn main() {
    let runs: usize = env_or("BIFURC_BENCH_RUNS", 5);
    let m_c: i64 = env_or("BIFURC_BENCH_CONTEXT", 8192).max(0);
    let m_d: i64 = env_or("BIFURC_BENCH_DECODE", 16).max(0);
    let points: Vec<i64> = env_list("BIFURC_BENCH_POINTS", || vec![32, 16, 1]);

    let dtype = std::env::var("BIFURC_BENCH_DTYPE").unwrap_or_else(|_| "float32".into());
    let kv_heads: usize = env_or("BIFURC_BENCH_KV_HEADS", 16);
    let (config, model) = match std::env::var_os("BIFURC_BENCH_CONFIG") {
        Some(path) => {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.to_string_lossy()));
            (text, format!("the first 2 layers of {}", path.to_string_lossy()))
        }
        None => (
            CONFIG.replace("DTYPE", &dtype).replace("KV_HEADS", &kv_heads.to_string()),
            format!("2-layer llama (d_model 1024, 16 heads x 64, {kv_heads} KV heads, ffn 2816, vocab 1000, {dtype})"),
        ),
    };
    let doc = build(&config, &HfOptions { layers: Some(2), ..Default::default() }).expect("import-hf");
    let base = bifurc::import::from_value(&doc).expect("import");
    // The looser check where the model (the env's dtype, or the config's)
    // stores any weight in half precision.
    let half = base.inputs.iter().any(|i| i.role == bifurc::ir::Role::Weight && i.dtype != bifurc::ir::DType::F32);
    let tol = if half { TOL_HALF } else { TOL };
    let opts = Options { point: ShapePoint::parse(OPT_POINT).expect("point"), ..Default::default() };
    let opt = optimize(&base, &opts).expect("optimize");
    println!(
        "cpu_step: {model}, optimized at {OPT_POINT}: {} of {} attention sites bifurcated",
        opt.report.rewritten(),
        opt.report.sites.len()
    );
    let bif = opt.graph;
    let mut steps = [compile("baseline", &base), compile("bifurcated", &bif)];
    if let Some(dir) = std::env::var_os("BIFURC_BENCH_DUMP") {
        // The modules the steps run: planned for the CPU (no tensor cores),
        // in the directory, made if it is not there.
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("BIFURC_BENCH_DUMP={}: {e}", dir.to_string_lossy()));
        for (name, step) in ["baseline", "bifurcated"].into_iter().zip(&steps) {
            // A second plan (the context attention fused) as `{name}_fused`.
            for (program, plan) in step.programs().zip(["", "_fused"]) {
                let text = bifurc::lower::emit(step.graph(), program, bifurc::lower::Target::Cpu).expect("emit");
                let path = std::path::Path::new(&dir).join(format!("{name}{plan}_cpu.mlir"));
                std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
        if runs == 0 {
            // Dumped only (the kernel labs: a kernel changed to time what a
            // part of it costs computes other outputs than the baseline).
            println!("  modules dumped; BIFURC_BENCH_RUNS=0: nothing run");
            return;
        }
    }
    let runs = runs.max(1);
    let threads: Vec<usize> = env_list("BIFURC_BENCH_THREADS", || vec![steps[0].threads()]);

    let peaks: Vec<f64> = threads
        .iter()
        .map(|&t| {
            bifurc::lower::peak_multiply_adds(t.min(rayon::current_num_threads())).expect("peak multiply-add rate")
        })
        .collect();
    let rates: Vec<String> = threads.iter().zip(&peaks).map(|(t, p)| format!("{:.0} G/s on {t}", p / 1e9)).collect();
    println!("  peak multiply-adds (JIT, f32 vectors): {}", rates.join(", "));
    let available = bifurc_runtime::memory::host_available();
    let reads: Vec<f64> = threads
        .iter()
        .map(|&t| {
            bifurc::lower::memory_read_rate(t.min(rayon::current_num_threads()), available).expect("memory read rate")
        })
        .collect();
    let rates: Vec<String> = threads.iter().zip(&reads).map(|(t, r)| format!("{:.1} GB/s on {t}", r / 1e9)).collect();
    println!("  memory reads: {}", rates.join(", "));
    println!("  {runs} timed runs per side after 1 warm-up, alternating; median ms");
    println!(
        "  {:>4} {:>6} {:>5} {:>7} | {:>12} {:>12} {:>8} | {:>10} {:>10} {:>9} | {:>8} {:>6} | {:>8} {:>6} {:>5}",
        "b",
        "m_c",
        "m_d",
        "threads",
        "baseline ms",
        "bifurc ms",
        "speedup",
        "base MB",
        "bifurc MB",
        "predicted",
        "floor ms",
        "% peak",
        "plan MB",
        "mem ms",
        "% mem"
    );
    for b in points {
        let point: BTreeMap<String, i64> =
            [("b", b), ("m_c", m_c), ("m_d", m_d)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let sp = ShapePoint(point.clone());
        let (bb, bf) = (bytes_moved(&base, &sp).expect("bytes"), bytes_moved(&bif, &sp).expect("bytes"));
        let inputs = random_inputs(&base, &point, 7).expect("inputs");
        // Warm-up, and the logits check.
        let a = steps[0].run(&point, &inputs).expect("baseline run");
        let c = steps[1].run(&point, &inputs).expect("bifurcated run");
        for (name, want) in &a {
            let err = norm_rel(&c[name], want);
            assert!(err <= tol, "b={b}: output `{name}`: bifurcated vs baseline norm-relative error {err:e} > {tol:e}");
        }
        drop((a, c));
        // Inputs in each step's storage dtypes, converted once (as the
        // runtime binds weights and caches): a timed run is the step alone.
        let stored: Vec<HashMap<String, Stored>> = steps
            .iter()
            .map(|step| {
                let is_input = |name: &str| {
                    step.program().buffers.iter().any(|b| b.name == name && matches!(b.kind, BufferKind::Input(_)))
                };
                inputs
                    .iter()
                    .filter(|(name, _)| is_input(name))
                    .map(|(name, t)| (name.clone(), step.store(name, t.clone()).expect("store")))
                    .collect()
            })
            .collect();
        let no_caps = BTreeMap::new();
        let mut times = vec![[Vec::with_capacity(runs), Vec::with_capacity(runs)]; threads.len()];
        for _ in 0..runs {
            for (n, &t) in threads.iter().enumerate() {
                for (k, step) in steps.iter_mut().enumerate() {
                    step.set_threads(t);
                    let start = Instant::now();
                    let out = step.run_stored(&point, &no_caps, &stored[k]).expect("run");
                    times[n][k].push(start.elapsed().as_secs_f64() * 1e3);
                    drop(out);
                }
            }
        }
        if std::env::var_os("BIFURC_BENCH_PROFILE").is_some() {
            // The profile runs at the last thread count timed.
            let peak = peaks.last().copied().unwrap_or(f64::NAN);
            for ((name, step), stored) in ["baseline", "bifurcated"].iter().zip(&steps).zip(&stored) {
                // Each kernel's median over `runs` profiled runs of the
                // bound step (the timed runs' inputs).
                let mut each: Vec<(String, Vec<f64>)> = Vec::new();
                for _ in 0..runs {
                    let (_, ks) = step.run_stored_profiled(&point, &no_caps, stored).expect("run");
                    if each.is_empty() {
                        each = ks.iter().map(|(k, _)| (k.clone(), Vec::with_capacity(runs))).collect();
                    }
                    for ((_, ts), (_, t)) in each.iter_mut().zip(&ks) {
                        ts.push(t.as_secs_f64());
                    }
                }
                let mut ks: Vec<(String, f64)> =
                    each.into_iter().map(|(k, ts)| (k, median(&ts).unwrap_or(f64::NAN))).collect();
                let total: f64 = ks.iter().map(|(_, t)| t * 1e3).sum();
                ks.sort_by(|a, b| b.1.total_cmp(&a.1));
                println!(
                    "    {name} at b={b}: kernels {total:.1} ms (medians of {runs} runs); slowest (share of the FMA \
                     peak; bytes moved by the plan's model a second):"
                );
                let bytes = step.kernel_bytes_at(&point);
                let program = step.program_at(&point);
                for (k, t) in ks.iter().take(env_or("BIFURC_BENCH_PROFILE_TOP", 8)) {
                    let at = program.kernels.iter().position(|x| &x.name == k);
                    let node = at.map(|i| program.kernels[i].node.as_str());
                    let moved = at.and_then(|i| bytes.get(i).copied().flatten()).map(|b| b as f64 / t / 1e9);
                    // The node in the graph the step compiled (its
                    // projections by weight panels are einsums there).
                    let sg = step.graph();
                    let j = node.and_then(|id| sg.nodes.iter().position(|n| n.id == id));
                    let mut macs = j.map_or(0.0, |j| node_multiply_adds(sg, j, &sp).expect("multiply-adds"));
                    // A fused context attention also does its w·V's.
                    let fused = at.and_then(|i| program.fused_of(&program.kernels[i]));
                    if let Some(values) = fused.and_then(|f| sg.nodes.iter().position(|n| n.id == f.values)) {
                        macs += node_multiply_adds(sg, values, &sp).expect("multiply-adds");
                    }
                    let share = if macs > 0.0 { format!("  ({:.0}%)", 100.0 * macs / peak / t) } else { String::new() };
                    let moved = moved.map(|r| format!("  {r:.1} GB/s")).unwrap_or_default();
                    println!("      {:>9.2} ms  {k}{share}{moved}", t * 1e3);
                }
            }
        }
        let macs = multiply_adds(&base, &sp).expect("multiply-adds");
        // What the bifurcated step's own plan moves (its softmax over the
        // scores in place, no concat or slice copies), at the read rate.
        let plan_bytes = steps[1].moved_at(&point);
        for (((t, [tb, tf]), peak), read) in threads.iter().zip(&times).zip(&peaks).zip(&reads) {
            let (tb, tf) = (median(tb).unwrap_or(f64::NAN), median(tf).unwrap_or(f64::NAN));
            let floor = macs / peak * 1e3;
            let mem = plan_bytes / read * 1e3;
            println!(
                "  {b:>4} {m_c:>6} {m_d:>5} {:>7} | {tb:>12.1} {tf:>12.1} {:>7.2}x | {:>10.1} {:>10.1} {:>8.2}x | {floor:>8.1} {:>5.0}% | {:>8.1} {mem:>6.1} {:>4.0}%",
                t.min(&rayon::current_num_threads()),
                tb / tf,
                bb.total() / 1e6,
                bf.total() / 1e6,
                bb.total() / bf.total(),
                100.0 * floor / tf,
                plan_bytes / 1e6,
                100.0 * mem / tf
            );
        }
    }
    println!("  outputs of both agree (norm-relative {tol:e}) at every point");
}
