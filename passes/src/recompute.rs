//! Activation recompute (checkpointing) over a micro-step graph: forward values that the
//! backward pass reads are computed again just before it reads them, so the originals die at
//! the end of their forward use instead of living until the backward pass.
//!
//! The input is the graph `train_step` produces: the forward nodes, then the backward nodes
//! (scopes `grad` and `grad:<forward scope>`) and the gradient accumulation (`grad_accumulate`).
//! The forward part is everything before the first node of one of those scopes.
//!
//! A *unit* is a set of forward nodes recomputed together:
//! - a **layer** (`full`): every node of one decoder or encoder layer (the scopes
//!   `...layers.<N>` and below), as the seed's FSDP2 config checkpoints each layer;
//! - **attention** (`selective`): the nodes from the score product `q k^T` up to the
//!   probabilities that the product with `v` reads (scale, mask, softmax), as Megatron's
//!   selective recompute of core attention does: few FLOPs, `[heads, s, s]`-sized values;
//! - an **activation** (`selective`): a connected chain of elementwise nodes holding `exp`,
//!   `erf` or `tanh` (SiLU and GELU, or `fused.swiglu` / `fused.gelu`) that no reduction reads
//!   (a softmax is not an activation).
//!
//! Each unit also takes the cheap producers (constants, iota, casts, reshapes, broadcasts,
//! permutes) that only it reads, such as a cast of a parameter or a broadcast mask, so that they
//! are recomputed rather than kept. Parameters and inputs are never cloned: they are read again.
//!
//! Rewriting: a backward read of a value of a chosen unit reads a clone instead, unless the
//! value is a graph output or the input of another chosen unit (a checkpoint: the layer input
//! under `full`). The clones of a value and of the unit's nodes it depends on are inserted just
//! before the first backward node that reads it, in forward order, in the scope
//! `recompute:<forward scope>`; each node is cloned at most once. The clones run the same ops on
//! the same operands, so the interpreter's loss and gradients are bit-identical.
//!
//! The activation peak is measured in program order (see [`activation_peak`]); under a budget,
//! units are chosen greedily by bytes saved per extra FLOP ([`crate::cost`]) until the peak fits.

use crate::cost::node_flops;
use crate::emit::PassError;
use crate::optimizer::new_value;
use mmc_ir::{Graph, GraphError, Node, Op, ScopeId, UnaryOp, Value};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;

/// What to recompute; `[train] recompute` and `recompute_budget_gb` select it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RecomputeMode {
    /// Keep every forward value until the backward pass reads it.
    None,
    /// Recompute core attention and activation functions.
    Selective,
    /// Recompute every layer from its input.
    Full,
    /// The fewest extra FLOPs (greedily) that bring the activation peak under `bytes`.
    Budget { bytes: u64 },
}

/// Bytes in one GB as `recompute_budget_gb` and the report count them (10^9, as device memory
/// is quoted).
pub const GB: f64 = 1e9;

impl RecomputeMode {
    /// The budget mode for `recompute_budget_gb = gb` (GB = 10^9 bytes).
    pub fn budget_gb(gb: f64) -> Self {
        RecomputeMode::Budget {
            bytes: (gb * GB).max(0.0) as u64,
        }
    }
}

impl fmt::Display for RecomputeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecomputeMode::None => f.write_str("none"),
            RecomputeMode::Selective => f.write_str("selective"),
            RecomputeMode::Full => f.write_str("full"),
            RecomputeMode::Budget { bytes } => {
                write!(f, "budget {:.2} GB", *bytes as f64 / GB)
            }
        }
    }
}

/// What a recompute run did, for `mmc compile` to print.
#[derive(Clone, Debug, PartialEq)]
pub struct RecomputeReport {
    /// The mode that was asked for.
    pub mode: RecomputeMode,
    /// The activation peak ([`activation_peak`]) of the input graph, in bytes.
    pub peak_before: u64,
    /// The activation peak of the rewritten graph, in bytes.
    pub peak_after: u64,
    /// `peak_before - peak_after` (0 if the peak did not drop).
    pub saved_bytes: u64,
    /// FLOPs of the cloned nodes ([`crate::cost`]), per micro-step.
    pub extra_flops: u64,
    /// Nodes cloned into the backward pass.
    pub recomputed_nodes: usize,
    /// Layers recomputed whole.
    pub full_layers: usize,
    /// Attention and activation units recomputed outside those layers.
    pub selective_units: usize,
}

