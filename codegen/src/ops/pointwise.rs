//! SwiGLU, GELU and RoPE, with their backward ops: elementwise work in f64, each result
//! rounded once, in the interpreter's order of operations.
//!
//! SwiGLU and GELU have one item per element (their libm calls keep them scalar); RoPE has
//! one item per row of the last axis, whose two half-row loops are contiguous and free of
//! branches, so LLVM vectorises them.

use super::norms::{finish, float, rows_per_tile};
use super::{launch_name, Arg, Launch, Lowered};
use crate::kernel::{Access, Buffer, KernelError, ELEMENTWISE_TILE};
use crate::loops::{cst, idx, load, Expr, LoopBuilder};
use mmc_ir::{DType, FusedOp, Graph, Node, Op, UnaryOp};
use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

const F64: DType = DType::F64;

/// The lowering of `node` if it is one of this module's ops.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    let Op::Fused(f) = &node.op else {
        return None;
    };
    Some(match f {
        FusedOp::SwiGlu => elementwise(g, node, name, swiglu),
        FusedOp::SwiGluGrad => elementwise(g, node, name, swiglu_grad),
        FusedOp::Gelu => elementwise(g, node, name, gelu),
        FusedOp::GeluGrad => elementwise(g, node, name, gelu_grad),
        FusedOp::Rope => rope(g, node, name, false),
        FusedOp::RopeGrad => rope(g, node, name, true),
        FusedOp::SumSquares => sum_squares(g, node, name),
        _ => return None,
    })
}

