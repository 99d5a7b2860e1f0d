//! Data movement and routing: gather, scatter-add, padding, concatenation, iota, prefix sums,
//! top-k and argsort, as loop kernels with the interpreter's semantics bit for bit.
//!
//! Indices read from data (gather and scatter indices) go through checked accesses: an index
//! outside its axis makes the kernel's access out of range on purpose ([`guard`]), so the
//! kernel stops with an error where the interpreter reports one. A scatter-add is partitioned
//! by destination (an item owns a block of columns and a chunk of destination rows and adds
//! its sources in index order, or, for an f32 result much larger than its sources, each
//! column's sources are stably sorted by destination and summed run by run), which keeps the
//! interpreter's summation order; float sums run in f64 and are rounded once.

use super::{launch_name, Arg, Launch, Lowered, Work};
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
        Op::Pad { low, .. } => pad(g, node, name, low),
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
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// `out = x; out[c with c[axis] = idx[c]] += src[c]`, partitioned by destination, each
/// destination summing its sources in index order from `x` as the interpreter does (floats in
/// f64, rounded once; integers wrapping). Two forms, by the room they need: in place (f64 and
/// integers, or f32 through an f64 copy of the result when that is no larger than the sort's
/// buffers), or, for f32 into a result much larger than the sources (an embedding's
/// gradient), a sort of each column's sources by destination and one sum per run.
fn scatter_add(g: &Graph, node: &Node, name: &str, axis: usize) -> Result<Lowered, KernelError> {
    let (x, ix) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    supported(node, x.dtype)?;
    supported(node, ix.dtype)?;
    if x.dtype == DType::F32 && x.numel() > 2 * ix.numel() {
        scatter_add_sorted(g, node, name, axis)
    } else {
        scatter_add_in_place(g, node, name, axis)
    }
}

/// The in-place form: an item is a block of columns (the coordinates off `axis`) times a
/// chunk of destination rows; it copies its part of `x`, then scans every source of its
/// columns in order and adds those that land in its chunk. f32 accumulates in an f64 copy.
fn scatter_add_in_place(
    g: &Graph,
    node: &Node,
    name: &str,
    axis: usize,
) -> Result<Lowered, KernelError> {
    let (x, ix) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let (d, id) = (x.dtype, ix.dtype);
    let (outer, dx, inner) = split(&x.shape, axis);
    let di = ix.shape[axis];
    let block = inner.clamp(1, SCATTER_BLOCK);
    let blocks = inner.div_ceil(block);
    // Rows per chunk: at least as many as the sources, so rescanning them costs no more than
    // the copy; at least one chunk, so that every index is checked.
    let rows = di.max(TILE_WORK / block).max(1);
    let chunks = dx.div_ceil(rows).max(1);
    let work = block * (rows.min(dx) + di);
    let items = outer * blocks * chunks;
    let mut k = LoopBuilder::new(launch_name(name, 0), items, items_per_tile(work));
    let (bx, bi, bs) = (
        k.read(d, &x.shape),
        k.read(id, &ix.shape),
        k.read(d, &ix.shape),
    );
    let by = k.write(d, &x.shape);
    let (acc, ad) = if d == DType::F32 {
        (k.write(DType::F64, &x.shape), DType::F64)
    } else {
        (by, d)
    };
    let item = k.item();
    let o = k.var(DType::I64, item.clone().idiv(div(blocks * chunks)));
    let part = k.var(DType::I64, item.irem(div(blocks * chunks)));
    let c0 = k.var(DType::I64, part.val().idiv(div(chunks)) * idx(block));
    let c1 = k.var(DType::I64, (c0.val() + idx(block)).min(idx(inner)));
    let j0 = k.var(DType::I64, part.val().irem(div(chunks)) * idx(rows));
    let j1 = k.var(DType::I64, (j0.val() + idx(rows)).min(idx(dx)));
    let dst = move |j: Expr, c: Expr| (o.val() * idx(dx) + j) * idx(inner) + c;
    let own = |k: &mut LoopBuilder, body: &dyn Fn(&mut LoopBuilder, Expr)| {
        k.for_(j0.val(), j1.val(), |k, j| {
            k.for_(c0.val(), c1.val(), |k, c| body(k, dst(j.clone(), c)));
        });
    };
    own(&mut k, &|k, at| {
        k.store(acc, at.clone(), load(bx, at).cast(ad))
    });
    k.for_(idx(0), idx(di), |k, s| {
        k.for_(c0.val(), c1.val(), |k, c| {
            let from = k.var(
                DType::I64,
                (o.val() * idx(di) + s.clone()) * idx(inner) + c.clone(),
            );
            let i = k.var(DType::I64, load(bi, from.val()).cast(DType::I64));
            // An index outside the axis re-reads the indices at -1: the kernel stops.
            let ok = in_range(i.val(), dx);
            k.set(i, load_checked(bi, guard(ok, from.val())).cast(DType::I64));
            k.if_(and(i.val().ge(j0.val()), i.val().lt(j1.val())), |k| {
                let at = k.var(DType::I64, dst(i.val(), c));
                let sum = load_checked(acc, at.val()) + load(bs, from.val()).cast(ad);
                k.store_checked(acc, at.val(), sum);
            });
        });
    });
    if acc != by {
        own(&mut k, &|k, at| {
            k.store(by, at.clone(), load(acc, at).cast(d))
        });
    }
    let kernel = finish(k)?;
    let mut args = vec![Arg::Input(0), Arg::Input(1), Arg::Input(2), Arg::Output(0)];
    let mut scratch = Vec::new();
    if acc != by {
        args.push(Arg::Scratch(0));
        scratch.push(kernel.buffers[acc].clone());
    }
    Ok(Lowered {
        launches: vec![Launch {
            work: Work::Kernel(kernel.into()),
            args,
        }],
        scratch,
    })
}

