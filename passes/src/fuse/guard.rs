//! The type guard every rule runs under: a right side fires only when it types, with the type
//! of the e-class it joins. Rules therefore cannot change a type, and an e-class never holds
//! e-nodes of two types (the analysis' `merge` relies on it).

use super::lang::{node_data, Data, Fuse, FuseGraph, TensorAnalysis};
use super::rules::FuseRewrite;
use egg::{Applier, ENodeOrVar, Id, PatternAst, Subst, Symbol, Var};
use std::sync::Arc;

/// An applier that checks the type of its right side before applying it.
pub struct TypeGuard {
    inner: Arc<dyn Applier<Fuse, TensorAnalysis> + Send + Sync>,
}

/// Wraps every rule's applier in a [`TypeGuard`].
pub fn guarded(rules: Vec<FuseRewrite>) -> Vec<FuseRewrite> {
    rules
        .into_iter()
        .map(|mut r| {
            let inner = r.applier.clone();
            r.applier = Arc::new(TypeGuard { inner });
            r
        })
        .collect()
}

/// The guard's check for appliers that build their right side in code (they have no pattern
/// for [`TypeGuard`] to type): adds `node` to `eclass` only when it types as the e-class does.
pub fn union_if_typed(egraph: &mut FuseGraph, eclass: Id, node: Fuse) -> Vec<Id> {
    let data = node_data(&node, |id| egraph[id].data.clone());
    if !matches!(&data, Data::Tensor(_)) || data != egraph[eclass].data {
        return vec![];
    }
    let id = egraph.add(node);
    if egraph.union(eclass, id) {
        vec![eclass]
    } else {
        vec![]
    }
}

/// The data the right side `ast` would have under `subst`, computed without adding anything.
pub fn instantiated_data(egraph: &FuseGraph, ast: &PatternAst<Fuse>, subst: &Subst) -> Data {
    let mut data: Vec<Data> = Vec::with_capacity(ast.as_ref().len());
    for node in ast.as_ref() {
        let d = match node {
            ENodeOrVar::Var(v) => match subst.get(*v) {
                Some(&id) => egraph[id].data.clone(),
                None => Data::Ill(format!("{v} is unbound")),
            },
            ENodeOrVar::ENode(n) => node_data(n, |c| data[usize::from(c)].clone()),
        };
        data.push(d);
    }
    data.pop()
        .unwrap_or_else(|| Data::Ill("empty pattern".into()))
}

impl Applier<Fuse, TensorAnalysis> for TypeGuard {
    fn apply_one(
        &self,
        egraph: &mut FuseGraph,
        eclass: Id,
        subst: &Subst,
        searcher_ast: Option<&PatternAst<Fuse>>,
        rule_name: Symbol,
    ) -> Vec<Id> {
        if let Some(ast) = self.inner.get_pattern_ast() {
            let want = &egraph[eclass].data;
            let got = instantiated_data(egraph, ast, subst);
            if want.tensor().is_none() || got != *want {
                return vec![];
            }
        }
        self.inner
            .apply_one(egraph, eclass, subst, searcher_ast, rule_name)
    }

    fn get_pattern_ast(&self) -> Option<&PatternAst<Fuse>> {
        self.inner.get_pattern_ast()
    }

    fn vars(&self) -> Vec<Var> {
        self.inner.vars()
    }
}
