//! Per-op element bodies: one output element of a compute node at a
//! multi-index. Elementwise ops, reductions and gather here; rope in
//! [`super::rope`], contractions in [`super::contract`], softmax and the
//! norms (row kernels) in [`super::rows`].

use crate::ir::{BinaryOp, Op, Poly, ReduceOp, UnaryOp, Value};
use crate::lower::LowerError;

use super::builder::{Ty, Val};
use super::Kc;

/// `sqrt(2 / pi)`, GPT-2's gelu constant.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

impl Kc<'_> {
    /// The element of node `j` at `idx` (`idx.len()` = the node's rank).
    pub(crate) fn compute(&mut self, j: usize, idx: &[String]) -> Result<Val, LowerError> {
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let id = node.id.clone();
        let arg = |k: usize| {
            inputs
                .get(k)
                .copied()
                .ok_or_else(|| LowerError::Unsupported { node: id.clone(), message: format!("missing input {k}") })
        };
        match op {
            op if op.is_view() => self.load(Value::Node(j), idx),
            Op::Unary(u) => {
                let x = self.operand(arg(0)?, idx)?;
                Ok(Val::f32(self.unary(u, &x)))
            }
            Op::Scale { value } => {
                let x = self.operand(arg(0)?, idx)?;
                let c = self.b.f32(value as f32);
                Ok(Val::f32(self.b.fbin("mulf", &x, &c)))
            }
            Op::Binary(bop) => {
                let x = self.operand(arg(0)?, idx)?;
                let y = self.operand(arg(1)?, idx)?;
                let name = match bop {
                    BinaryOp::Add => "addf",
                    BinaryOp::Sub => "subf",
                    BinaryOp::Mul => "mulf",
                    BinaryOp::Div => "divf",
                };
                Ok(Val::f32(self.b.fbin(name, &x, &y)))
            }
            Op::Constant { value, .. } => Ok(Val::f32(self.b.f32(value as f32))),
            Op::CausalMask { offset, .. } => {
                let [q, k] = idx else { return Err(self.unsupported(j, "causal_mask is not rank 2")) };
                let off = self.sizes(std::slice::from_ref(&offset))?.remove(0);
                let lim = self.b.addi(q, &off);
                let ok = self.b.op(&format!("arith.cmpi ule, {k}, {lim} : index"));
                let (zero, ninf) = (self.b.f32(0.0), self.b.f32(f32::NEG_INFINITY));
                Ok(Val::f32(self.b.op(&format!("arith.select {ok}, {zero}, {ninf} : f32"))))
            }
            Op::MatMul { transpose_b } => {
                Ok(Val::f32(self.matmul(arg(0)?, arg(1)?, transpose_b, &[idx.to_vec()])?.remove(0)))
            }
            Op::Einsum(spec) => Ok(Val::f32(self.einsum(j, &spec, &inputs, &[idx.to_vec()])?.remove(0))),
            Op::Softmax { axis } => self.softmax(j, arg(0)?, axis, idx),
            Op::Reduce { op, axes, keepdims } => self.reduce(j, arg(0)?, op, &axes, keepdims, idx),
            Op::RmsNorm { eps } => self.norm(j, arg(0)?, arg(1)?, None, eps, idx),
            Op::LayerNorm { eps } => self.norm(j, arg(0)?, arg(1)?, Some(arg(2)?), eps, idx),
            Op::Rope { theta } => self.rope(j, arg(0)?, arg(1)?, theta, idx),
            Op::Gather => self.gather(j, arg(0)?, arg(1)?, idx),
            _ => Err(self.unsupported(j, format!("op `{}` has no lowering", op.name()))),
        }
    }

    /// The elements of node `j` at every index of `idxs` (a register tile
    /// of a contraction: one loop nest, shared loads).
    pub(crate) fn compute_tile(&mut self, j: usize, idxs: &[Vec<String>]) -> Result<Vec<Val>, LowerError> {
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let values = match op {
            Op::MatMul { transpose_b } if inputs.len() == 2 => self.matmul(inputs[0], inputs[1], transpose_b, idxs)?,
            Op::Einsum(spec) => self.einsum(j, &spec, &inputs, idxs)?,
            _ => return idxs.iter().map(|idx| self.compute(j, idx)).collect(),
        };
        Ok(values.into_iter().map(Val::f32).collect())
    }

    /// Operand `v` of an elementwise op at output index `idx`, with numpy
    /// broadcasting (right-aligned; size-1 axes read index 0), as f32.
    fn operand(&mut self, v: Value, idx: &[String]) -> Result<String, LowerError> {
        let shape = self.graph.shape_of(v).clone();
        let lead = idx.len().saturating_sub(shape.len());
        let mut inner = Vec::with_capacity(shape.len());
        for (a, d) in shape.iter().enumerate() {
            inner.push(match idx.get(lead + a) {
                Some(i) if !self.is_one(d) => i.clone(),
                _ => self.b.index(0),
            });
        }
        let x = self.load(v, &inner)?;
        Ok(self.b.coerce(x, Ty::F32).ssa)
    }

    fn unary(&mut self, u: UnaryOp, x: &str) -> String {
        let one = self.b.f32(1.0);
        let half = self.b.f32(0.5);
        match u {
            UnaryOp::Exp => self.exp(x),
            UnaryOp::Neg => self.b.op(&format!("arith.negf {x} : f32")),
            UnaryOp::Rsqrt => {
                let s = self.b.math("sqrt", x);
                self.b.fbin("divf", &one, &s)
            }
            UnaryOp::Tanh => self.tanh(x),
            UnaryOp::Silu => {
                let n = self.b.op(&format!("arith.negf {x} : f32"));
                let e = self.exp(&n);
                let d = self.b.fbin("addf", &one, &e);
                self.b.fbin("divf", x, &d)
            }
            UnaryOp::Gelu => {
                let r = self.b.f32(std::f32::consts::FRAC_1_SQRT_2);
                let s = self.b.fbin("mulf", x, &r);
                let e = self.erf(&s);
                let p = self.b.fbin("addf", &one, &e);
                let hx = self.b.fbin("mulf", &half, x);
                self.b.fbin("mulf", &hx, &p)
            }
            UnaryOp::GeluTanh => {
                let c = self.b.f32(SQRT_2_OVER_PI as f32);
                let k = self.b.f32(0.044715);
                let x2 = self.b.fbin("mulf", x, x);
                let x3 = self.b.fbin("mulf", &x2, x);
                let kx3 = self.b.fbin("mulf", &k, &x3);
                let inner = self.b.fbin("addf", x, &kx3);
                let arg = self.b.fbin("mulf", &c, &inner);
                let t = self.tanh(&arg);
                let p = self.b.fbin("addf", &one, &t);
                let hx = self.b.fbin("mulf", &half, x);
                self.b.fbin("mulf", &hx, &p)
            }
        }
    }

    /// A float load at `idx`.
    pub(super) fn loadf(&mut self, v: Value, idx: &[String]) -> Result<String, LowerError> {
        let x = self.load(v, idx)?;
        Ok(self.b.coerce(x, Ty::F32).ssa)
    }

    /// reduce_sum / reduce_max over `axes`.
    fn reduce(
        &mut self,
        j: usize,
        x: Value,
        op: ReduceOp,
        axes: &[usize],
        keepdims: bool,
        idx: &[String],
    ) -> Result<Val, LowerError> {
        let shape = self.graph.shape_of(x).clone();
        // Input index: output index for kept axes, a loop variable (filled
        // in below) for reduced ones.
        let mut at: Vec<Option<String>> = Vec::with_capacity(shape.len());
        let mut pos = 0;
        for a in 0..shape.len() {
            if axes.contains(&a) {
                at.push(None);
                if keepdims {
                    pos += 1;
                }
            } else {
                at.push(Some(idx.get(pos).cloned().ok_or_else(|| self.unsupported(j, "reduce rank"))?));
                pos += 1;
            }
        }
        let red: Vec<usize> = (0..shape.len()).filter(|a| axes.contains(a)).collect();
        let (init, f) = match op {
            ReduceOp::Sum => (self.b.f32(0.0), "addf"),
            ReduceOp::Max => (self.b.f32(f32::NEG_INFINITY), "maximumf"),
        };
        let r = self.reduce_loops(x, &shape, &mut at, &red, f, &init)?;
        Ok(Val::f32(r))
    }

    fn reduce_loops(
        &mut self,
        x: Value,
        shape: &[Poly],
        at: &mut Vec<Option<String>>,
        red: &[usize],
        f: &str,
        acc: &str,
    ) -> Result<String, LowerError> {
        let Some((&a, rest)) = red.split_first() else {
            let idx: Vec<String> = at.iter().map(|i| i.clone().unwrap_or_default()).collect();
            let v = self.loadf(x, &idx)?;
            return Ok(self.b.fbin(f, acc, &v));
        };
        let ub = self.sizes(&shape[a..=a])?.remove(0);
        let (res, l, acc2) = self.b.open_for(&ub, acc, Ty::F32);
        at[a] = Some(l);
        let next = self.reduce_loops(x, shape, at, rest, f, &acc2)?;
        at[a] = None;
        self.b.close_for(&next, Ty::F32);
        Ok(res)
    }

    /// Row `ids[idx[..-1]]` of `table`, column `idx[-1]`; NaN (0 for an
    /// integer table) when the id is outside the table.
    fn gather(&mut self, j: usize, table: Value, ids: Value, idx: &[String]) -> Result<Val, LowerError> {
        let (col, lead) = idx.split_last().ok_or_else(|| self.unsupported(j, "gather result is a scalar"))?;
        let ty = Ty::of(self.graph.dtype_of(table));
        let tshape = self.graph.shape_of(table).clone();
        let rows = self.sizes(tshape.first().map(std::slice::from_ref).unwrap_or(&[]))?;
        let rows = rows.first().cloned().ok_or_else(|| self.unsupported(j, "gather table is a scalar"))?;
        let id = self.load(ids, lead)?;
        let id = self.b.coerce(id, Ty::I64).ssa;
        let rows64 = self.b.index_to_i64(&rows);
        let zero = self.b.i64(0);
        let ge = self.b.op(&format!("arith.cmpi sge, {id}, {zero} : i64"));
        let lt = self.b.op(&format!("arith.cmpi slt, {id}, {rows64} : i64"));
        let ok = self.b.op(&format!("arith.andi {ge}, {lt} : i1"));
        let r = self.b.open_if(&ok, ty);
        let row = self.b.op(&format!("arith.index_cast {id} : i64 to index"));
        let v = self.load(table, &[row, col.clone()])?;
        let v = self.b.coerce(v, ty).ssa;
        self.b.else_branch(&v, ty);
        let bad = match ty {
            Ty::F32 => self.b.f32(f32::NAN),
            Ty::I64 => self.b.i64(0),
        };
        self.b.close_if(&bad, ty);
        Ok(Val { ssa: r, ty })
    }
}
