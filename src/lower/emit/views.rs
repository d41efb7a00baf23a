//! Loads through views: index maps from a view's output back to a stored
//! buffer (or an inlined node).

use crate::ir::{Op, Poly, Value};
use crate::lower::plan::is_elementwise;
use crate::lower::LowerError;

use super::builder::{Ty, Val};
use super::Kc;

impl Kc<'_> {
    /// The element of `v` at multi-index `idx` (one `index` SSA per axis),
    /// as f32 (float data) or i64 (integer data).
    pub(crate) fn load(&mut self, v: Value, idx: &[String]) -> Result<Val, LowerError> {
        let ty = Ty::of(self.graph.dtype_of(v));
        let val = match v {
            Value::Input(i) => {
                let b = self.layout.input_buf.get(i).copied().flatten().ok_or_else(|| LowerError::Unsupported {
                    node: self.graph.name_of(v).to_owned(),
                    message: "graph input has no buffer in the program".into(),
                })?;
                self.load_buffer(b, idx)?
            }
            Value::Node(j) => {
                if let Some(b) = self.layout.node_buf.get(j).copied().flatten() {
                    self.load_buffer(b, idx)?
                } else {
                    let op = &self.graph.nodes[j].op;
                    if op.is_view() {
                        self.load_view(j, idx)?
                    } else if is_elementwise(op) {
                        self.compute(j, idx)?
                    } else {
                        return Err(self.unsupported(j, "is read but has no buffer (program does not match the graph)"));
                    }
                }
            }
        };
        Ok(self.b.coerce(val, ty))
    }

    /// The buffer that stores `v` itself (a graph input, or a node with its
    /// own kernel), if any: reading it at an index is one row-major load.
    pub(crate) fn stored(&self, v: Value) -> Option<usize> {
        match v {
            Value::Input(i) => self.layout.input_buf.get(i).copied().flatten(),
            Value::Node(j) => self.layout.node_buf.get(j).copied().flatten(),
        }
    }

    /// `lanes` consecutive elements of stored buffer `b` (float data)
    /// from `idx` along its last axis, as a `vector<lanes x f32>`.
    pub(crate) fn load_vector(&mut self, b: usize, idx: &[String], lanes: usize) -> Result<String, LowerError> {
        let (ptr, off) = self.buffer_offset(b, idx)?;
        let dtype = self.program.buffers[b].dtype;
        Ok(self.b.load_vector(&ptr, &off, lanes, dtype))
    }

    /// Prefetches element `idx` of stored buffer `b` for a read (see
    /// [`super::builder::Builder::prefetch`]).
    pub(crate) fn prefetch_buffer(&mut self, b: usize, idx: &[String]) -> Result<(), LowerError> {
        let (ptr, off) = self.buffer_offset(b, idx)?;
        let dtype = self.program.buffers[b].dtype;
        self.b.prefetch(&ptr, &off, dtype, false);
        Ok(())
    }

    /// Element `idx` of buffer `b` (row-major in the buffer's shape).
    fn load_buffer(&mut self, b: usize, idx: &[String]) -> Result<Val, LowerError> {
        let (ptr, off) = self.buffer_offset(b, idx)?;
        Ok(self.b.load(&ptr, &off, self.program.buffers[b].dtype))
    }

    /// The pointer of stored buffer `b` and the element offset of `idx` in
    /// it, as laid out in memory (a pitched axis strides by its capacity).
    pub(crate) fn buffer_offset(&mut self, b: usize, idx: &[String]) -> Result<(String, String), LowerError> {
        let buf = &self.program.buffers[b];
        if buf.shape.len() != idx.len() {
            return Err(LowerError::Unsupported {
                node: buf.name.clone(),
                message: format!("read with {} indices, buffer has rank {}", idx.len(), buf.shape.len()),
            });
        }
        let sizes = self.storage_sizes(b)?;
        let off = self.b.linearize(idx, &sizes);
        Ok((self.ptr(b)?, off))
    }

    /// Element `idx` of view node `j`: maps the index to its input(s).
    fn load_view(&mut self, j: usize, idx: &[String]) -> Result<Val, LowerError> {
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let first = *inputs.first().ok_or_else(|| self.unsupported(j, "view without an input"))?;
        match op {
            Op::Concat { axis } => {
                if axis >= idx.len() {
                    return Err(self.unsupported(j, "concat axis out of range"));
                }
                let ty = Ty::of(self.graph.nodes[j].dtype);
                let bounds = self.concat_offsets(&inputs, axis).unwrap_or_default();
                match self.pinned_part(&idx[axis], &bounds) {
                    // The index stays in part p (a row loop split there).
                    Some(p) => self.concat_read(inputs[p], axis, &bounds[p], idx, ty),
                    None => self.concat_part(&inputs, axis, 0, Poly::zero(), idx, ty),
                }
            }
            // The same element at the same row-major offset: no division
            // back into the input's axes.
            Op::Reshape { shape } if !self.graph.dims.same_shape(&shape, self.graph.shape_of(first)) => {
                match self.dense_source(first) {
                    Some(b) => {
                        let sizes = self.sizes(&shape)?;
                        let off = self.b.linearize(idx, &sizes);
                        let ptr = self.ptr(b)?;
                        Ok(self.b.load(&ptr, &off, self.program.buffers[b].dtype))
                    }
                    None => self.load_through(j, first, idx),
                }
            }
            _ => self.load_through(j, first, idx),
        }
    }

    /// Element `idx` of view node `j` read from its input `first` through
    /// the view's index map.
    fn load_through(&mut self, j: usize, first: Value, idx: &[String]) -> Result<Val, LowerError> {
        let inner = self.view_index(j, idx)?;
        self.load(first, &inner)
    }

    /// Element `idx` of a concat along `axis` read from its part `part`,
    /// which starts at `start` along it.
    fn concat_read(
        &mut self,
        part: Value,
        axis: usize,
        start: &Poly,
        idx: &[String],
        ty: Ty,
    ) -> Result<Val, LowerError> {
        let mut inner = idx.to_vec();
        let s = self.sizes(std::slice::from_ref(start))?.remove(0);
        inner[axis] = self.b.subi(&idx[axis], &s);
        let v = self.load(part, &inner)?;
        Ok(self.b.coerce(v, ty))
    }

    /// The stored buffer whose row-major elements are `v`'s row-major
    /// elements, offset for offset: `v` itself stored densely (no pitch),
    /// or a reshape of such a value, or a transpose of one that only moves
    /// size-1 axes (`[b, h, 1, k]` as `[b, 1, h, k]`, the merged heads of
    /// a decode step). A reshape of it then reads the buffer at its own
    /// row-major offset.
    fn dense_source(&self, v: Value) -> Option<usize> {
        if let Some(b) = self.stored(v) {
            let buf = &self.program.buffers[b];
            return (buf.pitch.is_none() && buf.dtype == self.graph.dtype_of(v)).then_some(b);
        }
        let Value::Node(j) = v else { return None };
        let node = &self.graph.nodes[j];
        let first = *node.inputs.first()?;
        match &node.op {
            Op::Reshape { .. } => self.dense_source(first),
            Op::Transpose { perm } => {
                let in_shape = self.graph.shape_of(first);
                let moved: Vec<usize> =
                    perm.iter().copied().filter(|&a| !in_shape.get(a).is_some_and(|d| self.is_one(d))).collect();
                moved.windows(2).all(|w| w[0] < w[1]).then(|| self.dense_source(first)).flatten()
            }
            _ => None,
        }
    }

    /// The index into the (first) input of view node `j` (a transpose,
    /// broadcast, slice or reshape) of its element `idx`.
    pub(crate) fn view_index(&mut self, j: usize, idx: &[String]) -> Result<Vec<String>, LowerError> {
        let node = &self.graph.nodes[j];
        let (op, inputs) = (node.op.clone(), node.inputs.clone());
        let first = *inputs.first().ok_or_else(|| self.unsupported(j, "view without an input"))?;
        let in_shape = self.graph.shape_of(first).clone();
        match op {
            Op::Transpose { perm } => {
                let mut inner = vec![String::new(); idx.len()];
                for (i, &p) in perm.iter().enumerate() {
                    let slot = inner.get_mut(p).ok_or_else(|| self.unsupported(j, "bad transpose perm"))?;
                    *slot = idx[i].clone();
                }
                Ok(inner)
            }
            Op::Broadcast { .. } => {
                let lead = idx
                    .len()
                    .checked_sub(in_shape.len())
                    .ok_or_else(|| self.unsupported(j, "broadcast to a lower rank"))?;
                let mut inner = Vec::with_capacity(in_shape.len());
                for (a, d) in in_shape.iter().enumerate() {
                    inner.push(if self.is_one(d) { self.b.index(0) } else { idx[lead + a].clone() });
                }
                Ok(inner)
            }
            Op::Slice { axis, start, .. } => {
                let mut inner = idx.to_vec();
                let s = self.sizes(std::slice::from_ref(&start))?.remove(0);
                let slot = inner.get_mut(axis).ok_or_else(|| self.unsupported(j, "slice axis out of range"))?;
                *slot = self.b.addi(&idx[axis], &s);
                Ok(inner)
            }
            Op::Reshape { shape } => {
                if self.graph.dims.same_shape(&shape, &in_shape) {
                    return Ok(idx.to_vec());
                }
                self.reshape_index(&shape, &in_shape, idx)
            }
            _ => Err(self.unsupported(j, "not a view")),
        }
    }

    /// Maps an index of a reshape's output (`out`) to its input (`inp`).
    /// Both shapes are split into consecutive groups of axes with equal
    /// (symbolic) products; each group is re-indexed on its own, so axes
    /// that stay put cost nothing and no division by a size outside the
    /// group happens. Falls back to one group (full linearize/delinearize).
    fn reshape_index(&mut self, out: &[Poly], inp: &[Poly], idx: &[String]) -> Result<Vec<String>, LowerError> {
        let groups = self.reshape_groups(out, inp).unwrap_or_else(|| vec![(0..out.len(), 0..inp.len())]);
        let mut inner = vec![String::new(); inp.len()];
        for (ro, ri) in groups {
            // Size-1 axes carry no index.
            let o: Vec<usize> = ro.filter(|&a| !self.is_one(&out[a])).collect();
            let mut i: Vec<usize> = Vec::new();
            for a in ri {
                if self.is_one(&inp[a]) {
                    inner[a] = self.b.index(0);
                } else {
                    i.push(a);
                }
            }
            if let ([x], [y]) = (&o[..], &i[..]) {
                inner[*y] = idx[*x].clone();
                continue;
            }
            let o_sizes = self.sizes(&o.iter().map(|&a| out[a].clone()).collect::<Vec<_>>())?;
            let i_sizes = self.sizes(&i.iter().map(|&a| inp[a].clone()).collect::<Vec<_>>())?;
            let o_idx: Vec<String> = o.iter().map(|&a| idx[a].clone()).collect();
            let flat = self.b.linearize(&o_idx, &o_sizes);
            if i.is_empty() {
                continue;
            }
            for (a, v) in i.iter().zip(self.b.delinearize(&flat, &i_sizes)) {
                inner[*a] = v;
            }
        }
        Ok(inner)
    }

    /// Consecutive axis groups of `a` and `b` with equal products, found by
    /// growing the side whose product is smaller at a probe point; `None`
    /// when no such split exists (or sizes overflow at the probe).
    pub(super) fn reshape_groups(
        &self,
        a: &[Poly],
        b: &[Poly],
    ) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
        let dims = &self.graph.dims;
        let probe = |p: &Poly| -> Option<i64> {
            dims.eval(p, &dims.runtime.iter().enumerate().map(|(k, d)| (d.clone(), 1009 + 10 * k as i64)).collect())
                .ok()
        };
        let prod = |s: &[Poly]| -> Option<Poly> {
            s.iter().try_fold(Poly::constant(1), |acc, p| acc.mul(p).ok()).and_then(|p| dims.normalize(&p).ok())
        };
        let (mut i, mut j) = (0, 0);
        let mut groups = Vec::new();
        while i < a.len() || j < b.len() {
            let (mut ei, mut ej) = ((i + 1).min(a.len()), (j + 1).min(b.len()));
            loop {
                let (pa, pb) = (prod(&a[i..ei])?, prod(&b[j..ej])?);
                if pa == pb {
                    break;
                }
                let (va, vb) = (probe(&pa)?, probe(&pb)?);
                if (va < vb && ei < a.len()) || ej == b.len() {
                    if ei == a.len() {
                        return None;
                    }
                    ei += 1;
                } else {
                    ej += 1;
                }
            }
            groups.push((i..ei, j..ej));
            (i, j) = (ei, ej);
        }
        Some(groups)
    }

    /// Loads from part `k` of a concat (or a later one): `start` is where
    /// part `k` begins along `axis`.
    fn concat_part(
        &mut self,
        parts: &[Value],
        axis: usize,
        k: usize,
        start: Poly,
        idx: &[String],
        ty: Ty,
    ) -> Result<Val, LowerError> {
        let part = parts[k];
        let len = self.graph.shape_of(part).get(axis).cloned().unwrap_or_else(Poly::zero);
        let end =
            start.add(&len).map_err(|e| LowerError::Size { what: "concat offset".into(), message: e.to_string() })?;
        if k + 1 == parts.len() {
            return self.concat_read(part, axis, &start, idx, ty);
        }
        let e = self.sizes(std::slice::from_ref(&end))?.remove(0);
        let cond = self.b.ult(&idx[axis], &e);
        let r = self.b.open_if(&cond, ty);
        let a = self.concat_read(part, axis, &start, idx, ty)?;
        self.b.else_branch(&a.ssa, ty);
        let rest = self.concat_part(parts, axis, k + 1, end, idx, ty)?;
        self.b.close_if(&rest.ssa, ty);
        Ok(Val { ssa: r, ty })
    }

    /// A size's value when it is the same for every value of the runtime
    /// dims.
    pub(crate) fn constant_size(&self, p: &Poly) -> Option<i64> {
        self.graph.dims.normalize(p).ok().and_then(|d| d.as_constant())
    }

    /// True when a size is 1 for every value of the runtime dims.
    pub(crate) fn is_one(&self, p: &Poly) -> bool {
        self.graph.dims.same(p, &Poly::constant(1))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::lower::emit::{emit, Target};
    use crate::lower::CpuStep;

    /// `x [b, h, n, k]` with its heads merged (`transpose` to `[b, n, h, k]`,
    /// `reshape` to `[b, n, h·k]`) and projected. At n = 1 the transpose
    /// only moves a size-1 axis, so the merged row is read at its own
    /// offset (no division by k); at n = 2 it really permutes and is read
    /// through the index map. Both against the interpreter.
    #[test]
    fn merged_heads_read_at_their_offset() {
        for (n, flat) in [(1, true), (2, false)] {
            let doc = serde_json::json!({
                "format": "bifurc-graph/1",
                "dims": {"runtime": ["b"], "constants": {"h": 4, "k": 24, "n": n}},
                "inputs": [
                    {"name": "x", "role": "activation", "shape": ["b", "h", "n", "k"], "dtype": "f32"},
                    {"name": "w", "role": "weight", "shape": ["h*k", 8], "dtype": "f32"}
                ],
                "nodes": [
                    {"id": "x_t", "op": "transpose", "inputs": ["x"], "attrs": {"perm": [0, 2, 1, 3]}},
                    {"id": "merged", "op": "reshape", "inputs": ["x_t"], "attrs": {"shape": ["b", "n", "h*k"]}},
                    {"id": "o", "op": "matmul", "inputs": ["merged", "w"]}
                ],
                "outputs": [{"name": "o", "node": "o"}]
            });
            let graph = crate::import::from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
            let step = CpuStep::compile(&graph).unwrap_or_else(|e| panic!("{e}"));
            let text = emit(step.graph(), step.program(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
            let divides = text.contains("arith.remui");
            assert_eq!(!divides, flat, "n = {n}: merged heads read {}:\n{text}", if flat { "flat" } else { "mapped" });
            for b in [1, 3] {
                let point = BTreeMap::from([("b".to_string(), b)]);
                let inputs = crate::interp::random_inputs(&graph, &point, 5).unwrap_or_else(|e| panic!("{e}"));
                let want = crate::interp::run(&graph, &point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let got = step.run(&point, &inputs).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got["o"].shape, want["o"].shape);
                for (x, y) in got["o"].data.iter().zip(&want["o"].data) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "n = {n}, b = {b}: {x} vs {y}");
                }
            }
        }
    }
}
