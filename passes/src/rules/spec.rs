//! Einsum specs as data the laws edit, and small e-graph builders.

use crate::analysis::Graph;
use crate::lang::Expr;
use crate::poly::Poly;
use crate::shape::{list_attr, shape_attr};
use egg::{Id, Symbol};

/// `bgpnk,gmk->bgpnm` as letter lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub ins: Vec<Vec<char>>,
    pub out: Vec<char>,
}

impl Spec {
    pub fn parse(s: &str) -> Option<Spec> {
        let (lhs, out) = s.split_once("->")?;
        Some(Spec { ins: lhs.split(',').map(|x| x.chars().collect()).collect(), out: out.chars().collect() })
    }

    pub fn text(&self) -> String {
        let ins: Vec<String> = self.ins.iter().map(|s| s.iter().collect()).collect();
        format!("{}->{}", ins.join(","), self.out.iter().collect::<String>())
    }

    /// True when `letter` occurs in the output or in an operand other than `except`.
    pub fn used_elsewhere(&self, letter: char, except: usize) -> bool {
        self.out.contains(&letter) || self.ins.iter().enumerate().any(|(i, s)| i != except && s.contains(&letter))
    }

    /// `n` letters not used by this spec, in alphabetical order.
    pub fn fresh(&self, n: usize) -> Vec<char> {
        ('a'..='z')
            .chain('A'..='Z')
            .filter(|c| !self.out.contains(c) && !self.ins.iter().any(|s| s.contains(c)))
            .take(n)
            .collect()
    }
}

pub fn attr(eg: &mut Graph, s: &str) -> Id {
    eg.add(Expr::Attr(Symbol::from(s)))
}

pub fn einsum(eg: &mut Graph, spec: &Spec, operands: &[Id]) -> Id {
    let s = attr(eg, &spec.text());
    let mut children = vec![s];
    children.extend_from_slice(operands);
    eg.add(Expr::Einsum(children.into_boxed_slice()))
}

pub fn reshape(eg: &mut Graph, shape: &[Poly], x: Id) -> Id {
    let s = attr(eg, &shape_attr(shape));
    eg.add(Expr::Reshape([s, x]))
}

pub fn transpose(eg: &mut Graph, perm: &[usize], x: Id) -> Id {
    let p = attr(eg, &list_attr(perm));
    eg.add(Expr::Transpose([p, x]))
}

pub fn slice(eg: &mut Graph, axis: usize, start: &Poly, end: &Poly, x: Id) -> Id {
    let a = attr(eg, &axis.to_string());
    let s = attr(eg, &start.to_string());
    let e = attr(eg, &end.to_string());
    eg.add(Expr::Slice([a, s, e, x]))
}

pub fn concat(eg: &mut Graph, axis: usize, parts: &[Id]) -> Id {
    let a = attr(eg, &axis.to_string());
    let mut children = vec![a];
    children.extend_from_slice(parts);
    eg.add(Expr::Concat(children.into_boxed_slice()))
}

/// Left-folded sum `((a + b) + c) + …`.
pub fn sum(eg: &mut Graph, terms: &[Id]) -> Option<Id> {
    let (&first, rest) = terms.split_first()?;
    Some(rest.iter().fold(first, |acc, &t| eg.add(Expr::Add([acc, t]))))
}
