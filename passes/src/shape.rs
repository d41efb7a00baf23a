//! Symbolic shapes and the attribute strings that carry them in the e-graph.
//!
//! Attributes (shapes, axes, perms, einsum specs, slice bounds) are e-graph
//! leaves: interned strings such as `b,g,m_c+m_d+n,k`. These helpers print
//! and parse them, and compare sizes after substituting model constants.

use crate::poly::{Overflow, Poly};
use std::collections::BTreeMap;

pub type Shape = Vec<Poly>;

/// Model constants: substituted before two sizes are compared.
#[derive(Clone, Debug, Default)]
pub struct Constants(pub BTreeMap<String, i64>);

impl Constants {
    pub fn normalize(&self, p: &Poly) -> Result<Poly, Overflow> {
        p.substitute(&|s| self.0.get(s).map(|v| Poly::constant(*v)))
    }

    /// Equal for every value of the runtime dims (overflow counts as unequal).
    pub fn same(&self, a: &Poly, b: &Poly) -> bool {
        matches!((self.normalize(a), self.normalize(b)), (Ok(x), Ok(y)) if x == y)
    }

    pub fn same_shape(&self, a: &[Poly], b: &[Poly]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| self.same(x, y))
    }

    pub fn is_one(&self, p: &Poly) -> bool {
        self.same(p, &Poly::constant(1))
    }

    /// The constant value of a size, if it has no runtime dim.
    pub fn constant_value(&self, p: &Poly) -> Option<i64> {
        self.normalize(p).ok().and_then(|n| n.as_constant())
    }

    pub fn numel(&self, shape: &[Poly]) -> Result<Poly, Overflow> {
        let mut acc = Poly::constant(1);
        for d in shape {
            acc = acc.mul(d)?;
        }
        self.normalize(&acc)
    }
}

/// `[b, g, m_c+m_d, k]` → `b,g,m_c+m_d,k` (an empty shape is `-`).
pub fn shape_attr(shape: &[Poly]) -> String {
    if shape.is_empty() {
        return "-".to_string();
    }
    shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// Inverse of [`shape_attr`].
pub fn parse_shape_attr(s: &str) -> Option<Shape> {
    if s == "-" {
        return Some(Vec::new());
    }
    s.split(',').map(|p| Poly::parse(p).ok()).collect()
}

pub fn list_attr(xs: &[usize]) -> String {
    xs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

pub fn parse_list_attr(s: &str) -> Option<Vec<usize>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(',').map(|p| p.parse().ok()).collect()
}

/// How a reshape regroups axes: pairs of contiguous input ranges and output
/// ranges with equal element counts, covering both shapes in order. `None`
/// when the reshape is not such a regrouping (it reorders data), or when a
/// size-1 axis sits inside a merged group (ambiguous).
pub fn reshape_groups(
    c: &Constants,
    from: &[Poly],
    to: &[Poly],
) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
    let mut groups = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < from.len() || j < to.len() {
        let (i0, j0) = (i, j);
        let mut pa = from.get(i)?.clone();
        let mut pb = to.get(j)?.clone();
        i += 1;
        j += 1;
        // Grow whichever side is "smaller" by trying both; symbolic sizes
        // have no order, so extend one side at a time until the products meet.
        let mut guard = 0;
        while !c.same(&pa, &pb) {
            guard += 1;
            if guard > from.len() + to.len() {
                return None;
            }
            let grow_a = i < from.len() && divides(c, &pa, &pb);
            if grow_a {
                pa = pa.mul(&from[i]).ok()?;
                i += 1;
            } else if j < to.len() && divides(c, &pb, &pa) {
                pb = pb.mul(&to[j]).ok()?;
                j += 1;
            } else {
                return None;
            }
        }
        let ga = i0..i;
        let gb = j0..j;
        let merged = ga.len() > 1 || gb.len() > 1;
        if merged && (from[ga.clone()].iter().chain(&to[gb.clone()]).any(|d| c.is_one(d))) {
            return None;
        }
        groups.push((ga, gb));
    }
    Some(groups)
}

/// True when `small` may be a proper factor of `big`: their normalized
/// constant parts divide, and every symbol of `small` occurs in `big`.
fn divides(c: &Constants, small: &Poly, big: &Poly) -> bool {
    let (Ok(s), Ok(b)) = (c.normalize(small), c.normalize(big)) else { return false };
    match (s.as_constant(), b.as_constant()) {
        (Some(x), Some(y)) => x != 0 && y % x == 0 && y.abs() > x.abs(),
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (None, None) => s.symbols().iter().all(|sym| b.symbols().contains(sym)) && s != b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(s: &str) -> Shape {
        parse_shape_attr(s).unwrap()
    }

    #[test]
    fn attrs_round_trip() {
        let s = shape("b,g,m_c+m_d+n,k");
        assert_eq!(shape_attr(&s), "b,g,m_c+m_d+n,k");
        assert_eq!(parse_shape_attr("-"), Some(vec![]));
        assert_eq!(parse_list_attr("0,1,3,2"), Some(vec![0, 1, 3, 2]));
    }

    #[test]
    fn finds_merges_and_splits() {
        let c = Constants([("g".to_string(), 8), ("p".to_string(), 4), ("h".to_string(), 32)].into());
        let g = reshape_groups(&c, &shape("b,g,p,m,k"), &shape("b,h,m,k")).unwrap();
        assert_eq!(g, vec![(0..1, 0..1), (1..3, 1..2), (3..4, 2..3), (4..5, 3..4)]);
        let g = reshape_groups(&c, &shape("b,n,h"), &shape("b,n,g,p")).unwrap();
        assert_eq!(g[2], (2..3, 2..4));
        let g = reshape_groups(&c, &shape("P,S,g,m"), &shape("P*S,g,m")).unwrap();
        assert_eq!(g[0], (0..2, 0..1));
        // A unit axis inside a merged group is ambiguous.
        assert!(reshape_groups(&c, &shape("b,g,1,m"), &shape("b,g,m")).is_none());
        // A reshape that is not a regrouping.
        assert!(reshape_groups(&c, &shape("4,6"), &shape("6,4")).is_none());
    }
}
