//! A small textual-MLIR function builder: fresh SSA names, hoisted
//! constants and symbolic sizes, and structured `scf.for` / `scf.if`.
//!
//! Two text sections: `hoist` (constants, dim casts, sizes: they depend on
//! nothing inside loops, so they go at the top of the function, where every
//! nested region sees them) and `body` (the per-element code, nested).

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::ir::{DType, Poly};
use crate::lower::LowerError;

/// Bytes of a cache line: what a streaming store writes at once.
const LINE_BYTES: usize = 64;

/// The type of a computed value: floats are computed in f32, integers
/// (ids, positions) in i64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    F32,
    I64,
}

impl Ty {
    pub(crate) fn of(dtype: DType) -> Ty {
        if dtype.is_float() {
            Ty::F32
        } else {
            Ty::I64
        }
    }

    pub(crate) fn mlir(self) -> &'static str {
        match self {
            Ty::F32 => "f32",
            Ty::I64 => "i64",
        }
    }
}

/// A computed SSA value and its type.
#[derive(Clone, Debug)]
pub(crate) struct Val {
    pub ssa: String,
    pub ty: Ty,
}

impl Val {
    pub(crate) fn f32(ssa: String) -> Self {
        Val { ssa, ty: Ty::F32 }
    }
}

/// The MLIR element type stored for a dtype.
pub(crate) fn storage(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I32 => "i32",
        DType::I64 => "i64",
    }
}

/// Builds one function's text.
pub(crate) struct Builder {
    hoist: String,
    body: String,
    depth: usize,
    next: usize,
    cache: HashMap<String, String>,
    /// Value of every `index` constant, by SSA name.
    known: HashMap<String, i64>,
    /// Every sum of an `index` and a constant ([`Builder::addi`]): the
    /// value it was added to (itself no such sum) and the constant, by
    /// SSA name.
    offsets: HashMap<String, (String, i64)>,
    /// Index-typed SSA name of every runtime dim, by name.
    dims: Vec<(String, String)>,
    /// Whether the body stores past the caches
    /// ([`Builder::store_vector_streaming`]): it then ends with a fence.
    streamed: bool,
    /// Whether bf16 is rounded by [`Builder::bf16_bits`] (the CPU: see
    /// `emit::round_bf16`) rather than `arith.truncf` (the GPU, which
    /// has an instruction for it).
    pub(crate) bf16_in_ints: bool,
}

impl Builder {
    /// `dims`: runtime dim names and their `i64` parameter names; each is
    /// cast to `index` at the top of the function.
    pub(crate) fn new(dims: &[(String, String)]) -> Self {
        let mut b = Builder {
            hoist: String::new(),
            body: String::new(),
            depth: 0,
            next: 0,
            cache: HashMap::new(),
            known: HashMap::new(),
            offsets: HashMap::new(),
            dims: Vec::new(),
            streamed: false,
            bf16_in_ints: false,
        };
        for (name, param) in dims {
            let v = b.fresh();
            let _ = writeln!(b.hoist, "{v} = arith.index_cast {param} : i64 to index");
            b.dims.push((name.clone(), v));
        }
        b
    }

