//! The routed MoE: the dense MoE block the frontend emits, rewritten into top-k work.
//!
//! The frontend (`frontend/src/models/qwen3_moe.rs`, `moe`) declares a sparse MoE block in its
//! plain dense form, which runs every expert on every token:
//!
//! ```text
//! dense = scatter_add(zeros[T, E], top[T, k], weights[T, k], axis 1)
//! out   = sum_e  swiglu_e(x) * broadcast(dense[:, e:e+1])
//! swiglu_e(x) = (silu(x @ gate_e^T) * (x @ up_e^T)) @ down_e^T,  silu(g) = g / (exp(-g) + 1)
//! ```
//!
//! This pass replaces it by the routed form over two stacked weights:
//!
//! ```text
//! xs  = fused.moe_permute(x, top)                 [T*k, H]  rows grouped by expert
//! off = fused.expert_offsets(top)                 [E+1]
//! h   = fused.grouped_matmul(xs, W_gate_up, off)  [T*k, 2I] W_gate_up [E, H, 2I]
//! a   = fused.swiglu(h[:, :I], h[:, I:])
//! y   = fused.grouped_matmul(a, W_down, off)      [T*k, H]  W_down [E, I, H]
//! out = fused.moe_unpermute(y, top, weights)      [T, H]
//! ```
//!
//! which is the same function (out[t] = sum_j weights[t, j] * swiglu_{top[t, j]}(x[t])) at k/E
//! of the expert FLOPs. The router (gate linear, softmax, top-k, gather, renormalisation) and
//! the `chosen` matrix of the load-balancing loss are left as they are.
//!
//! The dense form is an E-ary sum, which a fixed-size e-graph pattern cannot express, so this
//! is a structural rule over the IR: [`fuse_moe`] walks each add chain, checks that every term
//! is `swiglu_e(x) * dense[:, e]` for one `x`, one `dense = scatter_add(0, top, weights)` and
//! each expert exactly once, and refuses near misses (an expert missing or twice, a term with
//! another x, a slice of the wrong column, a non-zero scatter base, an expert weight or value
//! used outside the block), recording why in [`MoeReport::refused`].
//!
//! The stacked weights are new parameters, named as mmc's checkpoints already call an MoE
//! layer's stacks (`<layer>.mlp.experts.gate_up_proj` and `.down_proj`, see
//! `runtime/src/checkpoint/experts.rs`), in the same layout: expert e's `[H, 2I]` block is
//! `[gate_e^T | up_e^T]`, its `[I, H]` block `down_e^T`. [`MoeReport::stackings`] records how
//! each is assembled from the per-expert parameters, for the plan (`Plan::stackings`, through
//! `mmc_ir::plan::expand_stackings`), so that training state, checkpoints and random init keep
//! the per-expert names.

use crate::emit::{EmitResult, Emitter, PassError};
use mmc_ir::plan::{ParamStacking, StackPart};
use mmc_ir::{BinaryOp, DType, FusedOp, Graph, NodeId, Op, Stage, TensorType, UnaryOp, Value};
use std::collections::{HashMap, HashSet};

const PASS: &str = "fuse-moe";

/// What [`fuse_moe`] did: the blocks it routed, the stacked parameters it created, and the
/// candidates it refused.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeReport {
    /// The routed blocks, in program order.
    pub layers: Vec<MoeLayer>,
    /// How each new stacked parameter is assembled from the per-expert ones (gate_up, then
    /// down, per layer): what plan emission passes to `expand_stackings`.
    pub stackings: Vec<ParamStacking>,
    /// Sums that look like a dense MoE block (a term weighted by a column of a scatter) but
    /// did not fuse, with the reason.
    pub refused: Vec<MoeRefusal>,
}

/// One routed MoE block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeLayer {
    /// The scope of the block's sum (`model.layers.3.mlp`).
    pub scope: String,
    /// E, k, tokens T, hidden size H and expert width I.
    pub experts: usize,
    pub top_k: usize,
    pub tokens: usize,
    pub hidden: usize,
    pub width: usize,
    /// The stacked parameters' names.
    pub gate_up: String,
    pub down: String,
}

