//! The fusion pass: e-graph rewriting (egg) from a frontend graph to a fused graph.
//!
//! 1. [`region::split`] cuts the graph at layer scopes and canonicalises each region into a
//!    template (outside values become numbered arguments); identical layers share one.
//! 2. Each distinct template is saturated once with [`rules::rules`] under [`FuseLimits`],
//!    every rule behind the type guard of [`guard`].
//! 3. [`extract::extract_dag`] picks the cheapest program under the cost model of [`cost`],
//!    counting shared values once.
//! 4. The extracted program is stamped onto every region of that template, in program order,
//!    each argument resolved to the value it stands for; parameters, inputs and graph outputs
//!    keep their names and order.
//!
//! Nodes that no output needs are dropped on the way (the extraction starts from the values
//! other regions and the outputs read).

pub mod cost;
pub mod extract;
pub mod guard;
pub mod lang;
pub mod moe;
pub mod region;
pub mod rules;

use crate::emit::PassError;
use egg::{Id, Language, Runner, SimpleScheduler, StopReason};
use lang::{AttrValue, Fuse, FuseGraph, LangError, TensorAnalysis};
use mmc_ir::{Graph, GraphError, Op, ScopeId, Stage, TypeError, Value};
use region::{Instance, Regions, Template};
use rules::FuseRewrite;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

/// The pass name in errors.
const PASS: &str = "fuse";

/// The limits of one saturation (each distinct template gets its own run).
#[derive(Clone, Debug, PartialEq)]
pub struct FuseLimits {
    /// Rewrite iterations.
    pub iterations: usize,
    /// E-nodes in one e-graph.
    pub nodes: usize,
    /// Wall time of one saturation.
    pub time: Duration,
}

impl Default for FuseLimits {
    fn default() -> Self {
        FuseLimits {
            iterations: 30,
            nodes: 200_000,
            time: Duration::from_secs(20),
        }
    }
}

/// What happened to one distinct template.
#[derive(Clone, Debug)]
pub struct TemplateReport {
    /// The first region of this template (a layer scope, or "" for the global region).
    pub region: String,
    /// How many regions share it.
    pub instances: usize,
    /// Template nodes before saturation (context and attribute leaves included).
    pub nodes: usize,
    /// E-nodes when saturation stopped.
    pub egraph_nodes: usize,
    /// E-classes when saturation stopped.
    pub egraph_classes: usize,
    /// Rewrite iterations run.
    pub iterations: usize,
    /// Why saturation stopped (`Saturated`: a fixpoint; a limit otherwise).
    pub stop_reason: StopReason,
    /// DAG cost of the region before and after (the cost model of [`cost`]).
    pub cost_before: f64,
    pub cost_after: f64,
    /// Saturation and extraction time.
    pub time: Duration,
}

/// What the pass did.
#[derive(Clone, Debug, Default)]
pub struct FuseReport {
    /// Nodes of the input graph.
    pub nodes_before: usize,
    /// Nodes of the fused graph.
    pub nodes_after: usize,
    /// Regions the graph was cut into (one per layer, plus the global region).
    pub regions: usize,
    /// One entry per distinct template, each saturated once.
    pub templates: Vec<TemplateReport>,
    /// Times each rule was newly applied, over all regions (a template's count times its
    /// instances).
    pub rule_applications: BTreeMap<String, usize>,
    /// Fused nodes of the output, by mnemonic.
    pub fused_ops: BTreeMap<String, usize>,
    /// Wall time of the whole pass.
    pub time: Duration,
}

impl FuseReport {
    /// The first template whose saturation stopped at the node limit.
    pub fn node_limit_hit(&self) -> Option<&TemplateReport> {
        self.templates
            .iter()
            .find(|t| matches!(t.stop_reason, StopReason::NodeLimit(_)))
    }

    /// Whether every saturation reached a fixpoint.
    pub fn saturated(&self) -> bool {
        self.templates
            .iter()
            .all(|t| matches!(t.stop_reason, StopReason::Saturated))
    }
}

