//! Shape and dtype inference: the typing rules of every op.
//!
//! The builder uses these rules to give each new value its type, and the verifier re-runs them
//! to check that a stored type still agrees with the op and its operands.

use crate::op::{BinaryOp, Op, UnaryOp};
use crate::{DType, TensorType};
use smallvec::{smallvec, SmallVec};

/// Result types of one node (most ops have one).
pub type ResultTypes = SmallVec<[TensorType; 1]>;

/// Why an op cannot be applied to its operands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{op}`: {reason}")]
pub struct TypeError {
    pub op: &'static str,
    pub reason: String,
}

fn check(cond: bool, op: &Op, reason: impl FnOnce() -> String) -> Result<(), TypeError> {
    if cond {
        Ok(())
    } else {
        Err(TypeError {
            op: op.name(),
            reason: reason(),
        })
    }
}

fn arity(op: &Op, inputs: &[&TensorType], n: usize) -> Result<(), TypeError> {
    check(inputs.len() == n, op, || {
        format!("takes {n} operand(s), got {}", inputs.len())
    })
}

fn same_types(op: &Op, a: &TensorType, b: &TensorType) -> Result<(), TypeError> {
    check(a == b, op, || format!("operand types differ: {a} vs {b}"))
}

fn axis_ok(op: &Op, axis: usize, rank: usize) -> Result<(), TypeError> {
    check(axis < rank, op, || {
        format!("axis {axis} is out of range for rank {rank}")
    })
}

