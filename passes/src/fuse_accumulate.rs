//! Accumulation fusion: a gradient added to its accumulator (`acc + g`, as the training step
//! sums each micro-batch's gradients) is summed onto the accumulator by the op that makes it,
//! when that op can start from a base, so the parameter-sized gradient is never stored:
//!
//! - `acc + scatter_add(0, i, src)` (an embedding's gradient) becomes `scatter_add(acc, i,
//!   src)`;
//! - `acc + dw` with dw the head-weight gradient of a `fused.linear_cross_entropy_with_grad`
//!   becomes that op with `acc` as its dw base.
//!
//! The gradient must have no other reader and acc its type, and acc must not depend on the op
//! (an accumulator is an input). The op takes the add's place in no new order: it stays where
//! it was, with acc's producers moved before it. The code generator then writes the sum into
//! the accumulator in place. Both forms add the same terms in another order (the base first),
//! so results agree to rounding, not bit for bit.

use crate::emit::PassError;
use mmc_ir::{BinaryOp, FusedOp, Graph, NodeId, Op, Value};
use std::collections::HashMap;

/// Fuses each gradient accumulation it can (see the module documentation); returns the graph
/// and how many accumulations were fused.
pub fn fuse_accumulate(g: &Graph) -> Result<(Graph, usize), PassError> {
    let mut uses = vec![0usize; g.num_values()];
    for node in g.nodes() {
        for v in &node.inputs {
            uses[v.0 as usize] += 1;
        }
    }
    for (_, v) in g.outputs() {
        uses[v.0 as usize] += 1;
    }
    let def = |v: Value| g.value_data(v).expect("a value of this graph");
    // The producer of the gradient -> (the add, the accumulator).
    let mut fused: HashMap<NodeId, (NodeId, Value)> = HashMap::new();
    for (id, node) in g.iter_nodes() {
        if node.op != Op::Binary(BinaryOp::Add) {
            continue;
        }
        for (acc, grad) in [
            (node.inputs[0], node.inputs[1]),
            (node.inputs[1], node.inputs[0]),
        ] {
            let d = def(grad);
            let producer = g.node(d.node);
            let takes_base = match &producer.op {
                Op::ScatterAdd { .. } => {
                    let base = g.node(def(producer.inputs[0]).node);
                    matches!(base.op, Op::Const { value, .. } if value == 0.0)
                }
                Op::Fused(FusedOp::LinearCrossEntropyWithGrad { .. }) => {
                    d.index == 2 && producer.inputs.len() == 5
                }
                _ => false,
            };
            if takes_base
                && uses[grad.0 as usize] == 1
                && g.ty(acc) == g.ty(grad)
                && !fused.contains_key(&d.node)
                && !ancestors(g, acc).contains(&d.node)
            {
                fused.insert(d.node, (id, acc));
                break;
            }
        }
    }

    let dropped: Vec<NodeId> = fused.values().map(|&(add, _)| add).collect();
    let mut out = Graph::new(g.stage);
    let mut map: Vec<Option<Value>> = vec![None; g.num_values()];
    let mut emitted = vec![false; g.nodes().len()];
    let err = |source| PassError {
        pass: "fuse-accumulate",
        source,
    };
    let mapped = |map: &[Option<Value>], vs: &[Value]| -> Vec<Value> {
        vs.iter()
            .map(|v| map[v.0 as usize].expect("an operand is defined before its reader"))
            .collect()
    };
    let emit =
        |out: &mut Graph, map: &mut Vec<Option<Value>>, id: NodeId, op: Op, ins: &[Value]| {
            let node = g.node(id);
            let scope = out.intern_scope(g.scope_name(node.scope));
            let new = out.add_node(op, &mapped(map, ins), scope).map_err(err)?;
            for (&old, &v) in node.outputs.iter().zip(&out.node(new).outputs) {
                map[old.0 as usize] = Some(v);
            }
            Ok::<_, PassError>(new)
        };
    for (id, node) in g.iter_nodes() {
        if emitted[id.0 as usize] || dropped.contains(&id) {
            continue;
        }
        let Some(&(add, acc)) = fused.get(&id) else {
            emit(&mut out, &mut map, id, node.op.clone(), &node.inputs)?;
            emitted[id.0 as usize] = true;
            continue;
        };
        for a in ancestors(g, acc) {
            if !emitted[a.0 as usize] {
                let n = g.node(a);
                emit(&mut out, &mut map, a, n.op.clone(), &n.inputs)?;
                emitted[a.0 as usize] = true;
            }
        }
        let mut ins = node.inputs.to_vec();
        match node.op {
            Op::ScatterAdd { .. } => ins[0] = acc,
            _ => ins.push(acc),
        }
        let new = emit(&mut out, &mut map, id, node.op.clone(), &ins)?;
        // The add's result is now the op's.
        let sum = g.node(add).outputs[0];
        let result = match node.op {
            Op::ScatterAdd { .. } => 0,
            _ => 2,
        };
        map[sum.0 as usize] = Some(out.node(new).outputs[result]);
        emitted[id.0 as usize] = true;
    }
    for (name, v) in g.outputs() {
        out.add_output(
            name.clone(),
            map[v.0 as usize].expect("every value is mapped"),
        );
    }
    Ok((crate::simplify::dce(&out), fused.len()))
}

/// The nodes `v` depends on, itself included, in program order.
pub(crate) fn ancestors(g: &Graph, v: Value) -> Vec<NodeId> {
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
