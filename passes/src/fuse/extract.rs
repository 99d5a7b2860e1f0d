//! DAG-aware extraction: the cheapest program for a set of roots, counting a value that
//! several users share once.
//!
//! egg's `Extractor` minimises tree cost: a shared subexpression counts once per use, so it
//! overrates forms that mention a value often and cannot see that a subgraph's intermediates
//! are needed by another user anyway. This is the greedy DAG extractor of extraction-gym
//! (`greedy-dag`): each e-class keeps the best e-node and the *set* of e-classes that choice
//! depends on; an e-node's cost is the sum over the union of its children's sets plus its own
//! cost, so shared classes count once. A worklist re-evaluates the parents of every class
//! whose cost falls, until nothing changes. Sets are bitsets over the e-classes.

use super::cost::enode_cost;
use super::lang::{Fuse, FuseGraph};
use egg::{Id, Language};
use std::collections::{HashMap, VecDeque};

/// What an extraction chose.
#[derive(Clone, Debug)]
pub struct Extraction {
    /// The chosen e-node of every e-class the roots need (canonical ids).
    pub choice: HashMap<Id, Fuse>,
    /// The DAG cost of the chosen program: each needed e-class counted once.
    pub cost: f64,
}

/// Why extraction failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("e-class {0} has no finite-cost acyclic e-node")]
    NoChoice(Id),
}

/// A set of e-classes, one bit per dense class index.
#[derive(Clone, Debug, PartialEq)]
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
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let b = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                Some(w * 64 + b)
            })
        })
    }
}

/// The best choice found so far for one e-class.
struct Best {
    node: usize,
    own: f64,
    total: f64,
    deps: Bits,
}

/// Extracts the cheapest DAG for `roots` under the cost model of [`super::cost`].
pub fn extract_dag(egraph: &FuseGraph, roots: &[Id]) -> Result<Extraction, ExtractError> {
    extract_dag_with(egraph, roots, enode_cost)
}

