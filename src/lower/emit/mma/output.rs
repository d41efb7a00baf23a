//! Where a lane's accumulators go: the split kernel's partials (shared
//! memory on the GPU, scratch on the CPU), their sum in warp order, and the
//! store of one accumulator into the output (see the parent module for the
//! layout).

use crate::lower::mma::{TILE_M, TILE_N, WARPS};
use crate::lower::LowerError;

use super::super::builder::Val;
use super::super::Kc;
use super::Tile;

/// An accumulator's place in the warp's tiles, without the lane's own
/// offsets (`g` rows, `2 t` columns of a tile): `16 r + 8 (i / 2)` rows and
/// `8 c + i % 2` columns for accumulator `i` of tile `(r, c)`; interleaved
/// (see the parent module) `C (i % 2) + c` columns (the lane's offset is
/// then `2 C t`).
pub(super) struct AccPos {
    row: String,
    col: String,
}

impl Kc<'_> {
    /// The place of accumulator `a` (`4 (r C + c) + i`), a constant.
    pub(super) fn acc_position(&mut self, tile: &Tile, a: i64) -> AccPos {
        let (r, c, i) = (a / (4 * tile.cols), (a / 4) % tile.cols, a % 4);
        let col = if tile.interleaved { tile.cols * (i % 2) + c } else { TILE_N * c + i % 2 };
        AccPos { row: self.b.index(TILE_M * r + 8 * (i / 2)), col: self.b.index(col) }
    }

    /// Offset of lane `lane` of warp `w`'s partials (one per accumulator).
    pub(super) fn partial_base(&mut self, tile: &Tile, w: &str, lane: &str) -> String {
        let (lanes, per_lane) = (self.b.index(32), self.b.index(tile.accs()));
        let wl = self.b.muli(w, &lanes);
        let thread = self.b.addi(&wl, lane);
        self.b.muli(&thread, &per_lane)
    }

    /// Output `o` of the block (`0 .. 32 × accumulators`: partial `o` of
    /// each warp) summed in warp order, from the workgroup memory of type
    /// `ty` (GPU) or `scratch` (CPU).
    pub(super) fn sum_partials(
        &mut self,
        tile: &Tile,
        o: &str,
        scratch: Option<&str>,
        ty: &str,
    ) -> Result<String, LowerError> {
        let mut total: Option<String> = None;
        for w in 0..WARPS {
            let off = self.offset(o, w * 32 * tile.accs());
            let p = match scratch {
                Some(ptr) => self.b.load(ptr, &off, crate::ir::DType::F32).ssa,
                None => self.b.op(&format!("memref.load %sh[{off}] : {ty}")),
            };
            total = Some(self.b.add_in_order(total, p));
        }
        total.ok_or_else(|| LowerError::Unsupported { node: self.kernel.to_owned(), message: "no warps".into() })
    }

    /// The lane and the accumulator's place of block output `o` (the
    /// partials' layout: lane `o / A`, accumulator `o % A`, `A` per lane).
    pub(super) fn output_position(&mut self, tile: &Tile, o: &str) -> (String, AccPos) {
        let per_lane = self.b.index(tile.accs());
        let lane = self.b.op(&format!("arith.divui {o}, {per_lane} : index"));
        let a = self.b.op(&format!("arith.remui {o}, {per_lane} : index"));
        let (four, two, cols) = (self.b.index(4), self.b.index(2), self.b.index(tile.cols));
        let tile_at = self.b.op(&format!("arith.divui {a}, {four} : index"));
        let i = self.b.op(&format!("arith.remui {a}, {four} : index"));
        let r = self.b.op(&format!("arith.divui {tile_at}, {cols} : index"));
        let c = self.b.op(&format!("arith.remui {tile_at}, {cols} : index"));
        let half = self.b.op(&format!("arith.divui {i}, {two} : index"));
        let odd = self.b.op(&format!("arith.remui {i}, {two} : index"));
        let (tm, eight, tn) = (self.b.index(TILE_M), self.b.index(8), self.b.index(TILE_N));
        let r16 = self.b.muli(&r, &tm);
        let down = self.b.muli(&half, &eight);
        let row = self.b.addi(&r16, &down);
        let col = if tile.interleaved {
            let cols = self.b.index(tile.cols);
            let spread = self.b.muli(&odd, &cols);
            self.b.addi(&spread, &c)
        } else {
            let c8 = self.b.muli(&c, &tn);
            self.b.addi(&c8, &odd)
        };
        (lane, AccPos { row, col })
    }

    /// Stores the accumulator at `pos` of lane `lane` of the tiles starting
    /// at column `n0`, if it is inside the output (see [`AccPos`]).
    pub(super) fn store_output(
        &mut self,
        tile: &Tile,
        n0: &str,
        lane: &str,
        pos: &AccPos,
        value: &str,
    ) -> Result<(), LowerError> {
        let (g, t) = self.lane_group(lane);
        let two = self.b.index(if tile.interleaved { 2 * tile.cols } else { 2 });
        let r = self.b.addi(&g, &pos.row);
        let t2 = self.b.muli(&t, &two);
        let c = self.b.addi(&t2, &pos.col);
        let m = self.b.addi(&tile.m0, &r);
        let n = self.b.addi(n0, &c);
        let (in_m, in_n) = (self.b.ult(&m, &tile.m), self.b.ult(&n, &tile.n));
        let inside = self.b.op(&format!("arith.andi {in_m}, {in_n} : i1"));
        self.b.open_guard(&inside);
        let mi = self.b.delinearize(&m, &tile.m_sizes);
        let ni = self.b.delinearize(&n, &tile.n_sizes);
        let mut idx = self.tile_index(tile, &mi, &ni)?;
        if let Some(s) = &tile.slice {
            idx.insert(0, s.clone());
        }
        let off = self.b.linearize(&idx, &tile.store_sizes);
        self.b.store(&tile.out_ptr, &off, tile.out_dtype, Val::f32(value.to_owned()));
        self.b.close();
        Ok(())
    }
}
