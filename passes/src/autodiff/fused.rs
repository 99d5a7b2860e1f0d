//! The backward rules of the forward fused ops.
//!
//! Each rule emits its op's fused backward node once (never a primitive expansion), and that
//! node's results are the adjoints of the forward operands, so the backward of a fused forward
//! is as fused as the forward: `fused.linear_cross_entropy_grad` never materialises the
//! [rows, vocab] logits, `fused.attention_grad` recomputes the probabilities as flash
//! attention does. Integer operands (segment ids, top-k indices, targets, offsets) get `None`,
//! and so do the float operands that the backward op does not differentiate (rope's tables,
//! the per-row loss weights); the caller rejects those when they depend on a trainable
//! parameter.

use super::AutodiffError;
use crate::emit::{EmitResult, Emitter};
use mmc_ir::{FusedOp, Node, Op, Value};

/// The adjoints of the operands of `node` (the fused op `op`), one per operand in order, given
/// the adjoint `g` of its single result.
pub(super) fn vjp_fused(
    e: &mut Emitter,
    op: &FusedOp,
    node: &Node,
    g: Value,
) -> Result<Vec<Option<Value>>, AutodiffError> {
    use FusedOp::*;
    let ins = node.inputs.as_slice();
    let out = node.outputs[0];
    Ok(match op {
        RmsNorm { eps } => rms_norm(e, *eps, ins, g)?,
        LayerNorm { eps } => layer_norm(e, *eps, ins, g)?,
        Softmax => softmax(e, out, g)?,
        LogSoftmax => log_softmax(e, out, g)?,
        SwiGlu => swiglu(e, ins, g)?,
        Gelu => gelu(e, ins, g)?,
        Rope => rope(e, ins, g)?,
        Attention { scale, causal } => attention(e, *scale, *causal, ins, g)?,
        LinearCrossEntropy { chunk } => linear_cross_entropy(e, *chunk, ins, g)?,
        MoePermute { .. } => moe_permute(e, ins, g)?,
        // Its result is an integer tensor, so no adjoint ever reaches it.
        ExpertOffsets { .. } => vec![None],
        GroupedMatMul => grouped_matmul(e, ins, g)?,
        MoeUnpermute => moe_unpermute(e, ins, g)?,
        RmsNormGrad { .. }
        | LayerNormGrad { .. }
        | SoftmaxGrad
        | LogSoftmaxGrad
        | SwiGluGrad
        | GeluGrad
        | RopeGrad
        | AttentionGrad { .. }
        | LinearCrossEntropyGrad { .. }
        | GroupedMatMulGrad
        | MoePermuteGrad
        | MoeUnpermuteGrad => return Err(AutodiffError::BackwardOp { op: op.name() }),
        LinearCrossEntropyWithGrad { .. }
        | SumSquares
        | Elementwise { .. }
        | MatMulEpilogue { .. } => return Err(AutodiffError::AfterAutodiff { op: op.name() }),
    })
}

/// The name of operand `i` of fused op `op`, as the spec of the op names it (for errors).
pub(super) fn operand_name(op: &FusedOp, i: usize) -> &'static str {
    use FusedOp::*;
    let names: &[&'static str] = match op {
        RmsNorm { .. } => &["x", "w"],
        LayerNorm { .. } => &["x", "w", "b"],
        Softmax | LogSoftmax | Gelu => &["x"],
        SwiGlu => &["gate", "up"],
        Rope => &["x", "cos", "sin"],
        Attention { .. } => &["q", "k", "v", "segment_ids"],
        LinearCrossEntropy { .. } => &["h", "w", "target", "weight"],
        MoePermute { .. } => &["x", "top"],
        ExpertOffsets { .. } => &["top"],
        GroupedMatMul => &["xs", "w", "offsets"],
        MoeUnpermute => &["ys", "top", "weights"],
        SumSquares => &["x"],
        RmsNormGrad { .. } | LayerNormGrad { .. } => &["x", "w", "dy"],
        SoftmaxGrad | LogSoftmaxGrad => &["y", "dy"],
        SwiGluGrad => &["gate", "up", "dy"],
        GeluGrad => &["x", "dy"],
        RopeGrad => &["dy", "cos", "sin"],
        AttentionGrad { .. } => &["q", "k", "v", "segment_ids", "do"],
        LinearCrossEntropyGrad { .. } => &["h", "w", "target", "weight", "dloss"],
        LinearCrossEntropyWithGrad { .. } => &["h", "w", "target", "weight", "dloss", "dw_base"],
        GroupedMatMulGrad => &["xs", "w", "offsets", "dy"],
        MoePermuteGrad => &["dxs", "top"],
        MoeUnpermuteGrad => &["ys", "top", "weights", "dout"],
        Elementwise { .. } | MatMulEpilogue { .. } => &[],
    };
    names.get(i).copied().unwrap_or("?")
}

