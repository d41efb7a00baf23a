//! Deterministic random inputs for a graph, for numerical tests.

use super::tensor::MAX_EXACT_INT;
use super::{At, InterpError, Tensor};
use crate::ir::{Graph, Op, Role, Value};
use std::collections::{BTreeMap, HashMap};

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, fast, seedable generator;
/// plenty for test data.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 random bits (every value exact in f32).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }

    /// Uniform integer in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

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

/// FNV-1a, 64 bits: a stable hash of an input name (std's hasher may change
/// between Rust releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
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
