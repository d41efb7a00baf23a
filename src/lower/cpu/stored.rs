//! Inputs kept in their storage dtype between runs ([`Stored`]): a backend
//! converts each bound tensor once (bf16 weights, a context cache) instead
//! of at every step, and keeps decode caches with spare rows in that dtype.

use std::ffi::c_void;
use std::sync::Arc;

use bifurc_runtime::rows::{append_host, dense_host, relayout_host, RowGeometry};

use super::host::HostData;
use crate::interp::Tensor;
use crate::ir::DType;
use crate::lower::LowerError;

/// One input's elements in its buffer's storage dtype, with its shape
/// (a pitched cache's rows axis holds its capacity). Made by
/// [`super::CpuStep::store`], read by [`super::CpuStep::run_stored`].
///
/// A clone shares the elements (two steps that store an input alike can
/// hold one copy of it: [`super::CpuStep::stores_alike`]); rows are
/// appended only to elements held once.
#[derive(Clone)]
pub struct Stored {
    pub shape: Vec<usize>,
    pub(super) dtype: DType,
    pub(super) data: Arc<HostData>,
}

/// `$body` over the elements of `$data` whatever their type, as `$v`,
/// giving storage of the same type.
macro_rules! each_type {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            HostData::F32($v) => HostData::F32($body.into()),
            HostData::U16($v) => HostData::U16($body.into()),
            HostData::I32($v) => HostData::I32($body.into()),
            HostData::I64($v) => HostData::I64($body.into()),
        }
    };
}

impl Stored {
    /// `t` in storage `dtype` (f32 data is moved when it starts a cache
    /// line, else copied once to memory that does).
    pub(super) fn new(dtype: DType, t: Tensor, name: &str) -> Result<Self, LowerError> {
        let data = if dtype == DType::F32 && !t.data.is_empty() {
            HostData::F32(t.data.into())
        } else {
            HostData::from_tensor(dtype, &t, name)?
        };
        Ok(Stored { shape: t.shape, dtype, data: Arc::new(data) })
    }

    /// Values of `shape` converted to storage `dtype` (copied once).
    pub(super) fn from_values(dtype: DType, shape: &[usize], values: &[f32], name: &str) -> Result<Self, LowerError> {
        let data = Arc::new(HostData::from_values(dtype, values, name)?);
        Ok(Stored { shape: shape.to_vec(), dtype, data })
    }

    /// `data`, of storage `dtype`, shaped `shape`.
    pub(super) fn from_host(dtype: DType, shape: Vec<usize>, data: HostData) -> Self {
        Stored { shape, dtype, data: Arc::new(data) }
    }

    /// Zeros of `shape` in storage `dtype`.
    pub(super) fn zeros(dtype: DType, shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Stored { shape, dtype, data: Arc::new(HostData::zeros(dtype, n)) }
    }

    /// Whether `other` holds these very elements (a clone of this, or
    /// this of it), not a copy.
    pub fn shares_elements(&self, other: &Stored) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Elements held (at least one).
    pub(super) fn len(&self) -> usize {
        self.data.len()
    }

    /// Pointer to the first element, for reading only.
    pub(super) fn ptr(&self) -> *const c_void {
        self.data.const_ptr()
    }

    /// The elements as f32 (exact for every storage dtype but i64 beyond 2^24).
    pub fn to_tensor(&self) -> Tensor {
        let n = self.shape.iter().product();
        let copy = each_type!(&*self.data, v => v.clone());
        copy.into_tensor(self.dtype, self.shape.clone(), n)
    }

    /// The rows of a pitched cache laid out as `old`, re-laid out as `new`
    /// (its rows axis `axis` then holds `new.capacity`).
    pub fn relayout(&mut self, axis: usize, old: &RowGeometry, new: &RowGeometry) {
        self.data = Arc::new(each_type!(&*self.data, v => relayout_host(v, old, new)));
        if let Some(s) = self.shape.get_mut(axis) {
            *s = new.capacity;
        }
    }

