//! Strided loop nests: the one kernel behind einsum, matmul, reductions,
//! broadcasting copies and elementwise binary ops.
//!
//! A loop nest runs over `sizes` in row-major order; every operand advances
//! by its own stride per loop (stride 0 = the operand does not vary along
//! that loop, which is how broadcasting and "letter absent from operand"
//! are expressed). No allocation happens per element.

/// Walks a loop nest in row-major order, keeping one flat offset per operand.
pub(crate) struct Odometer<'a> {
    sizes: &'a [usize],
    /// `strides[op][axis]`.
    strides: &'a [Vec<usize>],
    idx: Vec<usize>,
    /// Current offset of every operand.
    pub offs: Vec<usize>,
}

impl<'a> Odometer<'a> {
    /// Starts at index 0 with every operand at offset `start[op]`.
    pub fn new(sizes: &'a [usize], strides: &'a [Vec<usize>], start: &[usize]) -> Self {
        debug_assert!(strides.iter().all(|s| s.len() == sizes.len()));
        Odometer { sizes, strides, idx: vec![0; sizes.len()], offs: start.to_vec() }
    }

    /// Back to index 0 with operand offsets `start`.
    pub fn reset(&mut self, start: &[usize]) {
        self.idx.fill(0);
        self.offs.copy_from_slice(start);
    }

    /// Moves to the next index (last axis fastest). After the last index it
    /// wraps to the start, which callers never read.
    pub fn advance(&mut self) {
        for axis in (0..self.sizes.len()).rev() {
            self.idx[axis] += 1;
            if self.idx[axis] < self.sizes[axis] {
                for (off, st) in self.offs.iter_mut().zip(self.strides) {
                    *off += st[axis];
                }
                return;
            }
            let back = self.idx[axis] - 1;
            self.idx[axis] = 0;
            for (off, st) in self.offs.iter_mut().zip(self.strides) {
                *off -= st[axis] * back;
            }
        }
    }
}

/// How a contraction combines the values along its reduced loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reducer {
    /// Sum of products, accumulated in f64. Empty sum = 0.
    Sum,
    /// Maximum of products (NaN wins). Empty max = -inf.
    Max,
}

/// `out[i] = reduce over r of prod over operands op[off(i, r)]`: output
/// loops first, then reduced loops.
pub(crate) struct Contraction {
    /// Sizes of the output loops (the result shape).
    pub out_sizes: Vec<usize>,
    /// Sizes of the reduced loops.
    pub red_sizes: Vec<usize>,
    /// `out_strides[op][axis]` over the output loops.
    pub out_strides: Vec<Vec<usize>>,
    /// `red_strides[op][axis]` over the reduced loops.
    pub red_strides: Vec<Vec<usize>>,
}

impl Contraction {
    /// Runs the loop nest over `operands` (one slice per operand). The caller
    /// guarantees every reachable offset is in range.
    pub fn run(&self, operands: &[&[f32]], reducer: Reducer) -> Vec<f32> {
        let nops = operands.len();
        let out_n = super::tensor::numel(&self.out_sizes);
        let red_n = super::tensor::numel(&self.red_sizes);
        let mut out = Vec::with_capacity(out_n);
        let empty = match reducer {
            Reducer::Sum => 0.0,
            Reducer::Max => f64::NEG_INFINITY,
        };
        // The innermost reduced loop runs as a tight loop; the rest odometer.
        let (outer_sizes, inner_len, inner_strides, outer_strides) = match self.red_sizes.split_last() {
            Some((&last, rest)) => (
                rest.to_vec(),
                last,
                self.red_strides.iter().map(|s| s[s.len() - 1]).collect::<Vec<_>>(),
                self.red_strides.iter().map(|s| s[..s.len() - 1].to_vec()).collect::<Vec<_>>(),
            ),
            None => (Vec::new(), 1, vec![0; nops], vec![Vec::new(); nops]),
        };
        let outer_n = super::tensor::numel(&outer_sizes);
        let mut out_od = Odometer::new(&self.out_sizes, &self.out_strides, &vec![0; nops]);
        let mut red_od = Odometer::new(&outer_sizes, &outer_strides, &vec![0; nops]);
        for _ in 0..out_n {
            let mut acc = empty;
            if red_n > 0 {
                red_od.reset(&out_od.offs);
                for _ in 0..outer_n {
                    acc = inner(operands, &red_od.offs, &inner_strides, inner_len, reducer, acc);
                    red_od.advance();
                }
            }
            out.push(acc as f32);
            out_od.advance();
        }
        out
    }
}

