//! Rotary embedding ("rotate half", Llama / NeoX) of `x: [b, H, n, k]` at
//! `positions: [b, n]`: element `c` of a head is
//! `x[c] cos(a) -/+ x[partner] sin(a)` with `a = position * theta^(-2i/k)`,
//! `i = c mod k/2`.
//!
//! The angle depends on the position and `i` only, not on the head, so a
//! CPU kernel keeps the `k/2` cosines and sines of the last position it
//! saw in a table on its stack and computes them again only when the
//! position changes: once per sample and token instead of once per
//! element (a step's q at b = 32 with 16 heads of 64: 1024 instead of
//! 32768 `powf`, `cos` and `sin` each). The table holds exactly the values
//! the per-element form computes. GPU threads compute their own element.
//!
//! A CPU kernel that is a rope alone, its `x` read as vectors along the
//! head (a projection's output through the heads' reshape and transpose)
//! and each half of the head whole vectors, runs a row `[b, h, t]` at a
//! time instead ([`Kc::rope_body`]): the table checked once a row, then
//! both halves of the head a vector at a time, the same operations on
//! the same values: the same bits. The per-element form loaded and
//! compared the position at every element, a branch LLVM did not
//! vectorize: cpu_step's four ropes a step (q and the new K row of each
//! layer, b = 32, f32) 0.07-0.10 -> 0.02 ms each.

use crate::ir::{DType, Op, Value};
use crate::lower::LowerError;

use super::bodies::Out;
use super::builder::Val;
use super::{mismatch, Kc, Target};