    /// Appends `r` rows (`rows`, f32 values of the dense new rows) to a
    /// pitched cache laid out as `g`, converted to its storage dtype.
    pub fn append(&mut self, g: &RowGeometry, rows: &[f32], r: usize, name: &str) -> Result<(), LowerError> {
        let rows = HostData::from_values(self.dtype, rows, name)?;
        let Some(data) = Arc::get_mut(&mut self.data) else {
            return Err(LowerError::Run(format!(
                "`{name}` is shared with another step: rows cannot be appended to it"
            )));
        };
        match (data, &rows) {
            (HostData::F32(d), HostData::F32(s)) => append_host(d, g, s, r),
            (HostData::U16(d), HostData::U16(s)) => append_host(d, g, s, r),
            (HostData::I32(d), HostData::I32(s)) => append_host(d, g, s, r),
            (HostData::I64(d), HostData::I64(s)) => append_host(d, g, s, r),
            _ => return Err(LowerError::Run(format!("`{name}`: rows of another storage type"))),
        }
        Ok(())
    }

    /// The dense rows of a pitched cache laid out as `g`, as f32 of `shape`.
    pub fn dense(&self, g: &RowGeometry, shape: Vec<usize>) -> Tensor {
        let n = g.outer * g.rows * g.row;
        let dense = each_type!(&*self.data, v => dense_host(v, g));
        dense.into_tensor(self.dtype, shape, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::cpu::{bf16_to_f32, f32_to_bf16};

    fn rounded(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect()
    }

    #[test]
    fn converts_once_and_reads_back() {
        let t = Tensor { shape: vec![2, 3], data: vec![0.1, -2.5, 3.3, 1e-3, 7.0, -0.0] };
        let s = Stored::new(DType::BF16, t.clone(), "w").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.dtype(), s.len()), (DType::BF16, 6));
        assert_eq!(s.to_tensor().data, rounded(&t.data));
        let f = Stored::new(DType::F32, t.clone(), "w").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.to_tensor(), t);
        let err = Stored::new(DType::I32, t, "ids").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("input `ids`: element 0 is 0.1"), "{err}");
        // Empty tensors still hold one element (a valid pointer).
        let e =
            Stored::new(DType::BF16, Tensor { shape: vec![0, 4], data: vec![] }, "c").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((e.len(), e.to_tensor().data.len()), (1, 0));
    }

    #[test]
    fn a_bf16_cache_grows_in_its_storage_type() {
        // [outer 2, rows, row 3], two rows of room, then four.
        let g = |rows, capacity| RowGeometry { outer: 2, row: 3, rows, capacity };
        let mut c = Stored::zeros(DType::BF16, vec![2, 2, 3]);
        let rows = |base: f32| Tensor { shape: vec![2, 1, 3], data: (0..6).map(|i| base + i as f32 * 0.1).collect() };
        c.append(&g(0, 2), &rows(1.0).data, 1, "cache").unwrap_or_else(|e| panic!("{e}"));
        c.append(&g(1, 2), &rows(2.0).data, 1, "cache").unwrap_or_else(|e| panic!("{e}"));
        c.relayout(1, &g(2, 2), &g(2, 4));
        assert_eq!(c.shape, [2, 4, 3]);
        c.append(&g(2, 4), &rows(3.0).data, 1, "cache").unwrap_or_else(|e| panic!("{e}"));
        let dense = c.dense(&g(3, 4), vec![2, 3, 3]);
        let mut want = Vec::new();
        for o in 0..2 {
            for base in [1.0f32, 2.0, 3.0] {
                want.extend(rounded(&rows(base).data[o * 3..o * 3 + 3]));
            }
        }
        assert_eq!(dense.shape, [2, 3, 3]);
        assert_eq!(dense.data, want);
    }

    /// A clone shares the elements; rows are appended only to elements
    /// held once (the clone dropped), and a re-layout leaves the other
    /// holder's elements as they were.
    #[test]
    fn clones_share_and_only_a_sole_holder_appends() {
        let g = |rows, capacity| RowGeometry { outer: 1, row: 2, rows, capacity };
        let mut c = Stored::zeros(DType::F32, vec![1, 2, 2]);
        let other = c.clone();
        assert!(c.shares_elements(&other));
        let err = c.append(&g(0, 2), &[1.0, 2.0], 1, "cache").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("`cache` is shared with another step"), "{err}");
        c.relayout(1, &g(0, 2), &g(0, 4));
        assert!(!c.shares_elements(&other));
        assert_eq!((c.shape.clone(), other.shape.clone()), (vec![1, 4, 2], vec![1, 2, 2]));
        drop(other);
        c.append(&g(0, 4), &[1.0, 2.0], 1, "cache").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.dense(&g(1, 4), vec![1, 1, 2]).data, [1.0, 2.0]);
    }
}
