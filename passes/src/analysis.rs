//! The shape analysis: every e-class knows its symbolic shape and dtype (rules
//! read their side conditions from it), and how many times over its value is
//! a copy along constant-size broadcast axes (the cost model reads it).
//! Merging two e-classes of different shapes is a bug: it is asserted.

use crate::lang::Expr;
use crate::poly::Poly;
use crate::shape::{parse_list_attr, parse_shape_attr, Constants, Shape};
use egg::{Analysis, DidMerge, EGraph, Id, Symbol};
use std::collections::HashMap;

/// A dtype: its name and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dtype {
    pub name: Symbol,
    pub bytes: u32,
}

/// What is known of a graph input or an opaque op's result.
#[derive(Clone, Debug)]
pub struct Known {
    pub shape: Shape,
    pub dtype: Dtype,
    /// A `gather`: its first operand (the table) is read one row per output row.
    pub gather: bool,
}

/// Data of one e-class.
#[derive(Clone, Debug)]
pub enum Data {
    /// An attribute leaf.
    Attr(Symbol),
    Tensor {
        shape: Shape,
        dtype: Dtype,
        /// The value repeats this many times along constant-size broadcast
        /// axes (a lower bound; 1 if unknown). Readers pay `numel / replication`.
        replication: i64,
    },
}

impl Data {
    pub fn shape(&self) -> Option<&Shape> {
        match self {
            Data::Tensor { shape, .. } => Some(shape),
            Data::Attr(_) => None,
        }
    }

    pub fn attr(&self) -> Option<&str> {
        match self {
            Data::Attr(s) => Some(s.as_str()),
            Data::Tensor { .. } => None,
        }
    }
}

/// The analysis: model constants plus the shapes of inputs and opaque ops.
#[derive(Clone, Debug, Default)]
pub struct ShapeAnalysis {
    pub constants: Constants,
    pub known: HashMap<Symbol, Known>,
}

pub type Graph = EGraph<Expr, ShapeAnalysis>;

/// Shape of an e-class (None for attributes).
pub fn shape_of(eg: &Graph, id: Id) -> Option<&Shape> {
    eg[id].data.shape()
}

pub fn attr_of(eg: &Graph, id: Id) -> Option<&str> {
    eg[id].data.attr()
}

fn tensor(eg: &Graph, id: Id) -> Option<(&Shape, Dtype, i64)> {
    match &eg[id].data {
        Data::Tensor { shape, dtype, replication } => Some((shape, *dtype, *replication)),
        Data::Attr(_) => None,
    }
}

/// Result shape of an einsum spec applied to operand shapes.
pub fn einsum_shape(spec: &str, shapes: &[&Shape]) -> Option<Shape> {
    let (lhs, out) = spec.split_once("->")?;
    let subs: Vec<&str> = lhs.split(',').collect();
    if subs.len() != shapes.len() {
        return None;
    }
    out.chars()
        .map(|c| {
            subs.iter().zip(shapes).find_map(|(s, sh)| s.chars().position(|x| x == c).and_then(|i| sh.get(i).cloned()))
        })
        .collect()
}

fn broadcast_shapes(c: &Constants, a: &Shape, b: &Shape) -> Option<Shape> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = (i + a.len()).checked_sub(rank).map(|j| &a[j]);
            let db = (i + b.len()).checked_sub(rank).map(|j| &b[j]);
            match (da, db) {
                (Some(x), None) | (None, Some(x)) => Some(x.clone()),
                (Some(x), Some(y)) if c.is_one(x) => Some(y.clone()),
                (Some(x), Some(_)) => Some(x.clone()),
                (None, None) => None,
            }
        })
        .collect()
}

/// Product of the constant sizes that a broadcast from `src` to `target` stretches.
pub fn constant_stretch(c: &Constants, src: &Shape, target: &Shape) -> i64 {
    let new_axes = target.len().saturating_sub(src.len());
    let mut r: i64 = 1;
    for (i, t) in target.iter().enumerate() {
        let stretched = i < new_axes || !c.same(&src[i - new_axes], t);
        if stretched {
            if let Some(v) = c.constant_value(t) {
                r = r.saturating_mul(v);
            }
        }
    }
    r
}

