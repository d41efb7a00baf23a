//! Contractions: numpy matmul and general einsum, one element (or a
//! register tile of elements, or vectors of consecutive outputs on the CPU)
//! per call, with f32 accumulation in loops over the contracted letters.

use crate::ir::{EinsumSpec, Op, Poly, Value};
use crate::lower::LowerError;

use super::{Kc, Lanes};

/// Fast-math flags of a contraction's product: may fuse into an FMA.
pub(super) const CONTRACT: &str = "contract";
/// Fast-math flags of a contraction's accumulation: may fuse, and may be
/// reassociated (LLVM then vectorizes and interleaves the reduction; the
/// sum is still f32, in a different order).
const ACCUMULATE: &str = "reassoc,contract";

/// Loads already emitted in one contraction step, by (operand, index).
#[derive(Default)]
struct Loaded(std::collections::HashMap<(usize, Vec<String>), String>);

impl Kc<'_> {
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
            let (ia, ib) = self.matmul_operand_indices((&sa, &sb), idx, &kk, transpose_b);
            let x = self.loadf_once(&mut loaded, 0, a, &ia)?;
            let y = self.loadf_once(&mut loaded, 1, bv, &ib)?;
            nexts.push(self.accumulate(acc, &x, &y));
        }
        self.b.close_for_n(&nexts);
        Ok(self.reduction_combine(res))
    }

    /// The indices into a matmul's operands (of shapes `sa`, `sb`) for
    /// output index `idx` at step `kk` of the sum.
    pub(crate) fn matmul_operand_indices(
        &mut self,
        (sa, sb): (&[Poly], &[Poly]),
        idx: &[String],
        kk: &str,
        transpose_b: bool,
    ) -> (Vec<String>, Vec<String>) {
        let r = idx.len();
        let (m, n) = (idx[r - 2].clone(), idx[r - 1].clone());
        let mut ia = self.matmul_batch_index(sa, idx);
        ia.extend([m, kk.to_owned()]);
        let mut ib = self.matmul_batch_index(sb, idx);
        if transpose_b {
            ib.extend([n, kk.to_owned()]);
        } else {
            ib.extend([kk.to_owned(), n]);
        }
        (ia, ib)
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
            (true, None) if self.vector_readable(v) => self.load_vector_view(v, at, lanes)?,
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
    /// every operand indexed by `c` has `c` as its last (and only `c`)
    /// axis and is float data readable as vectors along it (stored, or
    /// through views that keep it innermost: [`Kc::vector_readable`]; the
    /// query of grouped-query attention is a reshape of its projection), so
    /// that consecutive `c` are consecutive elements.
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
            let contiguous = subs.last() == Some(&c) && subs.iter().filter(|s| **s == c).count() == 1;
            if !contiguous || !self.vector_readable(*v) {
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
    /// last axis (size `n`): when `j` is an einsum whose output is float
    /// data (`out_float`), `n` is a positive multiple of [`Kc::simd`], every
    /// operand indexed by the output's last letter has it as its last axis
    /// and is float data readable as vectors along it ([`Kc::vector_readable`]:
    /// consecutive outputs read consecutive elements), and the innermost
    /// contraction is not already vectorized
    /// (see [`Kc::simd_lanes`]). The context `w · V` einsum of bifurcated
    /// attention, `acdxy,cyz->acdxz`, is the case: y has stride k in V.
    pub(crate) fn out_lanes(&self, j: usize, n: Option<i64>, out_float: bool) -> Option<usize> {
        let lanes = self.simd;
        let n = n?;
        if lanes == 0 || !out_float || n <= 0 || n % lanes as i64 != 0 {
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
            if subs.last() != Some(&z) || !self.vector_readable(*v) {
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
}