    /// The index-typed SSA value of parameter `name` given to [`Builder::new`].
    pub(crate) fn dim(&self, name: &str) -> Option<String> {
        self.dims.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    /// A new SSA name.
    pub(crate) fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    /// Appends one line to the body at the current nesting.
    pub(crate) fn line(&mut self, text: &str) {
        for _ in 0..self.depth {
            self.body.push_str("  ");
        }
        self.body.push_str(text);
        self.body.push('\n');
    }

    /// Emits `%new = rhs` in the body and returns `%new`.
    pub(crate) fn op(&mut self, rhs: &str) -> String {
        let v = self.fresh();
        self.line(&format!("{v} = {rhs}"));
        v
    }

    /// A hoisted value, cached by `key`.
    fn hoisted(
        &mut self,
        key: String,
        rhs: impl FnOnce(&mut Self) -> Result<String, LowerError>,
    ) -> Result<String, LowerError> {
        if let Some(v) = self.cache.get(&key) {
            return Ok(v.clone());
        }
        let rhs = rhs(self)?;
        let v = self.fresh();
        let _ = writeln!(self.hoist, "{v} = {rhs}");
        self.cache.insert(key, v.clone());
        Ok(v)
    }

    /// `%new = rhs` in the hoisted section (cached by `rhs`): `rhs` may use
    /// only parameters and other hoisted values.
    pub(crate) fn hoist(&mut self, rhs: &str) -> String {
        self.hoisted(format!("h{rhs}"), |_| Ok(rhs.to_owned())).unwrap_or_default()
    }

    /// A stack slot of `count` f32 (64-byte aligned) allocated once in the
    /// hoisted section, cached by `key`; when `init` (an f32 SSA value
    /// hoisted before this call) is given, its first element is set to it
    /// there. Kernels run their parts as separate calls, so each part has
    /// its own slot.
    pub(crate) fn stack_f32(&mut self, key: &str, count: usize, init: Option<&str>) -> String {
        if let Some(v) = self.cache.get(&format!("s{key}")) {
            return v.clone();
        }
        let n = self.i64(count as i64);
        let slot = self.fresh();
        let _ = writeln!(self.hoist, "{slot} = llvm.alloca {n} x f32 {{alignment = 64 : i64}} : (i64) -> !llvm.ptr");
        if let Some(init) = init {
            let _ = writeln!(self.hoist, "llvm.store {init}, {slot} : f32, !llvm.ptr");
        }
        self.cache.insert(format!("s{key}"), slot.clone());
        slot
    }

    /// An `index` constant.
    pub(crate) fn index(&mut self, c: i64) -> String {
        let v = self.hoisted(format!("i{c}"), |_| Ok(format!("arith.constant {c} : index"))).unwrap_or_default();
        self.known.insert(v.clone(), c);
        v
    }

    /// The value of an `index` SSA name, when it is a constant.
    pub(crate) fn known(&self, v: &str) -> Option<i64> {
        self.known.get(v).copied()
    }

    /// An `f32` constant (exact: written as its bit pattern).
    pub(crate) fn f32(&mut self, x: f32) -> String {
        let bits = x.to_bits();
        self.hoisted(format!("f{bits:08X}"), |_| Ok(format!("arith.constant 0x{bits:08X} : f32"))).unwrap_or_default()
    }

    /// An `i32` constant.
    pub(crate) fn i32(&mut self, c: i32) -> String {
        self.hoisted(format!("w{c}"), |_| Ok(format!("arith.constant {c} : i32"))).unwrap_or_default()
    }

    /// An `i64` constant.
    pub(crate) fn i64(&mut self, c: i64) -> String {
        self.hoisted(format!("l{c}"), |_| Ok(format!("arith.constant {c} : i64"))).unwrap_or_default()
    }

    /// A symbolic size (already normalized: runtime dims only) as `index`.
    pub(crate) fn size(&mut self, p: &Poly) -> Result<String, LowerError> {
        if let Some(c) = p.as_constant() {
            return Ok(self.index(c));
        }
        let key = format!("p{p}");
        if let Some(v) = self.cache.get(&key) {
            return Ok(v.clone());
        }
        let mut acc: Option<String> = None;
        let terms: Vec<(Vec<String>, i64)> = p.terms().map(|(m, c)| (m.clone(), c)).collect();
        for (mono, coeff) in terms {
            let mut term: Option<String> = if coeff == 1 { None } else { Some(self.index(coeff)) };
            for sym in &mono {
                let d = self.dims.iter().find(|(n, _)| n == sym).map(|(_, v)| v.clone()).ok_or_else(|| {
                    LowerError::Size { what: format!("size `{p}`"), message: format!("`{sym}` is not a runtime dim") }
                })?;
                term = Some(match term {
                    None => d,
                    Some(t) => self.hoisted(format!("m{t}*{d}"), |_| Ok(format!("arith.muli {t}, {d} : index")))?,
                });
            }
            let term = term.unwrap_or_else(|| self.index(1));
            acc = Some(match acc {
                None => term,
                Some(a) => self.hoisted(format!("a{a}+{term}"), |_| Ok(format!("arith.addi {a}, {term} : index")))?,
            });
        }
        let v = acc.unwrap_or_else(|| self.index(0));
        self.cache.insert(key, v.clone());
        Ok(v)
    }

    /// Opens `scf.for %j = 0 to ub` carrying one accumulator of type `ty`
    /// from `init`; returns `(result, j, acc)`. Close with
    /// [`Builder::close_for`].
    pub(crate) fn open_for(&mut self, ub: &str, init: &str, ty: Ty) -> (String, String, String) {
        let (c0, c1) = (self.index(0), self.index(1));
        let (r, j, a) = (self.fresh(), self.fresh(), self.fresh());
        let t = ty.mlir();
        self.line(&format!("{r} = scf.for {j} = {c0} to {ub} step {c1} iter_args({a} = {init}) -> ({t}) {{"));
        self.depth += 1;
        (r, j, a)
    }

    /// [`Builder::open_for`] from `lb` in steps of `step` (a row kernel's
    /// lane walks its row `lb = lane, lane + lanes, …`).
    pub(crate) fn open_for_from(
        &mut self,
        lb: &str,
        ub: &str,
        step: &str,
        init: &str,
        ty: Ty,
    ) -> (String, String, String) {
        let (r, j, a) = (self.fresh(), self.fresh(), self.fresh());
        let t = ty.mlir();
        self.line(&format!("{r} = scf.for {j} = {lb} to {ub} step {step} iter_args({a} = {init}) -> ({t}) {{"));
        self.depth += 1;
        (r, j, a)
    }

    /// [`Builder::open_loop`] from `lb` in steps of `step`.
    pub(crate) fn open_loop_from(&mut self, lb: &str, ub: &str, step: &str) -> String {
        let j = self.fresh();
        self.line(&format!("scf.for {j} = {lb} to {ub} step {step} {{"));
        self.depth += 1;
        j
    }

    /// Yields the next accumulator and closes the loop.
    pub(crate) fn close_for(&mut self, next: &str, ty: Ty) {
        self.close_for_typed(&[next.to_owned()], ty.mlir());
    }

    /// Opens `scf.for %j = 0 to ub` carrying one f32 accumulator per
    /// `inits` entry; returns `(results, j, accs)`. With one accumulator the
    /// text is that of [`Builder::open_for`]. Close with
    /// [`Builder::close_for_n`].
    pub(crate) fn open_for_n(&mut self, ub: &str, inits: &[String]) -> (Vec<String>, String, Vec<String>) {
        if let [init] = inits {
            let (r, j, a) = self.open_for(ub, init, Ty::F32);
            return (vec![r], j, vec![a]);
        }
        let (c0, c1) = (self.index(0), self.index(1));
        self.open_for_typed_from(&c0, ub, &c1, inits, "f32")
    }

    /// Opens `scf.for %j = 0 to ub step step` carrying accumulators of MLIR
    /// type `ty`; returns `(results, j, accs)`. Close with
    /// [`Builder::close_for_typed`].
    pub(crate) fn open_for_typed(
        &mut self,
        ub: &str,
        step: &str,
        inits: &[String],
        ty: &str,
    ) -> (Vec<String>, String, Vec<String>) {
        let c0 = self.index(0);
        self.open_for_typed_from(&c0, ub, step, inits, ty)
    }

    /// [`Builder::open_for_typed`] from `lb`.
    pub(crate) fn open_for_typed_from(
        &mut self,
        lb: &str,
        ub: &str,
        step: &str,
        inits: &[String],
        ty: &str,
    ) -> (Vec<String>, String, Vec<String>) {
        let (r, j) = (self.fresh(), self.fresh());
        let accs: Vec<String> = inits.iter().map(|_| self.fresh()).collect();
        let args: Vec<String> = accs.iter().zip(inits).map(|(a, i)| format!("{a} = {i}")).collect();
        let tys = vec![ty; inits.len()].join(", ");
        let n = inits.len();
        self.line(&format!(
            "{r}:{n} = scf.for {j} = {lb} to {ub} step {step} iter_args({}) -> ({tys}) {{",
            args.join(", ")
        ));
        self.depth += 1;
        let results = (0..n).map(|k| format!("{r}#{k}")).collect();
        (results, j, accs)
    }

    /// Yields the next accumulators of type `ty` and closes the loop.
    pub(crate) fn close_for_typed(&mut self, nexts: &[String], ty: &str) {
        let tys = vec![ty; nexts.len()].join(", ");
        self.line(&format!("scf.yield {} : {tys}", nexts.join(", ")));
        self.depth = self.depth.saturating_sub(1);
        self.line("}");
    }

    /// Loads `lanes` consecutive elements stored as `dtype` (a float) from
    /// element `off` of `ptr` as a `vector<lanes x f32>` (f16 / bf16
    /// widened exactly; element alignment only).
    pub(crate) fn load_vector(&mut self, ptr: &str, off: &str, lanes: usize, dtype: DType) -> String {
        let st = storage(dtype);
        let p = self.element_ptr(ptr, off, st);
        let align = dtype.size();
        let x = self.op(&format!("llvm.load {p} {{alignment = {align} : i64}} : !llvm.ptr -> vector<{lanes}x{st}>"));
        match dtype {
            DType::F32 => x,
            _ => self.op(&format!("arith.extf {x} : vector<{lanes}x{st}> to vector<{lanes}xf32>")),
        }
    }

    /// Stores vector `v` of `lanes` f32 at element `off` of `ptr`, as
    /// `dtype` (a float: f16 / bf16 rounded as [`Builder::store`] rounds a
    /// scalar; element alignment only).
    pub(crate) fn store_vector(&mut self, ptr: &str, off: &str, v: &str, lanes: usize, dtype: DType) {
        let (x, ty) = self.stored_vector(v, lanes, dtype);
        let p = self.element_ptr(ptr, off, storage(dtype));
        let align = dtype.size();
        self.line(&format!("llvm.store {x}, {p} {{alignment = {align} : i64}} : {ty}, !llvm.ptr"));
    }

    /// Stores vector `v` as [`Builder::store_vector`] does, but past the
    /// caches (a non-temporal store) when it is at least a cache line and
    /// its address a multiple of a line, as such a store needs (a vector of
    /// more than a line is stored a line at a time), and as a plain store
    /// where it is not. A plain store of a line not in cache first reads
    /// the line (for ownership), and the context `q·K`'s scores (16 MB a
    /// layer at b = 32, m_c = 8192) are written where no cache holds them
    /// (see `rows_in_lanes`). The body then ends with a fence (see
    /// [`Builder::finish`]): these stores are weakly ordered, and the
    /// fence makes them visible before the part returns to the pool,
    /// whose other threads read them in the next kernel.
    pub(crate) fn store_vector_streaming(&mut self, ptr: &str, off: &str, v: &str, lanes: usize, dtype: DType) {
        if lanes * dtype.size() < LINE_BYTES {
            // Less than a line: streamed, each store would write a partial
            // line to memory on its own (the rows-in-lanes q·K's 16 bf16
            // scores: 7-9 -> 25 ms a layer); in cache, the next store
            // completes the line.
            self.store_vector(ptr, off, v, lanes, dtype);
            return;
        }
        let bytes = LINE_BYTES;
        let a = self.misalignment(ptr, off, bytes / dtype.size(), dtype);
        let zero = self.index(0);
        let aligned = self.op(&format!("arith.cmpi eq, {a}, {zero} : index"));
        let (x, ty) = self.stored_vector(v, lanes, dtype);
        let p = self.element_ptr(ptr, off, storage(dtype));
        self.open_guard(&aligned);
        // As integers of the same width: LLVM's x86 backend has no
        // streaming store of `bf16` / `f16` vectors and stores them plainly,
        // each line read for ownership first (the nontemporal hint dropped).
        let (bits, bits_ty) = match dtype {
            DType::F32 => (x.clone(), ty.clone()),
            _ => self.half_bits(&x, &ty, lanes),
        };
        self.line(&format!("llvm.store {bits}, {p} {{alignment = {bytes} : i64, nontemporal}} : {bits_ty}, !llvm.ptr"));
        self.else_guard();
        let align = dtype.size();
        self.line(&format!("llvm.store {x}, {p} {{alignment = {align} : i64}} : {ty}, !llvm.ptr"));
        self.close();
        self.streamed = true;
    }

    /// How many elements element `off` of the buffer at `ptr` (stored as
    /// `dtype`) lies past a multiple of `lanes` elements' bytes, as an
    /// `index`: 0 where [`Builder::store_vector_streaming`] stores a
    /// vector of `lanes` there past the caches.
    pub(crate) fn misalignment(&mut self, ptr: &str, off: &str, lanes: usize, dtype: DType) -> String {
        let p = self.element_ptr(ptr, off, storage(dtype));
        let size = dtype.size() as i64;
        let addr = self.op(&format!("llvm.ptrtoint {p} : !llvm.ptr to i64"));
        let mask = self.i64(lanes as i64 * size - 1);
        let low = self.op(&format!("arith.andi {addr}, {mask} : i64"));
        let size = self.i64(size);
        let elems = self.op(&format!("arith.divui {low}, {size} : i64"));
        self.op(&format!("arith.index_cast {elems} : i64 to index"))
    }

    /// Stores the lanes of vector `v` that `mask` (a `vector<lanes x i1>`)
    /// selects, as [`Builder::store_vector`] stores them; the other lanes'
    /// elements are not touched.
    pub(crate) fn store_vector_masked(
        &mut self,
        ptr: &str,
        off: &str,
        v: &str,
        lanes: usize,
        dtype: DType,
        mask: &str,
    ) {
        let (x, ty) = self.stored_vector(v, lanes, dtype);
        // Halves stored as 16-bit integers: a CPU without a masked store of
        // 16-bit lanes (AVX2) stores them one at a time, and one bf16 at a
        // time goes through f32 and a libcall (`__truncsfbf2`) that the JIT
        // does not resolve (the kernel then was missing from it).
        let (x, ty) = match dtype {
            DType::F32 => (x, ty),
            _ => self.half_bits(&x, &ty, lanes),
        };
        let p = self.element_ptr(ptr, off, storage(dtype));
        let align = dtype.size();
        self.line(&format!(
            "llvm.intr.masked.store {x}, {p}, {mask} {{alignment = {align} : i32}} : {ty}, vector<{lanes}xi1> into !llvm.ptr"
        ));
    }

    /// Vector `v` of `lanes` f32 as stored as `dtype` (a float: rounded to
    /// f16 / bf16 as [`Builder::store`] rounds a scalar), and its type.
    /// bf16 on the CPU as its bits, `vector<lanes x i16>`
    /// ([`Builder::bf16_bits`]: `arith.truncf`'s bits, in operations LLVM
    /// keeps in vectors).
    fn stored_vector(&mut self, v: &str, lanes: usize, dtype: DType) -> (String, String) {
        let st = storage(dtype);
        match dtype {
            DType::F32 => (v.to_owned(), format!("vector<{lanes}x{st}>")),
            DType::BF16 if self.bf16_in_ints => (self.bf16_bits(v, Some(lanes)), format!("vector<{lanes}xi16>")),
            _ => {
                let x = self.op(&format!("arith.truncf {v} : vector<{lanes}xf32> to vector<{lanes}x{st}>"));
                (x, format!("vector<{lanes}x{st}>"))
            }
        }
    }

    /// Stored vector `x` of `lanes` halves (type `ty`, see
    /// [`Builder::stored_vector`]) as 16-bit integers, and their type: `x`
    /// itself where it already is (bf16 on the CPU).
    fn half_bits(&mut self, x: &str, ty: &str, lanes: usize) -> (String, String) {
        let ity = format!("vector<{lanes}xi16>");
        if ty == ity {
            return (x.to_owned(), ity);
        }
        (self.op(&format!("llvm.bitcast {x} : {ty} to {ity}")), ity)
    }

    /// Prefetches the cache line of element `off` of the buffer at `ptr`
    /// (stored as `dtype`) into every cache level, for a read or (`write`)
    /// a store. The address may lie past the buffer: a prefetch does not
    /// fault, and the address is computed without `inbounds`.
    pub(crate) fn prefetch(&mut self, ptr: &str, off: &str, dtype: DType, write: bool) {
        self.prefetch_to(ptr, off, dtype, write, 3);
    }

    /// [`Builder::prefetch`] with LLVM's locality `hint` (3: every level,
    /// 2: L2 and beyond, as x86's `prefetcht1`).
    pub(crate) fn prefetch_to(&mut self, ptr: &str, off: &str, dtype: DType, write: bool, hint: u8) {
        let o = self.index_to_i64(off);
        let st = storage(dtype);
        let p = self.op(&format!("llvm.getelementptr {ptr}[{o}] : (!llvm.ptr, i64) -> !llvm.ptr, {st}"));
        let rw = i32::from(write);
        self.line(&format!(
            "\"llvm.intr.prefetch\"({p}) <{{cache = 1 : i32, hint = {hint} : i32, rw = {rw} : i32}}> : (!llvm.ptr) -> ()"
        ));
    }

    /// Yields the next accumulators (f32) and closes the loop.
    pub(crate) fn close_for_n(&mut self, nexts: &[String]) {
        self.close_for_typed(nexts, "f32");
    }

    /// Opens `scf.for %j = 0 to ub` without results (a loop of stores);
    /// returns `j`. Close with [`Builder::close`].
    pub(crate) fn open_loop(&mut self, ub: &str) -> String {
        let (c0, c1) = (self.index(0), self.index(1));
        let j = self.fresh();
        self.line(&format!("scf.for {j} = {c0} to {ub} step {c1} {{"));
        self.depth += 1;
        j
    }

    /// Opens `scf.if cond {` without results. Close with [`Builder::close`].
    pub(crate) fn open_guard(&mut self, cond: &str) {
        self.line(&format!("scf.if {cond} {{"));
        self.depth += 1;
    }

    /// Ends the then-region of [`Builder::open_guard`] and opens its else.
    pub(crate) fn else_guard(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        self.line("} else {");
        self.depth += 1;
    }

    /// Closes a region opened by [`Builder::open_loop`] or
    /// [`Builder::open_guard`].
    pub(crate) fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        self.line("}");
    }