/// [`extract_dag`] with another per-node cost function (tests use toy costs).
pub fn extract_dag_with(
    egraph: &FuseGraph,
    roots: &[Id],
    cost: impl Fn(&FuseGraph, &Fuse) -> f64,
) -> Result<Extraction, ExtractError> {
    let ids: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    let index: HashMap<Id, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let n = ids.len();
    let dense = |id: Id| index[&egraph.find(id)];
    // Own cost of every e-node, and which e-nodes read each class.
    let mut own: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut parents: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut work: VecDeque<usize> = VecDeque::new();
    let mut queued = vec![false; n];
    for (ci, &id) in ids.iter().enumerate() {
        let class = &egraph[id];
        own.push(class.nodes.iter().map(|nd| cost(egraph, nd)).collect());
        for node in class.nodes.iter() {
            if node.is_leaf() && !queued[ci] {
                queued[ci] = true;
                work.push_back(ci);
            }
            for &ch in node.children() {
                parents[dense(ch)].push(ci);
            }
        }
    }
    // The worklist holds classes: re-evaluating one looks at all of its e-nodes.
    let mut best: Vec<Option<Best>> = (0..n).map(|_| None).collect();
    while let Some(ci) = work.pop_front() {
        queued[ci] = false;
        let class = &egraph[ids[ci]];
        let mut improved = false;
        for (ni, node) in class.nodes.iter().enumerate() {
            let c_own = own[ci][ni];
            if !c_own.is_finite() {
                continue;
            }
            let mut deps = Bits::new(n);
            let mut ok = true;
            for &ch in node.children() {
                match &best[dense(ch)] {
                    Some(b) => deps.union_with(&b.deps),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            // A choice that depends on its own class is a cycle.
            if !ok || deps.contains(ci) {
                continue;
            }
            let total: f64 = c_own
                + deps
                    .iter()
                    .map(|d| best[d].as_ref().map_or(0.0, |b| b.own))
                    .sum::<f64>();
            let better = match &best[ci] {
                None => true,
                Some(b) => total < b.total - 1e-9 * b.total.abs(),
            };
            if better {
                deps.insert(ci);
                best[ci] = Some(Best {
                    node: ni,
                    own: c_own,
                    total,
                    deps,
                });
                improved = true;
            }
        }
        if improved {
            for &pc in &parents[ci] {
                if !queued[pc] {
                    queued[pc] = true;
                    work.push_back(pc);
                }
            }
        }
    }
    // Walk the choices from the roots; the cost is the DAG cost of what is reached.
    let mut choice = HashMap::new();
    let mut total = 0.0;
    let mut stack: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    while let Some(id) = stack.pop() {
        if choice.contains_key(&id) {
            continue;
        }
        let ci = index[&id];
        let b = best[ci].as_ref().ok_or(ExtractError::NoChoice(id))?;
        let node = egraph[id].nodes[b.node].clone();
        total += b.own;
        for &ch in node.children() {
            stack.push(egraph.find(ch));
        }
        choice.insert(id, node);
    }
    Ok(Extraction {
        choice,
        cost: total,
    })
}

/// The DAG cost of the program `choice` describes from `roots` (each class counted once).
pub fn dag_cost(egraph: &FuseGraph, choice: &HashMap<Id, Fuse>, roots: &[Id]) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    let mut total = 0.0;
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        if let Some(node) = choice.get(&id) {
            total += enode_cost(egraph, node);
            stack.extend(node.children().iter().map(|&c| egraph.find(c)));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::super::cost::{enode_cost, TreeCost};
    use super::super::lang::{Fuse, FuseGraph};
    use super::*;
    use egg::RecExpr;

    fn egraph(exprs: &[&str]) -> (FuseGraph, Vec<Id>) {
        let mut eg = FuseGraph::default();
        let ids = exprs
            .iter()
            .map(|e| eg.add_expr(&e.parse::<RecExpr<Fuse>>().expect("a valid expression")))
            .collect();
        eg.rebuild();
        (eg, ids)
    }

    /// The cost of the e-node `expr` names in `eg` (its children already in `eg`).
    fn cost_of(eg: &FuseGraph, expr: &str) -> f64 {
        let expr: RecExpr<Fuse> = expr.parse().expect("a valid expression");
        let mut ids = Vec::new();
        for node in expr.as_ref() {
            let n = node.clone().map_children(|c| ids[usize::from(c)]);
            ids.push(eg.lookup(n.clone()).expect("in the e-graph"));
        }
        let root = expr.as_ref().last().expect("non-empty").clone();
        enode_cost(eg, &root.map_children(|c| ids[usize::from(c)]))
    }

    #[test]
    fn a_shared_subexpression_is_counted_once() {
        let x = "(arg 0 f32[8,8])";
        let e = format!("(exp {x})");
        let (eg, ids) = egraph(&[&format!("(add {e} {e})")]);
        let ex = extract_dag(&eg, &ids).expect("extracts");
        let exp = cost_of(&eg, &e);
        let add = cost_of(&eg, &format!("(add {e} {e})"));
        assert!(exp > 0.0 && add > 0.0);
        assert_eq!(ex.cost, exp + add);
        assert_eq!(dag_cost(&eg, &ex.choice, &ids), exp + add);
        // egg's tree cost counts the shared exp once per use.
        let (tree, _) = egg::Extractor::new(&eg, TreeCost { egraph: &eg }).find_best(ids[0]);
        assert_eq!(tree, 2.0 * exp + add);
    }

    #[test]
    fn the_dag_extractor_sees_through_a_shared_operand() {
        // One e-class with two forms: `s * s` over an expensive s = a @ b, and `exp(t)` over a
        // larger matmul t. Tree cost charges s twice and picks exp(t); the DAG cost charges
        // s once and picks s * s.
        let s = "(matmul (arg 0 f32[16,16]) (arg 1 f32[16,16]))";
        let square = format!("(mul {s} {s})");
        let t = "(matmul (arg 2 f32[16,32]) (arg 3 f32[32,16]))";
        let other = format!("(exp {t})");
        let (mut eg, ids) = egraph(&[&square, &other]);
        eg.union(ids[0], ids[1]);
        eg.rebuild();
        let root = eg.find(ids[0]);
        let (c_s, c_t) = (cost_of(&eg, s), cost_of(&eg, t));
        let (c_mul, c_exp) = (cost_of(&eg, &square), cost_of(&eg, &other));
        assert!(2.0 * c_s + c_mul > c_t + c_exp, "tree prefers exp(t)");
        assert!(c_s + c_mul < c_t + c_exp, "DAG prefers s * s");
        let (_, tree_best) = egg::Extractor::new(&eg, TreeCost { egraph: &eg }).find_best(root);
        assert!(matches!(tree_best.as_ref().last(), Some(Fuse::Exp(_))));
        let ex = extract_dag(&eg, &[root]).expect("extracts");
        assert!(matches!(ex.choice[&root], Fuse::Mul(_)));
        assert_eq!(ex.cost, c_s + c_mul);
    }

    #[test]
    fn an_extraction_never_closes_a_cycle() {
        // x = neg(y), y = neg(x) after a union, plus the argument itself in x's class: the
        // only acyclic choice for x is the argument.
        let (mut eg, ids) = egraph(&["(arg 0 f32[4])", "(neg (neg (arg 0 f32[4])))"]);
        eg.union(ids[0], ids[1]);
        eg.rebuild();
        let ex = extract_dag(&eg, &[ids[0]]).expect("extracts");
        assert!(matches!(ex.choice[&eg.find(ids[0])], Fuse::Arg(_)));
        assert_eq!(ex.cost, 0.0);
    }
}
