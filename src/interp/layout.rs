//! Ops that only move data: concat, broadcast, slice, reshape, transpose.

use super::loops::{broadcast_strides, strided_copy};
use super::tensor::{numel, strides};
use super::{InterpError, Tensor};

/// Joins `args` along `axis`; every other axis must agree.
pub(crate) fn concat(node: &str, axis: usize, args: &[&Tensor]) -> Result<Tensor, InterpError> {
    let first = args.first().ok_or_else(|| InterpError::op(node, "`concat` needs at least one input"))?;
    if axis >= first.shape.len() {
        return Err(InterpError::op(node, format!("concat axis {axis} is out of range for shape {:?}", first.shape)));
    }
    let mut shape = first.shape.clone();
    shape[axis] = 0;
    for (i, t) in args.iter().enumerate() {
        let same = t.shape.len() == first.shape.len()
            && t.shape.iter().zip(&first.shape).enumerate().all(|(j, (a, b))| j == axis || a == b);
        if !same {
            return Err(InterpError::op(
                node,
                format!("concat on axis {axis}: input {i} has shape {:?}, input 0 has {:?}", t.shape, first.shape),
            ));
        }
        shape[axis] += t.shape[axis];
    }
    let outer = numel(&first.shape[..axis]);
    let inner = numel(&first.shape[axis + 1..]);
    let mut data = Vec::with_capacity(numel(&shape));
    for o in 0..outer {
        for t in args {
            let chunk = t.shape[axis] * inner;
            data.extend_from_slice(&t.data[o * chunk..(o + 1) * chunk]);
        }
    }
    Ok(Tensor { shape, data })
}

/// numpy broadcast of `x` to `shape`.
pub(crate) fn broadcast(node: &str, x: &Tensor, shape: &[usize]) -> Result<Tensor, InterpError> {
    let st = broadcast_strides(&x.shape, shape)
        .ok_or_else(|| InterpError::op(node, format!("cannot broadcast {:?} to {:?}", x.shape, shape)))?;
    Ok(Tensor { shape: shape.to_vec(), data: strided_copy(&x.data, shape, st) })
}

/// `x[.., start..end, ..]` on `axis`.
pub(crate) fn slice(node: &str, x: &Tensor, axis: usize, start: usize, end: usize) -> Result<Tensor, InterpError> {
    let len = x.shape.get(axis).copied();
    match len {
        Some(len) if start <= end && end <= len => {}
        _ => {
            return Err(InterpError::op(
                node,
                format!("slice [{start}, {end}) on axis {axis} is not inside shape {:?}", x.shape),
            ))
        }
    }
    let mut shape = x.shape.clone();
    shape[axis] = end - start;
    let outer = numel(&x.shape[..axis]);
    let inner = numel(&x.shape[axis + 1..]);
    let mut data = Vec::with_capacity(numel(&shape));
    for o in 0..outer {
        let row = o * x.shape[axis] * inner;
        data.extend_from_slice(&x.data[row + start * inner..row + end * inner]);
    }
    Ok(Tensor { shape, data })
}

/// Same data, new shape (row-major order is kept).
pub(crate) fn reshape(node: &str, x: &Tensor, shape: Vec<usize>) -> Result<Tensor, InterpError> {
    if numel(&shape) != x.data.len() {
        return Err(InterpError::op(node, format!("cannot reshape {:?} to {:?}", x.shape, shape)));
    }
    Ok(Tensor { shape, data: x.data.clone() })
}

/// Result axis `i` is input axis `perm[i]`.
pub(crate) fn transpose(node: &str, x: &Tensor, perm: &[usize]) -> Result<Tensor, InterpError> {
    let mut seen = vec![false; x.shape.len()];
    let valid =
        perm.len() == x.shape.len() && perm.iter().all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(InterpError::op(node, format!("perm {perm:?} does not permute the axes of {:?}", x.shape)));
    }
    let src = strides(&x.shape);
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let st: Vec<usize> = perm.iter().map(|&p| src[p]).collect();
    Ok(Tensor { data: strided_copy(&x.data, &shape, st), shape })
}
