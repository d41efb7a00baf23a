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

use crate::ir::{DType, Value};
use crate::lower::LowerError;

use super::builder::Val;
use super::Kc;

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
    /// the kernel's table for (`k`, `theta`), which is filled for all
    /// `k/2` angles when `p` differs from the position it holds (its key
    /// starts as NaN, which equals no position).
    fn rope_table(&mut self, p: &str, i: &str, k: i64, theta: f64) -> (String, String) {
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
        let cos = self.b.load(&table, i, DType::F32).ssa;
        let at = self.b.addi(i, &half);
        let sin = self.b.load(&table, &at, DType::F32).ssa;
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::interp::Tensor;
    use crate::lower::emit::testing::{cpu_step, point};
    use crate::lower::emit::Emulation;
    use crate::lower::mma::Tuning;
    use crate::lower::CpuStep;

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
        let per_element = CpuStep::compile_emulating_gpu(
            &graph,
            Emulation { lanes: 4, cooperative_min: 1, tuning: Tuning::default() },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let positions: [&[f32]; 3] =
            [&[5., 6., 5., 6., 9., 0., 1., 1.], &[63., 2., 0., 0.], &[8000., 8001., 8001., 77.]];
        for (i, pos) in positions.into_iter().enumerate() {
            let b = pos.len() / 2;
            let at = point(&[("b", b as i64)]);
            let x: Vec<f32> = (0..b * 3 * 2 * 8).map(|e| ((e * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let inputs: HashMap<String, Tensor> = [
                ("x".to_string(), Tensor::new(vec![b, 3, 2, 8], x).unwrap_or_else(|e| panic!("{e}"))),
                ("pos".to_string(), Tensor::new(vec![b, 2], pos.to_vec()).unwrap_or_else(|e| panic!("{e}"))),
            ]
            .into();
            let got = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let each = per_element.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got["r"].data, each["r"].data, "positions {pos:?}");
            if pos.iter().all(|&p| p < 100.0) {
                let want = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                for (k, (g, w)) in got["r"].data.iter().zip(&want["r"].data).enumerate() {
                    assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "case {i}, element {k}: {g} vs {w}");
                }
            }
        }
    }
}