impl Kc<'_> {
    /// Element `idx` of rope node `j` with base `theta`.
    pub(super) fn rope(
        &mut self,
        j: usize,
        x: Value,
        pos: Value,
        theta: f64,
        idx: &[String],
    ) -> Result<Val, LowerError> {
        let [bi, _h, t, c] = idx else { return Err(self.unsupported(j, "rope input is not rank 4")) };
        let shape = self.graph.shape_of(x).clone();
        let k = self
            .graph
            .dims
            .normalize(&shape[3])
            .ok()
            .and_then(|p| p.as_constant())
            .filter(|k| *k > 0 && k % 2 == 0)
            .ok_or_else(|| self.unsupported(j, "rope head dim must be an even constant"))?;
        let half = self.b.index(k / 2);
        let lower = self.b.ult(c, &half);
        let up = self.b.addi(c, &half);
        let down = self.b.subi(c, &half);
        let partner = self.b.op(&format!("arith.select {lower}, {up}, {down} : index"));
        let i = self.b.op(&format!("arith.select {lower}, {c}, {down} : index"));
        let p = self.loadf(pos, &[bi.clone(), t.clone()])?;
        let (cos, sin) = if self.vector_rows() {
            self.rope_table(&p, &i, k, theta)
        } else {
            let angle = self.rope_angle(&p, &i, k, theta);
            (self.b.math("cos", &angle), self.b.math("sin", &angle))
        };
        let xv = self.loadf(x, idx)?;
        let mut at = idx.to_vec();
        at[3] = partner;
        let xp = self.loadf(x, &at)?;
        let a = self.b.fbin("mulf", &xv, &cos);
        let bsin = self.b.fbin("mulf", &xp, &sin);
        let neg = self.b.op(&format!("arith.negf {bsin} : f32"));
        let term = self.b.op(&format!("arith.select {lower}, {neg}, {bsin} : f32"));
        Ok(Val::f32(self.b.fbin("addf", &a, &term)))
    }

    /// `position * inv_freq(i)`, `inv_freq(i) = theta^(-2 i / k)`.
    fn rope_angle(&mut self, p: &str, i: &str, k: i64, theta: f64) -> String {
        let fi = self.b.index_to_f32(i);
        let scale = self.b.f32((-2.0 / k as f64) as f32);
        let ex = self.b.fbin("mulf", &fi, &scale);
        let th = self.b.f32(theta as f32);
        let inv = self.b.op(&format!("math.powf {th}, {ex} : f32"));
        self.b.fbin("mulf", p, &inv)
    }

    /// The cosine and sine of the angle of `i` at position `p`, read from
    /// the kernel's table ([`Kc::rope_table_at`]).
    fn rope_table(&mut self, p: &str, i: &str, k: i64, theta: f64) -> (String, String) {
        let table = self.rope_table_at(p, k, theta);
        let half = self.b.index(k / 2);
        let cos = self.b.load(&table, i, DType::F32).ssa;
        let at = self.b.addi(i, &half);
        let sin = self.b.load(&table, &at, DType::F32).ssa;
        (cos, sin)
    }

    /// The kernel's table for (`k`, `theta`): the `k/2` cosines, then the
    /// `k/2` sines, of the angles at position `p`, filled for all of them
    /// when `p` differs from the position it holds (its key starts as
    /// NaN, which equals no position).
    fn rope_table_at(&mut self, p: &str, k: i64, theta: f64) -> String {
        let key_of = format!("rope {k} {:016X}", theta.to_bits());
        let nan = self.b.f32(f32::NAN);
        let key = self.b.stack_f32(&format!("{key_of} key"), 1, Some(&nan));
        let table = self.b.stack_f32(&format!("{key_of} table"), k as usize, None);
        let zero = self.b.index(0);
        let half = self.b.index(k / 2);
        let held = self.b.load(&key, &zero, DType::F32).ssa;
        let stale = self.b.op(&format!("arith.cmpf une, {held}, {p} : f32"));
        self.b.open_guard(&stale);
        let l = self.b.open_loop(&half);
        let angle = self.rope_angle(p, &l, k, theta);
        let (cos, sin) = (self.b.math("cos", &angle), self.b.math("sin", &angle));
        self.b.store(&table, &l, DType::F32, Val::f32(cos));
        let at = self.b.addi(&l, &half);
        self.b.store(&table, &at, DType::F32, Val::f32(sin));
        self.b.close();
        self.b.store(&key, &zero, DType::F32, Val::f32(p.to_owned()));
        self.b.close();
        table
    }

    /// Rope node `j` as the CPU kernel's own node, in vectors
    /// ([`Kc::rope_body`]): its `x`, positions, `theta` and head size
    /// `k`, where `x` is `[b, H, n, k]` read as vectors along the head
    /// (`Kc::vector_readable`), each half of the head whole vectors, into
    /// a float output.
    pub(super) fn rope_vectors(&self, j: usize, out: &Out) -> Option<RopeVectors> {
        if !self.vector_rows() || out.target != Target::Cpu || !out.dtype.is_float() || out.sizes.len() != 4 {
            return None;
        }
        let node = self.graph.nodes.get(j)?;
        let Op::Rope { theta } = node.op else { return None };
        let [x, pos] = node.inputs[..] else { return None };
        let shape = self.graph.shape_of(x);
        let k = self.graph.dims.normalize(shape.get(3)?).ok()?.as_constant()?;
        let lanes = self.simd as i64;
        let whole = lanes > 0 && k > 0 && k % (2 * lanes) == 0;
        (shape.len() == 4 && whole && self.vector_readable(x)).then_some(RopeVectors { x, pos, theta, k })
    }

    /// Rope node `j` (see [`Kc::rope_vectors`]) a row `[b, h, t]` at a
    /// time: the row's position checked against the table once
    /// ([`Kc::rope_table_at`]), then each half of the head a vector at a
    /// time, `lo · cos - hi · sin` and `hi · cos + lo · sin`: the
    /// per-element form's operations (two multiplies, a negation, an
    /// add), the same bits (see the module docs).
    pub(super) fn rope_body(&mut self, out: &Out, r: &RopeVectors, opened: &mut usize) -> Result<String, LowerError> {
        let rows = &out.sizes[..3];
        let idx = super::walk_index(self, out.target, &out.flat, rows, false, opened);
        let [bi, _, t] = &idx[..] else { return Err(mismatch(&out.kernel.name, "rope rows are not [b, h, n]".into())) };
        let p = self.loadf(r.pos, &[bi.clone(), t.clone()])?;
        let table = self.rope_table_at(&p, r.k, r.theta);
        let lanes = self.simd;
        let half = r.k / 2;
        let vty = format!("vector<{lanes}xf32>");
        for first in (0..half).step_by(lanes) {
            let (c_lo, c_hi) = (self.b.index(first), self.b.index(first + half));
            let at_lo: Vec<String> = idx.iter().cloned().chain([c_lo.clone()]).collect();
            let at_hi: Vec<String> = idx.iter().cloned().chain([c_hi.clone()]).collect();
            let lo = self.load_vector_view(r.x, &at_lo, lanes)?;
            let hi = self.load_vector_view(r.x, &at_hi, lanes)?;
            let cos = self.b.load_vector(&table, &c_lo, lanes, DType::F32);
            let sin = self.b.load_vector(&table, &c_hi, lanes, DType::F32);
            let mul = |kc: &mut Self, a: &str, b: &str| kc.b.op(&format!("arith.mulf {a}, {b} : {vty}"));
            let (lo_cos, hi_sin) = (mul(self, &lo, &cos), mul(self, &hi, &sin));
            let neg = self.b.op(&format!("arith.negf {hi_sin} : {vty}"));
            let new_lo = self.b.op(&format!("arith.addf {lo_cos}, {neg} : {vty}"));
            let (hi_cos, lo_sin) = (mul(self, &hi, &cos), mul(self, &lo, &sin));
            let new_hi = self.b.op(&format!("arith.addf {hi_cos}, {lo_sin} : {vty}"));
            for (at, v) in [(&at_lo, new_lo), (&at_hi, new_hi)] {
                let off = self.b.linearize(at, &out.sizes);
                self.b.store_vector(&out.ptr, &off, &v, lanes, out.dtype);
            }
        }
        self.b.size(&out.kernel.extent)
    }
}

