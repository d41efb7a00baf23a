//! Tensor-core contractions: which einsum / matmul kernels the GPU runs
//! with warp-level `mma.sync` (m16n8k16, bf16 or f16 operands, f32
//! accumulation), and how their output splits into a batch of GEMMs.
//!
//! A contraction of two operands, both stored (through views) as bf16 or
//! both as f16, that sums exactly one letter indexed by both, is
//! `out[batch, m, n] = Σ_k A[batch, m, k] · B[batch, n, k]`: its output
//! axes split into **batch** (indexed by both operands, or by neither),
//! **m** (only by A) and **n** (only by B). A is the operand whose own
//! axes span fewer outputs at the compile point (the samples: `b` for a
//! projection `x · Wᵀ`, `b·p·n` for the context einsums of bifurcated
//! attention), B the other (the weights, the shared context cache).
//!
//! It is taken when the n side fills at least a column tile at the compile
//! point ([`MIN_N`]; `bifurc compile --shape`, default b = 32), however few
//! the rows: with one (attention over a per-sample cache, a projection
//! compiled for b = 1) a tile's other 15 rows re-read the first one (the
//! same addresses: L1) and their products are thrown away, which costs
//! little next to what the kernel gains in reading B — 16-byte rows, or
//! the reduction split among warps with several steps' loads in flight —
//! over one thread per output walking its row. A contraction with fewer
//! outputs (the new token's score) stays on CUDA cores. The artifact still
//! runs at every point. Products of bf16 / f16 values are exact in f32, so
//! the result differs from the CUDA-core kernel only by summation order.
//!
//! Launch (see `emit::mma`): blocks of [`WARPS`] warps, each warp computing
//! `rows × cols` tiles of 16 × 8 ([`Mma::rows`], [`Mma::cols`]: A's
//! fragments serve every column tile, B's every row tile); a long constant
//! reduction is split among a block's warps, each working on the same
//! tiles, a short one is not, and one of runtime length is split across
//! blocks (see [`Mma::split_k`], [`Mma::k_splits`]).
//!
//! The warp's tiles are chosen at the compile point: two row tiles when m
//! is over 16 there (B, the weights or the context cache, is then read
//! once per 32 rows instead of once per 16), and for a constant reduction
//! two column tiles when that still leaves [`MIN_BLOCKS`] blocks (A — the
//! samples of a projection, the queries of `q·Kᵀ` — read once per 16
//! columns instead of 8); for one of runtime length two column tiles over
//! more than 64 columns (eight warps then cover `w·V`'s head dim of 128).
//!
//! A constant reduction that is a multiple of [`CHUNK_K`] is walked in
//! chunks of 32 whose elements are permuted among the two steps' fragment
//! slots so that each lane reads 8 *adjacent* elements of each of its rows
//! (one 16-byte load where the operand is stored with the reduction
//! innermost): the sum over the chunk is the same, in another order.

use crate::ir::{shape::numel, DType, Graph, Op, Poly};

use std::collections::BTreeMap;

use super::plan::{coverage, unit_sums};

