//! A tiny seedable generator for random weights, random caches and sampling.
//!
//! The same SplitMix64 and name hash as the compiler's reference interpreter
//! (`src/interp/random.rs` in the `bifurc` crate), so random weights drawn
//! here equal the interpreter's for the same seed and tensor name.

/// SplitMix64's state increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator for the stream named `name` under `seed` (the interpreter's
    /// per-input seeding: `seed ^ fnv1a(name)`).
    pub fn named(seed: u64, name: &str) -> Self {
        SplitMix64::new(seed ^ fnv1a(name))
    }

    /// The generator `n` draws ahead (each draw adds a constant to the
    /// state): the same numbers as drawing `n` and discarding them.
    pub fn jumped(&self, n: u64) -> Self {
        SplitMix64 { state: self.state.wrapping_add(n.wrapping_mul(GAMMA)) }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 random bits (every value exact in f32).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }

    /// Uniform integer in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// FNV-1a, 64 bits: a stable hash of a name (std's hasher may change between
/// Rust releases).
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // First outputs of the reference C implementation for seed 1234567.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        let mut u = SplitMix64::new(9);
        for _ in 0..1000 {
            assert!((-1.0..1.0).contains(&u.symmetric()));
            assert!((0.0..1.0).contains(&u.unit_f64()));
            assert!(u.below(7) < 7);
        }
        assert_eq!(fnv1a(""), 0xCBF2_9CE4_8422_2325);
        assert_ne!(fnv1a("a"), fnv1a("b"));
    }
}
