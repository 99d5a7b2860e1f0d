//! A small node emitter for passes: appends typed nodes in one scope, with helpers for the
//! constants and reshapes that rewrite rules need.

use mmc_ir::{
    BinaryOp, CmpOp, DType, Graph, GraphError, Op, ReduceKind, ScopeId, TensorType, UnaryOp, Value,
};

/// A failure inside a pass: a rule produced an ill-typed node. Always a bug in mmc.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("internal error in pass `{pass}`: {source}")]
pub struct PassError {
    pub pass: &'static str,
    pub source: GraphError,
}

/// Appends nodes to a graph in one scope.
pub struct Emitter<'g> {
    pub graph: &'g mut Graph,
    pub scope: ScopeId,
    pub pass: &'static str,
}

pub type EmitResult<T = Value> = Result<T, PassError>;

impl Emitter<'_> {
    pub fn op(&mut self, op: Op, inputs: &[Value]) -> EmitResult {
        match self.graph.add_node(op, inputs, self.scope) {
            Ok(id) => Ok(self.graph.result(id)),
            Err(source) => Err(PassError {
                pass: self.pass,
                source,
            }),
        }
    }

    pub fn ty(&self, v: Value) -> TensorType {
        self.graph.ty(v).clone()
    }

    /// A constant with the type of `like`.
    pub fn konst(&mut self, value: f64, like: Value) -> EmitResult {
        let ty = self.ty(like);
        self.op(Op::Const { value, ty }, &[])
    }

    /// A constant of any type.
    pub fn full(&mut self, value: f64, ty: TensorType) -> EmitResult {
        self.op(Op::Const { value, ty }, &[])
    }

    pub fn unary(&mut self, u: UnaryOp, x: Value) -> EmitResult {
        self.op(Op::Unary(u), &[x])
    }

    pub fn binary(&mut self, b: BinaryOp, x: Value, y: Value) -> EmitResult {
        self.op(Op::Binary(b), &[x, y])
    }

    pub fn add(&mut self, x: Value, y: Value) -> EmitResult {
        self.binary(BinaryOp::Add, x, y)
    }

    pub fn sub(&mut self, x: Value, y: Value) -> EmitResult {
        self.binary(BinaryOp::Sub, x, y)
    }

    pub fn mul(&mut self, x: Value, y: Value) -> EmitResult {
        self.binary(BinaryOp::Mul, x, y)
    }

    pub fn div(&mut self, x: Value, y: Value) -> EmitResult {
        self.binary(BinaryOp::Div, x, y)
    }

    pub fn neg(&mut self, x: Value) -> EmitResult {
        self.unary(UnaryOp::Neg, x)
    }

    /// `x * c` for a scalar c.
    pub fn scale(&mut self, x: Value, c: f64) -> EmitResult {
        let k = self.konst(c, x)?;
        self.mul(x, k)
    }

    pub fn compare(&mut self, c: CmpOp, x: Value, y: Value) -> EmitResult {
        self.op(Op::Compare(c), &[x, y])
    }

    pub fn select(&mut self, c: Value, x: Value, y: Value) -> EmitResult {
        self.op(Op::Select, &[c, x, y])
    }

    pub fn cast(&mut self, x: Value, to: DType) -> EmitResult {
        if self.ty(x).dtype == to {
            return Ok(x);
        }
        self.op(Op::Cast { to }, &[x])
    }

    pub fn reshape(&mut self, x: Value, shape: &[usize]) -> EmitResult {
        if self.ty(x).shape == shape {
            return Ok(x);
        }
        self.op(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    pub fn broadcast(&mut self, x: Value, shape: &[usize]) -> EmitResult {
        if self.ty(x).shape == shape {
            return Ok(x);
        }
        self.op(
            Op::Broadcast {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    /// Sum over `axes`, keeping them with size 1; no node when `axes` is empty.
    pub fn sum_keep(&mut self, x: Value, axes: &[usize]) -> EmitResult {
        if axes.is_empty() {
            return Ok(x);
        }
        self.op(
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes: axes.to_vec(),
            },
            &[x],
        )
    }

    /// The sum of all elements as a 0-d tensor.
    pub fn sum_all(&mut self, x: Value) -> EmitResult {
        let axes: Vec<usize> = (0..self.ty(x).rank()).collect();
        let s = self.sum_keep(x, &axes)?;
        self.reshape(s, &[])
    }

    pub fn permute(&mut self, x: Value, perm: &[usize]) -> EmitResult {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.op(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    /// Swaps the last two axes.
    pub fn transpose_last(&mut self, x: Value) -> EmitResult {
        let r = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permute(x, &perm)
    }
}
