//! Host-side buffers in storage dtypes, and conversions to and from the
//! interpreter's f32 [`Tensor`].

use std::ffi::c_void;

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use super::lines::Lines;
use crate::interp::{Tensor, MAX_EXACT_INT};
use crate::ir::DType;
use crate::lower::LowerError;

/// One buffer's elements in its storage type, starting a cache line.
/// Always at least one element long, so its pointer is valid even for a
/// zero-size buffer.
pub(crate) enum HostData {
    F32(Lines<f32>),
    /// f16 or bf16 bits.
    U16(Lines<u16>),
    I32(Lines<i32>),
    I64(Lines<i64>),
}

impl HostData {
    /// `n` zeros (at least one element is allocated).
    pub(crate) fn zeros(dtype: DType, n: usize) -> Self {
        let n = n.max(1);
        match dtype {
            DType::F32 => HostData::F32(Lines::zeros(n)),
            DType::F16 | DType::BF16 => HostData::U16(Lines::zeros(n)),
            DType::I32 => HostData::I32(Lines::zeros(n)),
            DType::I64 => HostData::I64(Lines::zeros(n)),
        }
    }

    /// `n` zeros (at least one) for a buffer the step hands back, moved
    /// out by [`HostData::into_tensor`] where it is f32 ([`Lines::returned`]).
    pub(crate) fn returned(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F32 => HostData::F32(Lines::returned(n.max(1))),
            _ => Self::zeros(dtype, n),
        }
    }

    /// Whether this holds storage of `dtype`.
    pub(crate) fn dtype_is(&self, dtype: DType) -> bool {
        matches!(
            (self, dtype),
            (HostData::F32(_), DType::F32)
                | (HostData::U16(_), DType::F16 | DType::BF16)
                | (HostData::I32(_), DType::I32)
                | (HostData::I64(_), DType::I64)
        )
    }

    /// `n` elements (at least one) of unspecified values, in this memory
    /// when it is large enough (see `Lines::reuse`: a larger allocation
    /// otherwise, with room to grow, nothing copied). For an intermediate,
    /// which its kernel writes whole before any kernel reads it: clearing
    /// it first cost a pass over every intermediate per step (about 68 MB
    /// at b = 32, m_c = 8192 in cpu_step, on one thread), and keeping its
    /// values when it grew copied a prefill step's scores at every chunk
    /// (their rows a chunk longer each time).
    pub(crate) fn reuse(&mut self, n: usize) {
        let n = n.max(1);
        match self {
            HostData::F32(v) => v.reuse(n),
            HostData::U16(v) => v.reuse(n),
            HostData::I32(v) => v.reuse(n),
            HostData::I64(v) => v.reuse(n),
        }
    }

    /// Room for `n` elements (at least one), every page mapped in now (see
    /// `Lines::reserve`); the values are unspecified.
    pub(crate) fn reserve(&mut self, n: usize) {
        let n = n.max(1);
        match self {
            HostData::F32(v) => v.reserve(n),
            HostData::U16(v) => v.reserve(n),
            HostData::I32(v) => v.reserve(n),
            HostData::I64(v) => v.reserve(n),
        }
    }

    /// Every element set to a value no kernel computes from finite inputs
    /// (NaN, or the extreme integer): for checking that nothing reads an
    /// element before its kernel writes it.
    #[cfg(test)]
    pub(crate) fn poison(&mut self) {
        match self {
            HostData::F32(v) => v.fill(f32::NAN),
            HostData::U16(v) => v.fill(0x7fc1),
            HostData::I32(v) => v.fill(i32::MIN),
            HostData::I64(v) => v.fill(i64::MIN),
        }
    }

    /// Converts `t` (f32 values) to storage `dtype`. Integer dtypes need
    /// exact integers of magnitude `<= 2^24` (as the interpreter does).
    pub(crate) fn from_tensor(dtype: DType, t: &Tensor, name: &str) -> Result<Self, LowerError> {
        Self::from_values(dtype, &t.data, name)
    }

    /// [`HostData::from_tensor`] of a tensor's values.
    pub(crate) fn from_values(dtype: DType, values: &[f32], name: &str) -> Result<Self, LowerError> {
        let ints = || -> Result<Vec<i64>, LowerError> {
            values
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if v.is_finite() && v.fract() == 0.0 && f64::from(v).abs() <= MAX_EXACT_INT as f64 {
                        Ok(v as i64)
                    } else {
                        Err(LowerError::Run(format!(
                            "input `{name}`: element {i} is {v}, not an integer of magnitude <= 2^24"
                        )))
                    }
                })
                .collect()
        };
        let mut out = match dtype {
            DType::F32 => HostData::F32(Lines::from(values)),
            DType::BF16 => HostData::U16(halves(values, to_bf16_bits)),
            DType::F16 => HostData::U16(halves(values, to_f16_bits)),
            // |v| <= 2^24 fits i32.
            DType::I32 => HostData::I32(Lines::collect(ints()?.into_iter().map(|v| v as i32))),
            DType::I64 => HostData::I64(ints()?.into()),
        };
        if values.is_empty() {
            out = HostData::zeros(dtype, 0);
        }
        Ok(out)
    }

    /// The first `n` elements as f32, shaped `shape` (f32 data is moved
    /// when it starts its allocation, else copied).
    pub(crate) fn into_tensor(self, dtype: DType, shape: Vec<usize>, n: usize) -> Tensor {
        let data: Vec<f32> = match self {
            HostData::F32(v) => {
                let mut v = v.into_vec();
                v.truncate(n);
                v
            }
            HostData::U16(v) if dtype == DType::F16 => v.iter().take(n).map(|&h| f16_to_f32(h)).collect(),
            HostData::U16(v) => v.iter().take(n).map(|&h| bf16_to_f32(h)).collect(),
            HostData::I32(v) => v.iter().take(n).map(|&x| x as f32).collect(),
            HostData::I64(v) => v.iter().take(n).map(|&x| x as f32).collect(),
        };
        Tensor { shape, data }
    }

    /// Elements held.
    pub(crate) fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::U16(v) => v.len(),
            HostData::I32(v) => v.len(),
            HostData::I64(v) => v.len(),
        }
    }

    /// Pointer to the first element, for reading only.
    pub(crate) fn const_ptr(&self) -> *const c_void {
        match self {
            HostData::F32(v) => v.as_ptr().cast(),
            HostData::U16(v) => v.as_ptr().cast(),
            HostData::I32(v) => v.as_ptr().cast(),
            HostData::I64(v) => v.as_ptr().cast(),
        }
    }

    /// Pointer to the first element (never null, never dangling).
    pub(crate) fn ptr(&mut self) -> *mut c_void {
        match self {
            HostData::F32(v) => v.as_mut_ptr().cast(),
            HostData::U16(v) => v.as_mut_ptr().cast(),
            HostData::I32(v) => v.as_mut_ptr().cast(),
            HostData::I64(v) => v.as_mut_ptr().cast(),
        }
    }

    /// `n` elements of float `dtype` (f32, f16, bf16), made `piece` at a
    /// time in parallel: `fill(i, buf)` writes piece `i` (elements
    /// `i·piece..`; the last may be shorter) in f32 into `buf`, zeros
    /// when called, which is converted to `dtype` as it goes. A weight
    /// kept in another layout is made this way from the caller's values,
    /// with no f32 copy of the whole beside its storage (Llama-3-8B's bf16
    /// `lm_head`: 2.1 GB).
    pub(crate) fn float_pieces(
        dtype: DType,
        n: usize,
        piece: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Self, LowerError> {
        let piece = piece.max(1);
        let halves = |convert: fn(&mut [u16], &[f32])| {
            let mut out = Lines::<u16>::zeros(n.max(1));
            out[..n].par_chunks_mut(piece).enumerate().for_each_init(
                || vec![0.0f32; piece],
                |buf, (i, bits)| {
                    let buf = &mut buf[..bits.len()];
                    buf.fill(0.0);
                    fill(i, buf);
                    convert(bits, buf);
                },
            );
            out
        };
        Ok(match dtype {
            DType::F32 => {
                let mut out = Lines::<f32>::zeros(n.max(1));
                out[..n].par_chunks_mut(piece).enumerate().for_each(|(i, buf)| fill(i, buf));
                HostData::F32(out)
            }
            DType::BF16 => HostData::U16(halves(to_bf16_bits)),
            DType::F16 => HostData::U16(halves(to_f16_bits)),
            DType::I32 | DType::I64 => {
                return Err(LowerError::Run(format!("{dtype:?} storage is not made from float pieces")))
            }
        })
    }
}