/// What [`Kc::rope_body`] reads: see [`Kc::rope_vectors`].
pub(super) struct RopeVectors {
    x: Value,
    pos: Value,
    theta: f64,
    k: i64,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::interp::Tensor;
    use crate::lower::emit::testing::{cpu_step, point};
    use crate::lower::emit::Emulation;
    use crate::lower::mma::Tuning;
    use crate::lower::CpuStep;

    /// Rope graph `graph` compiled for the CPU (`step`) against its
    /// per-element form (the GPU's, on emulated lanes), at each of
    /// `positions` (`[b, n]`), on `x` of a fixed pattern of values,
    /// `shapes` giving `x`'s shape and the positions' from them: the same
    /// bits, and, where every position is below 100, the interpreter's
    /// output within `tol` (absolute and relative); `what` names the case.
    fn rope_against_per_element(
        (graph, step): (&crate::ir::Graph, &CpuStep),
        positions: &[&[f32]],
        shapes: impl Fn(&[f32]) -> (Vec<usize>, Vec<usize>),
        tol: f32,
        what: &str,
    ) {
        let per_element = CpuStep::compile_emulating_gpu(
            graph,
            Emulation { lanes: 4, cooperative_min: 1, tuning: Tuning::default() },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for (i, &pos) in positions.iter().enumerate() {
            let (x_shape, pos_shape) = shapes(pos);
            let at = point(&[("b", pos_shape[0] as i64)]);
            let n: usize = x_shape.iter().product();
            let x: Vec<f32> = (0..n).map(|e| ((e * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let inputs: HashMap<String, Tensor> = [
                ("x".to_string(), Tensor::new(x_shape, x).unwrap_or_else(|e| panic!("{e}"))),
                ("pos".to_string(), Tensor::new(pos_shape, pos.to_vec()).unwrap_or_else(|e| panic!("{e}"))),
            ]
            .into();
            let got = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let each = per_element.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got["r"].data, each["r"].data, "{what}, case {i}: positions {pos:?}");
            if pos.iter().all(|&p| p < 100.0) {
                let want = crate::interp::run(graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                for (e, (g, w)) in got["r"].data.iter().zip(&want["r"].data).enumerate() {
                    assert!((g - w).abs() <= tol + tol * w.abs(), "{what}, case {i}, element {e}: {g} vs {w}");
                }
            }
        }
    }

    /// A rope whose `x` reads as vectors along a head of 32 or 64 (the
    /// llama layout: a projection's `[b, 1, h·k]` reshaped to `[b, 1, h,
    /// k]` and transposed to `[b, h, 1, k]`) runs a row at a time in
    /// vectors, the position checked once a row: the same bits as the
    /// per-element form (the GPU's, on emulated lanes), and the
    /// interpreter's within f32 rounding, positions the same across
    /// samples, differing, and large; a bf16 one within bf16 rounding. A
    /// head of 40 (halves not whole vectors of 16) keeps the per-element
    /// form, the position compared in the elements' loop.
    #[test]
    fn rope_runs_in_vectors_a_row_at_a_time() {
        let rope = |k: i64, dtype: &str| {
            serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"h": 3, "k": k}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", 1, "h*k"], "dtype": dtype},
                    {"name": "pos", "role": "position", "shape": ["b", 1], "dtype": "i32"}
                ],
                "nodes": [
                    {"id": "xh", "op": "reshape", "inputs": ["x"], "attrs": {"shape": ["b", 1, "h", "k"]}},
                    {"id": "xt", "op": "transpose", "inputs": ["xh"], "attrs": {"perm": [0, 2, 1, 3]}},
                    {"id": "r", "op": "rope", "inputs": ["xt", "pos"], "attrs": {"theta": 10000.0}}
                ],
                "outputs": [{"name": "r", "node": "r"}]
            })
        };
        for (k, dtype) in [(64, "f32"), (32, "f32"), (64, "bf16"), (40, "f32")] {
            let what = format!("k = {k}, {dtype}");
            let vectors = k % 32 == 0;
            let (graph, step, text) = cpu_step(&rope(k, dtype));
            // One position check, then (in vectors) the row's loads (bf16:
            // its roundings compare too).
            if dtype == "f32" {
                assert_eq!(text.matches("arith.cmpf une").count(), 1, "{what}: one position check:\n{text}");
            }
            let check = text.find("arith.cmpf une").unwrap_or(0);
            assert_eq!(text[check..].contains("vector<16x"), vectors, "{what}: vectors:\n{text}");
            let tol = if dtype == "f32" { 1e-5 } else { 2e-2 };
            let positions: [&[f32]; 3] = [&[5., 5., 5., 5.], &[63., 2., 0.], &[8000., 8001., 8001., 77., 9.]];
            let shapes = |pos: &[f32]| (vec![pos.len(), 1, 3 * k as usize], vec![pos.len(), 1]);
            rope_against_per_element((&graph, &step), &positions, shapes, tol, &what);
        }
    }

