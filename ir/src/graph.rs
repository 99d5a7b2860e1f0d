//! The graph: a straight-line SSA program over tensors.
//!
//! Nodes are kept in program order, so "defined before used" is the SSA rule and a topological
//! order comes for free. Values are numbered separately from nodes because a node may define
//! several values (fused ops such as attention return an output and its softmax statistics).

use crate::infer::{infer, TypeError};
use crate::{Op, TensorType};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// An SSA value: the result of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(pub u32);

/// A node of the graph, indexing [`Graph::nodes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// A name scope (such as `model.layers.3.self_attn`), interned in the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ScopeId(pub u32);

/// The pipeline stage a graph is in; the verifier enforces what each stage may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// As the model declares it: primitive ops only.
    Frontend,
    /// After e-graph fusion: fused ops allowed.
    Fused,
    /// After sharding: collectives allowed.
    Parallel,
    /// Forward plus backward.
    Autodiff,
    /// The whole training step, optimizer update included.
    Optimizer,
    /// Scheduled and memory-planned: ready for code generation.
    Scheduled,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::Frontend,
        Stage::Fused,
        Stage::Parallel,
        Stage::Autodiff,
        Stage::Optimizer,
        Stage::Scheduled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Frontend => "frontend",
            Stage::Fused => "fused",
            Stage::Parallel => "parallel",
            Stage::Autodiff => "autodiff",
            Stage::Optimizer => "optimizer",
            Stage::Scheduled => "scheduled",
        }
    }

    /// Whether graphs of this stage may contain fused ops.
    pub fn allows_fused(self) -> bool {
        self != Stage::Frontend
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| format!("unknown stage `{s}`"))
    }
}

/// What the graph knows about a value: its type and where it is defined.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueData {
    pub ty: TensorType,
    pub node: NodeId,
    /// Which result of `node` this value is.
    pub index: u32,
}

/// One operation with its operands and results.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: SmallVec<[Value; 3]>,
    pub outputs: SmallVec<[Value; 1]>,
    pub scope: ScopeId,
}

/// Errors from adding a node to a graph.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("operand {0:?} does not exist in this graph")]
    UnknownValue(Value),
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error(transparent)]
    Reorder(#[from] ReorderError),
}

/// Why [`Graph::reordered`] refused an order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReorderError {
    #[error("the order lists {got} nodes, but the graph has {expected}")]
    Length { expected: usize, got: usize },
    #[error("the order names node {0}, which is not in the graph")]
    UnknownNode(u32),
    #[error("the order lists node {0} twice")]
    Duplicate(u32),
    #[error("the order puts node {user} before node {def}, which defines its operand")]
    NotTopological { user: u32, def: u32 },
}

/// A typed SSA tensor program with named outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub stage: Stage,
    nodes: Vec<Node>,
    values: Vec<ValueData>,
    outputs: Vec<(String, Value)>,
    scopes: Vec<String>,
    scope_ids: HashMap<String, ScopeId>,
}

impl Graph {
    pub fn new(stage: Stage) -> Self {
        let mut g = Graph {
            stage,
            nodes: Vec::new(),
            values: Vec::new(),
            outputs: Vec::new(),
            scopes: Vec::new(),
            scope_ids: HashMap::new(),
        };
        g.intern_scope("");
        g
    }

    /// Interns a scope name; the empty name is the root scope.
    pub fn intern_scope(&mut self, name: &str) -> ScopeId {
        if let Some(&id) = self.scope_ids.get(name) {
            return id;
        }
        let id = ScopeId(self.scopes.len() as u32);
        self.scopes.push(name.to_string());
        self.scope_ids.insert(name.to_string(), id);
        id
    }

    pub fn scope_name(&self, id: ScopeId) -> &str {
        &self.scopes[id.0 as usize]
    }