/// Rows (m) of one output tile.
pub const TILE_M: i64 = 16;
/// Columns (n) of one output tile.
pub const TILE_N: i64 = 8;
/// Reduction elements of one `mma.sync`.
pub const TILE_K: i64 = 16;
/// Warps of a block: each takes every `WARPS`-th step of the reduction.
pub const WARPS: i64 = 8;
/// Least n (columns, the larger side) at the compile point for a
/// tensor-core kernel.
pub const MIN_N: i64 = 8;
/// Longest constant reduction a warp walks alone (see [`Mma::split_k`]).
pub const SHORT_K: i64 = 256;
/// Iterations of a split walk a warp loads together when it computes one
/// tile: their loads are in flight at once instead of one iteration's
/// latency after another's (see [`Mma::unroll`]).
pub const UNROLL: i64 = 4;
/// Fewest blocks at the compile point for which a warp walking a constant
/// reduction takes two column tiles: two per multiprocessor of an H100 /
/// H200 (132).
pub const MIN_BLOCKS: i64 = 256;
/// Blocks at the compile point that a reduction of runtime length is split
/// across ([`Mma::k_splits`]) to reach, about four per multiprocessor.
pub const SPLIT_BLOCKS: i64 = 512;
/// Most steps of 16 a warp walks alone over a reduction of runtime length
/// at the compile point before the reduction is split across more blocks.
pub const MAX_WALK: i64 = 64;
/// Most blocks one reduction is split across.
pub const MAX_SPLITS: i64 = 32;
/// Reduction elements a lane's row covers per iteration of a chunked walk
/// (a constant reduction that is a multiple of this): two steps.
pub const CHUNK_K: i64 = 32;
/// 32-bit words after each row of a staged A tile ([`Mma::stage_pitch`]):
/// with `8 u + 4` words a row, the eight rows one fragment load reads
/// start 4 banks apart modulo 32 for every `u` of 1..4, so its 32 lanes
/// (8 rows x 4 words) hit 32 distinct banks.
pub const STAGE_PAD: i64 = 4;

/// The tensor-core choices a tuning experiment may change (`bifurc compile
/// --tune`): the constants above and the two read patterns, each default
/// the constant's or on. Every setting gives correct code; they differ in
/// speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// [`UNROLL`].
    pub unroll: i64,
    /// [`MIN_BLOCKS`].
    pub min_blocks: i64,
    /// [`SPLIT_BLOCKS`].
    pub split_blocks: i64,
    /// [`MAX_WALK`].
    pub max_walk: i64,
    /// [`MAX_SPLITS`].
    pub max_splits: i64,
    /// Stage A in shared memory where [`Mma::stages_a`] says it applies.
    pub stage: bool,
    /// Interleave column tiles where B's columns are innermost (see
    /// `emit::mma`, "interleaved columns").
    pub interleave: bool,
    /// Two column tiles a warp also over a short constant reduction (the
    /// head dim of `q·Kᵀ`) where [`Tuning::min_blocks`] blocks remain.
    pub wide_short: bool,
    /// Stage B beside a staged A where its columns are innermost and read
    /// in pairs (V of `w·V`): 16-byte loads by the block's threads, each
    /// warp's pairs from shared memory (see `emit::mma`, "staged B"). Off
    /// by default until measured.
    pub stage_b: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            unroll: UNROLL,
            min_blocks: MIN_BLOCKS,
            split_blocks: SPLIT_BLOCKS,
            max_walk: MAX_WALK,
            max_splits: MAX_SPLITS,
            stage: true,
            interleave: true,
            wide_short: true,
            stage_b: false,
        }
    }
}

/// The keys of [`Tuning::parse`], with what each takes.
pub const TUNING_KEYS: &str = "unroll=1..16, min-blocks=N, split-blocks=N, max-walk=N, max-splits=1..1024, \
                               stage=on|off, interleave=on|off, wide-short=on|off, stage-b=on|off";

