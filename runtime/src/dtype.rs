//! Storage dtypes of manifest buffers and the conversions between them and
//! the `f32` host data of [`HostTensor`](crate::HostTensor).
//!
//! Floats are stored little-endian: `f32` as is, `f16`/`bf16` rounded to
//! nearest-even (the `half` crate). Integers (`i32`, `i64`: token ids,
//! positions) cross the [`Step`](crate::Step) interface as exact `f32`
//! values; converting one that is not a whole number in range is an error,
//! not a silent truncation.

use std::fmt;

/// A buffer's element type, as the manifest's `dtype` names it (also the
/// compiler's graph dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
}

/// A value that cannot be stored in the buffer's dtype.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DTypeError {
    #[error("unknown dtype `{0}` (known: f32, f16, bf16, i32, i64)")]
    Unknown(String),
    #[error("element {index} is {value}, which is not an exact {dtype} value")]
    NotInteger { index: usize, value: f32, dtype: DType },
    #[error("{got} bytes is not a whole number of {dtype} elements")]
    Ragged { got: usize, dtype: DType },
}

impl DType {
    /// Parses a manifest dtype name.
    pub fn parse(name: &str) -> Result<Self, DTypeError> {
        Ok(match name {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "i32" => DType::I32,
            "i64" => DType::I64,
            other => return Err(DTypeError::Unknown(other.to_string())),
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The manifest's name for it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    /// Encodes `values` in this dtype, appending to `out` (cleared first).
    /// Large float tensors (a model's weights) are encoded split across the
    /// cores.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) -> Result<(), DTypeError> {
        out.clear();
        match self {
            DType::F32 => encode_floats(values, out, 4, |v, b| b.copy_from_slice(&v.to_le_bytes())),
            DType::F16 => {
                encode_floats(values, out, 2, |v, b| b.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()))
            }
            DType::BF16 => encode_floats(values, out, 2, |v, b| {
                b.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes())
            }),
            DType::I32 => {
                out.reserve(values.len() * 4);
                for (index, &v) in values.iter().enumerate() {
                    let i = whole(v, i32::MIN as f64, i32::MAX as f64).ok_or(DTypeError::NotInteger {
                        index,
                        value: v,
                        dtype: self,
                    })?;
                    out.extend_from_slice(&(i as i32).to_le_bytes());
                }
            }
            DType::I64 => {
                out.reserve(values.len() * 8);
                for (index, &v) in values.iter().enumerate() {
                    let i = whole(v, i64::MIN as f64, i64::MAX as f64).ok_or(DTypeError::NotInteger {
                        index,
                        value: v,
                        dtype: self,
                    })?;
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
        }
        Ok(())
    }

    /// Encodes `values` in this dtype.
    pub fn encode(self, values: &[f32]) -> Result<Vec<u8>, DTypeError> {
        let mut out = Vec::new();
        self.encode_into(values, &mut out)?;
        Ok(out)
    }

    /// Decodes little-endian elements of this dtype to `f32` (integers
    /// beyond 2^24 lose precision, as everywhere on the `Step` interface).
    pub fn decode(self, bytes: &[u8]) -> Result<Vec<f32>, DTypeError> {
        if bytes.len() % self.size() != 0 {
            return Err(DTypeError::Ragged { got: bytes.len(), dtype: self });
        }
        Ok(match self {
            DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => {
                bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
            }
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
            DType::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
        })
    }
}

/// Values encoded below which one thread encodes them all.
const PARALLEL_ENCODE: usize = 1 << 20;

/// `values` encoded `size` bytes each by `put` into `out` (empty), split
/// across the cores for a large tensor.
fn encode_floats(values: &[f32], out: &mut Vec<u8>, size: usize, put: impl Fn(f32, &mut [u8]) + Sync) {
    out.resize(values.len() * size, 0);
    crate::parallel::fill_parts(out, size, PARALLEL_ENCODE, |first, bytes| {
        values[first..].iter().zip(bytes.chunks_exact_mut(size)).for_each(|(v, b)| put(*v, b));
    });
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `v` as an integer when it is a whole number within `[lo, hi]`.
fn whole(v: f32, lo: f64, hi: f64) -> Option<i64> {
    let d = f64::from(v);
    (d.is_finite() && d.fract() == 0.0 && d >= lo && d <= hi).then_some(d as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_sizes() {
        for (name, size) in [("f32", 4), ("f16", 2), ("bf16", 2), ("i32", 4), ("i64", 8)] {
            let d = DType::parse(name).unwrap();
            assert_eq!(d.size(), size);
            assert_eq!(d.name(), name);
        }
        assert!(DType::parse("f8").unwrap_err().to_string().contains("`f8`"));
    }

    #[test]
    fn round_trips_floats_with_rounding() {
        let values = [0.0, 1.0, -2.5, 3.140625, 65504.0, 1e-3];
        for d in [DType::F32, DType::F16, DType::BF16] {
            let back = d.decode(&d.encode(&values).unwrap()).unwrap();
            for (a, b) in values.iter().zip(&back) {
                let tol = match d {
                    DType::F32 => 0.0,
                    DType::F16 => a.abs() / 1024.0,
                    _ => a.abs() / 128.0,
                };
                assert!((a - b).abs() <= tol, "{d}: {a} -> {b}");
            }
        }
        // bf16 is the top half of f32, rounded to nearest even.
        assert_eq!(DType::BF16.encode(&[1.0]).unwrap(), vec![0x80, 0x3f]);
        assert_eq!(DType::F16.encode(&[1.0]).unwrap(), vec![0x00, 0x3c]);
    }

    #[test]
    fn large_tensors_encode_as_value_by_value() {
        let values: Vec<f32> = (0..3 * PARALLEL_ENCODE + 5).map(|i| (i as f32 * 0.37).sin() * 100.0).collect();
        let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16s: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect();
        let bf16s: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
        for (d, want) in [(DType::F32, f32s), (DType::F16, f16s), (DType::BF16, bf16s)] {
            assert!(d.encode(&values).unwrap() == want, "{d}");
        }
    }

    #[test]
    fn integers_must_be_exact() {
        assert_eq!(DType::I32.decode(&DType::I32.encode(&[0.0, 7.0, -3.0]).unwrap()).unwrap(), vec![0.0, 7.0, -3.0]);
        assert_eq!(DType::I64.encode(&[5.0]).unwrap(), 5i64.to_le_bytes().to_vec());
        let err = DType::I32.encode(&[1.0, 2.5]).unwrap_err();
        assert_eq!(err, DTypeError::NotInteger { index: 1, value: 2.5, dtype: DType::I32 });
        assert!(DType::I32.encode(&[f32::NAN]).is_err());
        assert!(DType::I32.encode(&[1e10]).is_err());
        assert!(DType::F32.decode(&[0, 0, 0]).is_err());
    }
}
