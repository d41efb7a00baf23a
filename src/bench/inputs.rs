//! The inputs of a sweep: random values bound to both steps once, held
//! once where both store an input alike, and the bytes a point adds to
//! what is already held.

use super::BenchError;
use crate::cpu_backend::CpuBackend;
use crate::interp::{random_input, At};
use crate::ir::Graph;
use std::collections::BTreeMap;

/// Bytes a point of the sweep adds to what the two steps already hold:
/// both steps at `p` with their inputs bound, an input both store alike
/// ([`CpuBackend::stores_alike`]) counted once, less the inputs still
/// bound from the last point (the weights), plus the largest random input
/// ([`random_input`]: the reference interpreter's f32 tensor) drawn at a
/// time to be bound.
pub(super) fn point_bytes(steps: [&CpuBackend; 2], graph: &Graph, p: &BTreeMap<String, i64>) -> Result<usize, String> {
    let [base, bif] = steps;
    let err = |e: bifurc_runtime::StepError| e.to_string();
    let shared = |name: &str| bif.stores_alike(base, name);
    let mut total = base.bytes_at(p, &BTreeMap::new()).map_err(err)?;
    total = total.saturating_add(bif.bytes_where(p, |name| !shared(name)).map_err(err)?);
    total = total.saturating_sub(base.bytes_where(p, |name| base.is_bound(name)).map_err(err)?);
    total = total.saturating_sub(bif.bytes_where(p, |name| bif.is_bound(name) && !shared(name)).map_err(err)?);
    let at = At::new(graph, p).map_err(|e| e.to_string())?;
    let mut largest = 0usize;
    for input in graph.inputs.iter().filter(|i| !base.is_bound(&i.name)) {
        let shape = at.shape(&input.shape, &format!("input `{}`", input.name)).map_err(|e| e.to_string())?;
        largest = largest.max(4usize.saturating_mul(shape.iter().product::<usize>()));
    }
    Ok(total.saturating_add(largest))
}

/// Binds random values ([`random_input`]) to every input of the two steps
/// not bound yet, one input at a time: an input both store alike is
/// stored once and shared. `progress(i, n, name)` is told of each input
/// as it is drawn (the `i`th of `n` to draw).
pub(super) fn bind_random(
    [base, bif]: [&mut CpuBackend; 2],
    graph: &Graph,
    p: &BTreeMap<String, i64>,
    seed: u64,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<(), BenchError> {
    let unbound: Vec<(usize, &str)> = graph
        .inputs
        .iter()
        .enumerate()
        .filter(|(_, i)| !(base.is_bound(&i.name) && bif.is_bound(&i.name)))
        .map(|(index, i)| (index, i.name.as_str()))
        .collect();
    for (i, &(index, name)) in unbound.iter().enumerate() {
        progress(i + 1, unbound.len(), name);
        let t = random_input(graph, p, index, seed)?;
        if bif.stores_alike(base, name) {
            base.bind_tensor(name, t)?;
            bif.bind_shared(base, name)?;
        } else {
            bif.bind_tensor(name, t.clone())?;
            base.bind_tensor(name, t)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::point;
    use super::*;
    use crate::inspect::ShapePoint;
    use crate::interp::random_inputs;
    use crate::ir::Role;
    use crate::optimize::{optimize, Options};
    use bifurc_runtime::Step;

    /// Through two points of a sweep of the tiny model: every input is
    /// bound once, shared by the two steps; the weights stay bound from
    /// one point to the next, the same elements, not drawn again; and a
    /// point's bytes count what both steps hold once, less what is still
    /// bound from the last point.
    #[test]
    fn inputs_are_held_once_and_weights_kept_between_points() {
        let graph = super::super::tiny();
        let at = ShapePoint(point(4, 64, 2));
        let optimized =
            optimize(&graph, &Options { point: at, ..Options::default() }).unwrap_or_else(|e| panic!("{e}"));
        let compile = |g: &Graph| CpuBackend::compile(g).unwrap_or_else(|e| panic!("{e}"));
        let (mut base, mut bif) = (compile(&graph), compile(&optimized.graph));
        let weights: Vec<&str> =
            graph.inputs.iter().filter(|i| i.role == Role::Weight).map(|i| i.name.as_str()).collect();
        assert!(!weights.is_empty());
        let no_caps = BTreeMap::new();
        let bytes = |s: &CpuBackend, p| s.bytes_at(p, &no_caps).unwrap_or_else(|e| panic!("{e}"));
        let inputs = |s: &CpuBackend, p| s.bytes_where(p, |n| graph.inputs.iter().any(|i| i.name == n));
        let inputs = |s: &CpuBackend, p| inputs(s, p).unwrap_or_else(|e| panic!("{e}"));
        let held = |s: &CpuBackend, p| s.bytes_where(p, |n| weights.contains(&n)).unwrap_or_else(|e| panic!("{e}"));
        let mut kept = Vec::new();
        for (i, p) in [point(4, 64, 2), point(2, 32, 3)].iter().enumerate() {
            let need = point_bytes([&base, &bif], &graph, p).unwrap_or_else(|e| panic!("{e}"));
            let both = bytes(&base, p) + bytes(&bif, p) - inputs(&bif, p);
            let drawn = random_inputs(&graph, p, 5).unwrap_or_else(|e| panic!("{e}"));
            let to_draw = drawn.iter().filter(|(n, _)| i == 0 || !weights.contains(&n.as_str()));
            let largest = to_draw.map(|(_, t)| 4 * t.data.len()).max().unwrap_or(0);
            let drawn_before = if i == 0 { 0 } else { held(&base, p) };
            assert_eq!(need, both - drawn_before + largest, "point {i}");
            let mut told = Vec::new();
            bind_random([&mut base, &mut bif], &graph, p, 5, |i, n, name| told.push((i, n, name.to_string())))
                .unwrap_or_else(|e| panic!("{e}"));
            // Each input drawn told once, in order: all of them, then all
            // but the weights.
            let names: Vec<&str> =
                graph.inputs.iter().map(|x| x.name.as_str()).filter(|n| i == 0 || !weights.contains(n)).collect();
            let want: Vec<_> = names.iter().enumerate().map(|(k, n)| (k + 1, names.len(), n.to_string())).collect();
            assert_eq!(told, want, "point {i}");
            for input in &graph.inputs {
                let (a, b) = (base.stored(&input.name), bif.stored(&input.name));
                let shared = a.zip(b).is_some_and(|(a, b)| a.shares_elements(b));
                assert!(shared, "point {i}: `{}` held once", input.name);
            }
            if i == 0 {
                kept = weights.iter().filter_map(|w| base.stored(w).cloned()).collect();
            } else {
                for (w, k) in weights.iter().zip(&kept) {
                    assert!(base.stored(w).is_some_and(|s| s.shares_elements(k)), "`{w}` kept, not drawn again");
                }
            }
            let (yb, yf) = (base.run(p), bif.run(p));
            let (yb, yf) = (yb.unwrap_or_else(|e| panic!("{e}")), yf.unwrap_or_else(|e| panic!("{e}")));
            let want = crate::interp::run(&graph, p, &drawn).unwrap_or_else(|e| panic!("{e}"));
            for (name, t) in &want {
                for (side, got) in [("baseline", &yb[name]), ("bifurcated", &yf[name])] {
                    let err = t.data.iter().zip(&got.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(err < 1e-3, "point {i}, {side} `{name}`: {err}");
                }
            }
            base.release_but(|n| weights.contains(&n));
            bif.release_but(|n| weights.contains(&n));
        }
    }
}
