//! The bf16 context `q·K` on AMX tiles.
//!
//! The context einsum of bifurcated attention, `..c..y,czy->..c..z` (q's
//! rows against one head `c` of the context cache `K [g, m_c, k]`), in
//! bf16 with a head of a multiple of 32: for each head and each step of
//! 32 context positions, both blocks of 16 positions of K are packed into
//! the layout `tdpbf16ps` reads its right operand in (`[k / 2][16
//! positions][2]`: each 32-bit pair of a row of K moved to its position's
//! column, a 16 × 16 transpose of 32-bit elements in registers per 32
//! elements of the head) and every tile of 16 of the head's rows (packed
//! once per item into a stack slot, `[rows][k]`) takes `k / 32`
//! `tdpbf16ps` a block into two 16 × 16 f32 tiles of scores, stored
//! through a slot as one row of 32 scores each, rounded to the output's
//! dtype: a whole line in bf16, stored past the caches where it starts
//! one (`Builder::store_vector_streaming`; one block a step, half a line
//! per row, stored plainly, ran the q·K at the FMAs' speed). Positions
//! past the last whole step are summed one by one.
//!
//! The items are (head, chunk of [`CHUNK_BLOCKS`] steps) split into
//! parts; rows beyond [`GROUP_ROWS`] are packed and walked in turns,
//! each turn packing the chunk's blocks of K again.
//!
//! Alternated in one process with the FMA path (`rows_in_lanes`), 16
//! heads of 64 at m_c = 8192, one thread, medians of 15: b = 32 4.0-4.5
//! -> 2.0-2.1 ms, b = 64 8.1-9.7 -> 3.2-4.2, b = 1 to 16 as fast or
//! faster (b = 4: 0.91 against 0.96, b = 8: 1.92 against 1.87); 4 KV
//! heads of 4 rows each a sample, b = 32: 3.8 -> 1.2 (bf16 scores).
//!
//! f32 scores make a row's 32 scores of a step 128 bytes, two lines, each
//! streamed alone, so each needs only a line's alignment
//! (`Builder::store_vector_streaming`). Asking for the whole vector's 128
//! had made every store a plain one wherever the buffer started 64 but not
//! 128 bytes into a line pair (an even chance per allocation): 16 MB of
//! scores a layer each read for ownership first. With 64 (one process,
//! alternated, b = 32, m_c = 8192, one thread, medians of 15, f32
//! scores): 16 heads of 64 7.1 -> 4.2 ms, 4 KV heads of 4 rows each a
//! sample 8.5 -> 2.3-2.6 (the FMA path 9.1-10.0). bf16 scores (a bf16
//! model's, see `optimize::convert`) are one line, stored as 32 `i16`s:
//! as `bf16` LLVM stored them plainly (4 KV heads: 3.5 ms against 1.5 with
//! f32 scores, 2.2 after).

use crate::ir::{DType, Value};
use crate::lower::LowerError;

use super::bodies::Out;
use super::builder::{Ty, Val};
use super::Kc;

/// Steps of [`STEP`] positions an item covers (1024 positions).
const CHUNK_BLOCKS: i64 = 32;
/// Rows packed at once (a 64-wide head: 16 KiB of bf16).
const GROUP_ROWS: i64 = 128;
/// Positions of a block: a tile's columns.
const BLOCK: i64 = 16;
/// Positions of a step: two blocks, so that each row's scores of a step
/// are a whole line in bf16 (stored past the caches where aligned).
const STEP: i64 = 2 * BLOCK;

/// A context `q·K` that runs on AMX tiles (see the module docs).
pub(super) struct AmxScores {
    /// q's dense bf16 buffer (`[.., k]`, its rows the output's).
    q: usize,
    /// The context cache's buffer `[g, m_c, k]` (bf16; maybe pitched).
    k: usize,
    /// The head's axis among the output's.
    head: usize,
    /// The head's length `k`, a multiple of 32.
    depth: i64,
}