/// A candidate that did not fuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeRefusal {
    /// The root of the sum, in the input graph.
    pub node: NodeId,
    pub scope: String,
    pub reason: String,
}

/// One expert's parameters as the dense form reads them.
struct Expert {
    gate: NodeId,
    up: NodeId,
    down: NodeId,
}

/// A matched dense block.
struct Block {
    root: NodeId,
    x: Value,
    top: Value,
    weights: Value,
    /// Per expert, in expert order.
    experts: Vec<Expert>,
    /// The dtype the gate/up and the down weights are cast to before use (`None`: used in
    /// the parameter dtype).
    gate_up_cast: Option<DType>,
    down_cast: Option<DType>,
    gate_up: String,
    down: String,
}

/// A weight as the frontend reads it: a parameter, perhaps cast to the compute dtype.
struct Weight {
    param: NodeId,
    cast: Option<DType>,
    nodes: Vec<NodeId>,
}

type Match<T> = Result<T, String>;

/// Read access to a graph with its users, for the matcher.
struct View<'g> {
    g: &'g Graph,
    users: Vec<Vec<NodeId>>,
    outputs: HashSet<Value>,
}

impl<'g> View<'g> {
    fn new(g: &'g Graph) -> Self {
        let mut users = vec![Vec::new(); g.num_values()];
        for (id, n) in g.iter_nodes() {
            for v in &n.inputs {
                users[v.0 as usize].push(id);
            }
        }
        let outputs = g.outputs().iter().map(|(_, v)| *v).collect();
        View { g, users, outputs }
    }

    fn def(&self, v: Value) -> (NodeId, &'g mmc_ir::Node) {
        let id = self.g.value_data(v).expect("values of this graph").node;
        (id, self.g.node(id))
    }

