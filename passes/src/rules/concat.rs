//! Concat laws.

use super::{law, nodes_of};
use crate::analysis::{attr_of, shape_of, ShapeAnalysis};
use crate::lang::Expr;
use crate::poly::Poly;
use egg::Rewrite;

#[rustfmt::skip]
pub fn rules() -> Vec<Rewrite<Expr, ShapeAnalysis>> {
    vec![
        // slice_L(concat_L(x1, x2, ..), [start of xi, end of xi)) == xi
        law("slice-of-concat", "(slice ?ax ?st ?en ?x)", &["?ax", "?st", "?en", "?x"], |eg, _, v| {
            let (Some(ax), Some(st), Some(en)) = (attr_of(eg, v[0]), attr_of(eg, v[1]), attr_of(eg, v[2])) else { return vec![] };
            let (Ok(st), Ok(en)) = (Poly::parse(st), Poly::parse(en)) else { return vec![] };
            let ax = ax.to_string();
            let c = eg.analysis.constants.clone();
            let mut out = Vec::new();
            for node in nodes_of(eg, v[3]) {
                let Expr::Concat(ch) = node else { continue };
                if attr_of(eg, ch[0]) != Some(ax.as_str()) { continue }
                let Ok(axis) = ax.parse::<usize>() else { continue };
                let mut start = Poly::zero();
                for &part in &ch[1..] {
                    let Some(len) = shape_of(eg, part).and_then(|s| s.get(axis)).cloned() else { break };
                    let Ok(end) = start.add(&len) else { break };
                    if c.same(&start, &st) && c.same(&end, &en) { out.push(part); }
                    start = end;
                }
            }
            out
        }),
    ]
}
