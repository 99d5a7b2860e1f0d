//! Data movement and routing: gather, scatter-add, padding, concatenation, iota, prefix sums,
//! top-k and argsort, as loop kernels with the interpreter's semantics bit for bit.
//!
//! Indices read from data (gather and scatter indices) go through checked accesses: an index
//! outside its axis makes the kernel's access out of range on purpose ([`guard`]), so the
//! kernel stops with an error where the interpreter reports one. A scatter-add is partitioned
//! by destination (one item per block of columns, looping over every source in order), which
//! keeps the interpreter's summation order; float sums run in f64 and are rounded once.

use super::{launch_name, Arg, Launch, Lowered};
use crate::kernel::{supported_dtype, KernelError};
use crate::loops::{cst, idx, load, load_checked, select, Expr, LoopBuilder, LoopKernel};
use mmc_ir::{BinaryOp, CmpOp, DType, Graph, Node, Op, UnaryOp};

/// About this many elements of work per tile.
const TILE_WORK: usize = 4096;

/// Columns of a scatter-add's block: one item updates this many adjacent columns, so its
/// loads and stores touch whole cache lines.
const SCATTER_BLOCK: usize = 64;

/// The lowering of `node` if it is one of this module's ops.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    Some(match &node.op {
        Op::Gather { axis } => gather(g, node, name, *axis),
        Op::ScatterAdd { axis } => scatter_add(g, node, name, *axis),
        Op::Pad { low, high: _ } => pad(g, node, name, low),
        Op::Concat { axis } => concat(g, node, name, *axis),
        Op::Iota { axis, .. } => iota(g, node, name, *axis),
        Op::CumSum { axis } => cumsum(g, node, name, *axis),
        Op::TopK { k } => sort(g, node, name, *k, true),
        Op::ArgSort { descending } => {
            let n = g.ty(node.inputs[0]).shape.last().copied().unwrap_or(1);
            sort(g, node, name, n, *descending)
        }
        _ => return None,
    })
}

/// `dtype` if kernels handle it, else the op's dtype error.
pub(super) fn supported(node: &Node, dtype: DType) -> Result<DType, KernelError> {
    if supported_dtype(dtype) {
        Ok(dtype)
    } else {
        Err(KernelError::Dtype {
            op: node.op.name(),
            dtype,
        })
    }
}

/// The finished kernel (a type error is a bug in the description).
pub(super) fn finish(k: LoopBuilder) -> Result<LoopKernel, KernelError> {
    k.finish().map_err(|e| KernelError::Invalid(e.to_string()))
}

/// Items per tile when each item does `work` elements of work.
pub(super) fn items_per_tile(work: usize) -> usize {
    (TILE_WORK / work.max(1)).max(1)
}

/// `0 <= i < n` for an i64 `i`.
pub(super) fn in_range(i: Expr, n: usize) -> Expr {
    and(i.clone().ge(idx(0)), i.lt(idx(n)))
}

/// `index` where `ok` holds, else -1: used as a checked access's index, an index that fails
/// its axis's bounds stops the kernel even where the flat index would land inside the buffer.
pub(super) fn guard(ok: Expr, index: Expr) -> Expr {
    select(ok, index, cst(-1.0, DType::I64))
}

pub(super) fn and(a: Expr, b: Expr) -> Expr {
    a.binary(BinaryOp::And, b)
}

pub(super) fn or(a: Expr, b: Expr) -> Expr {
    a.binary(BinaryOp::Or, b)
}

fn not(a: Expr) -> Expr {
    a.unary(UnaryOp::Not)
}

/// Sizes before, at and after `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// A positive constant divisor (an empty dimension gives no items, so any value serves).
fn div(n: usize) -> Expr {
    idx(n.max(1))
}