    fn shape(&self, v: Value) -> &'g [usize] {
        &self.g.ty(v).shape
    }

    /// The two operands of `v` when it is the binary op `op`.
    fn binary(&self, v: Value, op: BinaryOp) -> Option<(NodeId, Value, Value)> {
        let (id, n) = self.def(v);
        (n.op == Op::Binary(op)).then(|| (id, n.inputs[0], n.inputs[1]))
    }

    fn single_user(&self, v: Value) -> bool {
        self.users[v.0 as usize].len() == 1 && !self.outputs.contains(&v)
    }

    /// `broadcast?(slice(dense, [0, e], [T, e + 1]))` with dense = scatter_add(..) [T, E]:
    /// the weight column of expert e.
    fn column(&self, v: Value, nodes: &mut Vec<NodeId>) -> Option<(Value, usize)> {
        let (id, n) = self.def(v);
        let v = match n.op {
            Op::Broadcast { .. } => {
                nodes.push(id);
                n.inputs[0]
            }
            _ => v,
        };
        let (sid, s) = self.def(v);
        let Op::Slice { start, end } = &s.op else {
            return None;
        };
        let dense = s.inputs[0];
        let (_, d) = self.def(dense);
        if !matches!(d.op, Op::ScatterAdd { axis: 1 }) || self.shape(dense).len() != 2 {
            return None;
        }
        nodes.push(sid);
        let t = self.shape(dense)[0];
        let e = start.get(1).copied()?;
        (start.len() == 2 && start[0] == 0 && end == &[t, e + 1]).then_some((dense, e))
    }

    /// A term `y * column_e` (either operand order): the term's value y, dense and e.
    fn term(&self, v: Value) -> Option<(Value, Value, usize, Vec<NodeId>)> {
        let (id, a, b) = self.binary(v, BinaryOp::Mul)?;
        for (y, col) in [(a, b), (b, a)] {
            let mut nodes = vec![id];
            if let Some((dense, e)) = self.column(col, &mut nodes) {
                return Some((y, dense, e, nodes));
            }
        }
        None
    }

    /// The leaves of the add tree at `v`: an operand that is itself an add with this add as
    /// its only user is part of the tree.
    fn add_leaves(&self, v: Value, leaves: &mut Vec<Value>, adds: &mut Vec<NodeId>) {
        match self.binary(v, BinaryOp::Add) {
            Some((id, a, b)) => {
                adds.push(id);
                for o in [a, b] {
                    if self.binary(o, BinaryOp::Add).is_some() && self.single_user(o) {
                        self.add_leaves(o, leaves, adds);
                    } else {
                        leaves.push(o);
                    }
                }
            }
            None => leaves.push(v),
        }
    }

    /// `p` or `cast(p)` for a parameter p.
    fn weight(&self, v: Value) -> Match<Weight> {
        let (id, n) = self.def(v);
        match &n.op {
            Op::Param { .. } => Ok(Weight {
                param: id,
                cast: None,
                nodes: vec![id],
            }),
            Op::Cast { to } => {
                let (pid, p) = self.def(n.inputs[0]);
                match p.op {
                    Op::Param { .. } => Ok(Weight {
                        param: pid,
                        cast: Some(*to),
                        nodes: vec![id, pid],
                    }),
                    _ => Err("an expert weight is not a parameter".into()),
                }
            }
            _ => Err("an expert weight is not a parameter".into()),
        }
    }

    /// `a @ permute(w, [1, 0])`, the torch Linear `a @ w^T`: (a, w).
    fn linear(&self, v: Value, nodes: &mut Vec<NodeId>) -> Match<(Value, Weight)> {
        let (id, n) = self.def(v);
        if n.op != Op::MatMul || self.shape(v).len() != 2 {
            return Err(format!("`{}` is not a linear layer", n.op.name()));
        }
        let (pid, p) = self.def(n.inputs[1]);
        if p.op != (Op::Permute { perm: vec![1, 0] }) {
            return Err("a linear layer's weight is not transposed".into());
        }
        nodes.extend([id, pid]);
        let w = self.weight(p.inputs[0])?;
        Ok((n.inputs[0], w))
    }

    /// `g / (exp(-g) + 1)`: g.
    fn silu(&self, v: Value, nodes: &mut Vec<NodeId>) -> Option<Value> {
        let (did, g, den) = self.binary(v, BinaryOp::Div)?;
        let (aid, a, b) = self.binary(den, BinaryOp::Add)?;
        for (e, one) in [(a, b), (b, a)] {
            let (_, c) = self.def(one);
            if !matches!(c.op, Op::Const { value, .. } if value == 1.0) {
                continue;
            }
            let (eid, en) = self.def(e);
            if en.op != Op::Unary(UnaryOp::Exp) {
                continue;
            }
            let (nid, nn) = self.def(en.inputs[0]);
            if nn.op == Op::Unary(UnaryOp::Neg) && nn.inputs[0] == g {
                nodes.extend([did, aid, eid, nid]);
                return Some(g);
            }
        }
        None
    }

    /// `down(silu(gate(x)) * up(x))`: x and the three weights.
    fn swiglu(&self, y: Value, nodes: &mut Vec<NodeId>) -> Match<(Value, [Weight; 3])> {
        let (h, down) = self.linear(y, nodes)?;
        let (mid, a, b) = self
            .binary(h, BinaryOp::Mul)
            .ok_or("the down projection's input is not silu(gate) * up")?;
        nodes.push(mid);
        for (s, u) in [(a, b), (b, a)] {
            let mut silu_nodes = Vec::new();
            let Some(g) = self.silu(s, &mut silu_nodes) else {
                continue;
            };
            nodes.extend(silu_nodes);
            let (xg, gate) = self.linear(g, nodes)?;
            let (xu, up) = self.linear(u, nodes)?;
            if xg != xu {
                return Err("the gate and up projections read different inputs".into());
            }
            return Ok((xg, [gate, up, down]));
        }
        Err("the down projection's input is not silu(gate) * up".into())
    }

    /// `scatter_add(zeros, top, weights, axis 1)`: (top, weights).
    fn scatter(&self, dense: Value) -> Match<(Value, Value)> {
        let (_, d) = self.def(dense);
        let (zeros, top, weights) = (d.inputs[0], d.inputs[1], d.inputs[2]);
        let (_, z) = self.def(zeros);
        if !matches!(z.op, Op::Const { value, .. } if value == 0.0) {
            return Err("the routing weights are scattered onto a non-zero base".into());
        }
        let tt = self.g.ty(top);
        if tt.dtype != DType::I64 || tt.rank() != 2 || tt.shape[0] != self.shape(dense)[0] {
            return Err(format!("the expert indices are {tt}, not i64 [tokens, k]"));
        }
        Ok((top, weights))
    }
}

