//! The driver: problem → e-graph → saturate → extract → solution.

use crate::analysis::{Dtype, Graph, Known, ShapeAnalysis};
use crate::extract::extract;
use crate::lang::Expr;
use crate::poly::Poly;
use crate::shape::{list_attr, parse_list_attr, parse_shape_attr, shape_attr, Constants, Shape};
use crate::{Kind, Problem, Ref};
use egg::{Id, Language, Runner, SimpleScheduler, StopReason, Symbol};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Bounds on saturation. Hitting one is reported (never silent); the result
/// is still correct, only possibly less optimized.
#[derive(Clone, Debug)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { nodes: 200_000, iterations: 30, time: Duration::from_secs(10) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error("runtime dim `{0}` = {1} at the shape point: sizes cannot be negative")]
    Negative(String, i64),
    #[error("extraction found no acyclic choice for the outputs (this is a bug in bifurc)")]
    NoExtraction,
    #[error("extraction chose a cyclic graph (this is a bug in bifurc)")]
    Cycle,
}

/// What the optimizer did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub iterations: usize,
    /// Why saturation stopped: `saturated`, or the limit that was hit.
    pub stop_reason: String,
    /// True when a node, iteration or time limit stopped saturation.
    pub hit_limit: bool,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// Firing count per rule name (rules that never fired are listed with 0).
    pub rules: BTreeMap<String, usize>,
    pub saturate_time: Duration,
    pub extract_time: Duration,
    /// Bytes of the input graph and of the extracted graph in the e-graph's model.
    pub cost_before: f64,
    pub cost_after: f64,
    /// Inputs that some einsum in the saturated e-graph reads directly (not
    /// through a broadcast): where a bifurcated form exists, its context
    /// caches are listed here, whether or not extraction chose it.
    pub read_directly: std::collections::BTreeSet<String>,
}

/// A node of the optimized graph.
#[derive(Clone, Debug, PartialEq)]
pub struct SNode {
    pub kind: Kind,
    pub inputs: Vec<Ref>,
    pub shape: Shape,
    pub dtype: Dtype,
    /// The input node whose value this is (its e-class holds it), if any.
    pub origin: Option<usize>,
    /// True when this is exactly that input node (same op on the same values).
    pub unchanged: bool,
    /// For `Opaque`: the input node whose op this is.
    pub opaque_of: Option<usize>,
}

/// The optimized graph: nodes in topological order, `Ref::Node` indexing them.
#[derive(Clone, Debug)]
pub struct Solution {
    pub nodes: Vec<SNode>,
    pub roots: Vec<Ref>,
    pub report: Report,
}

fn known_key(i: usize) -> String {
    format!("o{i}")
}

fn add_attr(eg: &mut Graph, s: &str) -> Id {
    eg.add(Expr::Attr(Symbol::from(s)))
}

/// Adds one problem node to the e-graph.
fn add_node(eg: &mut Graph, i: usize, node: &crate::Node, ins: &[Id]) -> Expr {
    let with = |eg: &mut Graph, attr: &str| {
        let a = add_attr(eg, attr);
        let mut v = vec![a];
        v.extend_from_slice(ins);
        v
    };
    match &node.kind {
        Kind::Einsum(spec) => Expr::Einsum(with(eg, spec).into_boxed_slice()),
        Kind::MatMul { transpose_b: false } => Expr::MatMul([ins[0], ins[1]]),
        Kind::MatMul { transpose_b: true } => Expr::MatMulT([ins[0], ins[1]]),
        Kind::Concat(axis) => Expr::Concat(with(eg, &axis.to_string()).into_boxed_slice()),
        Kind::Broadcast(s) => Expr::Broadcast([add_attr(eg, &shape_attr(s)), ins[0]]),
        Kind::Reshape(s) => Expr::Reshape([add_attr(eg, &shape_attr(s)), ins[0]]),
        Kind::Transpose(p) => Expr::Transpose([add_attr(eg, &list_attr(p)), ins[0]]),
        Kind::Slice { axis, start, end } => Expr::Slice([
            add_attr(eg, &axis.to_string()),
            add_attr(eg, &start.to_string()),
            add_attr(eg, &end.to_string()),
            ins[0],
        ]),
        Kind::Add => Expr::Add([ins[0], ins[1]]),
        Kind::Opaque { gather } => {
            eg.analysis.known.insert(
                Symbol::from(known_key(i)),
                Known { shape: node.shape.clone(), dtype: node.dtype, gather: *gather },
            );
            Expr::Op(with(eg, &known_key(i)).into_boxed_slice())
        }
    }
}