/// The result types of `op` applied to operands of types `inputs`.
pub fn infer(op: &Op, inputs: &[&TensorType]) -> Result<ResultTypes, TypeError> {
    let one = |t: TensorType| -> Result<ResultTypes, TypeError> { Ok(smallvec![t]) };
    match op {
        Op::Param { ty, name } | Op::Input { ty, name } => {
            arity(op, inputs, 0)?;
            check(!name.is_empty(), op, || "the name is empty".into())?;
            one(ty.clone())
        }
        Op::Const { value, ty } => {
            arity(op, inputs, 0)?;
            let ok = match ty.dtype {
                d if d.is_float() => true,
                DType::Bool => *value == 0.0 || *value == 1.0,
                _ => value.fract() == 0.0 && value.abs() < 9.0e15,
            };
            check(ok, op, || {
                format!("{value} is not representable in {}", ty.dtype)
            })?;
            one(ty.clone())
        }
        Op::Iota { axis, ty } => {
            arity(op, inputs, 0)?;
            axis_ok(op, *axis, ty.rank())?;
            check(ty.dtype != DType::Bool, op, || "iota cannot be bool".into())?;
            one(ty.clone())
        }
        Op::Unary(u) => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            let ok = match u {
                UnaryOp::Not => t.dtype == DType::Bool,
                UnaryOp::Neg | UnaryOp::Abs => t.dtype != DType::Bool,
                _ => t.dtype.is_float(),
            };
            check(ok, op, || format!("not defined on {}", t.dtype))?;
            one(t.clone())
        }
        Op::Binary(b) => {
            arity(op, inputs, 2)?;
            same_types(op, inputs[0], inputs[1])?;
            let d = inputs[0].dtype;
            let ok = match b {
                BinaryOp::And | BinaryOp::Or => d == DType::Bool,
                BinaryOp::Div | BinaryOp::Pow => d.is_float(),
                _ => d != DType::Bool,
            };
            check(ok, op, || format!("not defined on {d}"))?;
            one(inputs[0].clone())
        }
        Op::Compare(_) => {
            arity(op, inputs, 2)?;
            same_types(op, inputs[0], inputs[1])?;
            one(inputs[0].with_dtype(DType::Bool))
        }
        Op::Select => {
            arity(op, inputs, 3)?;
            let (c, a, b) = (inputs[0], inputs[1], inputs[2]);
            check(c.dtype == DType::Bool, op, || {
                format!("the condition must be bool, got {}", c.dtype)
            })?;
            check(c.shape == a.shape, op, || {
                format!("condition shape {c} differs from operand {a}")
            })?;
            same_types(op, a, b)?;
            one(a.clone())
        }
        Op::Cast { to } => {
            arity(op, inputs, 1)?;
            one(inputs[0].with_dtype(*to))
        }
        Op::Reduce { axes, .. } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            check(t.dtype != DType::Bool, op, || "not defined on bool".into())?;
            let mut shape = t.shape.clone();
            for (i, &a) in axes.iter().enumerate() {
                axis_ok(op, a, t.rank())?;
                check(!axes[..i].contains(&a), op, || {
                    format!("axis {a} is repeated")
                })?;
                shape[a] = 1;
            }
            one(TensorType::new(t.dtype, shape))
        }
        Op::Broadcast { shape } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            check(t.rank() == shape.len(), op, || {
                format!("rank of {t} differs from target rank {}", shape.len())
            })?;
            for (i, (&from, &to)) in t.shape.iter().zip(shape).enumerate() {
                check(from == to || from == 1, op, || {
                    format!("dimension {i} of {t} cannot expand to {to}")
                })?;
            }
            one(TensorType::new(t.dtype, shape.clone()))
        }
        Op::Reshape { shape } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            let n: usize = shape.iter().product();
            check(n == t.numel(), op, || {
                format!(
                    "{t} has {} elements, the target shape {}",
                    t.numel(),
                    crate::DisplayShape(shape)
                )
            })?;
            one(TensorType::new(t.dtype, shape.clone()))
        }
        Op::Permute { perm } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            let mut seen = vec![false; t.rank()];
            check(perm.len() == t.rank(), op, || {
                format!("permutation {perm:?} does not fit {t}")
            })?;
            for &p in perm {
                check(p < t.rank() && !seen[p], op, || {
                    format!("{perm:?} is not a permutation")
                })?;
                seen[p] = true;
            }
            let shape = perm.iter().map(|&p| t.shape[p]).collect::<Vec<_>>();
            one(TensorType::new(t.dtype, shape))
        }
        Op::Slice { start, end } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            check(start.len() == t.rank() && end.len() == t.rank(), op, || {
                format!("start/end must have one entry per dimension of {t}")
            })?;
            for i in 0..t.rank() {
                check(start[i] <= end[i] && end[i] <= t.shape[i], op, || {
                    format!(
                        "{}..{} is out of range on axis {i} of {t}",
                        start[i], end[i]
                    )
                })?;
            }
            let shape = start
                .iter()
                .zip(end)
                .map(|(s, e)| e - s)
                .collect::<Vec<_>>();
            one(TensorType::new(t.dtype, shape))
        }
        Op::Pad { low, high } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            check(low.len() == t.rank() && high.len() == t.rank(), op, || {
                format!("low/high must have one entry per dimension of {t}")
            })?;
            let shape = (0..t.rank())
                .map(|i| t.shape[i].checked_add(low[i])?.checked_add(high[i]))
                .collect::<Option<Vec<_>>>();
            check(shape.is_some(), op, || {
                format!("padding {t} overflows its size")
            })?;
            one(TensorType::new(t.dtype, shape.unwrap_or_default()))
        }
        Op::Concat { axis } => {
            check(!inputs.is_empty(), op, || {
                "needs at least one operand".into()
            })?;
            let first = inputs[0];
            axis_ok(op, *axis, first.rank())?;
            let mut shape = first.shape.clone();
            for t in &inputs[1..] {
                let same_rest = t.dtype == first.dtype
                    && t.rank() == first.rank()
                    && (0..t.rank()).all(|i| i == *axis || t.shape[i] == first.shape[i]);
                check(same_rest, op, || {
                    format!("{t} does not match {first} outside axis {axis}")
                })?;
                let sum = shape[*axis].checked_add(t.shape[*axis]);
                check(sum.is_some(), op, || {
                    format!("concatenating {t} overflows the size of axis {axis}")
                })?;
                shape[*axis] = sum.unwrap_or_default();
            }
            one(TensorType::new(first.dtype, shape))
        }
        Op::MatMul => {
            arity(op, inputs, 2)?;
            let (a, b) = (inputs[0], inputs[1]);
            check(a.dtype.is_float() && a.dtype == b.dtype, op, || {
                format!("needs two operands of one float type, got {a} and {b}")
            })?;
            check(a.rank() >= 2 && a.rank() == b.rank(), op, || {
                format!("needs operands of equal rank >= 2, got {a} and {b}")
            })?;
            let r = a.rank();
            check(a.shape[..r - 2] == b.shape[..r - 2], op, || {
                format!("batch dimensions differ: {a} and {b}")
            })?;
            check(a.shape[r - 1] == b.shape[r - 2], op, || {
                format!("contraction dimensions differ: {a} and {b}")
            })?;
            let mut shape = a.shape.clone();
            shape[r - 1] = b.shape[r - 1];
            one(TensorType::new(a.dtype, shape))
        }
        Op::Gather { axis } => {
            arity(op, inputs, 2)?;
            let (x, idx) = (inputs[0], inputs[1]);
            index_fits(op, x, idx, *axis)?;
            one(TensorType::new(x.dtype, idx.shape.clone()))
        }
        Op::ScatterAdd { axis } => {
            arity(op, inputs, 3)?;
            let (x, idx, src) = (inputs[0], inputs[1], inputs[2]);
            index_fits(op, x, idx, *axis)?;
            check(x.dtype != DType::Bool, op, || "not defined on bool".into())?;
            check(src.dtype == x.dtype && src.shape == idx.shape, op, || {
                format!("source {src} must have the index shape and the dtype of {x}")
            })?;
            one(x.clone())
        }
        Op::TopK { k } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            check(
                t.rank() >= 1 && *k >= 1 && *k <= t.shape[t.rank() - 1],
                op,
                || format!("k = {k} does not fit the last axis of {t}"),
            )?;
            check(t.dtype != DType::Bool, op, || "not defined on bool".into())?;
            let mut shape = t.shape.clone();
            *shape.last_mut().expect("rank checked") = *k;
            one(TensorType::new(DType::I64, shape))
        }
        Op::ArgSort { .. } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            check(t.rank() >= 1 && t.dtype != DType::Bool, op, || {
                format!("needs a numeric tensor of rank >= 1, got {t}")
            })?;
            one(t.with_dtype(DType::I64))
        }
        Op::CumSum { axis } => {
            arity(op, inputs, 1)?;
            let t = inputs[0];
            axis_ok(op, *axis, t.rank())?;
            check(t.dtype != DType::Bool, op, || "not defined on bool".into())?;
            one(t.clone())
        }
        Op::Fused(f) => f.infer(inputs),
    }
}

fn index_fits(op: &Op, x: &TensorType, idx: &TensorType, axis: usize) -> Result<(), TypeError> {
    check(idx.dtype.is_int(), op, || {
        format!("indices must be i32 or i64, got {}", idx.dtype)
    })?;
    check(x.rank() == idx.rank(), op, || {
        format!("indices {idx} must have the rank of {x}")
    })?;
    axis_ok(op, axis, x.rank())?;
    check(
        (0..x.rank()).all(|i| i == axis || x.shape[i] == idx.shape[i]),
        op,
        || format!("indices {idx} must match {x} outside axis {axis}"),
    )
}
