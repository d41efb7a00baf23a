//! Deterministic random inputs for a graph, for numerical tests.

use super::tensor::MAX_EXACT_INT;
use super::{At, InterpError, Tensor};
use crate::ir::{Graph, Op, Role, Value};
use std::collections::{BTreeMap, HashMap};

use bifurc_runtime::random::draws;
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
    let mut out = HashMap::new();
    for (index, inp) in graph.inputs.iter().enumerate() {
        out.insert(inp.name.clone(), random_input(graph, point, index, seed)?);
    }
    Ok(out)
}

/// Input `index` of [`random_inputs`] alone: the same values, for a
/// caller that binds one input at a time instead of holding them all in
/// f32. A large float tensor is drawn split across the cores
/// ([`bifurc_runtime::random::draws`]: the same values).
pub fn random_input(
    graph: &Graph,
    point: &BTreeMap<String, i64>,
    index: usize,
    seed: u64,
) -> Result<Tensor, InterpError> {
    let at = &At::new(graph, point)?;
    let inp = graph.inputs.get(index).ok_or_else(|| InterpError::Op {
        node: format!("input {index}"),
        message: format!("the graph has {} inputs", graph.inputs.len()),
    })?;
    let shape = at.shape(&inp.shape, &format!("input `{}`", inp.name))?;
    let mut rng = SplitMix64::new(seed ^ fnv1a(&inp.name));
    let last = shape.last().copied().unwrap_or(1).max(1) as f32;
    let n = shape.iter().product::<usize>();
    Ok(match inp.role {
        Role::TokenIds => {
            let rows = gather_rows(graph, at, index)?.unwrap_or(2) as u64;
            Tensor::from_fn(shape, |_| rng.below(rows) as f32)
        }
        Role::Position => {
            let base = positions_before(graph, point);
            // The last new position, `base + new - 1`, must be exact in
            // f32: 2^24 still is (as `positions_unusable` and the
            // runtime's `check_positions` say).
            let new = shape.last().copied().unwrap_or(1).max(1);
            let last = base.saturating_add(new as i64 - 1);
            if last > MAX_EXACT_INT {
                return Err(InterpError::NotInteger { name: inp.name.clone(), index: new - 1, value: last as f64 });
            }
            Tensor::from_fn(shape, |i| (base + i.last().copied().unwrap_or(0) as i64) as f32)
        }
        _ if !inp.dtype.is_float() => Tensor::from_fn(shape, |_| rng.below(2) as f32),
        Role::Weight if shape.len() >= 2 => {
            let scale = last.sqrt();
            Tensor { data: draws(&rng, n, |r| r.symmetric() / scale), shape }
        }
        Role::Weight if shape.len() == 1 && inp.name.contains("bias") => {
            Tensor::from_fn(shape, |_| 0.1 * rng.symmetric())
        }
        Role::Weight if shape.len() == 1 => Tensor::from_fn(shape, |_| 1.0 + 0.1 * rng.symmetric()),
        _ => Tensor { data: draws(&rng, n, SplitMix64::symmetric), shape },
    })
}

/// Rows of the table of the first gather whose ids come from input `index`
/// (directly or through view ops).
fn gather_rows(graph: &Graph, at: &At, index: usize) -> Result<Option<usize>, InterpError> {
    Ok(gather_table(graph, at, index)?.map(|(_, rows)| rows))
}

/// The table the first gather whose ids come from input `index` reads
/// (directly or through view ops), and its rows.
fn gather_table(graph: &Graph, at: &At, index: usize) -> Result<Option<(Value, usize)>, InterpError> {
    let mut from_input = vec![false; graph.nodes.len()];
    let derived = |v: &Value, from: &[bool]| match *v {
        Value::Input(i) => i == index,
        Value::Node(j) => from[j],
    };
    for (j, node) in graph.nodes.iter().enumerate() {
        if matches!(node.op, Op::Gather) && node.inputs.get(1).is_some_and(|v| derived(v, &from_input)) {
            let table = graph.shape_of(node.inputs[0]);
            return match table.first() {
                Some(rows) => Ok(Some((node.inputs[0], at.size(rows, &format!("node `{}`", node.id))?))),
                None => Ok(None),
            };
        }
        from_input[j] = node.op.is_view() && node.inputs.iter().any(|v| derived(v, &from_input));
    }
    Ok(None)
}

/// Tokens before a step's new ones at `point`: `m_s + m_c + m_d` (a dim
/// that is not a runtime dim of `graph` counts as 0), where its first
/// position is.
fn positions_before(graph: &Graph, point: &BTreeMap<String, i64>) -> i64 {
    let dim = |d: &str| if graph.dims.is_runtime(d) { point.get(d).copied().unwrap_or(0) } else { 0 };
    dim("m_s").saturating_add(dim("m_c")).saturating_add(dim("m_d"))
}