/// `out[c] = x[c with c[axis] = idx[c]]`: one item per result element.
fn gather(g: &Graph, node: &Node, name: &str, axis: usize) -> Result<Lowered, KernelError> {
    let (x, ix) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let d = supported(node, x.dtype)?;
    let id = supported(node, ix.dtype)?;
    let (_, di, inner) = split(&ix.shape, axis);
    let dx = x.shape[axis];
    let mut k = LoopBuilder::new(launch_name(name, 0), ix.numel(), TILE_WORK);
    let (bx, bi) = (k.read(d, &x.shape), k.read(id, &ix.shape));
    let by = k.write(d, &ix.shape);
    let o = k.item();
    let outer = k.var(DType::I64, o.clone().idiv(div(di * inner)));
    let col = k.var(DType::I64, o.clone().irem(div(inner)));
    let i = k.var(DType::I64, load(bi, o.clone()).cast(DType::I64));
    let at = (outer.val() * idx(dx) + i.val()) * idx(inner) + col.val();
    k.store(by, o, load_checked(bx, guard(in_range(i.val(), dx), at)));
    Ok(Lowered::single(g, node, finish(k)?.into()))
}

/// `out = x; out[c with c[axis] = idx[c]] += src[c]`, partitioned by destination: an item is
/// a block of columns (the coordinates off `axis`) and adds every source of its columns in
/// index order, as the interpreter does. Floats accumulate in f64 (in a scratch copy for
/// f32) and are rounded once; integers wrap.
fn scatter_add(g: &Graph, node: &Node, name: &str, axis: usize) -> Result<Lowered, KernelError> {
    let (x, ix) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let d = supported(node, x.dtype)?;
    let id = supported(node, ix.dtype)?;
    let (outer, dx, inner) = split(&x.shape, axis);
    let di = ix.shape[axis];
    let block = inner.clamp(1, SCATTER_BLOCK);
    let blocks = inner.div_ceil(block);
    let work = block * (dx + di);
    let mut k = LoopBuilder::new(launch_name(name, 0), outer * blocks, items_per_tile(work));
    let (bx, bi, bs) = (
        k.read(d, &x.shape),
        k.read(id, &ix.shape),
        k.read(d, &ix.shape),
    );
    let by = k.write(d, &x.shape);
    // f32 sums go through an f64 copy of the result; others accumulate in place.
    let (acc, ad) = if d == DType::F32 {
        (k.write(DType::F64, &x.shape), DType::F64)
    } else {
        (by, d)
    };
    let item = k.item();
    let o = k.var(DType::I64, item.clone().idiv(div(blocks)));
    let c0 = k.var(DType::I64, item.irem(div(blocks)) * idx(block));
    let c1 = k.var(DType::I64, (c0.val() + idx(block)).min(idx(inner)));
    let dst = move |j: Expr, c: Expr| (o.val() * idx(dx) + j) * idx(inner) + c;
    k.for_(idx(0), idx(dx), |k, j| {
        k.for_(c0.val(), c1.val(), |k, c| {
            let at = dst(j.clone(), c);
            k.store(acc, at.clone(), load(bx, at).cast(ad));
        });
    });
    k.for_(idx(0), idx(di), |k, s| {
        k.for_(c0.val(), c1.val(), |k, c| {
            let from = (o.val() * idx(di) + s.clone()) * idx(inner) + c.clone();
            let i = k.var(DType::I64, load(bi, from.clone()).cast(DType::I64));
            let at = k.var(DType::I64, guard(in_range(i.val(), dx), dst(i.val(), c)));
            let sum = load_checked(acc, at.val()) + load(bs, from).cast(ad);
            k.store_checked(acc, at.val(), sum);
        });
    });
    if acc != by {
        k.for_(idx(0), idx(dx), |k, j| {
            k.for_(c0.val(), c1.val(), |k, c| {
                let at = dst(j.clone(), c);
                k.store(by, at.clone(), load(acc, at).cast(d));
            });
        });
    }
    let kernel = finish(k)?;
    let args = if acc != by {
        vec![
            Arg::Input(0),
            Arg::Input(1),
            Arg::Input(2),
            Arg::Output(0),
            Arg::Scratch(0),
        ]
    } else {
        vec![Arg::Input(0), Arg::Input(1), Arg::Input(2), Arg::Output(0)]
    };
    let scratch = if acc != by {
        vec![kernel.buffers[acc].clone()]
    } else {
        Vec::new()
    };
    Ok(Lowered {
        launches: vec![Launch {
            kernel: kernel.into(),
            args,
        }],
        scratch,
    })
}