/// The stacked names `<P>.gate_up_proj` and `<P>.down_proj` when the experts are named
/// `<P>.<e>.{gate,up,down}_proj.weight` as in HF and mmc's checkpoints; otherwise after the
/// block's scope.
fn stacked_names(g: &Graph, experts: &[Expert], scope: &str) -> (String, String) {
    let name = |id: NodeId| match &g.node(id).op {
        Op::Param { name, .. } => name.clone(),
        _ => String::new(),
    };
    let g0 = name(experts[0].gate);
    let prefix = g0.strip_suffix(".0.gate_proj.weight").map(str::to_string);
    let fits = prefix.as_ref().is_some_and(|p| {
        experts.iter().enumerate().all(|(e, x)| {
            name(x.gate) == format!("{p}.{e}.gate_proj.weight")
                && name(x.up) == format!("{p}.{e}.up_proj.weight")
                && name(x.down) == format!("{p}.{e}.down_proj.weight")
        })
    });
    let p = match prefix {
        Some(p) if fits => p,
        _ if scope.is_empty() => "experts".to_string(),
        _ => format!("{scope}.experts"),
    };
    (format!("{p}.gate_up_proj"), format!("{p}.down_proj"))
}

/// Tries to match a dense block rooted at `root`: `None` when it is no candidate at all (no
/// term is weighted by a scatter's column), `Some(Err)` for a near miss.
fn match_block(v: &View, root: NodeId, params: &HashSet<String>) -> Option<Match<Block>> {
    let out = v.g.result(root);
    let mut leaves = Vec::new();
    let mut adds = Vec::new();
    v.add_leaves(out, &mut leaves, &mut adds);
    let terms: Vec<_> = leaves.iter().map(|&l| v.term(l)).collect();
    let first = terms.iter().flatten().next()?;
    let dense = first.1;
    Some((|| {
        let n_experts = v.shape(dense)[1];
        if terms.iter().any(Option::is_none) {
            return Err("a term of the sum is not an expert weighted by its column".into());
        }
        let mut internal: Vec<NodeId> = adds.clone();
        let mut by_expert: Vec<Option<Value>> = vec![None; n_experts];
        for (y, d, e, nodes) in terms.into_iter().flatten() {
            if d != dense {
                return Err("the terms are weighted by different routing matrices".into());
            }
            if e >= n_experts {
                return Err(format!("a term reads column {e} of {n_experts} experts"));
            }
            if by_expert[e].is_some() {
                return Err(format!("expert {e} is summed twice"));
            }
            internal.extend(nodes);
            by_expert[e] = Some(y);
        }
        if let Some(e) = by_expert.iter().position(Option::is_none) {
            return Err(format!("expert {e} of {n_experts} is missing from the sum"));
        }
        let (top, weights) = v.scatter(dense)?;
        let mut x = None;
        let mut experts = Vec::with_capacity(n_experts);
        let mut casts: Option<(Option<DType>, Option<DType>)> = None;
        let mut ptypes: Option<[TensorType; 3]> = None;
        for (e, slot) in by_expert.into_iter().enumerate() {
            let y = slot.expect("every expert was found");
            let (xe, [gate, up, down]) = v
                .swiglu(y, &mut internal)
                .map_err(|m| format!("expert {e}: {m}"))?;
            if *x.get_or_insert(xe) != xe {
                return Err(format!("expert {e} reads another input than expert 0"));
            }
            if gate.cast != up.cast {
                return Err(format!("expert {e}: gate and up are cast differently"));
            }
            let c = (gate.cast, down.cast);
            if *casts.get_or_insert(c) != c {
                return Err(format!(
                    "expert {e}: its weights are cast unlike expert 0's"
                ));
            }
            let ty = |w: &Weight| v.g.ty(v.g.result(w.param)).clone();
            let t = [ty(&gate), ty(&up), ty(&down)];
            if *ptypes.get_or_insert(t.clone()) != t {
                return Err(format!(
                    "expert {e}: its weights differ in type from expert 0's"
                ));
            }
            for w in [&gate, &up, &down] {
                internal.extend(w.nodes.iter().copied());
            }
            experts.push(Expert {
                gate: gate.param,
                up: up.param,
                down: down.param,
            });
        }
        let x = x.expect("at least one expert");
        let [gt, ut, dt] = ptypes.expect("at least one expert");
        let (xt, ot) = (v.g.ty(x), v.g.ty(out));
        let (t, h, i) = (xt.shape[0], xt.shape[1], gt.shape[0]);
        if xt.rank() != 2
            || gt.shape != [i, h]
            || ut.shape != gt.shape
            || dt.shape != [h, i]
            || ot.shape != [t, h]
        {
            return Err(format!(
                "the experts' shapes (x {xt}, gate {gt}, up {ut}, down {dt}) are not a SwiGLU over [tokens, hidden]"
            ));
        }
        if gt.dtype != ut.dtype {
            return Err("gate and up weights differ in dtype".into());
        }
        let wt = v.g.ty(weights);
        if wt.dtype != ot.dtype || v.g.ty(top).shape != wt.shape {
            return Err(format!(
                "the routing weights {wt} do not match the indices and the output {ot}"
            ));
        }
        if v.g.ty(top).shape[0] != t {
            return Err("the routing covers other tokens than the experts' input".into());
        }
        // Every node of the dense form except the root must be used only inside it, or it
        // (and the dense expert work behind it) would stay.
        let inside: HashSet<NodeId> = internal.iter().copied().collect();
        for &n in &internal {
            if n == root {
                continue;
            }
            for &o in &v.g.node(n).outputs {
                if v.outputs.contains(&o)
                    || v.users[o.0 as usize].iter().any(|u| !inside.contains(u))
                {
                    let what = match &v.g.node(n).op {
                        Op::Param { name, .. } => format!("expert weight `{name}`"),
                        op => format!("a `{}` of the expert computation", op.name()),
                    };
                    return Err(format!("{what} is used outside the MoE block"));
                }
            }
        }
        let scope = v.g.scope_name(v.g.node(root).scope).to_string();
        let (gate_up, down) = stacked_names(v.g, &experts, &scope);
        for n in [&gate_up, &down] {
            if params.contains(n) {
                return Err(format!("the stacked parameter `{n}` already exists"));
            }
        }
        Ok(Block {
            root,
            x,
            top,
            weights,
            experts,
            gate_up_cast: casts.and_then(|c| c.0),
            down_cast: casts.and_then(|c| c.1),
            gate_up,
            down,
        })
    })())
}

