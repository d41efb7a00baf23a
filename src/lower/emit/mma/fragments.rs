//! A lane's share of a tensor-core step: which rows it reads, its fragments
//! (loaded element by element through views, or as 32-bit pairs from a
//! stored buffer), the operand indices of a contraction, and the index
//! arithmetic of tiles (see the parent module for the layout).

use crate::ir::{DType, Op};
use crate::lower::mma::{Mma, TILE_K};
use crate::lower::LowerError;

use super::super::builder::{storage, Ty};
use super::super::Kc;
use super::Tile;

/// Two elements of a fragment (one 32-bit register): loaded one by one
/// (f32, already rounded to the operand type), or together.
pub(super) enum Pair {
    Values(String, String),
    /// A `vector<2 x bf16/f16>`.
    Packed(String),
}

/// A lane's operand rows: A's output index for its two rows (`g`, `g + 8`)
/// and B's for its column (`g`), clamped into range.
pub(super) struct LaneRows {
    a: [Vec<String>; 2],
    b: Vec<String>,
    t: String,
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
        let mut a = [Vec::new(), Vec::new()];
        for (h, slot) in a.iter_mut().enumerate() {
            let r = self.offset(&g, 8 * h as i64);
            let m = self.b.addi(&tile.m0, &r);
            let m = self.b.op(&format!("arith.minui {m}, {m_last} : index"));
            let mi = self.b.delinearize(&m, &tile.m_sizes);
            let zeros: Vec<String> = tile.n_sizes.iter().map(|_| self.b.index(0)).collect();
            *slot = self.tile_index(tile, &mi, &zeros)?;
        }
        let n = self.b.addi(n0, &g);
        let n = self.b.op(&format!("arith.minui {n}, {n_last} : index"));
        let ni = self.b.delinearize(&n, &tile.n_sizes);
        let zeros: Vec<String> = tile.m_sizes.iter().map(|_| self.b.index(0)).collect();
        let b = self.tile_index(tile, &zeros, &ni)?;
        Ok(LaneRows { a, b, t })
    }

    /// The lane's fragments of reduction step `s` as register pairs: A's
    /// four, B's two (see the module doc for which elements).
    pub(super) fn fragments(
        &mut self,
        j: usize,
        mma: &Mma,
        tile: &Tile,
        rows: &LaneRows,
        s: &str,
    ) -> Result<(Vec<Pair>, Vec<Pair>), LowerError> {
        let tk = self.b.index(TILE_K);
        let k0 = self.b.muli(s, &tk);
        let two = self.b.index(2);
        let t2 = self.b.muli(&rows.t, &two);
        let base = self.b.addi(&k0, &t2);
        // The four reduction indices a lane reads: 2t, 2t+1, 2t+8, 2t+9.
        let ks: Vec<String> = [0, 1, 8, 9].iter().map(|&d| self.offset(&base, d)).collect();
        let one = self.b.index(1);
        let k_last = self.b.hoist(&format!("arith.subi {}, {one} : index", tile.k));
        let mut guarded = Vec::with_capacity(4);
        for kv in &ks {
            guarded.push(if tile.ragged_k {
                let ok = self.b.ult(kv, &tile.k);
                let kc = self.b.op(&format!("arith.minui {kv}, {k_last} : index"));
                (kc, Some(ok))
            } else {
                (kv.clone(), None)
            });
        }
        // An element as f32: a value of the operand type widened (the form
        // reads only bf16 / f16 buffers, see `mma_form`), so packing it
        // back into a register pair is exact.
        let element = |kc: &mut Self, p: usize, out_idx: &[String], at: usize| -> Result<String, LowerError> {
            let (kv, ok) = &guarded[at];
            let idx = kc.contraction_operand_index(j, p, out_idx, kv)?;
            let v = kc.graph.nodes[j].inputs[p];
            let x = kc.load(v, &idx)?;
            let x = kc.b.coerce(x, Ty::F32).ssa;
            Ok(match ok {
                Some(ok) => {
                    let z = kc.b.f32(0.0);
                    kc.b.op(&format!("arith.select {ok}, {x}, {z} : f32"))
                }
                None => x,
            })
        };
        // Elements `at` and `at + 1` (adjacent along the reduction): one
        // 32-bit load where they are adjacent in memory.
        let pair = |kc: &mut Self, p: usize, out_idx: &[String], at: usize| -> Result<Pair, LowerError> {
            if !tile.ragged_k {
                if let Some(v) = kc.packed_load(j, p, out_idx, &guarded[at].0, mma.dtype)? {
                    return Ok(Pair::Packed(v));
                }
            }
            Ok(Pair::Values(element(kc, p, out_idx, at)?, element(kc, p, out_idx, at + 1)?))
        };
        // A: (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..).
        let mut a = Vec::with_capacity(4);
        for (h, at) in [(0, 0), (1, 0), (0, 2), (1, 2)] {
            a.push(pair(self, mma.a, &rows.a[h], at)?);
        }
        let mut b = Vec::with_capacity(2);
        for at in [0, 2] {
            b.push(pair(self, mma.b, &rows.b, at)?);
        }
        Ok((a, b))
    }

    /// Elements `k`, `k + 1` of operand `p` as one `vector<2 x bf16/f16>`
    /// load, when the operand is a stored buffer of that type whose last
    /// axis is the reduction, of even constant length (`k` is even, so the
    /// load is 4-byte aligned); `None` otherwise.
    pub(super) fn packed_load(
        &mut self,
        j: usize,
        p: usize,
        out_idx: &[String],
        k: &str,
        dtype: DType,
    ) -> Result<Option<String>, LowerError> {
        let v = self.graph.nodes[j].inputs[p];
        let Some(buf) = self.stored(v) else { return Ok(None) };
        let b = &self.program.buffers[buf];
        let even = b.shape.last().and_then(|d| d.as_constant()).is_some_and(|d| d % 2 == 0);
        if b.dtype != dtype || !even {
            return Ok(None);
        }
        let idx = self.contraction_operand_index(j, p, out_idx, k)?;
        let Some((last, rest)) = idx.split_last() else { return Ok(None) };
        if last != k || rest.iter().any(|i| i == k) {
            return Ok(None);
        }
        let (ptr, off) = self.buffer_offset(buf, &idx)?;
        let st = storage(dtype);
        let o = self.b.index_to_i64(&off);
        let at = self.b.op(&format!("llvm.getelementptr inbounds {ptr}[{o}] : (!llvm.ptr, i64) -> !llvm.ptr, {st}"));
        Ok(Some(self.b.op(&format!("llvm.load {at} {{alignment = 4 : i64}} : !llvm.ptr -> vector<2x{st}>"))))
    }

    /// A register pair as the `mma.sync` operand: bf16 as `i32`, f16 as
    /// `vector<2xf16>`.
    pub(super) fn pack(&mut self, pair: &Pair, dtype: DType) -> String {
        let st = storage(dtype);
        let v = match pair {
            Pair::Packed(v) => v.clone(),
            Pair::Values(x, y) => {
                let x = self.b.op(&format!("arith.truncf {x} : f32 to {st}"));
                let y = self.b.op(&format!("arith.truncf {y} : f32 to {st}"));
                self.b.op(&format!("vector.from_elements {x}, {y} : vector<2x{st}>"))
            }
        };
        match dtype {
            DType::F16 => v,
            _ => self.b.op(&format!("llvm.bitcast {v} : vector<2x{st}> to i32")),
        }
    }

    /// A register pair's two elements as f32 (the emulation).
    pub(super) fn unpack(&mut self, pair: &Pair, dtype: DType) -> [String; 2] {
        match pair {
            Pair::Values(x, y) => [x.clone(), y.clone()],
            Pair::Packed(v) => {
                let st = storage(dtype);
                [0, 1].map(|i| {
                    let e = self.b.op(&format!("vector.extract {v}[{i}] : {st} from vector<2x{st}>"));
                    self.b.op(&format!("arith.extf {e} : {st} to f32"))
                })
            }
        }
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
                let reduced = subs.iter().find(|c| !spec.output.contains(c)).copied();
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

    /// `ceil(x / d)` (hoisted).
    pub(super) fn ceil_div(&mut self, x: &str, d: i64) -> String {
        let (dm1, dd) = (self.b.index(d - 1), self.b.index(d));
        let up = self.b.hoist(&format!("arith.addi {x}, {dm1} : index"));
        self.b.hoist(&format!("arith.divui {up}, {dd} : index"))
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