/// The sorted form (f32): `out = x`, then each column's sources sorted by destination
/// ([`sort_segments`], stable), then one item per column walking the runs of equal
/// destination: `out[dest] = x[dest] + src..` summed in f64 in source order, rounded once.
/// Its scratch is two i64 copies of the indices' shape, not an f64 copy of the result.
fn scatter_add_sorted(
    g: &Graph,
    node: &Node,
    name: &str,
    axis: usize,
) -> Result<Lowered, KernelError> {
    let (x, ix) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let (d, id, f64t, i64t) = (x.dtype, ix.dtype, DType::F64, DType::I64);
    let (outer, dx, inner) = split(&x.shape, axis);
    let di = ix.shape[axis];
    let mut l = Lowered::default();
    let mut k = LoopBuilder::new(launch_name(name, 0), x.numel(), TILE_WORK);
    let (bx, by) = (k.read(d, &x.shape), k.write(d, &x.shape));
    k.store(by, k.item(), load(bx, k.item()));
    // Dropped when the result is x itself (an accumulator updated in place): each run below
    // reads its destination before it writes it.
    l.launches
        .push(Launch::copy(finish(k)?, [Arg::Input(0), Arg::Output(0)]));
    let columns = outer * inner;
    // Source `i` of column `seg` (outer index, then inner).
    let source = move |seg: Expr, i: Expr| {
        (seg.clone().idiv(div(inner)) * idx(di) + i) * idx(inner) + seg.irem(div(inner))
    };
    let keys = Keys {
        input: 1,
        dtype: id,
        shape: &ix.shape,
        bound: Some(dx),
        at: &source,
    };
    let sorted = sort_segments(&mut l, name, columns, di, &keys)?;
    let mut k = LoopBuilder::new(
        launch_name(name, l.launches.len()),
        columns,
        items_per_tile(2 * di),
    );
    let (bx, bi, bs) = (
        k.read(d, &x.shape),
        k.read(id, &ix.shape),
        k.read(d, &ix.shape),
    );
    let by = k.write(d, &x.shape);
    let bo = k.read(i64t, &[columns, di]);
    let seg = k.item();
    let dst = |j: Expr| {
        (seg.clone().idiv(div(inner)) * idx(dx) + j) * idx(inner) + seg.clone().irem(div(inner))
    };
    let cur = k.var(i64t, cst(-1.0, i64t));
    let acc = k.var(f64t, cst(0.0, f64t));
    k.for_(idx(0), idx(di), |k, s| {
        let e = load(bo, seg.clone() * idx(di) + s);
        let from = k.var(i64t, source(seg.clone(), e));
        let to = k.var(i64t, load_checked(bi, from.val()).cast(i64t));
        k.if_(to.val().cmp(CmpOp::Ne, cur.val()), |k| {
            k.if_(cur.val().ge(idx(0)), |k| {
                k.store_checked(by, dst(cur.val()), acc.val().cast(d));
            });
            k.set(cur, to.val());
            k.set(acc, load_checked(bx, dst(to.val())).cast(f64t));
        });
        k.set(acc, acc.val() + load(bs, from.val()).cast(f64t));
    });
    k.if_(cur.val().ge(idx(0)), |k| {
        k.store_checked(by, dst(cur.val()), acc.val().cast(d));
    });
    l.launches.push(Launch {
        work: Work::Kernel(finish(k)?.into()),
        args: vec![
            Arg::Input(0),
            Arg::Input(1),
            Arg::Input(2),
            Arg::Output(0),
            Arg::Scratch(sorted),
        ],
    });
    Ok(l)
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
    Ok(Lowered::single(node, finish(k)?.into()))
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
                work: Work::Kernel(finish(k)?.into()),
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
    Ok(Lowered::single(node, finish(k)?.into()))
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
    Ok(Lowered::single(node, finish(k)?.into()))
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

/// The first `k` indices of each row's stable sort (top-k is the descending case), by
/// insertion into the result row, kept sorted: scanning the row in index order, an element
/// goes before the first kept one it strictly precedes, so ties keep the lower index first,
/// as in a stable sort. An element that does not beat the last of `k` kept ones costs one
/// comparison (top-k of a router row rarely inserts); a full argsort is an insertion sort.
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
    let mut k = LoopBuilder::new(launch_name(name, 0), rows, items_per_tile(2 * n));
    let bx = k.read(d, &x.shape);
    let by = k.write(i64t, &y.shape);
    let base = k.var(i64t, k.item() * idx(n));
    let out = k.var(i64t, k.item() * idx(k_));
    // The value of kept entry `m` (an index into the row, read back from the result).
    let kept = |m: Expr| load(bx, base.val() + load_checked(by, out.val() + m));
    let cnt = k.var(i64t, idx(0));
    let xv = k.var(d, cst(0.0, d));
    let at = k.var(i64t, idx(0));
    let last = k.var(i64t, idx(0));
    k.for_(idx(0), idx(n), |k, j| {
        k.set(xv, load(bx, base.val() + j.clone()));
        let full = cnt.val().eq(idx(k_));
        let beats_last = precedes(xv.val(), kept(idx(k_ - 1)), d, descending);
        // Past the last entry of a full row: nothing to do (reading entry k - 1 only when full).
        let skip = k.var(DType::Bool, full.clone());
        k.if_(full, |k| k.set(skip, not(beats_last)));
        k.if_(not(skip.val()), |k| {
            k.set(at, cnt.val());
            k.for_(idx(0), cnt.val(), |k, m| {
                let first = and(
                    at.val().eq(cnt.val()),
                    precedes(xv.val(), kept(m.clone()), d, descending),
                );
                k.if_(first, |k| k.set(at, m));
            });
            // Shift entries at..last up by one (the last of a full row drops out).
            k.set(last, cnt.val().min(idx(k_ - 1)));
            k.for_(idx(0), last.val() - at.val(), |k, q| {
                let m = last.val() - idx(1) - q;
                let v = load_checked(by, out.val() + m.clone());
                k.store_checked(by, out.val() + m + idx(1), v);
            });
            k.store_checked(by, out.val() + at.val(), j);
            k.set(cnt, (cnt.val() + idx(1)).min(idx(k_)));
        });
    });
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// The keys of a [`sort_segments`]: operand `input` of the node (`dtype`, `shape`: i64 or i32)
/// read at `at(segment, i)` for element `i` of a segment, and the range the keys must lie in
/// (`0..bound`, or not negative without one; a key outside stops the kernel).
pub(super) struct Keys<'a> {
    pub input: usize,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bound: Option<usize>,
    pub at: &'a dyn Fn(Expr, Expr) -> Expr,
}