/// Optimizes `problem` with every rule, within `limits`.
pub fn optimize(problem: &Problem, limits: &Limits) -> Result<Solution, OptimizeError> {
    let constants = Constants(problem.constants.clone());
    let mut eg = Graph::new(ShapeAnalysis { constants, known: HashMap::new() });
    let mut leaf_ids = Vec::new();
    for leaf in &problem.leaves {
        eg.analysis
            .known
            .insert(Symbol::from(&leaf.name), Known { shape: leaf.shape.clone(), dtype: leaf.dtype, gather: false });
        let name = add_attr(&mut eg, &leaf.name);
        leaf_ids.push(eg.add(Expr::In(name)));
    }
    let mut node_ids: Vec<Id> = Vec::new();
    let mut original_nodes: Vec<Expr> = Vec::new();
    for (i, node) in problem.nodes.iter().enumerate() {
        let ins: Vec<Id> = node
            .inputs
            .iter()
            .map(|r| match r {
                Ref::Leaf(l) => leaf_ids[*l],
                Ref::Node(n) => node_ids[*n],
            })
            .collect();
        let expr = add_node(&mut eg, i, node, &ins);
        original_nodes.push(expr.clone());
        node_ids.push(eg.add(expr));
    }
    let root_of = |r: &Ref, nodes: &[Id]| match r {
        Ref::Leaf(l) => leaf_ids[*l],
        Ref::Node(n) => nodes[*n],
    };
    let roots: Vec<Id> = problem.roots.iter().map(|r| root_of(r, &node_ids)).collect();
    eg.rebuild();
    if let Some((name, v)) = problem.point.iter().find(|(_, v)| **v < 0) {
        return Err(OptimizeError::Negative(name.clone(), *v));
    }

    // Cost of the input graph, before saturation (every class holds one node).
    let orig_set: HashSet<Expr> = original_nodes.iter().map(|n| n.clone().map_children(|c| eg.find(c))).collect();
    let before = extract(&eg, &roots, &orig_set, &problem.point).ok_or(OptimizeError::NoExtraction)?;

    let rules = crate::rules::all();
    let start = Instant::now();
    let runner = Runner::default()
        .with_egraph(eg)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .with_scheduler(SimpleScheduler)
        .run(&rules);
    let saturate_time = start.elapsed();
    let mut report = Report {
        iterations: runner.iterations.len(),
        egraph_nodes: runner.egraph.total_number_of_nodes(),
        egraph_classes: runner.egraph.number_of_classes(),
        saturate_time,
        cost_before: before.cost,
        ..Report::default()
    };
    for r in &rules {
        report.rules.insert(r.name.to_string(), 0);
    }
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *report.rules.entry(name.to_string()).or_insert(0) += n;
        }
    }
    let (reason, hit) = match &runner.stop_reason {
        Some(StopReason::Saturated) | None => ("saturated".to_string(), false),
        Some(StopReason::IterationLimit(n)) => (format!("iteration limit ({n})"), true),
        Some(StopReason::NodeLimit(n)) => (format!("node limit ({n})"), true),
        Some(StopReason::TimeLimit(t)) => (format!("time limit ({t:.1} s)"), true),
        Some(StopReason::Other(s)) => (s.clone(), true),
    };
    report.stop_reason = reason;
    report.hit_limit = hit;

    let eg = runner.egraph;
    report.read_directly = read_directly(&eg);
    let start = Instant::now();
    let orig_set: HashSet<Expr> = original_nodes.iter().map(|n| n.clone().map_children(|c| eg.find(c))).collect();
    let choice = extract(&eg, &roots, &orig_set, &problem.point).ok_or(OptimizeError::NoExtraction)?;
    report.extract_time = start.elapsed();
    report.cost_after = choice.cost;

    // Which input node (if any) each class holds, and the canonical form of each.
    let mut origin: HashMap<Id, usize> = HashMap::new();
    let mut canonical_orig: HashMap<Expr, usize> = HashMap::new();
    for (i, id) in node_ids.iter().enumerate() {
        origin.entry(eg.find(*id)).or_insert(i);
        canonical_orig.entry(original_nodes[i].clone().map_children(|c| eg.find(c))).or_insert(i);
    }
    let leaf_of: HashMap<Id, usize> = leaf_ids.iter().enumerate().map(|(i, id)| (eg.find(*id), i)).collect();
    let mut b = Builder {
        eg: &eg,
        chosen: &choice.chosen,
        leaf_of,
        origin,
        canonical_orig,
        out: Vec::new(),
        done: HashMap::new(),
        visiting: HashSet::new(),
    };
    let mut out_roots = Vec::new();
    for r in &roots {
        out_roots.push(b.emit(eg.find(*r))?);
    }
    Ok(Solution { nodes: b.out, roots: out_roots, report })
}

