//! Arithmetic ops: elementwise, softmax, reductions, norms. All math in f64,
//! rounded once to f32.

use super::loops::{broadcast_shape, broadcast_strides, Contraction, Odometer, Reducer};
use super::special::{gelu, gelu_tanh, silu};
use super::tensor::{numel, strides};
use super::{InterpError, Tensor};
use crate::ir::{BinaryOp, ReduceOp, UnaryOp};

/// `f` applied to every element (in f64).
pub(crate) fn map(x: &Tensor, f: impl Fn(f64) -> f64) -> Tensor {
    Tensor { shape: x.shape.clone(), data: x.data.iter().map(|&v| f(f64::from(v)) as f32).collect() }
}

/// An elementwise unary op.
pub(crate) fn unary(op: UnaryOp, x: &Tensor) -> Tensor {
    match op {
        UnaryOp::Exp => map(x, f64::exp),
        UnaryOp::Neg => map(x, |v| -v),
        UnaryOp::Rsqrt => map(x, |v| 1.0 / v.sqrt()),
        UnaryOp::Silu => map(x, silu),
        UnaryOp::Gelu => map(x, gelu),
        UnaryOp::GeluTanh => map(x, gelu_tanh),
        UnaryOp::Tanh => map(x, f64::tanh),
    }
}

/// An elementwise binary op with numpy broadcasting.
pub(crate) fn binary(node: &str, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor, InterpError> {
    let shape = broadcast_shape(&a.shape, &b.shape)
        .ok_or_else(|| InterpError::op(node, format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape)))?;
    let st = [broadcast_strides(&a.shape, &shape), broadcast_strides(&b.shape, &shape)];
    let [Some(sa), Some(sb)] = st else {
        return Err(InterpError::op(node, format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape)));
    };
    let f: fn(f64, f64) -> f64 = match op {
        BinaryOp::Add => |x, y| x + y,
        BinaryOp::Sub => |x, y| x - y,
        BinaryOp::Mul => |x, y| x * y,
        BinaryOp::Div => |x, y| x / y,
    };
    let n = numel(&shape);
    let strides = [sa, sb];
    let mut od = Odometer::new(&shape, &strides, &[0, 0]);
    let mut data = Vec::with_capacity(n);
    for _ in 0..n {
        data.push(f(f64::from(a.data[od.offs[0]]), f64::from(b.data[od.offs[1]])) as f32);
        od.advance();
    }
    Ok(Tensor { shape, data })
}

/// Splits a shape around `axis` into (outer, len, inner) element counts.
fn lanes(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]))
}

/// Numerically stable softmax along `axis`. A lane of all `-inf` gives 0s.
pub(crate) fn softmax(node: &str, x: &Tensor, axis: usize) -> Result<Tensor, InterpError> {
    if axis >= x.shape.len() {
        return Err(InterpError::op(node, format!("softmax axis {axis} is out of range for {:?}", x.shape)));
    }
    let (outer, len, inner) = lanes(&x.shape, axis);
    let mut data = vec![0.0f32; x.data.len()];
    let mut e = vec![0.0f64; len];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let max = (0..len).map(|j| f64::from(x.data[at(j)])).fold(f64::NEG_INFINITY, nan_max);
            if max == f64::NEG_INFINITY {
                continue; // fully masked lane (or empty): zeros
            }
            let mut sum = 0.0;
            for (j, ej) in e.iter_mut().enumerate() {
                *ej = (f64::from(x.data[at(j)]) - max).exp();
                sum += *ej;
            }
            for (j, ej) in e.iter().enumerate() {
                data[at(j)] = (ej / sum) as f32;
            }
        }
    }
    Ok(Tensor { shape: x.shape.clone(), data })
}

/// `max` that lets NaN through.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Sum or max over `axes`.
pub(crate) fn reduce(
    node: &str,
    op: ReduceOp,
    x: &Tensor,
    axes: &[usize],
    keepdims: bool,
) -> Result<Tensor, InterpError> {
    if let Some(a) = axes.iter().find(|&&a| a >= x.shape.len()) {
        return Err(InterpError::op(node, format!("reduce axis {a} is out of range for {:?}", x.shape)));
    }
    let src = strides(&x.shape);
    let (mut out_sizes, mut out_st, mut red_sizes, mut red_st, mut shape) = (vec![], vec![], vec![], vec![], vec![]);
    for (i, (&d, &s)) in x.shape.iter().zip(&src).enumerate() {
        if axes.contains(&i) {
            red_sizes.push(d);
            red_st.push(s);
            if keepdims {
                shape.push(1);
            }
        } else {
            out_sizes.push(d);
            out_st.push(s);
            shape.push(d);
        }
    }
    let plan = Contraction { out_sizes, red_sizes, out_strides: vec![out_st], red_strides: vec![red_st] };
    let reducer = match op {
        ReduceOp::Sum => Reducer::Sum,
        ReduceOp::Max => Reducer::Max,
    };
    Ok(Tensor { shape, data: plan.run(&[&x.data], reducer) })
}

/// Checks that a norm parameter has shape `[last axis of x]`.
fn check_param(node: &str, x: &Tensor, p: &Tensor, what: &str) -> Result<usize, InterpError> {
    let d = x.shape.last().copied().ok_or_else(|| InterpError::op(node, "norm input must have rank >= 1"))?;
    if p.shape != [d] {
        return Err(InterpError::op(node, format!("{what} has shape {:?}, expected [{d}]", p.shape)));
    }
    Ok(d)
}

/// `x / sqrt(mean(x^2, last axis) + eps) * weight`.
pub(crate) fn rms_norm(node: &str, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor, InterpError> {
    let d = check_param(node, x, w, "weight")?;
    let mut data = Vec::with_capacity(x.data.len());
    for row in x.data.chunks(d.max(1)) {
        let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
        let r = 1.0 / (ms + eps).sqrt();
        data.extend(row.iter().zip(&w.data).map(|(&v, &g)| (f64::from(v) * r * f64::from(g)) as f32));
    }
    Ok(Tensor { shape: x.shape.clone(), data })
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis, with
/// the biased variance (PyTorch's `LayerNorm`).
pub(crate) fn layer_norm(node: &str, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor, InterpError> {
    let d = check_param(node, x, w, "weight")?;
    check_param(node, x, b, "bias")?;
    let mut data = Vec::with_capacity(x.data.len());
    for row in x.data.chunks(d.max(1)) {
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / d as f64;
        let r = 1.0 / (var + eps).sqrt();
        let params = w.data.iter().zip(&b.data);
        data.extend(
            row.iter()
                .zip(params)
                .map(|(&v, (&g, &c))| ((f64::from(v) - mean) * r * f64::from(g) + f64::from(c)) as f32),
        );
    }
    Ok(Tensor { shape: x.shape.clone(), data })
}
