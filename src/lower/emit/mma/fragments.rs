//! A lane's share of a tensor-core step: which rows it reads, which
//! reduction indices, its fragments as register pairs (loaded by
//! `loads.rs`), the operand indices of a contraction, and the index
//! arithmetic of tiles (see the parent module for the layout).

use crate::ir::{DType, Op};
use crate::lower::mma::{Mma, CHUNK_K, TILE_K, TILE_M, TILE_N};
use crate::lower::LowerError;

use super::super::builder::storage;
use super::super::Kc;
use super::loads::Pair;
use super::staging::Stage;
use super::Tile;

/// One step of a lane's walk: A's four register pairs for each of the
/// warp's row tiles, B's two for each of its column tiles.
pub(super) struct Step {
    pub a: Vec<Vec<Pair>>,
    pub b: Vec<Vec<Pair>>,
}

/// A's register pairs of a lane in one row tile: those of its rows `g` and
/// `g + 8`, in order along the reduction.
pub(super) type RowPairs = (Vec<Pair>, Vec<Pair>);

/// A lane's operand rows, clamped into range: for each row tile `r`, A's
/// output index of its rows `16 r + g` and `16 r + g + 8`; for each column
/// tile `c`, B's of its column `8 c + g`.
pub(super) struct LaneRows {
    a: Vec<[Vec<String>; 2]>,
    b: Vec<Vec<String>>,
    pub g: String,
    pub t: String,
    /// The warp's first column.
    pub n0: String,
}

/// The reduction indices a lane reads in one iteration.
pub(super) enum LaneKs {
    /// A step: `16 s + 2 t + (0, 1, 8, 9)`, each with its bound check in the
    /// step the reduction ends inside (clamped index, check).
    Step(Vec<(String, Option<String>)>),
    /// A chunk: the first of `32 c + 8 t .. + 8`.
    Chunk(String),
}