/// `values` converted to half-precision bits by `convert` (one part of
/// the values into the same part of the bits), in memory that starts a
/// line, in parallel parts. A weight is converted once, when bound, but a
/// 7B model's are 6.7 billion values: converted one call per value, on
/// one thread, they took about a fifth of its 68 s of binding random
/// weights (two cores).
fn halves(values: &[f32], convert: impl Fn(&mut [u16], &[f32]) + Sync) -> Lines<u16> {
    const PART: usize = 1 << 16;
    let mut out = Lines::<u16>::zeros(values.len());
    out.par_chunks_mut(PART).zip(values.par_chunks(PART)).for_each(|(bits, part)| convert(bits, part));
    out
}

/// [`f32_to_f16`] of every value, by the `half` crate's slice conversion
/// (F16C vectors where the CPU has them; the same rounding).
fn to_f16_bits(bits: &mut [u16], values: &[f32]) {
    let h: &mut [half::f16] = bits.reinterpret_cast_mut();
    h.convert_from_f32_slice(values);
}

/// [`f32_to_bf16`] of every value, by the `half` crate's slice conversion.
fn to_bf16_bits(bits: &mut [u16], values: &[f32]) {
    let h: &mut [half::bf16] = bits.reinterpret_cast_mut();
    h.convert_from_f32_slice(values);
}