impl fmt::Display for FuseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fuse: {} -> {} nodes, {} regions, {} templates, {:.3} s",
            self.nodes_before,
            self.nodes_after,
            self.regions,
            self.templates.len(),
            self.time.as_secs_f64()
        )?;
        for t in &self.templates {
            writeln!(
                f,
                "  template {:?} x{}: {} nodes -> {} e-nodes / {} classes, {} iterations, {:?}, \
                 cost {:.4e} -> {:.4e}, {:.3} s",
                t.region,
                t.instances,
                t.nodes,
                t.egraph_nodes,
                t.egraph_classes,
                t.iterations,
                t.stop_reason,
                t.cost_before,
                t.cost_after,
                t.time.as_secs_f64()
            )?;
        }
        for (rule, n) in &self.rule_applications {
            writeln!(f, "  rule {rule}: {n}")?;
        }
        for (op, n) in &self.fused_ops {
            writeln!(f, "  {op}: {n}")?;
        }
        Ok(())
    }
}

/// Fuses a frontend graph with the rules of [`rules::rules`].
pub fn fuse(g: &Graph, limits: &FuseLimits) -> Result<(Graph, FuseReport), PassError> {
    fuse_with(g, limits, rules::rules())
}

/// Fuses a frontend graph with the given rules (each run under the type guard).
pub fn fuse_with(
    g: &Graph,
    limits: &FuseLimits,
    rules: Vec<FuseRewrite>,
) -> Result<(Graph, FuseReport), PassError> {
    let start = Instant::now();
    // A fused graph is taken too: the routed MoE runs first and leaves its fused ops, which
    // the e-graph carries as opaque nodes. Backward graphs are not forward programs.
    if !matches!(g.stage, Stage::Frontend | Stage::Fused) {
        return Err(error(
            "input",
            format!("takes a frontend or fused graph, got a {} graph", g.stage),
        ));
    }
    let rules = guard::guarded(rules);
    let regions = region::split(g).map_err(lang_error)?;
    let mut report = FuseReport {
        nodes_before: g.nodes().len(),
        regions: regions.instances.len(),
        ..FuseReport::default()
    };
    let mut done = Vec::with_capacity(regions.templates.len());
    for (t, template) in regions.templates.iter().enumerate() {
        let instances: Vec<&Instance> = regions
            .instances
            .iter()
            .filter(|(i, _)| *i == t)
            .map(|(_, inst)| inst)
            .collect();
        let (result, tr) = saturate(template, &rules, limits, instances.len())?;
        for (rule, n) in &result.applied {
            *report.rule_applications.entry(rule.clone()).or_default() += n * instances.len();
        }
        report.templates.push(TemplateReport {
            region: instances.first().map_or(String::new(), |i| i.name.clone()),
            ..tr
        });
        done.push(result);
    }
    let out = Stamp::new(g, &regions, &done).run()?;
    report.nodes_after = out.nodes().len();
    for node in out.nodes() {
        if let Op::Fused(f) = &node.op {
            *report.fused_ops.entry(f.name().to_string()).or_default() += 1;
        }
    }
    report.time = start.elapsed();
    Ok((out, report))
}

fn error(op: &'static str, reason: String) -> PassError {
    PassError {
        pass: PASS,
        source: GraphError::Type(TypeError { op, reason }),
    }
}

fn lang_error(e: LangError) -> PassError {
    error("e-graph", e.to_string())
}

/// A saturated, extracted template.
struct Saturated {
    egraph: FuseGraph,
    /// E-class of every template node.
    class: Vec<Id>,
    /// The chosen e-node of every needed e-class.
    choice: HashMap<Id, Fuse>,
    /// The first template node of every e-class (its scope names the emitted node).
    rep: HashMap<Id, usize>,
    applied: BTreeMap<String, usize>,
}

