//! DAG extraction: picks one e-node per e-class so that the total bytes of
//! the chosen graph — each shared sub-expression counted once — is small.
//!
//! Greedy DAG extraction (as in extraction-gym's `greedy-dag`): each class's
//! candidate cost is the sum of its node's own cost and the costs of every
//! class in the union of its children's chosen sub-DAGs, so sharing is seen.
//! Ties go to the e-node of the original graph, so a graph whose rewrites do
//! not pay comes out unchanged.

use crate::analysis::Graph;
use crate::cost::{node_cost, Point};
use crate::lang::Expr;
use egg::{Id, Language};
use std::collections::{HashMap, HashSet};

/// A fixed-size set of e-class indices.
#[derive(Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn union_with(&mut self, o: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a |= b;
        }
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(w, &word)| (0..64).filter(move |b| word & (1 << b) != 0).map(move |b| w * 64 + b))
    }
}

struct Best {
    node: usize,
    cost: f64,
    set: Bits,
    total: f64,
}

/// The chosen e-node (index into the class's nodes) of every reachable class.
pub struct Choice {
    pub chosen: HashMap<Id, usize>,
    /// Bytes of the chosen DAG reachable from the roots.
    pub cost: f64,
}

/// Extracts from `roots`. `original` holds the canonical e-nodes of the input
/// graph (preferred on ties). Returns `None` if some root has no finite
/// (acyclic) extraction — impossible for an e-graph built from a DAG.
pub fn extract(eg: &Graph, roots: &[Id], original: &HashSet<Expr>, point: &Point) -> Option<Choice> {
    let classes: Vec<Id> = {
        let mut v: Vec<Id> = eg.classes().map(|c| c.id).collect();
        v.sort();
        v
    };
    let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let n = classes.len();
    let mut best: Vec<Option<Best>> = (0..n).map(|_| None).collect();
    let canon = |node: &Expr| node.clone().map_children(|c| eg.find(c));
    // Own cost of every node, computed once.
    let costs: Vec<Vec<f64>> =
        classes.iter().map(|&c| eg[c].nodes.iter().map(|node| node_cost(eg, node, c, point)).collect()).collect();
    let is_orig: Vec<Vec<bool>> =
        classes.iter().map(|&c| eg[c].nodes.iter().map(|node| original.contains(&canon(node))).collect()).collect();
    let mut changed = true;
    let mut passes = 0;
    while changed && passes < 64 {
        changed = false;
        passes += 1;
        for (ci, &c) in classes.iter().enumerate() {
            for (k, node) in eg[c].nodes.iter().enumerate() {
                let kids: Vec<usize> = node.children().iter().map(|ch| index[&eg.find(*ch)]).collect();
                if kids.iter().any(|&kc| best[kc].is_none() || kc == ci) {
                    continue;
                }
                if kids.iter().any(|&kc| best[kc].as_ref().is_some_and(|b| b.set.contains(ci))) {
                    continue;
                }
                let mut set = Bits::new(n);
                for &kc in &kids {
                    if let Some(b) = &best[kc] {
                        set.union_with(&b.set);
                    }
                }
                let own = costs[ci][k];
                let total: f64 = own + set.iter().map(|i| best[i].as_ref().map_or(0.0, |b| b.cost)).sum::<f64>();
                set.insert(ci);
                let better = match &best[ci] {
                    None => true,
                    Some(b) if b.node == k => total < b.total,
                    Some(b) => {
                        let eps = 1e-9 * b.total.abs().max(1.0);
                        total < b.total - eps || (total <= b.total + eps && is_orig[ci][k] && !is_orig[ci][b.node])
                    }
                };
                if better {
                    let was_same = best[ci].as_ref().is_some_and(|b| b.node == k && b.set == set);
                    best[ci] = Some(Best { node: k, cost: own, set, total });
                    changed |= !was_same;
                }
            }
        }
    }
    let mut chosen = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| eg.find(*r)).collect();
    let mut cost = 0.0;
    while let Some(c) = stack.pop() {
        if chosen.contains_key(&c) {
            continue;
        }
        let b = best[index[&c]].as_ref()?;
        chosen.insert(c, b.node);
        cost += b.cost;
        stack.extend(eg[c].nodes[b.node].children().iter().map(|ch| eg.find(*ch)));
    }
    Some(Choice { chosen, cost })
}
