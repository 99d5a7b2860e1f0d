//! Reverse-mode automatic differentiation as a graph pass.
//!
//! The result is the forward graph followed by its backward graph, in one program: every
//! forward value stays available to the backward nodes (recompute and memory planning decide
//! later what to keep). Gradients flow only to trainable parameters: a node gets backward nodes
//! only when it lies on a path from a trainable parameter to the loss, so a subgraph that feeds
//! only frozen parameters (say a frozen vision tower) has no backward nodes at all.
//!
//! Each primitive op's vector-Jacobian product is a rule written in IR ops (`vjp`), called once
//! per differentiable operand. A forward fused op instead gets its fused backward op, emitted
//! once per forward node, whose results are the adjoints of its operands (`fused::vjp_fused`),
//! so the training graph of a fused forward is fused too. Backward ops are never differentiated
//! again.

mod fused;

use crate::emit::{EmitResult, Emitter, PassError};
use mmc_ir::{
    BinaryOp, CmpOp, FusedOp, Graph, Node, Op, ReduceKind, Stage, TensorType, UnaryOp, Value,
};
use std::collections::HashMap;

/// The prefix of the graph outputs that carry parameter gradients: `grad:<parameter name>`.
pub const GRAD_PREFIX: &str = "grad:";

/// Errors of the autodiff pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutodiffError {
    #[error("the graph has no output named `{0}` to differentiate")]
    NoSuchOutput(String),
    #[error("the loss `{name}` must be a float scalar, but it is {ty}")]
    NotAScalar { name: String, ty: TensorType },
    /// Autodiff differentiates forward graphs; a fused backward op on the path from a
    /// trainable parameter to the loss means it was handed a graph that autodiff produced.
    #[error(
        "`{op}` is a backward op and autodiff does not differentiate backward ops again; \
         differentiate the forward graph instead"
    )]
    BackwardOp { op: &'static str },
    /// Elementwise programs are formed after autodiff (over forward, backward and optimizer
    /// chains at once), so a graph that holds one has already been differentiated.
    #[error(
        "`{op}` is formed after autodiff and is not differentiated; differentiate the graph \
         before elementwise fusion"
    )]
    AfterAutodiff { op: &'static str },
    /// A fused op gives no gradient to this float operand (rope's tables, the loss weights of
    /// the fused cross-entropy), yet it depends on a trainable parameter: dropping it silently
    /// would train on a wrong gradient.
    #[error(
        "operand `{operand}` of `{op}` depends on a trainable parameter, but `{op}` gives it \
         no gradient"
    )]
    NoGradient {
        op: &'static str,
        operand: &'static str,
    },
    #[error(transparent)]
    Internal(#[from] PassError),
}

/// The name of the gradient output of parameter `param`.
pub fn grad_output(param: &str) -> String {
    format!("{GRAD_PREFIX}{param}")
}

