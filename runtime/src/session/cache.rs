//! A growing host-side KV cache `[b, g, m_d, k]`, with room for more rows.
//!
//! Stored as `[b, g, capacity, k]`; [`KvCache::packed`] gives the dense
//! `[b, g, m_d, k]` tensor a step binds, [`KvCache::append`] adds the step's
//! new rows `[b, g, 1, k]` at row `m_d`.

use crate::HostTensor;

#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    b: usize,
    g: usize,
    k: usize,
    capacity: usize,
    len: usize,
    /// `[b, g, capacity, k]`.
    data: Vec<f32>,
}

impl KvCache {
    /// An empty cache for `b` samples with room for `capacity` rows.
    pub fn new(b: usize, g: usize, k: usize, capacity: usize) -> Self {
        KvCache { b, g, k, capacity, len: 0, data: vec![0.0; b * g * capacity * k] }
    }

    /// Rows so far (`m_d`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[b, g, m_d, k]`.
    pub fn shape(&self) -> Vec<usize> {
        vec![self.b, self.g, self.len, self.k]
    }

    /// Row `r` of sample `s`, group `gi` (`k` values).
    pub fn row(&self, s: usize, gi: usize, r: usize) -> &[f32] {
        let at = ((s * self.g + gi) * self.capacity + r) * self.k;
        &self.data[at..at + self.k]
    }

    /// Appends one row per sample and group from `rows` (`[b, g, 1, k]`).
    pub fn append(&mut self, rows: &HostTensor) -> Result<(), String> {
        let want = [self.b, self.g, 1, self.k];
        if rows.shape != want || rows.data.len() != self.b * self.g * self.k {
            return Err(format!("new rows have shape {:?}, expected {want:?}", rows.shape));
        }
        if self.len == self.capacity {
            self.grow((self.capacity * 2).max(1));
        }
        for sg in 0..self.b * self.g {
            let dst = (sg * self.capacity + self.len) * self.k;
            self.data[dst..dst + self.k].copy_from_slice(&rows.data[sg * self.k..(sg + 1) * self.k]);
        }
        self.len += 1;
        Ok(())
    }

    /// The dense `[b, g, m_d, k]` tensor.
    pub fn packed(&self) -> HostTensor {
        let mut data = Vec::with_capacity(self.b * self.g * self.len * self.k);
        for sg in 0..self.b * self.g {
            let at = sg * self.capacity * self.k;
            data.extend_from_slice(&self.data[at..at + self.len * self.k]);
        }
        HostTensor { shape: self.shape(), data }
    }

    /// A one-sample cache as a context cache `[g, m_d, k]` (the layout of a
    /// context cache is a one-sample decode cache without the `b` axis).
    pub fn into_context(self) -> Result<HostTensor, String> {
        if self.b != 1 {
            return Err(format!("only a one-sample cache is a context cache (this one has b = {})", self.b));
        }
        let mut packed = self.packed();
        packed.shape.remove(0);
        Ok(packed)
    }

    fn grow(&mut self, capacity: usize) {
        let mut data = vec![0.0; self.b * self.g * capacity * self.k];
        for sg in 0..self.b * self.g {
            let (src, dst) = (sg * self.capacity * self.k, sg * capacity * self.k);
            data[dst..dst + self.len * self.k].copy_from_slice(&self.data[src..src + self.len * self.k]);
        }
        self.data = data;
        self.capacity = capacity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New rows whose value encodes (step, sample, group, j).
    fn rows(step: usize, b: usize, g: usize, k: usize) -> HostTensor {
        let mut data = Vec::new();
        for s in 0..b {
            for gi in 0..g {
                for j in 0..k {
                    data.push((1000 * step + 100 * s + 10 * gi + j) as f32);
                }
            }
        }
        HostTensor { shape: vec![b, g, 1, k], data }
    }

    #[test]
    fn appends_rows_in_b_g_md_k_order() {
        let (b, g, k) = (3, 2, 4);
        // Capacity 2 forces two grows over 5 appends.
        let mut cache = KvCache::new(b, g, k, 2);
        assert_eq!(cache.packed().shape, vec![3, 2, 0, 4]);
        for step in 0..5 {
            cache.append(&rows(step, b, g, k)).unwrap();
        }
        let p = cache.packed();
        assert_eq!(p.shape, vec![3, 2, 5, 4]);
        for s in 0..b {
            for gi in 0..g {
                for r in 0..5 {
                    for j in 0..k {
                        let flat = ((s * g + gi) * 5 + r) * k + j;
                        assert_eq!(p.data[flat], (1000 * r + 100 * s + 10 * gi + j) as f32);
                    }
                    assert_eq!(cache.row(s, gi, r)[0], (1000 * r + 100 * s + 10 * gi) as f32);
                }
            }
        }
        assert!(cache.append(&rows(0, b, g + 1, k)).unwrap_err().contains("[3, 2, 1, 4]"));
        assert!(cache.clone().into_context().is_err());
    }

    #[test]
    fn a_one_sample_cache_is_a_context_cache() {
        let mut cache = KvCache::new(1, 2, 3, 0);
        cache.append(&rows(0, 1, 2, 3)).unwrap();
        cache.append(&rows(1, 1, 2, 3)).unwrap();
        let ctx = cache.into_context().unwrap();
        assert_eq!(ctx.shape, vec![2, 2, 3]);
        assert_eq!(ctx.data, vec![0., 1., 2., 1000., 1001., 1002., 10., 11., 12., 1010., 1011., 1012.]);
    }
}