impl fmt::Display for RecomputeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recompute {}: saves {} of activations for {} per micro-step \
             (activation peak {} -> {}; {} layers whole, {} attention/activation units, \
             {} nodes recomputed)",
            self.mode,
            Bytes(self.saved_bytes),
            ExtraFlops(self.extra_flops),
            Bytes(self.peak_before),
            Bytes(self.peak_after),
            self.full_layers,
            self.selective_units,
            self.recomputed_nodes
        )
    }
}

/// A byte count in GB (10^9), or MB below a tenth of a GB, so that tiny models read too.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= 0.1 * GB {
            write!(f, "{:.2} GB", b / GB)
        } else {
            write!(f, "{:.2} MB", b / 1e6)
        }
    }
}

/// A count of extra FLOPs: "12.34 extra GFLOPs", or MFLOPs below a tenth of a GFLOP.
pub struct ExtraFlops(pub u64);

impl fmt::Display for ExtraFlops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = self.0 as f64;
        if x >= 1e8 {
            write!(f, "{:.2} extra GFLOPs", x / 1e9)
        } else {
            write!(f, "{:.2} extra MFLOPs", x / 1e6)
        }
    }
}

/// Errors of the recompute pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecomputeError {
    /// Even with every layer recomputed the peak stays above the budget.
    #[error(
        "the activation budget of {budget} is below the smallest activation peak recompute \
         reaches ({smallest}, with every layer recomputed); raise [train] recompute_budget_gb \
         to at least {at_least}, or shorten [train] seq_length or micro_batch_size",
        budget = Bytes(*.budget_bytes),
        smallest = Bytes(*.smallest_bytes),
        at_least = (*.smallest_bytes as f64 / 1e6).ceil() / 1e3
    )]
    BudgetTooSmall {
        /// The budget asked for.
        budget_bytes: u64,
        /// The activation peak with every layer recomputed.
        smallest_bytes: u64,
    },
    /// A rewrite produced an ill-typed node: a bug in mmc.
    #[error(transparent)]
    Internal(#[from] PassError),
}

/// The most bytes live at once when `g` runs in program order, and the node where that
/// happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivePeak {
    /// The largest live set, in bytes.
    pub bytes: u64,
    /// The (first) node at which it is reached, indexing [`Graph::nodes`].
    pub node: usize,
}

/// Which values [`activation_peak`] counts, and the last node that needs each (`usize::MAX`
/// for outputs).
fn liveness(g: &Graph) -> (Vec<bool>, Vec<Option<usize>>) {
    let n = g.num_values();
    let mut counted = vec![false; n];
    for node in g.nodes() {
        if !matches!(node.op, Op::Param { .. } | Op::Input { .. }) {
            for &o in &node.outputs {
                counted[o.0 as usize] = true;
            }
        }
    }
    for node in g.nodes() {
        if g.scope_name(node.scope) == ACCUMULATE_SCOPE {
            for &v in node.inputs.iter().chain(&node.outputs) {
                counted[v.0 as usize] = false;
            }
        }
    }
    let state_prefix = new_value("");
    let mut last = g.last_uses();
    for (name, v) in g.outputs() {
        if name.starts_with(&state_prefix) {
            counted[v.0 as usize] = false;
        } else {
            last[v.0 as usize] = Some(usize::MAX);
        }
    }
    (counted, last)
}

/// The values [`activation_peak`] counts as live at node `at` (defined at or before it and
/// needed at or after it), for reports of what fills the peak.
pub fn live_values(g: &Graph, at: usize) -> Vec<Value> {
    let (counted, last) = liveness(g);
    let mut live = Vec::new();
    for (i, node) in g.nodes().iter().enumerate().take(at + 1) {
        for &o in &node.outputs {
            if counted[o.0 as usize] && (i == at || last[o.0 as usize].is_some_and(|l| l >= at)) {
                live.push(o);
            }
        }
    }
    live
}