/// The stackings of a block's two new parameters (the layout of
/// `runtime/src/checkpoint/experts.rs`).
fn stackings(g: &Graph, b: &Block) -> [ParamStacking; 2] {
    let param = |id: NodeId| match &g.node(id).op {
        Op::Param { name, ty } => (name.clone(), ty.clone()),
        _ => unreachable!("matched experts are parameters"),
    };
    let (_, gt) = param(b.experts[0].gate);
    let (_, dt) = param(b.experts[0].down);
    let (i, h, e) = (gt.shape[0], gt.shape[1], b.experts.len());
    let part = |id: NodeId, expert, column, width| StackPart {
        name: param(id).0,
        expert,
        column,
        width,
        transposed: true,
    };
    let gate_up = ParamStacking {
        stacked: b.gate_up.clone(),
        ty: TensorType::new(gt.dtype, [e, h, 2 * i]),
        parts: b
            .experts
            .iter()
            .enumerate()
            .flat_map(|(k, x)| [part(x.gate, k, 0, i), part(x.up, k, i, i)])
            .collect(),
    };
    let down = ParamStacking {
        stacked: b.down.clone(),
        ty: TensorType::new(dt.dtype, [e, i, h]),
        parts: b
            .experts
            .iter()
            .enumerate()
            .map(|(k, x)| part(x.down, k, 0, h))
            .collect(),
    };
    [gate_up, down]
}

