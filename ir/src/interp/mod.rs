//! The reference interpreter: a plain implementation of every op, the oracle for every pass
//! and every generated kernel.
//!
//! Floats are computed in f64. With [`Precision::Declared`] each op's result is rounded to its
//! declared dtype (f32, bf16, f16), so an f32 graph behaves like an f32 program whose every op
//! is exactly rounded; with [`Precision::F64`] nothing is rounded, which is what finite-difference
//! gradient checks need.

mod fused;
mod kernels;
mod planned;
mod program;

use crate::graph::Graph;
use crate::op::{BinaryOp, CmpOp, Op, ReduceKind, UnaryOp};
use crate::tensor::{Tensor, TensorData};
use crate::verify::{verify, VerifyError};
use crate::{DType, Shape, TensorType};
use half::f16;
use kernels::{strides, view_buf, Buf};
use std::collections::{BTreeMap, HashMap};

pub use planned::{Arena, Stream};

/// How the interpreter treats floating-point dtypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Round every float result to its declared dtype.
    #[default]
    Declared,
    /// Keep every float in f64, whatever its declared dtype.
    F64,
}

/// Where the interpreter finds the tensors bound to parameters and inputs.
pub trait Bindings {
    fn lookup(&self, name: &str) -> Option<&Tensor>;
}

impl Bindings for HashMap<String, Tensor> {
    fn lookup(&self, name: &str) -> Option<&Tensor> {
        self.get(name)
    }
}

impl Bindings for BTreeMap<String, Tensor> {
    fn lookup(&self, name: &str) -> Option<&Tensor> {
        self.get(name)
    }
}

/// Looks a name up in each binding set in turn (for example weights, then batch data).
impl Bindings for [&dyn Bindings] {
    fn lookup(&self, name: &str) -> Option<&Tensor> {
        self.iter().find_map(|b| b.lookup(name))
    }
}

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error(transparent)]
    Malformed(#[from] VerifyError),
    #[error("nothing is bound to {kind} \"{name}\"")]
    Unbound { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" is declared {expected}, but the bound tensor is {got}")]
    Mismatch {
        kind: &'static str,
        name: String,
        expected: TensorType,
        got: TensorType,
    },
    #[error("memory layout: {0}")]
    Layout(#[from] crate::arena::LayoutError),
    #[error("node {node} (`{op}`): {message}")]
    Op {
        node: usize,
        op: &'static str,
        message: String,
    },
}

/// The named results of a run, in the graph's output order.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs(pub Vec<(String, Tensor)>);

impl Outputs {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// A value inside the interpreter.
#[derive(Clone, Debug)]
pub(crate) struct Val {
    ty: TensorType,
    buf: Buf,
}

impl Val {
    fn f(&self) -> &[f64] {
        match &self.buf {
            Buf::F(v) => v,
            Buf::I(_) => unreachable!("the verifier guarantees a float operand"),
        }
    }

    fn i(&self) -> &[i64] {
        match &self.buf {
            Buf::I(v) => v,
            Buf::F(_) => unreachable!("the verifier guarantees an integer operand"),
        }
    }
}

/// Runs verified graphs.
pub struct Interpreter<'g> {
    graph: &'g Graph,
    precision: Precision,
    last_use: Vec<Option<usize>>,
    /// The arena layout [`Interpreter::run_in`] keeps values at, if any.
    layout: Option<&'g crate::arena::ArenaLayout>,
}

impl<'g> Interpreter<'g> {
    /// Verifies `graph` and prepares to run it.
    pub fn new(graph: &'g Graph, precision: Precision) -> Result<Self, InterpError> {
        verify(graph)?;
        Ok(Self::for_verified(graph, precision))
    }

    /// Prepares to run a graph the caller has already verified (a runtime replaying the same
    /// program every step verifies it once, when it loads it).
    pub fn for_verified(graph: &'g Graph, precision: Precision) -> Self {
        let mut last_use = graph.last_uses();
        for (_, v) in graph.outputs() {
            last_use[v.0 as usize] = Some(usize::MAX);
        }
        Interpreter {
            graph,
            precision,
            last_use,
            layout: None,
        }
    }

