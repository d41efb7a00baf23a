//! Every op family against hand-computed values.

use super::{check, check1, op_graph, t, NEG_INF};

#[test]
fn interp_einsum() {
    let a = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let b = t(&[3, 2], &[1., 0., 0., 1., 1., 1.]);
    let spec = |s: &str| format!(r#"{{"spec": "{s}"}}"#);
    check1("einsum", &spec("ij,jk->ik"), &[("a", a.clone()), ("b", b.clone())], t(&[2, 2], &[4., 5., 10., 11.]));
    check1("einsum", &spec("ij->ji"), &[("a", a.clone())], t(&[3, 2], &[1., 4., 2., 5., 3., 6.]));
    check1("einsum", &spec("ij->"), &[("a", a.clone())], t(&[], &[21.]));
    check1("einsum", &spec("ij->j"), &[("a", a.clone())], t(&[3], &[5., 7., 9.]));
    // Three operands: sum_i x_i y_i z_i = 1*4*7 + 2*5*8 + 3*6*9.
    let (x, y, z) = (t(&[3], &[1., 2., 3.]), t(&[3], &[4., 5., 6.]), t(&[3], &[7., 8., 9.]));
    check1("einsum", &spec("i,i,i->"), &[("x", x.clone()), ("y", y), ("z", z)], t(&[], &[270.]));
    // Outer product (no contraction) and a letter only in one operand.
    check1(
        "einsum",
        &spec("i,j->ij"),
        &[("x", x.clone()), ("a", t(&[2], &[1., -1.]))],
        t(&[3, 2], &[1., -1., 2., -2., 3., -3.]),
    );
    // Broadcast-absorbed operand: k[g, k] against q[b, g, k].
    let q = t(&[2, 1, 3], &[1., 1., 1., 0., 1., 2.]);
    check1("einsum", &spec("bgk,gk->bg"), &[("q", q), ("x", t(&[1, 3], &[1., 2., 3.]))], t(&[2, 1], &[6., 8.]));
}

#[test]
fn interp_matmul() {
    let a = t(&[2, 1, 2], &[1., 2., 3., 4.]);
    let b = t(&[2, 3], &[1., 0., 1., 0., 1., 1.]);
    // Batch axis of a broadcasts over an unbatched b.
    check1("matmul", "{}", &[("a", a.clone()), ("b", b.clone())], t(&[2, 1, 3], &[1., 2., 3., 3., 4., 7.]));
    // transpose_b: b is [n, k] (a Linear weight).
    let w = t(&[3, 2], &[1., 0., 0., 1., 1., 1.]);
    check1(
        "matmul",
        r#"{"transpose_b": true}"#,
        &[("a", a.clone()), ("w", w)],
        t(&[2, 1, 3], &[1., 2., 3., 3., 4., 7.]),
    );
    // Both batch parts broadcast: [2,1] x [3] -> [2,3] batches.
    let a2 = t(&[2, 1, 1, 1], &[1., 10.]);
    let b2 = t(&[3, 1, 2], &[1., 2., 3., 4., 5., 6.]);
    let want = t(&[2, 3, 1, 2], &[1., 2., 3., 4., 5., 6., 10., 20., 30., 40., 50., 60.]);
    check1("matmul", "{}", &[("a", a2), ("b", b2)], want);
}

#[test]
fn interp_concat_broadcast_slice_reshape_transpose() {
    let a = t(&[2, 1], &[1., 2.]);
    let b = t(&[2, 2], &[3., 4., 5., 6.]);
    check1("concat", r#"{"axis": 1}"#, &[("a", a.clone()), ("b", b.clone())], t(&[2, 3], &[1., 3., 4., 2., 5., 6.]));
    check1(
        "concat",
        r#"{"axis": 0}"#,
        &[("b", b.clone()), ("c", b.clone())],
        t(&[4, 2], &[3., 4., 5., 6., 3., 4., 5., 6.]),
    );
    // A runtime-sized piece that is empty at this point (m = 0).
    let g = op_graph(&[("e", r#"[2, "m"]"#, "f32"), ("b", "[2, 2]", "f32")], "concat", r#"{"axis": -1}"#);
    check(&g, 0, &[("e", t(&[2, 0], &[])), ("b", b.clone())], b.clone());

    check1("broadcast", r#"{"shape": [2, 2, 1]}"#, &[("a", a.clone())], t(&[2, 2, 1], &[1., 2., 1., 2.]));
    check1("broadcast", r#"{"shape": [2, 3]}"#, &[("a", a.clone())], t(&[2, 3], &[1., 1., 1., 2., 2., 2.]));

    // [m, m+2) of an axis of m+3.
    let g = op_graph(&[("x", r#"[2, "m+3"]"#, "f32")], "slice", r#"{"axis": 1, "start": "m", "end": "m+2"}"#);
    let x4 = t(&[2, 4], &[0., 1., 2., 3., 4., 5., 6., 7.]);
    check(&g, 1, &[("x", x4)], t(&[2, 2], &[1., 2., 5., 6.]));
    let x = t(&[2, 5], &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    check(&g, 2, &[("x", x.clone())], t(&[2, 2], &[2., 3., 7., 8.]));
    check1("slice", r#"{"axis": 0, "start": 1, "end": 2}"#, &[("x", x.clone())], t(&[1, 5], &[5., 6., 7., 8., 9.]));

    check1("reshape", r#"{"shape": [5, 2]}"#, &[("x", x.clone())], t(&[5, 2], &x.data));
    check1("transpose", r#"{"perm": [1, 0]}"#, &[("b", b.clone())], t(&[2, 2], &[3., 5., 4., 6.]));
    // out axis i = in axis perm[i]: [2, 1, 3] with perm [2, 0, 1] -> [3, 2, 1].
    let c = t(&[2, 1, 3], &[1., 2., 3., 4., 5., 6.]);
    check1("transpose", r#"{"perm": [2, 0, 1]}"#, &[("c", c)], t(&[3, 2, 1], &[1., 4., 2., 5., 3., 6.]));
}

#[test]
fn interp_softmax() {
    let (l2, l5) = (2f32.ln(), 5f32.ln());
    let x = t(&[3, 3], &[0., l2, l5, NEG_INF, 7., 7., NEG_INF, NEG_INF, NEG_INF]);
    // Row 2 is fully masked: defined as zeros.
    let want = t(&[3, 3], &[0.125, 0.25, 0.625, 0., 0.5, 0.5, 0., 0., 0.]);
    check1("softmax", r#"{"axis": -1}"#, &[("x", x)], want);
    // Large values: max-subtraction keeps it finite.
    let x = t(&[2, 2], &[1000., 0., 1000., 0.]);
    check1("softmax", r#"{"axis": 0}"#, &[("x", x)], t(&[2, 2], &[0.5, 0.5, 0.5, 0.5]));
}

#[test]
fn interp_unary_and_scale() {
    let x = t(&[2], &[0., 1.]);
    check1("exp", "{}", &[("x", x.clone())], t(&[2], &[1., std::f32::consts::E]));
    check1("neg", "{}", &[("x", x.clone())], t(&[2], &[-0., -1.]));
    check1("rsqrt", "{}", &[("x", t(&[2], &[4., 0.25]))], t(&[2], &[0.5, 2.]));
    check1("silu", "{}", &[("x", x.clone())], t(&[2], &[0., 0.731_058_6]));
    check1("tanh", "{}", &[("x", t(&[1], &[0.5]))], t(&[1], &[0.462_117_17]));
    let g = t(&[3], &[1., -1., 0.]);
    check1("gelu", "{}", &[("x", g.clone())], t(&[3], &[0.841_344_8, -0.158_655_26, 0.]));
    check1("gelu", r#"{"approximate": "none"}"#, &[("x", g.clone())], t(&[3], &[0.841_344_8, -0.158_655_26, 0.]));
    check1("gelu", r#"{"approximate": "tanh"}"#, &[("x", t(&[1], &[1.]))], t(&[1], &[0.841_192]));
    check1("scale", r#"{"value": 0.5}"#, &[("x", t(&[2], &[3., -4.]))], t(&[2], &[1.5, -2.]));
}

#[test]
fn interp_binary_broadcasting() {
    let a = t(&[2, 1], &[1., 2.]);
    let b = t(&[3], &[10., 20., 30.]);
    check1("add", "{}", &[("a", a.clone()), ("b", b.clone())], t(&[2, 3], &[11., 21., 31., 12., 22., 32.]));
    check1("sub", "{}", &[("a", a.clone()), ("b", b.clone())], t(&[2, 3], &[-9., -19., -29., -8., -18., -28.]));
    check1("mul", "{}", &[("b", b.clone()), ("a", a.clone())], t(&[2, 3], &[10., 20., 30., 20., 40., 60.]));
    check1("div", "{}", &[("b", b.clone()), ("a", a.clone())], t(&[2, 3], &[10., 20., 30., 5., 10., 15.]));
    let s = t(&[], &[2.]);
    check1("mul", "{}", &[("a", a.clone()), ("s", s)], t(&[2, 1], &[2., 4.]));
}

#[test]
fn interp_reductions() {
    let x = t(&[2, 3], &[1., 5., 3., -4., -2., -6.]);
    check1("reduce_sum", r#"{"axes": [1]}"#, &[("x", x.clone())], t(&[2], &[9., -12.]));
    check1("reduce_sum", r#"{"axes": [0], "keepdims": true}"#, &[("x", x.clone())], t(&[1, 3], &[-3., 3., -3.]));
    check1("reduce_sum", r#"{"axes": [0, 1]}"#, &[("x", x.clone())], t(&[], &[-3.]));
    check1("reduce_max", r#"{"axes": [-1], "keepdims": true}"#, &[("x", x.clone())], t(&[2, 1], &[5., -2.]));
    check1("reduce_max", r#"{"axes": [0]}"#, &[("x", x.clone())], t(&[3], &[1., 5., 3.]));
    let c = t(&[2, 1, 2], &[1., 2., 3., 4.]);
    check1("reduce_sum", r#"{"axes": [0, 2]}"#, &[("c", c)], t(&[1], &[10.]));
}

#[test]
fn interp_norms() {
    // mean(x^2) = 12.5; weight [1, 2].
    let x = t(&[1, 2], &[3., 4.]);
    let w = t(&[2], &[1., 2.]);
    check1("rms_norm", r#"{"eps": 1e-6}"#, &[("x", x), ("w", w)], t(&[1, 2], &[0.848_528_1, 2.262_741_6]));
    // mean 2.5, biased var 1.25.
    let x = t(&[1, 4], &[1., 2., 3., 4.]);
    let (w, b) = (t(&[4], &[1., 1., 2., 2.]), t(&[4], &[0., 1., 0., 1.]));
    let want = t(&[1, 4], &[-1.341_635_4, 0.552_788_2, 0.894_423_6, 3.683_270_8]);
    check1("layer_norm", r#"{"eps": 1e-5}"#, &[("x", x), ("w", w), ("b", b)], want);
}

#[test]
fn interp_rope() {
    // k = 4: inv_freq = [1, 10000^-0.5 = 0.01]; token 0 at position 0
    // (identity), token 1 at position 1.
    let x = t(&[1, 1, 2, 4], &[1., 2., 3., 4., 1., 2., 3., 4.]);
    let pos = t(&[1, 2], &[0., 1.]);
    let g = op_graph(&[("x", "[1, 1, 2, 4]", "f32"), ("p", "[1, 2]", "i32")], "rope", r#"{"theta": 10000}"#);
    // [1 cos1 - 3 sin1, 2 cos.01 - 4 sin.01, 3 cos1 + 1 sin1, 4 cos.01 + 2 sin.01]
    let want = t(&[1, 1, 2, 4], &[1., 2., 3., 4., -1.984_110_6, 1.959_900_7, 2.462_377_8, 4.019_799_6]);
    check(&g, 1, &[("x", x), ("p", pos)], want);
}

#[test]
fn interp_gather_constant_causal_mask() {
    let table = t(&[3, 2], &[0., 1., 10., 11., 20., 21.]);
    let ids = t(&[2, 2], &[2., 0., 1., 1.]);
    let g = op_graph(&[("table", "[3, 2]", "f32"), ("ids", "[2, 2]", "i64")], "gather", "{}");
    check(&g, 1, &[("table", table), ("ids", ids)], t(&[2, 2, 2], &[20., 21., 0., 1., 10., 11., 10., 11.]));

    let g = op_graph(&[], "constant", r#"{"value": 1.5, "shape": ["m", 2]}"#);
    check(&g, 2, &[], t(&[2, 2], &[1.5; 4]));

    // Two new queries after m cached keys: query q sees keys 0..=m+q.
    let g = op_graph(&[], "causal_mask", r#"{"query": 2, "key": "m+2", "offset": "m"}"#);
    check(&g, 1, &[], t(&[2, 3], &[0., 0., NEG_INF, 0., 0., 0.]));
}
