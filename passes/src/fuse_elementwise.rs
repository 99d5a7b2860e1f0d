//! Elementwise fusion: each maximal chain of elementwise ops becomes one
//! `fused.elementwise` kernel, and a chain fed by a matmul becomes that matmul's epilogue
//! (`fused.matmul_epilogue`: bias, activation, residual applied before the product is stored).
//!
//! It runs after autodiff, the optimizer step and recompute, on every program, so forward,
//! backward and optimizer chains (AdamW's moment updates) fuse alike and no fused elementwise
//! op needs a backward rule. This is loop fusion as XLA and tinygrad do it, not a rewrite rule:
//! a chain has any length and shape, which no fixed pattern describes.
//!
//! Grouping walks the program backwards. An elementwise node not yet in a group roots a new
//! one, which then takes every elementwise producer whose result is read only inside the group
//! (never a graph output), until nothing more joins. Only the root is read outside its group,
//! so replacing a group by one node at the root's position keeps the program acyclic and in
//! order. At the group's edge:
//! - a constant becomes an instruction of the program (no tensor of it is read);
//! - a broadcast is read through: its operand is read broadcast, so the expanded tensor is
//!   never stored;
//! - a matmul read only by the group becomes its product, `$0` of an epilogue.
//!
//! A group of one op that absorbs nothing is left alone: it would save nothing. The program
//! computes what the chain did, op for op (the interpreter evaluates each instruction with its
//! primitive op), so results are bit-identical.

use crate::emit::PassError;
use crate::simplify::dce;
use mmc_ir::elementwise::{Inst, Program, Reg};
use mmc_ir::{FusedOp, Graph, NodeId, Op, TensorType, Value};
use std::collections::HashMap;
use std::fmt;

/// What elementwise fusion did to one graph.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElementwiseReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// `fused.elementwise` kernels formed.
    pub kernels: usize,
    /// `fused.matmul_epilogue` kernels formed.
    pub epilogues: usize,
    /// Primitive elementwise ops now inside a kernel.
    pub ops_fused: usize,
    /// Broadcasts now read in place instead of stored.
    pub broadcasts_read: usize,
}

impl fmt::Display for ElementwiseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} elementwise ops into {} kernels and {} matmul epilogues; {} broadcasts read in place",
            self.ops_fused, self.kernels, self.epilogues, self.broadcasts_read
        )
    }
}

/// Whether `op` can be a member of a group: a single-result elementwise op.
fn pointwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. }
    )
}

/// One group: its members in program order (the root last).
struct Group {
    members: Vec<NodeId>,
}

/// How a group reads a value from outside it.
#[derive(Clone, Copy)]
enum Edge {
    /// As an operand of the fused op: the value itself, or the operand of its broadcast.
    Operand(Value),
    /// As a constant instruction.
    Const(f64),
}

