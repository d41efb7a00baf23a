//! Shape and dtype inference, one rule per op. Errors are plain sentences;
//! the importer prefixes them with the node at fault.

use super::op::{EinsumSpec, Op, Shape};
use super::poly::Poly;
use super::{fmt_shape, DType, Dims};

/// One operand as seen by inference.
pub struct Operand<'a> {
    pub shape: &'a Shape,
    pub dtype: DType,
}

/// Checks a size a user wrote or an op produced: it must be positive for
/// every value of the runtime dims (a runtime dim alone may be 0).
pub fn check_size(dims: &Dims, p: &Poly) -> Result<(), String> {
    let n = dims.normalize(p).map_err(|e| format!("size `{p}`: {e}"))?;
    if n == Poly::zero() {
        return Err(format!("size `{p}` is 0"));
    }
    if !n.is_nonnegative() {
        return Err(if n == *p {
            format!("size `{p}` can be negative")
        } else {
            format!("size `{p}` (= {n}) can be negative")
        });
    }
    Ok(())
}

/// Number of elements, symbolically.
pub fn numel(dims: &Dims, shape: &[Poly]) -> Result<Poly, String> {
    let mut acc = Poly::constant(1);
    for d in shape {
        acc = acc.mul(d).map_err(|e| format!("element count of {}: {e}", fmt_shape(shape)))?;
    }
    dims.normalize(&acc).map_err(|e| format!("element count of {}: {e}", fmt_shape(shape)))
}

fn expect_arity(op: &Op, n: usize, want: usize) -> Result<(), String> {
    if n != want {
        return Err(format!("`{}` takes {want} input{}, got {n}", op.name(), if want == 1 { "" } else { "s" }));
    }
    Ok(())
}

fn expect_float(op: &Op, i: usize, x: &Operand) -> Result<(), String> {
    if !x.dtype.is_float() {
        return Err(format!("`{}` input {i} must be a float tensor, got {}", op.name(), x.dtype));
    }
    Ok(())
}

fn expect_int(op: &Op, i: usize, x: &Operand) -> Result<(), String> {
    if x.dtype.is_float() {
        return Err(format!("`{}` input {i} must be an integer tensor, got {}", op.name(), x.dtype));
    }
    Ok(())
}

/// numpy broadcasting of two shapes (right-aligned; a size-1 axis stretches).
pub fn broadcast_shapes(dims: &Dims, a: &[Poly], b: &[Poly]) -> Result<Shape, String> {
    let rank = a.len().max(b.len());
    let one = Poly::constant(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.len()).checked_sub(rank).map(|j| &a[j]);
        let db = (i + b.len()).checked_sub(rank).map(|j| &b[j]);
        let d = match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if dims.same(x, y) => x.clone(),
            (Some(x), Some(y)) if dims.same(x, &one) => y.clone(),
            (Some(x), Some(y)) if dims.same(y, &one) => x.clone(),
            _ => return Err(format!("shapes {} and {} do not broadcast (axis {i})", fmt_shape(a), fmt_shape(b))),
        };
        out.push(d);
    }
    Ok(out)
}

fn einsum_shape(dims: &Dims, spec: &EinsumSpec, ins: &[Operand]) -> Result<Shape, String> {
    if ins.len() != spec.inputs.len() {
        return Err(format!("einsum spec `{spec}` names {} operands, got {} inputs", spec.inputs.len(), ins.len()));
    }
    let mut sizes: Vec<(char, Poly, usize)> = Vec::new();
    for (i, (subs, x)) in spec.inputs.iter().zip(ins).enumerate() {
        if subs.len() != x.shape.len() {
            return Err(format!(
                "einsum spec `{spec}`: operand {i} has {} subscripts but shape {} has rank {}",
                subs.len(),
                fmt_shape(x.shape),
                x.shape.len()
            ));
        }
        for (c, d) in subs.iter().zip(x.shape.iter()) {
            match sizes.iter().find(|(l, _, _)| l == c) {
                Some((_, prev, j)) if !dims.same(prev, d) => {
                    return Err(format!(
                        "einsum spec `{spec}`: subscript `{c}` is {prev} in operand {j} {} but {d} in operand {i} {}",
                        fmt_shape(ins[*j].shape),
                        fmt_shape(x.shape)
                    ))
                }
                Some(_) => {}
                None => sizes.push((*c, d.clone(), i)),
            }
        }
    }
    Ok(spec.output.iter().filter_map(|c| sizes.iter().find(|(l, _, _)| l == c).map(|(_, d, _)| d.clone())).collect())
}