impl Kc<'_> {
    /// Node `j` as an [`AmxScores`] contraction (where AMX is on, see
    /// `Kc::amx_kernel`): the CPU
    /// einsum of a bf16 `q` (`[.., k]`, dense through order-keeping views,
    /// see `amx::dense_source`) and a stored bf16 `K [g, m, k]` (letters
    /// `c z y`) into `q`'s leading axes and `m` (the output's last), `k` a
    /// constant multiple of 32.
    pub(super) fn amx_scores(&self, j: usize) -> Option<AmxScores> {
        let h = self.head_sum(j, DType::BF16).filter(|h| !h.sum_first && h.last > 0 && h.last % 32 == 0)?;
        let q = self.dense_in(h.rows, DType::BF16)?;
        let (q_shape, y_shape) = (self.graph.shape_of(h.rows), self.graph.shape_of(Value::Node(j)));
        let shapes_ok = q_shape.len() == h.lead + 1
            && self.graph.dims.same_shape(&q_shape[..h.lead], &y_shape[..h.lead])
            && q_shape.last().and_then(|d| self.constant_size(d)) == Some(h.last)
            && self.graph.dims.same(&self.graph.shape_of(h.cache)[1], &y_shape[h.lead]);
        shapes_ok.then_some(AmxScores { q, k: h.buffer, head: h.head, depth: h.last })
    }

    /// The body of [`AmxScores`] contraction `t` (see the module docs).
    pub(super) fn amx_scores_body(
        &mut self,
        out: &Out,
        t: &AmxScores,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        let rank = out.sizes.len();
        let lead = out.sizes[..rank - 1].to_vec();
        let positions = out.sizes[rank - 1].clone();
        let heads = lead[t.head].clone();
        let rows = self.head_rows(&lead, t.head);
        let block = self.b.index(BLOCK);
        let step = self.b.index(STEP);
        let blocks = self.b.hoist(&format!("arith.divui {positions}, {step} : index"));
        // One chunk more than whole chunks hold: the last runs the positions
        // past the last whole block (and none when there are none).
        let chunk = self.b.index(CHUNK_BLOCKS);
        let whole = self.b.hoist(&format!("arith.divui {blocks}, {chunk} : index"));
        let one = self.b.index(1);
        let chunks = self.b.hoist(&format!("arith.addi {whole}, {one} : index"));
        let item = self.part_range(&[heads.clone(), chunks.clone()]);
        self.partition = super::Partition::Done;
        *opened += 1;
        let at = self.b.delinearize(&item, &[heads, chunks.clone()]);
        let (c, ch) = (at[0].clone(), at[1].clone());
        let b_lo = self.b.muli(&ch, &chunk);
        let b_end = self.b.addi(&b_lo, &chunk);
        let b_hi = self.b.op(&format!("arith.minui {b_end}, {blocks} : index"));
        let last_chunk = self.b.op(&format!("arith.subi {chunks}, {one} : index"));
        let is_last = self.b.op(&format!("arith.cmpi eq, {ch}, {last_chunk} : index"));

        let depth = t.depth;
        let (q_slot, k_slot, c_slot) = (
            self.b.stack_f32("amx_q", (GROUP_ROWS * depth / 2) as usize, None),
            self.b.stack_f32("amx_k", (depth / 2 * STEP) as usize, None),
            self.b.stack_f32("amx_c", (BLOCK * STEP) as usize, None),
        );
        let offs = self.offsets_slot(GROUP_ROWS);
        let q_ptr = self.ptr(t.q)?;
        let depth_i = self.b.index(depth);

        // Rows in groups of GROUP_ROWS.
        let group = self.b.index(GROUP_ROWS);
        let zero = self.b.index(0);
        let g0 = self.b.open_loop_from(&zero, &rows, &group);
        let left = self.b.subi(&rows, &g0);
        let gm = self.b.op(&format!("arith.minui {left}, {group} : index"));
        // Pack the group's rows of q (head `c`), and note where each row's
        // scores start.
        let r = self.b.open_loop(&gm);
        let row = self.b.addi(&g0, &r);
        let flat = self.head_row(&lead, t.head, &c, &row);
        let q_off = self.b.muli(&flat, &depth_i);
        let out_off = self.b.muli(&flat, &positions);
        self.note_offset(&offs, &r, &out_off);
        let dst_row = self.b.muli(&r, &depth_i);
        for s in 0..depth / 32 {
            let shift = self.b.index(32 * s);
            let src = self.b.addi(&q_off, &shift);
            let dst = self.b.addi(&dst_row, &shift);
            let (sp, dp) = (self.b.element_ptr(&q_ptr, &src, "bf16"), self.b.element_ptr(&q_slot, &dst, "bf16"));
            let v = self.b.op(&format!("llvm.load {sp} {{alignment = 2 : i64}} : !llvm.ptr -> vector<16xi32>"));
            self.b.line(&format!("llvm.store {v}, {dp} {{alignment = 2 : i64}} : vector<16xi32>, !llvm.ptr"));
        }
        self.b.close();

        let full = self.tile_rows();
        let q_stride = self.b.i64(2 * depth);
        let row_bytes = self.b.i64(64);
        let c_bytes = self.b.i64(4 * STEP);
        let tiles = self.ceil_div_here(&gm, &block);
        let blk = self.b.open_loop_from(&b_lo, &b_hi, &one);
        let j0 = self.b.muli(&blk, &step);
        // Each block of K as [k / 2][16][2]: per 32 elements of the head, 16
        // rows of 16 pairs transposed.
        // Where each of the step's rows of K starts.
        let mut starts = Vec::with_capacity(STEP as usize);
        for jj in 0..STEP {
            let jj = self.b.index(jj);
            let pos = self.b.addi(&j0, &jj);
            starts.push(self.buffer_offset(t.k, &[c.clone(), pos, zero.clone()])?);
        }
        for (half, h) in (0..2).flat_map(|half| (0..depth / 32).map(move |h| (half, h))) {
            let mut vecs = Vec::with_capacity(BLOCK as usize);
            let shift = self.b.index(32 * h);
            for (ptr, off) in &starts[(half * BLOCK) as usize..((half + 1) * BLOCK) as usize] {
                let off = self.b.addi(off, &shift);
                let p = self.b.element_ptr(ptr, &off, "bf16");
                vecs.push(self.b.op(&format!("llvm.load {p} {{alignment = 4 : i64}} : !llvm.ptr -> vector<16xf32>")));
            }
            for (p, v) in self.transpose_16(&vecs).iter().enumerate() {
                let off = self.b.index(((half * depth / 32 + h) * BLOCK + p as i64) * BLOCK);
                let dp = self.b.element_ptr(&k_slot, &off, "f32");
                self.b.line(&format!("llvm.store {v}, {dp} {{alignment = 64 : i64}} : vector<16xf32>, !llvm.ptr"));
            }
        }
        let tile = self.b.open_loop(&tiles);
        let r0 = self.b.muli(&tile, &block);
        let left = self.b.subi(&gm, &r0);
        let mt = self.b.op(&format!("arith.minui {left}, {block} : index"));
        // Every tile has 16 rows (`full`), whatever `mt`: the slot holds
        // them (those past the group's rows are never stored), and with
        // constant shapes every tile configuration LLVM loads is valid, also
        // where an item runs no tile (no whole block): one with the shapes
        // of none would fault.
        let mut accs: Vec<String> = (0..2).map(|_| self.tile_zero(&full)).collect();
        let a_row = self.b.muli(&r0, &depth_i);
        for h in 0..depth / 32 {
            let shift = self.b.index(32 * h);
            let off = self.b.addi(&a_row, &shift);
            let ap = self.b.element_ptr(&q_slot, &off, "bf16");
            let a = self.tile_load(&full, &ap, &q_stride);
            for (half, acc) in accs.iter_mut().enumerate() {
                let b_off = self.b.index((half as i64 * depth / 32 + h) * BLOCK * BLOCK);
                let bp = self.b.element_ptr(&k_slot, &b_off, "f32");
                let b = self.tile_load(&full, &bp, &row_bytes);
                *acc = self.tile_dot(&full, acc, &a, &b);
            }
        }
        for (half, acc) in accs.iter().enumerate() {
            let off = self.b.index(half as i64 * BLOCK);
            let cp = self.b.element_ptr(&c_slot, &off, "f32");
            self.tile_store(&full, &cp, &c_bytes, acc);
        }
        let rr = self.b.open_loop(&mt);
        let src = self.b.muli(&rr, &step);
        let v = self.b.load_vector(&c_slot, &src, STEP as usize, DType::F32);
        let at = self.b.addi(&r0, &rr);
        let start = self.noted_offset(&offs, &at);
        let dst = self.b.addi(&start, &j0);
        self.b.store_vector_streaming(&out.ptr, &dst, &v, STEP as usize, out.dtype);
        self.b.close();
        self.b.close();
        self.b.close();

        // Positions past the last whole block, one by one (last chunk only).
        self.b.open_guard(&is_last);
        let tail = self.b.muli(&blocks, &step);
        let r = self.b.open_loop(&gm);
        let start = self.noted_offset(&offs, &r);
        let q_row = self.b.muli(&r, &depth_i);
        let pos = self.b.open_loop_from(&tail, &positions, &one);
        let init = self.b.f32(0.0);
        let (sum, yy, a) = self.b.open_for(&depth_i, &init, Ty::F32);
        let qo = self.b.addi(&q_row, &yy);
        let x = self.b.load(&q_slot, &qo, DType::BF16).ssa;
        let (ptr, off) = self.buffer_offset(t.k, &[c.clone(), pos.clone(), yy.clone()])?;
        let w = self.b.load(&ptr, &off, DType::BF16).ssa;
        let next = self.b.op(&format!("math.fma {x}, {w}, {a} : f32"));
        self.b.close_for(&next, Ty::F32);
        let dst = self.b.addi(&start, &pos);
        self.b.store(&out.ptr, &dst, out.dtype, Val::f32(sum));
        self.b.close();
        self.b.close();
        self.b.close();
        // The group loop.
        self.b.close();
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use crate::lower::emit::testing::{check_output, check_parts, cpu_step_amx, point};

    /// A bf16 context q·K, multi-head (`bhk,hmk->bhm`, q a view of a
    /// projection) and grouped-query (`bgpk,gmk->bgpm`, 2 rows a head a
    /// sample): on AMX tiles where this host has them (`k` = 64), against
    /// the interpreter at context lengths under a block, across blocks,
    /// chunks (1024 positions) and their tails, row counts under, at and
    /// past tiles of 16 and groups of 128, the same bytes in any number of
    /// parts; with AMX off, or a head of 48, none.
    #[test]
    fn context_scores_run_on_tiles() {
        for (spec, q_shape, k, tiles) in [
            ("bhk,hmk->bhm", serde_json::json!(["b", 2, 64]), 64, true),
            ("bgpk,gmk->bgpm", serde_json::json!(["b", 2, 2, 64]), 64, true),
            ("bhk,hmk->bhm", serde_json::json!(["b", 2, 48]), 48, false),
        ] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {"d": 128}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "bf16"},
                    {"name": "w", "role": "weight", "shape": [2 * k * (q_shape.as_array().unwrap().len() as i64 - 2), "d"], "dtype": "bf16"},
                    {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": [2, "m", k], "dtype": "bf16"}
                ],
                "nodes": [
                    {"id": "p", "op": "matmul", "inputs": ["x", "w"], "attrs": {"transpose_b": true}},
                    {"id": "q", "op": "reshape", "inputs": ["p"], "attrs": {"shape": q_shape}},
                    {"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": spec}}
                ],
                "outputs": [{"name": "s", "node": "s"}]
            });
            let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
            for amx in [true, false] {
                let (mut step, text) = cpu_step_amx(&graph, amx);
                let on = amx && tiles && super::super::amx::host_has_amx();
                let scores = text.split("func.func @").find(|f| f.starts_with("k") && f.contains("_s(")).unwrap_or("");
                assert_eq!(scores.contains("tdpbf16ps"), on, "{spec}, k {k}, amx {amx}:\n{scores}");
                for (b, m) in [(1, 7), (3, 16), (16, 40), (17, 1030), (65, 100), (2, 2048)] {
                    let at = point(&[("b", b), ("m", m)]);
                    check_output(&graph, &step, &at, 3, "s", (0.05, 0.02));
                    let inputs = crate::interp::random_inputs(&graph, &at, 3).unwrap_or_else(|e| panic!("{e}"));
                    let whole = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                    check_parts(&mut step, &at, &inputs, &whole, &["s"]);
                }
            }
        }
    }

    /// Each row's 32 scores of a step are one vector, streamed past the
    /// caches: in f32 (a bf16 model's split scores before they kept its
    /// dtype) two lines, and the streaming store needs only each line's
    /// alignment, not the vector's 128 bytes (with that, on a buffer 64
    /// but not 128 bytes aligned, an even chance, every store had been a
    /// plain one, each line read for ownership first: the q·K 2-3x
    /// slower); in bf16 one line, stored as 32 `i16` (LLVM has no streaming
    /// store of `bf16` vectors: it stored them plainly).
    #[test]
    fn scores_stream_a_line_at_a_time() {
        for (dtype, stored) in [("f32", "vector<32xf32>"), ("bf16", "vector<32xi16>")] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b", "m"], "constants": {}},
                "inputs": [
                    {"name": "q", "role": "activation", "shape": ["b", 4, 4, 1, 64], "dtype": "bf16"},
                    {"name": "kc", "role": "context_kv", "layer": 0, "kv": "k", "shape": [4, "m", 64], "dtype": "bf16"}
                ],
                "nodes": [{"id": "s", "op": "einsum", "inputs": ["q", "kc"], "attrs": {"spec": "acdxy,czy->acdxz"}, "dtype": dtype}],
                "outputs": [{"name": "s", "node": "s"}]
            });
            let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
            let (step, text) = cpu_step_amx(&graph, true);
            if super::super::amx::host_has_amx() {
                let scores = text.split("func.func @").find(|f| f.starts_with("k0_s(")).unwrap_or("");
                assert!(scores.contains("tdpbf16ps"), "{scores}");
                let streamed: Vec<&str> = scores.lines().filter(|l| l.contains("nontemporal")).collect();
                assert!(!streamed.is_empty() && streamed.iter().all(|l| l.contains(stored)), "{dtype}: {streamed:?}");
                assert!(streamed.iter().all(|l| l.contains("alignment = 64 : i64, nontemporal")), "{streamed:?}");
            }
            for (b, m) in [(1, 100), (32, 2048)] {
                check_output(&graph, &step, &point(&[("b", b), ("m", m)]), 3, "s", (0.05, 0.02));
            }
        }
    }
}
