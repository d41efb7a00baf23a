//! bf16 weight projections on Intel's AMX tiles (and, in `amx_scores` and
//! `amx_values`, the bf16 context attention).
//!
//! A bf16 weight kept in paired panels (`cpu::panels`: `[out / 64, in / 2,
//! 64, 2]`, each output's inputs `2z` and `2z + 1` side by side) is the
//! layout AMX's `tdpbf16ps` reads its right operand in: a tile of 16
//! pair-rows × 16 outputs is 16 rows of 64 bytes, one stretch of 16 pairs
//! of the panel each, 256 bytes apart. The projection `..zt,pzxt->..px`
//! (the input `x` reshaped into pairs) then runs, for each panel and each
//! tile of 16 rows of `x`, four accumulator tiles of 16 rows × 16 outputs
//! (f32), each step of the sum one tile of `x` (16 rows × 32 inputs, read
//! in place: `x` is a dense buffer) and four of the panel, one
//! `tdpbf16ps` each: 16 × 16 × 32 products per instruction, where an
//! AVX-512 FMA does 16. A tile of fewer rows (the last, or b < 16) is
//! configured with fewer. The accumulators go to the output directly (f32)
//! or through a stack slot, rounded by vector stores (f16 / bf16).
//!
//! Like `vdpbf16ps` (see `pair_dot`), the products are exact in f32, each
//! step adds the pair's two, and subnormal inputs are read as zero: the
//! sums differ from the FMAs' in rounding only.
//!
//! The tiles need the kernel's permission (Linux: `arch_prctl`, once per
//! process) before a kernel runs one; [`prefer_amx`] asks for it and says
//! no where it is refused. Parts split the (panel, tile of rows) items, a
//! panel's tiles of rows in one part where they can be, so that the
//! second finds the panel in L2.
//!
//! On a 2-core Emerald Rapids VM, 4 independent chains of `tdpbf16ps`
//! summed 541 G bf16 products/s on one core (a C loop), against 80-85 G
//! f32 FMAs and 40 G by `vdpbf16ps`. Four layers of a bf16 llama MLP
//! (d_model 1024, ffn 2816: 12 projections, 69 MB of weights), alternated
//! in one process with the FMA path (`BIFURC_CPU_AMX=off`), medians of 40
//! runs: b = 32 on one thread 27.1 -> 8.1 ms, on two 16.0 -> 6.3; b = 16
//! 13.4 -> 6.9; b = 64 74 -> 16.4; b = 1 the same (8.4 and 8.6, bound by
//! memory). A software prefetch of the next step's panel lines made no
//! difference there. In the bf16 cpu_step model (b = 32, one thread) the
//! MLP projections 2.1-3.0 -> 0.91-1.0 ms each, the attention's
//! 0.8-1.1 -> 0.33-0.39.

use crate::ir::{DType, EinsumSpec, Graph, Op, Poly, Value};
use crate::lower::LowerError;

use super::bodies::Out;
use super::Kc;

/// Rows of an AMX tile.
const TILE_ROWS: i64 = 16;
/// bf16 pairs a step of the sum covers: one tile row of 64 bytes.
const TILE_PAIRS: i64 = 16;
/// Outputs of a panel (`cpu::panels::PANEL`): 4 accumulator tiles of 16.
const PANEL_OUTPUTS: i64 = 64;
/// The inputs a projection's sum must be a multiple of to run on the
/// tiles (`in / 2` a multiple of [`TILE_PAIRS`]).
pub(crate) const AMX_INPUTS: i64 = 2 * TILE_PAIRS;

/// The environment variable that overrides whether the CPU step runs bf16
/// projections on AMX tiles: `on` (the CPU must have AMX-BF16 and the
/// kernel must allow it), `off`, or `auto` (the default: wherever it can).
pub const AMX_ENV: &str = "BIFURC_CPU_AMX";