/// Names of inputs that an einsum reads with at most a reshape or transpose between.
fn read_directly(eg: &Graph) -> std::collections::BTreeSet<String> {
    let leaf_name = |id: Id| -> Option<String> {
        eg[id].nodes.iter().find_map(|n| match n {
            Expr::In(a) => eg[*a].data.attr().map(str::to_string),
            _ => None,
        })
    };
    let mut out = std::collections::BTreeSet::new();
    for class in eg.classes() {
        for node in class.nodes.iter().filter(|n| matches!(n, Expr::Einsum(_))) {
            for &op in node.operands() {
                out.extend(leaf_name(op));
                for inner in &eg[op].nodes {
                    if let Expr::Reshape([_, x]) | Expr::Transpose([_, x]) = inner {
                        out.extend(leaf_name(*x));
                    }
                }
            }
        }
    }
    out
}

/// Turns the chosen e-nodes into a topologically ordered node list.
struct Builder<'a> {
    eg: &'a Graph,
    chosen: &'a HashMap<Id, usize>,
    leaf_of: HashMap<Id, usize>,
    origin: HashMap<Id, usize>,
    canonical_orig: HashMap<Expr, usize>,
    out: Vec<crate::SNode>,
    done: HashMap<Id, Ref>,
    visiting: HashSet<Id>,
}

impl Builder<'_> {
    fn attr(&self, id: Id) -> String {
        self.eg[id].data.attr().unwrap_or_default().to_string()
    }

    fn emit(&mut self, class: Id) -> Result<Ref, OptimizeError> {
        if let Some(r) = self.done.get(&class) {
            return Ok(*r);
        }
        if !self.visiting.insert(class) {
            return Err(OptimizeError::Cycle);
        }
        let k = *self.chosen.get(&class).ok_or(OptimizeError::NoExtraction)?;
        let node = self.eg[class].nodes[k].clone();
        if let Expr::In(_) = node {
            let leaf = *self.leaf_of.get(&class).ok_or(OptimizeError::NoExtraction)?;
            self.done.insert(class, Ref::Leaf(leaf));
            return Ok(Ref::Leaf(leaf));
        }
        let mut inputs = Vec::new();
        for &op in node.operands() {
            inputs.push(self.emit(self.eg.find(op))?);
        }
        let a = |i: usize| self.attr(node.children()[i]);
        let bad = || OptimizeError::NoExtraction;
        let (kind, opaque_of) = match &node {
            Expr::Einsum(_) => (Kind::Einsum(a(0)), None),
            Expr::MatMul(_) => (Kind::MatMul { transpose_b: false }, None),
            Expr::MatMulT(_) => (Kind::MatMul { transpose_b: true }, None),
            Expr::Concat(_) => (Kind::Concat(a(0).parse().map_err(|_| bad())?), None),
            Expr::Broadcast(_) => (Kind::Broadcast(parse_shape_attr(&a(0)).ok_or_else(bad)?), None),
            Expr::Reshape(_) => (Kind::Reshape(parse_shape_attr(&a(0)).ok_or_else(bad)?), None),
            Expr::Transpose(_) => (Kind::Transpose(parse_list_attr(&a(0)).ok_or_else(bad)?), None),
            Expr::Slice(_) => (
                Kind::Slice {
                    axis: a(0).parse().map_err(|_| bad())?,
                    start: Poly::parse(&a(1)).map_err(|_| bad())?,
                    end: Poly::parse(&a(2)).map_err(|_| bad())?,
                },
                None,
            ),
            Expr::Add(_) => (Kind::Add, None),
            Expr::Op(_) => {
                let key = a(0);
                let i: usize = key.trim_start_matches('o').parse().map_err(|_| bad())?;
                let gather = self.eg.analysis.known.get(&Symbol::from(&key)).is_some_and(|k| k.gather);
                (Kind::Opaque { gather }, Some(i))
            }
            Expr::In(_) | Expr::Attr(_) => return Err(bad()),
        };
        let crate::analysis::Data::Tensor { shape, dtype, .. } = &self.eg[class].data else { return Err(bad()) };
        let canon = node.clone().map_children(|c| self.eg.find(c));
        let origin = self.origin.get(&class).copied();
        let unchanged = origin.is_some() && self.canonical_orig.get(&canon) == origin.as_ref();
        self.visiting.remove(&class);
        self.out.push(crate::SNode { kind, inputs, shape: shape.clone(), dtype: *dtype, origin, unchanged, opaque_of });
        let r = Ref::Node(self.out.len() - 1);
        self.done.insert(class, r);
        Ok(r)
    }
}
