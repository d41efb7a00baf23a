//! `bifurc run --prefill` on the CPU holds the weights once: the prefill
//! step shares the decode step's (both store them alike). Its own test
//! binary, so that the children's peak resident memory it reads
//! (`getrusage(RUSAGE_CHILDREN)`) is only that of the runs below.
#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::process::Command;

fn bifurc(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_bifurc")).current_dir(dir).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "bifurc {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The largest peak resident memory of the children waited for so far, in KiB.
fn children_peak_kib() -> i64 {
    // SAFETY: `getrusage` fills the `rusage` it is given; a zeroed one is
    // a valid value of that plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable `rusage`.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss
}

#[test]
fn a_prefill_step_shares_the_decode_steps_weights() {
    if common::toolchain_path("BIFURC_LIBDEVICE").is_none() {
        return;
    }
    let dir = common::scratch("prefill-memory", "llama");
    // examples/tiny grown so that its weights dominate the process:
    // 91M parameters, 365 MB in f32.
    let tiny = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&tiny).unwrap();
    for (key, value) in [
        ("hidden_size", 1024),
        ("intermediate_size", 2816),
        ("num_attention_heads", 16),
        ("num_key_value_heads", 16),
        ("head_dim", 64),
        ("vocab_size", 32000),
    ] {
        config[key] = value.into();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    bifurc(&dir, &["import-hf", "config.json", "-o", "decode.json"]);
    bifurc(&dir, &["import-hf", "config.json", "--new-tokens", "8", "-o", "prefill.json"]);
    bifurc(&dir, &["compile", "decode.json", "-o", "decode.ptx"]);
    bifurc(&dir, &["compile", "prefill.json", "-o", "prefill.ptx"]);

    let run = ["run", "decode.ptx", "--random-weights", "--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17"];
    let run = [&run[..], &["--samples", "2", "--steps", "2", "--temperature", "0", "--json"]].concat();
    let stepped = bifurc(&dir, &run);
    let alone = children_peak_kib();
    let prefilled = bifurc(&dir, &[&run[..], &["--prefill", "prefill.ptx"]].concat());
    let with_prefill = children_peak_kib();

    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    let (stepped, prefilled) = (json(&stepped), json(&prefilled));
    // A second copy of the weights would add 365 MB.
    let grown = with_prefill - alone;
    eprintln!("peak {alone} KiB alone, {with_prefill} KiB with the prefill step");
    assert!(grown < 64 << 10, "the prefill step added {grown} KiB to the peak");
    assert_eq!(prefilled["tokens"], stepped["tokens"], "prefilled and stepped contexts decode alike");
    assert_eq!(prefilled["prefill"]["shared_weights"], 21, "every weight shared");
    assert!(stepped.get("prefill").is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}