/// Appends the backward graph of `loss` to `forward`. The result keeps the forward outputs and
/// adds `grad:<name>` for every parameter for which `trainable(name)` holds (zeros when the
/// loss does not depend on it). Its stage is [`Stage::Autodiff`].
pub fn autodiff(
    forward: &Graph,
    loss: &str,
    trainable: impl Fn(&str) -> bool,
) -> Result<Graph, AutodiffError> {
    let loss_v = forward
        .output(loss)
        .ok_or_else(|| AutodiffError::NoSuchOutput(loss.to_string()))?;
    let loss_ty = forward.ty(loss_v).clone();
    if !loss_ty.dtype.is_float() || loss_ty.rank() != 0 {
        return Err(AutodiffError::NotAScalar {
            name: loss.to_string(),
            ty: loss_ty,
        });
    }

    let n_values = forward.num_values();
    // Which values depend on a trainable parameter through float math.
    let mut needs = vec![false; n_values];
    for node in forward.nodes() {
        let flows = match &node.op {
            Op::Param { name, .. } => trainable(name),
            op if differentiable(op) => node.inputs.iter().any(|v| needs[v.0 as usize]),
            _ => false,
        };
        for &o in &node.outputs {
            needs[o.0 as usize] = flows && forward.ty(o).dtype.is_float();
        }
    }
    // Which values the loss depends on.
    let mut reaches = vec![false; n_values];
    reaches[loss_v.0 as usize] = true;
    for node in forward.nodes().iter().rev() {
        if node.outputs.iter().any(|o| reaches[o.0 as usize]) {
            for v in &node.inputs {
                reaches[v.0 as usize] = true;
            }
        }
    }
    let active = |v: Value| needs[v.0 as usize] && reaches[v.0 as usize];

    let mut graph = forward.clone();
    graph.stage = Stage::Autodiff;
    let mut adjoint: HashMap<Value, Value> = HashMap::new();
    if active(loss_v) {
        let scope = graph.intern_scope("grad");
        let mut e = Emitter {
            graph: &mut graph,
            scope,
            pass: "autodiff",
        };
        adjoint.insert(loss_v, e.konst(1.0, loss_v)?);
    }

    for node in forward.nodes().iter().rev() {
        let adjoints: Vec<Option<Value>> = node
            .outputs
            .iter()
            .map(|o| adjoint.get(o).copied())
            .collect();
        if adjoints.iter().all(Option::is_none) {
            continue;
        }
        let g = match (&node.op, adjoints.as_slice()) {
            (Op::Fused(f), _) if f.is_backward() => {
                return Err(AutodiffError::BackwardOp { op: f.name() })
            }
            (_, [Some(g)]) => *g,
            _ => {
                return Err(internal(format!(
                    "`{}` has several results; only fused backward ops do, and they are \
                     never differentiated",
                    node.op.name()
                )))
            }
        };
        let out = node.outputs[0];
        let scope_name = format!("grad:{}", forward.scope_name(node.scope));
        let scope = graph.intern_scope(&scope_name);
        let mut e = Emitter {
            graph: &mut graph,
            scope,
            pass: "autodiff",
        };
        let grads: Vec<Option<Value>> = match &node.op {
            Op::Fused(f) => fused::vjp_fused(&mut e, f, node, g)?,
            _ => {
                let mut grads = Vec::with_capacity(node.inputs.len());
                for (i, &x) in node.inputs.iter().enumerate() {
                    grads.push(if active(x) {
                        vjp(&mut e, node, i, g, out)?
                    } else {
                        None
                    });
                }
                grads
            }
        };
        for (i, (&x, gx)) in node.inputs.iter().zip(grads).enumerate() {
            if !active(x) {
                continue;
            }
            let gx = match (gx, &node.op) {
                (Some(gx), _) => gx,
                (None, Op::Fused(f)) => {
                    return Err(AutodiffError::NoGradient {
                        op: f.name(),
                        operand: fused::operand_name(f, i),
                    })
                }
                (None, _) => continue,
            };
            let acc = match adjoint.get(&x) {
                Some(&prev) => e.add(prev, gx)?,
                None => gx,
            };
            adjoint.insert(x, acc);
        }
    }

    let scope = graph.intern_scope("grad");
    let params: Vec<(String, TensorType, Value)> = forward
        .params()
        .filter(|(n, _, _)| trainable(n))
        .map(|(n, t, v)| (n.to_string(), t.clone(), v))
        .collect();
    for (name, ty, v) in params {
        let g = match adjoint.get(&v) {
            Some(&g) => g,
            None => {
                let mut e = Emitter {
                    graph: &mut graph,
                    scope,
                    pass: "autodiff",
                };
                e.full(0.0, ty)?
            }
        };
        graph.add_output(grad_output(&name), g);
    }
    Ok(graph)
}

fn internal(msg: String) -> AutodiffError {
    AutodiffError::Internal(PassError {
        pass: "autodiff",
        source: mmc_ir::GraphError::Type(mmc_ir::TypeError {
            op: "autodiff",
            reason: msg,
        }),
    })
}

/// Whether gradients can flow through `op` at all (index-producing and constant ops stop them).
/// Fused backward ops count as differentiable, so that one on a gradient path is reported
/// ([`AutodiffError::BackwardOp`]) instead of silently cutting the path.
fn differentiable(op: &Op) -> bool {
    !matches!(
        op,
        Op::Param { .. }
            | Op::Input { .. }
            | Op::Const { .. }
            | Op::Iota { .. }
            | Op::Compare(_)
            | Op::TopK { .. }
            | Op::ArgSort { .. }
            | Op::Fused(FusedOp::ExpertOffsets { .. })
    )
}

