//! f32 rounded to bf16 on the CPU, as integer operations whose vector
//! form LLVM keeps in vectors.
//!
//! `arith.truncf` to bf16 reaches LLVM through `arith-expand{include-bf16}`
//! (the CPU pipeline: no soft-float calls), which rounds to nearest even
//! in 32-bit integers, truncates to 16 bits and then picks the quiet NaN
//! `0x7FC0` for NaN lanes by a `select` of 16-bit lanes. LLVM's x86
//! backend takes that select (an f32 compare's mask narrowed to 16-bit
//! lanes) apart lane by lane on AVX2: a `vucomiss`, a `cmov` and the
//! moves in and out of general registers for each element. The bf16
//! cpu_step's context `q·K` rounds 256 scores a tile of 16 × 16 after
//! only 64 steps of its sum, so that took about as long as the FMAs, and
//! the softmax's last pass (vectorized by LLVM) went the same way.
//!
//! Here the same arithmetic picks the NaN in 32-bit lanes, before the
//! truncation (`0x7FC0` fits in 16 bits, so the two orders give the same
//! bits): an f32 compare's mask selects 32-bit lanes (`vblendvps`), and
//! the truncation of lanes whose high halves are zero packs them. Bit for
//! bit `arith.truncf`'s result (a test compares the two on every class of
//! input), so the outputs are the same. The bf16 cpu_step (b = 32, m_c =
//! 8192) on one thread of a 2-core Zen 3 VM, three runs alternated with
//! the build before (profiled medians, both layers): the context q·K
//! 24.1-38.3 -> 15.0-16.0 ms, the softmax 10.6-17.4 -> 6.8-7.1; the
//! kernels 95.7-140.1 -> 81.0-84.2 ms. f32 modules are the same text.
//! The GPU keeps `arith.truncf` (one conversion instruction there;
//! `Builder::bf16_in_ints` is set for CPU kernels only).

use super::builder::Builder;

/// The rounding bias less the kept bits' lowest (`0x7FFF`), and the bf16
/// quiet NaN the expansion gives for every NaN.
const BIAS: i32 = 0x7FFF;
const QUIET_NAN: i32 = 0x7FC0;

impl Builder {
    /// The bf16 bits (`i16`, or `vector<lanes x i16>` where `lanes` is
    /// given) of f32 `x` (`f32` or `vector<lanes x f32>`) rounded to
    /// nearest, ties to even; NaN gives `0x7FC0`; infinities stay
    /// infinities (their zero mantissa takes no carry).
    pub(crate) fn bf16_bits(&mut self, x: &str, lanes: Option<usize>) -> String {
        let picked = self.bf16_bits_in_i32(x, lanes);
        let (ity, hty) = (Self::lanes_of("i32", lanes), Self::lanes_of("i16", lanes));
        self.op(&format!("arith.trunci {picked} : {ity} to {hty}"))
    }

    /// f32 `x` (`f32` or `vector<lanes x f32>`) rounded to bf16 as
    /// [`Builder::bf16_bits`] rounds it, and widened back to f32: the value
    /// a bf16 buffer would hold, without storing it.
    pub(crate) fn rounded_to_bf16(&mut self, x: &str, lanes: Option<usize>) -> String {
        let picked = self.bf16_bits_in_i32(x, lanes);
        let (fty, ity) = (Self::lanes_of("f32", lanes), Self::lanes_of("i32", lanes));
        let sixteen = match lanes {
            Some(_) => self.hoist(&format!("arith.constant dense<16> : {ity}")),
            None => self.i32(16),
        };
        let high = self.op(&format!("arith.shli {picked}, {sixteen} : {ity}"));
        self.op(&format!("arith.bitcast {high} : {ity} to {fty}"))
    }

    /// `elem`, or a `vector<lanes x elem>`.
    fn lanes_of(elem: &str, lanes: Option<usize>) -> String {
        match lanes {
            Some(n) => format!("vector<{n}x{elem}>"),
            None => elem.to_owned(),
        }
    }