    /// Opens `scf.if cond -> ty {`; returns the result name.
    pub(crate) fn open_if(&mut self, cond: &str, ty: Ty) -> String {
        self.open_if_typed(cond, ty.mlir())
    }

    /// Yields the then-value and opens the else region.
    pub(crate) fn else_branch(&mut self, then: &str, ty: Ty) {
        self.else_branch_typed(then, ty.mlir());
    }

    /// Yields the else-value and closes the `scf.if`.
    pub(crate) fn close_if(&mut self, otherwise: &str, ty: Ty) {
        self.close_if_typed(otherwise, ty.mlir());
    }

    /// [`Builder::open_if`] with a result of MLIR type `ty` (a vector).
    pub(crate) fn open_if_typed(&mut self, cond: &str, ty: &str) -> String {
        let r = self.fresh();
        self.line(&format!("{r} = scf.if {cond} -> ({ty}) {{"));
        self.depth += 1;
        r
    }

    /// [`Builder::else_branch`] for a result of MLIR type `ty`.
    pub(crate) fn else_branch_typed(&mut self, then: &str, ty: &str) {
        self.line(&format!("scf.yield {then} : {ty}"));
        self.else_guard();
    }

    /// [`Builder::close_if`] for a result of MLIR type `ty`.
    pub(crate) fn close_if_typed(&mut self, otherwise: &str, ty: &str) {
        self.close_for_typed(&[otherwise.to_owned()], ty);
    }