    /// Runs the graph once and returns its outputs.
    pub fn run<B: Bindings + ?Sized>(&self, bindings: &B) -> Result<Outputs, InterpError> {
        let mut vals: Vec<Option<Val>> = vec![None; self.graph.num_values()];
        for (i, node) in self.graph.nodes().iter().enumerate() {
            let out = node.outputs[0];
            let out_ty = self.graph.ty(out);
            // A value read for the last time by a reshape or an elementwise op is updated in
            // place instead of copied: the same results, without a fresh buffer per op.
            if let Some(val) = self.reuse(node, i, &mut vals, out_ty) {
                vals[out.0 as usize] = Some(val);
                self.free_dead(node, i, &mut vals);
                continue;
            }
            let args: Vec<&Val> = node
                .inputs
                .iter()
                .map(|v| {
                    vals[v.0 as usize]
                        .as_ref()
                        .expect("verified: defined before use")
                })
                .collect();
            if let Op::Fused(f) = &node.op {
                let tys: Vec<&TensorType> =
                    node.outputs.iter().map(|&v| self.graph.ty(v)).collect();
                let bufs = self.eval_fused(f, &args, &tys).map_err(|e| match e {
                    EvalError::Msg(message) => InterpError::Op {
                        node: i,
                        op: node.op.name(),
                        message,
                    },
                    EvalError::Binding(b) => b,
                })?;
                drop(args);
                for ((&v, ty), buf) in node.outputs.iter().zip(tys).zip(bufs) {
                    vals[v.0 as usize] = Some(self.make(ty, buf));
                }
                self.free_dead(node, i, &mut vals);
                continue;
            }
            let result =
                self.eval(&node.op, &args, out_ty, &Dyn(bindings))
                    .map_err(|e| match e {
                        EvalError::Msg(message) => InterpError::Op {
                            node: i,
                            op: node.op.name(),
                            message,
                        },
                        EvalError::Binding(b) => b,
                    })?;
            drop(args);
            vals[out.0 as usize] = Some(result);
            self.free_dead(node, i, &mut vals);
        }
        let mut outs = Vec::new();
        for (name, v) in self.graph.outputs() {
            let val = vals[v.0 as usize].as_ref().expect("outputs are kept alive");
            outs.push((name.clone(), self.to_tensor(val)));
        }
        Ok(Outputs(outs))
    }

    /// Drops the operands of node `i` that no later node reads.
    fn free_dead(&self, node: &crate::graph::Node, i: usize, vals: &mut [Option<Val>]) {
        for v in &node.inputs {
            if self.last_use[v.0 as usize] == Some(i) {
                vals[v.0 as usize] = None;
            }
        }
    }

