//! Bookkeeping for decode caches kept inside a backend with spare rows.
//!
//! A pitched input ([`crate::manifest::Pitch`], e.g. a decode cache
//! `[b, g, m_d, k]`) may be stored as `[b, g, capacity, k]`: kernels read
//! its first `m_d` rows with a row stride of `capacity`, so appending the
//! step's new row `[b, g, 1, k]` writes `b·g` short rows and moves nothing.
//! [`RowCaches`] tracks which inputs a backend keeps that way, their rows so
//! far and the capacity per runtime dim (every kernel takes one capacity per
//! dim, so all caches along one dim share it). The backend does the memory
//! work it asks for: allocate, re-lay out on growth, copy rows in.

use crate::StepError;
use std::collections::BTreeMap;

/// One resident cache.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Resident {
    /// Dense shape of the rows held (the rows axis = rows so far).
    shape: Vec<usize>,
    axis: usize,
    dim: String,
}

/// Where rows live in a cache stored with `capacity` rows: `outer` blocks
/// (the product of the axes before the rows axis), each `capacity` rows of
/// `row` elements (the product of the axes after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowGeometry {
    pub outer: usize,
    pub row: usize,
    pub rows: usize,
    pub capacity: usize,
}

impl RowGeometry {
    /// Elements of storage.
    pub fn stored(&self) -> usize {
        self.outer * self.capacity * self.row
    }

    /// Element offset of row `r` of block `o`.
    pub fn offset(&self, o: usize, r: usize) -> usize {
        (o * self.capacity + r) * self.row
    }
}

/// A cache whose storage must be re-laid out from `old` capacity to the
/// dim's new capacity (its rows copied block by block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relayout {
    pub name: String,
    pub old: RowGeometry,
    pub new: RowGeometry,
}

/// The resident caches of one backend.
#[derive(Clone, Debug, Default)]
pub struct RowCaches {
    caches: BTreeMap<String, Resident>,
    capacity: BTreeMap<String, usize>,
}

fn geometry(shape: &[usize], axis: usize, capacity: usize) -> RowGeometry {
    RowGeometry {
        outer: shape[..axis].iter().product(),
        row: shape[axis + 1..].iter().product(),
        rows: shape[axis],
        capacity,
    }
}

impl RowCaches {
    /// Whether no cache is resident.
    pub fn is_empty(&self) -> bool {
        self.caches.is_empty()
    }

    /// Whether `name` is resident.
    pub fn contains(&self, name: &str) -> bool {
        self.caches.contains_key(name)
    }

    /// Makes `name` an empty resident cache of dense shape `shape` (0 on
    /// its rows axis `axis`, of runtime dim `dim`) with room for at least
    /// `capacity` rows. Returns its geometry and the other caches of `dim`
    /// to re-lay out when the dim's capacity grew.
    pub fn reserve(
        &mut self,
        name: &str,
        axis: usize,
        dim: &str,
        shape: &[usize],
        capacity: usize,
    ) -> Result<(RowGeometry, Vec<Relayout>), StepError> {
        if shape.get(axis) != Some(&0) {
            return Err(StepError::Backend(format!(
                "`{name}`: a reserved cache starts empty (0 rows on axis {axis}), not with shape {shape:?}"
            )));
        }
        self.caches.remove(name);
        let old = self.capacity.get(dim).copied().unwrap_or(0);
        let cap = capacity.max(old).max(1);
        let moves = self.set_capacity(dim, cap);
        self.caches.insert(name.to_string(), Resident { shape: shape.to_vec(), axis, dim: dim.to_string() });
        Ok((geometry(shape, axis, cap), moves))
    }

    /// Sets `dim`'s capacity to `cap`; the caches to re-lay out.
    fn set_capacity(&mut self, dim: &str, cap: usize) -> Vec<Relayout> {
        let old = self.capacity.insert(dim.to_string(), cap).unwrap_or(cap);
        if old == cap {
            return Vec::new();
        }
        self.caches
            .iter()
            .filter(|(_, c)| c.dim == dim)
            .map(|(name, c)| Relayout {
                name: name.clone(),
                old: geometry(&c.shape, c.axis, old),
                new: geometry(&c.shape, c.axis, cap),
            })
            .collect()
    }