    /// Index arithmetic helpers (body).
    pub(crate) fn addi(&mut self, a: &str, b: &str) -> String {
        let v = self.op(&format!("arith.addi {a}, {b} : index"));
        let (from, c) = match (self.known(a), self.known(b)) {
            (_, Some(c)) => (a, c),
            (Some(c), None) => (b, c),
            (None, None) => return v,
        };
        let (root, off) = self.offsets.get(from).cloned().unwrap_or_else(|| (from.to_owned(), 0));
        self.offsets.insert(v.clone(), (root, off + c));
        v
    }

    /// `b - a` where both are the same `index` value plus constants
    /// ([`Builder::addi`]): what the emitters know of two indices
    /// without running them. `None` where it is not known.
    pub(crate) fn offset_between(&self, a: &str, b: &str) -> Option<i64> {
        let of = |v: &str| self.offsets.get(v).cloned().unwrap_or_else(|| (v.to_owned(), 0));
        let ((ra, oa), (rb, ob)) = (of(a), of(b));
        (ra == rb).then_some(ob - oa)
    }

    pub(crate) fn subi(&mut self, a: &str, b: &str) -> String {
        self.op(&format!("arith.subi {a}, {b} : index"))
    }

    pub(crate) fn muli(&mut self, a: &str, b: &str) -> String {
        self.op(&format!("arith.muli {a}, {b} : index"))
    }