fn axis_in(op: &Op, axis: usize, shape: &Shape) -> Result<(), String> {
    if axis >= shape.len() {
        return Err(format!("`{}` axis {axis} is out of range for shape {}", op.name(), fmt_shape(shape)));
    }
    Ok(())
}

/// Infers the result shape and dtype of `op` applied to `ins`.
pub fn infer(dims: &Dims, op: &Op, ins: &[Operand]) -> Result<(Shape, DType), String> {
    let first_dtype = ins.first().map(|x| x.dtype).unwrap_or(DType::F32);
    let shape = match op {
        Op::Einsum(spec) => {
            for (i, x) in ins.iter().enumerate() {
                expect_float(op, i, x)?;
            }
            einsum_shape(dims, spec, ins)?
        }
        Op::MatMul { transpose_b } => {
            expect_arity(op, ins.len(), 2)?;
            let (a, b) = (ins[0].shape, ins[1].shape);
            expect_float(op, 0, &ins[0])?;
            expect_float(op, 1, &ins[1])?;
            if a.len() < 2 || b.len() < 2 {
                return Err(format!("`matmul` needs rank >= 2 operands, got {} and {}", fmt_shape(a), fmt_shape(b)));
            }
            let (m, ka) = (&a[a.len() - 2], &a[a.len() - 1]);
            let (kb, n) =
                if *transpose_b { (&b[b.len() - 1], &b[b.len() - 2]) } else { (&b[b.len() - 2], &b[b.len() - 1]) };
            if !dims.same(ka, kb) {
                return Err(format!(
                    "`matmul` contraction sizes differ: {} @ {}{} ({ka} vs {kb})",
                    fmt_shape(a),
                    fmt_shape(b),
                    if *transpose_b { "^T" } else { "" }
                ));
            }
            let mut out = broadcast_shapes(dims, &a[..a.len() - 2], &b[..b.len() - 2])?;
            out.push(m.clone());
            out.push(n.clone());
            out
        }
        Op::Concat { axis } => {
            if ins.is_empty() {
                return Err("`concat` takes at least 1 input, got 0".into());
            }
            let base = ins[0].shape;
            axis_in(op, *axis, base)?;
            let mut total = Poly::zero();
            for (i, x) in ins.iter().enumerate() {
                let ok = x.shape.len() == base.len()
                    && x.shape.iter().zip(base).enumerate().all(|(j, (p, q))| j == *axis || dims.same(p, q));
                if !ok {
                    return Err(format!(
                        "`concat` on axis {axis}: input {i} has shape {} but input 0 has {}",
                        fmt_shape(x.shape),
                        fmt_shape(base)
                    ));
                }
                if x.dtype != ins[0].dtype {
                    return Err(format!("`concat`: input {i} is {} but input 0 is {}", x.dtype, ins[0].dtype));
                }
                total = total.add(&x.shape[*axis]).map_err(|e| e.to_string())?;
            }
            let mut out = base.clone();
            out[*axis] = total;
            out
        }
        Op::Broadcast { shape } => {
            expect_arity(op, ins.len(), 1)?;
            let x = ins[0].shape;
            let one = Poly::constant(1);
            let fits = shape.len() >= x.len()
                && x.iter().zip(&shape[shape.len() - x.len()..]).all(|(d, t)| dims.same(d, t) || dims.same(d, &one));
            if !fits {
                return Err(format!("cannot broadcast {} to {}", fmt_shape(x), fmt_shape(shape)));
            }
            shape.clone()
        }
        Op::Slice { axis, start, end } => {
            expect_arity(op, ins.len(), 1)?;
            let x = ins[0].shape;
            axis_in(op, *axis, x)?;
            let len = end.sub(start).map_err(|e| e.to_string())?;
            let rest = x[*axis].sub(end).map_err(|e| e.to_string())?;
            let norm = |p: &Poly| dims.normalize(p).map_err(|e| e.to_string());
            if !norm(start)?.is_nonnegative() || !norm(&len)?.is_nonnegative() || !norm(&rest)?.is_nonnegative() {
                return Err(format!(
                    "`slice` [{start}, {end}) on axis {axis} is not inside 0..{} of shape {}",
                    x[*axis],
                    fmt_shape(x)
                ));
            }
            if norm(&len)? == Poly::zero() {
                return Err(format!("`slice` [{start}, {end}) on axis {axis} is empty"));
            }
            let mut out = x.clone();
            out[*axis] = len;
            out
        }
        Op::Reshape { shape } => {
            expect_arity(op, ins.len(), 1)?;
            let x = ins[0].shape;
            if numel(dims, x)? != numel(dims, shape)? {
                return Err(format!(
                    "cannot reshape {} ({} elements) to {} ({} elements)",
                    fmt_shape(x),
                    numel(dims, x)?,
                    fmt_shape(shape),
                    numel(dims, shape)?
                ));
            }
            shape.clone()
        }
        Op::Transpose { perm } => {
            expect_arity(op, ins.len(), 1)?;
            let x = ins[0].shape;
            let mut seen = vec![false; x.len()];
            let valid =
                perm.len() == x.len() && perm.iter().all(|&p| p < x.len() && !std::mem::replace(&mut seen[p], true));
            if !valid {
                return Err(format!("`transpose` perm {perm:?} is not a permutation of the axes of {}", fmt_shape(x)));
            }
            perm.iter().map(|&p| x[p].clone()).collect()
        }
        Op::Softmax { axis } => {
            expect_arity(op, ins.len(), 1)?;
            expect_float(op, 0, &ins[0])?;
            axis_in(op, *axis, ins[0].shape)?;
            ins[0].shape.clone()
        }
        Op::Unary(_) | Op::Scale { .. } => {
            expect_arity(op, ins.len(), 1)?;
            expect_float(op, 0, &ins[0])?;
            ins[0].shape.clone()
        }
        Op::Binary(_) => {
            expect_arity(op, ins.len(), 2)?;
            expect_float(op, 0, &ins[0])?;
            expect_float(op, 1, &ins[1])?;
            broadcast_shapes(dims, ins[0].shape, ins[1].shape)?
        }
        Op::Reduce { axes, keepdims, .. } => {
            expect_arity(op, ins.len(), 1)?;
            expect_float(op, 0, &ins[0])?;
            let x = ins[0].shape;
            for (i, a) in axes.iter().enumerate() {
                axis_in(op, *a, x)?;
                if axes[..i].contains(a) {
                    return Err(format!("`{}` names axis {a} twice", op.name()));
                }
            }
            x.iter()
                .enumerate()
                .filter_map(|(i, d)| match (axes.contains(&i), keepdims) {
                    (false, _) => Some(d.clone()),
                    (true, true) => Some(Poly::constant(1)),
                    (true, false) => None,
                })
                .collect()
        }
        Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
            let want = if matches!(op, Op::RmsNorm { .. }) { 2 } else { 3 };
            expect_arity(op, ins.len(), want)?;
            let x = ins[0].shape;
            let last = x.last().ok_or_else(|| format!("`{}` needs rank >= 1, got []", op.name()))?;
            for (i, p) in ins.iter().enumerate() {
                expect_float(op, i, p)?;
                if i > 0 && !dims.same_shape(p.shape, std::slice::from_ref(last)) {
                    return Err(format!(
                        "`{}` input {i} must have shape [{last}] (the last axis of {}), got {}",
                        op.name(),
                        fmt_shape(x),
                        fmt_shape(p.shape)
                    ));
                }
            }
            x.clone()
        }
        Op::Rope { .. } => {
            expect_arity(op, ins.len(), 2)?;
            expect_float(op, 0, &ins[0])?;
            expect_int(op, 1, &ins[1])?;
            let (x, pos) = (ins[0].shape, ins[1].shape);
            if x.len() != 4 || pos.len() != 2 || !dims.same(&x[0], &pos[0]) || !dims.same(&x[2], &pos[1]) {
                return Err(format!(
                    "`rope` wants x [b, heads, n, k] and positions [b, n], got {} and {}",
                    fmt_shape(x),
                    fmt_shape(pos)
                ));
            }
            if let Some(k) = dims.normalize(&x[3]).ok().and_then(|p| p.as_constant()) {
                if k % 2 != 0 {
                    return Err(format!("`rope` head dim {} is odd", x[3]));
                }
            }
            x.clone()
        }
        Op::Gather => {
            expect_arity(op, ins.len(), 2)?;
            expect_int(op, 1, &ins[1])?;
            let table = ins[0].shape;
            if table.len() != 2 {
                return Err(format!("`gather` table must be [rows, d], got {}", fmt_shape(table)));
            }
            let mut out = ins[1].shape.clone();
            out.push(table[1].clone());
            out
        }
        Op::Constant { shape, .. } => {
            expect_arity(op, ins.len(), 0)?;
            return Ok((shape.clone(), DType::F32));
        }
        Op::CausalMask { query, key, .. } => {
            expect_arity(op, ins.len(), 0)?;
            return Ok((vec![query.clone(), key.clone()], DType::F32));
        }
    };
    Ok((shape, first_dtype))
}