    /// Appends a node after checking its operands and inferring its result types.
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: &[Value],
        scope: ScopeId,
    ) -> Result<NodeId, GraphError> {
        let mut tys = Vec::with_capacity(inputs.len());
        for &v in inputs {
            tys.push(
                &self
                    .values
                    .get(v.0 as usize)
                    .ok_or(GraphError::UnknownValue(v))?
                    .ty,
            );
        }
        let results = infer(&op, &tys)?;
        Ok(self.push_node_unchecked(op, inputs, results.into_vec(), scope))
    }

    /// Appends a node with the given result types without checking anything. The parser uses
    /// it so that a malformed program can still be built and then rejected by the verifier.
    pub fn push_node_unchecked(
        &mut self,
        op: Op,
        inputs: &[Value],
        results: Vec<TensorType>,
        scope: ScopeId,
    ) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        let outputs = results
            .into_iter()
            .enumerate()
            .map(|(index, ty)| {
                let v = Value(self.values.len() as u32);
                self.values.push(ValueData {
                    ty,
                    node: id,
                    index: index as u32,
                });
                v
            })
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.iter().copied().collect(),
            outputs,
            scope,
        });
        id
    }

    /// Marks `value` as a named result of the program.
    pub fn add_output(&mut self, name: impl Into<String>, value: Value) {
        self.outputs.push((name.into(), value));
    }

    /// Keeps only the outputs for which `keep` returns true.
    pub fn retain_outputs(&mut self, mut keep: impl FnMut(&str, Value) -> bool) {
        self.outputs.retain(|(n, v)| keep(n, *v));
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize]
    }

    /// All nodes in program order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Nodes with their ids, in program order.
    pub fn iter_nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (NodeId(i as u32), n))
    }

    pub fn num_values(&self) -> usize {
        self.values.len()
    }

    /// Type and definition of a value; `None` if it is not of this graph.
    pub fn value_data(&self, v: Value) -> Option<&ValueData> {
        self.values.get(v.0 as usize)
    }

    /// The type of a value of this graph.
    ///
    /// # Panics
    /// If `v` was not created by this graph (a bug in the caller, never a user error).
    pub fn ty(&self, v: Value) -> &TensorType {
        &self.values[v.0 as usize].ty
    }

    /// The single result of a node.
    pub fn result(&self, id: NodeId) -> Value {
        self.node(id).outputs[0]
    }

    pub fn outputs(&self) -> &[(String, Value)] {
        &self.outputs
    }

    /// The value of a named output.
    pub fn output(&self, name: &str) -> Option<Value> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// Parameters in program order: (name, type, value).
    pub fn params(&self) -> impl Iterator<Item = (&str, &TensorType, Value)> {
        self.nodes.iter().filter_map(|n| match &n.op {
            Op::Param { name, ty } => Some((name.as_str(), ty, n.outputs[0])),
            _ => None,
        })
    }

    /// Per-step inputs in program order: (name, type, value).
    pub fn inputs(&self) -> impl Iterator<Item = (&str, &TensorType, Value)> {
        self.nodes.iter().filter_map(|n| match &n.op {
            Op::Input { name, ty } => Some((name.as_str(), ty, n.outputs[0])),
            _ => None,
        })
    }

    /// A copy of the graph with its nodes in `order` (a permutation of the node ids in which
    /// every node comes after the nodes defining its operands). Values are renumbered in the
    /// new definition order; outputs (names and order), scopes and stage are kept. Schedulers
    /// and other passes that move nodes build their result with it.
    pub fn reordered(&self, order: &[NodeId]) -> Result<Graph, ReorderError> {
        let n = self.nodes.len();
        if order.len() != n {
            return Err(ReorderError::Length {
                expected: n,
                got: order.len(),
            });
        }
        const UNPLACED: u32 = u32::MAX;
        // New value of each old value, set once its defining node is placed.
        let mut new_value = vec![UNPLACED; self.values.len()];
        let mut placed = vec![false; n];
        let mut g = Graph {
            stage: self.stage,
            nodes: Vec::with_capacity(n),
            values: Vec::with_capacity(self.values.len()),
            outputs: Vec::with_capacity(self.outputs.len()),
            scopes: self.scopes.clone(),
            scope_ids: self.scope_ids.clone(),
        };
        for &id in order {
            let node = self
                .nodes
                .get(id.0 as usize)
                .ok_or(ReorderError::UnknownNode(id.0))?;
            if std::mem::replace(&mut placed[id.0 as usize], true) {
                return Err(ReorderError::Duplicate(id.0));
            }
            let mut inputs: SmallVec<[Value; 3]> = SmallVec::with_capacity(node.inputs.len());
            for v in &node.inputs {
                let nv = new_value[v.0 as usize];
                if nv == UNPLACED {
                    return Err(ReorderError::NotTopological {
                        user: id.0,
                        def: self.values[v.0 as usize].node.0,
                    });
                }
                inputs.push(Value(nv));
            }
            let results = node
                .outputs
                .iter()
                .map(|v| self.values[v.0 as usize].ty.clone())
                .collect();
            let new_id = g.push_node_unchecked(node.op.clone(), &inputs, results, node.scope);
            for (old, new) in node.outputs.iter().zip(&g.nodes[new_id.0 as usize].outputs) {
                new_value[old.0 as usize] = new.0;
            }
        }
        g.outputs = self
            .outputs
            .iter()
            .map(|(name, v)| (name.clone(), Value(new_value[v.0 as usize])))
            .collect();
        Ok(g)
    }

    /// For every value, the index of the last node that reads it (`None` when only a graph
    /// output or nothing reads it). Interpreters and memory planners free buffers with it.
    pub fn last_uses(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in &n.inputs {
                if let Some(slot) = last.get_mut(v.0 as usize) {
                    *slot = Some(i);
                }
            }
        }
        last
    }
}