    /// `a < b` on `index` (unsigned: indices are never negative).
    pub(crate) fn ult(&mut self, a: &str, b: &str) -> String {
        self.op(&format!("arith.cmpi ult, {a}, {b} : index"))
    }

    /// An `index` as `i64`.
    pub(crate) fn index_to_i64(&mut self, a: &str) -> String {
        self.op(&format!("arith.index_cast {a} : index to i64"))
    }

    /// An `index` as `f32`.
    pub(crate) fn index_to_f32(&mut self, a: &str) -> String {
        let i = self.index_to_i64(a);
        self.op(&format!("arith.sitofp {i} : i64 to f32"))
    }

    /// Row-major flat offset of `idx` in `sizes`.
    pub(crate) fn linearize(&mut self, idx: &[String], sizes: &[String]) -> String {
        let mut acc: Option<String> = None;
        for (i, s) in idx.iter().zip(sizes) {
            acc = Some(match acc {
                None => i.clone(),
                Some(a) => {
                    let m = if self.known(s) == Some(1) { a } else { self.muli(&a, s) };
                    if self.known(i) == Some(0) {
                        m
                    } else {
                        self.addi(&m, i)
                    }
                }
            });
        }
        acc.unwrap_or_else(|| self.index(0))
    }

    /// Row-major multi-index of `flat` in `sizes` (the first axis is not
    /// reduced modulo its size: `flat` is in range).
    pub(crate) fn delinearize(&mut self, flat: &str, sizes: &[String]) -> Vec<String> {
        let mut out = vec![String::new(); sizes.len()];
        let mut rest = flat.to_owned();
        for k in (0..sizes.len()).rev() {
            if self.known(&sizes[k]) == Some(1) {
                out[k] = self.index(0);
            } else if k == 0 {
                out[0] = rest.clone();
            } else {
                out[k] = self.op(&format!("arith.remui {rest}, {} : index", sizes[k]));
                rest = self.op(&format!("arith.divui {rest}, {} : index", sizes[k]));
            }
        }
        out
    }