/// Whether this CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24
/// and 22) and the OS lets this process use them (asked once).
pub(crate) fn host_has_amx() -> bool {
    cpu_has_amx() && permitted()
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx() -> bool {
    // An `unsafe fn` in older Rust releases.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 0 only reads the
    // highest leaf, and leaf 7 is read only when it is at most that.
    let (max, edx) = unsafe {
        let max = std::arch::x86_64::__cpuid(0).eax;
        (max, if max >= 7 { std::arch::x86_64::__cpuid_count(7, 0).edx } else { 0 })
    };
    max >= 7 && edx & (1 << 24) != 0 && edx & (1 << 22) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx() -> bool {
    false
}

/// Asks Linux (once per process) to let this process use AMX's tile data,
/// which it must before the first tile instruction: without it the
/// instruction faults. Whether it was granted.
fn permitted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(request_tile_data)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn request_tile_data() -> bool {
    /// `ARCH_REQ_XCOMP_PERM` and the tile data's XSAVE feature number
    /// (`XFEATURE_XTILEDATA`), from Linux's `asm/prctl.h`, `fpu/types.h`.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this code only changes which XSAVE features
    // the process may use; it reads and writes no memory of ours.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn request_tile_data() -> bool {
    false
}

/// Whether the CPU step runs bf16 projections on AMX tiles: where the host
/// can, unless [`AMX_ENV`] says `off` (see [`amx_choice`], which is this
/// with the setting's error).
pub(crate) fn prefer_amx() -> bool {
    amx_choice().unwrap_or_else(|_| host_has_amx())
}

/// [`prefer_amx`]'s answer, or the error naming a value of [`AMX_ENV`] it
/// cannot take.
pub(crate) fn amx_choice() -> Result<bool, LowerError> {
    #[cfg(test)]
    if let Some(amx) = FORCED_AMX.with(std::cell::Cell::get) {
        return Ok(amx && host_has_amx());
    }
    let setting = std::env::var(AMX_ENV).ok();
    let lacks = "this CPU has no AMX-BF16 tiles, or the OS does not let this process use them";
    let on = super::pair_dot::cpu_setting(AMX_ENV, setting.as_deref(), host_has_amx, lacks)?;
    Ok(on.unwrap_or_else(host_has_amx))
}

#[cfg(test)]
thread_local! {
    /// This thread's override of [`prefer_amx`] (see [`with_amx`]).
    static FORCED_AMX: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`prefer_amx`] answering `amx` on this thread (still
/// `false` where the host has no AMX): tests compile both ways where they
/// can.
#[cfg(test)]
pub(crate) fn with_amx<R>(amx: bool, f: impl FnOnce() -> R) -> R {
    super::pair_dot::with_forced(&FORCED_AMX, amx, f)
}

/// The value whose buffer holds `v`'s elements in `v`'s own row-major
/// order: `v` itself where `stored(v)`, else through reshapes and
/// transposes that move only axes of size 1 (heads merged for `o_proj` at
/// one new token: `[b, h, 1, k]` as `[b, 1, h, k]`); `None` through any
/// other view. Where `stored` says a value has a buffer of its own.
pub(crate) fn dense_source(graph: &Graph, v: Value, stored: &dyn Fn(Value) -> bool) -> Option<Value> {
    if stored(v) {
        return Some(v);
    }
    let Value::Node(j) = v else { return None };
    let node = graph.nodes.get(j)?;
    let &[first] = node.inputs.as_slice() else { return None };
    let keeps_order = match &node.op {
        Op::Reshape { .. } => true,
        Op::Transpose { perm } => {
            let shape = graph.shape_of(first);
            let unit = |a: usize| shape.get(a).is_some_and(|d| graph.dims.same(d, &Poly::constant(1)));
            let moved: Vec<usize> = perm.iter().copied().filter(|&a| !unit(a)).collect();
            moved.windows(2).all(|w| w[0] < w[1])
        }
        _ => false,
    };
    if keeps_order {
        dense_source(graph, first, stored)
    } else {
        None
    }
}

/// Whether no letter of `s` repeats.
pub(super) fn distinct(s: &[char]) -> bool {
    s.iter().enumerate().all(|(i, l)| !s[..i].contains(l))
}

/// The MLIR type of an AMX tile.
pub(super) const TILE: &str = "!llvm.x86_amx";

/// An einsum of one head `c` of a stored context cache (`[g, m, k]`,
/// letters `c` and the two below) and an operand of rows (`..c..s`, its
/// last letter `s` summed), both of one dtype (bf16 on AMX tiles, f16 or
/// bf16 widened in chunks: `emit::half_values`), into the rows' leading
/// axes and one more, `z`: the context `q·K` (cache `c z s`) or `w · V`
/// (cache `c s z`).
pub(super) struct HeadSum {
    /// The operand of rows, and the cache (its value and buffer).
    pub rows: Value,
    pub cache: Value,
    pub buffer: usize,
    /// The head's axis among the output's leading axes, and their number.
    pub head: usize,
    pub lead: usize,
    /// The cache's letters are `c s z` (`w · V`), not `c z s` (`q·K`).
    pub sum_first: bool,
    /// The cache's last size (`k`).
    pub last: i64,
}

/// A kernel that runs on AMX tiles.
pub(super) enum AmxKernel {
    /// A projection by paired panels (this module).
    Projection(AmxTiles),
    /// The context `q·K` (`amx_scores`).
    Scores(super::amx_scores::AmxScores),
    /// The context `w · V` (`amx_values`).
    Values(super::amx_values::AmxValues),
}

/// A paired-panel projection that runs on AMX tiles (see the module docs).
pub(super) struct AmxTiles {
    /// The dense bf16 buffer of `x` (`[.., in]`), and `in / 2`.
    x: usize,
    pairs: i64,
    /// The paired panels' buffer (`[panels, in / 2, 64, 2]`) and its panels.
    w: usize,
    panels: i64,
}

impl Kc<'_> {
    /// Opens a loop over this call's part of `0..n`, `n` the product of
    /// `sizes` (hoisted values): `n·part/parts .. n·(part+1)/parts`.
    /// Unlike [`Kc::open_part_loop`] the loop runs only those items, with
    /// no guard: LLVM reloads the tile configuration at every iteration's
    /// end, and one that skipped its item would load a configuration with
    /// the shapes of none (zero rows), which faults. Returns its index.
    pub(super) fn part_range(&mut self, sizes: &[String]) -> String {
        let one = self.b.index(1);
        match self.part_bounds(sizes) {
            (_, Some((lo, hi))) => self.b.open_loop_from(&lo, &hi, &one),
            (n, None) => self.b.open_loop(&n),
        }
    }

    /// Node `j` as a kernel on AMX tiles, where AMX is on and it is one.
    pub(super) fn amx_kernel(&self, j: usize, out: &Out) -> Option<AmxKernel> {
        if !self.amx || self.partition != super::Partition::Pending || !out.dtype.is_float() {
            return None;
        }
        (self.amx_tiles(j).map(AmxKernel::Projection))
            .or_else(|| self.amx_scores(j).map(AmxKernel::Scores))
            .or_else(|| self.amx_values(j).map(AmxKernel::Values))
    }

    /// The body of AMX kernel `k`.
    pub(super) fn amx_kernel_body(
        &mut self,
        out: &Out,
        k: &AmxKernel,
        opened: &mut usize,
    ) -> Result<String, LowerError> {
        match k {
            AmxKernel::Projection(t) => self.amx_body(out, t, opened),
            AmxKernel::Scores(t) => self.amx_scores_body(out, t, opened),
            AmxKernel::Values(t) => self.amx_values_body(out, t, opened),
        }
    }

    /// A zero tile of `rows` (an `i16`) × 64 bytes.
    pub(super) fn tile_zero(&mut self, rows: &str) -> String {
        let bytes = self.tile_bytes();
        self.b
            .op(&format!("llvm.call_intrinsic \"llvm.x86.tilezero.internal\"({rows}, {bytes}) : (i16, i16) -> {TILE}"))
    }

    /// The tile of `rows` (an `i16`) × 64 bytes at `ptr`, its rows `stride`
    /// bytes (an `i64`) apart.
    pub(super) fn tile_load(&mut self, rows: &str, ptr: &str, stride: &str) -> String {
        let bytes = self.tile_bytes();
        self.b.op(&format!(
            "llvm.call_intrinsic \"llvm.x86.tileloadd64.internal\"({rows}, {bytes}, {ptr}, {stride}) : \
             (i16, i16, !llvm.ptr, i64) -> {TILE}"
        ))
    }

    /// `acc` (`rows` × 16 f32) plus `a` (`rows` × 32 bf16) times `b` (16
    /// pairs × 16 outputs): `tdpbf16ps`.
    pub(super) fn tile_dot(&mut self, rows: &str, acc: &str, a: &str, b: &str) -> String {
        let bytes = self.tile_bytes();
        self.b.op(&format!(
            "llvm.call_intrinsic \"llvm.x86.tdpbf16ps.internal\"({rows}, {bytes}, {bytes}, {acc}, {a}, {b}) : \
             (i16, i16, i16, {TILE}, {TILE}, {TILE}) -> {TILE}"
        ))
    }

    /// Stores f32 tile `tile` (`rows` × 16) at `ptr`, its rows `stride`
    /// bytes apart.
    pub(super) fn tile_store(&mut self, rows: &str, ptr: &str, stride: &str, tile: &str) {
        let bytes = self.tile_bytes();
        self.b.line(&format!(
            "llvm.call_intrinsic \"llvm.x86.tilestored64.internal\"({rows}, {bytes}, {ptr}, {stride}, {tile}) : \
             (i16, i16, !llvm.ptr, i64, {TILE}) -> ()"
        ));
    }

    /// 16 as an `i16` (a whole tile's rows).
    pub(super) fn tile_rows(&mut self) -> String {
        self.b.hoist("llvm.mlir.constant(16 : i16) : i16")
    }

    /// A tile row's 64 bytes, as an `i16`.
    fn tile_bytes(&mut self) -> String {
        self.b.hoist("llvm.mlir.constant(64 : i16) : i16")
    }

    /// A stack slot of `n` offsets (`i64`), allocated once (hoisted): where
    /// each row of a tile starts in a buffer, noted once per item.
    pub(super) fn offsets_slot(&mut self, n: i64) -> String {
        let n = self.b.i64(n);
        self.b.hoist(&format!("llvm.alloca {n} x i64 {{alignment = 64 : i64}} : (i64) -> !llvm.ptr"))
    }

    /// Notes offset `v` (an `index`) at `at` of offsets slot `slot`.
    pub(super) fn note_offset(&mut self, slot: &str, at: &str, v: &str) {
        let x = self.b.index_to_i64(v);
        let ptr = self.b.element_ptr(slot, at, "i64");
        self.b.line(&format!("llvm.store {x}, {ptr} : i64, !llvm.ptr"));
    }

    /// The offset noted at `at` of offsets slot `slot` (see
    /// [`Kc::note_offset`]), as an `index`.
    pub(super) fn noted_offset(&mut self, slot: &str, at: &str) -> String {
        let x = self.b.load(slot, at, DType::I64).ssa;
        self.b.op(&format!("arith.index_cast {x} : i64 to index"))
    }

    /// The rows of one head: the product of the leading sizes `lead` but
    /// the head's (`head`), hoisted.
    pub(super) fn head_rows(&mut self, lead: &[String], head: usize) -> String {
        let mut rows = self.b.index(1);
        for (a, s) in lead.iter().enumerate() {
            if a != head {
                rows = self.b.hoist(&format!("arith.muli {rows}, {s} : index"));
            }
        }
        rows
    }

    /// The flat index, among the output's leading axes `lead` (sizes), of
    /// head `c`'s row `row`: `row` delinearized over the axes but `head`,
    /// `c` inserted there.
    pub(super) fn head_row(&mut self, lead: &[String], head: usize, c: &str, row: &str) -> String {
        let others: Vec<String> = lead.iter().enumerate().filter(|(a, _)| *a != head).map(|(_, s)| s.clone()).collect();
        let mut coords = self.b.delinearize(row, &others);
        coords.insert(head, c.to_owned());
        self.b.linearize(&coords, lead)
    }

    /// Node `j` as a [`HeadSum`] (see there) of `dtype`.
    pub(super) fn head_sum(&self, j: usize, dtype: DType) -> Option<HeadSum> {
        let (spec, inputs) = self.contraction_spec(j)?;
        let EinsumSpec { inputs: subs, output } = &spec;
        let (&z, lead) = output.split_last()?;
        let ci = subs.iter().position(|s| s.contains(&z))?;
        let (rs, cs, rows, cache) = (subs.get(1 - ci)?, &subs[ci], *inputs.get(1 - ci)?, *inputs.get(ci)?);
        let (&[c, a, b], Some((&sum, r_lead))) = (cs.as_slice(), rs.split_last()) else { return None };
        let sum_first = [a, b] == [sum, z];
        let letters_ok = inputs.len() == 2
            && (sum_first || [a, b] == [z, sum])
            && r_lead == lead
            && !lead.contains(&sum)
            && distinct(output)
            && distinct(rs);
        let head = lead.iter().position(|&l| l == c)?;
        let held = |v: Value| self.graph.dtype_of(v) == dtype;
        let buffer = self.stored(cache).filter(|&b| self.program.buffers[b].dtype == dtype && held(cache))?;
        let last = self.constant_size(self.graph.shape_of(cache).last()?)?;
        (letters_ok && held(rows)).then_some(HeadSum { rows, cache, buffer, head, lead: lead.len(), sum_first, last })
    }

    /// The dense buffer of `dtype` holding `v`'s elements in its order
    /// (see [`dense_source`]), unpitched.
    pub(super) fn dense_in(&self, v: Value, dtype: DType) -> Option<usize> {
        let source = dense_source(self.graph, v, &|v| self.stored(v).is_some())?;
        self.stored(source).filter(|&b| {
            let buf = &self.program.buffers[b];
            buf.dtype == dtype && buf.pitch.is_none()
        })
    }

    /// Node `j` as an [`AmxTiles`] projection (where AMX is on, see
    /// [`Kc::amx_kernel`]): the CPU einsum
    /// `..zt,pzxt->..px` of a bf16 `x` (`[.., in]` in pairs, read from a
    /// dense bf16 buffer in its order, see [`dense_source`]) and stored
    /// bf16 paired panels
    /// `[P, in / 2, 64, 2]`, `in / 2` a multiple of 16, into a float output
    /// `[.., P, 64]` with `x`'s leading axes.
    fn amx_tiles(&self, j: usize) -> Option<AmxTiles> {
        let (spec, inputs) = self.contraction_spec(j)?;
        let (EinsumSpec { inputs: subs, output }, &[xv, wv]) = (&spec, inputs.as_slice()) else { return None };
        let [xs, ws] = subs.as_slice() else { return None };
        let (&[p, z, n, t], rank) = (ws.as_slice(), output.len()) else { return None };
        let lead = output.get(..rank.checked_sub(2)?)?;
        let letters_ok = output[rank - 2..] == [p, n]
            && xs.len() == lead.len() + 2
            && xs[..lead.len()] == *lead
            && xs[lead.len()..] == [z, t]
            && distinct(output)
            && distinct(ws)
            && !lead.iter().any(|c| ws.contains(c));
        if !letters_ok {
            return None;
        }
        // The panels: a stored bf16 buffer of constant sizes.
        let w = self.stored(wv).filter(|&b| self.program.buffers[b].dtype == DType::BF16)?;
        let sizes: Vec<i64> = self.graph.shape_of(wv).iter().map(|d| self.constant_size(d)).collect::<Option<_>>()?;
        let &[panels, pairs, outs, 2] = sizes.as_slice() else { return None };
        if outs != PANEL_OUTPUTS || pairs <= 0 || pairs % TILE_PAIRS != 0 || panels <= 0 {
            return None;
        }
        // x: `[.., in / 2, 2]` with the output's leading axes, its elements
        // in that order in a dense bf16 buffer (through order-keeping views).
        let x = self.dense_in(xv, DType::BF16)?;
        let (x_shape, y_shape) = (self.graph.shape_of(xv), self.graph.shape_of(Value::Node(j)));
        let dense = x_shape.len() == lead.len() + 2
            && self.graph.dims.same_shape(&x_shape[..lead.len()], &y_shape[..lead.len()])
            && x_shape.get(lead.len()).and_then(|d| self.constant_size(d)) == Some(pairs)
            && y_shape.get(rank - 2).and_then(|d| self.constant_size(d)) == Some(panels);
        dense.then_some(AmxTiles { x, pairs, w, panels })
    }

    /// The body of [`AmxTiles`] projection `t` (see the module docs): a
    /// loop over (panel, tile of 16 rows), split into parts.
    fn amx_body(&mut self, out: &Out, t: &AmxTiles, opened: &mut usize) -> Result<String, LowerError> {
        let rank = out.sizes.len();
        let mut rows = self.b.index(1);
        for s in &out.sizes[..rank - 2] {
            rows = self.b.hoist(&format!("arith.muli {rows}, {s} : index"));
        }
        let tiles = self.ceil_div(&rows, TILE_ROWS);
        let panels = self.b.index(t.panels);
        // Panel outer, tile of rows inner: a part runs a panel's tiles
        // one after the other where its share holds them.
        let item = self.part_range(&[panels.clone(), tiles.clone()]);
        self.partition = super::Partition::Done;
        *opened += 1;
        let at = self.b.delinearize(&item, &[panels, tiles]);
        let (p, tile) = (&at[0], &at[1]);
        let sixteen = self.b.index(TILE_ROWS);
        let r0 = self.b.muli(tile, &sixteen);
        let left = self.b.subi(&rows, &r0);
        let m = self.b.op(&format!("arith.minui {left}, {sixteen} : index"));
        let m64 = self.b.index_to_i64(&m);
        let m16 = self.b.op(&format!("arith.trunci {m64} : i64 to i16"));
        let full = self.tile_rows();
        // Rows `m`, fewer than 16 in the last tile: `x` is read in place,
        // and has no rows past its last. Every item runs tiles (its sum is
        // at least one step), so every tile configuration LLVM loads has
        // shapes (see `amx_scores` for where one would not).
        let zeros: Vec<String> = (0..PANEL_OUTPUTS / 16).map(|_| self.tile_zero(&m16)).collect();
        // x's rows are `2·pairs` bf16 apart; a panel's pair-rows 64 pairs.
        let x_ptr = self.ptr(t.x)?;
        let w_ptr = self.ptr(t.w)?;
        let x_stride = self.b.i64(4 * t.pairs);
        let w_stride = self.b.i64(4 * PANEL_OUTPUTS);
        let x_row = self.b.index(2 * t.pairs);
        let x_base = self.b.muli(&r0, &x_row);
        let panel_len = self.b.index(t.pairs * 2 * PANEL_OUTPUTS);
        let w_base = self.b.muli(p, &panel_len);
        let (len, step) = (self.b.index(t.pairs), self.b.index(TILE_PAIRS));
        let (sums, zb, accs) = self.b.open_for_typed(&len, &step, &zeros, TILE);
        let two = self.b.index(2);
        let x_off = self.b.muli(&zb, &two);
        let x_off = self.b.addi(&x_base, &x_off);
        let a_ptr = self.b.element_ptr(&x_ptr, &x_off, "bf16");
        let a = self.tile_load(&m16, &a_ptr, &x_stride);
        let pair_row = self.b.index(2 * PANEL_OUTPUTS);
        let w_off = self.b.muli(&zb, &pair_row);
        let w_off = self.b.addi(&w_base, &w_off);
        let mut nexts = Vec::with_capacity(accs.len());
        for (i, acc) in accs.iter().enumerate() {
            let shift = self.b.index(32 * i as i64);
            let off = self.b.addi(&w_off, &shift);
            let b_ptr = self.b.element_ptr(&w_ptr, &off, "bf16");
            let b = self.tile_load(&full, &b_ptr, &w_stride);
            nexts.push(self.tile_dot(&m16, acc, &a, &b));
        }
        self.b.close_for_typed(&nexts, TILE);
        // Output row r, panel p, outputs 16i..: ((r·P + p)·64 + 16i).
        let out_panels = self.b.index(t.panels);
        let out_row = self.b.muli(&r0, &out_panels);
        let out_row = self.b.addi(&out_row, p);
        let width = self.b.index(PANEL_OUTPUTS);
        let out_base = self.b.muli(&out_row, &width);
        if out.dtype == DType::F32 {
            let stride = self.b.i64(4 * PANEL_OUTPUTS * t.panels);
            for (i, sum) in sums.iter().enumerate() {
                let shift = self.b.index(16 * i as i64);
                let off = self.b.addi(&out_base, &shift);
                let ptr = self.b.element_ptr(&out.ptr, &off, "f32");
                self.tile_store(&m16, &ptr, &stride, sum);
            }
        } else {
            // Through a slot of 16 rows × 64 f32, each row's 4 vectors
            // rounded as they are stored.
            let slot = self.b.stack_f32("amx", (TILE_ROWS * PANEL_OUTPUTS) as usize, None);
            let stride = self.b.i64(4 * PANEL_OUTPUTS);
            for (i, sum) in sums.iter().enumerate() {
                let shift = self.b.index(16 * i as i64);
                let ptr = self.b.element_ptr(&slot, &shift, "f32");
                self.tile_store(&m16, &ptr, &stride, sum);
            }
            let rr = self.b.open_loop(&m);
            let slot_row = self.b.muli(&rr, &width);
            let row_step = self.b.muli(&rr, &out_panels);
            let row_step = self.b.muli(&row_step, &width);
            let dst_row = self.b.addi(&out_base, &row_step);
            for i in 0..PANEL_OUTPUTS / 16 {
                let shift = self.b.index(16 * i);
                let src = self.b.addi(&slot_row, &shift);
                let v = self.b.load_vector(&slot, &src, 16, DType::F32);
                let dst = self.b.addi(&dst_row, &shift);
                self.b.store_vector(&out.ptr, &dst, &v, 16, out.dtype);
            }
            self.b.close();
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::emit::testing::{check_output, check_parts, cpu_step_amx, point};
    use crate::lower::CpuStep;

    const TDPBF16PS: &str = "llvm.x86.tdpbf16ps.internal";

    /// `doc`'s graph, and its CPU step compiled with AMX on (where the
    /// host has it) or off, and its MLIR.
    fn compile(doc: &serde_json::Value, amx: bool) -> (crate::ir::Graph, CpuStep, String) {
        let graph = crate::import::from_value(doc).unwrap_or_else(|e| panic!("{e}"));
        let (step, text) = cpu_step_amx(&graph, amx);
        (graph, step, text)
    }

    /// A bf16 MLP (`x @ W_upᵀ`, silu, `@ W_downᵀ`, `in` 64 and 128), an
    /// f32-output projection of a bf16 `x` (`in` 96, 3 panels) and one of
    /// heads merged as before `o_proj` (`[b, h, 1, k]` transposed to
    /// `[b, 1, h, k]`, reshaped: the same order): on AMX tiles where this
    /// host has them, against the interpreter at row counts under, at and
    /// past whole tiles of 16, the same bytes in any number of parts; with
    /// AMX off, no tile in the text.
    #[test]
    fn bf16_projections_run_on_tiles() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"d": 64, "f": 128, "e": 96}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", 1, "d"], "dtype": "bf16"},
                {"name": "x2", "role": "activation", "shape": ["b", "e"], "dtype": "bf16"},
                {"name": "w_up", "role": "weight", "shape": ["f", "d"], "dtype": "bf16"},
                {"name": "w_down", "role": "weight", "shape": [64, "f"], "dtype": "bf16"},
                {"name": "w_wide", "role": "weight", "shape": [192, "e"], "dtype": "bf16"},
                {"name": "heads", "role": "activation", "shape": ["b", 2, 1, 32], "dtype": "bf16"},
                {"name": "w_o", "role": "weight", "shape": [64, 64], "dtype": "bf16"}
            ],
            "nodes": [
                {"id": "up", "op": "matmul", "inputs": ["x", "w_up"], "attrs": {"transpose_b": true}},
                {"id": "a", "op": "silu", "inputs": ["up"]},
                {"id": "down", "op": "matmul", "inputs": ["a", "w_down"], "attrs": {"transpose_b": true}},
                {"id": "wide", "op": "matmul", "inputs": ["x2", "w_wide"], "attrs": {"transpose_b": true},
                 "dtype": "f32"},
                {"id": "t", "op": "transpose", "inputs": ["heads"], "attrs": {"perm": [0, 2, 1, 3]}},
                {"id": "merged", "op": "reshape", "inputs": ["t"], "attrs": {"shape": ["b", 1, 64]}},
                {"id": "o", "op": "matmul", "inputs": ["merged", "w_o"], "attrs": {"transpose_b": true}}
            ],
            "outputs": [
                {"name": "down", "node": "down"}, {"name": "wide", "node": "wide"}, {"name": "o", "node": "o"}
            ]
        });
        let has = host_has_amx();
        for amx in [true, false] {
            let (graph, mut step, text) = compile(&doc, amx);
            assert_eq!(text.matches(TDPBF16PS).count(), if amx && has { 4 * 4 } else { 0 }, "amx {amx}:\n{text}");
            for b in [1, 5, 16, 17, 40] {
                let at = point(&[("b", b)]);
                for out in ["down", "wide", "o"] {
                    check_output(&graph, &step, &at, 7, out, (2e-2, 2e-2));
                }
                let inputs = crate::interp::random_inputs(&graph, &at, 7).unwrap_or_else(|e| panic!("{e}"));
                let whole = step.run(&at, &inputs).unwrap_or_else(|e| panic!("{e}"));
                check_parts(&mut step, &at, &inputs, &whole, &["down", "wide", "o"]);
            }
        }
    }

    /// Only weights the tiles can read go into paired panels for them: an
    /// `in` that is not a multiple of 32 (48), or an `x` whose rows are not
    /// its buffer's (heads merged by a transpose of two long axes), stays
    /// in plain panels, summed by FMAs.
    #[test]
    fn tiles_only_where_they_fit() {
        let doc = serde_json::json!({
            "format": "bifurc-graph/1",
            "dims": {"runtime": ["b"], "constants": {"d": 48, "h": 2, "k": 32}},
            "inputs": [
                {"name": "x", "role": "activation", "shape": ["b", "d"], "dtype": "bf16"},
                {"name": "heads", "role": "activation", "shape": ["b", "h", "k"], "dtype": "bf16"},
                {"name": "w_odd", "role": "weight", "shape": [64, "d"], "dtype": "bf16"},
                {"name": "w_o", "role": "weight", "shape": [64, 64], "dtype": "bf16"}
            ],
            "nodes": [
                {"id": "odd", "op": "matmul", "inputs": ["x", "w_odd"], "attrs": {"transpose_b": true}},
                {"id": "t", "op": "transpose", "inputs": ["heads"], "attrs": {"perm": [0, 2, 1]}},
                {"id": "merged", "op": "reshape", "inputs": ["t"], "attrs": {"shape": ["b", 64]}},
                {"id": "o", "op": "matmul", "inputs": ["merged", "w_o"], "attrs": {"transpose_b": true}}
            ],
            "outputs": [{"name": "odd", "node": "odd"}, {"name": "o", "node": "o"}]
        });
        let (graph, step, text) = crate::lower::emit::with_bf16_dot(false, || compile(&doc, true));
        assert!(!text.contains(TDPBF16PS), "{text}");
        // Plain panels `[out / 64, in, 64]`, not paired `[.., in / 2, 64, 2]`.
        for w in ["w_odd", "w_o"] {
            let shape = step.graph().inputs.iter().find(|i| i.name == w).map(|i| i.shape.len());
            assert_eq!(shape, Some(3), "{w}");
        }
        for b in [1, 17] {
            for out in ["odd", "o"] {
                check_output(&graph, &step, &point(&[("b", b)]), 3, out, (2e-2, 2e-2));
            }
        }
    }

    /// `BIFURC_CPU_AMX`'s values: `auto` (or unset, or empty) leaves it to
    /// the host, `off` turns the tiles off, `on` needs them, anything else
    /// is an error naming the variable and its values.
    #[test]
    fn the_setting_takes_auto_on_and_off() {
        let parse = |v: Option<&str>, has: bool| {
            crate::lower::emit::pair_dot::cpu_setting(AMX_ENV, v, || has, "no tiles").map_err(|e| e.to_string())
        };
        for v in [None, Some(""), Some("auto"), Some(" auto ")] {
            assert_eq!(parse(v, true), Ok(None), "{v:?}");
        }
        assert_eq!(parse(Some("off"), false), Ok(Some(false)));
        assert_eq!(parse(Some("on"), true), Ok(Some(true)));
        let err = parse(Some("on"), false).unwrap_err();
        assert!(err.contains("BIFURC_CPU_AMX=on, but no tiles"), "{err}");
        let err = parse(Some("yes"), true).unwrap_err();
        assert!(err.contains("BIFURC_CPU_AMX=\"yes\" is not a setting") && err.contains("`off`"), "{err}");
    }
}