impl Kc<'_> {
    pub(super) fn lane_group(&mut self, lane: &str) -> (String, String) {
        let four = self.b.index(4);
        let g = self.b.op(&format!("arith.divui {lane}, {four} : index"));
        let t = self.b.op(&format!("arith.remui {lane}, {four} : index"));
        (g, t)
    }

    pub(super) fn lane_rows(&mut self, tile: &Tile, n0: &str, lane: &str) -> Result<LaneRows, LowerError> {
        let (g, t) = self.lane_group(lane);
        let one = self.b.index(1);
        let m_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.m));
        let n_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.n));
        let mut a = Vec::with_capacity(tile.rows as usize);
        for r in 0..tile.rows {
            let mut pair = [Vec::new(), Vec::new()];
            for (h, slot) in pair.iter_mut().enumerate() {
                let off = self.offset(&g, TILE_M * r + 8 * h as i64);
                let m = self.b.addi(&tile.m0, &off);
                let m = self.b.op(&format!("arith.minui {m}, {m_last} : index"));
                let mi = self.b.delinearize(&m, &tile.m_sizes);
                let zeros: Vec<String> = tile.n_sizes.iter().map(|_| self.b.index(0)).collect();
                *slot = self.tile_index(tile, &mi, &zeros)?;
            }
            a.push(pair);
        }
        let mut b = Vec::with_capacity(tile.cols as usize);
        let (first, last, tiles) = if tile.interleaved {
            // Columns `n0 + C g ..`, the first clamped to `n - C` (n is a
            // multiple of C, see `interleaves`).
            let cols = self.b.index(tile.cols);
            let cg = self.b.muli(&g, &cols);
            let last = self.b.hoist(&format!("arith.subi {}, {cols} : index", tile.n));
            (cg, last, 1)
        } else {
            (g.clone(), n_last, tile.cols)
        };
        for c in 0..tiles {
            let off = self.offset(&first, TILE_N * c);
            let n = self.b.addi(n0, &off);
            let n = self.b.op(&format!("arith.minui {n}, {last} : index"));
            let ni = self.b.delinearize(&n, &tile.n_sizes);
            let zeros: Vec<String> = tile.m_sizes.iter().map(|_| self.b.index(0)).collect();
            b.push(self.tile_index(tile, &zeros, &ni)?);
        }
        Ok(LaneRows { a, b, g, t, n0: n0.to_owned() })
    }

    /// The lane's fragments of iteration `s` of the reduction walk, one
    /// [`Step`] per `mma.sync` step (see the module doc for which elements);
    /// `tail`: the step the reduction ends inside, whose elements past the
    /// end read zeros. With `stage`, A's come from slot `slot` of the staged
    /// tile (already stored, see `staging.rs`).
    pub(super) fn fragments(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        (s, tail): (&str, bool),
        stage: Option<(&Stage, i64)>,
    ) -> Result<Vec<Step>, LowerError> {
        let ks = self.lane_ks(tile, &rows.t, s, tail);
        let (a, b) = match stage {
            Some((stage, slot)) => {
                let b = match tile.staged_b {
                    true => self.staged_b_pairs(mma, tile, rows, slot, stage),
                    false => self.b_fragments(j, mma, tile, rows, &ks)?,
                };
                (self.staged_a_pairs(mma, &rows.g, &rows.t, slot, stage), b)
            }
            None => {
                let a = self.a_fragments(j, mma, tile, rows, &ks)?;
                (a, self.b_fragments(j, mma, tile, rows, &ks)?)
            }
        };
        Ok(steps(&a, &b))
    }

    /// A's register pairs of the lane at reduction indices `ks`: for each
    /// row tile, those of rows `g` and `g + 8`.
    pub(super) fn a_fragments(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        ks: &LaneKs,
    ) -> Result<Vec<RowPairs>, LowerError> {
        let mut a = Vec::with_capacity(rows.a.len());
        for [lo, hi] in &rows.a {
            let lo = self.operand_pairs(j, mma.a, lo, tile, ks, mma.dtype)?;
            let hi = self.operand_pairs(j, mma.a, hi, tile, ks, mma.dtype)?;
            a.push((lo, hi));
        }
        Ok(a)
    }

    /// B's register pairs of the lane at reduction indices `ks`, for each
    /// column tile.
    pub(super) fn b_fragments(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        ks: &LaneKs,
    ) -> Result<Vec<Vec<Pair>>, LowerError> {
        if tile.interleaved {
            let first = rows.b.first().ok_or_else(|| self.unsupported(j, "tensor-core kernel: no columns"))?;
            return self.column_pairs(j, mma, tile, first, ks);
        }
        let mut b = Vec::with_capacity(rows.b.len());
        for col in &rows.b {
            b.push(self.operand_pairs(j, mma.b, col, tile, ks, mma.dtype)?);
        }
        Ok(b)
    }

    /// The reduction indices of the lane (`t`) in iteration `s`, checked
    /// against the reduction's end in the `tail` step.
    pub(super) fn lane_ks(&mut self, tile: &Tile, t: &str, s: &str, tail: bool) -> LaneKs {
        if tile.chunked {
            let (ck, eight) = (self.b.index(CHUNK_K), self.b.index(8));
            let k0 = self.b.muli(s, &ck);
            let t8 = self.b.muli(t, &eight);
            return LaneKs::Chunk(self.b.addi(&k0, &t8));
        }
        let tk = self.b.index(TILE_K);
        let k0 = self.b.muli(s, &tk);
        let two = self.b.index(2);
        let t2 = self.b.muli(t, &two);
        let base = self.b.addi(&k0, &t2);
        let one = self.b.index(1);
        let k_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.k));
        let mut ks = Vec::with_capacity(4);
        for d in [0, 1, 8, 9] {
            let kv = self.offset(&base, d);
            ks.push(if tail {
                let ok = self.b.ult(&kv, &tile.k);
                (self.b.op(&format!("arith.minui {kv}, {k_last} : index")), Some(ok))
            } else {
                (kv, None)
            });
        }
        LaneKs::Step(ks)
    }

    /// The register pairs of operand `p` at output index `out_idx` for the
    /// lane's reduction indices `ks`, in order along the reduction: two (a
    /// step: `k 2t..`, `k 2t+8..`) or four (a chunk).
    fn operand_pairs(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        tile: &Tile,
        ks: &LaneKs,
        dtype: DType,
    ) -> Result<Vec<Pair>, LowerError> {
        let guarded = match ks {
            LaneKs::Chunk(base) => return self.row_pairs(j, p, out_idx, base, tile, dtype),
            LaneKs::Step(guarded) => guarded,
        };
        let mut pairs = Vec::with_capacity(2);
        for at in [0, 2] {
            // Adjacent along the reduction: one 32-bit load where they are
            // adjacent in memory.
            if guarded[at].1.is_none() {
                if let Some(v) = self.vector_load(j, p, out_idx, &guarded[at].0, tile, 2)? {
                    pairs.push(Pair::Packed(v));
                    continue;
                }
            }
            let (k0, ok0) = &guarded[at];
            let (k1, ok1) = &guarded[at + 1];
            let x = self.fragment_element(j, p, out_idx, k0, ok0.as_deref())?;
            let y = self.fragment_element(j, p, out_idx, k1, ok1.as_deref())?;
            pairs.push(Pair::Values(x, y));
        }
        Ok(pairs)
    }

    /// B's register pairs for each of the warp's column tiles when B is
    /// read [`Tile::cols`] columns at a time (see the module doc,
    /// "interleaved columns"): at each of the lane's reduction indices one
    /// load of the lane's columns at output index `first` (zeros past the
    /// reduction's end), then tile `c`'s pair of indices `k, k + 1` is
    /// element `c` of each of their loads.
    fn column_pairs(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        first: &[String],
        ks: &LaneKs,
    ) -> Result<Vec<Vec<Pair>>, LowerError> {
        let guarded = match ks {
            LaneKs::Step(guarded) => guarded.clone(),
            LaneKs::Chunk(base) => (0..8).map(|d| (self.offset(base, d), None)).collect(),
        };
        let along = mma.n.last().and_then(|&a| first.get(a)).cloned().unwrap_or_default();
        let (cols, st) = (tile.cols, storage(mma.dtype));
        let vty = format!("vector<{cols}x{st}>");
        let mut loads = Vec::with_capacity(guarded.len());
        for (k, ok) in &guarded {
            let Some(v) = self.contiguous_load(j, mma.b, (first, k), &along, tile, cols)? else {
                return Err(self.unsupported(j, "tensor-core kernel: B's columns are not adjacent in memory"));
            };
            loads.push(match ok {
                Some(ok) => {
                    let zero = self.b.hoist(&format!("arith.constant dense<0.000000e+00> : {vty}"));
                    self.b.op(&format!("arith.select {ok}, {v}, {zero} : {vty}"))
                }
                None => v,
            });
        }
        Ok((0..cols)
            .map(|c| {
                loads
                    .chunks(2)
                    .map(|kk| {
                        let (x, y) = (&kk[0], &kk[kk.len() - 1]);
                        Pair::Packed(self.b.op(&format!("llvm.shufflevector {x}, {y} [{c}, {}] : {vty}", cols + c)))
                    })
                    .collect()
            })
            .collect())
    }

    /// The output multi-index of this tile's batch with m-group index `mi`
    /// and n-group index `ni`.
    pub(super) fn tile_index(&self, tile: &Tile, mi: &[String], ni: &[String]) -> Result<Vec<String>, LowerError> {
        let mut idx = vec![String::new(); tile.sizes.len()];
        for (axes, values) in tile.axes.iter().zip([tile.batch_idx.as_slice(), mi, ni]) {
            for (&a, v) in axes.iter().zip(values) {
                match idx.get_mut(a) {
                    Some(slot) => *slot = v.clone(),
                    None => {
                        return Err(LowerError::Unsupported {
                            node: self.kernel.to_owned(),
                            message: format!("tensor-core kernel: output axis {a} out of range"),
                        })
                    }
                }
            }
        }
        if idx.iter().any(String::is_empty) {
            return Err(LowerError::Unsupported {
                node: self.kernel.to_owned(),
                message: "tensor-core kernel: an output axis is in no group".into(),
            });
        }
        Ok(idx)
    }

    /// Index of operand `p` of contraction node `j` at output index
    /// `out_idx` and reduction index `k`.
    pub(crate) fn contraction_operand_index(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
    ) -> Result<Vec<String>, LowerError> {
        let node = &self.graph.nodes[j];
        match &node.op {
            Op::Einsum(spec) => {
                let subs = spec.inputs.get(p).ok_or_else(|| self.unsupported(j, "einsum operand"))?;
                let mut env: Vec<(char, String)> = spec.output.iter().copied().zip(out_idx.iter().cloned()).collect();
                // A summed letter of size 1 beside another is read at 0
                // (`operand_index`; see `mma::mma_form`).
                let unit = self.unit_sums(j);
                let summed = || subs.iter().filter(|c| !spec.output.contains(c));
                let reduced = summed().find(|c| !unit.contains(c)).or_else(|| summed().next()).copied();
                if let Some(c) = reduced {
                    env.push((c, k.to_owned()));
                }
                let subs = subs.clone();
                self.operand_index(j, &subs, &env)
            }
            Op::MatMul { transpose_b } => {
                let transpose_b = *transpose_b;
                let v = *node.inputs.get(p).ok_or_else(|| self.unsupported(j, "matmul operand"))?;
                let shape = self.graph.shape_of(v).clone();
                let r = out_idx.len();
                let mut idx = self.matmul_batch_index(&shape, out_idx);
                match (p, transpose_b) {
                    (0, _) => idx.extend([out_idx[r - 2].clone(), k.to_owned()]),
                    (_, true) => idx.extend([out_idx[r - 1].clone(), k.to_owned()]),
                    (_, false) => idx.extend([k.to_owned(), out_idx[r - 1].clone()]),
                }
                Ok(idx)
            }
            _ => Err(self.unsupported(j, "tensor-core kernel of a node that is not a contraction")),
        }
    }

    /// `x + c`.
    pub(super) fn offset(&mut self, x: &str, c: i64) -> String {
        if c == 0 {
            return x.to_owned();
        }
        let c = self.b.index(c);
        self.b.addi(x, &c)
    }

    /// `2 t + c`.
    pub(super) fn k_offset(&mut self, t: &str, c: i64) -> String {
        let two = self.b.index(2);
        let t2 = self.b.muli(t, &two);
        self.offset(&t2, c)
    }

    /// `base + r * cols + c`.
    pub(super) fn tile_offset(&mut self, r: &str, cols: i64, c: &str, base: i64) -> String {
        let cols = self.b.index(cols);
        let rc = self.b.muli(r, &cols);
        let x = self.b.addi(&rc, c);
        self.offset(&x, base)
    }
}

/// The steps of one iteration from A's pairs (per row tile, rows `g` and
/// `g + 8`) and B's (per column tile): pairs `2 q` and `2 q + 1` of each row
/// are step `q`'s: A (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..),
/// (row g+8, k 2t+8..); B (k 2t..), (k 2t+8..).
pub(super) fn steps(a: &[RowPairs], b: &[Vec<Pair>]) -> Vec<Step> {
    let steps = b.first().map_or(0, |p| p.len() / 2);
    (0..steps)
        .map(|q| Step {
            a: a.iter()
                .map(|(lo, hi)| {
                    vec![lo[2 * q].clone(), hi[2 * q].clone(), lo[2 * q + 1].clone(), hi[2 * q + 1].clone()]
                })
                .collect(),
            b: b.iter().map(|p| vec![p[2 * q].clone(), p[2 * q + 1].clone()]).collect(),
        })
        .collect()
}
