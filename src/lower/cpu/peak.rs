//! This machine's peak rate of f32 multiply-adds in JIT-compiled code:
//! independent chains of FMAs in the host's widest registers (16 chains of
//! `vector<16xf32>` with AVX-512, 12 of `vector<8xf32>` without: 16 chains
//! of 16 lanes would need 32 AVX2 registers, and spill), compiled with
//! [`super::CPU_PIPELINE`] like every kernel and run on each thread at
//! once. A step's multiply-adds divided by it is the
//! least time the step can take here (see `inspect::multiply_adds`).
//!
//! And its rate of reading memory: each thread sums its own stretch of a
//! buffer larger than the caches, all at once. A step's bytes (the bytes
//! model) divided by it is how long the step takes where every byte the
//! model counts crosses memory once: a step that takes about that long
//! is bound by memory (the bifurcated CPU step at b = 32, m_c = 8192 on a
//! 2-core VM that reads 29 GB/s: 535 MB, 18.4 ms, against a step of
//! 19.5-20 ms), and one that takes less found some of them in cache.

use std::ffi::c_void;
use std::time::Instant;

use super::Engine;
use crate::lower::LowerError;

/// Independent accumulator chains and the lanes of each (see the module
/// docs): enough to cover the FMA latency of every core we know (4
/// cycles, 2 pipes), and few enough to stay in registers with the two
/// constant operands.
fn chains_and_lanes() -> (usize, usize) {
    if crate::lower::emit::host_has_avx512() {
        (16, 16)
    } else {
        (12, 8)
    }
}
/// Loop trips of one timed call per thread (16 Mi vector FMAs, a few ms).
const TRIPS: i64 = 1 << 20;
/// Timed calls; the fastest counts (a shared machine's other cores are
/// now and then busy: two threads measured 64 and 122 G/s a few seconds
/// apart on a 2-core VM).
const TRIES: usize = 9;

/// The calibration kernel: `peak(n, out)` runs `n` trips of one FMA per
/// chain and stores the chains' sum in `*out` (so nothing is removed).
fn module(chains: usize, lanes: usize) -> String {
    let vty = format!("vector<{lanes}xf32>");
    let mut s =
        String::from("module {\n  func.func @peak(%n: i64, %out: !llvm.ptr) attributes {llvm.emit_c_interface} {\n");
    s += "    %c0 = arith.constant 0 : index\n    %c1 = arith.constant 1 : index\n";
    s += "    %trips = arith.index_cast %n : i64 to index\n";
    s += &format!("    %x = arith.constant dense<0.999> : {vty}\n    %y = arith.constant dense<1.0e-04> : {vty}\n");
    for c in 0..chains {
        // Distinct starts: equal chains would be merged into one.
        s += &format!("    %i{c} = arith.constant dense<{}.0e-02> : {vty}\n", c + 1);
    }
    let names = |p: &str| (0..chains).map(|c| format!("%{p}{c}")).collect::<Vec<_>>().join(", ");
    let iter: Vec<String> = (0..chains).map(|c| format!("%a{c} = %i{c}")).collect();
    let types = vec![vty.clone(); chains].join(", ");
    s += &format!(
        "    %r:{chains} = scf.for %k = %c0 to %trips step %c1 iter_args({}) -> ({types}) {{\n",
        iter.join(", ")
    );
    for c in 0..chains {
        s += &format!("      %b{c} = math.fma %a{c}, %x, %y : {vty}\n");
    }
    s += &format!("      scf.yield {} : {types}\n    }}\n", names("b"));
    s += &format!("    %s0 = arith.addf %r#0, %r#1 : {vty}\n");
    for c in 2..chains {
        s += &format!("    %s{} = arith.addf %s{}, %r#{c} : {vty}\n", c - 1, c - 2);
    }
    s += &format!("    %sum = vector.reduction <add>, %s{} : {vty} into f32\n", chains - 2);
    s += "    llvm.store %sum, %out : f32, !llvm.ptr\n    return\n  }\n}\n";
    s
}

/// Multiply-adds per second that `threads` threads running at once reach
/// at best on this machine (the fastest of a few timed runs).
pub fn peak_multiply_adds(threads: usize) -> Result<f64, LowerError> {
    let (chains, lanes) = chains_and_lanes();
    let engine = Engine::jit(&module(chains, lanes), "the peak-rate kernel")?;
    let entry = engine.entry("peak").ok_or_else(|| LowerError::Engine("peak-rate kernel not found".into()))?;
    let call = |trips: i64| {
        let (mut n, mut sum) = (trips, 0f32);
        let mut out = std::ptr::addr_of_mut!(sum);
        let mut args = [std::ptr::addr_of_mut!(n).cast::<c_void>(), std::ptr::addr_of_mut!(out).cast::<c_void>()];
        // SAFETY: `entry` is the packed wrapper of `peak(i64, ptr)`: it
        // reads an i64 through `args[0]` and a pointer through `args[1]`,
        // which points at `sum`, the one f32 it writes. All three live
        // until the call returns.
        unsafe { entry(args.as_mut_ptr()) };
        sum
    };
    call(1 << 10);
    let threads = threads.max(1);
    let mut best = f64::INFINITY;
    for _ in 0..TRIES {
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| call(TRIPS));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok((threads * chains * lanes) as f64 * TRIPS as f64 / best)
}

