//! Algebraic simplification: local rewrite rules, common-subexpression elimination and
//! dead-code elimination, in one linear walk plus one compaction.
//!
//! The rules are data, in the manner of tinygrad's `symbolic_simple`: [`RULES`] lists one rule
//! per line with the identity it applies, and the walk looks rules up by the root op's
//! mnemonic ([`Op::name`]). A rule reads the node and its operands' producers and returns
//! `None` to decline, or a [`Replacement`].
//!
//! The walk rebuilds the graph in program order. Each node is appended with its operands
//! already simplified, so a rule always sees the final form of what it reads (a chain of five
//! reshapes folds in one walk). When a rule replaces a node by a new one, the rules run again
//! on the new node. A node that survives the rules is then looked up by op and operands: an
//! identical earlier node (common subexpression) takes its place. Parameters and inputs are
//! never merged: each is bound by its own name. Nodes that no output reads are dropped at the
//! end, except parameters and inputs, which are the program's interface (the plan's state and
//! the data pipeline bind them by name, even when a model ignores one).
//!
//! Every rule preserves the interpreter's results exactly, in both of its precisions
//! ([`mmc_ir::Precision`]), with one exception: `x + 0 -> x` keeps the sign of a `-0.0` that
//! the addition would have turned into `+0.0`. Constant folding computes through the
//! interpreter itself, in both precisions, and folds only where they agree (`2 * 3`, `1 / 32`,
//! not `sqrt 8` in f32), so a folded value is what either mode computes unfolded.

use crate::emit::PassError;
use mmc_ir::{BinaryOp, DType, Graph, Interpreter, NodeId, Op, Precision, TensorType, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What a rule turns a node into.
#[derive(Clone, Debug, PartialEq)]
pub enum Replacement {
    /// The node's result is this existing value (of the same type).
    Value(Value),
    /// The node becomes this op over these existing operands (with the same result type).
    Node { op: Op, inputs: Vec<Value> },
}

/// A rewrite rule: the graph and a node of it (single result) to a replacement, or `None`.
pub type Rule = fn(&Graph, NodeId) -> Option<Replacement>;

/// A rule that applies whatever the root op is (constant folding), in [`RULES`]' first column.
pub const ANY_OP: &str = "*";

/// Every rewrite rule: (root op mnemonic or [`ANY_OP`], rule name, rule).
#[rustfmt::skip]
pub const RULES: &[(&str, &str, Rule)] = &[
    // ** movement folding **
    ("reshape",   "reshape-noop",      reshape_noop),      // reshape(x: S) to S -> x
    ("reshape",   "reshape-reshape",   reshape_reshape),   // reshape(reshape(x)) -> reshape(x)
    ("broadcast", "broadcast-noop",    broadcast_noop),    // broadcast(x: S) to S -> x
    ("broadcast", "broadcast-broadcast", broadcast_broadcast), // broadcast(broadcast(x)) -> broadcast(x)
    ("permute",   "permute-noop",      permute_noop),      // permute(x, identity) -> x
    ("permute",   "permute-permute",   permute_permute),   // permute(permute(x, p), q) -> permute(x, p[q])
    ("slice",     "slice-noop",        slice_noop),        // slice(x, 0..shape) -> x
    // ** casts **
    ("cast",      "cast-noop",         cast_noop),         // cast(x: T) to T -> x
    ("cast",      "cast-cast",         cast_cast),         // cast(cast(x: A, B), C) -> cast(x, C) when B holds every A exactly
    // ** identities **
    ("mul",       "mul-one",           mul_one),           // x*1 -> x, 1*x -> x
    ("add",       "add-zero",          add_zero),          // x+0 -> x, 0+x -> x
    // ** constant folding **
    (ANY_OP,      "fold-const",        fold_const),        // op(const, ..) -> const, when the result is one value
];

/// The largest result (elements) that constant folding evaluates in full; elementwise and
/// movement ops over constants are evaluated on one element, whatever their size.
pub const FOLD_LIMIT: usize = 1 << 12;

/// How often the rules may replace one node before the walk moves on (a safeguard against two
/// rules undoing each other; no rule of [`RULES`] does).
const MAX_REWRITES_PER_NODE: usize = 16;

/// What a simplification run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimplifyReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// How often each rule fired, by rule name.
    pub rewrites: BTreeMap<&'static str, usize>,
    /// Nodes replaced by an identical earlier node.
    pub merged: usize,
    /// Nodes dropped because nothing reads them (after the rewrites, so rewritten nodes count).
    pub dead: usize,
}

impl SimplifyReport {
    /// Whether the run changed nothing.
    pub fn unchanged(&self) -> bool {
        self.rewrites.is_empty() && self.merged == 0 && self.dead == 0
    }
}

/// `59 merged, 16 dead; rules: reshape-reshape 12, ...` (the node counts are the pipeline
/// report's own columns).
impl fmt::Display for SimplifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} merged, {} dead", self.merged, self.dead)?;
        if !self.rewrites.is_empty() {
            let rules: Vec<String> = self
                .rewrites
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            write!(f, "; rules: {}", rules.join(", "))?;
        }
        Ok(())
    }
}