impl Tuning {
    /// `key=value,...` over the defaults (keys: [`TUNING_KEYS`]); an empty
    /// text is the defaults.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut t = Self::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| format!("`{item}`: expected KEY=VALUE"))?;
            let (key, value) = (key.trim(), value.trim());
            let switch = || match value {
                "on" => Ok(true),
                "off" => Ok(false),
                _ => Err(format!("`{key}`: expected on or off, got `{value}`")),
            };
            let number = |lo: i64, hi: i64| match value.parse::<i64>() {
                Ok(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => Err(format!("`{key}`: expected an integer in {lo}..={hi}, got `{value}`")),
            };
            match key {
                "unroll" => t.unroll = number(1, 16)?,
                "min-blocks" => t.min_blocks = number(1, 1 << 30)?,
                "split-blocks" => t.split_blocks = number(1, 1 << 30)?,
                "max-walk" => t.max_walk = number(1, 1 << 30)?,
                "max-splits" => t.max_splits = number(1, 1024)?,
                "stage" => t.stage = switch()?,
                "interleave" => t.interleave = switch()?,
                "wide-short" => t.wide_short = switch()?,
                "stage-b" => t.stage_b = switch()?,
                _ => return Err(format!("unknown key `{key}` (keys: {TUNING_KEYS})")),
            }
        }
        Ok(t)
    }

    /// The settings that differ from the defaults, as `key=value,...` (what
    /// [`Tuning::parse`] reads back); empty for the defaults.
    pub fn describe(&self) -> String {
        let d = Self::default();
        let on = |b: bool| if b { "on" } else { "off" };
        let mut parts = Vec::new();
        for (key, v, dv) in [
            ("unroll", self.unroll, d.unroll),
            ("min-blocks", self.min_blocks, d.min_blocks),
            ("split-blocks", self.split_blocks, d.split_blocks),
            ("max-walk", self.max_walk, d.max_walk),
            ("max-splits", self.max_splits, d.max_splits),
        ] {
            if v != dv {
                parts.push(format!("{key}={v}"));
            }
        }
        for (key, v, dv) in [
            ("stage", self.stage, d.stage),
            ("interleave", self.interleave, d.interleave),
            ("wide-short", self.wide_short, d.wide_short),
            ("stage-b", self.stage_b, d.stage_b),
        ] {
            if v != dv {
                parts.push(format!("{key}={}", on(v)));
            }
        }
        parts.join(",")
    }
}

/// A contraction run on tensor cores (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Mma {
    /// Position of A (the rows operand) among the node's inputs.
    pub a: usize,
    /// Position of B (the columns operand).
    pub b: usize,
    /// Output axes of each group, in output order.
    pub batch: Vec<usize>,
    pub m: Vec<usize>,
    pub n: Vec<usize>,
    /// Elements of each group (runtime dims only) and the reduction length.
    pub batch_size: Poly,
    pub m_size: Poly,
    pub n_size: Poly,
    pub k_size: Poly,
    /// The operands' element type: bf16 or f16.
    pub dtype: DType,
    /// How a block's warps share the work. Split (a constant reduction
    /// longer than [`SHORT_K`]: `d_model`): the block is one warp's tiles,
    /// its warps take every [`WARPS`]-th step of the reduction and add
    /// their partials in shared memory. Not split (a short constant
    /// reduction, the head dim of `q·Kᵀ`; or one of runtime length, `m_c`,
    /// `m_d` of `w·V`): the block is eight warps' tiles side by side along
    /// n, each warp's over the block's part of the reduction (see
    /// [`Mma::k_splits`]), stored from registers.
    pub split_k: bool,
    /// Blocks the reduction is split across (not split in-block only):
    /// block `s` of `S` walks steps `s·⌈steps/S⌉ ..` of it; with `S > 1`
    /// the kernel writes its partial sums to a workspace `[S, ...out]` of
    /// f32 and a second kernel (`combine`) adds them in order. Chosen at
    /// the compile point for a reduction of runtime length: enough blocks
    /// ([`SPLIT_BLOCKS`]) and short walks ([`MAX_WALK`]), at most
    /// [`MAX_SPLITS`]. Then a block covers all of n for attention's `w·V`
    /// (128 columns), so the probabilities are read once per block, not
    /// once per 16 columns.
    pub k_splits: i64,
    /// Row tiles (16 rows each) of a warp: 1 or 2.
    pub rows: i64,
    /// Column tiles (8 columns each) of a warp: 1 or 2.
    pub cols: i64,
    /// The settings it was chosen with.
    pub tuning: Tuning,
}

impl Mma {
    /// Rows of a block's output.
    pub fn block_m(&self) -> i64 {
        TILE_M * self.rows
    }

    /// Columns of a block's output: a warp's (split) or eight warps' side
    /// by side.
    pub fn block_n(&self) -> i64 {
        TILE_N * self.cols * if self.split_k { 1 } else { WARPS }
    }

