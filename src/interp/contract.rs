//! einsum and matmul, both as one strided [`Contraction`] with f64
//! accumulation.

use super::loops::{broadcast_shape, broadcast_strides, Contraction, Reducer};
use super::tensor::strides;
use super::{InterpError, Tensor};
use crate::ir::EinsumSpec;

/// General einsum: any number of operands; letters absent from the output
/// are summed over.
pub(crate) fn einsum(node: &str, spec: &EinsumSpec, args: &[&Tensor]) -> Result<Tensor, InterpError> {
    if spec.inputs.len() != args.len() {
        return Err(InterpError::op(
            node,
            format!("einsum `{spec}` wants {} operands, got {}", spec.inputs.len(), args.len()),
        ));
    }
    // Size of every letter, checked across operands.
    let mut sizes: Vec<(char, usize)> = Vec::new();
    for (i, (subs, t)) in spec.inputs.iter().zip(args).enumerate() {
        if subs.len() != t.shape.len() {
            return Err(InterpError::op(node, format!("einsum `{spec}`: operand {i} has shape {:?}", t.shape)));
        }
        for (&c, &d) in subs.iter().zip(&t.shape) {
            match sizes.iter().find(|(l, _)| *l == c) {
                Some(&(_, prev)) if prev != d => {
                    return Err(InterpError::op(node, format!("einsum `{spec}`: letter `{c}` is {prev} and {d}")))
                }
                Some(_) => {}
                None => sizes.push((c, d)),
            }
        }
    }
    let size_of = |c: char| sizes.iter().find(|(l, _)| *l == c).map_or(0, |&(_, d)| d);
    let reduced: Vec<char> = sizes.iter().map(|&(c, _)| c).filter(|c| !spec.output.contains(c)).collect();
    // Stride of letter `c` in operand `i` (0 when the operand lacks it).
    let stride = |i: usize, c: char| {
        let st = strides(&args[i].shape);
        spec.inputs[i].iter().position(|&l| l == c).map_or(0, |p| st[p])
    };
    let plan = Contraction {
        out_sizes: spec.output.iter().map(|&c| size_of(c)).collect(),
        red_sizes: reduced.iter().map(|&c| size_of(c)).collect(),
        out_strides: (0..args.len()).map(|i| spec.output.iter().map(|&c| stride(i, c)).collect()).collect(),
        red_strides: (0..args.len()).map(|i| reduced.iter().map(|&c| stride(i, c)).collect()).collect(),
    };
    let data: Vec<&[f32]> = args.iter().map(|t| t.data.as_slice()).collect();
    Ok(Tensor { data: plan.run(&data, Reducer::Sum), shape: plan.out_sizes })
}

/// numpy matmul over the last two axes, batch axes broadcast; with
/// `transpose_b`, `b` is `[.., n, k]`.
pub(crate) fn matmul(node: &str, transpose_b: bool, a: &Tensor, b: &Tensor) -> Result<Tensor, InterpError> {
    let bad =
        || InterpError::op(node, format!("cannot matmul {:?} by {:?} (transpose_b = {transpose_b})", a.shape, b.shape));
    let (ra, rb) = (a.shape.len(), b.shape.len());
    if ra < 2 || rb < 2 {
        return Err(bad());
    }
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (sa, sb) = (strides(&a.shape), strides(&b.shape));
    // (k, n) sizes and strides of b.
    let ((kb, skb), (n, snb)) = if transpose_b {
        ((b.shape[rb - 1], sb[rb - 1]), (b.shape[rb - 2], sb[rb - 2]))
    } else {
        ((b.shape[rb - 2], sb[rb - 2]), (b.shape[rb - 1], sb[rb - 1]))
    };
    if k != kb {
        return Err(bad());
    }
    let batch = broadcast_shape(&a.shape[..ra - 2], &b.shape[..rb - 2]).ok_or_else(bad)?;
    // Batch strides: the broadcast of each operand's batch part (in units of
    // whole matrices); the matrix axes keep the operand's own strides.
    let batch_strides = |t: &Tensor| -> Option<Vec<usize>> {
        let r = t.shape.len();
        let mat = t.shape[r - 2] * t.shape[r - 1];
        Some(broadcast_strides(&t.shape[..r - 2], &batch)?.into_iter().map(|s| s * mat).collect())
    };
    let mut a_out = batch_strides(a).ok_or_else(bad)?;
    let mut b_out = batch_strides(b).ok_or_else(bad)?;
    a_out.extend([sa[ra - 2], 0]);
    b_out.extend([0, snb]);
    let mut out_sizes = batch;
    out_sizes.extend([m, n]);
    let plan = Contraction {
        out_sizes,
        red_sizes: vec![k],
        out_strides: vec![a_out, b_out],
        red_strides: vec![vec![sa[ra - 1]], vec![skb]],
    };
    Ok(Tensor { data: plan.run(&[&a.data, &b.data], Reducer::Sum), shape: plan.out_sizes })
}