/// The rules of `rules` by root mnemonic, [`ANY_OP`] rules last under every op.
struct RuleIndex<'r> {
    by_op: HashMap<&'static str, Vec<(&'static str, Rule)>>,
    any: Vec<(&'static str, Rule)>,
    _rules: std::marker::PhantomData<&'r ()>,
}

impl<'r> RuleIndex<'r> {
    fn new(rules: &'r [(&'static str, &'static str, Rule)]) -> Self {
        let mut by_op: HashMap<&'static str, Vec<(&'static str, Rule)>> = HashMap::new();
        let mut any = Vec::new();
        for &(op, name, rule) in rules {
            if op == ANY_OP {
                any.push((name, rule));
            } else {
                by_op.entry(op).or_default().push((name, rule));
            }
        }
        RuleIndex {
            by_op,
            any,
            _rules: std::marker::PhantomData,
        }
    }

    fn rules_for(&self, op: &str) -> impl Iterator<Item = &(&'static str, Rule)> {
        self.by_op.get(op).into_iter().flatten().chain(&self.any)
    }
}

/// Simplifies `g` with every rule of [`RULES`], merges common subexpressions and drops dead
/// nodes.
pub fn simplify(g: &Graph) -> Result<(Graph, SimplifyReport), PassError> {
    simplify_with(g, RULES, true)
}

/// [`simplify`] with a chosen rule set, and common-subexpression elimination on or off (the
/// unit tests run one rule at a time).
pub fn simplify_with(
    g: &Graph,
    rules: &[(&'static str, &'static str, Rule)],
    cse: bool,
) -> Result<(Graph, SimplifyReport), PassError> {
    let index = RuleIndex::new(rules);
    let mut report = SimplifyReport {
        nodes_before: g.nodes().len(),
        ..Default::default()
    };
    let mut out = Graph::new(g.stage);
    let mut map: Vec<Option<Value>> = vec![None; g.num_values()];
    let mut seen: HashMap<(String, Vec<Value>), NodeId> = HashMap::new();
    // Nodes of `out` that the walk appended and then replaced: dead by construction.
    let mut replaced = 0usize;
    for node in g.nodes() {
        let inputs: Vec<Value> = node
            .inputs
            .iter()
            .map(|v| map[v.0 as usize].expect("verified graph: operands are defined first"))
            .collect();
        let types: Vec<TensorType> = node.outputs.iter().map(|&v| g.ty(v).clone()).collect();
        let scope = out.intern_scope(g.scope_name(node.scope));
        let mut cur = out.push_node_unchecked(node.op.clone(), &inputs, types, scope);
        let mut result: Option<Value> = None;
        if out.node(cur).outputs.len() == 1 {
            let want = g.ty(node.outputs[0]).clone();
            'rules: for _ in 0..MAX_REWRITES_PER_NODE {
                let op_name = out.node(cur).op.name();
                let fired = index
                    .rules_for(op_name)
                    .find_map(|&(name, rule)| rule(&out, cur).map(|r| (name, r)));
                let Some((name, replacement)) = fired else {
                    break 'rules;
                };
                *report.rewrites.entry(name).or_default() += 1;
                replaced += 1;
                match replacement {
                    Replacement::Value(v) => {
                        check_type(&out, v, &want, name)?;
                        result = Some(v);
                        break 'rules;
                    }
                    Replacement::Node { op, inputs } => {
                        cur = out
                            .add_node(op, &inputs, scope)
                            .map_err(|source| PassError {
                                pass: "simplify",
                                source,
                            })?;
                        check_type(&out, out.result(cur), &want, name)?;
                    }
                }
            }
        }
        if let Some(v) = result {
            map[node.outputs[0].0 as usize] = Some(v);
            continue;
        }
        let mut target = cur;
        if cse && !matches!(out.node(cur).op, Op::Param { .. } | Op::Input { .. }) {
            let n = out.node(cur);
            let key = (format!("{:?}", n.op), n.inputs.to_vec());
            match seen.get(&key) {
                Some(&earlier) => {
                    target = earlier;
                    report.merged += 1;
                    replaced += 1;
                }
                None => {
                    seen.insert(key, cur);
                }
            }
        }
        for (&old, &new) in node.outputs.iter().zip(&out.node(target).outputs) {
            map[old.0 as usize] = Some(new);
        }
    }
    for (name, v) in g.outputs() {
        out.add_output(
            name.clone(),
            map[v.0 as usize].expect("outputs are defined"),
        );
    }
    let walked = out.nodes().len();
    let compact = dce(&out);
    // Dead nodes of the input, as opposed to the nodes the walk itself replaced.
    report.dead = (walked - compact.nodes().len()).saturating_sub(replaced);
    report.nodes_after = compact.nodes().len();
    Ok((compact, report))
}

fn check_type(g: &Graph, v: Value, want: &TensorType, rule: &'static str) -> Result<(), PassError> {
    if g.ty(v) == want {
        return Ok(());
    }
    Err(PassError {
        pass: "simplify",
        source: mmc_ir::GraphError::Type(mmc_ir::TypeError {
            op: rule,
            reason: format!("the rule changed a {want} value into {}", g.ty(v)),
        }),
    })
}

