//! Deterministic random inputs for a graph, for numerical tests.

use super::tensor::MAX_EXACT_INT;
use super::{At, InterpError, Tensor};
use crate::ir::{Graph, Op, Role, Value};
use std::collections::{BTreeMap, HashMap};

/// The runtime's generator and name hash: random data drawn here equals the
/// runtime's random weights for the same seed and tensor name.
pub use bifurc_runtime::rng::{fnv1a, SplitMix64};

/// Random values for every input of `graph` at `point`, the same for the
/// same seed. Each input draws from its own stream, seeded by `seed` and the
/// input's name, so inputs with the same name and shape get the same data in
/// two graphs (an original and its rewrite) whatever their order.
///
/// By role:
/// - `Weight`, rank >= 2: `U[-1, 1) / sqrt(last dim)` (keeps products O(1));
///   rank 1: `1 + 0.1 U[-1, 1)` (norm gains), or `0.1 U[-1, 1)` when the
///   name contains `bias`; rank 0: `U[-1, 1)`.
/// - `Activation`, `ContextKv`, `DecodeKv`: `U[-1, 1)`.
/// - `TokenIds`: integers in `0..rows`, where `rows` is the row count of the
///   table of the first `gather` that reads the input (directly or through
///   view ops); `0..2` when no gather does.
/// - `Position`: element `(.., j)` is `m_s + m_c + m_d + j`, the absolute
///   position of new token `j` in a decode step (`m_s` is the system prompt of
///   a multi-level graph; a dim that is not a runtime dim counts as 0).
/// - Any other integer-typed input: integers in `0..2`.
pub fn random_inputs(
    graph: &Graph,
    point: &BTreeMap<String, i64>,
    seed: u64,
) -> Result<HashMap<String, Tensor>, InterpError> {
    let at = At::new(graph, point)?;
    let mut out = HashMap::new();
    for (index, inp) in graph.inputs.iter().enumerate() {
        let shape = at.shape(&inp.shape, &format!("input `{}`", inp.name))?;
        let mut rng = SplitMix64::new(seed ^ fnv1a(&inp.name));
        let last = shape.last().copied().unwrap_or(1).max(1) as f32;
        let t = match inp.role {
            Role::TokenIds => {
                let rows = gather_rows(graph, &at, index)?.unwrap_or(2) as u64;
                Tensor::from_fn(shape, |_| rng.below(rows) as f32)
            }
            Role::Position => {
                let dim = |d: &str| {
                    if graph.dims.is_runtime(d) {
                        point.get(d).copied().unwrap_or(0)
                    } else {
                        0
                    }
                };
                let base = dim("m_s").saturating_add(dim("m_c")).saturating_add(dim("m_d"));
                let top = base.saturating_add(shape.last().copied().unwrap_or(1) as i64);
                if top > MAX_EXACT_INT {
                    return Err(InterpError::NotInteger { name: inp.name.clone(), index: 0, value: top as f64 });
                }
                Tensor::from_fn(shape, |i| (base + i.last().copied().unwrap_or(0) as i64) as f32)
            }
            _ if !inp.dtype.is_float() => Tensor::from_fn(shape, |_| rng.below(2) as f32),
            Role::Weight if shape.len() >= 2 => Tensor::from_fn(shape, |_| rng.symmetric() / last.sqrt()),
            Role::Weight if shape.len() == 1 && inp.name.contains("bias") => {
                Tensor::from_fn(shape, |_| 0.1 * rng.symmetric())
            }
            Role::Weight if shape.len() == 1 => Tensor::from_fn(shape, |_| 1.0 + 0.1 * rng.symmetric()),
            _ => Tensor::from_fn(shape, |_| rng.symmetric()),
        };
        out.insert(inp.name.clone(), t);
    }
    Ok(out)
}

/// Rows of the table of the first gather whose ids come from input `index`
/// (directly or through view ops).
fn gather_rows(graph: &Graph, at: &At, index: usize) -> Result<Option<usize>, InterpError> {
    let mut from_input = vec![false; graph.nodes.len()];
    let derived = |v: &Value, from: &[bool]| match *v {
        Value::Input(i) => i == index,
        Value::Node(j) => from[j],
    };
    for (j, node) in graph.nodes.iter().enumerate() {
        if matches!(node.op, Op::Gather) && node.inputs.get(1).is_some_and(|v| derived(v, &from_input)) {
            let table = graph.shape_of(node.inputs[0]);
            return match table.first() {
                Some(rows) => Ok(Some(at.size(rows, &format!("node `{}`", node.id))?)),
                None => Ok(None),
            };
        }
        from_input[j] = node.op.is_view() && node.inputs.iter().any(|v| derived(v, &from_input));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of the reference C implementation for seed 1234567.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        let mut u = SplitMix64::new(9);
        for _ in 0..1000 {
            let v = u.symmetric();
            assert!((-1.0..1.0).contains(&v));
            assert!(u.below(7) < 7);
        }
    }
}
