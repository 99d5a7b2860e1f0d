//! Loss-gradient fusion: a linear cross-entropy and its backward become one
//! `fused.linear_cross_entropy_with_grad`, which computes each chunk's logits once instead of
//! twice (the LM head's GEMM is the largest of a step with a real vocabulary).
//!
//! It runs after autodiff, where the two meet: the forward `fused.linear_cross_entropy` and a
//! `fused.linear_cross_entropy_grad` of the same operands and chunk. They merge only when the
//! loss gradient does not depend on the loss, as in a training step (its gradient is the
//! seed scaled by constants and token counts, known before the loss is). The fused node takes
//! the forward's place; the nodes that compute the gradient move before it, in their order,
//! since none of them reads the loss. Its results are the forward's and the backward's, so
//! every reader keeps its value.

use crate::emit::PassError;
use crate::rebuild::{ancestors, Rebuild};
use mmc_ir::{FusedOp, Graph, NodeId, Op, Value};
use std::collections::HashMap;

/// Fuses each cross-entropy with its backward (see the module documentation); returns the
/// graph and how many pairs merged.
pub fn fuse_loss_grad(g: &Graph) -> Result<(Graph, usize), PassError> {
    // Forward nodes by (chunk, operands).
    let mut forward: HashMap<(usize, Vec<Value>), NodeId> = HashMap::new();
    for (id, node) in g.iter_nodes() {
        if let Op::Fused(FusedOp::LinearCrossEntropy { chunk }) = node.op {
            forward.insert((chunk, node.inputs.to_vec()), id);
        }
    }
    // forward -> backward, for the pairs whose loss gradient does not read the loss.
    let mut pairs: HashMap<NodeId, NodeId> = HashMap::new();
    let mut merged_backward = vec![false; g.nodes().len()];
    for (id, node) in g.iter_nodes() {
        let Op::Fused(FusedOp::LinearCrossEntropyGrad { chunk }) = node.op else {
            continue;
        };
        let Some(&f) = forward.get(&(chunk, node.inputs[..4].to_vec())) else {
            continue;
        };
        // The gradient must not read the loss, nor any cross-entropy (which keeps the moved
        // nodes clear of the pairs).
        let reads_a_loss = ancestors(g, node.inputs[4]).iter().any(|&a| {
            matches!(
                g.node(a).op,
                Op::Fused(
                    FusedOp::LinearCrossEntropy { .. } | FusedOp::LinearCrossEntropyGrad { .. }
                )
            )
        });
        if reads_a_loss || pairs.contains_key(&f) {
            continue;
        }
        pairs.insert(f, id);
        merged_backward[id.0 as usize] = true;
    }

    let mut r = Rebuild::new(g, "fuse-loss-grad");
    for (id, node) in g.iter_nodes() {
        if r.done(id) || merged_backward[id.0 as usize] {
            continue;
        }
        let Some(&b) = pairs.get(&id) else {
            r.copy(id)?;
            continue;
        };
        // The loss gradient's producers first (none of them reads the loss), then the fused
        // node with the forward's operands and the gradient.
        let backward = g.node(b);
        r.copy_ancestors(backward.inputs[4])?;
        let Op::Fused(FusedOp::LinearCrossEntropy { chunk }) = node.op else {
            unreachable!("pairs start at a forward cross-entropy");
        };
        let fused = r.emit(
            id,
            Op::Fused(FusedOp::LinearCrossEntropyWithGrad { chunk }),
            &backward.inputs,
        )?;
        let results = r.out.node(fused).outputs.clone();
        for (&old, &v) in backward.outputs.iter().zip(&results[1..]) {
            r.set(old, v);
        }
        r.skip(b);
    }
    Ok((r.finish(), pairs.len()))
}