    /// Iterations of the reduction walk a warp loads together: [`UNROLL`]
    /// for one tile, fewer for more (about as many loads in flight, not
    /// more registers), and no more than a short constant walk has (the
    /// head dim of `q·Kᵀ`: 2 of its 4 chunks at a time for 2 x 1 tiles).
    pub fn unroll(&self) -> i64 {
        let u = (2 * self.tuning.unroll / (self.rows + self.cols)).max(1);
        match self.k_size.as_constant() {
            Some(k) if !self.split_k => {
                let iterations = if k % CHUNK_K == 0 { k / CHUNK_K } else { super::ceil_div(k, TILE_K) };
                u.min(iterations.max(1))
            }
            _ => u,
        }
    }

    /// Whether the reduction is walked in chunks of [`CHUNK_K`] (a
    /// constant multiple of it), else in steps of 16.
    pub fn chunked(&self) -> bool {
        self.k_size.as_constant().is_some_and(|k| k % CHUNK_K == 0)
    }

    /// Whether a block's warps share A through shared memory ("staged A",
    /// see `emit::mma`): a walk that is not split in-block, in steps of 16
    /// (a reduction of runtime length, `w·V`'s `m_c` and `m_d`, or a ragged
    /// constant one). There the block's eight warps, side by side along n,
    /// all read the same rows of A, each fragment load 8 rows apart (8
    /// sectors for 64 bytes); staged, the block reads them once, a warp's
    /// 32 lanes along a row, and each warp's fragments come from shared
    /// memory in 32-bit words.
    pub fn stages_a(&self) -> bool {
        self.tuning.stage && !self.split_k && !self.chunked()
    }

    /// 32-bit words of a row of the staged A tile: 8 (16 elements) for
    /// each step loaded together, then [`STAGE_PAD`].
    pub fn stage_pitch(&self) -> i64 {
        8 * self.unroll() + STAGE_PAD
    }

    /// 32-bit words of the staged A tile in shared memory: the block's
    /// rows ([`Mma::block_m`]) of [`Mma::stage_pitch`] words.
    pub fn stage_words(&self) -> i64 {
        self.block_m() * self.stage_pitch()
    }

    /// 32-bit words of a row (one reduction index) of a staged B tile: the
    /// block's columns in pairs, then 4 more, so that the 4 rows one
    /// fragment load reads (`2 t` or `2 t + 1`, 8 words each) start 8 banks
    /// apart modulo 32.
    pub fn stage_b_pitch(&self) -> i64 {
        self.block_n() / 2 + 4
    }

    /// 32-bit words of the staged B tile: 16 rows for each step loaded
    /// together.
    pub fn stage_b_words(&self) -> i64 {
        TILE_K * self.unroll() * self.stage_b_pitch()
    }

    /// f32 partials of a split block in shared memory: four per tile per
    /// lane per warp.
    pub fn partials(&self) -> i64 {
        32 * WARPS * 4 * self.rows * self.cols
    }

    /// Blocks: `ceil(m / block_m) * ceil(n / block_n) * batch * k_splits`,
    /// as a manifest size expression (an integer when every part is
    /// constant).
    pub fn tiles(&self) -> String {
        let mut coeff = self.k_splits;
        let mut parts = Vec::new();
        for (p, d) in [(&self.batch_size, 1), (&self.m_size, self.block_m()), (&self.n_size, self.block_n())] {
            match p.as_constant() {
                Some(c) => coeff = coeff.saturating_mul((c + d - 1).div_euclid(d)),
                None if d == 1 => parts.push(format!("({p})")),
                None => parts.push(format!("ceil(({p})/{d})")),
            }
        }
        if coeff != 1 || parts.is_empty() {
            parts.insert(0, coeff.to_string());
        }
        parts.join("*")
    }
}

