//! The CPU's context attention fused into one kernel (a CPU plan:
//! [`super::plan_cpu`]).
//!
//! Bifurcated attention's context part is three kernels on the CPU: the
//! context `q·K` writes every score (`[rows, m_c]`, f32), the softmax
//! planned in place (`lower::in_place`) reads and writes them, and the
//! context `w·V` reads them again. At b = 32, m_c = 8192 and 16 heads that
//! is 16 MB of scores written, read, written and read a layer beside the
//! 64 MB of K and V, and the three kernels' FMAs wait on it.
//!
//! Fused, one kernel reads q, K and V and never stores a score: an item
//! is one KV head, a stretch of the context (at least [`ITEM_POSITIONS`]
//! positions where the context has them, at most [`ITEMS`] a head) and up to
//! two tiles of 16 query rows (in the vector lanes, as the q·K's
//! rows-in-lanes tile; tiles of 8 or 4 lanes where fewer than 16 rows
//! share K: `emit::fused`), walked in blocks of 32 positions with the
//! online softmax (FlashDecoding's; the cascade form of REFERENCES.md):
//! the block's
//! scores, their max, the old sums and outputs rescaled by `exp(m_old -
//! m_new)`, the block's `exp`s summed and multiplied into V. Each item
//! writes, per row, its unnormalized output, its max and its sum: the
//! partials, `[ITEMS, rows…, head + 2]` (see [`partials_shape`]).
//!
//! The softmax's kernel then merges: per row, the max over the items' and
//! the decode parts' scores, the sum over both, the decode parts'
//! probabilities written over their scores as before, and the context
//! output, the items' outputs weighed by `exp(m_item - max) / sum`,
//! written into the buffer of the context `w·V`, whose kernel goes.
//!
//! A softmax planned in place qualifies ([`find`]) when, all in f32 (or
//! all in bf16 where asked, below; the w·V's output in bf16 or f32):
//! - the chain between its concat and itself is scales by constants and
//!   reshapes that keep the row (the decode step's mask of all zeros is
//!   already gone: `cpu::masks`);
//! - the concat's first part is a context `q·K`: an einsum of a query
//!   `[rows…, y]` and a graph input `[g, z, y]` (the context K), writing
//!   `[rows…, z]` with `g` one of the rows' letters, or of size 1 and
//!   summed away (multi-query attention as `import-hf` writes it,
//!   `abxy,czy->abxz`: one KV head for every row), its head `y` a
//!   constant;
//! - that part is read by one slice, read only by the context `w·V`: an
//!   einsum of the slice `[rows…, z]` and a graph input `[g, z, e]` (the
//!   context V) writing `[rows…, e]`, the same rows as the scores', the
//!   head `e` a constant, and not a graph output.
//!
//! The same sums in another order (per block, then per item, then over
//! the items), and `exp` as the softmax's: within a few ulps of the three
//! kernels, not the same bits.
//!
//! A bf16 attention is fused only where [`FUSED_ATTENTION_ENV`] says
//! `on`, and where the CPU step widens bf16 to f32 anyway: narrow tiles
//! (`emit::registers`, no AVX-512), or no `vdpbf16ps` and no AMX
//! (`emit::pair_dot`, `emit::amx`), whose three kernels have not been
//! timed against it. The kernel widens each block's K and V rows into f32
//! slots on the stack, 16 elements a vector, and its passes read them
//! from there as they read f32 K and V (`emit::fused`); the scores are
//! rounded to bf16 as the three kernels store them, and the online
//! softmax and the partials stay in f32. The probabilities are not
//! rounded to bf16 before the w·V, as the model (and the three kernels)
//! round them: the kernel never holds a row's probabilities whole, only
//! each block's `exp`s before the row's max and sum are known. Against
//! the interpreter (f32 throughout) one attention comes out closer than
//! the three kernels' (a test sums the squared errors: 0.35-0.74 of
//! theirs), but over a deep model the steps round apart:
//! `tests/bf16_depth.rs` (16 layers, b = 16, where `auto` would fuse)
//! measured the fused bifurcated step 1.52-1.77e-2 from the baseline's
//! logits, as far as both are from exact (1.55-2.09e-2), where the three
//! kernels stay within a sixth of that: so `auto` leaves bf16 to them.
//! Fused, on the 2-core Zen 3 VM the bf16 cpu_step's step at b = 32,
//! m_c = 8192 took 31.4-44.4 ms on two threads against 43.6-75.5 with the
//! three kernels and the rows of `emit::widened_rows` not yet widened
//! (2.02-2.44x the baseline against 1.77-1.87x; three runs alternated),
//! 58.6-60.4 against 82.6-83.5 on one (2.60-3.02x against 2.03-2.21x, two
//! runs), its fused kernel 11.0-11.1 ms a layer on two threads where the
//! three took about 16 (5.5, 2.3 and 8.3); against the three kernels with
//! the lane operand split too (`emit::widened_rows`), 41.2-41.8 against
//! 43.7-45.5 ms on two threads (three runs alternated), the three then
//! 12.6-13.3 ms a layer.
//!
//! The CPU step is compiled with three plans (`plans_cpu`; the kernels
//! of the same code as the first plan's JIT'd once) and a run takes a
//! fused one where at least [`FUSED_MIN_ROWS`] query rows share each KV
//! head at its point (`CpuStep::program_at`: tiles of 16 lanes from
//! [`WIDE_TILE_ROWS`], of 8 below), the three kernels below;
//! [`FUSED_ATTENTION_ENV`] can say always or never.

use crate::ir::{DType, EinsumSpec, Graph, Op, Poly, Value};
use crate::lower::LowerError;

use super::in_place::{is_output, live_users, Found};
use super::plan::NodeKind;

