//! Regions: the graph cut at layer scopes, each layer canonicalised into a template.
//!
//! A model repeats one layer N times (48 decoder layers of 128 experts each in the 30B
//! model), and rules see the same e-graph in each. So the nodes of scope `...layers.<i>` form
//! one region per layer, everything else (embeddings, projector, final norm, loss) one global
//! region, and each region becomes a [`Template`]: its nodes hash-consed in program order, with
//! every value it reads from outside (parameters, per-step inputs, other regions' values)
//! replaced by a numbered `(arg i ty)`. Identical layers give equal templates; the pass
//! saturates each distinct template once and stamps the result onto every instance.
//!
//! Values the global region computes once for the layers (the rotary tables, the attention
//! mask) must stay visible to patterns: for those (`context_values` says which), the template
//! also holds their producers, as
//! read-only context, and the argument is unioned with its producer, so a pattern sees through
//! the argument while extraction (which prices an argument at zero) keeps reading the value
//! from outside.

use super::lang::{AttrValue, Fuse, LangError};
use egg::Id;
use mmc_ir::{Graph, NodeId, Op, ScopeId, Value};
use std::collections::{HashMap, HashSet};

/// How many producer steps of a shared outside value a template includes as context.
pub const CONTEXT_DEPTH: usize = 12;

/// At most this many context nodes per template (the rest stay plain arguments).
pub const CONTEXT_NODES: usize = 512;

/// The canonical form of a region: equal templates saturate to equal results.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Template {
    /// E-nodes in program order; children index this list.
    pub nodes: Vec<Fuse>,
    /// (argument, producer) pairs: context values, equal to their producers.
    pub unions: Vec<(Id, Id)>,
    /// The values other regions or the graph outputs read, in program order.
    pub roots: Vec<Id>,
}

/// One region of the graph: its template and what the template's numbers stand for here.
#[derive(Clone, Debug)]
pub struct Instance {
    /// The region's name: its `...layers.<i>` scope, or "" for the global region.
    pub name: String,
    /// The original value of every argument.
    pub args: Vec<Value>,
    /// The original value of every root.
    pub roots: Vec<Value>,
    /// The scope of the original node of every template node.
    pub scopes: Vec<ScopeId>,
}

/// The regions of a graph.
pub struct Regions {
    /// Distinct templates.
    pub templates: Vec<Template>,
    /// Every region, with the index of its template.
    pub instances: Vec<(usize, Instance)>,
    /// For every value another region or a graph output reads: (instance, root index).
    pub root_of: HashMap<Value, (usize, usize)>,
}

/// The layer a scope belongs to: the prefix through `layers.<i>`, if any.
pub fn layer_of(scope: &str) -> Option<&str> {
    let parts: Vec<&str> = scope.split('.').collect();
    let mut len = 0;
    for (i, part) in parts.iter().enumerate() {
        len += part.len() + usize::from(i > 0);
        let numbered = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if i > 0 && parts[i - 1] == "layers" && numbered {
            return Some(&scope[..len]);
        }
    }
    None
}