    /// Computes node `i` in the buffer of its first operand when that operand dies here and the
    /// op is a reshape or a float elementwise op; `None` when the general path must run.
    fn reuse(
        &self,
        node: &crate::graph::Node,
        i: usize,
        vals: &mut [Option<Val>],
        out_ty: &TensorType,
    ) -> Option<Val> {
        let x = *node.inputs.first()?;
        let dies =
            self.last_use[x.0 as usize] == Some(i) && node.inputs[1..].iter().all(|&v| v != x);
        if !dies {
            return None;
        }
        let float_in_out = |v: &Val| matches!(v.buf, Buf::F(_)) && out_ty.dtype.is_float();
        match &node.op {
            Op::Reshape { .. } => {
                let mut val = vals[x.0 as usize].take()?;
                val.ty = out_ty.clone();
                Some(val)
            }
            Op::Unary(u) if *u != UnaryOp::Not && float_in_out(vals[x.0 as usize].as_ref()?) => {
                let mut val = vals[x.0 as usize].take()?;
                let f = unary_f(*u);
                if let Buf::F(b) = &mut val.buf {
                    b.iter_mut().for_each(|e| *e = f(*e));
                }
                Some(self.make(out_ty, val.buf))
            }
            Op::Binary(b) if !matches!(b, BinaryOp::And | BinaryOp::Or) => {
                let y = node.inputs[1];
                let yv = vals[y.0 as usize].as_ref()?;
                if !matches!(yv.buf, Buf::F(_)) || !float_in_out(vals[x.0 as usize].as_ref()?) {
                    return None;
                }
                let mut val = vals[x.0 as usize].take()?;
                let f = binary_f(*b);
                if let (
                    Buf::F(dst),
                    Some(Val {
                        buf: Buf::F(src), ..
                    }),
                ) = (&mut val.buf, vals[y.0 as usize].as_ref())
                {
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f(*d, s));
                }
                Some(self.make(out_ty, val.buf))
            }
            _ => None,
        }
    }

    fn round(&self, dtype: DType, mut v: Vec<f64>) -> Vec<f64> {
        self.round_slice(dtype, &mut v);
        v
    }

    /// Rounds floats in place to `dtype` (nothing under [`Precision::F64`]).
    fn round_slice(&self, dtype: DType, v: &mut [f64]) {
        if self.precision == Precision::F64 {
            return;
        }
        match dtype {
            DType::F32 => v.iter_mut().for_each(|x| *x = *x as f32 as f64),
            DType::BF16 => v
                .iter_mut()
                .for_each(|x| *x = crate::tensor::round_bf16(*x)),
            DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f64(*x).to_f64()),
            _ => {}
        }
    }

    fn wrap_int(dtype: DType, mut v: Vec<i64>) -> Vec<i64> {
        match dtype {
            DType::I32 => v.iter_mut().for_each(|x| *x = *x as i32 as i64),
            DType::Bool => v.iter_mut().for_each(|x| *x = (*x != 0) as i64),
            _ => {}
        }
        v
    }

    /// A result buffer of type `ty`, rounded or wrapped to it.
    fn make(&self, ty: &TensorType, buf: Buf) -> Val {
        let buf = match buf {
            Buf::F(v) if ty.dtype.is_float() => Buf::F(self.round(ty.dtype, v)),
            Buf::I(v) if !ty.dtype.is_float() => Buf::I(Self::wrap_int(ty.dtype, v)),
            Buf::F(v) => Buf::I(Self::wrap_int(
                ty.dtype,
                v.iter().map(|&x| x as i64).collect(),
            )),
            Buf::I(v) => Buf::F(self.round(ty.dtype, v.iter().map(|&x| x as f64).collect())),
        };
        Val {
            ty: ty.clone(),
            buf,
        }
    }

    fn load_tensor(&self, t: &Tensor, ty: &TensorType) -> Val {
        let buf = match t.data() {
            TensorData::I64(v) => Buf::I(v.clone()),
            TensorData::I32(v) => Buf::I(v.iter().map(|&x| x as i64).collect()),
            TensorData::Bool(v) => Buf::I(v.iter().map(|&x| x as i64).collect()),
            _ => Buf::F(t.to_f64_vec()),
        };
        self.make(ty, buf)
    }

    fn to_tensor(&self, v: &Val) -> Tensor {
        let dtype = match (self.precision, v.ty.dtype.is_float()) {
            (Precision::F64, true) => DType::F64,
            _ => v.ty.dtype,
        };
        let data = match (&v.buf, dtype) {
            (Buf::I(x), DType::I64) => TensorData::I64(x.clone()),
            (Buf::I(x), DType::I32) => TensorData::I32(x.iter().map(|&e| e as i32).collect()),
            (Buf::I(x), _) => TensorData::Bool(x.iter().map(|&e| e != 0).collect()),
            (Buf::F(x), _) => {
                return Tensor::from_f64(dtype, v.ty.shape.clone(), x).expect("sizes agree")
            }
        };
        Tensor::new(v.ty.shape.clone(), data).expect("sizes agree")
    }

    fn bind(
        &self,
        kind: &'static str,
        name: &str,
        ty: &TensorType,
        bindings: &dyn Bindings,
    ) -> Result<Val, EvalError> {
        let t = bindings.lookup(name).ok_or_else(|| {
            EvalError::Binding(InterpError::Unbound {
                kind,
                name: name.to_string(),
            })
        })?;
        let dtype_ok = t.dtype() == ty.dtype
            || (self.precision == Precision::F64 && ty.dtype.is_float() && t.dtype() == DType::F64);
        if !dtype_ok || t.shape() != ty.shape.as_slice() {
            return Err(EvalError::Binding(InterpError::Mismatch {
                kind,
                name: name.to_string(),
                expected: ty.clone(),
                got: t.ty(),
            }));
        }
        Ok(self.load_tensor(t, ty))
    }

    fn eval(
        &self,
        op: &Op,
        a: &[&Val],
        ty: &TensorType,
        bindings: &dyn Bindings,
    ) -> Result<Val, EvalError> {
        let float = |v: Vec<f64>| Ok(self.make(ty, Buf::F(v)));
        let int = |v: Vec<i64>| Ok(self.make(ty, Buf::I(v)));
        match op {
            Op::Param { name, ty } => self.bind("parameter", name, ty, bindings),
            Op::Input { name, ty } => self.bind("input", name, ty, bindings),
            Op::Const { value, .. } => {
                let n = ty.numel();
                if ty.dtype.is_float() {
                    float(vec![*value; n])
                } else {
                    int(vec![*value as i64; n])
                }
            }
            Op::Iota { axis, .. } => {
                let inner: usize = ty.shape[axis + 1..].iter().product();
                let dim = ty.shape[*axis];
                let v: Vec<i64> = (0..ty.numel())
                    .map(|k| ((k / inner) % dim) as i64)
                    .collect();
                int(v)
            }
            Op::Unary(u) => match &a[0].buf {
                Buf::F(x) => {
                    let f = unary_f(*u);
                    float(x.iter().map(|&x| f(x)).collect())
                }
                Buf::I(x) => {
                    let f: fn(i64) -> i64 = match u {
                        UnaryOp::Neg => i64::wrapping_neg,
                        UnaryOp::Abs => i64::wrapping_abs,
                        UnaryOp::Not => |x| (x == 0) as i64,
                        _ => unreachable!("verified: float-only op"),
                    };
                    int(x.iter().map(|&x| f(x)).collect())
                }
            },
            Op::Binary(b) => match (&a[0].buf, &a[1].buf) {
                (Buf::F(x), Buf::F(y)) => {
                    let f = binary_f(*b);
                    float(x.iter().zip(y).map(|(&x, &y)| f(x, y)).collect())
                }
                (Buf::I(x), Buf::I(y)) => {
                    let f: fn(i64, i64) -> i64 = match b {
                        BinaryOp::Add => i64::wrapping_add,
                        BinaryOp::Sub => i64::wrapping_sub,
                        BinaryOp::Mul => i64::wrapping_mul,
                        BinaryOp::Max => i64::max,
                        BinaryOp::Min => i64::min,
                        BinaryOp::And => |x, y| (x != 0 && y != 0) as i64,
                        BinaryOp::Or => |x, y| (x != 0 || y != 0) as i64,
                        BinaryOp::Div | BinaryOp::Pow => unreachable!("verified: float-only op"),
                    };
                    int(x.iter().zip(y).map(|(&x, &y)| f(x, y)).collect())
                }
                _ => unreachable!("verified: operands of one dtype"),
            },
            Op::Compare(c) => {
                let cmp = |o: Option<std::cmp::Ordering>| -> i64 {
                    use std::cmp::Ordering::*;
                    (match c {
                        CmpOp::Eq => o == Some(Equal),
                        CmpOp::Ne => o != Some(Equal),
                        CmpOp::Lt => o == Some(Less),
                        CmpOp::Le => matches!(o, Some(Less | Equal)),
                        CmpOp::Gt => o == Some(Greater),
                        CmpOp::Ge => matches!(o, Some(Greater | Equal)),
                    }) as i64
                };
                let v = match (&a[0].buf, &a[1].buf) {
                    (Buf::F(x), Buf::F(y)) => x
                        .iter()
                        .zip(y)
                        .map(|(x, y)| cmp(x.partial_cmp(y)))
                        .collect(),
                    (Buf::I(x), Buf::I(y)) => {
                        x.iter().zip(y).map(|(x, y)| cmp(Some(x.cmp(y)))).collect()
                    }
                    _ => unreachable!("verified: operands of one dtype"),
                };
                int(v)
            }
            Op::Select => {
                let c = a[0].i();
                match (&a[1].buf, &a[2].buf) {
                    (Buf::F(x), Buf::F(y)) => float(
                        c.iter()
                            .zip(x.iter().zip(y))
                            .map(|(&c, (&x, &y))| if c != 0 { x } else { y })
                            .collect(),
                    ),
                    (Buf::I(x), Buf::I(y)) => int(c
                        .iter()
                        .zip(x.iter().zip(y))
                        .map(|(&c, (&x, &y))| if c != 0 { x } else { y })
                        .collect()),
                    _ => unreachable!("verified: operands of one dtype"),
                }
            }
            Op::Cast { to } => Ok(match (&a[0].buf, to.is_float()) {
                (Buf::F(x), false) if *to == DType::Bool => {
                    self.make(ty, Buf::I(x.iter().map(|&x| (x != 0.0) as i64).collect()))
                }
                (buf, _) => self.make(ty, buf.clone()),
            }),
            Op::Reduce { kind, .. } => {
                let (ishape, oshape) = (&a[0].ty.shape, &ty.shape);
                match (&a[0].buf, kind) {
                    (Buf::F(x), ReduceKind::Sum) => {
                        float(kernels::reduce(x, ishape, oshape, 0.0, |p, q| p + q))
                    }
                    (Buf::F(x), ReduceKind::Max) => float(kernels::reduce(
                        x,
                        ishape,
                        oshape,
                        f64::NEG_INFINITY,
                        nan_max,
                    )),
                    (Buf::I(x), ReduceKind::Sum) => {
                        int(kernels::reduce(x, ishape, oshape, 0, i64::wrapping_add))
                    }
                    (Buf::I(x), ReduceKind::Max) => {
                        int(kernels::reduce(x, ishape, oshape, i64::MIN, i64::max))
                    }
                }
            }
            Op::Broadcast { shape } => {
                let src = &a[0].ty.shape;
                let s = strides(src);
                let bs: Vec<usize> = (0..shape.len())
                    .map(|i| if src[i] == 1 { 0 } else { s[i] })
                    .collect();
                Ok(self.make(ty, view_buf(&a[0].buf, shape, &bs, 0)))
            }
            Op::Reshape { .. } => Ok(self.make(ty, a[0].buf.clone())),
            Op::Permute { perm } => {
                let s = strides(&a[0].ty.shape);
                let ps: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
                Ok(self.make(ty, view_buf(&a[0].buf, &ty.shape, &ps, 0)))
            }
            Op::Slice { start, .. } => {
                let s = strides(&a[0].ty.shape);
                let base: usize = start.iter().zip(&s).map(|(a, b)| a * b).sum();
                Ok(self.make(ty, view_buf(&a[0].buf, &ty.shape, &s, base)))
            }
            Op::Pad { low, .. } => {
                let os = strides(&ty.shape);
                let base: usize = low.iter().zip(&os).map(|(a, b)| a * b).sum();
                let shape = &a[0].ty.shape;
                Ok(match &a[0].buf {
                    Buf::F(x) => {
                        let mut out = vec![0.0; ty.numel()];
                        kernels::write_view(&mut out, x, shape, &os, base);
                        self.make(ty, Buf::F(out))
                    }
                    Buf::I(x) => {
                        let mut out = vec![0; ty.numel()];
                        kernels::write_view(&mut out, x, shape, &os, base);
                        self.make(ty, Buf::I(out))
                    }
                })
            }
            Op::Concat { axis } => {
                let os = strides(&ty.shape);
                let mut at = 0;
                let mut fout = vec![0.0; if ty.dtype.is_float() { ty.numel() } else { 0 }];
                let mut iout = vec![0; if ty.dtype.is_float() { 0 } else { ty.numel() }];
                for v in a {
                    let base = at * os[*axis];
                    match &v.buf {
                        Buf::F(x) => kernels::write_view(&mut fout, x, &v.ty.shape, &os, base),
                        Buf::I(x) => kernels::write_view(&mut iout, x, &v.ty.shape, &os, base),
                    }
                    at += v.ty.shape[*axis];
                }
                Ok(if ty.dtype.is_float() {
                    self.make(ty, Buf::F(fout))
                } else {
                    self.make(ty, Buf::I(iout))
                })
            }
            Op::MatMul => {
                let (x, y) = (&a[0].ty.shape, &a[1].ty.shape);
                let r = x.len();
                let batch: usize = x[..r - 2].iter().product();
                float(kernels::matmul(
                    a[0].f(),
                    a[1].f(),
                    batch,
                    x[r - 2],
                    x[r - 1],
                    y[r - 1],
                ))
            }
            Op::Gather { axis } => {
                let offs = index_offsets(&a[0].ty.shape, &a[1].ty.shape, a[1].i(), *axis)?;
                Ok(match &a[0].buf {
                    Buf::F(x) => self.make(ty, Buf::F(offs.iter().map(|&o| x[o]).collect())),
                    Buf::I(x) => self.make(ty, Buf::I(offs.iter().map(|&o| x[o]).collect())),
                })
            }
            Op::ScatterAdd { axis } => {
                let offs = index_offsets(&a[0].ty.shape, &a[1].ty.shape, a[1].i(), *axis)?;
                Ok(match (&a[0].buf, &a[2].buf) {
                    (Buf::F(x), Buf::F(s)) => {
                        let mut out = x.clone();
                        offs.iter().zip(s).for_each(|(&o, &s)| out[o] += s);
                        self.make(ty, Buf::F(out))
                    }
                    (Buf::I(x), Buf::I(s)) => {
                        let mut out = x.clone();
                        offs.iter()
                            .zip(s)
                            .for_each(|(&o, &s)| out[o] = out[o].wrapping_add(s));
                        self.make(ty, Buf::I(out))
                    }
                    _ => unreachable!("verified: source has the dtype of x"),
                })
            }
            Op::TopK { k } => {
                let n = *a[0].ty.shape.last().expect("verified rank >= 1");
                let order = argsort(&a[0].buf, n, true);
                int(order
                    .chunks(n.max(1))
                    .flat_map(|row| row[..*k].to_vec())
                    .collect())
            }
            Op::ArgSort { descending } => {
                let n = *a[0].ty.shape.last().expect("verified rank >= 1");
                int(argsort(&a[0].buf, n, *descending))
            }
            Op::CumSum { axis } => {
                let shape: &Shape = &a[0].ty.shape;
                match &a[0].buf {
                    Buf::F(x) => float(kernels::cumsum(x, shape, *axis, |p, q| p + q)),
                    Buf::I(x) => int(kernels::cumsum(x, shape, *axis, i64::wrapping_add)),
                }
            }
            Op::Fused(_) => unreachable!("fused ops are evaluated by `fused::eval`"),
        }
    }
}