/// The activation peak of `g` in program order: at each node, the sizes (declared dtypes) of
/// the values defined so far that a later node or a graph output still needs, plus the node's
/// own results. Not counted, because they live outside the activation memory: parameters and
/// inputs; the outputs that update persistent state (`new:<state>`, written in place); and the
/// parameter gradients, that is the values the gradient accumulation (scope `grad_accumulate`)
/// reads and its own results (`train_step` appends the accumulation after the whole backward
/// pass, where a schedule would add each gradient as soon as it is complete). Every other output
/// lives to the end.
pub fn activation_peak(g: &Graph) -> LivePeak {
    let (counted, last) = liveness(g);
    let size = |v: Value| g.ty(v).size_bytes() as u64;
    let (mut live, mut peak) = (0u64, LivePeak { bytes: 0, node: 0 });
    for (i, node) in g.nodes().iter().enumerate() {
        for &o in &node.outputs {
            if counted[o.0 as usize] {
                live += size(o);
            }
        }
        if live > peak.bytes {
            peak = LivePeak {
                bytes: live,
                node: i,
            };
        }
        for (k, &v) in node.inputs.iter().enumerate() {
            let dies = counted[v.0 as usize]
                && last[v.0 as usize] == Some(i)
                && !node.inputs[..k].contains(&v);
            if dies {
                live -= size(v);
            }
        }
        for &o in &node.outputs {
            if counted[o.0 as usize] && last[o.0 as usize].is_none() {
                live -= size(o);
            }
        }
    }
    peak
}

/// Rewrites the micro-step graph `g` to recompute what `mode` says, and reports the memory
/// saved and the FLOPs spent.
pub fn recompute(
    g: &Graph,
    mode: RecomputeMode,
) -> Result<(Graph, RecomputeReport), RecomputeError> {
    let a = Analysis::new(g);
    let peak_before = activation_peak(g).bytes;
    let chosen: Vec<usize> = match mode {
        RecomputeMode::None => Vec::new(),
        RecomputeMode::Selective => a.selective.clone(),
        RecomputeMode::Full => a.full_choice(),
        RecomputeMode::Budget { bytes } => {
            if peak_before <= bytes {
                Vec::new()
            } else {
                return a.within_budget(g, bytes, mode, peak_before);
            }
        }
    };
    let (graph, stats) = a.apply(g, &chosen)?;
    let peak_after = activation_peak(&graph).bytes;
    let report = a.report(mode, peak_before, peak_after, &chosen, &stats);
    Ok((graph, report))
}

/// What kind of unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Layer,
    Attention,
    Activation,
}

/// A set of forward nodes recomputed together.
#[derive(Clone, Debug)]
struct Unit {
    kind: Kind,
    /// The layer the unit lies in (for attention and activations: that of its first node).
    layer: Option<String>,
    /// Forward node indices, ascending.
    nodes: Vec<usize>,
}

/// Counts from one rewrite.
struct ApplyStats {
    extra_flops: u64,
    cloned: usize,
}

/// The facts about `g` that every choice of units shares.
struct Analysis {
    forward_end: usize,
    /// Readers (node indices, ascending, with repeats) of every value.
    readers: Vec<Vec<usize>>,
    outputs: HashSet<Value>,
    units: Vec<Unit>,
    /// Indices into `units`: the layers, and the attention and activation units.
    layers: Vec<usize>,
    selective: Vec<usize>,
}

/// The scope of the gradient accumulation nodes that `train_step` appends.
const ACCUMULATE_SCOPE: &str = "grad_accumulate";

/// Whether a scope belongs to the backward pass or the gradient accumulation.
fn is_backward_scope(name: &str) -> bool {
    name == "grad" || name.starts_with(crate::autodiff::GRAD_PREFIX) || name == ACCUMULATE_SCOPE
}

