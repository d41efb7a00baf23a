//! Einsum laws: how an einsum meets matmul, transpose, broadcast, reshape and
//! concat. Bifurcated attention falls out of these: the context's broadcast
//! over samples is absorbed into the einsum that reads it.

use super::spec::{self, Spec};
use super::{law, nodes_of};
use crate::analysis::{attr_of, shape_of, Graph, ShapeAnalysis};
use crate::lang::Expr;
use crate::poly::Poly;
use crate::shape::{parse_list_attr, reshape_groups, Shape};
use egg::{Id, Rewrite};

#[rustfmt::skip]
pub fn rules() -> Vec<Rewrite<Expr, ShapeAnalysis>> {
    vec![
        // matmul(a, b) == einsum("..xy,..yz->..xz", a, b)       (equal batch axes, or b of rank 2)
        law("matmul-to-einsum",              "(matmul ?a ?b)",    &["?a", "?b"],       |eg, _, v| matmul(eg, v[0], v[1], false)),
        // matmul_t(a, b) == einsum("..xy,..zy->..xz", a, b)
        law("matmul-t-to-einsum",            "(matmul_t ?a ?b)",  &["?a", "?b"],       |eg, _, v| matmul(eg, v[0], v[1], true)),
        // einsum(s, .., transpose(p, x), ..) == einsum(s with the operand's letters permuted, .., x, ..)
        law("einsum-absorb-transpose",       "(einsum ?s ?a ?b)", &["?s", "?a", "?b"], |eg, _, v| each_operand(eg, v, absorb_transpose)),
        // einsum(s, .., broadcast(x), ..) == einsum(s without the broadcast axes' letters, .., x, ..)
        law("einsum-absorb-broadcast",       "(einsum ?s ?a ?b)", &["?s", "?a", "?b"], |eg, _, v| each_operand(eg, v, absorb_broadcast)),
        // einsum(s, .., reshape(x) dropping size-1 axes of x, ..) == einsum(s with x's size-1 axes under fresh letters, .., x, ..)
        law("einsum-absorb-unit-reshape",    "(einsum ?s ?a ?b)", &["?s", "?a", "?b"], |eg, _, v| each_operand(eg, v, absorb_unit_reshape)),
        // einsum(s, .., reshape(x) merging axes g,p into h, ..) == reshape(einsum(s with h split into g,p, .., x, ..))
        law("einsum-split-merged-axis",      "(einsum ?s ?a ?b)", &["?s", "?a", "?b"], |eg, c, v| each_operand(eg, v, |eg, s, ops, j, n| split_merged(eg, c, s, ops, j, n))),
        // einsum(s, .., concat_L(x1, x2), ..) == concat_L(einsum(s, .., x1, ..), einsum(s, .., x2, ..))   (L free)
        law("einsum-concat-free-axis",       "(einsum ?s ?a ?b)", &["?s", "?a", "?b"], |eg, _, v| each_operand(eg, v, concat_free)),
        // einsum(s, y, concat_L(x1, x2)) == einsum(s, y[L in part 1], x1) + einsum(s, y[L in part 2], x2)   (L contracted)
        law("einsum-concat-contracted-axis", "(einsum ?s ?a ?b)", &["?s", "?a", "?b"], |eg, _, v| each_operand(eg, v, concat_contracted)),
    ]
}

/// Runs `f` for each operand position and each e-node in that operand's class.
fn each_operand<R: IntoIterator<Item = Id>>(
    eg: &mut Graph,
    v: &[Id],
    mut f: impl FnMut(&mut Graph, &Spec, &[Id], usize, &Expr) -> R,
) -> Vec<Id> {
    let Some(spec) = attr_of(eg, v[0]).and_then(Spec::parse) else { return Vec::new() };
    let ops = &v[1..];
    let mut out = Vec::new();
    for j in 0..ops.len() {
        for node in nodes_of(eg, ops[j]) {
            out.extend(f(eg, &spec, ops, j, &node));
        }
    }
    out
}

fn replaced(ops: &[Id], j: usize, x: Id) -> Vec<Id> {
    let mut v = ops.to_vec();
    v[j] = x;
    v
}

