//! The bytes-moved model of each planned kernel, as polynomials over the
//! runtime dims (for the manifest).
//!
//! The same model as [`crate::inspect::bytes_moved`], applied to what a
//! kernel of [`super::plan`] does: it reads every stored tensor its node
//! reads, through views (broadcast, reshape, transpose, slice, concat) and
//! through elementwise nodes inlined into it, and writes its output once.
//! Through a broadcast a kernel re-reads the source once per copy along axes
//! whose size involves a runtime dim, but not along constant-size axes (the
//! heads of a KV group); a `gather` reads only the table rows it picks.
//! Bytes land in four categories by the stored tensor's role: weights,
//! context KV, decode KV, activations (everything else, and all writes).
//!
//! Because inlined nodes write nothing and are read by nothing, the kernels'
//! sum can be below the graph-level model (which charges every compute
//! node); `copy` kernels (outputs that alias a value) add their copy, and a
//! reduction split across blocks its workspace (written by the contraction,
//! read by its `combine` kernel). Weight and KV-cache traffic is the same in
//! both.
//!
//! A read is tracked as `F × elements(value)` (a polynomial factor `F`) or,
//! below a slice, as an absolute element count. Where the count cannot stay
//! a polynomial — a slice of a concat whose share is not a polynomial — the
//! read is charged as the whole concat: an over-estimate, never an under-one.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use crate::ir::{shape::numel, DType, Graph, Op, Poly, Role, Value};

use super::fused_attention::FUSED_OP;
use super::plan::{classify, InPlacePart, NodeKind, Program, COMBINE_OP};

/// Bytes one kernel moves, by category, as polynomials over the runtime dims.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelBytes {
    pub weights: Poly,
    pub context_kv: Poly,
    pub decode_kv: Poly,
    pub activations: Poly,
}

impl KernelBytes {
    pub fn total(&self) -> Result<Poly, String> {
        self.weights
            .add(&self.context_kv)
            .and_then(|p| p.add(&self.decode_kv))
            .and_then(|p| p.add(&self.activations))
            .map_err(|e| e.to_string())
    }

    fn add(&mut self, role: Option<Role>, elements: &Poly, dtype: DType) -> Result<(), String> {
        let bytes = elements.mul(&Poly::constant(dtype.size() as i64)).map_err(|e| e.to_string())?;
        let slot = match role {
            Some(Role::Weight) => &mut self.weights,
            Some(Role::ContextKv { .. }) => &mut self.context_kv,
            Some(Role::DecodeKv { .. }) => &mut self.decode_kv,
            _ => &mut self.activations,
        };
        *slot = slot.add(&bytes).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// How much of a value is read.
#[derive(Clone, Debug)]
enum Amount {
    /// `F × elements(value)`.
    Factor(Poly),
    /// An absolute element count.
    Count(Poly),
}

struct Model<'g> {
    graph: &'g Graph,
    kinds: Vec<NodeKind>,
}

impl Model<'_> {
    fn elements(&self, v: Value) -> Result<Poly, String> {
        numel(&self.graph.dims, self.graph.shape_of(v))
    }

    fn count(&self, v: Value, amount: &Amount) -> Result<Poly, String> {
        match amount {
            Amount::Factor(f) => f.mul(&self.elements(v)?).map_err(|e| e.to_string()),
            Amount::Count(c) => Ok(c.clone()),
        }
    }

    /// `amount` as a factor of `elements(v)`: exact, or 1 (the whole value)
    /// when the share is not a polynomial.
    fn factor(&self, v: Value, amount: &Amount) -> Result<Poly, String> {
        match amount {
            Amount::Factor(f) => Ok(f.clone()),
            Amount::Count(c) => Ok(exact_div(c, &self.elements(v)?).unwrap_or_else(|| Poly::constant(1))),
        }
    }