/// Zero padding: one item per row of the result's last axis, which is either all padding or
/// padding, a copied row of `x`, padding.
fn pad(g: &Graph, node: &Node, name: &str, low: &[usize]) -> Result<Lowered, KernelError> {
    let (x, y) = (g.ty(node.inputs[0]), g.ty(node.outputs[0]));
    let d = supported(node, x.dtype)?;
    // A scalar pads to itself: one row of one element.
    let (xs, ys, low) = if x.rank() == 0 {
        (vec![1], vec![1], vec![0])
    } else {
        (x.shape.to_vec(), y.shape.to_vec(), low.to_vec())
    };
    let r = ys.len();
    let (xn, yn) = (xs[r - 1], ys[r - 1]);
    let rows: usize = ys[..r - 1].iter().product();
    let xstride = crate::kernel::row_major_strides(&xs);
    let mut k = LoopBuilder::new(launch_name(name, 0), rows, items_per_tile(yn));
    let bx = k.read(d, &x.shape);
    let by = k.write(d, &y.shape);
    let row = k.item();
    let mut inside = cst(1.0, DType::Bool);
    let mut src = idx(0);
    // Coordinate `a` of the row: (row / product of the later row dimensions) % size.
    let mut later = 1;
    for a in (0..r - 1).rev() {
        let c = k.var(DType::I64, row.clone().idiv(idx(later)).irem(div(ys[a])));
        inside = and(
            inside,
            and(c.val().ge(idx(low[a])), c.val().lt(idx(low[a] + xs[a]))),
        );
        src = src + (c.val() - idx(low[a])) * idx(xstride[a]);
        later *= ys[a];
    }
    let base = row * idx(yn);
    let zero = cst(0.0, d);
    k.if_else(
        inside,
        |k| {
            k.for_(idx(0), idx(low[r - 1]), |k, j| {
                k.store(by, base.clone() + j, zero.clone());
            });
            k.for_(idx(0), idx(xn), |k, j| {
                let to = base.clone() + idx(low[r - 1]) + j.clone();
                k.store(by, to, load(bx, src.clone() + j));
            });
            k.for_(idx(low[r - 1] + xn), idx(yn), |k, j| {
                k.store(by, base.clone() + j, zero.clone());
            });
        },
        |k| {
            k.for_(idx(0), idx(yn), |k, j| {
                k.store(by, base.clone() + j, zero.clone());
            });
        },
    );
    Ok(Lowered::single(g, node, finish(k)?.into()))
}

/// Concatenation: one launch per (non-empty) operand, copying it into its slab of the
/// result, one item per element.
fn concat(g: &Graph, node: &Node, name: &str, axis: usize) -> Result<Lowered, KernelError> {
    let y = g.ty(node.outputs[0]);
    let d = supported(node, y.dtype)?;
    let (_, dy, inner) = split(&y.shape, axis);
    let mut launches = Vec::new();
    let mut at = 0;
    for (i, &v) in node.inputs.iter().enumerate() {
        let x = g.ty(v);
        let (_, dx, _) = split(&x.shape, axis);
        let slab = dx * inner;
        if x.numel() > 0 {
            let mut k = LoopBuilder::new(launch_name(name, launches.len()), x.numel(), TILE_WORK);
            let bx = k.read(d, &x.shape);
            let by = k.write(d, &y.shape);
            let o = k.item();
            let to = o.clone().idiv(idx(slab)) * idx(dy * inner)
                + idx(at * inner)
                + o.clone().irem(idx(slab));
            k.store(by, to, load(bx, o));
            launches.push(Launch {
                kernel: finish(k)?.into(),
                args: vec![Arg::Input(i), Arg::Output(0)],
            });
        }
        at += dx;
    }
    Ok(Lowered {
        launches,
        scratch: Vec::new(),
    })
}

/// Each element is its coordinate along `axis`.
fn iota(g: &Graph, node: &Node, name: &str, axis: usize) -> Result<Lowered, KernelError> {
    let y = g.ty(node.outputs[0]);
    let d = supported(node, y.dtype)?;
    let (_, dim, inner) = split(&y.shape, axis);
    let mut k = LoopBuilder::new(launch_name(name, 0), y.numel(), TILE_WORK);
    let by = k.write(d, &y.shape);
    let o = k.item();
    k.store(by, o.clone(), o.idiv(div(inner)).irem(div(dim)).cast(d));
    Ok(Lowered::single(g, node, finish(k)?.into()))
}