    /// The CPU's rope reads its angles from a table filled once per new
    /// position: the same values, bit for bit, as the per-element form
    /// (the GPU's, run here on emulated lanes), and the interpreter's
    /// within f32 rounding, with positions that repeat across samples and
    /// tokens, change between them, and are large.
    #[test]
    fn rope_angles_come_from_a_table_per_position() {
        let (graph, step, text) = cpu_step(&serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"h": 3, "n": 2, "k": 8}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", "h", "n", "k"], "dtype": "f32"},
                {"name": "pos", "role": "position", "shape": ["b", "n"], "dtype": "i32"}
            ],
            "nodes": [{"id": "r", "op": "rope", "inputs": ["x", "pos"], "attrs": {"theta": 10000.0}}],
            "outputs": [{"name": "r", "node": "r"}]
        }));
        let guard = text.find("arith.cmpf une").unwrap_or_else(|| panic!("no position check:\n{text}"));
        let powf = text.find("math.powf").unwrap_or_else(|| panic!("no powf:\n{text}"));
        assert!(powf > guard && text.matches("math.powf").count() == 1, "powf only when the position changes:\n{text}");
        assert_eq!(text.matches("llvm.alloca").count(), 2, "a key and a table:\n{text}");
        let positions: [&[f32]; 3] =
            [&[5., 6., 5., 6., 9., 0., 1., 1.], &[63., 2., 0., 0.], &[8000., 8001., 8001., 77.]];
        let shapes = |pos: &[f32]| (vec![pos.len() / 2, 3, 2, 8], vec![pos.len() / 2, 2]);
        rope_against_per_element((&graph, &step), &positions, shapes, 1e-5, "k = 8");
    }
}