    /// [`Builder::bf16_bits`] before the truncation: the bits in the low
    /// half of 32-bit lanes.
    fn bf16_bits_in_i32(&mut self, x: &str, lanes: Option<usize>) -> String {
        let (fty, ity) = (Self::lanes_of("f32", lanes), Self::lanes_of("i32", lanes));
        let shape = |elem: &str| Self::lanes_of(elem, lanes);
        let constant = |b: &mut Self, c: i32| match lanes {
            Some(_) => b.hoist(&format!("arith.constant dense<{c}> : {ity}")),
            None => b.i32(c),
        };
        let (sixteen, one, bias, nan) =
            (constant(self, 16), constant(self, 1), constant(self, BIAS), constant(self, QUIET_NAN));
        let bits = self.op(&format!("arith.bitcast {x} : {fty} to {ity}"));
        let kept = self.op(&format!("arith.shrui {bits}, {sixteen} : {ity}"));
        let lowest = self.op(&format!("arith.andi {kept}, {one} : {ity}"));
        let bias = self.op(&format!("arith.addi {lowest}, {bias} : {ity}"));
        let biased = self.op(&format!("arith.addi {bits}, {bias} : {ity}"));
        let rounded = self.op(&format!("arith.shrui {biased}, {sixteen} : {ity}"));
        let is_nan = self.op(&format!("arith.cmpf une, {x}, {x} : {fty}"));
        self.op(&format!("arith.select {is_nan}, {nan}, {rounded} : {}, {ity}", shape("i1")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every class of input: zeros, subnormals, values on either side of
    /// a tie and exactly on one (odd and even kept bits), the largest
    /// finite (rounds to infinity), infinities, NaNs of either sign and
    /// payload, and a spread of bit patterns. Each rounded by
    /// `arith.truncf` (expanded by the CPU pipeline) and by
    /// [`Builder::bf16_bits`] in vectors of 16 and one at a time, and by
    /// [`Builder::rounded_to_bf16`] (its high halves), in one JIT-compiled
    /// function: the same bits.
    #[test]
    fn bf16_bits_match_truncf() {
        let mut xs: Vec<f32> = [
            0x0000_0000_u32,
            0x8000_0000,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x0080_0000,
            0x3F80_0000,
            0x3F80_7FFF,
            0x3F80_8000,
            0x3F80_8001,
            0x3F81_8000,
            0xBF81_8000,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F7F_8000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0xFFC0_0000,
            0x7F80_0001,
            0xFFC1_2345,
            0x7FFF_FFFF,
        ]
        .into_iter()
        .map(f32::from_bits)
        .collect();
        let mut s = 0x1234_5678_u32;
        while xs.len() % LANES != 0 || xs.len() < 256 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            xs.push(f32::from_bits(s));
        }
        let text = module();
        for chunk in xs.chunks(LANES) {
            let out = crate::lower::cpu::run_in_out_test(&text, "round", chunk, 4 * LANES);
            for (l, x) in chunk.iter().enumerate() {
                let (want, vector, scalar) = (out[l], out[LANES + l], out[2 * LANES + l]);
                assert_eq!(vector, want, "vector: {:#010x} -> {vector:#06x}, truncf {want:#06x}", x.to_bits());
                assert_eq!(scalar, want, "scalar: {:#010x} -> {scalar:#06x}, truncf {want:#06x}", x.to_bits());
                let widened = out[3 * LANES + l];
                assert_eq!(widened, want, "widened: {:#010x} -> {widened:#06x}, truncf {want:#06x}", x.to_bits());
            }
        }
    }

    const LANES: usize = 16;

    /// `round(%in, %out)`: 16 f32 from `in`; to `out`, as 16-bit lanes,
    /// `arith.truncf`'s bits, then [`Builder::bf16_bits`]'s in a vector,
    /// then one lane at a time, then [`Builder::rounded_to_bf16`]'s high
    /// halves.
    fn module() -> String {
        let mut b = Builder::new(&[]);
        let vty = format!("vector<{LANES}xf32>");
        let hty = format!("vector<{LANES}xi16>");
        let x = b.op(&format!("llvm.load %in {{alignment = 4 : i64}} : !llvm.ptr -> {vty}"));
        let t = b.op(&format!("arith.truncf {x} : {vty} to vector<{LANES}xbf16>"));
        let t = b.op(&format!("arith.bitcast {t} : vector<{LANES}xbf16> to {hty}"));
        b.line(&format!("llvm.store {t}, %out {{alignment = 2 : i64}} : {hty}, !llvm.ptr"));
        let v = b.bf16_bits(&x, Some(LANES));
        let p = b.op(&format!("llvm.getelementptr %out[{LANES}] : (!llvm.ptr) -> !llvm.ptr, i16"));
        b.line(&format!("llvm.store {v}, {p} {{alignment = 2 : i64}} : {hty}, !llvm.ptr"));
        for l in 0..LANES {
            let e = b.op(&format!("vector.extract {x}[{l}] : f32 from {vty}"));
            let h = b.bf16_bits(&e, None);
            let p = b.op(&format!("llvm.getelementptr %out[{}] : (!llvm.ptr) -> !llvm.ptr, i16", 2 * LANES + l));
            b.line(&format!("llvm.store {h}, {p} : i16, !llvm.ptr"));
        }
        // Rounded and widened back: its high halves.
        let ity = format!("vector<{LANES}xi32>");
        let r = b.rounded_to_bf16(&x, Some(LANES));
        let r = b.op(&format!("arith.bitcast {r} : {vty} to {ity}"));
        let sixteen = b.hoist(&format!("arith.constant dense<16> : {ity}"));
        let r = b.op(&format!("arith.shrui {r}, {sixteen} : {ity}"));
        let r = b.op(&format!("arith.trunci {r} : {ity} to {hty}"));
        let p = b.op(&format!("llvm.getelementptr %out[{}] : (!llvm.ptr) -> !llvm.ptr, i16", 3 * LANES));
        b.line(&format!("llvm.store {r}, {p} {{alignment = 2 : i64}} : {hty}, !llvm.ptr"));
        let (hoist, body) = b.finish();
        format!(
            "module {{\n  func.func @round(%in: !llvm.ptr, %out: !llvm.ptr) attributes {{llvm.emit_c_interface}} {{\n{hoist}{body}    return\n  }}\n}}\n"
        )
    }
}
