//! A checkpoint stays on disk: opening it reads its header, and each tensor
//! is read from the file when it is asked for, in chunks. Its own test
//! binary, so that no other test's allocations move this process's
//! resident memory while it is measured.
#![cfg(target_os = "linux")]

use bifurc_runtime::weights::WeightFiles;
use std::io::{BufWriter, Write};
use std::path::Path;

/// bf16 elements of the large tensor: 48 MiB and a bit, several of the
/// reader's chunks (4 MiB) and a partial one.
const BIG: usize = (24 << 20) + 777;

/// The large tensor's element `i`: an integer in -125..=125, exact in bf16.
fn big_value(i: usize) -> f32 {
    (i % 251) as f32 - 125.0
}

/// This process's resident memory (`VmRSS`), in KiB.
fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes a safetensors file of a small f32 tensor `small` ([1, 2, 3])
/// and the bf16 tensor `big` ([`BIG`] elements, [`big_value`]), streamed:
/// the test never holds the file in memory.
fn write_checkpoint(path: &Path) {
    let header = format!(
        r#"{{"small":{{"dtype":"F32","shape":[3],"data_offsets":[0,12]}},"big":{{"dtype":"BF16","shape":[{BIG}],"data_offsets":[12,{}]}}}}"#,
        12 + 2 * BIG
    );
    let mut out = BufWriter::new(std::fs::File::create(path).unwrap());
    out.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    out.write_all(header.as_bytes()).unwrap();
    for v in [1.0f32, 2.0, 3.0] {
        out.write_all(&v.to_le_bytes()).unwrap();
    }
    for i in 0..BIG {
        out.write_all(&half::bf16::from_f32(big_value(i)).to_bits().to_le_bytes()).unwrap();
    }
    out.flush().unwrap();
}

/// An engine may open a checkpoint on one thread and bind from another,
/// or read tensors from several at once (each file's reads take turns).
#[test]
fn weight_files_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<WeightFiles>();
}

#[test]
fn opening_reads_the_header_and_tensors_come_from_the_file() {
    let dir = std::env::temp_dir().join(format!("bifurc-weights-on-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    write_checkpoint(&path);

    let before = resident_kib();
    let files = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
    let grown = resident_kib().saturating_sub(before);
    // Reading the file into memory would take its 48 MiB.
    assert!(grown < 8 << 10, "opening a 48 MiB checkpoint grew this process by {grown} KiB");

    assert_eq!(files.names(), ["big", "small"]);
    assert_eq!(files.tensor("small", &[3]).unwrap().data, [1.0, 2.0, 3.0]);
    let big = files.tensor("big", &[BIG]).unwrap();
    assert_eq!(big.shape, [BIG]);
    assert_eq!(big.data.len(), BIG);
    for (i, &v) in big.data.iter().enumerate() {
        assert_eq!(v, big_value(i), "element {i}");
    }
    // Read twice: each read seeks to its tensor.
    assert_eq!(files.tensor("small", &[3]).unwrap().data, [1.0, 2.0, 3.0]);
    std::fs::remove_dir_all(&dir).ok();
}
