//! Contractions: numpy matmul and general einsum, one element (or a
//! register tile of elements, or vectors of consecutive outputs on the CPU)
//! per call, with f32 accumulation in loops over the contracted letters.

use crate::ir::{EinsumSpec, Op, Poly, Value};
use crate::lower::LowerError;

use super::chunks::SumPart;
use super::panel_ahead::LinesAhead;
use super::{Kc, Lanes, BLOCK, CPU_SIMD};

/// Lanes in a 128-bit group of an f32 vector (see [`Kc::lane_tree_16`]).
const LANE_GROUP: usize = 4;

/// Fast-math flags of a contraction's product: may fuse into an FMA.
pub(super) const CONTRACT: &str = "contract";
/// Fast-math flags of a contraction's accumulation: may fuse, and may be
/// reassociated (LLVM then vectorizes and interleaves the reduction; the
/// sum is still f32, in a different order).
const ACCUMULATE: &str = "reassoc,contract";
/// Letters for the batch axes of a matmul written as an einsum (see
/// [`Kc::contraction_spec`]; none of `m`, `n`, `k`).
const BATCH_LETTERS: &str = "abcdefgh";
/// A sum of at most this many vectors is short (see [`VectorSum::short`]):
/// an attention head of up to 256 (a few cache lines of each K row per
/// output), against the thousands of a weight projection's.
const PREFETCH_SUM_VECTORS: usize = 16;
/// Vector sums at least this many at once are added in a tree
/// ([`Kc::lane_tree`]), fewer each on its own.
const TREE_SUMS: usize = 4;

/// A contraction's innermost sum in explicit vectors (see
/// [`Kc::vector_sum`]).
#[derive(Clone, Copy)]
pub(crate) struct VectorSum {
    pub lanes: usize,
    /// Letters the contraction sums in all (this one innermost).
    pub letters: usize,
    /// Elements this letter sums (a constant).
    pub len: i64,
}

impl VectorSum {
    /// At most PREFETCH_SUM_VECTORS vectors (a head of 64 or 128): a few
    /// cache lines of each operand row per output.
    pub(crate) fn short(&self) -> bool {
        self.len <= (PREFETCH_SUM_VECTORS * self.lanes) as i64
    }
}

/// For each output index of a tile, its einsum letters bound to it.
pub(super) fn output_envs(output: &[char], idxs: &[Vec<String>]) -> Vec<Vec<(char, String)>> {
    idxs.iter().map(|idx| output.iter().copied().zip(idx.iter().cloned()).collect()).collect()
}