/// Cuts `g` into regions and canonicalises each. Fails on an op with several results (the
/// frontend emits none).
pub fn split(g: &Graph) -> Result<Regions, LangError> {
    // Region of every node: 0 is global, then one per layer scope in order of appearance.
    let mut names: Vec<String> = vec![String::new()];
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut scope_region: HashMap<ScopeId, usize> = HashMap::new();
    let mut region_of_node: Vec<usize> = Vec::with_capacity(g.nodes().len());
    for node in g.nodes() {
        let r = *scope_region.entry(node.scope).or_insert_with(|| {
            match layer_of(g.scope_name(node.scope)) {
                None => 0,
                Some(l) => *by_name.entry(l.to_string()).or_insert_with(|| {
                    names.push(l.to_string());
                    names.len() - 1
                }),
            }
        });
        region_of_node.push(r);
    }
    let region_of_value = |v: Value| -> usize {
        let node = g.value_data(v).expect("a value of this graph").node;
        region_of_node[node.0 as usize]
    };
    // Which values leave their region.
    let mut live_out = vec![false; g.num_values()];
    for (i, node) in g.nodes().iter().enumerate() {
        if node.outputs.len() != 1 {
            return Err(LangError::Unsupported(node.op.name()));
        }
        for &v in &node.inputs {
            if region_of_value(v) != region_of_node[i] {
                live_out[v.0 as usize] = true;
            }
        }
    }
    for (_, v) in g.outputs() {
        live_out[v.0 as usize] = true;
    }
    let mut members: Vec<Vec<NodeId>> = vec![Vec::new(); names.len()];
    for (i, &r) in region_of_node.iter().enumerate() {
        members[r].push(NodeId(i as u32));
    }
    let context = context_values(g, &members, &region_of_value)?;
    let mut templates: Vec<Template> = Vec::new();
    let mut template_index: HashMap<Template, usize> = HashMap::new();
    let mut instances = Vec::new();
    let mut root_of = HashMap::new();
    for (r, nodes) in members.iter().enumerate() {
        if nodes.is_empty() {
            continue;
        }
        let (template, instance) = build(g, nodes, &live_out, |v| context[r].contains(&v))?;
        for (i, &v) in instance.roots.iter().enumerate() {
            root_of.insert(v, (instances.len(), i));
        }
        let t = *template_index.entry(template.clone()).or_insert_with(|| {
            templates.push(template);
            templates.len() - 1
        });
        instances.push((
            t,
            Instance {
                name: names[r].clone(),
                ..instance
            },
        ));
    }
    Ok(Regions {
        templates,
        instances,
        root_of,
    })
}

/// The outside values whose producers each layer region holds as context.
///
/// Values the global region builds once for the layers (the rotary tables, the attention
/// mask) must be matchable inside them, but context must not split identical layers: the
/// first decoder layer reads the embeddings where the others read the previous layer's
/// output, and its template must stay theirs. So the layers are grouped by their skeleton
/// (the template with every outside value a plain argument), and an argument becomes context
/// in a group when every member reads a global value there and those values have equal
/// producers (most often the same value: the mask every attention layer reads). A group of
/// one layer takes every global value it reads as context. Layers whose skeletons differ
/// (an attention layer and a GELU layer of one stack) are grouped apart, so each sees the
/// globals it reads.
fn context_values(
    g: &Graph,
    members: &[Vec<NodeId>],
    region_of_value: &impl Fn(Value) -> usize,
) -> Result<Vec<HashSet<Value>>, LangError> {
    let no_roots = vec![false; g.num_values()];
    // The arguments of every layer's skeleton, and the layers of each skeleton.
    let mut skeleton_args: Vec<Vec<Value>> = vec![Vec::new(); members.len()];
    let mut groups: HashMap<Template, Vec<usize>> = HashMap::new();
    for (r, nodes) in members.iter().enumerate().skip(1) {
        if nodes.is_empty() {
            continue;
        }
        let (template, instance) = build(g, nodes, &no_roots, |_| false)?;
        groups.entry(template).or_default().push(r);
        skeleton_args[r] = instance.args;
    }
    // The producers of a global value as context of their own: equal ones stamp equally.
    let mut signature: HashMap<Value, Option<Template>> = HashMap::new();
    let mut signature_of = |v: Value| -> Result<Option<Template>, LangError> {
        if let Some(s) = signature.get(&v) {
            return Ok(s.clone());
        }
        let node = g.node(g.value_data(v).expect("a value of this graph").node);
        let source = matches!(node.op, Op::Param { .. } | Op::Input { .. });
        let s = if region_of_value(v) != 0 || source {
            None
        } else {
            let mut b = Builder::new(g);
            let root = b.context(v, CONTEXT_DEPTH)?;
            Some(Template {
                nodes: b.nodes,
                unions: b.unions,
                roots: vec![root],
            })
        };
        signature.insert(v, s.clone());
        Ok(s)
    };
    let mut context = vec![HashSet::new(); members.len()];
    for group in groups.values() {
        let args_of = |r: usize| &skeleton_args[r];
        for j in 0..args_of(group[0]).len() {
            let Some(first) = signature_of(args_of(group[0])[j])? else {
                continue;
            };
            let mut equal = true;
            for &r in &group[1..] {
                if signature_of(args_of(r)[j])?.as_ref() != Some(&first) {
                    equal = false;
                    break;
                }
            }
            if equal {
                for &r in group {
                    context[r].insert(args_of(r)[j]);
                }
            }
        }
    }
    Ok(context)
}