fn matmul(eg: &mut Graph, a: Id, b: Id, transpose_b: bool) -> Vec<Id> {
    let (Some(sa), Some(sb)) = (shape_of(eg, a).cloned(), shape_of(eg, b).cloned()) else { return Vec::new() };
    let c = &eg.analysis.constants;
    let batch_a: Vec<char> = ('a'..='h').take(sa.len().saturating_sub(2)).collect();
    let batch_b: Vec<char> = if sb.len() == 2 {
        Vec::new()
    } else if sb.len() == sa.len() && c.same_shape(&sa[..sa.len() - 2], &sb[..sb.len() - 2]) {
        batch_a.clone()
    } else {
        return Vec::new();
    };
    if sa.len() > 10 {
        return Vec::new();
    }
    let (x, y, z) = ('x', 'y', 'z');
    let mut ia = batch_a.clone();
    ia.extend([x, y]);
    let mut ib = batch_b;
    ib.extend(if transpose_b { [z, y] } else { [y, z] });
    let mut out = batch_a;
    out.extend([x, z]);
    let spec = Spec { ins: vec![ia, ib], out };
    vec![spec::einsum(eg, &spec, &[a, b])]
}

fn absorb_transpose(eg: &mut Graph, s: &Spec, ops: &[Id], j: usize, node: &Expr) -> Option<Id> {
    let Expr::Transpose([p, x]) = node else { return None };
    let perm = parse_list_attr(attr_of(eg, *p)?)?;
    let mut letters = vec![' '; perm.len()];
    for (i, &pi) in perm.iter().enumerate() {
        letters[pi] = s.ins[j][i];
    }
    let mut spec = s.clone();
    spec.ins[j] = letters;
    Some(spec::einsum(eg, &spec, &replaced(ops, j, *x)))
}

fn absorb_broadcast(eg: &mut Graph, s: &Spec, ops: &[Id], j: usize, node: &Expr) -> Vec<Id> {
    let Expr::Broadcast([_, x]) = node else { return Vec::new() };
    let (Some(target), Some(src)) = (shape_of(eg, ops[j]).cloned(), shape_of(eg, *x).cloned()) else {
        return Vec::new();
    };
    let c = &eg.analysis.constants;
    let lead = target.len() - src.len();
    // Axes of the operand that the broadcast creates (leading) or stretches (size 1 in x).
    let stretched: Vec<usize> =
        (lead..target.len()).filter(|&i| c.is_one(&src[i - lead]) && !c.is_one(&target[i])).collect();
    let dropped: Vec<usize> = (0..lead).chain(stretched.iter().copied()).collect();
    // Each dropped letter must keep its size from another operand: one that
    // only the output has would leave the einsum without its size.
    let sized_elsewhere = |l: char| s.ins.iter().enumerate().any(|(i, x)| i != j && x.contains(&l));
    if dropped.is_empty() || dropped.iter().any(|&i| !sized_elsewhere(s.ins[j][i])) {
        return Vec::new();
    }
    let mut out = Vec::new();
    // Form 1: squeeze the stretched size-1 axes away (a reshape of x).
    let kept_src: Shape =
        (lead..target.len()).filter(|i| !dropped.contains(i)).map(|i| src[i - lead].clone()).collect();
    let operand = if kept_src.len() == src.len() { *x } else { spec::reshape(eg, &kept_src, *x) };
    let mut spec = s.clone();
    spec.ins[j] = (0..target.len()).filter(|i| !dropped.contains(i)).map(|i| s.ins[j][i]).collect();
    out.push(spec::einsum(eg, &spec, &replaced(ops, j, operand)));
    // Form 2: read x as it is, its size-1 axes under fresh letters summed over
    // one element. No reshape stands between the einsum and x, so laws about x
    // (a concat, say) still see it.
    if !stretched.is_empty() {
        let mut spec = s.clone();
        let mut fresh = s.fresh(stretched.len()).into_iter();
        let mut letters = Vec::new();
        for i in lead..target.len() {
            letters.push(if stretched.contains(&i) { fresh.next() } else { Some(s.ins[j][i]) });
        }
        if let Some(letters) = letters.into_iter().collect::<Option<Vec<char>>>() {
            spec.ins[j] = letters;
            out.push(spec::einsum(eg, &spec, &replaced(ops, j, *x)));
        }
    }
    out
}

fn absorb_unit_reshape(eg: &mut Graph, s: &Spec, ops: &[Id], j: usize, node: &Expr) -> Option<Id> {
    let Expr::Reshape([_, x]) = node else { return None };
    let to = shape_of(eg, ops[j])?;
    let from = shape_of(eg, *x)?;
    let c = &eg.analysis.constants;
    if from.len() <= to.len() {
        return None;
    }
    // x's axes in order: each one either matches the next operand axis or is a size-1 axis the reshape drops.
    let mut fresh = s.fresh(from.len() - to.len()).into_iter();
    let mut letters = Vec::with_capacity(from.len());
    let mut k = 0;
    for d in from {
        if k < to.len() && c.same(d, &to[k]) {
            letters.push(s.ins[j][k]);
            k += 1;
        } else if c.is_one(d) {
            letters.push(fresh.next()?);
        } else {
            return None;
        }
    }
    if k != to.len() {
        return None;
    }
    let mut spec = s.clone();
    spec.ins[j] = letters;
    Some(spec::einsum(eg, &spec, &replaced(ops, j, *x)))
}