/// The layer a scope lies in: its prefix up to `layers.<N>` (`language_model.model.layers.3`
/// for `language_model.model.layers.3.mlp.gate`), or `None` outside layers.
pub fn layer_of(scope: &str) -> Option<&str> {
    let mut end = 0;
    let mut prev_layers = false;
    for seg in scope.split('.') {
        let seg_end = end + seg.len();
        if prev_layers && !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            return Some(&scope[..seg_end]);
        }
        prev_layers = seg == "layers";
        end = seg_end + 1;
    }
    None
}

/// Ops cheap enough to recompute along with the unit that alone reads them.
fn cheap(op: &Op) -> bool {
    matches!(
        op,
        Op::Const { .. }
            | Op::Iota { .. }
            | Op::Cast { .. }
            | Op::Reshape { .. }
            | Op::Broadcast { .. }
            | Op::Permute { .. }
    )
}

/// Elementwise ops that chain into an activation function.
fn pointwise(op: &Op) -> bool {
    match op {
        Op::Unary(_) | Op::Binary(_) | Op::Cast { .. } => true,
        Op::Fused(_) => is_fused_activation(op),
        _ => false,
    }
}

/// The fused activation ops of the shared fused-op interface.
fn is_fused_activation(op: &Op) -> bool {
    matches!(op.name(), "fused.swiglu" | "fused.gelu")
}

/// The transcendental ops that mark an elementwise chain as an activation function.
fn activation_marker(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(UnaryOp::Exp) | Op::Unary(UnaryOp::Erf) | Op::Unary(UnaryOp::Tanh)
    ) || is_fused_activation(op)
}

fn def(g: &Graph, v: Value) -> usize {
    g.value_data(v).expect("a value of this graph").node.0 as usize
}

impl Analysis {
    fn new(g: &Graph) -> Self {
        let nodes = g.nodes();
        let forward_end = nodes
            .iter()
            .position(|n| is_backward_scope(g.scope_name(n.scope)))
            .unwrap_or(nodes.len());
        let mut readers = vec![Vec::new(); g.num_values()];
        for (i, n) in nodes.iter().enumerate() {
            for v in &n.inputs {
                readers[v.0 as usize].push(i);
            }
        }
        let outputs = g.outputs().iter().map(|(_, v)| *v).collect();
        let mut a = Analysis {
            forward_end,
            readers,
            outputs,
            units: Vec::new(),
            layers: Vec::new(),
            selective: Vec::new(),
        };
        a.find_layers(g);
        a.find_selective(g);
        a
    }

    /// Whether node `i` is a forward node that a unit may hold (parameters and inputs are read
    /// again, never cloned).
    fn recomputable(&self, g: &Graph, i: usize) -> bool {
        i < self.forward_end && !matches!(g.nodes()[i].op, Op::Param { .. } | Op::Input { .. })
    }