/// The template of the region of `nodes` and what its numbers stand for (the instance, still
/// unnamed); its roots are the values in `live_out`. The outside values `context` picks bring
/// their producers along.
fn build(
    g: &Graph,
    nodes: &[NodeId],
    live_out: &[bool],
    context: impl Fn(Value) -> bool,
) -> Result<(Template, Instance), LangError> {
    let mut b = Builder::new(g);
    for &nid in nodes {
        let node = g.node(nid);
        let out = node.outputs[0];
        let id = match &node.op {
            Op::Param { .. } | Op::Input { .. } => b.arg(out),
            op => {
                let mut inputs = Vec::with_capacity(node.inputs.len());
                for &v in &node.inputs {
                    let id = match b.local.get(&v) {
                        Some(&id) => id,
                        None if context(v) => b.context(v, CONTEXT_DEPTH)?,
                        None => b.arg(v),
                    };
                    inputs.push(id);
                }
                b.op(op, &inputs, node.scope)?
            }
        };
        b.local.insert(out, id);
    }
    let mut roots = Vec::new();
    let mut root_values = Vec::new();
    for &nid in nodes {
        let v = g.node(nid).outputs[0];
        if live_out[v.0 as usize] {
            roots.push(b.local[&v]);
            root_values.push(v);
        }
    }
    let template = Template {
        nodes: b.nodes,
        unions: b.unions,
        roots,
    };
    let instance = Instance {
        name: String::new(),
        args: b.args,
        roots: root_values,
        scopes: b.scopes,
    };
    Ok((template, instance))
}

/// Builds one template: a hash-consed node list.
struct Builder<'g> {
    g: &'g Graph,
    nodes: Vec<Fuse>,
    scopes: Vec<ScopeId>,
    memo: HashMap<Fuse, Id>,
    args: Vec<Value>,
    arg_of: HashMap<Value, Id>,
    local: HashMap<Value, Id>,
    unions: Vec<(Id, Id)>,
    context_left: usize,
}

impl<'g> Builder<'g> {
    fn new(g: &'g Graph) -> Self {
        Builder {
            g,
            nodes: Vec::new(),
            scopes: Vec::new(),
            memo: HashMap::new(),
            args: Vec::new(),
            arg_of: HashMap::new(),
            local: HashMap::new(),
            unions: Vec::new(),
            context_left: CONTEXT_NODES,
        }
    }

    fn add(&mut self, node: Fuse, scope: ScopeId) -> Id {
        if let Some(&id) = self.memo.get(&node) {
            return id;
        }
        let id = Id::from(self.nodes.len());
        self.nodes.push(node.clone());
        self.scopes.push(scope);
        self.memo.insert(node, id);
        id
    }

    fn leaf(&mut self, a: AttrValue) -> Id {
        self.add(Fuse::leaf(&a), ScopeId::default())
    }

    fn op(&mut self, op: &Op, inputs: &[Id], scope: ScopeId) -> Result<Id, LangError> {
        let node = Fuse::from_op(op, inputs, |a| self.leaf(a))?;
        Ok(self.add(node, scope))
    }

    /// The argument standing for outside value `v`.
    fn arg(&mut self, v: Value) -> Id {
        if let Some(&id) = self.arg_of.get(&v) {
            return id;
        }
        let index = self.leaf(AttrValue::Num(self.args.len()));
        let ty = self.leaf(AttrValue::Ty(self.g.ty(v).clone()));
        self.args.push(v);
        let scope = self
            .g
            .node(self.g.value_data(v).expect("a value").node)
            .scope;
        let id = self.add(Fuse::Arg([index, ty]), scope);
        self.arg_of.insert(v, id);
        id
    }