/// Inclusive prefix sums along `axis`: one item per column, floats summed in f64 from the
/// first element (as the interpreter does, so a leading -0.0 stays), integers wrapping.
fn cumsum(g: &Graph, node: &Node, name: &str, axis: usize) -> Result<Lowered, KernelError> {
    let x = g.ty(node.inputs[0]);
    let d = supported(node, x.dtype)?;
    let (outer, dim, inner) = split(&x.shape, axis);
    if dim == 0 {
        return Ok(Lowered::default());
    }
    let ad = if d.is_float() { DType::F64 } else { d };
    let mut k = LoopBuilder::new(launch_name(name, 0), outer * inner, items_per_tile(dim));
    let bx = k.read(d, &x.shape);
    let by = k.write(d, &x.shape);
    let item = k.item();
    let base = k.var(
        DType::I64,
        item.clone().idiv(div(inner)) * idx(dim * inner) + item.irem(div(inner)),
    );
    let acc = k.var(ad, load(bx, base.val()).cast(ad));
    k.store(by, base.val(), acc.val().cast(d));
    k.for_(idx(1), idx(dim), |k, j| {
        let at = base.val() + j * idx(inner);
        k.set(acc, acc.val() + load(bx, at.clone()).cast(ad));
        k.store(by, at, acc.val().cast(d));
    });
    Ok(Lowered::single(g, node, finish(k)?.into()))
}

/// Whether `a` goes strictly before `b` in the interpreter's sort order: larger first when
/// `descending`, NaN above every number (so first when descending, last when ascending).
fn precedes(a: Expr, b: Expr, d: DType, descending: bool) -> Expr {
    let c = if descending { CmpOp::Gt } else { CmpOp::Lt };
    let ordered = a.clone().cmp(c, b.clone());
    if !d.is_float() {
        return ordered;
    }
    let nan = |v: Expr| v.clone().cmp(CmpOp::Ne, v);
    let (first, second) = if descending { (a, b) } else { (b, a) };
    or(ordered, and(nan(first), not(nan(second))))
}

/// The first `k` indices of each row's stable sort (top-k is the descending case): pass `s`
/// picks the first element of the row that comes after pass `s - 1`'s pick in the total order
/// (value, then index), so ties go to the lower index exactly as in a stable sort.
fn sort(
    g: &Graph,
    node: &Node,
    name: &str,
    k_: usize,
    descending: bool,
) -> Result<Lowered, KernelError> {
    let x = g.ty(node.inputs[0]);
    let d = supported(node, x.dtype)?;
    let n = *x.shape.last().expect("verified: rank >= 1");
    let y = g.ty(node.outputs[0]);
    let rows = x.numel() / n.max(1);
    let i64t = DType::I64;
    let mut k = LoopBuilder::new(launch_name(name, 0), rows, items_per_tile(k_ * n));
    let bx = k.read(d, &x.shape);
    let by = k.write(i64t, &y.shape);
    let base = k.item() * idx(n);
    let out = k.item() * idx(k_);
    let prev = k.var(i64t, cst(-1.0, i64t));
    let pv = k.var(d, cst(0.0, d));
    let best = k.var(i64t, cst(-1.0, i64t));
    let bv = k.var(d, cst(0.0, d));
    let xv = k.var(d, cst(0.0, d));
    k.for_(idx(0), idx(k_), |k, s| {
        k.set(best, cst(-1.0, i64t));
        k.for_(idx(0), idx(n), |k, j| {
            k.set(xv, load(bx, base.clone() + j.clone()));
            let after = or(
                s.clone().eq(idx(0)),
                or(
                    precedes(pv.val(), xv.val(), d, descending),
                    and(
                        not(precedes(xv.val(), pv.val(), d, descending)),
                        prev.val().lt(j.clone()),
                    ),
                ),
            );
            // Scanning in index order, a tie with the best so far keeps the lower index.
            let better = or(
                best.val().lt(idx(0)),
                precedes(xv.val(), bv.val(), d, descending),
            );
            k.if_(and(after, better), |k| {
                k.set(best, j);
                k.set(bv, xv.val());
            });
        });
        k.store(by, out.clone() + s, best.val());
        k.set(prev, best.val());
        k.set(pv, bv.val());
    });
    Ok(Lowered::single(g, node, finish(k)?.into()))
}