/// The op name of the fused kernel in a [`super::Program`].
pub const FUSED_OP: &str = "fused_attention";

/// Suffix of the name of a fused kernel's partials buffer.
pub const FUSED_SUFFIX: &str = ".fused";

/// The most stretches of the context per KV head, each an item of the
/// fused kernel: a constant, so that the partials' size is a polynomial
/// (`[ITEMS, rows…, head + 2]`). A run takes one item an
/// [`ITEM_POSITIONS`] positions of its context, from 1 to `ITEMS`.
pub const ITEMS: i64 = 8;

/// Context positions an item of the fused kernel takes at least, where
/// the context has that many (fewer items a head than [`ITEMS`] at
/// shorter contexts: m_c = 2048 one, 8192 four, from 16384 eight). Each
/// item costs its q's packing, its partials' lines and a share of the
/// merge, and costs them again at each step; with 8 items at every
/// length they were the kernel's 6% at m_c = 8192 and a quarter of it at
/// 1024 on two cores (`emit::fused`). A function of m_c alone (not of
/// the threads, which would make the results depend on them); at b = 32
/// and 16 heads still 16 items at m_c = 1024, 64 at 8192, for the cores.
pub const ITEM_POSITIONS: i64 = 2048;

/// The environment variable that says when the CPU step runs the fused
/// context attention: `auto` (the default) where at least
/// [`FUSED_MIN_ROWS`] query rows share each KV head at the run's point,
/// f32 only; `on` always (where a softmax qualifies), bf16 too where the
/// tiles are narrow (see the module docs); `off` never (the three
/// kernels; the step then compiles one plan).
pub const FUSED_ATTENTION_ENV: &str = "BIFURC_CPU_FUSED_ATTENTION";

/// Query rows that share a KV head from which the CPU step runs its
/// fused plan (with [`FUSED_ATTENTION_ENV`] `auto`); one row a KV head (b
/// = 1 of a multi-head model) keeps the three kernels. The kernel's tiles
/// then have 16 lanes from 9 rows, 8 from 5, 4 below (`emit::fused`).
/// On the 2-core Emerald Rapids VM (cpu_step, m_c = 8192, two threads,
/// both layers' context attention profiled, `on` against `auto` when
/// this was 16, two rounds), in AVX-512's tiles: 2 rows 5.10-5.20 ms
/// against the three kernels' 5.54-5.58, 3 rows 4.95-5.21 against
/// 6.29-6.47, 4 rows 4.99-5.44 against 5.22-5.32, 6 rows 5.13-5.22
/// against 6.60-6.65, 8 rows 5.24-5.44 against 6.88-6.96, 12 rows
/// 5.60-5.62 against 7.85-7.88, and one row 4.97-5.13 against
/// 4.85-4.93; in narrow ones (`BIFURC_CPU_NARROW_TILES=on`, as without
/// AVX-512) 2 rows 5.89-6.00 against 6.39-7.37, 4 rows 5.82-5.83
/// against 7.27-7.47, 8 rows 5.89-5.90 against 8.64-8.97, 12 rows
/// 6.87-7.08 against 9.96-12.57, one row 5.62-5.81 against 5.73-5.87; at
/// m_c = 1024 and 16384 (2 and 4 rows) no slower. Until then it was 16
/// (one whole tile of 16 lanes; fewer rows took tiles of 8 lanes from 8
/// rows, of 4 below, and were mixed against the three kernels: 12 rows,
/// two tiles of 8, 16.3-16.6 ms a step against 15.4-16.8), and before
/// that 32, two whole tiles an item: on the 2-core Zen 3 VM with the next
/// block fetched in a burst, 12 to 24 rows no faster or slower, 1 to 6
/// rows slower (b = 1: about twice the time; see DESIGN.md).
pub const FUSED_MIN_ROWS: i64 = 2;

/// Query rows a KV head from which the fused kernel's tiles are all of 16
/// lanes (`emit::fused`; 8 lanes from 5 rows, 4 below): a plan run only
/// from them has no narrower tiles to branch to, and JIT-compiles in a
/// third of the time. The CPU step compiles one such plan and one for
/// [`FUSED_MIN_ROWS`] to 8 rows (`lower::plans_cpu`), each JIT-compiled
/// at its first run: the tiny example's fused plan took 0.83-0.86 s with
/// the narrower tiles (`bifurc run`'s set-up).
pub const WIDE_TILE_ROWS: i64 = 9;

/// One context attention to fuse: the softmax planned in place, its
/// concat's first part (the context `q·K`), the context `w·V` and its
/// head (a constant), and the product of the scales between the concat
/// and the softmax.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Fusion {
    pub softmax: usize,
    pub scores: usize,
    pub values: usize,
    pub head: i64,
    pub rows_per_head: Poly,
    pub scale: f64,
}

/// What [`FUSED_ATTENTION_ENV`] asks of the CPU step: `Some(true)`
/// fused always, `Some(false)` never, `None` (`auto`) where enough rows
/// share a KV head; an error for a value it does not know.
pub(crate) fn fused_choice() -> Result<Option<bool>, LowerError> {
    let setting = std::env::var(FUSED_ATTENTION_ENV).ok();
    super::emit::cpu_setting(FUSED_ATTENTION_ENV, setting.as_deref(), || true, "")
}

/// The fusions among the softmaxes `found` in place (see the module
/// docs), bf16 ones too where `bf16` says so.
pub(crate) fn find(graph: &Graph, kinds: &[NodeKind], found: &[Found], bf16: bool) -> Vec<Fusion> {
    let users = live_users(graph, kinds);
    found.iter().filter_map(|f| fusion(graph, kinds, &users, f, bf16)).collect()
}