    /// The argument for outside value `v`, unioned with its producer (up to `depth` steps).
    fn context(&mut self, v: Value, depth: usize) -> Result<Id, LangError> {
        if let Some(&id) = self.arg_of.get(&v) {
            return Ok(id);
        }
        let a = self.arg(v);
        let g = self.g;
        let node = g.node(g.value_data(v).expect("a value").node);
        let source = matches!(node.op, Op::Param { .. } | Op::Input { .. });
        if depth == 0 || source || self.context_left == 0 {
            return Ok(a);
        }
        self.context_left -= 1;
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for &i in &node.inputs {
            inputs.push(self.context(i, depth - 1)?);
        }
        let producer = self.op(&node.op, &inputs, node.scope)?;
        self.unions.push((a, producer));
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::{layer_of, split, Regions};
    use mmc_frontend::{ModelBuilder, Sym};
    use mmc_ir::{DType, Graph};

    /// A stack `layers` of `kinds.len()` layers on x [2, 3]: layer i computes `x + m` with
    /// the global `m = exp(a)` where `kinds[i]` is `Some(0)` (`Some(1)`: with `m = exp(b)`,
    /// built as `exp(a)` is), `-x` where it is `None`. With `embed`, the stack's input is
    /// `exp(x)`, computed outside the layers as the embeddings are.
    fn stack(kinds: &[Option<usize>], embed: bool) -> Graph {
        let mut b = ModelBuilder::new(DType::F32, DType::F32);
        let mut x = b.input("x", DType::F32, &[2, 3]).unwrap();
        let ab: Vec<Sym> = ["a", "b"]
            .iter()
            .map(|n| b.input(n, DType::F32, &[2, 3]).unwrap())
            .collect();
        let m: Vec<Sym> = ab.iter().map(|&t| b.exp(t).unwrap()).collect();
        if embed {
            x = b.exp(x).unwrap();
        }
        for (i, kind) in kinds.iter().enumerate() {
            x = b
                .scope(format!("layers.{i}"), |b| match kind {
                    Some(k) => b.add(x, m[*k]),
                    None => b.neg(x),
                })
                .unwrap();
        }
        b.output("y", x);
        b.finish()
    }

    /// The template of every layer, and whether it holds context.
    fn layer_templates(r: &Regions) -> Vec<(usize, bool)> {
        r.instances
            .iter()
            .filter(|(_, i)| !i.name.is_empty())
            .map(|&(t, _)| (t, !r.templates[t].unions.is_empty()))
            .collect()
    }

    #[test]
    fn the_embeddings_stay_an_argument_of_the_first_layer() {
        let r = split(&stack(&[Some(0), Some(0), Some(0)], true)).unwrap();
        let layers = layer_templates(&r);
        // One template for the three layers: the mask-like `m` is context, the embeddings
        // (read by the first layer only, where the others read the previous layer) are not.
        assert!(
            layers.iter().all(|&l| l == (layers[0].0, true)),
            "{layers:?}"
        );
        let t = &r.templates[layers[0].0];
        assert_eq!(t.unions.len(), 1, "only `m` is context: {t:?}");
    }

    #[test]
    fn layers_that_read_a_global_value_see_it_when_others_do_not() {
        // The attention layers 0 and 2 read the mask, the GELU layer 1 does not.
        let r = split(&stack(&[Some(0), None, Some(0)], false)).unwrap();
        let layers = layer_templates(&r);
        assert_eq!(layers[0], layers[2], "{layers:?}");
        assert!(layers[0].1, "the reading layers see the producer of `m`");
        assert_ne!(layers[0].0, layers[1].0);
        assert!(!layers[1].1);
    }

    #[test]
    fn equal_producers_of_different_values_are_context_too() {
        let r = split(&stack(&[Some(0), Some(1)], false)).unwrap();
        let layers = layer_templates(&r);
        assert_eq!(layers[0], layers[1], "one template: {layers:?}");
        assert!(layers[0].1);
        // Each layer's context argument stands for its own value.
        let args: Vec<_> = r.instances[1..]
            .iter()
            .map(|(_, i)| i.args.clone())
            .collect();
        assert_ne!(args[0], args[1]);
    }

    #[test]
    fn layer_scopes() {
        assert_eq!(
            layer_of("language_model.model.layers.12.self_attn.q_norm"),
            Some("language_model.model.layers.12")
        );
        assert_eq!(layer_of("layers.3"), Some("layers.3"));
        assert_eq!(
            layer_of("vision_model.encoder.layers.0"),
            Some("vision_model.encoder.layers.0")
        );
        assert_eq!(layer_of("language_model.model.norm"), None);
        assert_eq!(layer_of("model.layers.x"), None);
        assert_eq!(layer_of(""), None);
    }
}