/// A stacked parameter, cast as the per-expert weights were.
fn stacked_weight(em: &mut Emitter, s: &ParamStacking, cast: Option<DType>) -> EmitResult {
    let w = em.op(
        Op::Param {
            name: s.stacked.clone(),
            ty: s.ty.clone(),
        },
        &[],
    )?;
    match cast {
        Some(to) => em.cast(w, to),
        None => Ok(w),
    }
}

/// Emits the routed form of block `b` (its operands already mapped to `x`, `top`, `weights`
/// of the new graph); returns its output.
fn emit_routed(
    em: &mut Emitter,
    b: &Block,
    st: &[ParamStacking; 2],
    x: Value,
    top: Value,
    weights: Value,
) -> EmitResult {
    let e = b.experts.len();
    let i = st[1].ty.shape[1];
    let rows = em.ty(top).numel();
    let w_gate_up = stacked_weight(em, &st[0], b.gate_up_cast)?;
    let w_down = stacked_weight(em, &st[1], b.down_cast)?;
    let fused = |f| Op::Fused(f);
    let xs = em.op(fused(FusedOp::MoePermute { experts: e }), &[x, top])?;
    let off = em.op(fused(FusedOp::ExpertOffsets { experts: e }), &[top])?;
    let h = em.op(fused(FusedOp::GroupedMatMul), &[xs, w_gate_up, off])?;
    let gate = em.op(
        Op::Slice {
            start: vec![0, 0],
            end: vec![rows, i],
        },
        &[h],
    )?;
    let up = em.op(
        Op::Slice {
            start: vec![0, i],
            end: vec![rows, 2 * i],
        },
        &[h],
    )?;
    let a = em.op(fused(FusedOp::SwiGlu), &[gate, up])?;
    let y = em.op(fused(FusedOp::GroupedMatMul), &[a, w_down, off])?;
    em.op(fused(FusedOp::MoeUnpermute), &[y, top, weights])
}