/// The shape of the partials of fusion `f`: `[ITEMS, rows…, head + 2]`
/// (the rows the scores' axes but the last; per row the item's outputs,
/// its max, its sum).
pub(crate) fn partials_shape(graph: &Graph, f: &Fusion) -> Vec<Poly> {
    let shape = &graph.nodes[f.scores].shape;
    let mut out = vec![Poly::constant(ITEMS)];
    out.extend(shape[..shape.len().saturating_sub(1)].iter().cloned());
    out.push(Poly::constant(f.head + 2));
    out
}

/// A constant size.
fn constant(graph: &Graph, p: &Poly) -> Option<i64> {
    graph.dims.normalize(p).ok()?.as_constant()
}

/// The rows of an einsum's output `[rows…, o]` whose first operand is
/// `[rows…, s]`, `s` and `o` not among the rows (the context `q·K`: `s` the
/// head, `o` the position; the context `w·V`: the other way round).
fn rows_then(spec: &EinsumSpec, s: char, o: char) -> Option<&[char]> {
    let (rows, last) = spec.output.split_at(spec.output.len().checked_sub(1)?);
    let operand: Vec<char> = rows.iter().copied().chain([s]).collect();
    let ok = last == [o] && spec.inputs.first() == Some(&operand) && !rows.contains(&s) && !rows.contains(&o);
    ok.then_some(rows)
}

/// Whether the CPU step's kernels widen bf16 to f32 where they read it:
/// narrow tiles, or no `vdpbf16ps` and no AMX (`emit::pair_dot`,
/// `emit::amx`). A fused bf16 attention widens its K and V so too.
fn widens_bf16() -> bool {
    use super::emit::{amx_choice, bf16_dot_choice, narrow_tiles_choice};
    narrow_tiles_choice().unwrap_or(false) || !(bf16_dot_choice().unwrap_or(true) || amx_choice().unwrap_or(true))
}

