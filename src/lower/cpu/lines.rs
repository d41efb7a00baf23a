//! Host buffers whose first element starts a cache line.

use std::ops::{Deref, DerefMut};

/// Bytes of a cache line, and of an AVX-512 vector.
const LINE: usize = 64;
/// Bytes of the smallest page the system maps on first touch.
const PAGE: usize = 4096;

/// `len` elements of `T` starting on a cache line (but those made by
/// [`Lines::returned`]): the CPU kernels' 64-byte vector loads and stores
/// along a buffer's rows then never straddle two lines. A `Vec`'s large
/// allocations start 16 bytes past a page (glibc's `mmap`ed chunks), which
/// made every such access touch two lines (q·K over the context about 9%
/// slower). Reads and writes as a slice.
pub(crate) struct Lines<T> {
    /// The allocation, a line's worth of elements longer than needed.
    raw: Vec<T>,
    /// The first element on a line.
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Lines<T> {
    /// `n` copies of `x`.
    pub(crate) fn filled(n: usize, x: T) -> Self {
        let raw = vec![x; n + LINE / size_of::<T>().max(1)];
        let start = line_offset(&raw);
        Lines { raw, start, len: n }
    }

    /// `n` default values (zeros).
    pub(crate) fn zeros(n: usize) -> Self {
        Self::filled(n, T::default())
    }

    /// `n` elements whose values are left as they are: what this
    /// allocation held (an earlier run's values, or zeros) when it is
    /// large enough, else a new allocation of zeros with room for half as
    /// many again, nothing copied into it. For memory its user writes
    /// whole before reading it; a size that grows run after run (a prefill
    /// step's scores, a column longer each chunk) then allocates only
    /// now and then.
    pub(crate) fn reuse(&mut self, n: usize) {
        if self.start + n <= self.raw.len() {
            self.len = n;
        } else {
            let mut grown = Self::zeros(n.saturating_add(n / 2));
            grown.len = n;
            *self = grown;
        }
    }

    /// Room for `n` elements whose values are left unspecified, as
    /// [`Lines::reuse`] gives, but a new allocation holds exactly `n` (this
    /// is the largest size to come, no room to grow is needed), and every
    /// page of the allocation is mapped in now: one element per 4 KiB is
    /// written, where the system would otherwise fault each page in on its
    /// first touch by a later user.
    pub(crate) fn reserve(&mut self, n: usize) {
        if self.start + n > self.raw.len() {
            *self = Self::zeros(n);
        }
        self.len = n;
        let step = (PAGE / size_of::<T>().max(1)).max(1);
        for x in self.raw.iter_mut().step_by(step) {
            *x = T::default();
        }
    }

    /// The items of `it`, written once into memory that starts a line
    /// (collecting into a `Vec` first could copy them a second time).
    pub(crate) fn collect(it: impl ExactSizeIterator<Item = T>) -> Self {
        let mut out = Self::zeros(it.len());
        for (slot, x) in out.iter_mut().zip(it) {
            *slot = x;
        }
        out
    }

    /// `n` zeros that [`Lines::into_vec`] moves out rather than copies: a
    /// buffer the step hands back (an output), which starts where its
    /// allocation does, on a line or not. Its one pass of stores may
    /// straddle lines; starting it on one cost a copy of it into fresh
    /// memory at every run (GPT-2's logits at b = 64: 12.9 MB, every page
    /// faulted in twice).
    pub(crate) fn returned(n: usize) -> Self {
        Lines { raw: vec![T::default(); n], start: 0, len: n }
    }

    /// Elements this allocation can hold.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.raw.len() - self.start
    }

    /// The elements as a `Vec` (moved when they already start the
    /// allocation).
    pub(crate) fn into_vec(mut self) -> Vec<T> {
        if self.start == 0 {
            self.raw.truncate(self.len);
            self.raw
        } else {
            self.to_vec()
        }
    }
}

/// Elements to skip from the start of `raw` to reach a cache line
/// (allocations are aligned to `T`, so this is whole elements).
fn line_offset<T>(raw: &[T]) -> usize {
    let off = raw.as_ptr() as usize % LINE;
    if off == 0 {
        0
    } else {
        (LINE - off) / size_of::<T>().max(1)
    }
}

impl<T: Copy + Default> From<Vec<T>> for Lines<T> {
    /// Moved when `v` already starts a line, else copied once.
    fn from(v: Vec<T>) -> Self {
        if line_offset(&v) == 0 {
            let len = v.len();
            Lines { raw: v, start: 0, len }
        } else {
            Self::from(v.as_slice())
        }
    }
}

impl<T: Copy + Default> From<&[T]> for Lines<T> {
    fn from(v: &[T]) -> Self {
        let mut out = Self::zeros(v.len());
        out.copy_from_slice(v);
        out
    }
}

impl<T: Copy + Default> Clone for Lines<T> {
    /// A copy in its own allocation, also starting a line.
    fn clone(&self) -> Self {
        Self::from(&self[..])
    }
}

impl<T> Deref for Lines<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl<T> DerefMut for Lines<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_a_line<T>(v: &[T]) -> bool {
        v.as_ptr() as usize % LINE == 0
    }

    /// Every way of making one starts on a line and keeps its values (made
    /// from a `Vec`, a slice, a clone, an iterator); reused at another
    /// length it stays in place while it fits, and grows by half again
    /// (zeros, still on a line) when it does not.
    #[test]
    fn starts_on_a_line_and_resizes_like_a_vec() {
        for n in [1usize, 3, 17, 1 << 20] {
            let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let a = Lines::from(v.clone());
            let b = Lines::from(v.as_slice());
            let c = a.clone();
            for l in [&a, &b, &c] {
                assert!(on_a_line(l) && l[..] == v[..], "n = {n}");
            }
            assert_eq!(a.into_vec(), v);
            let z = Lines::<u16>::zeros(n);
            assert!(on_a_line(&z) && z.iter().all(|&x| x == 0));
            let c = Lines::collect(v.iter().map(|&x| x as i32));
            assert!(on_a_line(&c) && c.len() == n && c.iter().zip(&v).all(|(&a, &b)| a == b as i32), "n = {n}");
        }
        let mut l = Lines::from(vec![1i64, 2, 3, 4]);
        let at = l.as_ptr();
        l.reuse(2);
        l.reuse(4);
        assert_eq!((&l[..], l.as_ptr()), (&[1i64, 2, 3, 4][..], at), "in place, values kept");
        l.reuse(1000);
        assert!(on_a_line(&l) && l.len() == 1000 && l.iter().all(|&x| x == 0) && l.capacity() >= 1500);
        let at = l.as_ptr();
        l.reuse(1400);
        assert_eq!((l.len(), l.as_ptr()), (1400, at), "grown once, then in place");
    }
}