/// Launches (appended to `l`) that sort `segments` segments of `n` elements each by key,
/// stably, leaving in a scratch buffer [segments, n] (whose number they return) each
/// segment's element numbers in sorted order: the keys checked and the elements numbered,
/// then a bottom-up merge sort, one launch per pass, an item per pair of runs (so early
/// passes run in parallel), a tie keeping the lower element first.
pub(super) fn sort_segments(
    l: &mut Lowered,
    name: &str,
    segments: usize,
    n: usize,
    keys: &Keys,
) -> Result<usize, KernelError> {
    let i64t = DType::I64;
    let len = segments * n;
    let first = l.scratch.len();
    for _ in 0..2 {
        l.scratch.push(crate::kernel::Buffer {
            dtype: i64t,
            shape: vec![segments, n],
            access: crate::kernel::Access::Write,
        });
    }
    let name_of = |l: &Lowered| launch_name(name, l.launches.len());
    let key = |b: usize, seg: Expr, i: Expr| load_checked(b, (keys.at)(seg, i)).cast(i64t);
    let mut k = LoopBuilder::new(name_of(l), len, TILE_WORK);
    let bk = k.read(keys.dtype, keys.shape);
    let a = k.write(i64t, &[segments, n]);
    let e = k.item();
    let (seg, i) = (e.clone().idiv(div(n)), e.clone().irem(div(n)));
    let v = k.var(i64t, key(bk, seg.clone(), i.clone()));
    let ok = match keys.bound {
        Some(b) => in_range(v.val(), b),
        None => v.val().ge(idx(0)),
    };
    // A key out of range re-reads the keys at index -1, which stops the kernel.
    k.set(
        v,
        load_checked(bk, guard(ok, (keys.at)(seg, i.clone()))).cast(i64t),
    );
    k.store(a, e, i);
    l.launches.push(Launch {
        work: Work::Kernel(finish(k)?.into()),
        args: vec![Arg::Input(keys.input), Arg::Scratch(first)],
    });
    let (mut src, mut width) = (first, 1usize);
    while width < n {
        let runs = n.div_ceil(2 * width);
        let mut k = LoopBuilder::new(name_of(l), segments * runs, items_per_tile(2 * width));
        let bk = k.read(keys.dtype, keys.shape);
        let (from, to) = (k.read(i64t, &[segments, n]), k.write(i64t, &[segments, n]));
        let item = k.item();
        let seg = k.var(i64t, item.clone().idiv(idx(runs)));
        let base = k.var(i64t, seg.val() * idx(n));
        let lo = k.var(i64t, item.irem(idx(runs)) * idx(2 * width));
        let mid = k.var(i64t, (lo.val() + idx(width)).min(idx(n)));
        let hi = k.var(i64t, (lo.val() + idx(2 * width)).min(idx(n)));
        let i = k.var(i64t, lo.val());
        let j = k.var(i64t, mid.val());
        let take = |k: &mut LoopBuilder, at: crate::loops::Var, o: Expr| {
            k.store(to, base.val() + o, load(from, base.val() + at.val()));
            k.set(at, at.val() + idx(1));
        };
        k.for_(lo.val(), hi.val(), |k, o| {
            k.if_else(
                and(i.val().lt(mid.val()), j.val().lt(hi.val())),
                |k| {
                    let ei = load_checked(from, base.val() + i.val());
                    let ej = load_checked(from, base.val() + j.val());
                    let left = key(bk, seg.val(), ei);
                    let right = key(bk, seg.val(), ej);
                    // Stable: the right run's element goes first only on a strictly smaller key.
                    k.if_else(
                        right.lt(left),
                        |k| take(k, j, o.clone()),
                        |k| take(k, i, o.clone()),
                    );
                },
                |k| {
                    k.if_else(
                        i.val().lt(mid.val()),
                        |k| take(k, i, o.clone()),
                        |k| take(k, j, o.clone()),
                    );
                },
            );
        });
        let dst = 2 * first + 1 - src;
        l.launches.push(Launch {
            work: Work::Kernel(finish(k)?.into()),
            args: vec![Arg::Input(keys.input), Arg::Scratch(src), Arg::Scratch(dst)],
        });
        src = dst;
        width *= 2;
    }
    Ok(src)
}