/// The contribution to the adjoint of input `i` of `node`, given the adjoint `g` of its
/// result `out`; `None` when the input gets no gradient (indices, conditions).
fn vjp(e: &mut Emitter, node: &Node, i: usize, g: Value, out: Value) -> EmitResult<Option<Value>> {
    let x = node.inputs[0];
    let y = node.inputs.get(1).copied();
    let xt = e.ty(x);
    let gx = match &node.op {
        Op::Unary(u) => match u {
            UnaryOp::Neg => e.neg(g)?,
            UnaryOp::Abs => {
                let zero = e.konst(0.0, x)?;
                let one = e.konst(1.0, x)?;
                let pos = e.compare(CmpOp::Gt, x, zero)?;
                let negv = e.compare(CmpOp::Lt, x, zero)?;
                let minus = e.neg(one)?;
                let s = e.select(negv, minus, zero)?;
                let sign = e.select(pos, one, s)?;
                e.mul(g, sign)?
            }
            UnaryOp::Exp => e.mul(g, out)?,
            UnaryOp::Log => e.div(g, x)?,
            UnaryOp::Sqrt => {
                let h = e.scale(g, 0.5)?;
                e.div(h, out)?
            }
            UnaryOp::Rsqrt => {
                let o2 = e.mul(out, out)?;
                let o3 = e.mul(o2, out)?;
                let t = e.mul(g, o3)?;
                e.scale(t, -0.5)?
            }
            UnaryOp::Recip => {
                let o2 = e.mul(out, out)?;
                let t = e.mul(g, o2)?;
                e.neg(t)?
            }
            UnaryOp::Tanh => {
                let o2 = e.mul(out, out)?;
                let one = e.konst(1.0, out)?;
                let d = e.sub(one, o2)?;
                e.mul(g, d)?
            }
            UnaryOp::Erf => {
                let x2 = e.mul(x, x)?;
                let n = e.neg(x2)?;
                let ex = e.unary(UnaryOp::Exp, n)?;
                let d = e.scale(ex, std::f64::consts::FRAC_2_SQRT_PI)?;
                e.mul(g, d)?
            }
            UnaryOp::Sin => {
                let c = e.unary(UnaryOp::Cos, x)?;
                e.mul(g, c)?
            }
            UnaryOp::Cos => {
                let s = e.unary(UnaryOp::Sin, x)?;
                let t = e.mul(g, s)?;
                e.neg(t)?
            }
            UnaryOp::Not => return Ok(None),
        },
        Op::Binary(b) => {
            let y = y.expect("binary ops have two operands");
            let (this, other) = if i == 0 { (x, y) } else { (y, x) };
            match b {
                BinaryOp::Add => g,
                BinaryOp::Sub if i == 0 => g,
                BinaryOp::Sub => e.neg(g)?,
                BinaryOp::Mul => e.mul(g, other)?,
                BinaryOp::Div if i == 0 => e.div(g, y)?,
                BinaryOp::Div => {
                    let t = e.mul(g, out)?;
                    let t = e.div(t, y)?;
                    e.neg(t)?
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // The winner takes the gradient; ties split it evenly (as torch does).
                    let wins = if *b == BinaryOp::Max {
                        CmpOp::Gt
                    } else {
                        CmpOp::Lt
                    };
                    let win = e.compare(wins, this, other)?;
                    let tie = e.compare(CmpOp::Eq, this, other)?;
                    let zero = e.konst(0.0, g)?;
                    let half = e.scale(g, 0.5)?;
                    let t = e.select(tie, half, zero)?;
                    e.select(win, g, t)?
                }
                BinaryOp::Pow if i == 0 => {
                    let one = e.konst(1.0, y)?;
                    let ym1 = e.sub(y, one)?;
                    let p = e.binary(BinaryOp::Pow, x, ym1)?;
                    let d = e.mul(y, p)?;
                    e.mul(g, d)?
                }
                BinaryOp::Pow => {
                    let l = e.unary(UnaryOp::Log, x)?;
                    let d = e.mul(out, l)?;
                    e.mul(g, d)?
                }
                BinaryOp::And | BinaryOp::Or => return Ok(None),
            }
        }
        Op::Select => {
            if i == 0 {
                return Ok(None);
            }
            let zero = e.konst(0.0, g)?;
            if i == 1 {
                e.select(x, g, zero)?
            } else {
                e.select(x, zero, g)?
            }
        }
        Op::Cast { .. } => {
            if !xt.dtype.is_float() {
                return Ok(None);
            }
            e.cast(g, xt.dtype)?
        }
        Op::Reduce { kind, axes } => {
            let gb = e.broadcast(g, &xt.shape)?;
            match kind {
                ReduceKind::Sum => gb,
                ReduceKind::Max => {
                    // Ties share the gradient evenly (torch's amax).
                    let ob = e.broadcast(out, &xt.shape)?;
                    let hit = e.compare(CmpOp::Eq, x, ob)?;
                    let one = e.konst(1.0, x)?;
                    let zero = e.konst(0.0, x)?;
                    let ones = e.select(hit, one, zero)?;
                    let count = e.sum_keep(ones, axes)?;
                    let count = e.broadcast(count, &xt.shape)?;
                    let share = e.div(gb, count)?;
                    e.select(hit, share, zero)?
                }
            }
        }
        Op::Broadcast { shape } => {
            let axes: Vec<usize> = (0..shape.len())
                .filter(|&a| xt.shape[a] == 1 && shape[a] != 1)
                .collect();
            e.sum_keep(g, &axes)?
        }
        Op::Reshape { .. } => e.reshape(g, &xt.shape)?,
        Op::Permute { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            e.permute(g, &inv)?
        }
        Op::Slice { start, end } => {
            let high: Vec<usize> = end.iter().zip(&xt.shape).map(|(e, d)| d - e).collect();
            e.op(
                Op::Pad {
                    low: start.clone(),
                    high,
                },
                &[g],
            )?
        }
        Op::Pad { low, .. } => {
            let end: Vec<usize> = low.iter().zip(&xt.shape).map(|(l, d)| l + d).collect();
            e.op(
                Op::Slice {
                    start: low.clone(),
                    end,
                },
                &[g],
            )?
        }
        Op::Concat { axis } => {
            let offset: usize = node.inputs[..i].iter().map(|v| e.ty(*v).shape[*axis]).sum();
            let this = e.ty(node.inputs[i]);
            let mut start = vec![0; this.rank()];
            let mut end = e.ty(out).shape;
            start[*axis] = offset;
            end[*axis] = offset + this.shape[*axis];
            e.op(Op::Slice { start, end }, &[g])?
        }
        Op::MatMul => {
            let y = y.expect("matmul has two operands");
            if i == 0 {
                let yt = e.transpose_last(y)?;
                e.op(Op::MatMul, &[g, yt])?
            } else {
                let xtr = e.transpose_last(x)?;
                e.op(Op::MatMul, &[xtr, g])?
            }
        }
        Op::Gather { axis } => {
            if i != 0 {
                return Ok(None);
            }
            let zeros = e.full(0.0, xt.clone())?;
            let idx = y.expect("gather has indices");
            e.op(Op::ScatterAdd { axis: *axis }, &[zeros, idx, g])?
        }
        Op::ScatterAdd { axis } => match i {
            0 => g,
            1 => return Ok(None),
            _ => {
                let idx = y.expect("scatter_add has indices");
                e.op(Op::Gather { axis: *axis }, &[g, idx])?
            }
        },
        Op::CumSum { axis } => {
            // d/dx_j of sum_i g_i cumsum(x)_i = sum_{i >= j} g_i = total - cumsum(g) + g.
            let total = e.sum_keep(g, &[*axis])?;
            let total = e.broadcast(total, &xt.shape)?;
            let c = e.op(Op::CumSum { axis: *axis }, &[g])?;
            let t = e.sub(total, c)?;
            e.add(t, g)?
        }
        Op::Fused(f) => {
            return Err(PassError {
                pass: "autodiff",
                source: mmc_ir::GraphError::Type(mmc_ir::TypeError {
                    op: f.name(),
                    reason: "fused ops are differentiated by `fused::vjp_fused`, not per operand"
                        .into(),
                }),
            })
        }
        Op::Param { .. }
        | Op::Input { .. }
        | Op::Const { .. }
        | Op::Iota { .. }
        | Op::Compare(_)
        | Op::TopK { .. }
        | Op::ArgSort { .. } => return Ok(None),
    };
    Ok(Some(gx))
}
