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
use crate::rebuild::{ancestors, Rebuild};
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
    let mut r = Rebuild::new(g, "fuse-accumulate");
    for (id, node) in g.iter_nodes() {
        if r.done(id) || dropped.contains(&id) {
            continue;
        }
        let Some(&(add, acc)) = fused.get(&id) else {
            r.copy(id)?;
            continue;
        };
        r.copy_ancestors(acc)?;
        let mut ins = node.inputs.to_vec();
        let result = match node.op {
            Op::ScatterAdd { .. } => {
                ins[0] = acc;
                0
            }
            _ => {
                ins.push(acc);
                2
            }
        };
        let new = r.emit(id, node.op.clone(), &ins)?;
        // The add's result is now the op's.
        let sum = r.out.node(new).outputs[result];
        r.set(g.node(add).outputs[0], sum);
        r.skip(add);
    }
    Ok((crate::simplify::dce(&r.finish()), fused.len()))
}