// The conversions of the runtime's dtype encoding (the `half` crate), so
// the CPU step stores a value exactly as `bifurc run` encodes it.

/// f32 → bfloat16 bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// bfloat16 bits → f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    half::bf16::from_bits(h).to_f32()
}

/// f32 → IEEE half bits, round to nearest even (overflow gives infinity).
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// IEEE half bits → f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0); // tie → even
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::NEG_INFINITY)), f32::NEG_INFINITY);
    }

    #[test]
    fn f16_round_trips_and_rounds() {
        for x in [0.0f32, 1.0, -2.5, 65504.0, 6.1035156e-5, 5.9604645e-8, 0.33325195] {
            assert_eq!(f16_to_f32(f32_to_f16(x)), x, "{x}");
        }
        assert_eq!(f16_to_f32(f32_to_f16(1.0 + 1.0 / 2048.0)), 1.0); // tie → even
        assert_eq!(f16_to_f32(f32_to_f16(1e6)), f32::INFINITY);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        assert_eq!(f16_to_f32(f32_to_f16(-1e-9)), 0.0);
    }

    /// Stored values converted by parts in parallel, with the slice
    /// conversion, are the per-value conversion's bits: over several
    /// parts, f32 bit patterns of every exponent (normal, subnormal,
    /// overflowing, ties, signed zeros, infinities) and NaNs (payloads
    /// included).
    #[test]
    fn half_stores_convert_as_one_value_at_a_time() {
        let mut bits = 0x0123_4567u32;
        let mut values: Vec<f32> = (0..300_000)
            .map(|_| {
                bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                f32::from_bits(bits)
            })
            .collect();
        values.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.0 + 1.0 / 2048.0, 65520.0, 1e-8]);
        for (dtype, scalar) in [(DType::F16, f32_to_f16 as fn(f32) -> u16), (DType::BF16, f32_to_bf16)] {
            let HostData::U16(got) = HostData::from_values(dtype, &values, "w").unwrap_or_else(|e| panic!("{e}"))
            else {
                panic!("{dtype:?} not stored as 16-bit words");
            };
            assert_eq!(got.len(), values.len());
            for (i, (&x, &g)) in values.iter().zip(got.iter()).enumerate() {
                assert_eq!(g, scalar(x), "{dtype:?} #{i}: {x:e} ({:#x})", x.to_bits());
            }
        }
    }

    /// A buffer the step hands back becomes the returned tensor's data
    /// without a copy (its allocation, 16 bytes past a page for a large
    /// one, does not start a line: an aligned buffer was copied, into
    /// fresh pages, at every run); a half-precision one is converted.
    #[test]
    fn returned_f32_buffers_are_moved_out() {
        let n = 1 << 20;
        let mut h = HostData::returned(DType::F32, n);
        let written = h.ptr();
        if let HostData::F32(v) = &mut h {
            v[n - 1] = 3.5;
        }
        let t = h.into_tensor(DType::F32, vec![n], n);
        assert_eq!(t.data.as_ptr().cast::<c_void>(), written.cast_const(), "moved, not copied");
        assert_eq!((t.data.len(), t.data[n - 1], t.data[0]), (n, 3.5, 0.0));
        let half = HostData::returned(DType::BF16, 4).into_tensor(DType::BF16, vec![4], 4);
        assert_eq!(half.data, [0.0; 4]);
    }
}
