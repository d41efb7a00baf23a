//! Per-op element bodies: one output element of a compute node at a
//! multi-index.

use crate::ir::{BinaryOp, EinsumSpec, Op, Poly, ReduceOp, UnaryOp, Value};
use crate::lower::LowerError;

use super::builder::{Ty, Val};
use super::{Kc, Lanes};

/// `sqrt(2 / pi)`, GPT-2's gelu constant.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// Fast-math flags of a contraction's product: may fuse into an FMA.
const CONTRACT: &str = "contract";
/// Fast-math flags of a contraction's accumulation: may fuse, and may be
/// reassociated (LLVM then vectorizes and interleaves the reduction; the
/// sum is still f32, in a different order).
const ACCUMULATE: &str = "reassoc,contract";

/// Loads already emitted in one contraction step, by (operand, index).
#[derive(Default)]
struct Loaded(std::collections::HashMap<(usize, Vec<String>), String>);

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
            UnaryOp::Exp => self.b.math("exp", x),
            UnaryOp::Neg => self.b.op(&format!("arith.negf {x} : f32")),
            UnaryOp::Rsqrt => {
                let s = self.b.math("sqrt", x);
                self.b.fbin("divf", &one, &s)
            }
            UnaryOp::Tanh => self.b.math("tanh", x),
            UnaryOp::Silu => {
                let n = self.b.op(&format!("arith.negf {x} : f32"));
                let e = self.b.math("exp", &n);
                let d = self.b.fbin("addf", &one, &e);
                self.b.fbin("divf", x, &d)
            }
            UnaryOp::Gelu => {
                let r = self.b.f32(std::f32::consts::FRAC_1_SQRT_2);
                let s = self.b.fbin("mulf", x, &r);
                let e = self.b.math("erf", &s);
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
                let t = self.b.math("tanh", &arg);
                let p = self.b.fbin("addf", &one, &t);
                let hx = self.b.fbin("mulf", &half, x);
                self.b.fbin("mulf", &hx, &p)
            }
        }
    }

    /// A float load at `idx`.
    fn loadf(&mut self, v: Value, idx: &[String]) -> Result<String, LowerError> {
        let x = self.load(v, idx)?;
        Ok(self.b.coerce(x, Ty::F32).ssa)
    }

    /// numpy matmul: batch axes broadcast, contraction over the last axis of
    /// `a` and the second-to-last (or last, `transpose_b`) of `b`. One
    /// element per index in `idxs` (a register tile), computed in one
    /// contraction loop: an operand element whose index is the same for
    /// several of them is loaded once.
    pub(crate) fn matmul(
        &mut self,
        a: Value,
        bv: Value,
        transpose_b: bool,
        idxs: &[Vec<String>],
    ) -> Result<Vec<String>, LowerError> {
        let (sa, sb) = (self.graph.shape_of(a).clone(), self.graph.shape_of(bv).clone());
        let r = idxs.first().map_or(0, Vec::len);
        if sa.len() < 2 || sb.len() < 2 || r < 2 || sa.len() > r || sb.len() > r || idxs.iter().any(|i| i.len() != r) {
            return Err(LowerError::Unsupported { node: self.kernel.to_owned(), message: "matmul ranks".into() });
        }
        let kdim = self.sizes(&sa[sa.len() - 1..])?.remove(0);
        let zero = self.b.f32(0.0);
        let (res, kk, accs) = self.reduction_for(&kdim, &vec![zero; idxs.len()]);
        let mut loaded = Loaded::default();
        let mut nexts = Vec::with_capacity(idxs.len());
        for (idx, acc) in idxs.iter().zip(&accs) {
            let (m, n) = (idx[r - 2].clone(), idx[r - 1].clone());
            let mut ia = self.matmul_batch_index(&sa, idx);
            ia.extend([m, kk.clone()]);
            let mut ib = self.matmul_batch_index(&sb, idx);
            if transpose_b {
                ib.extend([n, kk.clone()]);
            } else {
                ib.extend([kk.clone(), n]);
            }
            let x = self.loadf_once(&mut loaded, 0, a, &ia)?;
            let y = self.loadf_once(&mut loaded, 1, bv, &ib)?;
            nexts.push(self.accumulate(acc, &x, &y));
        }
        self.b.close_for_n(&nexts);
        Ok(self.reduction_combine(res))
    }

    /// The batch part of the index of a matmul operand of `shape` at output
    /// index `idx` (numpy broadcasting: right-aligned, size-1 axes read 0).
    pub(crate) fn matmul_batch_index(&mut self, shape: &[Poly], idx: &[String]) -> Vec<String> {
        let rb = shape.len().saturating_sub(2);
        let lead = idx.len().saturating_sub(2).saturating_sub(rb);
        (0..rb).map(|t| if self.is_one(&shape[t]) { self.b.index(0) } else { idx[lead + t].clone() }).collect()
    }

    /// The loop of a contraction's sum (one accumulator per `inits`): over
    /// all of it, or in a cooperative kernel ([`Kc::lanes`] other than
    /// whole, one accumulator) over this lane's share.
    fn reduction_for(&mut self, ub: &str, inits: &[String]) -> (Vec<String>, String, Vec<String>) {
        match (self.lanes, inits) {
            (Lanes::Block | Lanes::Warp | Lanes::Emulated(_), [init]) => {
                let (r, l, a) = self.row_for(ub, init);
                (vec![r], l, vec![a])
            }
            _ => self.b.open_for_n(ub, inits),
        }
    }

    /// The sums after [`Kc::reduction_for`]'s loop: combined over the block
    /// in a cooperative GPU kernel.
    fn reduction_combine(&mut self, sums: Vec<String>) -> Vec<String> {
        if sums.len() != 1 {
            return sums;
        }
        sums.iter().map(|s| self.row_combine("add", s)).collect()
    }

    /// The index of an einsum operand with subscripts `subs`: each letter's
    /// index in `env` (output and summed letters bound so far).
    pub(crate) fn operand_index(
        &self,
        j: usize,
        subs: &[char],
        env: &[(char, String)],
    ) -> Result<Vec<String>, LowerError> {
        subs.iter()
            .map(|s| {
                let i = env.iter().find(|(l, _)| l == s).map(|(_, i)| i.clone());
                i.ok_or_else(|| self.unsupported(j, format!("einsum letter `{s}` is unbound")))
            })
            .collect()
    }

    /// `acc + x * y`, the contraction step: `contract` lets LLVM fuse it
    /// into an FMA, `reassoc` lets it vectorize the reduction.
    fn accumulate(&mut self, acc: &str, x: &str, y: &str) -> String {
        let p = self.b.op(&format!("arith.mulf {x}, {y} fastmath<{CONTRACT}> : f32"));
        self.b.op(&format!("arith.addf {acc}, {p} fastmath<{ACCUMULATE}> : f32"))
    }

    /// A float load of operand `k` (`v`) at `at`, emitted once per distinct
    /// index within one contraction step.
    fn loadf_once(&mut self, loaded: &mut Loaded, k: usize, v: Value, at: &[String]) -> Result<String, LowerError> {
        let key = (k, at.to_vec());
        if let Some(x) = loaded.0.get(&key) {
            return Ok(x.clone());
        }
        let x = self.loadf(v, at)?;
        loaded.0.insert(key, x.clone());
        Ok(x)
    }

    /// Operand `k` (`v`) of node `j` at `at` as a `vector<lanes x f32>`: a
    /// vector load when `lane` (the operand has the vectorized letter, so it
    /// is a stored buffer with that letter last), else a scalar load
    /// broadcast; emitted once per distinct index within one step.
    #[allow(clippy::too_many_arguments)]
    fn loadv_once(
        &mut self,
        loaded: &mut Loaded,
        j: usize,
        k: usize,
        v: Value,
        at: &[String],
        lane: bool,
        lanes: usize,
    ) -> Result<String, LowerError> {
        let key = (k, at.to_vec());
        if let Some(x) = loaded.0.get(&key) {
            return Ok(x.clone());
        }
        let x = match (lane, self.stored(v)) {
            (true, Some(b)) => self.load_vector(b, at, lanes)?,
            (true, None) => return Err(self.unsupported(j, "vector operand is not stored")),
            (false, _) => {
                let x = self.loadf(v, at)?;
                self.b.op(&format!("vector.broadcast {x} : f32 to vector<{lanes}xf32>"))
            }
        };
        loaded.0.insert(key, x.clone());
        Ok(x)
    }

    /// General einsum: output letters from each index of `idxs` (a
    /// register tile), the others summed in nested loops shared by the
    /// tile; an operand element whose index is the same for several
    /// outputs is loaded once per step.
    pub(crate) fn einsum(
        &mut self,
        j: usize,
        spec: &EinsumSpec,
        inputs: &[Value],
        idxs: &[Vec<String>],
    ) -> Result<Vec<String>, LowerError> {
        if spec.inputs.len() != inputs.len() || idxs.iter().any(|idx| spec.output.len() != idx.len()) {
            return Err(self.unsupported(j, format!("einsum `{spec}` does not match its operands")));
        }
        let mut envs: Vec<Vec<(char, String)>> =
            idxs.iter().map(|idx| spec.output.iter().copied().zip(idx.iter().cloned()).collect()).collect();
        let mut reduced: Vec<(char, Poly)> = Vec::new();
        for (subs, v) in spec.inputs.iter().zip(inputs) {
            let shape = self.graph.shape_of(*v).clone();
            for (c, d) in subs.iter().zip(shape) {
                if !spec.output.contains(c) && !reduced.iter().any(|(l, _)| l == c) {
                    reduced.push((*c, d));
                }
            }
        }
        let zero = self.b.f32(0.0);
        self.einsum_loops(j, spec, inputs, &mut envs, &reduced, &vec![zero; idxs.len()])
    }

    fn einsum_loops(
        &mut self,
        j: usize,
        spec: &EinsumSpec,
        inputs: &[Value],
        envs: &mut [Vec<(char, String)>],
        reduced: &[(char, Poly)],
        accs: &[String],
    ) -> Result<Vec<String>, LowerError> {
        let Some(((c, d), rest)) = reduced.split_first() else {
            let mut loaded = Loaded::default();
            let mut out = Vec::with_capacity(envs.len());
            for (env, acc) in envs.iter().zip(accs) {
                let mut factors = Vec::with_capacity(inputs.len());
                for (k, (subs, v)) in spec.inputs.iter().zip(inputs).enumerate() {
                    let at = self.operand_index(j, subs, env)?;
                    factors.push(self.loadf_once(&mut loaded, k, *v, &at)?);
                }
                out.push(match factors.as_slice() {
                    [] => {
                        let one = self.b.f32(1.0);
                        self.b.fbin("addf", acc, &one)
                    }
                    [x] => self.b.fbin("addf", acc, x),
                    [x @ .., y] => {
                        let mut p = x[0].clone();
                        for f in &x[1..] {
                            p = self.b.fbin("mulf", &p, f);
                        }
                        self.accumulate(acc, &p, y)
                    }
                });
            }
            return Ok(out);
        };
        if rest.is_empty() {
            if let Some(lanes) = self.simd_lanes(spec, inputs, *c, d) {
                return self.einsum_simd(j, spec, inputs, envs, *c, d, accs, lanes);
            }
        }
        let ub = self.sizes(std::slice::from_ref(d))?.remove(0);
        let (res, l, a) = self.reduction_for(&ub, accs);
        for env in envs.iter_mut() {
            env.push((*c, l.clone()));
        }
        let next = self.einsum_loops(j, spec, inputs, envs, rest, &a)?;
        for env in envs.iter_mut() {
            env.pop();
        }
        self.b.close_for_n(&next);
        Ok(self.reduction_combine(res))
    }

    /// Lanes of an explicit-SIMD loop over contracted letter `c` (size
    /// `d`): when [`Kc::simd`] is on, `d` is a constant multiple of it, and
    /// every operand indexed by `c` is stored f32 data whose last (and only
    /// `c`) axis is `c`, so that consecutive `c` are consecutive elements.
    fn simd_lanes(&self, spec: &EinsumSpec, inputs: &[Value], c: char, d: &Poly) -> Option<usize> {
        let lanes = self.simd;
        let n = self.graph.dims.normalize(d).ok()?.as_constant()?;
        if lanes == 0 || n <= 0 || n % lanes as i64 != 0 {
            return None;
        }
        for (subs, v) in spec.inputs.iter().zip(inputs) {
            if !subs.contains(&c) {
                continue;
            }
            let b = self.stored(*v)?;
            let contiguous = subs.last() == Some(&c) && subs.iter().filter(|s| **s == c).count() == 1;
            if !contiguous || self.program.buffers[b].dtype != crate::ir::DType::F32 {
                return None;
            }
        }
        Some(lanes)
    }

    /// The innermost contraction loop over `c` in vectors of `lanes`: one
    /// vector accumulator per output, reduced (reassociated) into its f32
    /// accumulator after the loop. Operands not indexed by `c` are loaded
    /// once per step and broadcast.
    #[allow(clippy::too_many_arguments)]
    fn einsum_simd(
        &mut self,
        j: usize,
        spec: &EinsumSpec,
        inputs: &[Value],
        envs: &mut [Vec<(char, String)>],
        c: char,
        d: &Poly,
        accs: &[String],
        lanes: usize,
    ) -> Result<Vec<String>, LowerError> {
        let vty = format!("vector<{lanes}xf32>");
        let ub = self.sizes(std::slice::from_ref(d))?.remove(0);
        let step = self.b.index(lanes as i64);
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let (res, l, vaccs) = self.b.open_for_typed(&ub, &step, &vec![zero; envs.len()], &vty);
        let mut loaded = Loaded::default();
        let mut nexts = Vec::with_capacity(envs.len());
        for (env, acc) in envs.iter_mut().zip(&vaccs) {
            env.push((c, l.clone()));
            let mut factors = Vec::with_capacity(inputs.len());
            for (k, (subs, v)) in spec.inputs.iter().zip(inputs).enumerate() {
                let at = self.operand_index(j, subs, env)?;
                factors.push(self.loadv_once(&mut loaded, j, k, *v, &at, subs.contains(&c), lanes)?);
            }
            env.pop();
            let mut p = factors.first().cloned().ok_or_else(|| self.unsupported(j, "einsum without operands"))?;
            for f in &factors[1..] {
                p = self.b.op(&format!("arith.mulf {p}, {f} fastmath<{CONTRACT}> : {vty}"));
            }
            nexts.push(self.b.op(&format!("arith.addf {acc}, {p} fastmath<{ACCUMULATE}> : {vty}")));
        }
        self.b.close_for_typed(&nexts, &vty);
        let mut out = Vec::with_capacity(accs.len());
        for (acc, r) in accs.iter().zip(&res) {
            let s = self.b.op(&format!("vector.reduction <add>, {r} fastmath<{ACCUMULATE}> : {vty} into f32"));
            out.push(self.b.op(&format!("arith.addf {acc}, {s} fastmath<{ACCUMULATE}> : f32")));
        }
        Ok(out)
    }

    /// Lanes of a CPU contraction of node `j` vectorized along its output's
    /// last axis (size `n`): when `j` is an einsum whose output is f32 data
    /// (`out_f32`), `n` is a positive multiple of [`Kc::simd`], every
    /// operand indexed by the output's last letter is stored f32 data whose
    /// last axis is that letter (consecutive outputs read consecutive
    /// elements), and the innermost contraction is not already vectorized
    /// (see [`Kc::simd_lanes`]). The context `w · V` einsum of bifurcated
    /// attention, `acdxy,cyz->acdxz`, is the case: y has stride k in V.
    pub(crate) fn out_lanes(&self, j: usize, n: Option<i64>, out_f32: bool) -> Option<usize> {
        let lanes = self.simd;
        let n = n?;
        if lanes == 0 || !out_f32 || n <= 0 || n % lanes as i64 != 0 {
            return None;
        }
        let node = self.graph.nodes.get(j)?;
        let Op::Einsum(spec) = &node.op else { return None };
        let z = *spec.output.last()?;
        if spec.inputs.len() != node.inputs.len() || spec.output.iter().filter(|c| **c == z).count() != 1 {
            return None;
        }
        let mut reduced: Vec<(char, Poly)> = Vec::new();
        for (subs, v) in spec.inputs.iter().zip(&node.inputs) {
            let shape = self.graph.shape_of(*v);
            if shape.len() != subs.len() {
                return None;
            }
            for (c, d) in subs.iter().zip(shape) {
                if !spec.output.contains(c) && !reduced.iter().any(|(l, _)| l == c) {
                    reduced.push((*c, d.clone()));
                }
            }
            if !subs.contains(&z) {
                continue;
            }
            let b = self.stored(*v)?;
            if subs.last() != Some(&z) || self.program.buffers[b].dtype != crate::ir::DType::F32 {
                return None;
            }
        }
        if let Some((c, d)) = reduced.last() {
            if self.simd_lanes(spec, &node.inputs, *c, d).is_some() {
                return None;
            }
        }
        Some(lanes)
    }

    /// Einsum node `j` at every index of `idxs` (a register tile), each
    /// the `lanes` consecutive outputs from its index along the output's
    /// last axis (see [`Kc::out_lanes`]), as `vector<lanes x f32>` values:
    /// one vector accumulator per index, the contracted letters in nested
    /// scalar loops; operands indexed by the last output letter are vector
    /// loads, the others scalar loads broadcast (each loaded once per step).
    pub(crate) fn einsum_out_vec(
        &mut self,
        j: usize,
        idxs: &[Vec<String>],
        lanes: usize,
    ) -> Result<Vec<String>, LowerError> {
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let Op::Einsum(spec) = op else { return Err(self.unsupported(j, "output-vector contraction of a non-einsum")) };
        if spec.inputs.len() != inputs.len() || idxs.iter().any(|idx| spec.output.len() != idx.len()) {
            return Err(self.unsupported(j, format!("einsum `{spec}` does not match its operands")));
        }
        let mut envs: Vec<Vec<(char, String)>> =
            idxs.iter().map(|idx| spec.output.iter().copied().zip(idx.iter().cloned()).collect()).collect();
        let mut reduced: Vec<(char, Poly)> = Vec::new();
        for (subs, v) in spec.inputs.iter().zip(&inputs) {
            let shape = self.graph.shape_of(*v).clone();
            for (c, d) in subs.iter().zip(shape) {
                if !spec.output.contains(c) && !reduced.iter().any(|(l, _)| l == c) {
                    reduced.push((*c, d));
                }
            }
        }
        let vty = format!("vector<{lanes}xf32>");
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        self.out_vec_loops(j, &spec, &inputs, &mut envs, &reduced, &vec![zero; idxs.len()], lanes)
    }

    #[allow(clippy::too_many_arguments)]
    fn out_vec_loops(
        &mut self,
        j: usize,
        spec: &EinsumSpec,
        inputs: &[Value],
        envs: &mut [Vec<(char, String)>],
        reduced: &[(char, Poly)],
        accs: &[String],
        lanes: usize,
    ) -> Result<Vec<String>, LowerError> {
        let vty = format!("vector<{lanes}xf32>");
        let z = spec.output.last().copied();
        let Some(((c, d), rest)) = reduced.split_first() else {
            let mut loaded = Loaded::default();
            let mut out = Vec::with_capacity(envs.len());
            for (env, acc) in envs.iter().zip(accs) {
                let mut factors = Vec::with_capacity(inputs.len());
                for (k, (subs, v)) in spec.inputs.iter().zip(inputs).enumerate() {
                    let at = self.operand_index(j, subs, env)?;
                    let lane = z.is_some_and(|z| subs.contains(&z));
                    factors.push(self.loadv_once(&mut loaded, j, k, *v, &at, lane, lanes)?);
                }
                let Some((first, more)) = factors.split_first() else {
                    return Err(self.unsupported(j, "einsum without operands"));
                };
                let mut p = first.clone();
                for f in more {
                    p = self.b.op(&format!("arith.mulf {p}, {f} fastmath<{CONTRACT}> : {vty}"));
                }
                out.push(self.b.op(&format!("arith.addf {acc}, {p} fastmath<{CONTRACT}> : {vty}")));
            }
            return Ok(out);
        };
        let ub = self.sizes(std::slice::from_ref(d))?.remove(0);
        let one = self.b.index(1);
        let (res, l, a) = self.b.open_for_typed(&ub, &one, accs, &vty);
        for env in envs.iter_mut() {
            env.push((*c, l.clone()));
        }
        let next = self.out_vec_loops(j, spec, inputs, envs, rest, &a, lanes)?;
        for env in envs.iter_mut() {
            env.pop();
        }
        self.b.close_for_typed(&next, &vty);
        Ok(res)
    }

    /// Softmax along `axis`: max, sum of `exp(x - max)`, element. A lane
    /// whose max is `-inf` (fully masked) gives 0.
    fn softmax(&mut self, j: usize, x: Value, axis: usize, idx: &[String]) -> Result<Val, LowerError> {
        let stats = self.softmax_stats(j, x, axis, idx)?;
        self.softmax_elem(x, &stats, idx)
    }

    /// Max and sum of `exp(x - max)` of the lane through `idx` along `axis`
    /// (`idx[axis]` is not read).
    fn softmax_stats(&mut self, j: usize, x: Value, axis: usize, idx: &[String]) -> Result<[String; 2], LowerError> {
        let shape = self.graph.shape_of(x).clone();
        let len = self.sizes(shape.get(axis..=axis).ok_or_else(|| self.unsupported(j, "softmax axis"))?)?.remove(0);
        let mut at = idx.to_vec();
        let max = self.softmax_max(x, &mut at, axis, &len)?;
        let sum = self.softmax_sum(x, &mut at, axis, &len, &max, None)?;
        Ok([max, sum])
    }

    /// The lane's max of `x` along `axis` (`at[axis]` walks the lane),
    /// combined over the block.
    fn softmax_max(&mut self, x: Value, at: &mut [String], axis: usize, len: &str) -> Result<String, LowerError> {
        let ninf = self.b.f32(f32::NEG_INFINITY);
        let (max, l, a) = self.row_for(len, &ninf);
        at[axis] = l;
        let v = self.loadf(x, at)?;
        let m = self.b.fbin("maximumf", &a, &v);
        self.b.close_for(&m, Ty::F32);
        Ok(self.row_combine("maximumf", &max))
    }

    /// The lane's sum of `exp(x - max)` along `axis`, combined over the
    /// block; each `exp` is also stored at its offset in `store` (pointer,
    /// row-major sizes, dtype) when given.
    fn softmax_sum(
        &mut self,
        x: Value,
        at: &mut [String],
        axis: usize,
        len: &str,
        max: &str,
        store: Option<(&str, &[String], crate::ir::DType)>,
    ) -> Result<String, LowerError> {
        let zero = self.b.f32(0.0);
        let (sum, l, a) = self.row_for(len, &zero);
        at[axis] = l;
        let v = self.loadf(x, at)?;
        let d = self.b.fbin("subf", &v, max);
        let e = self.b.math("exp", &d);
        if let Some((ptr, sizes, dtype)) = store {
            let off = self.b.linearize(at, sizes);
            self.b.store(ptr, &off, dtype, Val::f32(e.clone()));
        }
        let s = self.b.fbin("addf", &a, &e);
        self.b.close_for(&s, Ty::F32);
        Ok(self.row_combine("add", &sum))
    }

    fn softmax_elem(&mut self, x: Value, [max, sum]: &[String; 2], idx: &[String]) -> Result<Val, LowerError> {
        let (ninf, zero) = (self.b.f32(f32::NEG_INFINITY), self.b.f32(0.0));
        let v = self.loadf(x, idx)?;
        let d = self.b.fbin("subf", &v, max);
        let e = self.b.math("exp", &d);
        let q = self.b.fbin("divf", &e, sum);
        let masked = self.b.op(&format!("arith.cmpf oeq, {max}, {ninf} : f32"));
        Ok(Val::f32(self.b.op(&format!("arith.select {masked}, {zero}, {q} : f32"))))
    }

    /// A reduction loop over a row of `len` elements: over all of it, or
    /// in a block-shared kernel over this lane's share (elements `lane,
    /// lane + lanes, …`; see [`Kc::lanes`]). `init` is the identity of the
    /// combination [`Kc::row_combine`] applies afterwards.
    fn row_for(&mut self, len: &str, init: &str) -> (String, String, String) {
        match self.lanes {
            Lanes::Whole => self.b.open_for(len, init, Ty::F32),
            Lanes::Block => self.b.open_for_from("%tid", len, "%bdim", init, Ty::F32),
            Lanes::Warp => {
                let lanes = self.b.index(32);
                self.b.open_for_from("%lane", len, &lanes, init, Ty::F32)
            }
            Lanes::Emulated(n) => {
                let lanes = self.b.index(n as i64);
                let (res, lane, acc) = self.b.open_for(&lanes, init, Ty::F32);
                self.lane_loops.push((res, acc));
                self.b.open_for_from(&lane, len, &lanes, init, Ty::F32)
            }
        }
    }

    /// A loop over this lane's elements of a row (see [`Kc::row_for`]);
    /// emulated lanes store every element in one loop.
    fn row_loop(&mut self, len: &str) -> String {
        match self.lanes {
            Lanes::Block => self.b.open_loop_from("%tid", len, "%bdim"),
            Lanes::Warp => {
                let lanes = self.b.index(32);
                self.b.open_loop_from("%lane", len, &lanes)
            }
            Lanes::Whole | Lanes::Emulated(_) => self.b.open_loop(len),
        }
    }

    /// The row's reduction of the per-lane partials `v` (`maximumf` or
    /// `add`), after a [`Kc::row_for`] loop closed: a `gpu.all_reduce` over
    /// the block, a shuffle butterfly over the warp, the combination across
    /// the emulated lanes (closing their loop), or `v` itself (one thread
    /// had the whole row).
    fn row_combine(&mut self, op: &str, v: &str) -> String {
        // The arith op of a combination the warp or emulated lanes apply.
        let f = if op == "add" { "addf" } else { op };
        match self.lanes {
            Lanes::Whole => v.to_owned(),
            Lanes::Block => {
                let r = self.b.op(&format!("gpu.all_reduce {op} {v} uniform {{}} : (f32) -> (f32)"));
                // The reduction ends with every thread reading the result
                // from shared memory; a next one would overwrite it (its
                // first step stores partials there before any barrier), so
                // no thread may start one until all have read this one.
                self.b.line("gpu.barrier");
                r
            }
            Lanes::Warp => {
                // Butterfly: after the shuffle at distance d every lane holds
                // the sum over its group of 2d lanes.
                let width = self.b.i32(32);
                let mut acc = v.to_owned();
                for d in [16, 8, 4, 2, 1] {
                    let dist = self.b.i32(d);
                    let (other, valid) = (self.b.fresh(), self.b.fresh());
                    self.b.line(&format!("{other}, {valid} = gpu.shuffle xor {acc}, {dist}, {width} : f32"));
                    acc = self.b.fbin(f, &acc, &other);
                }
                acc
            }
            Lanes::Emulated(_) => {
                let Some((res, acc)) = self.lane_loops.pop() else { return v.to_owned() };
                let c = self.b.fbin(f, &acc, v);
                self.b.close_for(&c, Ty::F32);
                res
            }
        }
    }

    /// The axis a row kernel of node `j` walks (softmax: its axis; rms /
    /// layer norm: the last), when `j` is one: its per-lane statistics are
    /// then computed once per lane instead of once per element.
    pub(crate) fn row_axis(&self, j: usize) -> Option<usize> {
        let node = self.graph.nodes.get(j)?;
        crate::lower::plan::row_axis(&node.op, node.shape.len())
    }

    /// One lane of row kernel `j` (see [`Kc::row_axis`]): its statistics
    /// at `idx` (`idx[axis]` is not read), then a loop over `axis` storing
    /// every element at its row-major offset in `out_sizes`.
    pub(crate) fn row_lane(
        &mut self,
        j: usize,
        idx: &[String],
        out_sizes: &[String],
        out_ptr: &str,
        out_dtype: crate::ir::DType,
    ) -> Result<(), LowerError> {
        let axis = self.row_axis(j).ok_or_else(|| self.unsupported(j, "is not a row kernel"))?;
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let arg = |kc: &Self, k: usize| inputs.get(k).copied().ok_or_else(|| kc.unsupported(j, "missing input"));
        let len = out_sizes[axis].clone();
        let mut at = idx.to_vec();
        match op {
            Op::Softmax { .. } if out_dtype == crate::ir::DType::F32 => {
                // max; then `e = exp(x - max)` stored and summed; then each
                // stored `e` scaled by `1 / sum` (0 in a fully masked lane).
                // One exp per element, and the last pass reads the output
                // contiguously instead of through the input's views.
                let x = arg(self, 0)?;
                let ninf = self.b.f32(f32::NEG_INFINITY);
                let (zero, one) = (self.b.f32(0.0), self.b.f32(1.0));
                let max = self.softmax_max(x, &mut at, axis, &len)?;
                let sum = self.softmax_sum(x, &mut at, axis, &len, &max, Some((out_ptr, out_sizes, out_dtype)))?;
                let masked = self.b.op(&format!("arith.cmpf oeq, {max}, {ninf} : f32"));
                let inv = self.b.fbin("divf", &one, &sum);
                let l = self.row_loop(&len);
                at[axis] = l;
                let off = self.b.linearize(&at, out_sizes);
                let e = self.b.load(out_ptr, &off, out_dtype);
                let q = self.b.fbin("mulf", &e.ssa, &inv);
                let v = self.b.op(&format!("arith.select {masked}, {zero}, {q} : f32"));
                self.b.store(out_ptr, &off, out_dtype, Val::f32(v));
            }
            Op::Softmax { .. } => {
                let x = arg(self, 0)?;
                let stats = self.softmax_stats(j, x, axis, idx)?;
                let l = self.row_loop(&len);
                at[axis] = l;
                let v = self.softmax_elem(x, &stats, &at)?;
                let off = self.b.linearize(&at, out_sizes);
                self.b.store(out_ptr, &off, out_dtype, v);
            }
            Op::RmsNorm { eps } | Op::LayerNorm { eps } => {
                let (x, w) = (arg(self, 0)?, arg(self, 1)?);
                let bias = if matches!(op, Op::LayerNorm { .. }) { Some(arg(self, 2)?) } else { None };
                let stats = self.norm_stats(j, x, bias.is_some(), eps, idx)?;
                let l = self.row_loop(&len);
                at[axis] = l;
                let v = self.norm_elem(x, w, bias, &stats, &at)?;
                let off = self.b.linearize(&at, out_sizes);
                self.b.store(out_ptr, &off, out_dtype, v);
            }
            _ => return Err(self.unsupported(j, "is not a row kernel")),
        }
        self.b.close();
        Ok(())
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

    /// rms_norm (`bias` = None) or layer_norm over the last axis.
    fn norm(
        &mut self,
        j: usize,
        x: Value,
        w: Value,
        bias: Option<Value>,
        eps: f64,
        idx: &[String],
    ) -> Result<Val, LowerError> {
        let stats = self.norm_stats(j, x, bias.is_some(), eps, idx)?;
        self.norm_elem(x, w, bias, &stats, idx)
    }

    /// The mean (layer norm) and `1 / sqrt(mean square + eps)` of the lane
    /// through `idx` along the last axis (its last index is not read).
    fn norm_stats(
        &mut self,
        j: usize,
        x: Value,
        centered: bool,
        eps: f64,
        idx: &[String],
    ) -> Result<(Option<String>, String), LowerError> {
        let shape = self.graph.shape_of(x).clone();
        let last = idx.len().checked_sub(1).ok_or_else(|| self.unsupported(j, "norm of a scalar"))?;
        let len = self.sizes(&shape[last..])?.remove(0);
        let n = self.b.index_to_f32(&len);
        let zero = self.b.f32(0.0);
        let one = self.b.f32(1.0);
        let mut at = idx.to_vec();
        let mean = if centered {
            let (sum, l, a) = self.row_for(&len, &zero);
            at[last] = l;
            let v = self.loadf(x, &at)?;
            let s = self.b.fbin("addf", &a, &v);
            self.b.close_for(&s, Ty::F32);
            let sum = self.row_combine("add", &sum);
            Some(self.b.fbin("divf", &sum, &n))
        } else {
            None
        };
        let (ss, l, a) = self.row_for(&len, &zero);
        at[last] = l;
        let v = self.loadf(x, &at)?;
        let c = match &mean {
            Some(m) => self.b.fbin("subf", &v, m),
            None => v,
        };
        let sq = self.b.fbin("mulf", &c, &c);
        let s = self.b.fbin("addf", &a, &sq);
        self.b.close_for(&s, Ty::F32);
        let ss = self.row_combine("add", &ss);
        let ms = self.b.fbin("divf", &ss, &n);
        let e = self.b.f32(eps as f32);
        let ms = self.b.fbin("addf", &ms, &e);
        let root = self.b.math("sqrt", &ms);
        Ok((mean, self.b.fbin("divf", &one, &root)))
    }

    fn norm_elem(
        &mut self,
        x: Value,
        w: Value,
        bias: Option<Value>,
        (mean, r): &(Option<String>, String),
        idx: &[String],
    ) -> Result<Val, LowerError> {
        let last = idx.len() - 1;
        let v = self.loadf(x, idx)?;
        let c = match mean {
            Some(m) => self.b.fbin("subf", &v, m),
            None => v,
        };
        let y = self.b.fbin("mulf", &c, r);
        let g = self.loadf(w, std::slice::from_ref(&idx[last]))?;
        let y = self.b.fbin("mulf", &y, &g);
        Ok(Val::f32(match bias {
            None => y,
            Some(bv) => {
                let bb = self.loadf(bv, std::slice::from_ref(&idx[last]))?;
                self.b.fbin("addf", &y, &bb)
            }
        }))
    }

    /// Rotary embedding ("rotate half") of `x: [b, H, n, k]` at
    /// `positions: [b, n]`.
    fn rope(&mut self, j: usize, x: Value, pos: Value, theta: f64, idx: &[String]) -> Result<Val, LowerError> {
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
        // inv_freq = theta^(-2 i / k); angle = pos * inv_freq.
        let fi = self.b.index_to_f32(&i);
        let scale = self.b.f32((-2.0 / k as f64) as f32);
        let ex = self.b.fbin("mulf", &fi, &scale);
        let th = self.b.f32(theta as f32);
        let inv = self.b.op(&format!("math.powf {th}, {ex} : f32"));
        let p = self.loadf(pos, &[bi.clone(), t.clone()])?;
        let angle = self.b.fbin("mulf", &p, &inv);
        let cos = self.b.math("cos", &angle);
        let sin = self.b.math("sin", &angle);
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
