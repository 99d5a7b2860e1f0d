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
//! Values the global region computes once for all layers (the rotary tables, the attention
//! mask) must stay visible to patterns: for those, the template also holds their producers, as
//! read-only context, and the argument is unioned with its producer, so a pattern sees through
//! the argument while extraction (which prices an argument at zero) keeps reading the value
//! from outside.

use super::lang::{AttrValue, Fuse, LangError};
use egg::Id;
use mmc_ir::{Graph, NodeId, Op, ScopeId, Value};
use std::collections::HashMap;

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
    // Layers of one stack (`...layers`): the decoder, the vision encoder.
    let mut stacks: HashMap<&str, usize> = HashMap::new();
    let mut stack_of = vec![usize::MAX; names.len()];
    let mut stack_size: Vec<usize> = Vec::new();
    for (r, name) in names.iter().enumerate().skip(1) {
        let stack = name.rsplit_once('.').map_or("", |(s, _)| s);
        let id = *stacks.entry(stack).or_insert_with(|| {
            stack_size.push(0);
            stack_size.len() - 1
        });
        stack_of[r] = id;
        stack_size[id] += 1;
    }
    // Which values leave their region, and which layers read each global value.
    let mut live_out = vec![false; g.num_values()];
    let mut layer_readers: HashMap<Value, Vec<usize>> = HashMap::new();
    for (i, node) in g.nodes().iter().enumerate() {
        let r = region_of_node[i];
        if node.outputs.len() != 1 {
            return Err(LangError::Unsupported(node.op.name()));
        }
        for &v in &node.inputs {
            let def = region_of_value(v);
            if def != r {
                live_out[v.0 as usize] = true;
                if def == 0 {
                    let readers = layer_readers.entry(v).or_default();
                    if !readers.contains(&r) {
                        readers.push(r);
                    }
                }
            }
        }
    }
    for (_, v) in g.outputs() {
        live_out[v.0 as usize] = true;
    }
    // A global value every layer of a stack reads (the rotary tables, the attention mask) is
    // built once for the layers: its producers become context. A value only some layers read
    // (the embeddings, read by the first layer) stays a plain argument, so that the first
    // layer's template is the others'.
    let shared: HashMap<Value, bool> = layer_readers
        .iter()
        .map(|(&v, readers)| {
            let mut per_stack = vec![0usize; stack_size.len()];
            for &r in readers {
                per_stack[stack_of[r]] += 1;
            }
            let all = per_stack
                .iter()
                .zip(&stack_size)
                .any(|(&n, &size)| n == size);
            (v, all)
        })
        .collect();
    let shared = |v: Value| shared.get(&v).copied().unwrap_or(false);
    let mut members: Vec<Vec<NodeId>> = vec![Vec::new(); names.len()];
    for (i, &r) in region_of_node.iter().enumerate() {
        members[r].push(NodeId(i as u32));
    }
    let mut templates: Vec<Template> = Vec::new();
    let mut template_index: HashMap<Template, usize> = HashMap::new();
    let mut instances = Vec::new();
    let mut root_of = HashMap::new();
    for (r, nodes) in members.iter().enumerate() {
        if nodes.is_empty() {
            continue;
        }
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
                            None if r != 0 && shared(v) => b.context(v, CONTEXT_DEPTH)?,
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
                root_of.insert(v, (instances.len(), roots.len()));
                roots.push(b.local[&v]);
                root_values.push(v);
            }
        }
        let template = Template {
            nodes: b.nodes,
            unions: b.unions,
            roots,
        };
        let t = *template_index.entry(template.clone()).or_insert_with(|| {
            templates.push(template);
            templates.len() - 1
        });
        instances.push((
            t,
            Instance {
                name: names[r].clone(),
                args: b.args,
                roots: root_values,
                scopes: b.scopes,
            },
        ));
    }
    Ok(Regions {
        templates,
        instances,
        root_of,
    })
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
    use super::layer_of;

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