/// Saturates one template and extracts its cheapest form.
fn saturate(
    t: &Template,
    rules: &[FuseRewrite],
    limits: &FuseLimits,
    instances: usize,
) -> Result<(Saturated, TemplateReport), PassError> {
    let start = Instant::now();
    let mut eg = FuseGraph::default();
    let mut ids: Vec<Id> = Vec::with_capacity(t.nodes.len());
    for node in &t.nodes {
        let n = node.clone().map_children(|c| ids[usize::from(c)]);
        ids.push(eg.add(n));
    }
    for &(a, b) in &t.unions {
        eg.union(ids[usize::from(a)], ids[usize::from(b)]);
    }
    eg.rebuild();
    let roots: Vec<Id> = t.roots.iter().map(|&r| ids[usize::from(r)]).collect();
    let cost_before = original_cost(&eg, t, &ids);
    let runner = Runner::<Fuse, TensorAnalysis, ()>::new(TensorAnalysis)
        .with_egraph(eg)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .with_scheduler(SimpleScheduler)
        .run(rules);
    let stop_reason = runner
        .stop_reason
        .clone()
        .unwrap_or(StopReason::Other("the runner gave no stop reason".into()));
    let mut applied = BTreeMap::new();
    for it in &runner.iterations {
        for (rule, n) in &it.applied {
            *applied.entry(rule.to_string()).or_default() += n;
        }
    }
    let egraph = runner.egraph;
    let roots: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    let ex = extract::extract_dag(&egraph, &roots).map_err(|e| error("extract", e.to_string()))?;
    let class: Vec<Id> = ids.iter().map(|&i| egraph.find(i)).collect();
    let mut rep = HashMap::new();
    for (i, &c) in class.iter().enumerate() {
        rep.entry(c).or_insert(i);
    }
    let report = TemplateReport {
        region: String::new(),
        instances,
        nodes: t.nodes.len(),
        egraph_nodes: egraph.total_number_of_nodes(),
        egraph_classes: egraph.number_of_classes(),
        iterations: runner.iterations.len(),
        stop_reason,
        cost_before,
        cost_after: ex.cost,
        time: start.elapsed(),
    };
    Ok((
        Saturated {
            egraph,
            class,
            choice: ex.choice,
            rep,
            applied,
        },
        report,
    ))
}

/// The DAG cost of a template as written (each template node reachable from a root, counted
/// once; context producers are never recomputed, so they are not counted).
fn original_cost(eg: &FuseGraph, t: &Template, ids: &[Id]) -> f64 {
    let context: std::collections::HashSet<usize> =
        t.unions.iter().map(|&(_, p)| usize::from(p)).collect();
    let mut seen = vec![false; t.nodes.len()];
    let mut stack: Vec<usize> = t.roots.iter().map(|&r| usize::from(r)).collect();
    let mut total = 0.0;
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) || context.contains(&i) {
            continue;
        }
        let node = &t.nodes[i];
        let n = node.clone().map_children(|c| ids[usize::from(c)]);
        total += cost::enode_cost(eg, &n);
        stack.extend(node.children().iter().map(|&c| usize::from(c)));
    }
    total
}

/// Writes the fused graph: every region's extracted program, in program order.
struct Stamp<'a> {
    g: &'a Graph,
    regions: &'a Regions,
    done: &'a [Saturated],
    out: Graph,
    /// New value of every original value emitted so far.
    new_of: HashMap<Value, Value>,
    /// Per instance: new value of every e-class emitted so far.
    class_value: Vec<HashMap<Id, Value>>,
    scopes: HashMap<ScopeId, ScopeId>,
}

impl<'a> Stamp<'a> {
    fn new(g: &'a Graph, regions: &'a Regions, done: &'a [Saturated]) -> Self {
        Stamp {
            g,
            regions,
            done,
            out: Graph::new(Stage::Fused),
            new_of: HashMap::new(),
            class_value: vec![HashMap::new(); regions.instances.len()],
            scopes: HashMap::new(),
        }
    }

    fn run(mut self) -> Result<Graph, PassError> {
        let g = self.g;
        for node in g.nodes() {
            let v = node.outputs[0];
            let source = matches!(node.op, Op::Param { .. } | Op::Input { .. });
            if source || self.regions.root_of.contains_key(&v) {
                self.resolve(v)?;
            }
        }
        for (name, v) in g.outputs() {
            let nv = self.resolve(*v)?;
            self.out.add_output(name.clone(), nv);
        }
        Ok(self.out)
    }