/// The innermost reduced loop from offsets `base`.
fn inner(ops: &[&[f32]], base: &[usize], st: &[usize], len: usize, reducer: Reducer, mut acc: f64) -> f64 {
    match (ops, reducer) {
        ([a], Reducer::Sum) => {
            for t in 0..len {
                acc += a[base[0] + t * st[0]] as f64;
            }
        }
        ([a, b], Reducer::Sum) => {
            for t in 0..len {
                acc += a[base[0] + t * st[0]] as f64 * b[base[1] + t * st[1]] as f64;
            }
        }
        _ => {
            for t in 0..len {
                let mut p = 1.0f64;
                for (i, op) in ops.iter().enumerate() {
                    p *= op[base[i] + t * st[i]] as f64;
                }
                acc = match reducer {
                    Reducer::Sum => acc + p,
                    Reducer::Max if acc.is_nan() || p.is_nan() => f64::NAN,
                    Reducer::Max => acc.max(p),
                };
            }
        }
    }
    acc
}

/// Strides of a tensor of shape `from` read as the numpy broadcast of it to
/// `to` (right-aligned; new leading axes and stretched size-1 axes get
/// stride 0). `None` when `from` does not broadcast to `to`.
pub(crate) fn broadcast_strides(from: &[usize], to: &[usize]) -> Option<Vec<usize>> {
    if from.len() > to.len() {
        return None;
    }
    let lead = to.len() - from.len();
    let src = super::tensor::strides(from);
    let mut out = vec![0; to.len()];
    for (i, (&f, &s)) in from.iter().zip(&src).enumerate() {
        let t = to[lead + i];
        if f == t {
            out[lead + i] = if f == 1 { 0 } else { s };
        } else if f != 1 {
            return None;
        }
    }
    Some(out)
}

/// numpy broadcast of two shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = (i + a.len()).checked_sub(rank).map_or(1, |j| a[j]);
            let db = (i + b.len()).checked_sub(rank).map_or(1, |j| b[j]);
            match (da, db) {
                _ if da == db => Some(da),
                (1, d) | (d, 1) => Some(d),
                _ => None,
            }
        })
        .collect()
}

/// Copies `data` read with `strides` over the loop nest `shape`.
pub(crate) fn strided_copy(data: &[f32], shape: &[usize], strides: Vec<usize>) -> Vec<f32> {
    let n = super::tensor::numel(shape);
    let st = [strides];
    let mut od = Odometer::new(shape, &st, &[0]);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(data[od.offs[0]]);
        od.advance();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odometer_walks_row_major_with_per_operand_strides() {
        let sizes = [2, 3];
        let strides = vec![vec![3, 1], vec![1, 2]];
        let mut od = Odometer::new(&sizes, &strides, &[0, 10]);
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push((od.offs[0], od.offs[1]));
            od.advance();
        }
        assert_eq!(seen, vec![(0, 10), (1, 12), (2, 14), (3, 11), (4, 13), (5, 15)]);
    }

    #[test]
    fn broadcast_strides_follow_numpy() {
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), Some(vec![0, 1, 0]));
        assert_eq!(broadcast_strides(&[2, 3], &[2, 3]), Some(vec![3, 1]));
        assert_eq!(broadcast_strides(&[2], &[3]), None);
        assert_eq!(broadcast_strides(&[1, 2], &[2]), None);
    }

    #[test]
    fn max_contraction_propagates_nan_and_is_minus_inf_when_empty() {
        let c = Contraction {
            out_sizes: vec![2],
            red_sizes: vec![2],
            out_strides: vec![vec![2]],
            red_strides: vec![vec![1]],
        };
        let out = c.run(&[&[1.0, f32::NAN, 3.0, -1.0]], Reducer::Max);
        assert!(out[0].is_nan());
        assert_eq!(out[1], 3.0);
        let empty = Contraction { red_sizes: vec![0], ..c };
        assert_eq!(empty.run(&[&[]], Reducer::Max), vec![f32::NEG_INFINITY; 2]);
    }
}