/// The masks of the four stages of a 16 × 16 lane shuffle over `[x (lanes
/// 0..16), y (16..32)]`, per group j of 4 lanes: x and y lane by lane
/// (unpacklo/hi_ps), then pair by pair (unpacklo/hi_pd); then groups 0, 2
/// / 1, 3 of x and of y (shuf32x4), twice (see [`Kc::lane_tree_16`],
/// [`Kc::transpose_16`]).
fn group_stages() -> [(String, String); 4] {
    let g = LANE_GROUP;
    let n = g * g;
    let per_group = |f: &dyn Fn(usize) -> [usize; 4]| -> Vec<usize> { (0..g).flat_map(|j| f(g * j)).collect() };
    let lanes_lo = per_group(&|b| [b, n + b, b + 1, n + b + 1]);
    let lanes_hi = per_group(&|b| [b + 2, n + b + 2, b + 3, n + b + 3]);
    let pairs_lo = per_group(&|b| [b, b + 1, n + b, n + b + 1]);
    let pairs_hi = per_group(&|b| [b + 2, b + 3, n + b + 2, n + b + 3]);
    let groups = |first: usize| -> Vec<usize> {
        [first, first + 2, g + first, g + first + 2].iter().flat_map(|&q| (0..g).map(move |t| g * q + t)).collect()
    };
    let text = |m: &[usize]| m.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    [
        (text(&lanes_lo), text(&lanes_hi)),
        (text(&pairs_lo), text(&pairs_hi)),
        (text(&groups(0)), text(&groups(1))),
        (text(&groups(0)), text(&groups(1))),
    ]
}

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
        &mut self,
        j: usize,
        subs: &[char],
        env: &[(char, String)],
    ) -> Result<Vec<String>, LowerError> {
        subs.iter()
            .map(|s| match env.iter().find(|(l, _)| l == s) {
                Some((_, i)) => Ok(i.clone()),
                // A summed letter of size 1 has no loop (see `reduced`).
                None if self.unit_sums(j).contains(s) => Ok(self.b.index(0)),
                None => Err(self.unsupported(j, format!("einsum letter `{s}` is unbound"))),
            })
            .collect()
    }

    /// The summed letters of contraction `j` of size 1: read at index 0,
    /// with no loop (see [`crate::lower::plan::unit_sums`], [`Kc::reduced`]).
    pub(crate) fn unit_sums(&self, j: usize) -> Vec<char> {
        match self.contraction_spec(j) {
            Some((spec, inputs)) => crate::lower::plan::unit_sums(self.graph, &spec, &inputs),
            None => Vec::new(),
        }
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
        let mut envs = output_envs(&spec.output, idxs);
        let reduced = self.reduced(spec, inputs);
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
    /// accumulator after the loop (each on its own, or at least
    /// TREE_SUMS in a tree: [`Kc::lane_tree`]).
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
        let res = self.simd_sums(j, spec, inputs, envs, (c, d), lanes, None)?;
        let sums: Vec<String> = if self.tree_16(lanes) && res.len() < TREE_SUMS {
            // Each in the tree a 16-sum tile's take (`Kc::lane_sum_16`).
            res.iter().map(|r| self.lane_sum_16(r)).collect()
        } else if res.len() >= TREE_SUMS && lanes.is_power_of_two() {
            let packed = self.lane_tree(&res, lanes);
            let lane = |i: usize| format!("vector.extract {}[{}] : f32 from {vty}", packed[i / lanes], i % lanes);
            (0..res.len()).map(|i| self.b.op(&lane(i))).collect()
        } else {
            let each = |r: &String| format!("vector.reduction <add>, {r} fastmath<{ACCUMULATE}> : {vty} into f32");
            res.iter().map(|r| self.b.op(&each(r))).collect()
        };
        let add = |acc: &String, s: &String| format!("arith.addf {acc}, {s} fastmath<{ACCUMULATE}> : f32");
        Ok(accs.iter().zip(&sums).map(|(acc, s)| self.b.op(&add(acc, s))).collect())
    }

    /// The loop over contracted letter `c` (size `d`) in vectors of
    /// `lanes`, one vector accumulator per env (output); operands not
    /// indexed by `c` are loaded once per step and broadcast. Returns the
    /// accumulators after the loop, each still to be summed across lanes.
    /// With `ahead` (a letter and a distance), each stored operand indexed
    /// by that letter is also prefetched that far ahead along it.
    #[allow(clippy::too_many_arguments)]
    fn simd_sums(
        &mut self,
        j: usize,
        spec: &EinsumSpec,
        inputs: &[Value],
        envs: &mut [Vec<(char, String)>],
        (c, d): (char, &Poly),
        lanes: usize,
        ahead: Option<(char, usize)>,
    ) -> Result<Vec<String>, LowerError> {
        let vty = format!("vector<{lanes}xf32>");
        let ub = self.sizes(std::slice::from_ref(d))?.remove(0);
        // Two bf16 operands: 32 elements a step, by the dot product.
        let dot = self.dot_sum(spec, inputs, c, lanes);
        let step = self.b.index(if dot { 2 * lanes } else { lanes } as i64);
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let (res, l, vaccs) = self.b.open_for_typed(&ub, &step, &vec![zero; envs.len()], &vty);
        let mut loaded = Loaded::default();
        let mut nexts = Vec::with_capacity(envs.len());
        for (env, acc) in envs.iter_mut().zip(&vaccs) {
            env.push((c, l.clone()));
            let mut factors = Vec::with_capacity(inputs.len());
            for (k, (subs, v)) in spec.inputs.iter().zip(inputs).enumerate() {
                let at = self.operand_index(j, subs, env)?;
                // Prefetched once, with the element's first load.
                let first = !loaded.0.contains_key(&(k, at.clone()));
                factors.push(match loaded.0.get(&(k, at.clone())) {
                    Some(x) => x.clone(),
                    None if dot => {
                        let x = self.load_bf16_run(*v, &at)?;
                        loaded.0.insert((k, at.clone()), x.clone());
                        x
                    }
                    None => self.loadv_once(&mut loaded, j, k, *v, &at, subs.contains(&c), lanes)?,
                });
                match (ahead, self.stored(*v)) {
                    (Some((z, n)), Some(b)) if first && subs.contains(&z) => {
                        let mut later = env.clone();
                        if let Some((_, i)) = later.iter_mut().find(|(l, _)| *l == z) {
                            let step = self.b.index(n as i64);
                            *i = self.b.addi(i, &step);
                        }
                        let at = self.operand_index(j, subs, &later)?;
                        self.prefetch_buffer(b, &at)?;
                    }
                    _ => {}
                }
            }
            env.pop();
            if let (true, [a, b]) = (dot, factors.as_slice()) {
                nexts.push(self.dot_bf16(acc, a, b));
                continue;
            }
            let mut p = factors.first().cloned().ok_or_else(|| self.unsupported(j, "einsum without operands"))?;
            for f in &factors[1..] {
                p = self.b.op(&format!("arith.mulf {p}, {f} fastmath<{CONTRACT}> : {vty}"));
            }
            nexts.push(self.b.op(&format!("arith.addf {acc}, {p} fastmath<{ACCUMULATE}> : {vty}")));
        }
        self.b.close_for_typed(&nexts, &vty);
        Ok(res)
    }

    /// Einsum node `j`, whose one contracted letter is summed in explicit
    /// vectors ([`Kc::vector_sum`]), at every index of `idxs`: rows of
    /// `cols` consecutive outputs along the output's last axis (`cols`
    /// dividing the lanes), each row's as one `vector<cols x f32>`, the
    /// sums added in one tree. With `ahead`, when the sum is short, the
    /// stored operands indexed by that axis are prefetched that many
    /// outputs further along it.
    pub(crate) fn einsum_rows(
        &mut self,
        j: usize,
        idxs: &[Vec<String>],
        cols: usize,
        ahead: Option<usize>,
    ) -> Result<Vec<String>, LowerError> {
        let (Some((spec, inputs)), Some(sum @ VectorSum { lanes, letters: 1, .. })) =
            (self.contraction_spec(j), self.vector_sum(j))
        else {
            return Err(self.unsupported(j, "rows of a contraction not summed in vectors"));
        };
        if cols == 0 || lanes % cols != 0 || idxs.len() % cols != 0 || idxs.iter().any(|i| i.len() != spec.output.len())
        {
            return Err(self.unsupported(j, format!("einsum `{spec}` in rows of {cols}")));
        }
        let reduced = self.reduced(&spec, &inputs);
        let Some((c, d)) = reduced.first() else { return Err(self.unsupported(j, "einsum without a sum")) };
        let mut envs = output_envs(&spec.output, idxs);
        let z = spec.output.last().copied().ok_or_else(|| self.unsupported(j, "einsum rows of a scalar"))?;
        // Prefetched when each output's sum reads a few lines of each
        // operand row (a head of K): a long row (a weight's) is one
        // stream the hardware follows, and one prefetch per line of it
        // only costs instructions (the projections 2.3 -> 5.4 ms).
        let ahead = ahead.filter(|_| sum.short()).map(|n| (z, n));
        let res = self.simd_sums(j, &spec, &inputs, &mut envs, (*c, d), lanes, ahead)?;
        let packed = self.lane_tree(&res, lanes);
        let vty = format!("vector<{lanes}xf32>");
        Ok((0..idxs.len() / cols)
            .map(|r| {
                let (v, at) = (&packed[r * cols / lanes], r * cols % lanes);
                let slice = format!("{{offsets = [{at}], sizes = [{cols}], strides = [1]}}");
                self.b.op(&format!("vector.extract_strided_slice {v} {slice} : {vty} to vector<{cols}xf32>"))
            })
            .collect())
    }

    /// The lane sums of `vecs` (each `vector<lanes x f32>`, `lanes` a
    /// power of two), packed: `vecs[i]`'s in lane `i % lanes` of vector
    /// `i / lanes`. A tree in which every stage packs two vectors' partial
    /// sums into one, each sum then held in half as many lanes (two
    /// shuffles and an add per pair: 45 operations for 16 sums, against
    /// 16 reductions of 8 or so). A vector left without a pair is paired
    /// with zeros. Sixteen 16-lane vectors at a time take
    /// [`Kc::lane_tree_16`]'s stages instead (the same count, cheaper
    /// shuffles), and so do fewer with the wide tiles ([`Kc::tree_16`]),
    /// padded with zero vectors to 16.
    fn lane_tree(&mut self, vecs: &[String], lanes: usize) -> Vec<String> {
        if lanes == LANE_GROUP * LANE_GROUP && !vecs.is_empty() && (vecs.len() % lanes == 0 || self.tree_16(lanes)) {
            // With the wide tiles, fewer sums than 16 (a tile's rows left)
            // go through the same tree as a whole tile's, padded with
            // zeros (which only ever add to zeros): equal rows, equal bits.
            let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : vector<{lanes}xf32>"));
            let mut all = vecs.to_vec();
            all.resize(vecs.len().div_ceil(lanes) * lanes, zero);
            return all.chunks(lanes).map(|c| self.lane_tree_16(c)).collect();
        }
        let vty = format!("vector<{lanes}xf32>");
        let (mut cur, mut group, mut per) = (vecs.to_vec(), lanes, 1);
        while group > 1 {
            if cur.len() % 2 == 1 {
                cur.push(self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}")));
            }
            let half = group / 2;
            // Lane n * half + t of the packed vector: lane t of the n-th
            // sum's group, the first `per` sums from the first vector
            // (lanes 0..), the others from the second (lanes `lanes`..).
            let mask = |from: usize| -> String {
                let at = |n: usize, t: usize| if n < per { n * group + t } else { lanes + (n - per) * group + t };
                let lane = |(n, t): (usize, usize)| (at(n, t) + from).to_string();
                (0..2 * per).flat_map(|n| (0..half).map(move |t| (n, t))).map(lane).collect::<Vec<_>>().join(", ")
            };
            cur = self.tree_stage(&cur, (&mask(0), &mask(half)), &vty);
            (group, per) = (half, per * 2);
        }
        cur.truncate(vecs.len().div_ceil(lanes));
        cur
    }

    /// [`Kc::lane_tree`] of 16 vectors of 16 lanes, their sums packed in
    /// order into one vector, in the stages x86 shuffles cheapest: two
    /// that pair lanes within each group of 4 (unpack: lane-local), then
    /// two that pair whole groups of 4 lanes (one 128-bit shuffle each).
    /// The halving tree's last two stages are two-source permutes of
    /// single lanes: the context q·K tile in cache ran 0.38 ms that way,
    /// 0.33-0.35 this way (cpu_step's at m_c = 512 alone; the step at
    /// m_c = 2048, b = 32: 28.7-28.9 -> 27.1-27.5 ms).
    fn lane_tree_16(&mut self, vecs: &[String]) -> String {
        let vty = format!("vector<{}xf32>", LANE_GROUP * LANE_GROUP);
        let mut cur = vecs.to_vec();
        for (lo, hi) in &group_stages() {
            cur = self.tree_stage(&cur, (lo.as_str(), hi.as_str()), &vty);
        }
        cur.remove(0)
    }

    /// Sums of `lanes` lanes go through [`Kc::lane_tree_16`]'s tree
    /// whatever their number: with the wide tiles (`emit::registers`),
    /// whose tiles of sums are 4 rows × 4 outputs, 16 sums in that tree,
    /// and the rows after the last whole tile take fewer (the narrow
    /// tiles' 6 sums and their rows left all take the halving tree).
    fn tree_16(&self, lanes: usize) -> bool {
        lanes == LANE_GROUP * LANE_GROUP && !self.narrow
    }

    /// The sum of the 16 lanes of `v` added in the tree that
    /// [`Kc::lane_tree_16`] adds each of its sums' in: lanes two apart
    /// within each group of 4, then the pairs, then groups of 4, then
    /// halves. A sum alone (one output at a time: a block cut short, or
    /// b < 4) then gets the bits it would get among 16 (a halving tree,
    /// `vector.reduction`, adds lanes 8 apart first): equal rows, equal
    /// bits. The adds are not reassociable, so that LLVM keeps the tree;
    /// as many shuffles and adds as the halving tree's.
    pub(super) fn lane_sum_16(&mut self, v: &str) -> String {
        let n = LANE_GROUP * LANE_GROUP;
        let vty = format!("vector<{n}xf32>");
        let swaps: [fn(usize) -> usize; 4] = [|l| l ^ 2, |l| l ^ 1, |l| l ^ 4, |l| l ^ 8];
        let mut cur = v.to_owned();
        for swap in swaps {
            let mask = (0..n).map(|l| swap(l).to_string()).collect::<Vec<_>>().join(", ");
            let other = self.b.op(&format!("vector.shuffle {cur}, {cur} [{mask}] : {vty}, {vty}"));
            cur = self.b.op(&format!("arith.addf {cur}, {other} fastmath<{CONTRACT}> : {vty}"));
        }
        self.b.op(&format!("vector.extract {cur}[0] : f32 from {vty}"))
    }

    /// The 16 × 16 transpose of `vecs` (16 vectors of 16 lanes): lane `i`
    /// of result `l` is lane `l` of `vecs[i]`. The stages of
    /// [`Kc::lane_tree_16`] with both shuffles of a pair kept, not added
    /// (64 shuffles: unpacks, then 128-bit group shuffles).
    pub(super) fn transpose_16(&mut self, vecs: &[String]) -> Vec<String> {
        let vty = format!("vector<{}xf32>", LANE_GROUP * LANE_GROUP);
        let [(lanes_lo, lanes_hi), (pairs_lo, pairs_hi), (groups_lo, groups_hi), _] = group_stages();
        let mut shuffle = |a: &String, b: &String, m: &str| -> String {
            self.b.op(&format!("vector.shuffle {a}, {b} [{m}] : {vty}, {vty}"))
        };
        // Lanes of neighbours interleaved, then pairs of lanes two apart.
        let mut t = Vec::with_capacity(16);
        for p in vecs.chunks(2) {
            t.push(shuffle(&p[0], &p[1], &lanes_lo));
            t.push(shuffle(&p[0], &p[1], &lanes_hi));
        }
        let mut r = Vec::with_capacity(16);
        for q in t.chunks(4) {
            r.push(shuffle(&q[0], &q[2], &pairs_lo));
            r.push(shuffle(&q[0], &q[2], &pairs_hi));
            r.push(shuffle(&q[1], &q[3], &pairs_lo));
            r.push(shuffle(&q[1], &q[3], &pairs_hi));
        }
        // Groups of 4 lanes: vectors 4 apart, then 8 apart.
        let mut t = r.clone();
        for i in 0..4 {
            for h in [0, 8] {
                t[i + h] = shuffle(&r[i + h], &r[i + h + 4], &groups_lo);
                t[i + h + 4] = shuffle(&r[i + h], &r[i + h + 4], &groups_hi);
            }
        }
        let mut out = t.clone();
        for i in 0..4 {
            for h in [0, 4] {
                out[i + h] = shuffle(&t[i + h], &t[i + h + 8], &groups_lo);
                out[i + h + 8] = shuffle(&t[i + h], &t[i + h + 8], &groups_hi);
            }
        }
        out
    }

    /// One stage of a lane tree: each pair of `vecs` (of type `vty`)
    /// shuffled by masks `lo` and `hi` over their concatenation, the two
    /// added.
    fn tree_stage(&mut self, vecs: &[String], (lo, hi): (&str, &str), vty: &str) -> Vec<String> {
        vecs.chunks(2)
            .map(|p| {
                let a = self.b.op(&format!("vector.shuffle {}, {} [{lo}] : {vty}, {vty}", p[0], p[1]));
                let b = self.b.op(&format!("vector.shuffle {}, {} [{hi}] : {vty}, {vty}", p[0], p[1]));
                self.b.op(&format!("arith.addf {a}, {b} fastmath<{ACCUMULATE}> : {vty}"))
            })
            .collect()
    }

    /// For einsum `j` summed in vectors along a long letter (a weight
    /// projection `x @ Wᵀ`), the operand whose rows the output's last
    /// letter indexes when it is a densely stored 2-D buffer `[z, c]`
    /// (the weight): its buffer and its row length in elements.
    pub(crate) fn block_operand(&mut self, j: usize) -> Option<(usize, String)> {
        let sum = self.vector_sum(j).filter(|s| s.letters == 1 && !s.short())?;
        let (spec, inputs) = self.contraction_spec(j)?;
        let z = *spec.output.last()?;
        let (_, &w) = spec.inputs.iter().zip(&inputs).find(|(letters, _)| letters.len() == 2 && letters[0] == z)?;
        let b = self.stored(w)?;
        let buf = &self.program.buffers[b];
        if buf.pitch.is_some() || buf.shape.len() != 2 || buf.dtype != crate::ir::DType::F32 {
            return None;
        }
        let sizes = self.storage_sizes(b).ok()?;
        (self.b.known(&sizes[1]) == Some(sum.len)).then(|| (b, sizes[1].clone()))
    }

    /// Prefetches into L2 this step's share of the rows `[next, next +
    /// BLOCK)` of weight buffer `b` (rows of `row` elements; see
    /// [`Kc::block_operand`]): the next block's weights, split in equal
    /// runs of cache lines among the `shares` steps of this block (step
    /// `share`). A projection's weight streams from memory once per
    /// step, and its block is read from L2 by every tile; fetched during
    /// the block before, it arrives under that block's arithmetic
    /// (gate_proj alone, cold: 2.23-2.38 -> 2.00-2.19 ms).
    pub(crate) fn prefetch_next_block(
        &mut self,
        b: usize,
        (row, next): (&str, &str),
        (share, shares): (&str, &str),
    ) -> Result<(), LowerError> {
        let line = CPU_SIMD;
        let (n, l) = (self.b.index(BLOCK as i64), self.b.index(line as i64));
        let elems = self.b.muli(&n, row);
        let total = self.b.op(&format!("arith.divui {elems}, {l} : index"));
        let per = self.ceil_div_here(&total, shares);
        let first = self.b.muli(share, &per);
        let first = self.b.op(&format!("arith.minui {first}, {total} : index"));
        let left = self.b.subi(&total, &first);
        let count = self.b.op(&format!("arith.minui {per}, {left} : index"));
        let zero = self.b.index(0);
        let (ptr, start) = self.buffer_offset(b, &[next.to_owned(), zero])?;
        let i = self.b.open_loop(&count);
        let k = self.b.addi(&first, &i);
        let k = self.b.muli(&k, &l);
        let off = self.b.addi(&start, &k);
        self.b.prefetch_to(&ptr, &off, crate::ir::DType::F32, false, 2);
        self.b.close();
        Ok(())
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
        if self.pair_dot(j).is_some() {
            return Some(lanes);
        }
        let (spec, inputs) = self.contraction_spec(j)?;
        let z = *spec.output.last()?;
        if spec.inputs.len() != inputs.len() || spec.output.iter().filter(|c| **c == z).count() != 1 {
            return None;
        }
        for (subs, v) in spec.inputs.iter().zip(&inputs) {
            if self.graph.shape_of(*v).len() != subs.len() {
                return None;
            }
            if subs.contains(&z) && (subs.last() != Some(&z) || !self.vector_readable(*v)) {
                return None;
            }
        }
        if self.vector_sum(j).is_some() {
            return None;
        }
        Some(lanes)
    }

    /// The explicit-vector sum ([`Kc::simd_lanes`]) that node `j` runs as
    /// its innermost contraction loop (`q·K`: the head dim, innermost in
    /// both operands), if any.
    pub(crate) fn vector_sum(&self, j: usize) -> Option<VectorSum> {
        let (spec, inputs) = self.contraction_spec(j)?;
        let reduced = self.reduced(&spec, &inputs);
        let (c, d) = reduced.last()?;
        let lanes = self.simd_lanes(&spec, &inputs, *c, d)?;
        // simd_lanes only accepts a constant length.
        let len = self.constant_size(d)?;
        Some(VectorSum { lanes, letters: reduced.len(), len })
    }

    /// Node `j` as an einsum over its inputs: an einsum itself, a batched
    /// matmul not transposed whose operands have the same batch axes (the
    /// unbifurcated attention's `p @ V`, `abmk,abkn->abmn`: its rows then
    /// share output vectors of V, a prefill step's 43 -> 5.3 ms; its
    /// `q @ Kᵀ` is left to the scalar tile, which the vector sum read
    /// through the concat of K's parts did not beat: 12 -> 14 ms), or a
    /// matmul by a 2-D right operand: transposed, of f32 data (a weight
    /// projection `x [.., m, k] @ W[n, k]ᵀ` is `..mk,nk->..mn`), or not
    /// (a right operand stored `[in, out]`: `..mk,kn->..mn`, which then
    /// runs in output vectors like `w · V`: GPT-2's Conv1D c_fc / c_proj /
    /// c_attn at b = 32 took 30 / 37 / 17 ms in the scalar tile, 6 / 9 /
    /// 3.5 ms so; its f32 weights are now kept transposed instead, see
    /// `cpu::layout`: 3 / 3 / 2.2 ms).
    /// A bf16 / f16 transposed projection is left to the scalar tile of 8
    /// rows × 4 outputs, which widens 12 vectors for 32 FMAs against 8 for
    /// 16 (at b = 8 in bf16, gate_proj 0.84 ms that way, 0.98 ms in vector
    /// sums), unless both operands are bf16 and summed by the CPU's bf16
    /// dot product ([`Kc::dot_sum`]: 32 elements of each a step, no
    /// widening): a weight not kept in panels (bf16 GPT-2's tied logits,
    /// 2 layers, b = 32, one thread, before the CPU step kept them in
    /// panels: 47.2 -> 18.4 ms, where its f32 twin took 25.3 ms; the bf16
    /// cpu_step model's vocabulary of 1000, before it was padded to
    /// panels: 1.25 -> 0.48 ms). The CPU step runs weight
    /// projections with a multiple of 64 outputs from weights kept in
    /// panels instead (`cpu::panels`: an einsum in output vectors), so
    /// these paths take the others.
    pub(super) fn contraction_spec(&self, j: usize) -> Option<(EinsumSpec, Vec<Value>)> {
        let node = self.graph.nodes.get(j)?;
        let f32_data = |v: &Value| self.graph.dtype_of(*v) == crate::ir::DType::F32;
        match (&node.op, node.inputs.as_slice()) {
            (Op::Einsum(spec), inputs) if spec.inputs.len() == inputs.len() => Some((spec.clone(), inputs.to_vec())),
            (Op::MatMul { transpose_b }, &[a, w]) => {
                let (sa, sw) = (self.graph.shape_of(a), self.graph.shape_of(w));
                let rank = sa.len();
                // A batched right operand, not transposed, with the same
                // batch axes (no broadcasting: the unbifurcated
                // attention's `p @ V` over `[b, h, .., ..]`) shares their
                // letters.
                let batched =
                    !*transpose_b && sw.len() == rank && self.graph.dims.same_shape(&sa[..rank - 2], &sw[..rank - 2]);
                if rank < 2 || !(sw.len() == 2 || batched) || rank > 2 + BATCH_LETTERS.len() {
                    return None;
                }
                let mut x: Vec<char> = BATCH_LETTERS.chars().take(rank - 2).collect();
                let mut output = x.clone();
                let mut w_letters = if batched { x.clone() } else { Vec::new() };
                x.extend(['m', 'k']);
                output.extend(['m', 'n']);
                w_letters.extend(if *transpose_b { ['n', 'k'] } else { ['k', 'n'] });
                let spec = EinsumSpec { inputs: vec![x, w_letters], output };
                // Transposed, f32 data, or bf16 summed by the dot product
                // (a tied embedding's logits: see `Kc::dot_sum`).
                let summed = !*transpose_b || (f32_data(&a) && f32_data(&w)) || self.dot_sum(&spec, &[a, w], 'k', 16);
                summed.then(|| (spec, vec![a, w]))
            }
            _ => None,
        }
    }

    /// The contracted letters of einsum `spec` over `inputs` with their
    /// sizes, in order of first appearance (the last is the innermost loop).
    pub(crate) fn reduced(&self, spec: &EinsumSpec, inputs: &[Value]) -> Vec<(char, Poly)> {
        // A letter of size 1 is read at 0 (`Kc::operand_index`).
        let unit = crate::lower::plan::unit_sums(self.graph, spec, inputs);
        let mut reduced: Vec<(char, Poly)> = Vec::new();
        for (subs, v) in spec.inputs.iter().zip(inputs) {
            for (c, d) in subs.iter().zip(self.graph.shape_of(*v)) {
                if !spec.output.contains(c) && !unit.contains(c) && !reduced.iter().any(|(l, _)| l == c) {
                    reduced.push((*c, d.clone()));
                }
            }
        }
        reduced
    }

    /// Einsum node `j` at every index of `idxs` (a register tile), each
    /// the `lanes` consecutive outputs from its index along the output's
    /// last axis (see [`Kc::out_lanes`]), as `vector<lanes x f32>` values:
    /// one vector accumulator per index, the contracted letters in nested
    /// scalar loops; operands indexed by the last output letter are vector
    /// loads, the others scalar loads broadcast (each loaded once per step).
    /// With `ahead` (a whole tile of a projection from panels, or of a
    /// chunked sum), each step of the sum also prefetches a line of the
    /// next panel or chunk; with `part`, the sum runs over that chunk.
    pub(crate) fn einsum_out_vec(
        &mut self,
        j: usize,
        idxs: &[Vec<String>],
        lanes: usize,
        (ahead, part): (Option<&LinesAhead>, Option<&SumPart>),
    ) -> Result<Vec<String>, LowerError> {
        if let Some(pd) = self.pair_dot(j).filter(|_| lanes == 16) {
            return self.pair_dot_vec(j, pd, idxs, ahead);
        }
        if let Some(pr) = self.pair_rows(j).filter(|_| lanes == 16) {
            return self.pair_rows_vec(j, pr, idxs, (ahead, part));
        }
        if let Some(wr) = self.widened_rows(j).filter(|_| lanes == 16) {
            return self.widened_rows_vec(j, wr, idxs, (ahead, part));
        }
        let Some((spec, inputs)) = self.contraction_spec(j) else {
            return Err(self.unsupported(j, "output-vector contraction of a non-einsum"));
        };
        if spec.inputs.len() != inputs.len() || idxs.iter().any(|idx| spec.output.len() != idx.len()) {
            return Err(self.unsupported(j, format!("einsum `{spec}` does not match its operands")));
        }
        let mut envs = output_envs(&spec.output, idxs);
        let reduced = self.reduced(&spec, &inputs);
        let vty = format!("vector<{lanes}xf32>");
        let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
        let accs = match part {
            Some(p) => p.inits.clone(),
            None => vec![zero; idxs.len()],
        };
        self.out_vec_loops(j, (&spec, &inputs), &mut envs, &reduced, &accs, lanes, (ahead, part))
    }

    #[allow(clippy::too_many_arguments)]
    fn out_vec_loops(
        &mut self,
        j: usize,
        (spec, inputs): (&EinsumSpec, &[Value]),
        envs: &mut [Vec<(char, String)>],
        reduced: &[(char, Poly)],
        accs: &[String],
        lanes: usize,
        (ahead, part): (Option<&LinesAhead>, Option<&SumPart>),
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
        // One loop per part of a concat the sum reads along `c` (see
        // `Kc::sum_over`).
        let operands: Vec<(Value, usize)> = spec
            .inputs
            .iter()
            .zip(inputs)
            .filter_map(|(subs, &v)| Some((v, subs.iter().position(|x| x == c)?)))
            .collect();
        let segments = self.sum_segments(&operands, d);
        // The first summed letter's part of a chunked sum (`Kc::sum_chunk`).
        let within = part.filter(|_| reduced.len() == 1).map(|p| (p.from.as_str(), p.to.as_str()));
        self.sum_over_within(&segments, within, accs, &vty, |kc, l, a| {
            if let Some(p) = ahead.filter(|p| p.sum == *c) {
                kc.prefetch_line(p, l);
            }
            for env in envs.iter_mut() {
                env.push((*c, l.to_owned()));
            }
            let next = kc.out_vec_loops(j, (spec, inputs), envs, rest, a, lanes, (ahead, None));
            for env in envs.iter_mut() {
                env.pop();
            }
            next
        })
    }
}