/// The tensor-core form of contraction node `j` whose kernel reads buffers
/// of `dtypes` (through views), if it has one at `point` (see the module
/// doc).
pub(crate) fn mma_form(
    graph: &Graph,
    j: usize,
    dtypes: &[DType],
    (point, tuning): (&BTreeMap<String, i64>, &Tuning),
) -> Option<Mma> {
    let dtype = *dtypes.first()?;
    if !matches!(dtype, DType::BF16 | DType::F16) || dtypes.iter().any(|&d| d != dtype) {
        return None;
    }
    let node = graph.nodes.get(j)?;
    let k_size = match (&node.op, node.inputs.as_slice()) {
        (Op::MatMul { .. }, [x, _]) => graph.shape_of(*x).last()?.clone(),
        (Op::Einsum(spec), [x, _]) if spec.inputs.len() == 2 => {
            // A summed letter of size 1 beside another (multi-query
            // attention's one KV head) is read at 0, not reduced (see
            // `Kc::operand_index`); alone (the new token's `w · v`), it is
            // the reduction, of length 1.
            let unit = unit_sums(graph, spec, &node.inputs);
            let mut reduced: Vec<char> =
                spec.inputs.iter().flatten().copied().filter(|c| !spec.output.contains(c)).collect();
            reduced.sort_unstable();
            reduced.dedup();
            if reduced.iter().any(|c| !unit.contains(c)) {
                reduced.retain(|c| !unit.contains(c));
            }
            let [c] = reduced.as_slice() else { return None };
            let once = |subs: &[char]| subs.iter().filter(|s| *s == c).count() == 1;
            if !spec.inputs.iter().all(|subs| once(subs)) {
                return None;
            }
            let at = spec.inputs[0].iter().position(|s| s == c)?;
            graph.shape_of(*x).get(at)?.clone()
        }
        _ => return None,
    };
    let covered = coverage(graph, j)?;
    let [(_, c0), (_, c1)] = covered.as_slice() else { return None };
    let rank = node.shape.len();
    let group = |f: &dyn Fn(usize) -> bool| -> Vec<usize> { (0..rank).filter(|&a| f(a)).collect() };
    let only0 = group(&|a| c0[a] && !c1[a]);
    let only1 = group(&|a| c1[a] && !c0[a]);
    let batch = group(&|a| c0[a] == c1[a]);
    let size = |axes: &[usize]| -> Option<Poly> {
        let shape: Vec<Poly> = axes.iter().map(|&a| node.shape[a].clone()).collect();
        numel(&graph.dims, &shape).ok()
    };
    let at_point = |p: &Poly| graph.dims.eval(p, point).ok();
    let (s0, s1) = (size(&only0)?, size(&only1)?);
    let (a, b, m, n, m_size, n_size) =
        if at_point(&s1)? < at_point(&s0)? { (1, 0, only1, only0, s1, s0) } else { (0, 1, only0, only1, s0, s1) };
    if at_point(&n_size)? < MIN_N {
        return None;
    }
    let k_size = graph.dims.normalize(&k_size).ok()?;
    let runtime_k = k_size.as_constant().is_none();
    let split_k = k_size.as_constant().is_some_and(|k| k > SHORT_K);
    let batch_size = size(&batch)?;
    let mut form = Mma {
        split_k,
        a,
        b,
        batch_size,
        batch,
        m,
        n,
        m_size,
        n_size,
        k_size,
        dtype,
        rows: 1,
        cols: 1,
        k_splits: 1,
        tuning: *tuning,
    };
    if at_point(&form.m_size)? > TILE_M {
        form.rows = 2;
    }
    // None past i64 (sizes no GPU holds): no tensor-core form.
    let ceil = |p: &Poly, d: i64| at_point(p).and_then(|x| x.checked_add(d - 1)).map(|x| x.div_euclid(d));
    let blocks = |f: &Mma| -> Option<i64> {
        ceil(&f.batch_size, 1)?.checked_mul(ceil(&f.m_size, f.block_m())?)?.checked_mul(ceil(&f.n_size, f.block_n())?)
    };
    if split_k || (!runtime_k && tuning.wide_short) {
        let wide = Mma { cols: 2, ..form.clone() };
        if blocks(&wide)? >= tuning.min_blocks {
            form = wide;
        }
    }
    if runtime_k {
        // Eight warps side by side cover 128 columns with two tiles each.
        if at_point(&form.n_size)? > TILE_N * WARPS {
            form.cols = 2;
        }
        // Enough splits for short walks and for enough blocks, at most one
        // per step.
        let div_up = |x: i64, d: i64| (x + d - 1).div_euclid(d.max(1));
        let steps = ceil(&form.k_size, TILE_K)?;
        let want = div_up(steps, tuning.max_walk).max(div_up(tuning.split_blocks, blocks(&form)?));
        form.k_splits = want.min(tuning.max_splits).min(steps).max(1);
    }
    Some(form)
}