fn split_merged(eg: &mut Graph, matched: Id, s: &Spec, ops: &[Id], j: usize, node: &Expr) -> Option<Id> {
    let Expr::Reshape([_, x]) = node else { return None };
    let to = shape_of(eg, ops[j])?.clone();
    let from = shape_of(eg, *x)?.clone();
    let groups = reshape_groups(&eg.analysis.constants, &from, &to)?;
    // Only merges: each operand axis comes from one or more axes of x.
    if groups.iter().any(|(_, out)| out.len() != 1) || groups.iter().all(|(inp, _)| inp.len() == 1) {
        return None;
    }
    let mut spec = s.clone();
    let mut fresh = s.fresh(from.len()).into_iter();
    // For every merged letter: the letters and sizes it splits into.
    let mut splits: Vec<(char, Vec<char>, Shape)> = Vec::new();
    let mut x_letters = Vec::new();
    for (inp, out) in &groups {
        let letter = s.ins[j][out.start];
        if inp.len() == 1 {
            x_letters.push(letter);
        } else {
            let parts: Vec<char> = inp.clone().map(|_| fresh.next()).collect::<Option<_>>()?;
            x_letters.extend(&parts);
            splits.push((letter, parts, from[inp.clone()].to_vec()));
        }
    }
    spec.ins[j] = x_letters;
    let expand = |letters: &[char]| -> Vec<char> {
        letters
            .iter()
            .flat_map(|l| match splits.iter().find(|(m, _, _)| m == l) {
                Some((_, parts, _)) => parts.clone(),
                None => vec![*l],
            })
            .collect()
    };
    let mut new_ops = ops.to_vec();
    new_ops[j] = *x;
    for (i, op) in ops.iter().enumerate() {
        if i == j || !s.ins[i].iter().any(|l| splits.iter().any(|(m, _, _)| m == l)) {
            continue;
        }
        let shape = shape_of(eg, *op)?.clone();
        let split_shape: Shape = s.ins[i]
            .iter()
            .zip(&shape)
            .flat_map(|(l, d)| match splits.iter().find(|(m, _, _)| m == l) {
                Some((_, _, sizes)) => sizes.clone(),
                None => vec![d.clone()],
            })
            .collect();
        spec.ins[i] = expand(&s.ins[i]);
        new_ops[i] = spec::reshape(eg, &split_shape, *op);
    }
    spec.out = expand(&s.out);
    let inner = spec::einsum(eg, &spec, &new_ops);
    let out_shape = shape_of(eg, matched)?.clone();
    Some(spec::reshape(eg, &out_shape, inner))
}

/// The concat node's axis, parts and the operand letter on that axis.
fn concat_parts(eg: &Graph, s: &Spec, j: usize, node: &Expr) -> Option<(usize, Vec<Id>, char)> {
    let Expr::Concat(c) = node else { return None };
    let axis: usize = attr_of(eg, c[0])?.parse().ok()?;
    Some((axis, c[1..].to_vec(), *s.ins[j].get(axis)?))
}

fn concat_free(eg: &mut Graph, s: &Spec, ops: &[Id], j: usize, node: &Expr) -> Option<Id> {
    let (_, parts, letter) = concat_parts(eg, s, j, node)?;
    let out_axis = s.out.iter().position(|&l| l == letter)?;
    if parts.len() < 2 || s.ins.iter().enumerate().any(|(i, x)| i != j && x.contains(&letter)) {
        return None;
    }
    let pieces: Vec<Id> = parts.iter().map(|&p| spec::einsum(eg, s, &replaced(ops, j, p))).collect();
    Some(spec::concat(eg, out_axis, &pieces))
}

fn concat_contracted(eg: &mut Graph, s: &Spec, ops: &[Id], j: usize, node: &Expr) -> Option<Id> {
    let (axis, parts, letter) = concat_parts(eg, s, j, node)?;
    if parts.len() < 2 || s.out.contains(&letter) {
        return None;
    }
    let mut terms = Vec::new();
    let mut start = Poly::zero();
    for &part in &parts {
        let len = shape_of(eg, part)?.get(axis)?.clone();
        let end = start.add(&len).ok()?;
        let mut new_ops = replaced(ops, j, part);
        for (i, op) in ops.iter().enumerate() {
            if let Some(pos) = s.ins[i].iter().position(|&l| l == letter).filter(|_| i != j) {
                new_ops[i] = spec::slice(eg, pos, &start, &end, *op);
            }
        }
        terms.push(spec::einsum(eg, s, &new_ops));
        start = end;
    }
    spec::sum(eg, &terms)
}