    fn read(&self, v: Value, amount: Amount, acc: &mut KernelBytes) -> Result<(), String> {
        let j = match v {
            Value::Input(i) => {
                let input = &self.graph.inputs[i];
                return acc.add(Some(input.role), &self.count(v, &amount)?, input.dtype);
            }
            Value::Node(j) => j,
        };
        let node = &self.graph.nodes[j];
        match self.kinds[j] {
            NodeKind::Kernel => acc.add(None, &self.count(v, &amount)?, node.dtype),
            NodeKind::Dead => Err(format!("kernel reads node `{}`, which the plan dropped", node.id)),
            NodeKind::Inlined => {
                let f = self.factor(v, &amount)?;
                for &input in &node.inputs {
                    self.read(input, Amount::Factor(f.clone()), acc)?;
                }
                Ok(())
            }
            NodeKind::View => match &node.op {
                Op::Reshape { .. } | Op::Transpose { .. } => self.read(node.inputs[0], amount, acc),
                Op::Slice { .. } => {
                    let count = self.count(v, &amount)?;
                    self.read(node.inputs[0], Amount::Count(count), acc)
                }
                Op::Concat { .. } => {
                    let f = self.factor(v, &amount)?;
                    for &part in &node.inputs {
                        self.read(part, Amount::Factor(f.clone()), acc)?;
                    }
                    Ok(())
                }
                Op::Broadcast { shape } => {
                    let (per_sample, constant) = self.expansion(node.inputs[0], shape)?;
                    let source = match amount {
                        Amount::Factor(f) => Amount::Factor(f.mul(&per_sample).map_err(|e| e.to_string())?),
                        Amount::Count(c) => Amount::Count(exact_div(&c, &Poly::constant(constant)).unwrap_or(c)),
                    };
                    self.read(node.inputs[0], source, acc)
                }
                other => Err(format!("view op `{}` has no bytes rule", other.name())),
            },
        }
    }

    /// For a broadcast of `input` to `target`: the product of the stretched
    /// axes whose size involves a runtime dim (re-read once per copy), and
    /// the product of the constant-size stretched axes (shared, read once).
    fn expansion(&self, input: Value, target: &[Poly]) -> Result<(Poly, i64), String> {
        let dims = &self.graph.dims;
        let src = self.graph.shape_of(input);
        let new_axes = target.len() - src.len();
        let (mut per_sample, mut constant) = (Poly::constant(1), 1i64);
        for (i, t) in target.iter().enumerate() {
            let stretched = i < new_axes || !dims.same(&src[i - new_axes], t);
            if !stretched {
                continue;
            }
            let t = dims.normalize(t).map_err(|e| e.to_string())?;
            match t.as_constant() {
                Some(c) => constant = constant.checked_mul(c).ok_or("size overflows 64 bits")?,
                None => per_sample = per_sample.mul(&t).map_err(|e| e.to_string())?,
            }
        }
        Ok((per_sample, constant))
    }
}

/// The parts after the first of in-place softmax `node` when its context
/// attention is fused (its kernel then merges).
fn fused_merge<'p>(program: &'p Program, node: &str) -> Option<&'p [InPlacePart]> {
    program.in_place_of(node).filter(|p| p.fused.is_some()).and_then(|p| p.parts.get(1..))
}

