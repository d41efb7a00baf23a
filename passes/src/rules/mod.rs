//! The rewrite rules: general algebraic laws, one file per family. Each rule
//! has a kebab-case name (printed in the optimizer's report) and a one-line
//! identity comment. See passes/README.md for how to write one and which
//! rules are not allowed.

mod concat;
mod einsum;
mod reshape;
pub mod spec;

use crate::analysis::{Graph, ShapeAnalysis};
use crate::lang::Expr;
use egg::{Applier, Id, PatternAst, Rewrite, Subst, Symbol, Var};

/// A law whose right-hand side is computed: `f(egraph, matched class, bound
/// classes)` adds the equivalent forms it can build and returns them; each is
/// unioned with the matched class. Returning nothing means a side condition
/// did not hold.
pub struct Law {
    vars: Vec<Var>,
    f: fn(&mut Graph, Id, &[Id]) -> Vec<Id>,
}

impl Law {
    /// `vars` are pattern variables such as `"?s"`, bound in order.
    fn new(vars: &[&str], f: fn(&mut Graph, Id, &[Id]) -> Vec<Id>) -> Self {
        let vars =
            vars.iter().map(|v| v.parse().unwrap_or_else(|_| panic!("rule variable `{v}` is malformed"))).collect();
        Law { vars, f }
    }
}

impl Applier<Expr, ShapeAnalysis> for Law {
    fn apply_one(&self, eg: &mut Graph, eclass: Id, subst: &Subst, _: Option<&PatternAst<Expr>>, _: Symbol) -> Vec<Id> {
        let bound: Vec<Id> = self.vars.iter().map(|v| subst[*v]).collect();
        let mut changed = Vec::new();
        for new in (self.f)(eg, eclass, &bound) {
            if eg.union(eclass, new) {
                changed.push(eclass);
            }
        }
        changed
    }

    fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }
}

/// Builds a rule from a pattern and a law; the pattern is ours, so a parse
/// failure is a bug.
fn law(
    name: &str,
    pattern: &str,
    vars: &[&str],
    f: fn(&mut Graph, Id, &[Id]) -> Vec<Id>,
) -> Rewrite<Expr, ShapeAnalysis> {
    let searcher: egg::Pattern<Expr> = pattern.parse().unwrap_or_else(|e| panic!("rule {name}: bad pattern: {e}"));
    Rewrite::new(name, searcher, Law::new(vars, f)).unwrap_or_else(|e| panic!("rule {name}: {e}"))
}

/// Every rule, in a fixed order.
pub fn all() -> Vec<Rewrite<Expr, ShapeAnalysis>> {
    let mut rules = Vec::new();
    rules.extend(einsum::rules());
    rules.extend(concat::rules());
    rules.extend(reshape::rules());
    rules
}

/// The e-nodes of a class, cloned (laws add to the e-graph while they read).
pub(crate) fn nodes_of(eg: &Graph, id: Id) -> Vec<Expr> {
    eg[id].nodes.clone()
}
