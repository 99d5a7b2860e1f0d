//! A graph copied node by node into a new one, in the order a pass chooses, with replaced
//! nodes and their values mapped: what a pass that merges nodes needs, since a graph only
//! grows (its values are SSA and its nodes stay in program order).

use crate::emit::PassError;
use mmc_ir::{Graph, NodeId, Op, Value};

/// The copy under way: the source, the graph being built, and where each source value went.
pub struct Rebuild<'g> {
    src: &'g Graph,
    pub out: Graph,
    map: Vec<Option<Value>>,
    emitted: Vec<bool>,
    pass: &'static str,
}

impl<'g> Rebuild<'g> {
    /// An empty copy of `src`'s stage; `pass` names the pass in errors.
    pub fn new(src: &'g Graph, pass: &'static str) -> Self {
        Rebuild {
            src,
            out: Graph::new(src.stage),
            map: vec![None; src.num_values()],
            emitted: vec![false; src.nodes().len()],
            pass,
        }
    }

    /// Whether node `id` of the source has been copied or replaced already.
    pub fn done(&self, id: NodeId) -> bool {
        self.emitted[id.0 as usize]
    }

    /// Marks node `id` as handled without copying it (a node merged into another).
    pub fn skip(&mut self, id: NodeId) {
        self.emitted[id.0 as usize] = true;
    }

    /// Appends `op` over the copies of the source values `inputs`, in the scope of source node
    /// `id`, whose results map to the new node's results in order; marks `id` done.
    pub fn emit(&mut self, id: NodeId, op: Op, inputs: &[Value]) -> Result<NodeId, PassError> {
        let node = self.src.node(id);
        let scope = self.out.intern_scope(self.src.scope_name(node.scope));
        let ins: Vec<Value> = inputs.iter().map(|&v| self.value(v)).collect();
        let new = self
            .out
            .add_node(op, &ins, scope)
            .map_err(|source| PassError {
                pass: self.pass,
                source,
            })?;
        for (&old, &v) in node.outputs.iter().zip(&self.out.node(new).outputs) {
            self.map[old.0 as usize] = Some(v);
        }
        self.emitted[id.0 as usize] = true;
        Ok(new)
    }

    /// Copies source node `id` as it is.
    pub fn copy(&mut self, id: NodeId) -> Result<(), PassError> {
        let node = self.src.node(id);
        self.emit(id, node.op.clone(), &node.inputs).map(|_| ())
    }

    /// Copies the nodes `v` depends on that are not copied yet, in program order: to place a
    /// node before the point where its operand was computed.
    pub fn copy_ancestors(&mut self, v: Value) -> Result<(), PassError> {
        for a in ancestors(self.src, v) {
            if !self.done(a) {
                self.copy(a)?;
            }
        }
        Ok(())
    }

    /// Maps source value `old` to `new`, a value of the graph being built.
    pub fn set(&mut self, old: Value, new: Value) {
        self.map[old.0 as usize] = Some(new);
    }

    /// The copy of source value `v`.
    ///
    /// # Panics
    /// If `v`'s node has not been handled yet: the pass emitted a reader before its operand.
    pub fn value(&self, v: Value) -> Value {
        self.map[v.0 as usize].expect("an operand is defined before its reader")
    }

    /// The built graph, with the source's outputs.
    pub fn finish(mut self) -> Graph {
        for (name, v) in self.src.outputs() {
            let v = self.value(*v);
            self.out.add_output(name.clone(), v);
        }
        self.out
    }
}

/// The nodes `v` depends on, its own included, in program order.
pub fn ancestors(g: &Graph, v: Value) -> Vec<NodeId> {
    let mut seen = vec![false; g.nodes().len()];
    let mut stack = vec![g.value_data(v).expect("a value of this graph").node];
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut seen[id.0 as usize], true) {
            continue;
        }
        for &x in &g.node(id).inputs {
            stack.push(g.value_data(x).expect("a value of this graph").node);
        }
    }
    (0..seen.len())
        .filter(|&i| seen[i])
        .map(|i| NodeId(i as u32))
        .collect()
}