/// Dead-code elimination: keeps the nodes that an output reads (directly or not), and every
/// parameter and input. Node order and scopes are kept.
pub fn dce(g: &Graph) -> Graph {
    let mut live = vec![false; g.num_values()];
    for (_, v) in g.outputs() {
        live[v.0 as usize] = true;
    }
    let mut keep = vec![false; g.nodes().len()];
    for (i, node) in g.nodes().iter().enumerate().rev() {
        let interface = matches!(node.op, Op::Param { .. } | Op::Input { .. });
        if interface || node.outputs.iter().any(|o| live[o.0 as usize]) {
            keep[i] = true;
            for v in &node.inputs {
                live[v.0 as usize] = true;
            }
        }
    }
    let mut out = Graph::new(g.stage);
    let mut map: Vec<Option<Value>> = vec![None; g.num_values()];
    for (node, _) in g.nodes().iter().zip(&keep).filter(|(_, k)| **k) {
        let inputs: Vec<Value> = node
            .inputs
            .iter()
            .map(|v| map[v.0 as usize].expect("a kept node's operands are kept"))
            .collect();
        let types = node.outputs.iter().map(|&v| g.ty(v).clone()).collect();
        let scope = out.intern_scope(g.scope_name(node.scope));
        let id = out.push_node_unchecked(node.op.clone(), &inputs, types, scope);
        for (&old, &new) in node.outputs.iter().zip(&out.node(id).outputs) {
            map[old.0 as usize] = Some(new);
        }
    }
    for (name, v) in g.outputs() {
        out.add_output(name.clone(), map[v.0 as usize].expect("outputs are live"));
    }
    out
}

// ---- helpers the rules share ----

/// The node that defines `v`.
fn producer(g: &Graph, v: Value) -> &mmc_ir::Node {
    let data = g.value_data(v).expect("a value of this graph");
    g.node(data.node)
}

/// The single operand of node `id`, and the type of its result.
fn unary_operand(g: &Graph, id: NodeId) -> Option<Value> {
    match g.node(id).inputs.as_slice() {
        [x] => Some(*x),
        _ => None,
    }
}

/// The value of a `const` node, if `v` is defined by one.
fn const_value(g: &Graph, v: Value) -> Option<f64> {
    match &producer(g, v).op {
        Op::Const { value, .. } => Some(*value),
        _ => None,
    }
}

/// Whether the constant `c` equals `want` under the dtype of `v` (an integer constant of 1.0
/// and a float one are both one).
fn is_const(g: &Graph, v: Value, want: f64) -> bool {
    const_value(g, v).is_some_and(|c| c == want)
}

/// The operand of node `id` if it has one and its type equals the result's.
fn same_type_operand(g: &Graph, id: NodeId) -> Option<Value> {
    let x = unary_operand(g, id)?;
    (g.ty(x) == g.ty(g.result(id))).then_some(x)
}

// ---- movement folding ----

/// reshape(x: S) to S -> x
fn reshape_noop(g: &Graph, id: NodeId) -> Option<Replacement> {
    match g.node(id).op {
        Op::Reshape { .. } => same_type_operand(g, id).map(Replacement::Value),
        _ => None,
    }
}

/// reshape(reshape(x)) -> reshape(x)
fn reshape_reshape(g: &Graph, id: NodeId) -> Option<Replacement> {
    let Op::Reshape { shape } = &g.node(id).op else {
        return None;
    };
    let inner = producer(g, unary_operand(g, id)?);
    match (&inner.op, inner.inputs.as_slice()) {
        (Op::Reshape { .. }, [x]) => Some(Replacement::Node {
            op: Op::Reshape {
                shape: shape.clone(),
            },
            inputs: vec![*x],
        }),
        _ => None,
    }
}

/// broadcast(x: S) to S -> x
fn broadcast_noop(g: &Graph, id: NodeId) -> Option<Replacement> {
    match g.node(id).op {
        Op::Broadcast { .. } => same_type_operand(g, id).map(Replacement::Value),
        _ => None,
    }
}

/// broadcast(broadcast(x)) -> broadcast(x): both expand size-1 axes of the same rank, so the
/// outer target is reachable from `x` directly.
fn broadcast_broadcast(g: &Graph, id: NodeId) -> Option<Replacement> {
    let Op::Broadcast { shape } = &g.node(id).op else {
        return None;
    };
    let inner = producer(g, unary_operand(g, id)?);
    match (&inner.op, inner.inputs.as_slice()) {
        (Op::Broadcast { .. }, [x]) => Some(Replacement::Node {
            op: Op::Broadcast {
                shape: shape.clone(),
            },
            inputs: vec![*x],
        }),
        _ => None,
    }
}

fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| i == p)
}

/// permute(x, identity) -> x
fn permute_noop(g: &Graph, id: NodeId) -> Option<Replacement> {
    match &g.node(id).op {
        Op::Permute { perm } if is_identity(perm) => unary_operand(g, id).map(Replacement::Value),
        _ => None,
    }
}