/// Bytes moved by each kernel of `program` (planned from `graph`), in kernel order.
pub fn kernel_bytes(graph: &Graph, program: &Program) -> Result<Vec<KernelBytes>, String> {
    let model = Model { graph, kinds: classify(graph) };
    program
        .kernels
        .iter()
        .map(|kernel| {
            let value = graph
                .find(&kernel.node)
                .ok_or_else(|| format!("kernel `{}` names unknown value `{}`", kernel.name, kernel.node))?;
            let mut acc = KernelBytes::default();
            match (kernel.op.as_str(), value) {
                ("copy", _) => model.read(value, Amount::Factor(Poly::constant(1)), &mut acc)?,
                // Each buffer read once: a split reduction's partial sums,
                // a fused context attention's q, K and V (its partials are
                // its output, below), its merge's partials and other parts.
                (op, _) if op == COMBINE_OP || op == FUSED_OP || fused_merge(program, &kernel.node).is_some() => {
                    for &r in &kernel.reads {
                        let b = &program.buffers[r];
                        acc.add(None, &numel(&graph.dims, &b.shape)?, b.dtype)?;
                    }
                }
                (_, Value::Node(j)) => {
                    let node = &graph.nodes[j];
                    for (operand, &input) in node.inputs.iter().enumerate() {
                        let amount = match (&node.op, operand) {
                            // A gather reads the rows it picks: one per output row.
                            (Op::Gather, 0) => Amount::Count(model.elements(value)?),
                            _ => Amount::Factor(Poly::constant(1)),
                        };
                        model.read(input, amount, &mut acc)?;
                    }
                }
                (_, Value::Input(_)) => {
                    return Err(format!("kernel `{}` computes input `{}`", kernel.name, kernel.node));
                }
            }
            // The whole output buffer, once (a row kernel's extent counts
            // rows, not elements); a softmax planned in place writes its
            // own shape over its parts.
            let out = &program.buffers[kernel.writes];
            match value {
                // The merge of a fused context attention: the other
                // parts written over, and the context output.
                Value::Node(_) if let Some(parts) = fused_merge(program, &kernel.node) => {
                    for b in parts.iter().map(|p| &program.buffers[p.buffer]).chain([out]) {
                        acc.add(None, &numel(&graph.dims, &b.shape)?, b.dtype)?;
                    }
                }
                Value::Node(j) if program.in_place_of(&kernel.node).is_some() => {
                    let node = &graph.nodes[j];
                    acc.add(None, &numel(&graph.dims, &node.shape)?, node.dtype)?;
                }
                _ => acc.add(None, &numel(&graph.dims, &out.shape)?, out.dtype)?,
            }
            Ok(acc)
        })
        .collect()
}

// --- exact polynomial division -----------------------------------------------

/// `num / den` when it is a polynomial with integer coefficients, else `None`.
pub(crate) fn exact_div(num: &Poly, den: &Poly) -> Option<Poly> {
    let vars: Vec<String> = {
        let mut set: BTreeSet<String> = num.symbols().into_iter().map(str::to_string).collect();
        set.extend(den.symbols().into_iter().map(str::to_string));
        set.into_iter().collect()
    };
    let order = |a: &[String], b: &[String]| -> Ordering {
        // Graded lexicographic order on exponent vectors (a monomial order).
        a.len().cmp(&b.len()).then_with(|| {
            for v in &vars {
                let (ea, eb) = (a.iter().filter(|s| *s == v).count(), b.iter().filter(|s| *s == v).count());
                if ea != eb {
                    return ea.cmp(&eb);
                }
            }
            Ordering::Equal
        })
    };
    let leading = |p: &Poly| -> Option<(Vec<String>, i64)> {
        p.terms().max_by(|a, b| order(a.0, b.0)).map(|(m, c)| (m.clone(), c))
    };
    let (den_mono, den_coef) = leading(den)?;
    let mut remainder = num.clone();
    let mut quotient = Poly::zero();
    for _ in 0..10_000 {
        let Some((mono, coef)) = leading(&remainder) else {
            return Some(quotient);
        };
        if coef % den_coef != 0 {
            return None;
        }
        // Monomial division: remove den's symbols (as a multiset) from mono.
        let mut rest = mono.clone();
        for s in &den_mono {
            let at = rest.iter().position(|r| r == s)?;
            rest.remove(at);
        }
        let mut term = Poly::constant(coef / den_coef);
        for s in &rest {
            term = term.mul(&Poly::symbol(s)).ok()?;
        }
        quotient = quotient.add(&term).ok()?;
        remainder = remainder.sub(&term.mul(den).ok()?).ok()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Poly {
        Poly::parse(text).unwrap()
    }

    #[test]
    fn divides_exactly_or_not_at_all() {
        assert_eq!(exact_div(&p("b*m_c+b*m_d+b"), &p("m_c+m_d+1")), Some(p("b")));
        assert_eq!(exact_div(&p("6*b*b*k"), &p("2*b")), Some(p("3*b*k")));
        assert_eq!(exact_div(&p("b*m_c"), &p("m_c+m_d")), None);
        assert_eq!(exact_div(&p("3*b"), &p("2")), None);
        assert_eq!(exact_div(&p("0"), &p("b")), Some(p("0")));
        assert_eq!(exact_div(&p("b*b-1"), &p("b-1")), Some(p("b+1")));
    }
}