    /// Stops tracking `name` (it was bound densely, or released); the last
    /// cache along a dim takes the dim's capacity with it.
    pub fn forget(&mut self, name: &str) {
        if let Some(gone) = self.caches.remove(name) {
            if !self.caches.values().any(|c| c.dim == gone.dim) {
                self.capacity.remove(&gone.dim);
            }
        }
    }

    /// The geometry of resident `name` now.
    pub fn geometry(&self, name: &str) -> Result<RowGeometry, StepError> {
        let c = self.resident(name)?;
        Ok(geometry(&c.shape, c.axis, self.capacity.get(&c.dim).copied().unwrap_or(0)))
    }

    /// The dense shape of the rows `name` holds.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.caches.get(name).map(|c| c.shape.as_slice())
    }

    fn resident(&self, name: &str) -> Result<&Resident, StepError> {
        self.caches.get(name).ok_or_else(|| StepError::Backend(format!("`{name}` is not a reserved cache")))
    }

    /// Before appending `rows_shape` — the cache's shape with `r >= 1` on
    /// the rows axis, leading axes of size 1 allowed beyond its rank (a
    /// prefill step's rows `[1, g, n, k]` for a context `[g, m_c, k]`) — to
    /// `name`: checks the shape, grows the dim's capacity (doubling) until
    /// the rows fit, and returns `r`, where the rows go, and the caches to
    /// re-lay out first (those moves come before the copy).
    pub fn prepare_append(
        &mut self,
        name: &str,
        rows_shape: &[usize],
    ) -> Result<(usize, RowGeometry, Vec<Relayout>), StepError> {
        let c = self.resident(name)?;
        let extra = rows_shape.len().saturating_sub(c.shape.len());
        let (lead, rest) = rows_shape.split_at(extra);
        let r = rest.get(c.axis).copied().unwrap_or(0);
        let mut want = c.shape.clone();
        want[c.axis] = r.max(1);
        if lead.iter().any(|&d| d != 1) || rest != want.as_slice() || r == 0 {
            want[c.axis] = 1;
            return Err(StepError::Shape { name: name.to_string(), expected: want, got: rows_shape.to_vec() });
        }
        let (dim, rows) = (c.dim.clone(), c.shape[c.axis]);
        let cap = self.capacity.get(&dim).copied().unwrap_or(0);
        let mut grown = cap.max(1);
        while grown < rows + r {
            grown *= 2;
        }
        let moves = if grown != cap { self.set_capacity(&dim, grown) } else { Vec::new() };
        Ok((r, self.geometry(name)?, moves))
    }

    /// After `r` rows were copied in.
    pub fn appended(&mut self, name: &str, r: usize) {
        if let Some(c) = self.caches.get_mut(name) {
            c.shape[c.axis] += r;
        }
    }

    /// The capacity of every dim with resident caches (kernel parameters).
    pub fn capacities(&self) -> BTreeMap<String, i64> {
        self.capacity
            .iter()
            .filter(|(dim, _)| self.caches.values().any(|c| &c.dim == *dim))
            .map(|(d, &c)| (d.clone(), c as i64))
            .collect()
    }

    /// Errors when a pitched input (`(name, dim)` of each) is bound densely
    /// while caches along its dim are resident: the kernels take one
    /// capacity per dim, so it would be read with the wrong row stride.
    pub fn check_dense<'a>(&self, pitched: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(), StepError> {
        let caps = self.capacities();
        for (name, dim) in pitched {
            if caps.contains_key(dim) && !self.contains(name) {
                let other = self.caches.iter().find(|(_, c)| c.dim == dim).map_or("", |(n, _)| n.as_str());
                return Err(StepError::Backend(format!(
                    "`{name}` is bound densely while `{other}` (also along `{dim}`) is a reserved cache: reserve both or bind both"
                )));
            }
        }
        Ok(())
    }

    /// The dim of resident `name`.
    pub fn dim(&self, name: &str) -> Option<&str> {
        self.caches.get(name).map(|c| c.dim.as_str())
    }
}

/// Copies the rows of `old` into `new` (host memory, `T` elements): the
/// CPU side of a [`Relayout`].
pub fn relayout_host<T: Copy + Default>(data: &[T], old: &RowGeometry, new: &RowGeometry) -> Vec<T> {
    let mut out = vec![T::default(); new.stored()];
    let n = old.rows.min(new.capacity) * old.row;
    for o in 0..old.outer {
        let (src, dst) = (old.offset(o, 0), new.offset(o, 0));
        out[dst..dst + n].copy_from_slice(&data[src..src + n]);
    }
    out
}