/// Fuses the elementwise chains of `g` (see the module documentation).
pub fn fuse_elementwise(g: &Graph) -> Result<(Graph, ElementwiseReport), PassError> {
    let mut report = ElementwiseReport {
        nodes_before: g.nodes().len(),
        ..Default::default()
    };
    // Dead nodes first, so that every kernel formed is one the program runs.
    let g = &dce(g);
    let n = g.nodes().len();
    let mut users: Vec<Vec<NodeId>> = vec![Vec::new(); g.num_values()];
    for (id, node) in g.iter_nodes() {
        for v in &node.inputs {
            users[v.0 as usize].push(id);
        }
    }
    let mut is_output = vec![false; g.num_values()];
    for (_, v) in g.outputs() {
        is_output[v.0 as usize] = true;
    }
    let single_use_by = |v: Value, group: u32, group_of: &[Option<u32>]| {
        !is_output[v.0 as usize]
            && users[v.0 as usize]
                .iter()
                .all(|u| group_of[u.0 as usize] == Some(group))
    };

    // Grouping, from the last node back.
    let mut group_of: Vec<Option<u32>> = vec![None; n];
    let mut groups: Vec<Group> = Vec::new();
    for i in (0..n).rev() {
        let root = NodeId(i as u32);
        if group_of[i].is_some() || !pointwise(&g.node(root).op) {
            continue;
        }
        let gid = groups.len() as u32;
        group_of[i] = Some(gid);
        let mut members = vec![root];
        loop {
            let mut grew = false;
            let mut k = 0;
            while k < members.len() {
                for &v in &g.node(members[k]).inputs {
                    let p = g.value_data(v).expect("a value of this graph").node;
                    if group_of[p.0 as usize].is_none()
                        && pointwise(&g.node(p).op)
                        && single_use_by(v, gid, &group_of)
                    {
                        group_of[p.0 as usize] = Some(gid);
                        members.push(p);
                        grew = true;
                    }
                }
                k += 1;
            }
            if !grew {
                break;
            }
        }
        members.sort();
        groups.push(Group { members });
    }

    // Each group's program and operands.
    let mut fused_at: HashMap<NodeId, (FusedOp, Vec<Value>)> = HashMap::new();
    let mut absorbed = vec![false; n];
    for (gid, group) in groups.iter().enumerate() {
        let gid = gid as u32;
        let root = *group.members.last().expect("a group has its root");
        let root_ty = g.ty(g.result(root)).clone();
        let in_group = |v: Value| {
            let p = g.value_data(v).expect("a value of this graph").node;
            group_of[p.0 as usize] == Some(gid)
        };
        // The values read from outside, in first-read order, each once.
        let mut edges: Vec<(Value, Edge)> = Vec::new();
        let mut broadcasts = 0;
        for &m in &group.members {
            for &v in &g.node(m).inputs {
                if in_group(v) || edges.iter().any(|(e, _)| *e == v) {
                    continue;
                }
                let producer = &g.node(g.value_data(v).expect("a value").node);
                let edge = match &producer.op {
                    Op::Const { value, .. } => Edge::Const(*value),
                    Op::Broadcast { .. } => {
                        broadcasts += 1;
                        let x = producer.inputs[0];
                        match &g.node(g.value_data(x).expect("a value").node).op {
                            Op::Const { value, .. } => Edge::Const(*value),
                            _ => Edge::Operand(x),
                        }
                    }
                    _ => Edge::Operand(v),
                };
                edges.push((v, edge));
            }
        }
        // A matmul that only this group reads becomes the epilogue's product.
        let product = edges.iter().find_map(|&(v, e)| match e {
            Edge::Operand(x) if x == v => {
                let p = g.value_data(v).expect("a value").node;
                (g.node(p).op == Op::MatMul && single_use_by(v, gid, &group_of)).then_some((v, p))
            }
            _ => None,
        });
        let consts = edges
            .iter()
            .filter(|(_, e)| matches!(e, Edge::Const(_)))
            .count();
        if group.members.len() < 2 && broadcasts == 0 && consts == 0 && product.is_none() {
            continue;
        }

        // Registers: the operands (the product first), then the constants, then the members.
        let mut operands: Vec<Value> = Vec::new();
        if let Some((v, _)) = product {
            operands.push(v);
        }
        for &(v, e) in &edges {
            if let Edge::Operand(x) = e {
                if Some(v) != product.map(|p| p.0) && !operands.contains(&x) {
                    operands.push(x);
                }
            }
        }
        let mut reg: HashMap<Value, Reg> = HashMap::new();
        for &(v, e) in &edges {
            if let Edge::Operand(x) = e {
                let k = operands.iter().position(|&o| o == x).expect("an operand");
                reg.insert(v, k as Reg);
            }
        }
        let mut insts = Vec::new();
        let next = |insts: &Vec<Inst>| (operands.len() + insts.len()) as Reg;
        for &(v, e) in &edges {
            if let Edge::Const(value) = e {
                reg.insert(v, next(&insts));
                insts.push(Inst {
                    op: Op::Const {
                        value,
                        ty: TensorType::scalar(g.ty(v).dtype),
                    },
                    args: vec![],
                });
            }
        }
        for &m in &group.members {
            let node = g.node(m);
            let args = node.inputs.iter().map(|v| reg[v]).collect();
            reg.insert(node.outputs[0], next(&insts));
            insts.push(Inst {
                op: node.op.clone(),
                args,
            });
        }
        let program = Program {
            inputs: operands.len(),
            insts,
        };
        report.ops_fused += group.members.len();
        report.broadcasts_read += broadcasts;
        for &m in &group.members[..group.members.len() - 1] {
            absorbed[m.0 as usize] = true;
        }
        let (op, ins) = match product {
            Some((_, p)) => {
                absorbed[p.0 as usize] = true;
                report.epilogues += 1;
                let mut ins = g.node(p).inputs.to_vec();
                ins.extend_from_slice(&operands[1..]);
                (FusedOp::MatMulEpilogue { program }, ins)
            }
            None => {
                report.kernels += 1;
                (
                    FusedOp::Elementwise {
                        program,
                        shape: root_ty.shape.clone(),
                    },
                    operands,
                )
            }
        };
        fused_at.insert(root, (op, ins));
    }

    // The rebuilt program: each fused group at its root, the absorbed nodes dropped, then the
    // constants and broadcasts no one reads any more.
    let mut out = Graph::new(g.stage);
    let mut map: Vec<Option<Value>> = vec![None; g.num_values()];
    let err = |source| PassError {
        pass: "fuse-elementwise",
        source,
    };
    for (id, node) in g.iter_nodes() {
        if absorbed[id.0 as usize] {
            continue;
        }
        let scope = out.intern_scope(g.scope_name(node.scope));
        let mapped = |vs: &[Value]| -> Vec<Value> {
            vs.iter()
                .map(|v| map[v.0 as usize].expect("an operand is defined before its reader"))
                .collect()
        };
        let new_id = match fused_at.remove(&id) {
            Some((op, ins)) => out.add_node(Op::Fused(op), &mapped(&ins), scope),
            None => out.add_node(node.op.clone(), &mapped(&node.inputs), scope),
        }
        .map_err(err)?;
        for (&old, &new) in node.outputs.iter().zip(&out.node(new_id).outputs) {
            map[old.0 as usize] = Some(new);
        }
    }
    for (name, v) in g.outputs() {
        out.add_output(
            name.clone(),
            map[v.0 as usize].expect("an output is never absorbed"),
        );
    }
    let out = dce(&out);
    report.nodes_after = out.nodes().len();
    Ok((out, report))
}