    /// Float helpers (body, f32).
    pub(crate) fn fbin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(&format!("arith.{op} {a}, {b} : f32"))
    }

    /// `total + v`, or `v` as the first term of a sum added in order.
    pub(crate) fn add_in_order(&mut self, total: Option<String>, v: String) -> String {
        match total {
            None => v,
            Some(t) => self.fbin("addf", &t, &v),
        }
    }

    pub(crate) fn math(&mut self, op: &str, a: &str) -> String {
        self.op(&format!("math.{op} {a} : f32"))
    }

    /// Converts a value to `ty`.
    pub(crate) fn coerce(&mut self, v: Val, ty: Ty) -> Val {
        match (v.ty, ty) {
            (a, b) if a == b => v,
            (Ty::I64, Ty::F32) => Val::f32(self.op(&format!("arith.sitofp {} : i64 to f32", v.ssa))),
            (_, _) => Val { ssa: self.op(&format!("arith.fptosi {} : f32 to i64", v.ssa)), ty: Ty::I64 },
        }
    }

    /// The address of element `off` (an `index`) of the buffer at `ptr`
    /// whose elements are `st` (an MLIR storage type).
    pub(crate) fn element_ptr(&mut self, ptr: &str, off: &str, st: &str) -> String {
        let o = self.index_to_i64(off);
        self.op(&format!("llvm.getelementptr inbounds {ptr}[{o}] : (!llvm.ptr, i64) -> !llvm.ptr, {st}"))
    }

    /// Loads element `off` (an `index`) of the buffer at `ptr` stored as
    /// `dtype`, widened to f32 / i64.
    pub(crate) fn load(&mut self, ptr: &str, off: &str, dtype: DType) -> Val {
        let st = storage(dtype);
        let p = self.element_ptr(ptr, off, st);
        let x = self.op(&format!("llvm.load {p} : !llvm.ptr -> {st}"));
        match dtype {
            DType::F32 | DType::I64 => Val { ssa: x, ty: Ty::of(dtype) },
            DType::F16 | DType::BF16 => Val::f32(self.op(&format!("arith.extf {x} : {st} to f32"))),
            DType::I32 => Val { ssa: self.op(&format!("arith.extsi {x} : i32 to i64")), ty: Ty::I64 },
        }
    }

    /// Stores `v` (converted to `dtype`) at element `off` of `ptr`.
    pub(crate) fn store(&mut self, ptr: &str, off: &str, dtype: DType, v: Val) {
        let st = storage(dtype);
        let v = self.coerce(v, Ty::of(dtype));
        let (x, ty) = match dtype {
            DType::F32 | DType::I64 => (v.ssa, st),
            DType::BF16 if self.bf16_in_ints => (self.bf16_bits(&v.ssa, None), "i16"),
            DType::F16 | DType::BF16 => (self.op(&format!("arith.truncf {} : f32 to {st}", v.ssa)), st),
            DType::I32 => (self.op(&format!("arith.trunci {} : i64 to i32", v.ssa)), st),
        };
        let p = self.element_ptr(ptr, off, st);
        self.line(&format!("llvm.store {x}, {p} : {ty}, !llvm.ptr"));
    }

    /// The hoisted section and the body, consuming the builder; a body
    /// that streams stores ([`Builder::store_vector_streaming`]) ends with
    /// a sequentially consistent fence (x86: `mfence`, which orders them).
    pub(crate) fn finish(mut self) -> (String, String) {
        if self.streamed {
            self.line("llvm.fence seq_cst");
        }
        (self.hoist, self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::Builder;

    /// Sums of an index and constants are known apart by their difference
    /// (whichever side the constant is on, through chains of sums), other
    /// values not.
    #[test]
    fn offsets_between_sums_of_constants() {
        let mut b = Builder::new(&[]);
        let (x, y) = (b.op("arith.constant 7 : index"), b.op("arith.constant 9 : index"));
        let (c16, c32) = (b.index(16), b.index(32));
        let x16 = b.addi(&x, &c16);
        let x32 = b.addi(&c32, &x);
        let x48 = b.addi(&x32, &c16);
        assert_eq!(b.offset_between(&x, &x16), Some(16));
        assert_eq!(b.offset_between(&x16, &x48), Some(32));
        assert_eq!(b.offset_between(&x48, &x32), Some(-16));
        assert_eq!(b.offset_between(&x, &x), Some(0));
        let xy = b.addi(&x, &y);
        assert_eq!(b.offset_between(&x, &xy), None);
        let y16 = b.addi(&y, &c16);
        assert_eq!(b.offset_between(&x16, &y16), None);
    }
}
