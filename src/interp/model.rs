//! Transformer-specific ops: rotary embedding, embedding gather, causal mask.

use super::{InterpError, Tensor};

/// Rotary embedding, "rotate half" (Llama/NeoX) form, on `x: [b, H, n, k]`
/// with integer `positions: [b, n]`:
///
/// ```text
/// inv_freq[i] = theta^(-2i/k)          i < k/2
/// angle       = pos * inv_freq[i]
/// out[j]       = x[j] cos - x[j+k/2] sin
/// out[j+k/2]   = x[j+k/2] cos + x[j] sin
/// ```
///
/// Precision: the angle, cos and sin are computed in f64 and cos/sin are
/// rounded to f32 (as a kernel reading an f32 cos/sin table would); the
/// products are again f64, rounded once. Hugging Face computes `inv_freq`,
/// `pos * inv_freq` and cos/sin in f32, so at large positions its values
/// drift from these by about `pos * 2^-24` radians: compare against HF with
/// a tolerance that grows with the position.
pub(crate) fn rope(node: &str, x: &Tensor, pos: &Tensor, theta: f64) -> Result<Tensor, InterpError> {
    let [b, heads, n, k] = x.shape[..] else {
        return Err(InterpError::op(node, format!("rope wants x [b, heads, n, k], got {:?}", x.shape)));
    };
    if pos.shape != [b, n] {
        return Err(InterpError::op(node, format!("rope positions have shape {:?}, expected [{b}, {n}]", pos.shape)));
    }
    if k % 2 != 0 {
        return Err(InterpError::op(node, format!("rope head dim {k} is odd")));
    }
    let half = k / 2;
    let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-2.0 * i as f64 / k as f64)).collect();
    let mut data = vec![0.0f32; x.data.len()];
    let (mut cos, mut sin) = (vec![0.0f64; half], vec![0.0f64; half]);
    for bi in 0..b {
        for t in 0..n {
            let p = f64::from(pos.data[bi * n + t]);
            for i in 0..half {
                let angle = p * inv_freq[i];
                cos[i] = f64::from(angle.cos() as f32);
                sin[i] = f64::from(angle.sin() as f32);
            }
            for h in 0..heads {
                let row = ((bi * heads + h) * n + t) * k;
                let (lo, hi) = x.data[row..row + k].split_at(half);
                for i in 0..half {
                    let (x1, x2) = (f64::from(lo[i]), f64::from(hi[i]));
                    data[row + i] = (x1 * cos[i] - x2 * sin[i]) as f32;
                    data[row + half + i] = (x2 * cos[i] + x1 * sin[i]) as f32;
                }
            }
        }
    }
    Ok(Tensor { shape: x.shape.clone(), data })
}

/// Rows of `table: [rows, d]` picked by integer `ids: [...]` → `[..., d]`.
/// An id outside `0..rows` (or not an integer) is an error naming it.
pub(crate) fn gather(node: &str, table: &Tensor, ids: &Tensor) -> Result<Tensor, InterpError> {
    let [rows, d] = table.shape[..] else {
        return Err(InterpError::op(node, format!("gather table must be [rows, d], got {:?}", table.shape)));
    };
    let mut data = Vec::with_capacity(ids.data.len() * d);
    for (index, &id) in ids.data.iter().enumerate() {
        if !(id >= 0.0 && id.fract() == 0.0 && (id as usize) < rows) {
            return Err(InterpError::GatherId { node: node.into(), index, id, rows });
        }
        let r = id as usize;
        data.extend_from_slice(&table.data[r * d..(r + 1) * d]);
    }
    let mut shape = ids.shape.clone();
    shape.push(d);
    Ok(Tensor { shape, data })
}

/// Additive mask `[query, key]`: `0` where `key_pos <= offset + query_pos`,
/// `-inf` elsewhere.
pub(crate) fn causal_mask(query: usize, key: usize, offset: usize) -> Tensor {
    Tensor::from_fn(vec![query, key], |i| if i[1] <= offset + i[0] { 0.0 } else { f32::NEG_INFINITY })
}