    fn find_layers(&mut self, g: &Graph) {
        let mut by_layer: Vec<(String, Vec<usize>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for i in 0..self.forward_end {
            if !self.recomputable(g, i) {
                continue;
            }
            let Some(layer) = layer_of(g.scope_name(g.nodes()[i].scope)) else {
                continue;
            };
            let k = *index.entry(layer.to_string()).or_insert_with(|| {
                by_layer.push((layer.to_string(), Vec::new()));
                by_layer.len() - 1
            });
            by_layer[k].1.push(i);
        }
        let mut owned = vec![false; self.forward_end];
        for (_, nodes) in &by_layer {
            for &i in nodes {
                owned[i] = true;
            }
        }
        for (layer, nodes) in by_layer {
            let nodes = self.with_cheap_producers(g, nodes, &mut owned);
            self.layers.push(self.units.len());
            self.units.push(Unit {
                kind: Kind::Layer,
                layer: Some(layer),
                nodes,
            });
        }
    }

    fn find_selective(&mut self, g: &Graph) {
        let nodes = g.nodes();
        let mut owned = vec![false; self.forward_end];
        // Which values depend on per-step data (an activation, not a weight).
        let mut dynamic = vec![false; g.num_values()];
        for node in &nodes[..self.forward_end] {
            let d = matches!(node.op, Op::Input { .. })
                || node.inputs.iter().any(|v| dynamic[v.0 as usize]);
            for &o in &node.outputs {
                dynamic[o.0 as usize] = d;
            }
        }
        let mut found: Vec<(Kind, Vec<usize>)> = Vec::new();
        for i in 0..self.forward_end {
            let n = &nodes[i];
            if owned[i] || n.op != Op::MatMul || !n.inputs.iter().all(|v| dynamic[v.0 as usize]) {
                continue;
            }
            if let Some(body) = self.attention_body(g, i, &dynamic) {
                for &j in &body {
                    owned[j] = true;
                }
                found.push((Kind::Attention, body));
            }
        }
        for comp in self.activation_chains(g, &owned) {
            for &j in &comp {
                owned[j] = true;
            }
            found.push((Kind::Activation, comp));
        }
        found.sort_by_key(|(_, n)| n[0]);
        for (kind, body) in found {
            let layer = layer_of(g.scope_name(nodes[body[0]].scope)).map(str::to_string);
            let nodes = self.with_cheap_producers(g, body, &mut owned);
            self.selective.push(self.units.len());
            self.units.push(Unit { kind, layer, nodes });
        }
    }

    /// For the score product at node `m1`, the nodes from it up to the operand of the next
    /// product of two activations that its elementwise and reduction chain reaches (the
    /// probabilities); `None` when the chain reaches no such product.
    fn attention_body(&self, g: &Graph, m1: usize, dynamic: &[bool]) -> Option<Vec<usize>> {
        let nodes = g.nodes();
        let mut reach: HashSet<usize> = HashSet::from([m1]);
        let mut stack = vec![m1];
        let mut probs: Option<(usize, Value)> = None;
        while let Some(i) = stack.pop() {
            for &o in &nodes[i].outputs {
                for &r in &self.readers[o.0 as usize] {
                    if r >= self.forward_end || reach.contains(&r) {
                        continue;
                    }
                    if nodes[r].op == Op::MatMul {
                        // `probs v` multiplies two activations; a projection reads a weight.
                        let both = nodes[r].inputs.iter().all(|v| dynamic[v.0 as usize]);
                        if both && probs.is_none_or(|(p, _)| r < p) {
                            probs = Some((r, o));
                        }
                        continue;
                    }
                    if matches!(
                        nodes[r].op,
                        Op::TopK { .. } | Op::ArgSort { .. } | Op::Gather { .. }
                    ) {
                        continue;
                    }
                    reach.insert(r);
                    stack.push(r);
                }
            }
        }
        let (_, p) = probs?;
        // The reached nodes that the probabilities depend on.
        let mut body: HashSet<usize> = HashSet::new();
        let mut stack = vec![def(g, p)];
        while let Some(i) = stack.pop() {
            if !reach.contains(&i) || !body.insert(i) {
                continue;
            }
            stack.extend(nodes[i].inputs.iter().map(|&v| def(g, v)));
        }
        let mut body: Vec<usize> = body.into_iter().collect();
        body.sort_unstable();
        Some(body)
    }

    /// Connected chains of forward elementwise nodes with an activation marker that no
    /// reduction reads and that hold no node of an attention unit.
    fn activation_chains(&self, g: &Graph, owned: &[bool]) -> Vec<Vec<usize>> {
        let nodes = g.nodes();
        let n = self.forward_end;
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        let member = |i: usize| !owned[i] && pointwise(&nodes[i].op);
        for (i, node) in nodes[..n].iter().enumerate() {
            if !member(i) {
                continue;
            }
            for &v in &node.inputs {
                let d = def(g, v);
                if member(d) {
                    let (a, b) = (find(&mut parent, i), find(&mut parent, d));
                    parent[a.max(b)] = a.min(b);
                }
            }
        }
        let mut comps: HashMap<usize, Vec<usize>> = HashMap::new();
        for i in 0..n {
            if member(i) {
                let r = find(&mut parent, i);
                comps.entry(r).or_default().push(i);
            }
        }
        let read_by_reduction = |i: usize| {
            nodes[i].outputs.iter().any(|o| {
                self.readers[o.0 as usize]
                    .iter()
                    .any(|&r| matches!(nodes[r].op, Op::Reduce { .. }))
            })
        };
        let mut out: Vec<Vec<usize>> = comps
            .into_values()
            .filter(|c| {
                c.iter().any(|&i| activation_marker(&nodes[i].op))
                    && !c.iter().any(|&i| read_by_reduction(i))
            })
            .collect();
        out.sort_by_key(|c| c[0]);
        out
    }

    /// `nodes` plus the cheap producers that only they (and backward nodes) read, taken
    /// transitively; marks them in `owned`.
    fn with_cheap_producers(&self, g: &Graph, nodes: Vec<usize>, owned: &mut [bool]) -> Vec<usize> {
        let all = g.nodes();
        let mut inside: HashSet<usize> = nodes.iter().copied().collect();
        let mut heap: BinaryHeap<usize> = BinaryHeap::new();
        let push_inputs = |heap: &mut BinaryHeap<usize>, i: usize| {
            for &v in &all[i].inputs {
                heap.push(def(g, v));
            }
        };
        for &i in &nodes {
            push_inputs(&mut heap, i);
        }
        // Highest index first: every forward reader of a candidate is decided before it.
        while let Some(i) = heap.pop() {
            if inside.contains(&i) || owned[i] || !self.recomputable(g, i) || !cheap(&all[i].op) {
                continue;
            }
            let exclusive = all[i].outputs.iter().all(|o| {
                !self.outputs.contains(o)
                    && self.readers[o.0 as usize]
                        .iter()
                        .all(|&r| r >= self.forward_end || inside.contains(&r))
            });
            if exclusive {
                inside.insert(i);
                owned[i] = true;
                push_inputs(&mut heap, i);
            }
        }
        let mut nodes: Vec<usize> = inside.into_iter().collect();
        nodes.sort_unstable();
        nodes
    }

    /// Every layer, plus the selective units outside layers.
    fn full_choice(&self) -> Vec<usize> {
        let mut chosen = self.layers.clone();
        chosen.extend(
            self.selective
                .iter()
                .filter(|&&u| self.units[u].layer.is_none()),
        );
        chosen
    }

    /// `chosen` without the selective units of layers that are recomputed whole.
    fn effective(&self, chosen: &[usize]) -> Vec<usize> {
        let whole: HashSet<&str> = chosen
            .iter()
            .filter(|&&u| self.units[u].kind == Kind::Layer)
            .filter_map(|&u| self.units[u].layer.as_deref())
            .collect();
        chosen
            .iter()
            .copied()
            .filter(|&u| {
                let unit = &self.units[u];
                unit.kind == Kind::Layer || unit.layer.as_deref().is_none_or(|l| !whole.contains(l))
            })
            .collect()
    }

    /// The graph with the units `chosen` recomputed.
    fn apply(&self, g: &Graph, chosen: &[usize]) -> Result<(Graph, ApplyStats), PassError> {
        let chosen = self.effective(chosen);
        if chosen.is_empty() {
            let stats = ApplyStats {
                extra_flops: 0,
                cloned: 0,
            };
            return Ok((g.clone(), stats));
        }
        let nodes = g.nodes();
        let mut owner: Vec<Option<usize>> = vec![None; self.forward_end];
        for &u in &chosen {
            for &i in &self.units[u].nodes {
                owner[i] = Some(u);
            }
        }
        // Values read by a chosen unit but defined outside it stay (checkpoints).
        let mut checkpoint: HashSet<Value> = HashSet::new();
        for &u in &chosen {
            for &i in &self.units[u].nodes {
                for &v in &nodes[i].inputs {
                    let d = def(g, v);
                    if d >= self.forward_end || owner[d] != Some(u) {
                        checkpoint.insert(v);
                    }
                }
            }
        }
        let redirected = |v: Value| {
            let d = def(g, v);
            d < self.forward_end
                && owner[d].is_some()
                && !checkpoint.contains(&v)
                && !self.outputs.contains(&v)
        };

        let mut out = Graph::new(g.stage);
        let mut scopes: HashMap<ScopeId, ScopeId> = HashMap::new();
        let mut recompute_scopes: HashMap<ScopeId, ScopeId> = HashMap::new();
        let mut map: Vec<Option<Value>> = vec![None; g.num_values()];
        let mut clone: HashMap<Value, Value> = HashMap::new();
        let mut cloned: HashSet<usize> = HashSet::new();
        let mut stats = ApplyStats {
            extra_flops: 0,
            cloned: 0,
        };
        let emit = |out: &mut Graph, node: &Node, inputs: &[Value], scope: ScopeId| {
            out.add_node(node.op.clone(), inputs, scope)
                .map(|id| out.node(id).outputs.clone())
                .map_err(|source: GraphError| PassError {
                    pass: "recompute",
                    source,
                })
        };
        for (i, node) in nodes.iter().enumerate() {
            if i >= self.forward_end {
                for &v in &node.inputs {
                    if !redirected(v) || clone.contains_key(&v) {
                        continue;
                    }
                    let u = owner[def(g, v)].expect("redirected values have a unit");
                    // The nodes of the unit that `v` needs and that have no clone yet.
                    let mut need: Vec<usize> = Vec::new();
                    let mut stack = vec![def(g, v)];
                    let mut seen: HashSet<usize> = HashSet::new();
                    while let Some(j) = stack.pop() {
                        if cloned.contains(&j) || !seen.insert(j) {
                            continue;
                        }
                        need.push(j);
                        for &w in &nodes[j].inputs {
                            let d = def(g, w);
                            if d < self.forward_end
                                && owner[d] == Some(u)
                                && !checkpoint.contains(&w)
                            {
                                stack.push(d);
                            }
                        }
                    }
                    need.sort_unstable();
                    for j in need {
                        let src = &nodes[j];
                        let inputs: Vec<Value> = src
                            .inputs
                            .iter()
                            .map(|w| {
                                clone.get(w).copied().unwrap_or_else(|| {
                                    map[w.0 as usize].expect("defined before use")
                                })
                            })
                            .collect();
                        let scope = *recompute_scopes.entry(src.scope).or_insert_with(|| {
                            out.intern_scope(&format!("recompute:{}", g.scope_name(src.scope)))
                        });
                        let results = emit(&mut out, src, &inputs, scope)?;
                        for (&o, &c) in src.outputs.iter().zip(&results) {
                            clone.insert(o, c);
                        }
                        cloned.insert(j);
                        stats.cloned += 1;
                        stats.extra_flops += node_flops(g, src);
                    }
                }
            }
            let inputs: Vec<Value> = node
                .inputs
                .iter()
                .map(|&v| {
                    if i >= self.forward_end && redirected(v) {
                        clone[&v]
                    } else {
                        map[v.0 as usize].expect("defined before use")
                    }
                })
                .collect();
            let scope = *scopes
                .entry(node.scope)
                .or_insert_with(|| out.intern_scope(g.scope_name(node.scope)));
            let results = emit(&mut out, node, &inputs, scope)?;
            for (&o, &n) in node.outputs.iter().zip(&results) {
                map[o.0 as usize] = Some(n);
            }
        }
        for (name, v) in g.outputs() {
            out.add_output(
                name.clone(),
                map[v.0 as usize].expect("outputs are defined"),
            );
        }
        Ok((out, stats))
    }

    fn report(
        &self,
        mode: RecomputeMode,
        peak_before: u64,
        peak_after: u64,
        chosen: &[usize],
        stats: &ApplyStats,
    ) -> RecomputeReport {
        let chosen = self.effective(chosen);
        let full_layers = chosen
            .iter()
            .filter(|&&u| self.units[u].kind == Kind::Layer)
            .count();
        RecomputeReport {
            mode,
            peak_before,
            peak_after,
            saved_bytes: peak_before.saturating_sub(peak_after),
            extra_flops: stats.extra_flops,
            recomputed_nodes: stats.cloned,
            full_layers,
            selective_units: chosen.len() - full_layers,
        }
    }

    /// The bytes a unit frees from the forward-to-backward span when chosen alone (its values
    /// that backward nodes read) and the FLOPs of recomputing them.
    fn unit_score(&self, g: &Graph, u: usize) -> (u64, u64) {
        let unit = &self.units[u];
        let nodes = g.nodes();
        let inside: HashSet<usize> = unit.nodes.iter().copied().collect();
        let mut bytes = 0;
        let mut seeds = Vec::new();
        for &i in &unit.nodes {
            for &o in &nodes[i].outputs {
                if !self.outputs.contains(&o)
                    && self.readers[o.0 as usize]
                        .iter()
                        .any(|&r| r >= self.forward_end)
                {
                    bytes += g.ty(o).size_bytes() as u64;
                    seeds.push(i);
                }
            }
        }
        let mut seen: HashSet<usize> = HashSet::new();
        let mut flops = 0;
        while let Some(i) = seeds.pop() {
            if !seen.insert(i) {
                continue;
            }
            flops += node_flops(g, &nodes[i]);
            seeds.extend(
                nodes[i]
                    .inputs
                    .iter()
                    .map(|&v| def(g, v))
                    .filter(|d| inside.contains(d)),
            );
        }
        (bytes, flops)
    }

    /// Chooses units by bytes saved per extra FLOP until the peak fits `budget`.
    fn within_budget(
        &self,
        g: &Graph,
        budget: u64,
        mode: RecomputeMode,
        peak_before: u64,
    ) -> Result<(Graph, RecomputeReport), RecomputeError> {
        let mut order: Vec<(usize, f64)> = self
            .layers
            .iter()
            .chain(&self.selective)
            .map(|&u| {
                let (bytes, flops) = self.unit_score(g, u);
                (u, bytes as f64 / flops.max(1) as f64)
            })
            .collect();
        // Stable: ties keep layers and program order.
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let order: Vec<usize> = order.into_iter().map(|(u, _)| u).collect();
        let run = |k: usize| -> Result<(Graph, u64, ApplyStats), PassError> {
            let (graph, stats) = self.apply(g, &order[..k])?;
            let peak = activation_peak(&graph).bytes;
            Ok((graph, peak, stats))
        };
        // Every unit: each layer whole, plus the selective units outside layers.
        let all = run(order.len())?;
        if all.1 > budget {
            return Err(RecomputeError::BudgetTooSmall {
                budget_bytes: budget,
                smallest_bytes: all.1,
            });
        }
        // The shortest prefix that fits (the peak falls as units are added).
        let (mut lo, mut hi) = (0, order.len());
        let mut best = all;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let r = run(mid)?;
            if r.1 <= budget {
                hi = mid;
                best = r;
            } else {
                lo = mid + 1;
            }
        }
        let (graph, peak, stats) = best;
        let report = self.report(mode, peak_before, peak, &order[..hi], &stats);
        Ok((graph, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_of_takes_the_prefix_through_the_layer_number() {
        assert_eq!(
            layer_of("language_model.model.layers.12.mlp.experts.3"),
            Some("language_model.model.layers.12")
        );
        assert_eq!(
            layer_of("vision_model.encoder.layers.0"),
            Some("vision_model.encoder.layers.0")
        );
        assert_eq!(layer_of("model.layers.7.self_attn"), Some("model.layers.7"));
        assert_eq!(layer_of("language_model.model.norm"), None);
        assert_eq!(layer_of("layers.x.y"), None);
        assert_eq!(layer_of("mlp1.0"), None);
    }

    #[test]
    fn budget_gb_counts_decimal_gigabytes() {
        assert_eq!(
            RecomputeMode::budget_gb(1.5),
            RecomputeMode::Budget {
                bytes: 1_500_000_000
            }
        );
        assert_eq!(RecomputeMode::budget_gb(1.5).to_string(), "budget 1.50 GB");
    }
}
