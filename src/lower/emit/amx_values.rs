//! The bf16 context `w · V` on AMX tiles.
//!
//! The context einsum `..c..y,cyz->..c..z` of bifurcated attention (the
//! probabilities of one head `c`'s rows against the context cache
//! `V [g, m_c, k]`) in bf16, the head a multiple of 64: an item is a head
//! and a tile of 16 of its rows; for each 64 of the head's outputs it
//! walks the context in blocks of 32 positions, packing the rows' 32
//! probabilities (`[16][32]`, a stack slot) and the block of V in the
//! layout `tdpbf16ps` reads its right operand in (`[16][64][2]`: rows
//! `2i` and `2i + 1` interleaved, one `vector.shuffle` per 16 outputs),
//! into four 16 × 16 f32 accumulator tiles carried across the blocks.
//! Positions past the last whole block are added one by one; the tiles go
//! to the output through a slot, each row's outputs rounded as stored.
//!
//! Every tile has 16 rows (the slot's rows past the item's are never
//! stored): with constant shapes every tile configuration LLVM loads is
//! valid (see `amx_scores`).
//!
//! Alternated in one process with the FMA path (`vectors`, `chunks`), 16
//! heads of 64 at m_c = 8192, one thread, medians of 15: b = 32 4.6-5.6 ->
//! 1.7-2.7 ms, b = 64 8.2-10.1 -> 2.6-2.9, b = 16 2.4-3.2 -> 0.9-1.7; 4 KV
//! heads of 4 rows each a sample, b = 32: 3.7 -> 1.0.

use crate::ir::{DType, Op, Poly, Value};
use crate::lower::LowerError;

use super::amx::{HeadSum, TILE};
use super::bodies::Out;
use super::builder::{Ty, Val};
use super::Kc;

/// Positions of a block: 16 pairs, a tile's rows of V.
const BLOCK: i64 = 32;
/// Outputs of the four accumulator tiles.
const OUTPUTS: i64 = 64;

/// The probabilities of a context `w · V` (see [`Kc::value_rows`]).
pub(super) struct ValueRows {
    /// Their buffer (its rows the output's), each row `row` long, the
    /// probabilities from `start` in it.
    pub p: usize,
    pub row: Poly,
    pub start: Poly,
    /// The context's length (the sum's), normalized like `row` and `start`.
    pub len: Poly,
}

/// The sizes a context `w · V` kernel walks, hoisted (see
/// [`Kc::value_sizes`]).
pub(super) struct ValueSizes {
    /// The output's leading sizes, and its heads among them.
    pub lead: Vec<String>,
    pub heads: String,
    /// The rows of one head, the context's length, and each row of
    /// probabilities' length and where the probabilities start in it.
    pub rows: String,
    pub positions: String,
    pub row_len: String,
    pub start: String,
}

/// A context `w · V` that runs on AMX tiles (see the module docs).
pub(super) struct AmxValues {
    /// The probabilities.
    rows: ValueRows,
    /// The context cache's buffer `[g, m_c, k]` (bf16; maybe pitched).
    v: usize,
    /// The head's axis among the output's.
    head: usize,
    /// The head's length `k`, a multiple of 64.
    width: i64,
}