/// Adapts any bindings (including unsized slices) to `&dyn Bindings`.
struct Dyn<'a, B: ?Sized>(&'a B);

impl<B: Bindings + ?Sized> Bindings for Dyn<'_, B> {
    fn lookup(&self, name: &str) -> Option<&Tensor> {
        self.0.lookup(name)
    }
}

enum EvalError {
    Msg(String),
    Binding(InterpError),
}

fn index_offsets(
    x_shape: &[usize],
    idx_shape: &[usize],
    idx: &[i64],
    axis: usize,
) -> Result<Vec<usize>, EvalError> {
    kernels::index_offsets(x_shape, idx_shape, idx, axis).map_err(|(k, i)| {
        EvalError::Msg(format!(
            "index {i} (element {k}) is out of range 0..{} on axis {axis}",
            x_shape[axis]
        ))
    })
}

/// Sort order of the last axis of a buffer: floats by value with NaN largest, ints by value.
fn argsort(buf: &Buf, n: usize, descending: bool) -> Vec<i64> {
    match buf {
        Buf::F(v) => kernels::argsort_rows(v, n, descending, kernels::float_order),
        Buf::I(v) => kernels::argsort_rows(v, n, descending, i64::cmp),
    }
}

/// The float function of a unary op.
fn unary_f(u: UnaryOp) -> fn(f64) -> f64 {
    match u {
        UnaryOp::Neg => |x| -x,
        UnaryOp::Abs => f64::abs,
        UnaryOp::Exp => f64::exp,
        UnaryOp::Log => f64::ln,
        UnaryOp::Sqrt => f64::sqrt,
        UnaryOp::Rsqrt => |x| 1.0 / x.sqrt(),
        UnaryOp::Recip => |x| 1.0 / x,
        UnaryOp::Tanh => f64::tanh,
        UnaryOp::Erf => libm::erf,
        UnaryOp::Sin => f64::sin,
        UnaryOp::Cos => f64::cos,
        UnaryOp::Not => unreachable!("verified: not is bool-only"),
    }
}