fn fusion(graph: &Graph, kinds: &[NodeKind], users: &[Vec<usize>], f: &Found, bf16: bool) -> Option<Fusion> {
    let softmax = &graph.nodes[f.softmax];
    // All in f32, or all in bf16 where asked and the tiles are narrow or
    // the CPU has no bf16 instruction (see the module docs).
    let dtype = softmax.dtype;
    let bf16 = bf16 && dtype == DType::BF16 && widens_bf16();
    if !(dtype == DType::F32 || bf16) || f.parts.len() < 2 {
        return None;
    }
    let of_dtype = |v: Value| graph.dtype_of(v) == dtype;
    // From the softmax back to the concat: scales and reshapes only.
    let mut scale = 1.0;
    let mut at = match softmax.inputs.as_slice() {
        [Value::Node(x)] => *x,
        _ => return None,
    };
    loop {
        let node = &graph.nodes[at];
        match (&node.op, node.inputs.as_slice()) {
            (Op::Concat { .. }, _) => break,
            (Op::Scale { value }, [Value::Node(x)]) => {
                scale *= value;
                at = *x;
            }
            (Op::Reshape { .. }, [Value::Node(x)]) => at = *x,
            _ => return None,
        }
    }
    let first = f.parts.first()?;
    let s = first.node;
    let (Op::Einsum(spec), [q, Value::Input(k)]) = (&graph.nodes[s].op, graph.nodes[s].inputs.as_slice()) else {
        return None;
    };
    let k = Value::Input(*k);
    let [g, z, y] = spec.inputs.get(1)?.as_slice() else { return None };
    let rows = rows_then(spec, *y, *z)?;
    let k_shape = graph.shape_of(k);
    // K's head among the rows, or one head shared by every row
    // (multi-query attention: `g` of size 1, summed away).
    let one_head = || constant(graph, &k_shape[0]) == Some(1);
    let ok = (rows.contains(g) || one_head())
        && of_dtype(*q)
        && of_dtype(k)
        && graph.nodes[s].dtype == dtype
        && constant(graph, &k_shape[2]).is_some()
        && graph.dims.same(&k_shape[1], &first.len);
    if !ok {
        return None;
    }
    // The one slice over the context part, read only by the context w·V.
    let [slice] = first.slices.as_slice() else { return None };
    let [w] = users[*slice].as_slice() else { return None };
    let node = &graph.nodes[*w];
    let (Op::Einsum(spec2), [Value::Node(p), Value::Input(v)]) = (&node.op, node.inputs.as_slice()) else {
        return None;
    };
    let v = Value::Input(*v);
    let [g2, z2, e] = spec2.inputs.get(1)?.as_slice() else { return None };
    let rows2 = rows_then(spec2, *z2, *e)?;
    let v_shape = graph.shape_of(v);
    let head = constant(graph, node.shape.last()?)?;
    let ok = p == slice
        && kinds.get(*w) == Some(&NodeKind::Kernel)
        && !is_output(graph, *w)
        && rows2.len() == rows.len()
        && rows2.iter().position(|c| c == g2) == rows.iter().position(|c| c == g)
        && of_dtype(v)
        && (node.dtype == dtype || node.dtype == DType::F32)
        && graph.dims.same_shape(&graph.nodes[s].shape[..rows.len()], &node.shape[..rows.len()])
        && graph.dims.same(&v_shape[0], &k_shape[0])
        && graph.dims.same(&v_shape[1], &first.len);
    if !ok {
        return None;
    }
    let rows_shape = &graph.nodes[s].shape[..rows.len()];
    let mut others = rows.iter().zip(rows_shape).filter(|(c, _)| *c != g);
    let rows_per_head = others.try_fold(Poly::constant(1), |n, (_, size)| n.mul(size).ok())?;
    Some(Fusion { softmax: f.softmax, scores: s, values: *w, head, rows_per_head, scale })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{json, Value as Json};

    use super::{FUSED_MIN_ROWS, FUSED_OP, FUSED_SUFFIX, ITEMS, ITEM_POSITIONS, WIDE_TILE_ROWS};
    use crate::ir::Graph;
    use crate::lower::in_place::tests::{attention_in, graph, grouped_attention};
    use crate::lower::plan::plan_cpu_fusing;
    use crate::lower::{CpuStep, Program};

    /// Multi-head attention over a context cache `kc`/`vc` `[h, m, k]`, a
    /// decode cache `kd`/`vd` `[b, h, d, k]` and the new token's `kn`/`vn`,
    /// bifurcated, its scores scaled twice (0.5, then 0.7), f32; heads of
    /// 8 for the scores and 24 for the values.
    fn three_parts() -> Json {
        three_parts_in("f32")
    }

    /// [`three_parts`] in `dtype`.
    fn three_parts_in(dtype: &str) -> Json {
        three_parts_sized(dtype, 8, 24)
    }

    /// [`three_parts_in`] with heads of `k` for the scores and `e` for
    /// the values.
    fn three_parts_sized(dtype: &str, k: i64, e: i64) -> Json {
        let input =
            |name: &str, shape: Json| json!({"name": name, "role": "activation", "shape": shape, "dtype": dtype});
        json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b", "m", "d"], "constants": {"h": 3, "k": k, "e": e}},
            "inputs": [
                input("q", json!(["b", "h", 1, "k"])),
                input("kc", json!(["h", "m", "k"])),
                input("kd", json!(["b", "h", "d", "k"])),
                input("kn", json!(["b", "h", 1, "k"])),
                input("vc", json!(["h", "m", "e"])),
                input("vd", json!(["b", "h", "d", "e"])),
                input("vn", json!(["b", "h", 1, "e"]))
            ],
            "nodes": [
                {"id": "s1", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "abxy,bzy->abxz"}},
                {"id": "s2", "op": "einsum", "inputs": ["q", "kd"], "attrs": {"spec": "abxy,abzy->abxz"}},
                {"id": "s3", "op": "einsum", "inputs": ["q", "kn"], "attrs": {"spec": "abxy,abzy->abxz"}},
                {"id": "s", "op": "concat", "inputs": ["s1", "s2", "s3"], "attrs": {"axis": 3}},
                {"id": "sa", "op": "scale", "inputs": ["s"], "attrs": {"value": 0.5}},
                {"id": "sb", "op": "scale", "inputs": ["sa"], "attrs": {"value": 0.7}},
                {"id": "p", "op": "softmax", "inputs": ["sb"], "attrs": {"axis": 3}},
                {"id": "p1", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": 0, "end": "m"}},
                {"id": "p2", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": "m", "end": "m+d"}},
                {"id": "p3", "op": "slice", "inputs": ["p"], "attrs": {"axis": 3, "start": "m+d", "end": "m+d+1"}},
                {"id": "o1", "op": "einsum", "inputs": ["p1", "vc"], "attrs": {"spec": "abxy,byz->abxz"}},
                {"id": "o2", "op": "einsum", "inputs": ["p2", "vd"], "attrs": {"spec": "abxy,abyz->abxz"}},
                {"id": "o3", "op": "einsum", "inputs": ["p3", "vn"], "attrs": {"spec": "abxy,abyz->abxz"}},
                {"id": "o12", "op": "add", "inputs": ["o1", "o2"]},
                {"id": "o", "op": "add", "inputs": ["o12", "o3"]}
            ],
            "outputs": [{"name": "o", "node": "o"}]
        })
    }

    /// [`three_parts_sized`] in f32 with one KV head for every query
    /// head (multi-query attention, as `import-hf` writes it): the context
    /// K and V `[1, m, …]`, their head summed away (`abxy,czy->abxz`).
    fn multi_query(k: i64, e: i64) -> Json {
        let mut doc = three_parts_sized("f32", k, e);
        doc["inputs"][1]["shape"] = json!([1, "m", "k"]);
        doc["inputs"][4]["shape"] = json!([1, "m", "e"]);
        doc["nodes"][0]["attrs"]["spec"] = json!("abxy,czy->abxz");
        doc["nodes"][10]["attrs"]["spec"] = json!("abxy,cyz->abxz");
        doc
    }

    /// Values of runtime dims a case of a test runs at besides b and m.
    type Extras = &'static [(&'static str, i64)];

    /// Runs `f` with narrow tiles or wide and no bf16 instruction (no
    /// AMX, no `vdpbf16ps`): bf16 widened to f32, as the bf16 fused kernel
    /// needs.
    fn without_bf16_instructions<R>(narrow: bool, f: impl FnOnce() -> R) -> R {
        crate::lower::emit::with_narrow_tiles(narrow, || {
            crate::lower::emit::with_amx(false, || crate::lower::emit::with_bf16_dot(false, f))
        })
    }

    fn fused(g: &Graph, fuse: bool) -> Program {
        plan_cpu_fusing(g, fuse.then_some(0)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Fused, the context q·K is one kernel that reads q, K and V and
    /// writes the partials; the scores have no buffer, the context w·V no
    /// kernel, and the softmax's kernel writes the w·V's buffer from the
    /// partials. Not fused: as before. A bf16 attention is not fused.
    #[test]
    fn the_context_attention_is_one_kernel() {
        for (doc, scale) in [(three_parts(), 0.35), (grouped_attention("f32"), 0.35)] {
            let g = graph(&doc);
            let p = fused(&g, true);
            let name = |b: usize| p.buffers[b].name.as_str();
            let kernels: Vec<_> = p.kernels.iter().filter(|k| k.op == FUSED_OP).collect();
            let [k] = kernels.as_slice() else { panic!("one fused kernel: {:?}", p.kernels) };
            assert_eq!((k.node.as_str(), name(k.writes)), ("s1", format!("s1{FUSED_SUFFIX}").as_str()));
            let reads: Vec<&str> = k.reads.iter().map(|&b| name(b)).collect();
            assert!(reads.contains(&"kc") && reads.contains(&"vc"), "{reads:?}");
            assert!(p.kernels.iter().all(|k| k.node != "o1"), "no w·V kernel");
            assert!(p.buffers.iter().all(|b| b.name != "s1"), "no scores buffer");
            let plan = p.in_place.first().and_then(|x| x.fused.as_ref()).unwrap_or_else(|| panic!("fused"));
            assert_eq!((plan.values.as_str(), plan.items, name(plan.context)), ("o1", ITEMS, "o1"));
            assert!((plan.scale - scale).abs() < 1e-12, "{}", plan.scale);
            let merge = p.kernels.iter().find(|k| k.node == "p").unwrap_or_else(|| panic!("softmax"));
            assert_eq!(merge.writes, plan.context);
            assert!(merge.reads.contains(&plan.partials));
            // Run at every point or from FUSED_MIN_ROWS, the kernel
            // branches to tiles of 8 and of 4 lanes for up to 8 rows; run
            // from 9 rows, it has the tiles of 16 alone; run up to 8, the
            // tiles of 8 lanes alone.
            let plans = [(0, None), (FUSED_MIN_ROWS, None), (WIDE_TILE_ROWS, None), (FUSED_MIN_ROWS, Some(8))];
            for (min_rows, max_rows) in plans {
                let by_rows = match max_rows {
                    None => plan_cpu_fusing(&g, Some(min_rows)),
                    Some(max) => crate::lower::plan::plan_cpu_fusing_between(&g, min_rows, max),
                };
                let by_rows = by_rows.unwrap_or_else(|e| panic!("{e}"));
                let plans: Vec<_> = by_rows.fused().collect();
                assert!(plans.iter().all(|f| (f.min_rows, f.max_rows) == (min_rows, max_rows)), "{plans:?}");
                let text =
                    crate::lower::emit(&g, &by_rows, crate::lower::Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
                let kernel = text.split("func.func").find(|f| f.contains("_fused(")).unwrap_or_default();
                let rows = format!("from {min_rows} to {max_rows:?} rows");
                assert_eq!(kernel.contains("vector<16xf32>"), max_rows.is_none(), "{rows}:\n{kernel}");
                assert_eq!(kernel.contains("vector<8xf32>"), min_rows <= 8, "{rows}");
                assert_eq!(kernel.contains("vector<4xf32>"), min_rows <= 8 && max_rows.is_none(), "{rows}");
            }
            let off = fused(&g, false);
            assert!(off.in_place.iter().all(|x| x.fused.is_none()));
            assert!(off.kernels.iter().any(|k| k.node == "o1") && off.kernels.iter().all(|k| k.op != FUSED_OP));
        }
        // bf16 only fused at every point (`on`), and with narrow tiles (a
        // CPU without AVX-512) or without the CPU's bf16 dot product (see
        // the module docs).
        let half = graph(&attention_in("bf16"));
        let dot = crate::lower::emit::host_has_bf16_dot();
        for (narrow, with_dot) in [(false, false), (false, true), (true, false), (true, true)] {
            let widens = narrow || !(with_dot && dot);
            for (min_rows, fuses) in [(0, widens), (FUSED_MIN_ROWS, false)] {
                let p = crate::lower::emit::with_narrow_tiles(narrow, || {
                    crate::lower::emit::with_amx(false, || {
                        crate::lower::emit::with_bf16_dot(with_dot, || plan_cpu_fusing(&half, Some(min_rows)))
                    })
                });
                let p = p.unwrap_or_else(|e| panic!("{e}"));
                let fused = p.kernels.iter().any(|k| k.op == FUSED_OP);
                assert_eq!(fused, fuses, "narrow tiles: {narrow}, bf16 dot: {with_dot}, from {min_rows} rows");
                assert_eq!(p.in_place.len(), 1);
            }
        }
    }

    /// A step compiled with its plans (`plans_cpu`: the three kernels, the
    /// fused kernel with tiles of 16 lanes alone, and with narrower ones)
    /// runs a fused one where at least [`FUSED_MIN_ROWS`] query rows share
    /// each KV head, the one of 16 lanes alone from [`WIDE_TILE_ROWS`],
    /// the three kernels below: multi-head attention has a row a head per
    /// sample (fused from b = 2, in tiles of 16 from b = 9), the
    /// grouped-query one 3 (from b = 1 and b = 3). The outputs are the
    /// interpreter's either way, and the plan a run takes is the one
    /// `program_at` names (its kernels are the ones profiled); the plans
    /// share the functions of the kernels they have in common with the
    /// first, and each fused plan's own are JIT-compiled at its first run.
    #[test]
    fn the_step_fuses_where_enough_rows_share_a_head() {
        for (doc, extra, per_sample) in [(three_parts(), vec![("d", 3)], 1), (grouped_attention("f32"), vec![], 3)] {
            let g = graph(&doc);
            let plans = crate::lower::plans_cpu(&g).unwrap_or_else(|e| panic!("{e}"));
            let from: Vec<Vec<i64>> = plans.iter().map(|p| p.fused().map(|f| f.min_rows).collect()).collect();
            assert_eq!(from, [vec![], vec![WIDE_TILE_ROWS], vec![FUSED_MIN_ROWS]]);
            let step = CpuStep::compile_plans(&g, plans).unwrap_or_else(|e| panic!("{e}"));
            // The kernels of the same code as the first plan's are compiled
            // once: each fused plan adds its fused kernel and its merge.
            let first = CpuStep::compile_program(&g, fused(&g, false)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(step.functions(), first.functions() + 4);
            // Those are JIT-compiled at each fused plan's first run.
            let mut compiled = vec![false, false];
            for b in [1, 2, 3, 8, 9, 17, 2] {
                let rows = b * per_sample;
                let mut point = BTreeMap::from([("b".to_string(), b), ("m".to_string(), 40)]);
                point.extend(extra.iter().map(|(k, v)| (k.to_string(), *v)));
                let program = step.program_at(&point);
                let taken = program.fused().map(|f| f.min_rows).next();
                let want = match rows {
                    r if r >= WIDE_TILE_ROWS => Some(WIDE_TILE_ROWS),
                    r if r >= FUSED_MIN_ROWS => Some(FUSED_MIN_ROWS),
                    _ => None,
                };
                assert_eq!(taken, want, "b = {b}");
                assert_eq!(step.fused_compiled(), compiled, "b = {b}, before its run");
                if let Some(from) = taken {
                    compiled[usize::from(from == FUSED_MIN_ROWS)] = true;
                }
                let inputs = crate::interp::random_inputs(&g, &point, 7).unwrap_or_else(|e| panic!("{e}"));
                let want = crate::interp::run(&g, &point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let (got, times) = step.run_profiled(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let ran: Vec<&str> = times.iter().map(|(k, _)| k.as_str()).collect();
                let planned: Vec<&str> = program.kernels.iter().map(|k| k.name.as_str()).collect();
                assert_eq!(ran, planned, "b = {b}");
                for (i, (x, y)) in got["o"].data.iter().zip(&want["o"].data).enumerate() {
                    assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "b = {b}: [{i}] {x} vs {y}");
                }
            }
        }
    }

    /// The fused step against the interpreter and against the three
    /// kernels (not fused), at rows and context lengths either side of
    /// the tiles (16 rows), blocks (32 positions) and items, an empty
    /// context and decode part included, on one thread and in parts.
    #[test]
    fn the_fused_step_matches_the_interpreter() {
        // The host's tiles, and wide ones with heads of values a multiple
        // of 16 (one pass of 3 vectors, two of 5): their outputs kept
        // `[row][head]` (`emit::fused`), one slot more for the rows'
        // `alpha` beside each of three tile widths' five. Heads of 32 for
        // the scores: whole tiles' q transposed in registers. One KV head
        // for every row (multi-query): all the rows of an item share it.
        let cases: [(Json, Extras, Option<bool>); 7] = [
            (three_parts(), &[("d", 0), ("d", 3)], None),
            (grouped_attention("f32"), &[], None),
            (three_parts_sized("f32", 8, 48), &[("d", 3)], Some(false)),
            (three_parts_sized("f32", 8, 80), &[("d", 0)], Some(false)),
            (three_parts_sized("f32", 32, 32), &[("d", 3)], Some(false)),
            (multi_query(8, 24), &[("d", 3)], None),
            (multi_query(32, 32), &[("d", 0)], Some(false)),
        ];
        for (doc, extra, narrow) in cases {
            let g = graph(&doc);
            assert!(fused(&g, true).kernels.iter().any(|k| k.op == FUSED_OP), "fused:\n{doc}");
            let compile = || {
                let step = CpuStep::compile_program(&g, fused(&g, true)).unwrap_or_else(|e| panic!("{e}"));
                let three = CpuStep::compile_program(&g, fused(&g, false)).unwrap_or_else(|e| panic!("{e}"));
                let text =
                    crate::lower::emit(&g, step.program(), crate::lower::Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
                (step, three, text)
            };
            let (mut step, three, text) = match narrow {
                Some(narrow) => crate::lower::emit::with_narrow_tiles(narrow, compile),
                None => compile(),
            };
            if narrow == Some(false) {
                let kernel = text.split("func.func").find(|f| f.contains("_fused(")).unwrap_or_default();
                assert_eq!(kernel.matches("llvm.alloca").count(), 5 * 3 + 1, "the rows' alpha:\n{kernel}");
            }
            let extras: Vec<Option<(&str, i64)>> =
                if extra.is_empty() { vec![None] } else { extra.iter().copied().map(Some).collect() };
            // Items a head (`ITEM_POSITIONS`): one to m = 4095, then 2, 3 and
            // 8 (18500 would make 9).
            let items = [(2, 1029), (3, 2100), (2, 4100), (17, 6200), (3, 18500)];
            // Rows a KV head either side of each tile width's range (4
            // lanes to 4 rows, 8 to 8, 16 from 9).
            let rows = [(1, 0), (4, 40), (5, 100), (8, 33), (9, 700), (12, 40), (15, 1), (16, 15), (17, 16)];
            for (b, m) in rows.into_iter().chain([(33, 17), (40, 33)]).chain(items) {
                for extra in &extras {
                    let mut point = BTreeMap::from([("b".to_string(), b), ("m".to_string(), m)]);
                    point.extend(extra.map(|(k, v)| (k.to_string(), v)));
                    let inputs = crate::interp::random_inputs(&g, &point, 7).unwrap_or_else(|e| panic!("{e}"));
                    let want = crate::interp::run(&g, &point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    let before = three.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    for threads in [1, 3] {
                        step.set_threads(threads);
                        step.set_min_split_bytes(0);
                        let got = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                        assert_eq!(got["o"].shape, want["o"].shape);
                        let at = format!("{point:?} on {threads}");
                        for (i, ((x, y), z)) in
                            got["o"].data.iter().zip(&want["o"].data).zip(&before["o"].data).enumerate()
                        {
                            assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "{at}: [{i}] {x} vs {y}");
                            assert!((x - z).abs() <= 1e-6 + 1e-5 * z.abs(), "{at}: [{i}] {x} vs unfused {z}");
                        }
                    }
                }
            }
        }
    }
    /// Wide tiles of 16 rows pack q `[head][16]` by 16 × 16 transposes in
    /// registers (`Kc::fused_q_transposed`): 64 shuffles a square, each
    /// row read as vectors, no element stored alone; where
    /// the scores' heads are not whole vectors (8), or the tiles are
    /// narrow, a lane at a time. f32 and bf16 (q widened as it is read).
    #[test]
    fn whole_tiles_transpose_q_into_their_slot() {
        let cases = [
            ("f32", 32, false, 2),
            ("f32", 64, false, 4),
            ("bf16", 32, false, 2),
            ("f32", 8, false, 0),
            ("f32", 32, true, 0),
        ];
        for (dtype, k, narrow, squares) in cases {
            let g = graph(&three_parts_sized(dtype, k, 16));
            let text = without_bf16_instructions(narrow, || {
                crate::lower::emit(&g, &fused(&g, true), crate::lower::Target::Cpu).unwrap_or_else(|e| panic!("{e}"))
            });
            let kernel = text.split("func.func").find(|f| f.contains("_fused(")).unwrap_or_default();
            let shuffles = kernel.matches("vector.shuffle").count();
            assert_eq!(shuffles, 64 * squares, "{dtype}, heads of {k}, narrow tiles: {narrow}:\n{kernel}");
        }
    }

    /// Each tile prefetches its rows' lines of the partials for writing
    /// as its item starts (`Kc::fused_partials_ahead`), before any pass:
    /// a line every 16 elements of a row and its last element's (heads of
    /// 24 for the values: a row of 26, 3 prefetches), for each of the
    /// three widths of tile; no other prefetch writes.
    #[test]
    fn the_partials_are_fetched_for_writing_as_an_item_starts() {
        let g = graph(&three_parts());
        let text = crate::lower::emit::with_narrow_tiles(false, || {
            crate::lower::emit(&g, &fused(&g, true), crate::lower::Target::Cpu).unwrap_or_else(|e| panic!("{e}"))
        });
        let kernel = text.split("func.func").find(|f| f.contains("_fused(")).unwrap_or_default();
        let writes: Vec<usize> =
            kernel.lines().enumerate().filter(|(_, l)| l.contains("rw = 1 : i32")).map(|(i, _)| i).collect();
        assert_eq!(writes.len(), 3 * 3, "{kernel}");
        let passes: Vec<usize> =
            kernel.lines().enumerate().filter(|(_, l)| l.contains("= scf.for")).map(|(i, _)| i).collect();
        for width in writes.chunks(3) {
            let first = passes.iter().find(|&&p| p > width[0]).copied().unwrap_or(usize::MAX);
            assert!(width.iter().all(|&w| w < first), "before the passes:\n{kernel}");
        }
    }

    /// The kernel and the softmax's merge take the same count of items a
    /// head, from the context's length: `min(max(m_c / ITEM_POSITIONS,
    /// 1), ITEMS)`, the items the kernel walks and the merge reads.
    #[test]
    fn the_items_follow_the_context_length() {
        let g = graph(&three_parts());
        let text =
            crate::lower::emit(&g, &fused(&g, true), crate::lower::Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
        // The name of the constant `value : index` in `f`, and the name of
        // the result of `op` whose operands are `a` and `b`.
        let constant = |f: &str, value: i64| {
            let line = f.lines().find(|l| l.ends_with(&format!("= arith.constant {value} : index")));
            line.and_then(|l| l.split_whitespace().next()).map(str::to_owned)
        };
        let result = |f: &str, op: &str, a: &str, b: &str| {
            let line = f.lines().find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() == 7 && w[2] == op && w[3] == format!("{a},") && w[4] == b
            });
            line.and_then(|l| l.split_whitespace().next()).map(str::to_owned)
        };
        let functions: Vec<&str> = text.split("func.func").collect();
        let kernel = functions.iter().find(|f| f.contains("_fused(")).copied().unwrap_or_default();
        let merge = functions.iter().find(|f| f.starts_with(" @k") && f.contains("_p(")).copied().unwrap_or_default();
        for f in [kernel, merge] {
            let [per, one, most] = [ITEM_POSITIONS, 1, ITEMS].map(|v| constant(f, v).unwrap_or_default());
            // m_c is the runtime dim m, the second of the kernel's dims.
            let m_c = f.lines().find(|l| l.contains("arith.index_cast %d1 : i64 to index"));
            let m_c = m_c.and_then(|l| l.split_whitespace().next()).unwrap_or_default();
            let n = result(f, "arith.divui", m_c, &per).unwrap_or_default();
            let n = result(f, "arith.maxui", &n, &one).unwrap_or_default();
            assert!(result(f, "arith.minui", &n, &most).is_some(), "no items of m_c in:\n{f}");
        }
    }

    /// The next block's lines spread over every loop of a tile's passes
    /// (`emit::fused`): each loop of the scores' and the w·V's passes
    /// (those with accumulators of more than one vector) prefetches a line
    /// of K's plan and one of V's a step, its index by a shift, no
    /// division; in f32 and bf16 (widened), narrow tiles and wide. The
    /// block's max comes out of the scores' two copies (an `scf.if` with a
    /// vector result, a tree over the scores in registers), no loop over
    /// the block's slot: one loop of one vector a tile width, the `exp`s'
    /// sum.
    #[test]
    fn the_fused_tiles_spread_the_next_block() {
        for (dtype, narrow) in [("f32", true), ("f32", false), ("bf16", true), ("bf16", false)] {
            let g = graph(&three_parts_in(dtype));
            let text = without_bf16_instructions(narrow, || {
                crate::lower::emit(&g, &fused(&g, true), crate::lower::Target::Cpu).unwrap_or_else(|e| panic!("{e}"))
            });
            let kernel = text.split("func.func").find(|f| f.contains("_fused(")).unwrap_or_default();
            let what = format!("{dtype}, narrow tiles: {narrow}");
            let lines: Vec<&str> = kernel.lines().collect();
            let mut passes = 0;
            for (i, line) in lines.iter().enumerate() {
                let results = line.split(") -> (").nth(1).unwrap_or("");
                if !line.contains("scf.for") || results.matches("vector<").count() < 2 {
                    continue;
                }
                passes += 1;
                let body: Vec<&str> = lines[i + 1..].iter().take_while(|l| !l.contains("scf.yield")).copied().collect();
                let body = body.join("\n");
                assert_eq!(
                    body.matches("\"llvm.intr.prefetch\"").count(),
                    2,
                    "{what}: K's and V's lines:\n{line}\n{body}"
                );
                assert!(body.contains("arith.shrui") && !body.contains("arith.divui"), "{what}: by a shift:\n{body}");
            }
            // Three widths of tile, each two or more passes of scores and
            // one or more of the w·V.
            assert!(passes >= 9, "{what}: {passes} loops of passes:\n{kernel}");
            let one_vector = |l: &&&str| {
                l.rsplit("-> (")
                    .next()
                    .is_some_and(|r| r.starts_with("vector<") && r.ends_with("xf32>) {") && !r.contains(','))
            };
            let single = lines.iter().filter(|l| l.contains("scf.for") && one_vector(l)).count();
            let maxes = lines.iter().filter(|l| l.contains("= scf.if") && one_vector(l)).count();
            assert_eq!((single, maxes), (3, 3), "{what}: the max out of the scores' copies:\n{kernel}");
        }
    }

    /// In bf16 without the bf16 dot product (narrow tiles and wide), fused:
    /// K and V widened a block at a time
    /// into f32 slots, the scores rounded to bf16, the online softmax in
    /// f32 (where the three kernels round the probabilities to bf16 in
    /// memory), the decode parts' probabilities and the context output
    /// rounded once, at their stores. On the inputs as bf16 holds them,
    /// against the interpreter (f32 throughout): within the outputs' bf16
    /// rounding, and closer to it than the three kernels (the sum of the
    /// squared errors), at rows and context lengths either side of the
    /// tiles, blocks and items.
    #[test]
    fn the_bf16_fused_step_keeps_f32_inside() {
        // The bifurcated graph's w·V parts in f32, as `optimize` writes
        // them (their sum rounded once).
        let mut f32_sums = three_parts_in("bf16");
        for node in f32_sums["nodes"].as_array_mut().into_iter().flatten() {
            if ["o1", "o2", "o3", "o12"].contains(&node["id"].as_str().unwrap_or("")) {
                node["dtype"] = json!("f32");
            }
        }
        // The last: heads of values 32, kept `[row][head]` in wide tiles.
        let cases: [(Json, Extras, bool); 4] = [
            (three_parts_in("bf16"), &[("d", 0), ("d", 3)], false),
            (f32_sums, &[("d", 3)], false),
            (grouped_attention("bf16"), &[], false),
            (three_parts_sized("bf16", 8, 32), &[("d", 3)], true),
        ];
        for ((doc, extra, by_row), narrow) in cases.iter().flat_map(|case| [(case, true), (case, false)]) {
            let g = graph(doc);
            let (step, three, text) = without_bf16_instructions(narrow, || {
                let step = CpuStep::compile_program(&g, fused(&g, true)).unwrap_or_else(|e| panic!("{e}"));
                let three = CpuStep::compile_program(&g, fused(&g, false)).unwrap_or_else(|e| panic!("{e}"));
                let text =
                    crate::lower::emit(&g, step.program(), crate::lower::Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
                (step, three, text)
            });
            let kernel = text.split("func.func").find(|f| f.contains("_fused(")).unwrap_or_default();
            // The tiles' five slots for each of three widths of tile, and
            // K's and V's (the f32 kernel has the tiles' alone)
            // (and the rows' `alpha` where the outputs are kept by row).
            let slots = 5 * 3 + 2 + usize::from(*by_row && !narrow);
            assert_eq!(kernel.matches("llvm.alloca").count(), slots, "K's and V's slots:\n{kernel}");
            let extras: Vec<Option<(&str, i64)>> =
                if extra.is_empty() { vec![None] } else { extra.iter().copied().map(Some).collect() };
            // Squared errors over every element and point, relative to
            // each point's largest output.
            let (mut err_fused, mut err_three) = (0f64, 0f64);
            for (b, m) in [(1, 0), (15, 1), (17, 16), (33, 17), (40, 33), (3, 1029)] {
                for extra in &extras {
                    let mut point = BTreeMap::from([("b".to_string(), b), ("m".to_string(), m)]);
                    point.extend(extra.map(|(k, v)| (k.to_string(), v)));
                    let inputs = crate::lower::emit::testing::bf16_held_inputs(&g, &point, 7);
                    let want = crate::interp::run(&g, &point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    let got = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    let before = three.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(got["o"].shape, want["o"].shape);
                    let top = want["o"].data.iter().fold(0f32, |a, y| a.max(y.abs()));
                    for (i, ((x, y), z)) in got["o"].data.iter().zip(&want["o"].data).zip(&before["o"].data).enumerate()
                    {
                        // The output's bf16 rounding (2^-9) after the sum
                        // of three rounded parts.
                        assert!((x - y).abs() <= 8e-3 * top, "{point:?}: [{i}] {x} vs {y} (largest {top})");
                        err_fused += f64::from((x - y) / top.max(1e-30)).powi(2);
                        err_three += f64::from((z - y) / top.max(1e-30)).powi(2);
                    }
                }
            }
            let what = format!("narrow tiles: {narrow}");
            assert!(err_fused <= err_three, "{what}: fused {err_fused:e} against the three kernels' {err_three:e}");
        }
    }
}