/// A kernel with one item per element over operands and results of one shape: `body` maps
/// the operands' values at the item (f64) to the results' (f64), each stored rounded once.
fn elementwise(
    g: &Graph,
    node: &Node,
    name: &str,
    body: fn(&mut LoopBuilder, &[Expr]) -> Vec<Expr>,
) -> Result<Lowered, KernelError> {
    let d = float(g, node)?;
    let shape = g.ty(node.outputs[0]).shape.to_vec();
    let numel = shape.iter().product();
    let mut k = LoopBuilder::new(launch_name(name, 0), numel, ELEMENTWISE_TILE);
    let ins: Vec<usize> = node.inputs.iter().map(|_| k.read(d, &shape)).collect();
    let outs: Vec<usize> = node.outputs.iter().map(|_| k.write(d, &shape)).collect();
    let vals: Vec<Expr> = ins
        .iter()
        .map(|&b| {
            let v = load(b, k.item()).cast(F64);
            k.var(F64, v).val()
        })
        .collect();
    let res = body(&mut k, &vals);
    debug_assert_eq!(res.len(), outs.len(), "one value per result");
    for (b, v) in outs.into_iter().zip(res) {
        let i = k.item();
        k.store(b, i, v.cast(d));
    }
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// Elements per item of the sum of squares: enough to amortise an item, few enough that a
/// parameter splits over the threads.
const SUM_BLOCK: usize = 1 << 16;

/// `fused.sum_squares`: each item sums the squares of one block in f64 into a scratch of
/// partial sums, which a last launch adds in block order and rounds once.
fn sum_squares(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    let d = float(g, node)?;
    let x = g.ty(node.inputs[0]);
    let n = x.numel();
    let blocks = n.div_ceil(SUM_BLOCK).max(1);
    let partials = Buffer {
        dtype: F64,
        shape: vec![blocks],
        access: Access::Write,
    };
    let mut k = LoopBuilder::new(launch_name(name, 0), blocks, 1);
    let bx = k.read(d, &x.shape);
    let bp = k.write(F64, &partials.shape);
    let start = k.var(DType::I64, k.item() * idx(SUM_BLOCK));
    let end = k.var(DType::I64, (start.val() + idx(SUM_BLOCK)).min(idx(n)));
    let sum = k.var(F64, cst(0.0, F64));
    k.for_(start.val(), end.val(), |k, j| {
        let v = load(bx, j).cast(F64);
        k.accumulate(sum, v.clone() * v);
    });
    let i = k.item();
    k.store(bp, i, sum.val());
    let first = Launch::kernel(finish(k)?, vec![Arg::Input(0), Arg::Scratch(0)]);

    let mut k = LoopBuilder::new(launch_name(name, 1), 1, 1);
    let bp = k.read(F64, &partials.shape);
    let by = k.write(d, &[]);
    let total = k.var(F64, cst(0.0, F64));
    k.for_(idx(0), idx(blocks), |k, b| {
        k.set(total, total.val() + load(bp, b));
    });
    k.store(by, idx(0), total.val().cast(d));
    let last = Launch::kernel(finish(k)?, vec![Arg::Scratch(0), Arg::Output(0)]);
    Ok(Lowered {
        launches: vec![first, last],
        scratch: vec![partials],
    })
}

fn one() -> Expr {
    cst(1.0, F64)
}

/// `gate / (1 + exp(-gate)) * up`.
fn swiglu(_: &mut LoopBuilder, a: &[Expr]) -> Vec<Expr> {
    let (g, u) = (a[0].clone(), a[1].clone());
    vec![g.clone() / (one() + (-g).exp()) * u]
}

/// `dgate = dy * up * s * (1 + gate * (1 - s))` with `s = 1 / (1 + exp(-gate))`, and
/// `dup = dy * gate * s`.
fn swiglu_grad(k: &mut LoopBuilder, a: &[Expr]) -> Vec<Expr> {
    let (g, u, d) = (a[0].clone(), a[1].clone(), a[2].clone());
    let s = k.var(F64, one() / (one() + (-g.clone()).exp())).val();
    vec![
        d.clone() * u * s.clone() * (one() + g.clone() * (one() - s.clone())),
        d * g * s,
    ]
}

/// The standard normal cdf of `x`, `0.5 * (1 + erf(x / sqrt 2))` (without the 0.5).
fn erf_term(x: Expr) -> Expr {
    one() + (x * cst(FRAC_1_SQRT_2, F64)).unary(UnaryOp::Erf)
}

/// `x * 0.5 * (1 + erf(x / sqrt 2))`.
fn gelu(_: &mut LoopBuilder, a: &[Expr]) -> Vec<Expr> {
    let x = a[0].clone();
    vec![x.clone() * cst(0.5, F64) * erf_term(x)]
}

/// `dy * (Phi(x) + x * phi(x))`.
fn gelu_grad(_: &mut LoopBuilder, a: &[Expr]) -> Vec<Expr> {
    let (x, d) = (a[0].clone(), a[1].clone());
    let inv_sqrt_2pi = 0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2;
    let cdf = cst(0.5, F64) * erf_term(x.clone());
    let pdf = cst(inv_sqrt_2pi, F64) * (cst(-0.5, F64) * x.clone() * x.clone()).exp();
    vec![d * (cdf + x * pdf)]
}

/// The element offset of the row of a table of shape `table` that broadcasts to row `row`
/// of a tensor of shape `shape` (same rank; the table's size is 1 or `shape`'s on each axis).
fn table_row(row: Expr, shape: &[usize], table: &[usize]) -> Expr {
    let r = shape.len() - 1;
    let mut off = idx(0);
    let (mut inner, mut tstride) = (1usize, table[r]);
    for a in (0..r).rev() {
        if table[a] != 1 && shape[a] != 1 {
            let i = row.clone().idiv(idx(inner)).irem(idx(shape[a]));
            off = off + i * idx(tstride);
        }
        inner *= shape[a];
        tstride *= table[a];
    }
    off
}

/// RoPE over the last axis, `x * cos + cat(-x2, x1) * sin` (x1, x2 the halves of x), cos and
/// sin read broadcast over their size-1 axes; with `transpose`, its adjoint (the backward,
/// applied to dy): `dy * cos + cat(dy2 * sin2, -dy1 * sin1)`.
fn rope(g: &Graph, node: &Node, name: &str, transpose: bool) -> Result<Lowered, KernelError> {
    let d = float(g, node)?;
    let shape = g.ty(node.inputs[0]).shape.to_vec();
    let (cs, ss) = (
        g.ty(node.inputs[1]).shape.to_vec(),
        g.ty(node.inputs[2]).shape.to_vec(),
    );
    let n = *shape.last().unwrap_or(&1);
    let h = n / 2;
    let rows = shape.iter().product::<usize>() / n.max(1);
    let mut k = LoopBuilder::new(launch_name(name, 0), rows, rows_per_tile(n));
    let (bx, bc, bs) = (k.read(d, &shape), k.read(d, &cs), k.read(d, &ss));
    let by = k.write(d, &shape);
    let base = k.var(DType::I64, k.item() * idx(n));
    let co = k.var(DType::I64, table_row(k.item(), &shape, &cs));
    let so = k.var(DType::I64, table_row(k.item(), &shape, &ss));
    let at = |b: usize, o: Expr, i: Expr| load(b, o + i).cast(F64);
    k.for_(idx(0), idx(h), |k, i| {
        let hi = i.clone() + idx(h);
        let x1 = at(bx, base.val(), i.clone());
        let x2 = at(bx, base.val(), hi.clone());
        let (c1, c2) = (at(bc, co.val(), i.clone()), at(bc, co.val(), hi.clone()));
        let (s1, s2) = (at(bs, so.val(), i.clone()), at(bs, so.val(), hi.clone()));
        let (y1, y2) = if transpose {
            (x1.clone() * c1 + x2.clone() * s2, x2 * c2 - x1 * s1)
        } else {
            (x1.clone() * c1 + -x2.clone() * s1, x2 * c2 + x1 * s2)
        };
        k.store(by, base.val() + i, y1.cast(d));
        k.store(by, base.val() + hi, y2.cast(d));
    });
    Ok(Lowered::single(node, finish(k)?.into()))
}
