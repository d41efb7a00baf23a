//! Dense row-major f32 tensors.

use super::InterpError;

/// A dense, row-major tensor of `f32`.
///
/// Integer tensors (token ids, positions; dtype `i32`/`i64`) are stored as
/// `f32` holding exact integers. That is exact for `|v| <= 2^24`
/// (16,777,216); [`crate::interp::run`] rejects integer inputs outside that
/// range or with a fractional part.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Size of every axis; `[]` is a scalar (one element).
    pub shape: Vec<usize>,
    /// `numel()` elements, last axis fastest.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor from its shape and data; errors when the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, InterpError> {
        let t = Tensor { shape, data };
        t.check("Tensor::new")?;
        Ok(t)
    }

    /// A tensor of integers (ids, positions), stored exactly as `f32`.
    /// Errors when the lengths disagree or a value is beyond `2^24`.
    pub fn from_ints(shape: Vec<usize>, values: &[i64]) -> Result<Self, InterpError> {
        if let Some((index, &v)) = values.iter().enumerate().find(|(_, v)| v.abs() > MAX_EXACT_INT) {
            return Err(InterpError::NotInteger { name: "Tensor::from_ints".into(), index, value: v as f64 });
        }
        Tensor::new(shape, values.iter().map(|&v| v as f32).collect())
    }

    /// A tensor filled with `0.0`. Like `vec!`, the constructors that
    /// allocate panic if the element count does not fit in memory.
    pub fn zeros(shape: Vec<usize>) -> Self {
        Tensor::full(shape, 0.0)
    }

    /// A tensor filled with `value`.
    pub fn full(shape: Vec<usize>, value: f32) -> Self {
        let n = numel(&shape);
        Tensor { shape, data: vec![value; n] }
    }

    /// A tensor whose element at multi-index `idx` is `f(idx)`.
    pub fn from_fn(shape: Vec<usize>, mut f: impl FnMut(&[usize]) -> f32) -> Self {
        let n = numel(&shape);
        let mut data = Vec::with_capacity(n);
        let mut idx = vec![0usize; shape.len()];
        for _ in 0..n {
            data.push(f(&idx));
            for (i, s) in idx.iter_mut().zip(&shape).rev() {
                *i += 1;
                if *i < *s {
                    break;
                }
                *i = 0;
            }
        }
        Tensor { shape, data }
    }

    /// A rank-0 tensor.
    pub fn scalar(value: f32) -> Self {
        Tensor { shape: Vec::new(), data: vec![value] }
    }

    /// Number of elements: the product of the shape (saturating).
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Row-major strides, in elements.
    pub fn strides(&self) -> Vec<usize> {
        strides(&self.shape)
    }

    /// The element at multi-index `idx`, or `None` if `idx` is out of range
    /// or has the wrong rank.
    pub fn get(&self, idx: &[usize]) -> Option<f32> {
        if idx.len() != self.shape.len() || idx.iter().zip(&self.shape).any(|(i, s)| i >= s) {
            return None;
        }
        let off: usize = idx.iter().zip(self.strides()).map(|(i, s)| i * s).sum();
        self.data.get(off).copied()
    }

    /// Compares with `other` elementwise: shapes equal and, per element,
    /// `|a - b| <= atol + rtol * |b|`; non-finite values must match exactly
    /// (NaN matches NaN). The error names the first element that differs and
    /// the largest finite difference.
    pub fn check_close(&self, other: &Tensor, rtol: f32, atol: f32) -> Result<(), String> {
        if self.shape != other.shape || self.data.len() != other.data.len() {
            return Err(format!("shape {:?} vs {:?}", self.shape, other.shape));
        }
        let mut first = None;
        let mut worst = 0.0f32;
        for (i, (&a, &b)) in self.data.iter().zip(&other.data).enumerate() {
            let ok = if a.is_finite() && b.is_finite() {
                worst = worst.max((a - b).abs());
                (a - b).abs() <= atol + rtol * b.abs()
            } else {
                a == b || (a.is_nan() && b.is_nan())
            };
            if !ok && first.is_none() {
                first = Some((i, a, b));
            }
        }
        match first {
            None => Ok(()),
            Some((i, a, b)) => Err(format!(
                "element {i} (index {:?}): {a} vs {b} (largest difference {worst:e})",
                unravel(i, &self.shape)
            )),
        }
    }

    /// Checks that `data` has `numel()` elements; `name` goes into the error.
    pub(crate) fn check(&self, name: &str) -> Result<(), InterpError> {
        let want = checked_numel(&self.shape);
        if want != Some(self.data.len()) {
            return Err(InterpError::TensorLength {
                name: name.into(),
                shape: self.shape.clone(),
                len: self.data.len(),
            });
        }
        Ok(())
    }
}

/// Largest integer magnitude an f32 holds exactly with all smaller ones: 2^24.
pub const MAX_EXACT_INT: i64 = 1 << 24;

/// Product of a shape, saturating at `usize::MAX`.
pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
}

/// Product of a shape, `None` on overflow.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Row-major strides of a shape, in elements.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut out = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        out[i] = out[i + 1].saturating_mul(shape[i + 1]);
    }
    out
}

/// Flat offset → multi-index.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (i, &s) in shape.iter().enumerate().rev() {
        if s > 0 {
            idx[i] = flat % s;
            flat /= s;
        }
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_fn_is_row_major_and_get_reads_it() {
        let t = Tensor::from_fn(vec![2, 3], |i| (10 * i[0] + i[1]) as f32);
        assert_eq!(t.data, vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]);
        assert_eq!(t.get(&[1, 2]), Some(12.0));
        assert_eq!(t.get(&[2, 0]), None);
        assert_eq!(t.get(&[0]), None);
        assert_eq!(t.strides(), vec![3, 1]);
        assert_eq!(Tensor::scalar(4.0).numel(), 1);
        assert_eq!(Tensor::zeros(vec![3, 0]).data.len(), 0);
    }

    #[test]
    fn new_rejects_wrong_length_and_ints_beyond_2_24() {
        assert!(matches!(Tensor::new(vec![2, 2], vec![0.0; 3]), Err(InterpError::TensorLength { .. })));
        assert!(Tensor::from_ints(vec![1], &[MAX_EXACT_INT + 1]).is_err());
        assert_eq!(Tensor::from_ints(vec![2], &[-3, 7]).map(|t| t.data).ok(), Some(vec![-3.0, 7.0]));
    }

    #[test]
    fn check_close_names_the_first_difference() {
        let a = Tensor::from_fn(vec![2, 2], |i| i[1] as f32);
        let mut b = a.clone();
        assert!(a.check_close(&b, 0.0, 0.0).is_ok());
        b.data[3] = 1.5;
        let e = a.check_close(&b, 1e-3, 0.0).unwrap_err();
        assert!(e.contains("index [1, 1]"), "{e}");
        assert!(a.check_close(&Tensor::zeros(vec![4]), 1.0, 1.0).is_err());
    }
}