    fn scope(&mut self, s: ScopeId) -> ScopeId {
        if let Some(&n) = self.scopes.get(&s) {
            return n;
        }
        let n = self.out.intern_scope(self.g.scope_name(s));
        self.scopes.insert(s, n);
        n
    }

    /// The new value of original value `v`, emitting what it needs.
    fn resolve(&mut self, v: Value) -> Result<Value, PassError> {
        if let Some(&n) = self.new_of.get(&v) {
            return Ok(n);
        }
        let g = self.g;
        let node = g.node(g.value_data(v).expect("a value of the input").node);
        let n = match &node.op {
            Op::Param { .. } | Op::Input { .. } => {
                let scope = self.scope(node.scope);
                let id = self
                    .out
                    .add_node(node.op.clone(), &[], scope)
                    .map_err(|source| PassError { pass: PASS, source })?;
                self.out.result(id)
            }
            _ => {
                let regions = self.regions;
                let &(inst, root) = regions.root_of.get(&v).ok_or_else(|| {
                    error(
                        "stamp",
                        format!("value {v:?} is read but no region exports it"),
                    )
                })?;
                let (t, _) = regions.instances[inst];
                let tnode = regions.templates[t].roots[root];
                let class = self.done[t].class[usize::from(tnode)];
                let n = self.emit(inst, class)?;
                if self.out.ty(n) != g.ty(v) {
                    return Err(error(
                        "stamp",
                        format!(
                            "the fused form of {v:?} is {}, not {}",
                            self.out.ty(n),
                            g.ty(v)
                        ),
                    ));
                }
                n
            }
        };
        self.new_of.insert(v, n);
        Ok(n)
    }

    /// Emits the chosen program of e-class `class` in instance `inst`, children first.
    fn emit(&mut self, inst: usize, class: Id) -> Result<Value, PassError> {
        let (regions, done) = (self.regions, self.done);
        let (t, _) = regions.instances[inst];
        let sat = &done[t];
        let mut stack: Vec<(Id, bool)> = vec![(class, false)];
        let mut open = std::collections::HashSet::new();
        while let Some((c, expanded)) = stack.pop() {
            if self.class_value[inst].contains_key(&c) {
                continue;
            }
            if !expanded && !open.insert(c) {
                return Err(error("stamp", format!("e-class {c} is part of a cycle")));
            }
            let node = sat
                .choice
                .get(&c)
                .ok_or_else(|| error("stamp", format!("e-class {c} was not extracted")))?;
            if let Fuse::Arg([index, _]) = node {
                let i = match sat.egraph[*index].data.attr() {
                    Some(AttrValue::Num(i)) => *i,
                    _ => return Err(error("stamp", "an argument without an index".into())),
                };
                let original = regions.instances[inst].1.args[i];
                let n = self.resolve(original)?;
                self.class_value[inst].insert(c, n);
                continue;
            }
            let (op, inputs) = node
                .to_op(|id| sat.egraph[id].data.attr())
                .map_err(lang_error)?;
            let inputs: Vec<Id> = inputs.iter().map(|&i| sat.egraph.find(i)).collect();
            if !expanded {
                stack.push((c, true));
                for &i in inputs.iter().rev() {
                    if !self.class_value[inst].contains_key(&i) {
                        stack.push((i, false));
                    }
                }
                continue;
            }
            let mut vals = Vec::with_capacity(inputs.len());
            for i in &inputs {
                let v = self.class_value[inst]
                    .get(i)
                    .copied()
                    .ok_or_else(|| error("stamp", format!("e-class {i} is part of a cycle")))?;
                vals.push(v);
            }
            let scope = match sat.rep.get(&c) {
                Some(&k) => regions.instances[inst].1.scopes[k],
                None => ScopeId::default(),
            };
            let scope = self.scope(scope);
            let id = self
                .out
                .add_node(op, &vals, scope)
                .map_err(|source| PassError { pass: PASS, source })?;
            let n = self.out.result(id);
            self.class_value[inst].insert(c, n);
        }
        self.class_value[inst]
            .get(&class)
            .copied()
            .ok_or_else(|| error("stamp", format!("e-class {class} was not emitted")))
    }
}

#[cfg(test)]
mod tests;