/// permute(permute(x, p), q) -> permute(x, p[q]): result axis i of the outer permute is axis
/// q[i] of the inner one, which is axis p[q[i]] of x.
fn permute_permute(g: &Graph, id: NodeId) -> Option<Replacement> {
    let Op::Permute { perm: q } = &g.node(id).op else {
        return None;
    };
    let inner = producer(g, unary_operand(g, id)?);
    match (&inner.op, inner.inputs.as_slice()) {
        (Op::Permute { perm: p }, [x]) => Some(Replacement::Node {
            op: Op::Permute {
                perm: q.iter().map(|&i| p[i]).collect(),
            },
            inputs: vec![*x],
        }),
        _ => None,
    }
}

/// slice(x, 0..shape) -> x
fn slice_noop(g: &Graph, id: NodeId) -> Option<Replacement> {
    match &g.node(id).op {
        Op::Slice { start, .. } if start.iter().all(|&s| s == 0) => {
            same_type_operand(g, id).map(Replacement::Value)
        }
        _ => None,
    }
}

// ---- casts ----

/// cast(x: T) to T -> x
fn cast_noop(g: &Graph, id: NodeId) -> Option<Replacement> {
    match g.node(id).op {
        Op::Cast { .. } => same_type_operand(g, id).map(Replacement::Value),
        _ => None,
    }
}

/// Whether every value of `from` is exactly a value of `to`, so that a cast through `to`
/// loses nothing (f32 -> f64, bf16 -> f32, i32 -> i64, bool -> anything).
pub fn holds_exactly(from: DType, to: DType) -> bool {
    use DType::*;
    from == to
        || matches!(
            (from, to),
            (F32, F64)
                | (BF16, F32 | F64)
                | (F16, F32 | F64)
                | (I32, I64 | F64)
                | (Bool, F64 | F32 | BF16 | F16 | I64 | I32)
        )
}

/// cast(cast(x: A, B), C) -> cast(x, C) when B holds every A exactly; that is x itself when C
/// is A (f32 -> f64 -> f32), and never fires through a narrower type (f32 -> bf16 -> f32).
fn cast_cast(g: &Graph, id: NodeId) -> Option<Replacement> {
    let Op::Cast { to } = g.node(id).op else {
        return None;
    };
    let mid = unary_operand(g, id)?;
    let inner = producer(g, mid);
    let (Op::Cast { .. }, [x]) = (&inner.op, inner.inputs.as_slice()) else {
        return None;
    };
    if !holds_exactly(g.ty(*x).dtype, g.ty(mid).dtype) {
        return None;
    }
    Some(if g.ty(*x).dtype == to {
        Replacement::Value(*x)
    } else {
        Replacement::Node {
            op: Op::Cast { to },
            inputs: vec![*x],
        }
    })
}

// ---- identities ----

/// The operand of a binary node `id` of kind `kind` whose other operand is the constant
/// `neutral`.
fn neutral_operand(g: &Graph, id: NodeId, kind: BinaryOp, neutral: f64) -> Option<Value> {
    let node = g.node(id);
    match (&node.op, node.inputs.as_slice()) {
        (Op::Binary(b), [x, y]) if *b == kind => {
            if is_const(g, *y, neutral) {
                Some(*x)
            } else if is_const(g, *x, neutral) {
                Some(*y)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// x*1 -> x, 1*x -> x
fn mul_one(g: &Graph, id: NodeId) -> Option<Replacement> {
    neutral_operand(g, id, BinaryOp::Mul, 1.0).map(Replacement::Value)
}

/// x+0 -> x, 0+x -> x
fn add_zero(g: &Graph, id: NodeId) -> Option<Replacement> {
    neutral_operand(g, id, BinaryOp::Add, 0.0).map(Replacement::Value)
}

// ---- constant folding ----

/// Whether `op` computes each result element from the same-position operand elements only,
/// so that its result over one-valued operands is one value, computable on a single element.
fn elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. }
    )
}

/// Whether `op` only moves elements, so that over a one-valued operand it keeps that value.
fn movement(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. } | Op::Broadcast { .. } | Op::Permute { .. } | Op::Slice { .. }
    )
}

/// op(const, ..) -> const: a node whose operands are all constants, and whose result is one
/// value in every element, becomes a constant. Elementwise ops are evaluated on one element,
/// movement ops keep the value, and any other op (a reduction, `iota` of a size-1 axis) is
/// evaluated in full when its result has at most [`FOLD_LIMIT`] elements. The result must be a
/// single value because `const` holds one; a table such as RoPE's inverse frequencies (iota
/// based) stays unfolded until the IR has a literal-tensor op.
fn fold_const(g: &Graph, id: NodeId) -> Option<Replacement> {
    let node = g.node(id);
    if matches!(
        node.op,
        Op::Const { .. } | Op::Param { .. } | Op::Input { .. } | Op::Fused(_)
    ) {
        return None;
    }
    let values: Vec<f64> = node
        .inputs
        .iter()
        .map(|&v| const_value(g, v))
        .collect::<Option<_>>()?;
    let out_ty = g.ty(g.result(id)).clone();
    let value = if movement(&node.op) {
        values[0]
    } else if elementwise(&node.op) {
        let scalar = |v: Value| TensorType::scalar(g.ty(v).dtype);
        let ins: Vec<(f64, TensorType)> = node
            .inputs
            .iter()
            .zip(&values)
            .map(|(&v, &c)| (c, scalar(v)))
            .collect();
        evaluate(&node.op, &ins)?
    } else if out_ty.numel() <= FOLD_LIMIT
        && node.inputs.iter().all(|&v| g.ty(v).numel() <= FOLD_LIMIT)
    {
        let ins: Vec<(f64, TensorType)> = node
            .inputs
            .iter()
            .zip(&values)
            .map(|(&v, &c)| (c, g.ty(v).clone()))
            .collect();
        evaluate(&node.op, &ins)?
    } else {
        return None;
    };
    Some(Replacement::Node {
        op: Op::Const { value, ty: out_ty },
        inputs: vec![],
    })
}