/// Replaces every dense MoE block of `g` by its routed form (see the module docs). The input
/// is a `frontend` or `fused` graph; the result is `fused` (or keeps a later stage, which
/// allows fused ops too). Nodes that only the dense form used (the per-expert parameters and
/// GEMMs, the scattered `[T, E]` matrix) are dropped; everything else keeps its order.
pub fn fuse_moe(g: &Graph) -> Result<(Graph, MoeReport), PassError> {
    let view = View::new(g);
    let params: HashSet<String> = g.params().map(|(n, _, _)| n.to_string()).collect();
    let mut report = MoeReport::default();
    let mut claimed: HashSet<NodeId> = HashSet::new();
    let mut blocks: Vec<Block> = Vec::new();
    for (i, n) in g.nodes().iter().enumerate().rev() {
        let id = NodeId(i as u32);
        if claimed.contains(&id) || !matches!(n.op, Op::Binary(BinaryOp::Add | BinaryOp::Mul)) {
            continue;
        }
        match match_block(&view, id, &params) {
            None => {}
            Some(Ok(b)) => {
                let mut leaves = Vec::new();
                let mut adds = Vec::new();
                view.add_leaves(g.result(id), &mut leaves, &mut adds);
                claimed.extend(adds);
                claimed.extend(leaves.iter().map(|&l| view.def(l).0));
                blocks.push(b);
            }
            Some(Err(reason)) => {
                // An inner add of a refused chain is tried again on its own only if the chain
                // is not claimed; mark the chain so one near miss is reported once.
                let mut leaves = Vec::new();
                let mut adds = Vec::new();
                view.add_leaves(g.result(id), &mut leaves, &mut adds);
                claimed.extend(adds);
                claimed.extend(leaves.iter().map(|&l| view.def(l).0));
                report.refused.push(MoeRefusal {
                    node: id,
                    scope: g.scope_name(n.scope).to_string(),
                    reason,
                });
            }
        }
    }
    blocks.sort_by_key(|b| b.root);
    report.refused.sort_by_key(|r| r.node);
    let stage = if g.stage == Stage::Frontend {
        Stage::Fused
    } else {
        g.stage
    };
    if blocks.is_empty() {
        let mut same = g.clone();
        same.stage = stage;
        return Ok((same, report));
    }

    // Liveness with each block's root reading only x, top and weights. Nodes that nothing
    // read in the input graph stay (this pass removes only what the dense form used).
    let root_of: HashMap<NodeId, usize> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| (b.root, i))
        .collect();
    let nodes = g.nodes();
    let mut live = vec![false; nodes.len()];
    for (_, v) in g.outputs() {
        live[view.def(*v).0 .0 as usize] = true;
    }
    for (i, n) in nodes.iter().enumerate() {
        if n.outputs
            .iter()
            .all(|o| view.users[o.0 as usize].is_empty())
        {
            live[i] = true;
        }
    }
    for i in (0..nodes.len()).rev() {
        if !live[i] {
            continue;
        }
        let reads: Vec<Value> = match root_of.get(&NodeId(i as u32)) {
            Some(&b) => vec![blocks[b].x, blocks[b].top, blocks[b].weights],
            None => nodes[i].inputs.to_vec(),
        };
        for r in reads {
            live[view.def(r).0 .0 as usize] = true;
        }
    }

    let mut out = Graph::new(stage);
    // The scopes in the input's order, so that kept nodes keep their scope ids.
    let last_scope = nodes.iter().map(|n| n.scope.0).max().unwrap_or(0);
    for s in 0..=last_scope {
        out.intern_scope(g.scope_name(mmc_ir::ScopeId(s)));
    }
    let mut map: HashMap<Value, Value> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let scope_name = g.scope_name(n.scope).to_string();
        let scope = n.scope;
        let m = |v: &Value| map[v];
        match root_of.get(&NodeId(i as u32)) {
            Some(&b) => {
                let b = &blocks[b];
                let st = stackings(g, b);
                let (x, top, weights) = (m(&b.x), m(&b.top), m(&b.weights));
                let mut em = Emitter {
                    graph: &mut out,
                    scope,
                    pass: PASS,
                };
                let y = emit_routed(&mut em, b, &st, x, top, weights)?;
                map.insert(n.outputs[0], y);
                let gt = &st[0].ty;
                report.layers.push(MoeLayer {
                    scope: scope_name,
                    experts: b.experts.len(),
                    top_k: g.ty(b.top).shape[1],
                    tokens: g.ty(b.x).shape[0],
                    hidden: gt.shape[1],
                    width: gt.shape[2] / 2,
                    gate_up: b.gate_up.clone(),
                    down: b.down.clone(),
                });
                report.stackings.extend(st);
            }
            None => {
                let inputs: Vec<Value> = n.inputs.iter().map(m).collect();
                let id = out
                    .add_node(n.op.clone(), &inputs, scope)
                    .map_err(|source| PassError { pass: PASS, source })?;
                for (old, new) in n.outputs.iter().zip(out.node(id).outputs.clone()) {
                    map.insert(*old, new);
                }
            }
        }
    }
    for (name, v) in g.outputs() {
        out.add_output(name.clone(), map[v]);
    }
    Ok((out, report))
}