#[cfg(test)]
mod tests {
    use super::{STAGE_PAD, UNROLL};
    use crate::lower::{plan, plan_with};

    fn graph(x_dtype: &str, d: i64, rows: &str) -> crate::ir::Graph {
        graph_out(x_dtype, d, rows, 2048)
    }

    fn graph_out(x_dtype: &str, d: i64, rows: &str, out: i64) -> crate::ir::Graph {
        let text = format!(
            r#"{{"format": "bifurc-graph/1", "dims": {{"runtime": ["b"], "constants": {{"d": {d}}}}},
              "inputs": [{{"name": "x", "role": "activation", "shape": [{rows}, 1, "d"], "dtype": "{x_dtype}"}},
                         {{"name": "w", "role": "weight", "shape": [{out}, "d"], "dtype": "bf16"}}],
              "nodes": [{{"id": "p", "op": "matmul", "inputs": ["x", "w"], "attrs": {{"transpose_b": true}}}}],
              "outputs": [{{"name": "p", "node": "p"}}]}}"#
        );
        crate::import::parse(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `x [b, 1, d] · Wᵀ` (W [2048, d]) in bf16: the samples are A's rows; a
    /// reduction over 1024 is split among a block's warps (a block per
    /// warp's tiles), one over 64 is not (a block per eight warps' tiles);
    /// a warp takes two row tiles at b = 32, one at b = 16, and two column
    /// tiles in a split walk with 256 blocks to spare (W [8192, d]); f32 or
    /// mixed operands, or fewer than 8 outputs on the larger side, stay on
    /// CUDA cores.
    #[test]
    fn which_contractions_use_tensor_cores() {
        let form = |g: &crate::ir::Graph| plan(g).unwrap_or_else(|e| panic!("{e}")).kernels[0].mma.clone();
        let long = form(&graph("bf16", 1024, r#""b""#)).expect("tensor cores");
        assert_eq!((long.a, long.b, long.split_k, long.rows, long.cols), (0, 1, true, 2, 1));
        assert_eq!((long.m.as_slice(), long.n.as_slice(), long.batch.as_slice()), (&[0, 1][..], &[2][..], &[][..]));
        assert_eq!((long.tiles(), long.unroll(), long.partials()), ("256*ceil((b)/32)".to_string(), 2, 2048));
        let wide = form(&graph_out("bf16", 1024, r#""b""#, 8192)).expect("tensor cores");
        assert_eq!((wide.rows, wide.cols, wide.tiles(), wide.unroll()), (2, 2, "512*ceil((b)/32)".to_string(), 2));
        let short = form(&graph("bf16", 64, r#""b""#)).expect("tensor cores");
        assert!(!short.split_k);
        assert_eq!((short.tiles(), short.unroll()), ("32*ceil((b)/32)".to_string(), 2), "2 chunks of 64");
        assert_eq!(form(&graph("f32", 64, r#""b""#)), None, "mixed operands");
        let few = form(&graph("bf16", 64, "4")).expect("4 rows: tensor cores all the same");
        assert_eq!((few.rows, few.cols, few.tiles()), (1, 1, "32".to_string()));
        assert_eq!(form(&graph_out("bf16", 64, "4", 4)), None, "4 x 4 outputs");
        let g = graph("bf16", 64, "40");
        assert_eq!(form(&g).map(|m| m.tiles()), Some("64".to_string()), "ceil(40/32) * 2048/64");
        let p = plan(&g).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.kernels[0].gpu_threads(256).is_err(), "launched by tiles");
        // The choice is made at the point given: 4 outputs are too few.
        let g = graph("bf16", 1024, r#""b""#);
        let at = |b: i64| std::collections::BTreeMap::from([("b".to_string(), b)]);
        let planned = |b| plan_with(&g, Some(&at(b))).unwrap_or_else(|e| panic!("{e}")).kernels[0].mma.is_some();
        assert!(planned(1));
        let g4 = graph_out("bf16", 1024, r#""b""#, 4);
        let planned4 = |b| plan_with(&g4, Some(&at(b))).unwrap_or_else(|e| panic!("{e}")).kernels[0].mma.is_some();
        assert!(planned4(8) && !planned4(4), "the larger side must fill a column tile");
        let at16 = plan_with(&g, Some(&at(16))).unwrap_or_else(|e| panic!("{e}")).kernels[0].mma.clone();
        assert_eq!(at16.map(|m| (m.rows, m.cols, m.unroll())), Some((1, 1, UNROLL)), "one row tile at b = 16");
        assert!(plan_with(&g, None).unwrap_or_else(|e| panic!("{e}")).kernels[0].mma.is_none());
    }

    /// `--tune`: settings over the defaults, read back from their
    /// description; unknown keys, bad values and missing `=` named.
    #[test]
    fn tuning_parses_and_describes() {
        use super::Tuning;
        assert_eq!(Tuning::parse(""), Ok(Tuning::default()));
        let t = Tuning::parse(" unroll=2, stage=off,max-splits=8 ,interleave=on,wide-short=off")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.unroll, t.stage, t.max_splits, t.interleave, t.wide_short), (2, false, 8, true, false));
        assert_eq!(t.describe(), "unroll=2,max-splits=8,stage=off,wide-short=off");
        assert_eq!(Tuning::parse(&t.describe()), Ok(t));
        assert_eq!(Tuning::default().describe(), "");
        assert_eq!(Tuning::parse("stage-b=on").map(|t| (t.stage_b, t.describe())), Ok((true, "stage-b=on".into())));
        for (bad, says) in [
            ("unrol=2", "unknown key `unrol`"),
            ("unroll=0", "`unroll`: expected an integer in 1..=16, got `0`"),
            ("stage=no", "`stage`: expected on or off, got `no`"),
            ("stage", "`stage`: expected KEY=VALUE"),
        ] {
            let e = Tuning::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// A staged fragment load (lane `(g, t)` reads word `t` (+ 4) of row
    /// `g` (+ 8) of a slot) hits 32 distinct banks at every pitch a walk
    /// can have (1..4 steps loaded together); without the pad it would not.
    #[test]
    fn staged_fragment_loads_hit_distinct_banks() {
        let banks = |pitch: i64| {
            let mut hit: Vec<i64> = (0..32).map(|l| ((l / 4) * pitch + l % 4) % 32).collect();
            hit.sort_unstable();
            hit.dedup();
            hit.len()
        };
        for u in 1..=4 {
            assert_eq!(banks(8 * u + STAGE_PAD), 32, "{u} steps");
        }
        assert!(banks(8 * 2) < 32 && banks(8 * 4) < 32, "unpadded rows share banks");
        // Staged B: lane (g, t) reads word g (of its warp's 8) of row 2 t or
        // 2 t + 1, at a pitch of 64 + 4 words (128 columns).
        let b_banks = |pitch: i64, odd: i64| {
            let mut hit: Vec<i64> = (0..32).map(|l| ((2 * (l % 4) + odd) * pitch + l / 4) % 32).collect();
            hit.sort_unstable();
            hit.dedup();
            hit.len()
        };
        assert_eq!((b_banks(68, 0), b_banks(68, 1)), (32, 32));
        assert!(b_banks(64, 0) < 32 && b_banks(72, 0) < 32, "other pitches share banks");
    }
}