/// Runs `op` on constant operands in the interpreter, in both of its precisions, and returns
/// its result's one value; `None` when the result is not one value, when the two precisions
/// disagree (the rounding of the declared dtype matters, as for `sqrt 8` in f32: folding would
/// then change what an f64 run computes), or when it is not exactly representable as a
/// constant.
fn evaluate(op: &Op, inputs: &[(f64, TensorType)]) -> Option<f64> {
    let declared = evaluate_in(op, inputs, Precision::Declared)?;
    let exact = evaluate_in(op, inputs, Precision::F64)?;
    (declared.to_bits() == exact.to_bits() || (declared.is_nan() && exact.is_nan()))
        .then_some(declared)
}

fn evaluate_in(op: &Op, inputs: &[(f64, TensorType)], precision: Precision) -> Option<f64> {
    let mut g = Graph::new(mmc_ir::Stage::Optimizer);
    let scope = g.intern_scope("");
    let mut vals = Vec::with_capacity(inputs.len());
    for (value, ty) in inputs {
        let id = g
            .add_node(
                Op::Const {
                    value: *value,
                    ty: ty.clone(),
                },
                &[],
                scope,
            )
            .ok()?;
        vals.push(g.result(id));
    }
    let id = g.add_node(op.clone(), &vals, scope).ok()?;
    if g.node(id).outputs.len() != 1 {
        return None;
    }
    g.add_output("y", g.result(id));
    let interp = Interpreter::new(&g, precision).ok()?;
    let empty: HashMap<String, mmc_ir::Tensor> = HashMap::new();
    let out = interp.run(&empty).ok()?;
    let t = out.get("y")?;
    let elems = t.to_f64_vec();
    let first = *elems.first()?;
    let same = |x: &f64| x.to_bits() == first.to_bits() || (x.is_nan() && first.is_nan());
    if !elems.iter().all(same) {
        return None;
    }
    // An integer constant is stored as f64: beyond 2^53 it would not come back exact.
    if !t.dtype().is_float() && first.abs() > (1u64 << 53) as f64 {
        return None;
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    //! One positive and one near-miss test per rule: the positive one states the whole result,
    //! the negative one that the rule declines and the graph is unchanged. Both also check
    //! that the interpreter gives the same outputs before and after.

    use super::*;
    use mmc_ir::text::{parse, print};
    use mmc_ir::{Tensor, TensorData};

    /// The table entry of rule `name`.
    fn only(name: &str) -> Vec<(&'static str, &'static str, Rule)> {
        let rules: Vec<_> = RULES.iter().copied().filter(|r| r.1 == name).collect();
        assert!(!rules.is_empty(), "no rule named {name}");
        rules
    }

    /// Deterministic bindings for every parameter and input: floats from a sine, integers
    /// in 0..3, bools alternating.
    fn bindings(g: &Graph) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, (name, ty, _)) in g.params().chain(g.inputs()).enumerate() {
            let n = ty.numel();
            let f: Vec<f64> = (0..n)
                .map(|i| ((i * 7 + k * 3) as f64 * 0.37).sin() * 2.0)
                .collect();
            let data = match ty.dtype {
                DType::I64 => TensorData::I64((0..n).map(|i| (i % 3) as i64).collect()),
                DType::I32 => TensorData::I32((0..n).map(|i| (i % 3) as i32).collect()),
                DType::Bool => TensorData::Bool((0..n).map(|i| i % 2 == 0).collect()),
                d => Tensor::from_f64(d, ty.shape.clone(), &f)
                    .expect("sized")
                    .into_data(),
            };
            out.insert(
                name.to_string(),
                Tensor::new(ty.shape.clone(), data).expect("sized"),
            );
        }
        out
    }

    fn run(g: &Graph, b: &HashMap<String, Tensor>) -> mmc_ir::Outputs {
        Interpreter::new(g, Precision::Declared)
            .expect("verifies")
            .run(b)
            .expect("runs")
    }

    /// Runs `rules` (no CSE) over `src`; checks the result verifies and computes the same.
    fn apply(rules: &[(&'static str, &'static str, Rule)], src: &str) -> (String, SimplifyReport) {
        let g = parse(src).expect("parses");
        mmc_ir::verify(&g).expect("the test input verifies");
        let (out, report) = simplify_with(&g, rules, false).expect("simplifies");
        mmc_ir::verify(&out).expect("the result verifies");
        let b = bindings(&g);
        let (want, got) = (run(&g, &b), run(&out, &b));
        for ((n, w), (_, o)) in want.0.iter().zip(&got.0) {
            assert_eq!(w.to_f64_vec(), o.to_f64_vec(), "output {n} changed");
        }
        (print(&out), report)
    }

    /// Asserts that rule `name` fires on `src` and the result prints as `want`.
    #[track_caller]
    fn fires(name: &str, src: &str, want: &str) {
        let (got, report) = apply(&only(name), src);
        assert!(
            report.rewrites.get(name).is_some_and(|&n| n > 0),
            "{name} did not fire"
        );
        assert_eq!(got.trim(), want.trim(), "after {name}");
    }

    /// Asserts that rule `name` declines on `src`, which stays as it is.
    #[track_caller]
    fn declines(name: &str, src: &str) {
        let (got, report) = apply(&only(name), src);
        assert!(report.rewrites.is_empty(), "{name} fired: {report}");
        assert_eq!(got.trim(), src.trim(), "{name} changed the graph");
    }

    #[test]
    fn reshape_noop() {
        fires(
            "reshape-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = reshape %0 : f32[2, 3]\n  %2 = exp %1 : f32[2, 3]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = exp %0 : f32[2, 3]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn reshape_noop_declines_a_real_reshape() {
        declines(
            "reshape-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = reshape %0 : f32[3, 2]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn reshape_reshape() {
        fires(
            "reshape-reshape",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = reshape %0 : f32[6]\n  %2 = reshape %1 : f32[3, 2]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = reshape %0 : f32[3, 2]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn reshape_reshape_declines_a_reshape_of_a_permute() {
        declines(
            "reshape-reshape",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = permute %0 perm=[1, 0] : f32[3, 2]\n  %2 = reshape %1 : f32[6]\n  output \"y\" = %2\n}",
        );
    }

    #[test]
    fn broadcast_noop() {
        fires(
            "broadcast-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = broadcast %0 : f32[2, 3]\n  output \"y\" = %1\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn broadcast_noop_declines_an_expansion() {
        declines(
            "broadcast-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[1, 3]\n  %1 = broadcast %0 : f32[2, 3]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn broadcast_broadcast() {
        fires(
            "broadcast-broadcast",
            "graph frontend {\n  %0 = input \"x\" : f32[1, 1]\n  %1 = broadcast %0 : f32[1, 3]\n  %2 = broadcast %1 : f32[2, 3]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[1, 1]\n  %1 = broadcast %0 : f32[2, 3]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn broadcast_broadcast_declines_a_broadcast_of_a_reshape() {
        declines(
            "broadcast-broadcast",
            "graph frontend {\n  %0 = input \"x\" : f32[3]\n  %1 = reshape %0 : f32[1, 3]\n  %2 = broadcast %1 : f32[2, 3]\n  output \"y\" = %2\n}",
        );
    }

    #[test]
    fn permute_noop() {
        fires(
            "permute-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = permute %0 perm=[0, 1] : f32[2, 3]\n  output \"y\" = %1\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn permute_noop_declines_a_swap_of_equal_axes() {
        // Same type in and out, yet the elements move: only the identity permutation is a no-op.
        declines(
            "permute-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 2]\n  %1 = permute %0 perm=[1, 0] : f32[2, 2]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn permute_permute() {
        fires(
            "permute-permute",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3, 4]\n  %1 = permute %0 perm=[1, 2, 0] : f32[3, 4, 2]\n  %2 = permute %1 perm=[0, 2, 1] : f32[3, 2, 4]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3, 4]\n  %1 = permute %0 perm=[1, 0, 2] : f32[3, 2, 4]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn permute_permute_to_the_identity_is_x() {
        let (got, _) = apply(
            &[only("permute-permute"), only("permute-noop")].concat(),
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = permute %0 perm=[1, 0] : f32[3, 2]\n  %2 = permute %1 perm=[1, 0] : f32[2, 3]\n  output \"y\" = %2\n}",
        );
        assert_eq!(
            got.trim(),
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  output \"y\" = %0\n}"
        );
    }

    #[test]
    fn permute_permute_declines_a_permute_of_a_reshape() {
        declines(
            "permute-permute",
            "graph frontend {\n  %0 = input \"x\" : f32[6]\n  %1 = reshape %0 : f32[2, 3]\n  %2 = permute %1 perm=[1, 0] : f32[3, 2]\n  output \"y\" = %2\n}",
        );
    }

    #[test]
    fn slice_noop() {
        fires(
            "slice-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = slice %0 start=[0, 0] end=[2, 3] : f32[2, 3]\n  output \"y\" = %1\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn slice_noop_declines_a_slice_that_drops_an_element() {
        declines(
            "slice-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = slice %0 start=[0, 0] end=[2, 2] : f32[2, 2]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn cast_noop() {
        fires(
            "cast-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = cast %0 : f32[2]\n  output \"y\" = %1\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn cast_noop_declines_a_widening() {
        declines(
            "cast-noop",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = cast %0 : f64[2]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn cast_cast_round_trip_through_a_wider_type() {
        fires(
            "cast-cast",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = cast %0 : f64[2]\n  %2 = cast %1 : f32[2]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn cast_cast_through_a_wider_type_to_a_third() {
        fires(
            "cast-cast",
            "graph frontend {\n  %0 = input \"x\" : bf16[2]\n  %1 = cast %0 : f32[2]\n  %2 = cast %1 : f16[2]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : bf16[2]\n  %1 = cast %0 : f16[2]\n  output \"y\" = %1\n}",
        );
    }

    #[test]
    fn cast_cast_declines_a_round_trip_through_a_narrower_type() {
        declines(
            "cast-cast",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = cast %0 : bf16[2]\n  %2 = cast %1 : f32[2]\n  output \"y\" = %2\n}",
        );
    }

    #[test]
    fn holds_exactly_is_true_only_for_widenings() {
        use DType::*;
        assert!(holds_exactly(F32, F64) && holds_exactly(BF16, F32) && holds_exactly(I32, I64));
        assert!(!holds_exactly(F64, F32) && !holds_exactly(F32, BF16) && !holds_exactly(BF16, F16));
        assert!(!holds_exactly(I64, F64) && !holds_exactly(I32, F32) && !holds_exactly(F32, I64));
    }

    #[test]
    fn mul_one() {
        fires(
            "mul-one",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = const value=1.0 : f32[2]\n  %2 = mul %1, %0 : f32[2]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn mul_one_declines_a_constant_near_one() {
        declines(
            "mul-one",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = const value=1.0000001 : f32[2]\n  %2 = mul %0, %1 : f32[2]\n  output \"y\" = %2\n}",
        );
    }

    #[test]
    fn add_zero() {
        fires(
            "add-zero",
            "graph frontend {\n  %0 = input \"x\" : i64[2]\n  %1 = const value=0.0 : i64[2]\n  %2 = add %0, %1 : i64[2]\n  output \"y\" = %2\n}",
            "graph frontend {\n  %0 = input \"x\" : i64[2]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn add_zero_declines_a_subtraction_and_a_one() {
        declines(
            "add-zero",
            "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = const value=0.0 : f32[2]\n  %2 = sub %1, %0 : f32[2]\n  %3 = const value=1.0 : f32[2]\n  %4 = add %2, %3 : f32[2]\n  output \"y\" = %4\n}",
        );
    }

    #[test]
    fn fold_const_of_exact_scalar_arithmetic() {
        fires(
            "fold-const",
            "graph frontend {\n  %0 = const value=0.25 : f32[]\n  %1 = const value=3.0 : f32[]\n  %2 = mul %0, %1 : f32[]\n  %3 = const value=2.0 : f32[]\n  %4 = div %2, %3 : f32[]\n  output \"y\" = %4\n}",
            "graph frontend {\n  %0 = const value=0.375 : f32[]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn fold_const_declines_where_the_declared_rounding_matters() {
        // sqrt 8 rounds in f32: folding it would change what an f64 run computes. So does
        // 0.1 * 3, whose f32 operands are not 0.1 and 3 exactly in f64 mode.
        declines(
            "fold-const",
            "graph frontend {\n  %0 = const value=8.0 : f32[]\n  %1 = sqrt %0 : f32[]\n  %2 = const value=0.1 : f32[]\n  %3 = const value=3.0 : f32[]\n  %4 = mul %2, %3 : f32[]\n  %5 = add %1, %4 : f32[]\n  output \"y\" = %5\n}",
        );
    }

    #[test]
    fn fold_const_of_movement_and_reductions() {
        fires(
            "fold-const",
            "graph frontend {\n  %0 = const value=2.0 : f32[1, 4]\n  %1 = broadcast %0 : f32[3, 4]\n  %2 = reduce_sum %1 axes=[1] : f32[3, 1]\n  %3 = reshape %2 : f32[3]\n  output \"y\" = %3\n}",
            "graph frontend {\n  %0 = const value=8.0 : f32[3]\n  output \"y\" = %0\n}",
        );
    }

    #[test]
    fn fold_const_declines_a_table_and_a_non_constant_operand() {
        // iota is not one value (RoPE's tables stay), and exp of an input is not a constant.
        declines(
            "fold-const",
            "graph frontend {\n  %0 = iota axis=0 : f32[4]\n  %1 = const value=2.0 : f32[4]\n  %2 = mul %0, %1 : f32[4]\n  %3 = input \"x\" : f32[4]\n  %4 = add %2, %3 : f32[4]\n  output \"y\" = %4\n}",
        );
    }

    #[test]
    fn cse_merges_identical_nodes_but_never_sources_bound_by_name() {
        let src = "graph frontend {\n  %0 = input \"a\" : f32[2]\n  %1 = input \"b\" : f32[2]\n  %2 = exp %0 : f32[2]\n  %3 = exp %0 : f32[2]\n  %4 = exp %1 : f32[2]\n  %5 = const value=2.0 : f32[2]\n  %6 = const value=2.0 : f32[2]\n  %7 = const value=3.0 : f32[2]\n  %8 = add %2, %3 : f32[2]\n  %9 = add %4, %5 : f32[2]\n  %10 = add %6, %7 : f32[2]\n  %11 = add %8, %9 : f32[2]\n  %12 = add %11, %10 : f32[2]\n  output \"y\" = %12\n}";
        let g = parse(src).unwrap();
        let (out, report) = simplify_with(&g, &[], true).unwrap();
        assert_eq!(report.merged, 2, "{report}");
        assert_eq!(
            print(&out).trim(),
            "graph frontend {\n  %0 = input \"a\" : f32[2]\n  %1 = input \"b\" : f32[2]\n  %2 = exp %0 : f32[2]\n  %3 = exp %1 : f32[2]\n  %4 = const value=2.0 : f32[2]\n  %5 = const value=3.0 : f32[2]\n  %6 = add %2, %2 : f32[2]\n  %7 = add %3, %4 : f32[2]\n  %8 = add %4, %5 : f32[2]\n  %9 = add %6, %7 : f32[2]\n  %10 = add %9, %8 : f32[2]\n  output \"y\" = %10\n}"
        );
    }

    #[test]
    fn cse_declines_equal_ops_on_different_operands_and_different_attributes() {
        let src = "graph frontend {\n  %0 = input \"a\" : f32[2, 2]\n  %1 = input \"b\" : f32[2, 2]\n  %2 = reduce_sum %0 axes=[0] : f32[1, 2]\n  %3 = reduce_sum %1 axes=[0] : f32[1, 2]\n  %4 = reduce_sum %0 axes=[1] : f32[2, 1]\n  %5 = reshape %4 : f32[1, 2]\n  %6 = add %2, %3 : f32[1, 2]\n  %7 = add %6, %5 : f32[1, 2]\n  output \"y\" = %7\n}";
        let g = parse(src).unwrap();
        let (out, report) = simplify_with(&g, &[], true).unwrap();
        assert_eq!(report.merged, 0);
        assert_eq!(print(&out).trim(), src);
    }

    #[test]
    fn dce_drops_unread_nodes_but_keeps_parameters_and_inputs() {
        let src = "graph frontend {\n  %0 = param \"w\" : f32[2]\n  %1 = input \"x\" : f32[2]\n  %2 = exp %0 : f32[2]\n  %3 = neg %1 : f32[2]\n  output \"y\" = %3\n}";
        let (out, report) = simplify_with(&parse(src).unwrap(), &[], true).unwrap();
        assert_eq!(report.dead, 1);
        assert_eq!(
            print(&out).trim(),
            "graph frontend {\n  %0 = param \"w\" : f32[2]\n  %1 = input \"x\" : f32[2]\n  %2 = neg %1 : f32[2]\n  output \"y\" = %2\n}"
        );
    }

    #[test]
    fn dce_declines_when_everything_is_read() {
        let src = "graph frontend {\n  %0 = input \"x\" : f32[2]\n  %1 = neg %0 : f32[2]\n  %2 = exp %1 : f32[2]\n  output \"y\" = %2\n  output \"z\" = %1\n}";
        let (out, report) = simplify_with(&parse(src).unwrap(), &[], true).unwrap();
        assert!(report.unchanged(), "{report}");
        assert_eq!(print(&out).trim(), src);
    }

    #[test]
    fn the_walk_folds_a_chain_in_one_run() {
        // Five reshapes, a cast round trip and a multiply by a broadcast one: one walk.
        let src = "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = reshape %0 : f32[6]\n  %2 = reshape %1 : f32[3, 2]\n  %3 = reshape %2 : f32[1, 6]\n  %4 = reshape %3 : f32[6, 1]\n  %5 = reshape %4 : f32[2, 3]\n  %6 = cast %5 : f64[2, 3]\n  %7 = cast %6 : f32[2, 3]\n  %8 = const value=1.0 : f32[1, 3]\n  %9 = broadcast %8 : f32[2, 3]\n  %10 = mul %7, %9 : f32[2, 3]\n  output \"y\" = %10\n}";
        let (got, report) = apply(RULES, src);
        assert_eq!(
            got.trim(),
            "graph frontend {\n  %0 = input \"x\" : f32[2, 3]\n  output \"y\" = %0\n}",
            "{report}"
        );
        let g = parse(&got).unwrap();
        let (_, again) = simplify(&g).unwrap();
        assert!(
            again.unchanged(),
            "a second run still changed something: {again}"
        );
    }

    #[test]
    fn every_rule_has_a_unique_name_and_a_known_root() {
        let mut names = std::collections::HashSet::new();
        for (op, name, _) in RULES {
            assert!(names.insert(*name), "rule {name} twice");
            assert!(
                *op == ANY_OP
                    || mmc_ir::op::UNARY
                        .iter()
                        .any(|u| Op::Unary(*u).name() == *op)
                    || [
                        "reshape",
                        "broadcast",
                        "permute",
                        "slice",
                        "cast",
                        "mul",
                        "add"
                    ]
                    .contains(op),
                "rule {name}: unknown root {op}"
            );
        }
    }
}