/// Appends the backward op `op` on `inputs` and returns all its results.
fn backward(e: &mut Emitter, op: FusedOp, inputs: &[Value]) -> EmitResult<Vec<Value>> {
    let id = e
        .graph
        .add_node(Op::Fused(op), inputs, e.scope)
        .map_err(|source| crate::emit::PassError {
            pass: e.pass,
            source,
        })?;
    Ok(e.graph.node(id).outputs.to_vec())
}

type Grads = EmitResult<Vec<Option<Value>>>;

/// `(x, w) -> (dx, dw)` by `fused.rms_norm_grad(x, w, dy)`.
fn rms_norm(e: &mut Emitter, eps: f64, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::RmsNormGrad { eps }, &[ins[0], ins[1], g])?;
    Ok(vec![Some(r[0]), Some(r[1])])
}

/// `(x, w, b) -> (dx, dw, db)` by `fused.layer_norm_grad(x, w, dy)`.
fn layer_norm(e: &mut Emitter, eps: f64, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::LayerNormGrad { eps }, &[ins[0], ins[1], g])?;
    Ok(vec![Some(r[0]), Some(r[1]), Some(r[2])])
}

/// `x -> dx` by `fused.softmax_grad(y, dy)`, from the forward result `y`.
fn softmax(e: &mut Emitter, y: Value, g: Value) -> Grads {
    let r = backward(e, FusedOp::SoftmaxGrad, &[y, g])?;
    Ok(vec![Some(r[0])])
}

/// `x -> dx` by `fused.log_softmax_grad(y, dy)`, from the forward result `y`.
fn log_softmax(e: &mut Emitter, y: Value, g: Value) -> Grads {
    let r = backward(e, FusedOp::LogSoftmaxGrad, &[y, g])?;
    Ok(vec![Some(r[0])])
}

/// `(gate, up) -> (dgate, dup)` by `fused.swiglu_grad(gate, up, dy)`.
fn swiglu(e: &mut Emitter, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::SwiGluGrad, &[ins[0], ins[1], g])?;
    Ok(vec![Some(r[0]), Some(r[1])])
}

/// `x -> dx` by `fused.gelu_grad(x, dy)`.
fn gelu(e: &mut Emitter, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::GeluGrad, &[ins[0], g])?;
    Ok(vec![Some(r[0])])
}

/// `(x, cos, sin) -> (dx, -, -)` by `fused.rope_grad(dy, cos, sin)`: rope is linear in x.
fn rope(e: &mut Emitter, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::RopeGrad, &[g, ins[1], ins[2]])?;
    Ok(vec![Some(r[0]), None, None])
}

/// `(q, k, v [, segment_ids]) -> (dq, dk, dv [, -])` by
/// `fused.attention_grad(q, k, v [, segment_ids], do)`.
fn attention(e: &mut Emitter, scale: f64, causal: bool, ins: &[Value], g: Value) -> Grads {
    let mut inputs = ins.to_vec();
    inputs.push(g);
    let r = backward(e, FusedOp::AttentionGrad { scale, causal }, &inputs)?;
    let mut grads = vec![Some(r[0]), Some(r[1]), Some(r[2])];
    grads.resize(ins.len(), None);
    Ok(grads)
}

/// `(h, w, target, weight) -> (dh, dw, -, -)` by
/// `fused.linear_cross_entropy_grad(h, w, target, weight, dloss)`, chunked like the forward.
fn linear_cross_entropy(e: &mut Emitter, chunk: usize, ins: &[Value], g: Value) -> Grads {
    let op = FusedOp::LinearCrossEntropyGrad { chunk };
    let r = backward(e, op, &[ins[0], ins[1], ins[2], ins[3], g])?;
    Ok(vec![Some(r[0]), Some(r[1]), None, None])
}

/// `(x, top) -> (dx, -)` by `fused.moe_permute_grad(dxs, top)`.
fn moe_permute(e: &mut Emitter, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::MoePermuteGrad, &[g, ins[1]])?;
    Ok(vec![Some(r[0]), None])
}

/// `(xs, w, offsets) -> (dxs, dw, -)` by `fused.grouped_matmul_grad(xs, w, offsets, dy)`.
fn grouped_matmul(e: &mut Emitter, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::GroupedMatMulGrad, &[ins[0], ins[1], ins[2], g])?;
    Ok(vec![Some(r[0]), Some(r[1]), None])
}

/// `(ys, top, weights) -> (dys, -, dweights)` by
/// `fused.moe_unpermute_grad(ys, top, weights, dout)`.
fn moe_unpermute(e: &mut Emitter, ins: &[Value], g: Value) -> Grads {
    let r = backward(e, FusedOp::MoeUnpermuteGrad, &[ins[0], ins[1], ins[2], g])?;
    Ok(vec![Some(r[0]), None, Some(r[1])])
}