/// Why the positions of a step at `point` ([`random_inputs`]: the new
/// tokens', after `m_s + m_c + m_d` earlier ones) cannot be given, if
/// they cannot: past a table of learned positions (GPT-2's `wpe`: a
/// weight that a gather reads with a `position` input) the gather has no
/// row to read (the reason names the table); past 2^24 a position is not
/// exact in the f32 tensors that carry it. `None` where they can.
pub fn positions_unusable(graph: &Graph, point: &BTreeMap<String, i64>) -> Result<Option<String>, InterpError> {
    let at = At::new(graph, point)?;
    for (index, inp) in graph.inputs.iter().enumerate().filter(|(_, i)| i.role == Role::Position) {
        let shape = at.shape(&inp.shape, &format!("input `{}`", inp.name))?;
        let new = shape.last().copied().unwrap_or(1) as i64;
        let end = positions_before(graph, point).saturating_add(new);
        if let Some((table, rows)) = gather_table(graph, &at, index)? {
            if end > rows as i64 {
                let name = match table {
                    Value::Input(i) => format!("`{}`", graph.inputs[i].name),
                    Value::Node(j) => format!("node `{}`", graph.nodes[j].id),
                };
                return Ok(Some(format!(
                    "{end} positions (context and decoded tokens together) are past the model's {rows} learned \
                     positions ({name} has {rows} rows)"
                )));
            }
        }
        if end - 1 > MAX_EXACT_INT {
            return Ok(Some(format!(
                "{end} positions (context and decoded tokens together): the last, {}, is past {MAX_EXACT_INT} \
                 (2^24), the largest a step's inputs carry exactly (as f32)",
                end - 1
            )));
        }
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

    /// One input drawn alone equals its entry of `random_inputs`, and a
    /// weight and an activation large enough to be drawn split across the
    /// cores hold the values of one generator drawn in order.
    #[test]
    fn inputs_drawn_alone_and_in_parts_equal_one_stream() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["m"], "constants": {"k": 1100}},
            "inputs": [
                {"name": "w", "role": "weight", "shape": [1000, "k"], "dtype": "f32"},
                {"name": "c", "role": "activation", "shape": ["m", "k"], "dtype": "f32"},
                {"name": "g", "role": "weight", "shape": ["k"], "dtype": "f32"}
            ],
            "nodes": [{"id": "o", "op": "einsum", "inputs": ["w", "c"], "attrs": {"spec": "nk,mk->nm"}, "dtype": "f32"}],
            "outputs": [{"name": "o", "node": "o"}]
        });
        let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
        let point = BTreeMap::from([("m".to_string(), 1000)]);
        let all = random_inputs(&graph, &point, 7).unwrap_or_else(|e| panic!("{e}"));
        for (index, inp) in graph.inputs.iter().enumerate() {
            let one = random_input(&graph, &point, index, 7).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(one, all[&inp.name], "`{}`", inp.name);
        }
        let mut r = SplitMix64::new(7 ^ fnv1a("w"));
        let scale = 1100f32.sqrt();
        assert!(all["w"].data.iter().all(|&v| v == r.symmetric() / scale), "the weight, in order");
        let mut r = SplitMix64::new(7 ^ fnv1a("c"));
        assert!(all["c"].data.iter().all(|&v| v == r.symmetric()), "the activation, in order");
        assert!(random_input(&graph, &point, 3, 7).is_err(), "no fourth input");
    }

    /// GPT-2's learned positions end at 1024 (`wpe`'s rows): a step whose
    /// new token would be the 1025th is past them, and the reason names
    /// the table; rotary positions (the tiny llama) end where f32 stops
    /// holding integers exactly, past 2^24.
    #[test]
    fn positions_past_a_learned_table_or_2_24_are_found() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let load = |name: &str| {
            crate::import::load(&dir.join(format!("examples/{name}/model.json"))).unwrap_or_else(|e| panic!("{e}"))
        };
        let point = |m_c: i64, m_d: i64| {
            BTreeMap::from([("b".to_string(), 2), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)])
        };
        let past = |g: &Graph, m_c, m_d| positions_unusable(g, &point(m_c, m_d)).unwrap_or_else(|e| panic!("{e}"));
        let gpt2 = load("gpt2");
        assert_eq!(past(&gpt2, 1000, 23), None, "the 1024th position is the table's last");
        let why = past(&gpt2, 1000, 24).unwrap_or_default();
        assert!(why.starts_with("1025 positions") && why.contains("(`transformer.wpe.weight` has 1024 rows)"), "{why}");
        let tiny = load("tiny");
        assert_eq!(past(&tiny, (1 << 24) - 16, 16), None, "rotary: the last position, 2^24, is exact");
        let why = past(&tiny, (1 << 24) - 16, 17).unwrap_or_default();
        assert!(why.contains("the last, 16777217, is past 16777216 (2^24)"), "{why}");
        // The positions drawn for a step agree: the last exact one, 2^24,
        // is drawn, and the first past it is refused.
        let index = tiny.inputs.iter().position(|i| i.role == Role::Position).unwrap_or_else(|| panic!("no position"));
        let drawn = random_input(&tiny, &point((1 << 24) - 16, 16), index, 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(drawn.data.last().copied(), Some(16777216.0));
        let err = random_input(&tiny, &point((1 << 24) - 16, 17), index, 1).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("16777217"), "{err}");
    }
}