impl Kc<'_> {
    /// Node `j` as an [`AmxValues`] contraction (where AMX is on, see
    /// `Kc::amx_kernel`): the CPU einsum
    /// of bf16 probabilities `w` (`[.., m]`, dense through order-keeping
    /// views, see `amx::dense_source`) and a stored bf16 `V [g, m, k]`
    /// (letters `c y z`) into `w`'s leading axes and `k` (the output's
    /// last), `k` a constant multiple of 64.
    pub(super) fn amx_values(&self, j: usize) -> Option<AmxValues> {
        let h = self.head_sum(j, DType::BF16).filter(|h| h.sum_first && h.last > 0 && h.last % OUTPUTS == 0)?;
        let rows = self.value_rows(j, &h, DType::BF16)?;
        Some(AmxValues { rows, v: h.buffer, head: h.head, width: h.last })
    }

    /// Where the probabilities of context `w · V` `h` (node `j`, its rows
    /// and cache of `dtype`) are: their own dense rows, or a slice of
    /// each row of a dense buffer, the rows the output's.
    pub(super) fn value_rows(&self, j: usize, h: &HeadSum, dtype: DType) -> Option<ValueRows> {
        let (pv, lead) = (h.rows, h.lead);
        // The probabilities' rows: `w`'s own, or those of a slice of each
        // (the context's part of the softmax's rows, when the softmax has
        // a buffer of its own).
        // (A slice of a softmax planned in place has its part's buffer.)
        let (whole_rows, start) = match pv {
            Value::Node(s) if self.dense_in(pv, dtype).is_none() => {
                match (&self.graph.nodes[s].op, self.graph.nodes[s].inputs.as_slice()) {
                    (Op::Slice { axis, start, .. }, &[of]) if *axis == lead => (of, start.clone()),
                    _ => (pv, Poly::zero()),
                }
            }
            _ => (pv, Poly::zero()),
        };
        let row = self.graph.shape_of(whole_rows).last()?.clone();
        let p = self.dense_in(whole_rows, dtype)?;
        let (p_shape, y_shape) = (self.graph.shape_of(pv), self.graph.shape_of(Value::Node(j)));
        let rows_kept = self.graph.shape_of(whole_rows).len() == p_shape.len()
            && self.graph.dims.same_shape(&self.graph.shape_of(whole_rows)[..lead], &p_shape[..lead]);
        let shapes_ok = rows_kept
            && p_shape.len() == lead + 1
            && self.graph.dims.same_shape(&p_shape[..lead], &y_shape[..lead])
            && p_shape.last().is_some_and(|m| self.graph.dims.same(m, &self.graph.shape_of(h.cache)[1]));
        let norm = |x: &Poly| self.graph.dims.normalize(x).ok();
        let (row, start, len) = (norm(&row)?, norm(&start)?, norm(p_shape.last()?)?);
        shapes_ok.then_some(ValueRows { p, row, start, len })
    }

    /// The sizes of a context `w · V` writing `out`, its probabilities
    /// `p`, its head the output's axis `head`.
    pub(super) fn value_sizes(&mut self, out: &Out, p: &ValueRows, head: usize) -> Result<ValueSizes, LowerError> {
        let lead = out.sizes[..out.sizes.len() - 1].to_vec();
        let heads = lead[head].clone();
        let positions = self.b.size(&p.len)?;
        let (row_len, start) = (self.b.size(&p.row)?, self.b.size(&p.start)?);
        let rows = self.head_rows(&lead, head);
        Ok(ValueSizes { lead, heads, rows, positions, row_len, start })
    }

    /// The body of [`AmxValues`] contraction `t` (see the module docs).
    pub(super) fn amx_values_body(
        &mut self,
        out: &Out,
        t: &AmxValues,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        // The context's length, and where each row of probabilities is.
        let ValueSizes { lead, heads, rows, positions, row_len, start } = self.value_sizes(out, &t.rows, t.head)?;
        let sixteen = self.b.index(16);
        let tiles = self.ceil_div(&rows, 16);
        let item = self.part_range(&[heads.clone(), tiles.clone()]);
        self.partition = super::Partition::Done;
        *opened += 1;
        let at = self.b.delinearize(&item, &[heads, tiles]);
        let (c, tile) = (at[0].clone(), at[1].clone());
        let r0 = self.b.muli(&tile, &sixteen);
        let left = self.b.subi(&rows, &r0);
        let mt = self.b.op(&format!("arith.minui {left}, {sixteen} : index"));

        let (p_slot, v_slot, c_slot) = (
            self.b.stack_f32("amx_p", (16 * BLOCK / 2) as usize, None),
            self.b.stack_f32("amx_v", (BLOCK * OUTPUTS / 2) as usize, None),
            self.b.stack_f32("amx_c", (16 * OUTPUTS) as usize, None),
        );
        // Each row's probabilities' start at `r`, its outputs' at `16 + r`.
        let offs = self.offsets_slot(32);
        let p_ptr = self.ptr(t.rows.p)?;
        let width = self.b.index(t.width);
        // Where each row's probabilities and outputs start.
        let rr = self.b.open_loop(&mt);
        let row = self.b.addi(&r0, &rr);
        let flat = self.head_row(&lead, t.head, &c, &row);
        let p_off = self.b.muli(&flat, &row_len);
        let p_off = self.b.addi(&p_off, &start);
        let o_off = self.b.muli(&flat, &width);
        let sixteen_i = self.b.index(16);
        let rr2 = self.b.addi(&rr, &sixteen_i);
        self.note_offset(&offs, &rr, &p_off);
        self.note_offset(&offs, &rr2, &o_off);
        self.b.close();
        let row_start = |kc: &mut Self, r: &str, which: i64| -> String {
            let shift = kc.b.index(which);
            let at = kc.b.addi(r, &shift);
            kc.noted_offset(&offs, &at)
        };

        let full = self.tile_rows();
        let (p_stride, v_stride, c_stride) = (self.b.i64(64), self.b.i64(4 * OUTPUTS), self.b.i64(4 * OUTPUTS));
        let block = self.b.index(BLOCK);
        let blocks = self.b.hoist(&format!("arith.divui {positions}, {block} : index"));
        let one = self.b.index(1);
        let groups = self.b.index(t.width / OUTPUTS);
        let e_group = self.b.open_loop(&groups);
        let outputs = self.b.index(OUTPUTS);
        let e0 = self.b.muli(&e_group, &outputs);
        let zeros: Vec<String> = (0..4).map(|_| self.tile_zero(&full)).collect();
        let (sums, blk, accs) = self.b.open_for_typed(&blocks, &one, &zeros, TILE);
        let j0 = self.b.muli(&blk, &block);
        // The rows' 32 probabilities of the block.
        let rr = self.b.open_loop(&mt);
        let start = row_start(self, &rr, 0);
        let src = self.b.addi(&start, &j0);
        let sp = self.b.element_ptr(&p_ptr, &src, "bf16");
        let dst = self.b.muli(&rr, &block);
        let dp = self.b.element_ptr(&p_slot, &dst, "bf16");
        let x = self.b.op(&format!("llvm.load {sp} {{alignment = 2 : i64}} : !llvm.ptr -> vector<16xi32>"));
        self.b.line(&format!("llvm.store {x}, {dp} {{alignment = 64 : i64}} : vector<16xi32>, !llvm.ptr"));
        self.b.close();
        // The block of V's 64 outputs in pairs of rows: [16][64][2].
        let lo: Vec<String> = (0..16).flat_map(|i| [i, i + 32]).map(|i| i.to_string()).collect();
        let hi: Vec<String> = (16..32).flat_map(|i| [i, i + 32]).map(|i| i.to_string()).collect();
        let (lo, hi) = (lo.join(", "), hi.join(", "));
        for pair in 0..BLOCK / 2 {
            for half in 0..2 {
                let mut two = Vec::with_capacity(2);
                for k in 0..2 {
                    let jj = self.b.index(2 * pair + k);
                    let pos = self.b.addi(&j0, &jj);
                    let shift = self.b.index(32 * half);
                    let e = self.b.addi(&e0, &shift);
                    let (ptr, off) = self.buffer_offset(t.v, &[c.clone(), pos, e])?;
                    let p = self.b.element_ptr(&ptr, &off, "bf16");
                    two.push(
                        self.b.op(&format!("llvm.load {p} {{alignment = 2 : i64}} : !llvm.ptr -> vector<32xbf16>")),
                    );
                }
                for (q, mask) in [(0, &lo), (1, &hi)] {
                    let v = self.b.op(&format!(
                        "vector.shuffle {}, {} [{mask}] : vector<32xbf16>, vector<32xbf16>",
                        two[0], two[1]
                    ));
                    // Outputs 32·half + 16·q .. + 16 of pair row `pair`.
                    let off = self.b.index(pair * 2 * OUTPUTS + 2 * (32 * half + 16 * q));
                    let dp = self.b.element_ptr(&v_slot, &off, "bf16");
                    self.b.line(&format!("llvm.store {v}, {dp} {{alignment = 64 : i64}} : vector<32xbf16>, !llvm.ptr"));
                }
            }
        }
        let a = self.tile_load(&full, &p_slot, &p_stride);
        let mut nexts = Vec::with_capacity(4);
        for (i, acc) in accs.iter().enumerate() {
            let off = self.b.index(32 * i as i64);
            let bp = self.b.element_ptr(&v_slot, &off, "bf16");
            let b = self.tile_load(&full, &bp, &v_stride);
            nexts.push(self.tile_dot(&full, acc, &a, &b));
        }
        self.b.close_for_typed(&nexts, TILE);
        for (i, sum) in sums.iter().enumerate() {
            let off = self.b.index(16 * i as i64);
            let cp = self.b.element_ptr(&c_slot, &off, "f32");
            self.tile_store(&full, &cp, &c_stride, sum);
        }
        // Positions past the last whole block, added one by one, then the
        // rows stored.
        let tail = self.b.muli(&blocks, &block);
        let rr = self.b.open_loop(&mt);
        let p_start = row_start(self, &rr, 0);
        let o_start = row_start(self, &rr, 16);
        let c_row = self.b.muli(&rr, &outputs);
        let pos = self.b.open_loop_from(&tail, &positions, &one);
        let at = self.b.addi(&p_start, &pos);
        let w = self.b.load(&p_ptr, &at, DType::BF16).ssa;
        let e = self.b.open_loop(&outputs);
        let ce = self.b.addi(&c_row, &e);
        let acc = self.b.load(&c_slot, &ce, DType::F32).ssa;
        let ev = self.b.addi(&e0, &e);
        let (ptr, off) = self.buffer_offset(t.v, &[c.clone(), pos.clone(), ev])?;
        let x = self.b.load(&ptr, &off, DType::BF16).ssa;
        let next = self.b.op(&format!("math.fma {w}, {x}, {acc} : f32"));
        self.b.store(&c_slot, &ce, DType::F32, Val { ssa: next, ty: Ty::F32 });
        self.b.close();
        self.b.close();
        for i in 0..OUTPUTS / 16 {
            let shift = self.b.index(16 * i);
            let src = self.b.addi(&c_row, &shift);
            let v = self.b.load_vector(&c_slot, &src, 16, DType::F32);
            let dst = self.b.addi(&o_start, &e0);
            let dst = self.b.addi(&dst, &shift);
            self.b.store_vector(&out.ptr, &dst, &v, 16, out.dtype);
        }
        self.b.close();
        // The loop over groups of 64 outputs.
        self.b.close();
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use crate::lower::emit::testing::{check_parts, cpu_step_amx, point};

    /// A bf16 context `w · V`, multi-head (`bhm,hmk->bhk`) and
    /// grouped-query (`bgpm,gmk->bgpk`), heads of 64 and 128 (two groups of
    /// outputs), the probabilities their own rows or a slice of longer
    /// ones: on AMX tiles where this host has them, against the
    /// interpreter at context lengths under a block, across blocks and
    /// their tails, row counts under, at and past tiles of 16, the same
    /// bytes in any number of parts; with AMX off, or a head of 48, none.
    #[test]
    fn context_values_run_on_tiles() {
        for (spec, w_shape, k, tiles) in [
            ("bhm,hmk->bhk", serde_json::json!(["b", 2, "m"]), 64, true),
            ("bgpm,gmk->bgpk", serde_json::json!(["b", 2, 2, "m"]), 128, true),
            // The context's part of longer rows (a softmax over the
            // context and 5 more, with a buffer of its own).
            ("bhm,hmk->bhk", serde_json::json!(["b", 2, "m+5"]), 64, true),
            ("bhm,hmk->bhk", serde_json::json!(["b", 2, "m"]), 48, false),
        ] {
            let sliced = w_shape[2] == "m+5";
            let mut nodes = vec![serde_json::json!(
                {"id": "o", "op": "einsum", "inputs": [if sliced { "ws" } else { "w" }, "vc"], "attrs": {"spec": spec}}
            )];
            if sliced {
                nodes.insert(
                    0,
                    serde_json::json!(
                        {"id": "ws", "op": "slice", "inputs": ["w"], "attrs": {"axis": 2, "start": 3, "end": "m+3"}}
                    ),
                );
            }
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {}},
                "inputs": [
                    {"name": "w", "role": "activation", "shape": w_shape, "dtype": "bf16"},
                    {"name": "vc", "role": "context_kv", "layer": 0, "kv": "v", "shape": [2, "m", k], "dtype": "bf16"}
                ],
                "nodes": nodes,
                "outputs": [{"name": "o", "node": "o"}]
            });
            let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
            for amx in [true, false] {
                let (mut step, text) = cpu_step_amx(&graph, amx);
                let on = amx && tiles && super::super::amx::host_has_amx();
                assert_eq!(text.contains("tdpbf16ps"), on, "{spec}, k {k}, amx {amx}:\n{text}");
                for (b, m) in [(1, 7), (3, 32), (16, 40), (17, 1030), (33, 100)] {
                    let at = point(&[("b", b), ("m", m)]);
                    // Inputs bf16 holds exactly: the sums differ from the
                    // interpreter's only in the order of f32 additions and
                    // the output's rounding (half a bf16 ulp, 2^-9 of it).
                    let mut inputs = crate::interp::random_inputs(&graph, &at, 3).unwrap_or_else(|e| panic!("{e}"));
                    for t in inputs.values_mut() {
                        t.data.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
                    }
                    let want = crate::interp::run(&graph, &at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    let whole = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    let top = want["o"].data.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    for (i, (x, y)) in whole["o"].data.iter().zip(&want["o"].data).enumerate() {
                        let tol = y.abs() / 256.0 + top / 4096.0;
                        assert!((x - y).abs() <= tol, "{spec} at b = {b}, m = {m}: element {i}: {x} vs {y}");
                    }
                    check_parts(&mut step, &at, &inputs, &whole, &["o"]);
                }
            }
        }
    }
}
