//! Reshape laws: the collapses that let the grouped-query `repeat_kv`
//! (reshape, expand, reshape) disappear once an einsum has absorbed it.

use super::law;
use crate::analysis::{shape_of, ShapeAnalysis};
use crate::lang::Expr;
use egg::{rewrite as rw, Rewrite};

#[rustfmt::skip]
pub fn rules() -> Vec<Rewrite<Expr, ShapeAnalysis>> {
    vec![
        // reshape(s, reshape(t, x)) == reshape(s, x)
        rw!("reshape-of-reshape"; "(reshape ?s (reshape ?t ?x))" => "(reshape ?s ?x)"),
        // reshape(shape(x), x) == x
        law("reshape-identity", "(reshape ?s ?x)", &["?x"], |eg, c, v| {
            let same = match (shape_of(eg, c), shape_of(eg, v[0])) {
                (Some(a), Some(b)) => eg.analysis.constants.same_shape(a, b),
                _ => false,
            };
            if same { vec![v[0]] } else { vec![] }
        }),
    ]
}