/// The float function of a binary op.
fn binary_f(b: BinaryOp) -> fn(f64, f64) -> f64 {
    match b {
        BinaryOp::Add => |x, y| x + y,
        BinaryOp::Sub => |x, y| x - y,
        BinaryOp::Mul => |x, y| x * y,
        BinaryOp::Div => |x, y| x / y,
        BinaryOp::Max => nan_max,
        BinaryOp::Min => nan_min,
        BinaryOp::Pow => f64::powf,
        BinaryOp::And | BinaryOp::Or => unreachable!("verified: bool-only op"),
    }
}

/// Maximum that propagates NaN, as torch.maximum does, with +0 above -0 (IEEE 754-2019
/// `maximum`, LLVM's `llvm.maximum`), so the result never depends on operand order.
fn nan_max(x: f64, y: f64) -> f64 {
    if x.is_nan() || y.is_nan() {
        f64::NAN
    } else if x > y || (x == y && x.is_sign_positive()) {
        x
    } else {
        y
    }
}

/// Minimum that propagates NaN, as torch.minimum does, with -0 below +0 (IEEE 754-2019
/// `minimum`).
fn nan_min(x: f64, y: f64) -> f64 {
    if x.is_nan() || y.is_nan() {
        f64::NAN
    } else if x < y || (x == y && x.is_sign_negative()) {
        x
    } else {
        y
    }
}