/// Running sums of [`sum_words`] (vectorized by LLVM).
const SUM_LANES: usize = 16;

/// Bytes each thread reads in [`memory_read_rate`]: past the last-level
/// cache's share of a thread on the machines we know (a 2-core VM read
/// 21-25 GB/s a core through 64 MiB, 15 through 128 and more).
const READ_BYTES_PER_THREAD: usize = 128 << 20;
/// At most this many bytes in all, however many threads.
const READ_BYTES_MOST: usize = 1 << 30;
/// Timed passes; the fastest counts.
const READ_TRIES: usize = 5;

/// Bytes per second that `threads` threads reading at once (each its own
/// stretch of memory, each element once, in order) reach at best on this
/// machine. The buffer is `threads` × 128 MiB, at most 1 GiB, and at most
/// a quarter of `available` bytes where that is given; less than 1 MiB a
/// thread is an error.
pub fn memory_read_rate(threads: usize, available: Option<usize>) -> Result<f64, LowerError> {
    let threads = threads.max(1);
    let mut total = (READ_BYTES_PER_THREAD * threads).min(READ_BYTES_MOST);
    if let Some(a) = available {
        total = total.min(a / 4);
    }
    let words = total / threads / std::mem::size_of::<u64>() / SUM_LANES * SUM_LANES;
    if words * std::mem::size_of::<u64>() < 1 << 20 {
        return Err(LowerError::Run(format!(
            "too little memory to measure its read rate: {} bytes available for {threads} threads",
            available.unwrap_or(0)
        )));
    }
    // Written once (every page touched), so the timed passes read memory.
    let stretches: Vec<Vec<u64>> = (0..threads).map(|t| vec![t as u64 + 1; words]).collect();
    let mut best = f64::INFINITY;
    for _ in 0..READ_TRIES {
        let start = Instant::now();
        std::thread::scope(|scope| {
            for s in &stretches {
                scope.spawn(move || std::hint::black_box(sum_words(s)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok((threads * words * std::mem::size_of::<u64>()) as f64 / best)
}

/// The wrapping sum of `words` in `SUM_LANES` running sums (vectorized:
/// integer adds reassociate), so the pass is bound by reading them.
fn sum_words(words: &[u64]) -> u64 {
    let mut lanes = [0u64; SUM_LANES];
    for chunk in words.chunks_exact(SUM_LANES) {
        for (l, w) in lanes.iter_mut().zip(chunk) {
            *l = l.wrapping_add(*w);
        }
    }
    lanes.iter().fold(0, |a, l| a.wrapping_add(*l))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel compiles and runs; its rate is a finite positive number
    /// no machine exceeds (10 T multiply-adds per second per thread), and
    /// two threads are not slower than one by much (they run at once).
    /// The calibration's chains and the two constants fit in the host's
    /// vector registers (32 of 512 bits with AVX-512, else 16 of 256): 16
    /// chains of 16 lanes on an AVX2 CPU needed 32, spilled, and measured
    /// 42-44 G/s on a 2-core Zen 3 VM that runs 101-107 G/s in registers.
    #[test]
    fn peak_chains_fit_in_registers() {
        let (chains, lanes) = chains_and_lanes();
        let (registers, bits) = if crate::lower::emit::host_has_avx512() { (32, 512) } else { (16, 256) };
        let per_chain = (lanes * 32).div_ceil(bits);
        assert!(chains * per_chain + 2 <= registers, "{chains} chains of {lanes} lanes in {registers} of {bits} bits");
        assert_eq!(module(chains, lanes).matches("math.fma").count(), chains);
    }

    #[test]
    fn peak_rate_is_measured() {
        let one = peak_multiply_adds(1).unwrap_or_else(|e| panic!("{e}"));
        assert!(one.is_finite() && one > 1e8 && one < 1e13, "{one}");
        let two = peak_multiply_adds(2).unwrap_or_else(|e| panic!("{e}"));
        assert!(two > 0.6 * one, "two threads {two} vs one {one}");
    }

    /// The read rate is a finite positive number no machine's memory
    /// reaches (10 TB/s), measured within what is available, and refused
    /// where too little is.
    #[test]
    fn read_rate_is_measured() {
        let rate = memory_read_rate(2, Some(64 << 20)).unwrap_or_else(|e| panic!("{e}"));
        assert!(rate.is_finite() && rate > 1e8 && rate < 1e13, "{rate}");
        let err = memory_read_rate(8, Some(16 << 20)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("too little memory to measure its read rate"), "{err}");
        assert_eq!(sum_words(&[1, 2, 3]), 0, "a partial chunk is not read");
        assert_eq!(sum_words(&(1..=32).collect::<Vec<u64>>()), 528);
    }
}