/// Writes `rows` (`outer` blocks of `r` rows) at row `g.rows` of storage
/// `data` laid out as `g` (host memory).
pub fn append_host<T: Copy>(data: &mut [T], g: &RowGeometry, rows: &[T], r: usize) {
    let n = r * g.row;
    for o in 0..g.outer {
        let dst = g.offset(o, g.rows);
        data[dst..dst + n].copy_from_slice(&rows[o * n..(o + 1) * n]);
    }
}

/// The dense rows of storage `data` laid out as `g` (host memory).
pub fn dense_host<T: Copy>(data: &[T], g: &RowGeometry) -> Vec<T> {
    let mut out = Vec::with_capacity(g.outer * g.rows * g.row);
    for o in 0..g.outer {
        let at = g.offset(o, 0);
        out.extend_from_slice(&data[at..at + g.rows * g.row]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_grow_every_cache_of_the_dim_together() {
        let mut rc = RowCaches::default();
        let (g, moves) = rc.reserve("k", 2, "m_d", &[2, 3, 0, 4], 2).unwrap();
        assert_eq!((g.outer, g.row, g.rows, g.capacity), (6, 4, 0, 2));
        assert!(moves.is_empty());
        let (_, moves) = rc.reserve("v", 2, "m_d", &[2, 3, 0, 4], 1).unwrap();
        assert!(moves.is_empty(), "a smaller request keeps the dim's capacity");
        assert_eq!(rc.geometry("v").unwrap().capacity, 2);
        let mut data = vec![0.0f32; g.stored()];
        for step in 0..3 {
            let rows: Vec<f32> = (0..24).map(|i| (100 * step + i) as f32).collect();
            let (r, g, moves) = rc.prepare_append("k", &[2, 3, 1, 4]).unwrap();
            assert_eq!(r, 1);
            for m in &moves {
                if m.name == "k" {
                    data = relayout_host(&data, &m.old, &m.new);
                }
            }
            if step == 2 {
                let names: Vec<&str> = moves.iter().map(|m| m.name.as_str()).collect();
                assert_eq!(names, ["k", "v"], "full at 2 rows: both caches of m_d grow");
                assert_eq!(g.capacity, 4);
            }
            append_host(&mut data, &g, &rows, 1);
            rc.appended("k", 1);
        }
        let g = rc.geometry("k").unwrap();
        let dense = dense_host(&data, &g);
        assert_eq!(rc.shape("k").unwrap(), [2, 3, 3, 4]);
        for o in 0..6 {
            for r in 0..3 {
                for j in 0..4 {
                    assert_eq!(dense[(o * 3 + r) * 4 + j], (100 * r + o * 4 + j) as f32);
                }
            }
        }
        assert_eq!(rc.capacities(), BTreeMap::from([("m_d".to_string(), 4)]));
        assert!(rc.prepare_append("k", &[2, 3, 0, 4]).is_err());
        assert!(rc.prepare_append("k", &[2, 2, 1, 4]).is_err());
        // Several rows at once, with a leading axis of 1: capacity 4 → 8.
        let (r, g, moves) = rc.prepare_append("k", &[1, 2, 3, 2, 4]).unwrap();
        assert_eq!((r, g.rows, g.capacity, moves.len()), (2, 3, 8, 2));
        assert!(rc.reserve("x", 2, "m_d", &[1, 1, 1, 1], 4).is_err(), "must start empty");
        rc.forget("k");
        let (g, moves) = rc.reserve("k", 2, "m_d", &[2, 3, 0, 4], 1).unwrap();
        assert_eq!((g.capacity, moves.len()), (8, 0), "`v` still holds the dim at 8 rows");
        rc.forget("k");
        rc.forget("v");
        assert!(rc.capacities().is_empty());
        // With none left along `m_d`, a new cache gets the room it asks for.
        let (g, _) = rc.reserve("k", 2, "m_d", &[4, 3, 0, 4], 3).unwrap();
        assert_eq!(g.capacity, 3);
    }
}