fn make(eg: &Graph, enode: &Expr) -> Data {
    let a = &eg.analysis;
    let attr = |id: Id| attr_of(eg, id).map(str::to_string);
    let t = |id: Id| tensor(eg, id);
    let bad = |what: &str| -> ! { panic!("e-graph invariant: ill-formed {what} node {enode:?}") };
    let (shape, dtype, replication) = match enode {
        Expr::Attr(s) => return Data::Attr(*s),
        Expr::In(name) => {
            let key = attr_of(eg, *name).map(Symbol::from).unwrap_or_else(|| bad("in"));
            let k = a.known.get(&key).unwrap_or_else(|| bad("in"));
            (k.shape.clone(), k.dtype, 1)
        }
        Expr::Op(c) => {
            let key = attr_of(eg, c[0]).map(Symbol::from).unwrap_or_else(|| bad("op"));
            let k = a.known.get(&key).unwrap_or_else(|| bad("op"));
            (k.shape.clone(), k.dtype, 1)
        }
        Expr::Einsum(c) => {
            let spec = attr(c[0]).unwrap_or_else(|| bad("einsum"));
            let ops: Vec<(&Shape, Dtype, i64)> =
                c[1..].iter().map(|&i| t(i).unwrap_or_else(|| bad("einsum"))).collect();
            let shapes: Vec<&Shape> = ops.iter().map(|o| o.0).collect();
            (einsum_shape(&spec, &shapes).unwrap_or_else(|| bad("einsum")), ops[0].1, 1)
        }
        Expr::MatMul([x, y]) | Expr::MatMulT([x, y]) => {
            let (sa, d, _) = t(*x).unwrap_or_else(|| bad("matmul"));
            let (sb, _, _) = t(*y).unwrap_or_else(|| bad("matmul"));
            if sa.len() < 2 || sb.len() < 2 {
                bad("matmul")
            }
            let n = if matches!(enode, Expr::MatMulT(_)) { &sb[sb.len() - 2] } else { &sb[sb.len() - 1] };
            let mut s = broadcast_shapes(&a.constants, &sa[..sa.len() - 2].to_vec(), &sb[..sb.len() - 2].to_vec())
                .unwrap_or_else(|| bad("matmul"));
            s.push(sa[sa.len() - 2].clone());
            s.push(n.clone());
            (s, d, 1)
        }
        Expr::Concat(c) => {
            let axis: usize = attr(c[0]).and_then(|s| s.parse().ok()).unwrap_or_else(|| bad("concat"));
            let parts: Vec<(&Shape, Dtype, i64)> =
                c[1..].iter().map(|&i| t(i).unwrap_or_else(|| bad("concat"))).collect();
            let mut s = parts[0].0.clone();
            let mut total = Poly::zero();
            for p in &parts {
                total = total.add(&p.0[axis]).unwrap_or_else(|_| bad("concat"));
            }
            s[axis] = total;
            let rep = parts.iter().map(|p| p.2).min().unwrap_or(1);
            (s, parts[0].1, rep)
        }
        Expr::Broadcast([sh, x]) => {
            let target = attr(*sh).and_then(|s| parse_shape_attr(&s)).unwrap_or_else(|| bad("broadcast"));
            let (src, d, rep) = t(*x).unwrap_or_else(|| bad("broadcast"));
            let r = rep.saturating_mul(constant_stretch(&a.constants, src, &target));
            (target, d, r)
        }
        Expr::Slice([ax, start, end, x]) => {
            let axis: usize = attr(*ax).and_then(|s| s.parse().ok()).unwrap_or_else(|| bad("slice"));
            let st = attr(*start).and_then(|s| Poly::parse(&s).ok()).unwrap_or_else(|| bad("slice"));
            let en = attr(*end).and_then(|s| Poly::parse(&s).ok()).unwrap_or_else(|| bad("slice"));
            let (src, d, _) = t(*x).unwrap_or_else(|| bad("slice"));
            let mut s = src.clone();
            s[axis] = en.sub(&st).unwrap_or_else(|_| bad("slice"));
            (s, d, 1)
        }
        Expr::Reshape([sh, x]) => {
            let target = attr(*sh).and_then(|s| parse_shape_attr(&s)).unwrap_or_else(|| bad("reshape"));
            let (_, d, rep) = t(*x).unwrap_or_else(|| bad("reshape"));
            (target, d, rep)
        }
        Expr::Transpose([p, x]) => {
            let perm = attr(*p).and_then(|s| parse_list_attr(&s)).unwrap_or_else(|| bad("transpose"));
            let (src, d, rep) = t(*x).unwrap_or_else(|| bad("transpose"));
            (perm.iter().map(|&i| src[i].clone()).collect(), d, rep)
        }
        Expr::Add([x, y]) => {
            let (sa, d, _) = t(*x).unwrap_or_else(|| bad("add"));
            let (sb, _, _) = t(*y).unwrap_or_else(|| bad("add"));
            (broadcast_shapes(&a.constants, sa, sb).unwrap_or_else(|| bad("add")), d, 1)
        }
    };
    Data::Tensor { shape, dtype, replication }
}

impl Analysis<Expr> for ShapeAnalysis {
    type Data = Data;

    fn make(egraph: &mut Graph, enode: &Expr, _id: Id) -> Data {
        make(egraph, enode)
    }

    fn merge(&mut self, to: &mut Data, from: Data) -> DidMerge {
        match (to, from) {
            (Data::Attr(a), Data::Attr(b)) => {
                assert_eq!(*a, b, "e-graph invariant: merged two different attributes");
                DidMerge(false, false)
            }
            (Data::Tensor { shape, replication, .. }, Data::Tensor { shape: s2, replication: r2, .. }) => {
                assert!(
                    self.constants.same_shape(shape, &s2),
                    "e-graph invariant: merged e-classes of shapes {shape:?} and {s2:?}"
                );
                let grew = r2 > *replication;
                let shrank = r2 < *replication;
                if grew {
                    *replication = r2;
                }
                DidMerge(grew, shrank)
            }
            _ => panic!("e-graph invariant: merged an attribute with a tensor"),
        }
    }
}
