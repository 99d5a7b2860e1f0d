//! The routed MoE ops: the permutation of (token, slot) pairs into expert order, the expert
//! offsets, the weighted unpermutation, and their gradients, as loop kernels with the
//! interpreter's semantics (`mmc_ir`'s `interp/fused/moe.rs`) bit for bit.
//!
//! Pair `p = t * k + j` of `top` [tokens, k] goes to row `pos[p]` of the permuted layout, a
//! stable sort of the pairs by expert; `order` is its inverse. The ops that know the expert
//! count (permute, offsets) sort by counting, in one serial item; the others (unpermute and the
//! gradients) know no count, so they sort by a stable merge sort over the pairs, one launch per
//! pass, an item per pair of runs. The gathers and weighted sums then run one item per row,
//! partitioned by destination. Expert ids come from data: an id out of range (negative, or
//! not below the expert count where the op has one) stops the kernel with a checked access of
//! `top` out of range, where the interpreter reports an error.

use super::movement::{finish, guard, in_range, items_per_tile, sort_segments, supported, Keys};
use super::{launch_name, Arg, Launch, Lowered, Work};
use crate::kernel::{Buffer, KernelError};
use crate::loops::{cst, idx, load, load_checked, Expr, LoopBuilder, LoopKernel, Var};
use mmc_ir::{DType, FusedOp, Graph, Node, Op};

const I64: DType = DType::I64;

/// The lowering of `node` if it is one of this module's ops.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    Some(match &node.op {
        Op::Fused(FusedOp::MoePermute { experts }) => permute(g, node, name, *experts),
        Op::Fused(FusedOp::ExpertOffsets { experts }) => expert_offsets(g, node, name, *experts),
        Op::Fused(FusedOp::MoeUnpermute) => unpermute(g, node, name, true),
        Op::Fused(FusedOp::MoePermuteGrad) => unpermute(g, node, name, false),
        Op::Fused(FusedOp::MoeUnpermuteGrad) => unpermute_grad(g, node, name),
        _ => return None,
    })
}

/// The float dtype of operand `i`, or the op's dtype error.
fn float(g: &Graph, node: &Node, i: usize) -> Result<DType, KernelError> {
    let d = supported(node, g.ty(node.inputs[i]).dtype)?;
    if d.is_float() {
        Ok(d)
    } else {
        Err(KernelError::Dtype {
            op: node.op.name(),
            dtype: d,
        })
    }
}

/// The expert of pair `p` (element `p` of buffer `top`), checked: an id that is negative or,
/// with `experts`, not below it re-reads `top` at index -1, which stops the kernel.
fn expert(k: &mut LoopBuilder, top: usize, p: Expr, experts: Option<usize>) -> Var {
    let e = k.var(I64, load(top, p.clone()));
    let ok = match experts {
        Some(n) => in_range(e.val(), n),
        None => e.val().ge(idx(0)),
    };
    k.set(e, load_checked(top, guard(ok, p)));
    e
}

/// `counts[e + 1]` = the pairs of expert `e`, then prefix sums: `counts[e]` is where expert
/// `e`'s rows start. One serial pass over the pairs (the body of a single-item kernel).
fn count(k: &mut LoopBuilder, top: usize, counts: usize, pairs: usize, experts: usize) {
    k.for_(idx(0), idx(experts + 1), |k, e| k.store(counts, e, idx(0)));
    k.for_(idx(0), idx(pairs), |k, p| {
        let e = expert(k, top, p, Some(experts));
        let at = e.val() + idx(1);
        k.store_checked(counts, at.clone(), load_checked(counts, at) + idx(1));
    });
    k.for_(idx(0), idx(experts), |k, e| {
        let at = e.clone() + idx(1);
        k.store(counts, at.clone(), load(counts, at) + load(counts, e));
    });
}

fn launch(kernel: LoopKernel, args: Vec<Arg>) -> Launch {
    Launch {
        work: Work::Kernel(kernel.into()),
        args,
    }
}

fn scratch_i64(n: usize) -> Buffer {
    Buffer {
        dtype: I64,
        shape: vec![n],
        access: crate::kernel::Access::Write,
    }
}

/// `xs[r] = x[token(order[r])]`: a counting sort by expert (one serial item) into scratch,
/// then one item per row of `xs`.
fn permute(g: &Graph, node: &Node, name: &str, experts: usize) -> Result<Lowered, KernelError> {
    let d = float(g, node, 0)?;
    let (x, top) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let (pairs, slots, hidden) = (top.numel(), top.shape[1], x.shape[1]);
    let mut k = LoopBuilder::new(launch_name(name, 0), 1, 1);
    let bt = k.read(I64, &top.shape);
    let next = k.write(I64, &[experts + 1]);
    let order = k.write(I64, &[pairs]);
    count(&mut k, bt, next, pairs, experts);
    k.for_(idx(0), idx(pairs), |k, p| {
        let e = expert(k, bt, p.clone(), Some(experts));
        let r = k.var(I64, load_checked(next, e.val()));
        k.store_checked(order, r.val(), p);
        k.store_checked(next, e.val(), r.val() + idx(1));
    });
    let sort = launch(
        finish(k)?,
        vec![Arg::Input(1), Arg::Scratch(0), Arg::Scratch(1)],
    );
    let mut k = LoopBuilder::new(launch_name(name, 1), pairs, items_per_tile(hidden));
    let bx = k.read(d, &x.shape);
    let bo = k.read(I64, &[pairs]);
    let bxs = k.write(d, &[pairs, hidden]);
    let r = k.item();
    let t = k.var(I64, load(bo, r.clone()).idiv(idx(slots.max(1))));
    k.for_(idx(0), idx(hidden), |k, j| {
        let v = load_checked(bx, t.val() * idx(hidden) + j.clone());
        k.store(bxs, r.clone() * idx(hidden) + j, v);
    });
    let rows = launch(
        finish(k)?,
        vec![Arg::Input(0), Arg::Scratch(1), Arg::Output(0)],
    );
    Ok(Lowered {
        launches: vec![sort, rows],
        scratch: vec![scratch_i64(experts + 1), scratch_i64(pairs)],
    })
}

/// `offsets[e]`: the pairs of experts below `e`; one serial item.
fn expert_offsets(
    g: &Graph,
    node: &Node,
    name: &str,
    experts: usize,
) -> Result<Lowered, KernelError> {
    let top = g.ty(node.inputs[0]);
    let mut k = LoopBuilder::new(launch_name(name, 0), 1, 1);
    let bt = k.read(I64, &top.shape);
    let off = k.write(I64, &[experts + 1]);
    count(&mut k, bt, off, top.numel(), experts);
    Ok(Lowered::single(node, finish(k)?.into()))
}

/// Launches that leave `pos` (the row of each pair in the stable sort by expert) in a scratch
/// buffer, whose number they return: the pairs' experts checked (not negative) and sorted
/// ([`sort_segments`], one segment), then the sorted order inverted into the other buffer.
/// `top` is the node's operand number of `top`.
fn positions(
    g: &Graph,
    node: &Node,
    name: &str,
    top: usize,
    l: &mut Lowered,
) -> Result<usize, KernelError> {
    let tt = g.ty(node.inputs[top]);
    let pairs = tt.numel();
    let at = |_seg: Expr, i: Expr| i;
    let keys = Keys {
        input: top,
        dtype: I64,
        shape: &tt.shape,
        bound: None,
        at: &at,
    };
    let sorted = sort_segments(l, name, 1, pairs, &keys)?;
    // The sort's two buffers are consecutive: pos goes into the one it did not end in.
    let pos = if sorted == l.scratch.len() - 1 {
        sorted - 1
    } else {
        sorted + 1
    };
    let mut k = LoopBuilder::new(
        launch_name(name, l.launches.len()),
        pairs,
        items_per_tile(1),
    );
    let order = k.read(I64, &[1, pairs]);
    let bp = k.write(I64, &[1, pairs]);
    let r = k.item();
    k.store_checked(bp, load(order, r.clone()), r);
    l.launches.push(launch(
        finish(k)?,
        vec![Arg::Scratch(sorted), Arg::Scratch(pos)],
    ));
    Ok(pos)
}

/// `out[t] = sum_j weights[t, j] * ys[pos(t, j)]` (`weighted`, operands ys, top, weights) or
/// `dx[t] = sum_j dxs[pos(t, j)]` (the gradient of the permutation, operands dxs, top): one
/// item per token, each element summed in f64 over the token's slots in order.
fn unpermute(g: &Graph, node: &Node, name: &str, weighted: bool) -> Result<Lowered, KernelError> {
    let d = float(g, node, 0)?;
    let (ys, top) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let (tokens, slots, hidden, pairs) = (top.shape[0], top.shape[1], ys.shape[1], top.numel());
    let mut l = Lowered::default();
    let pos = positions(g, node, name, 1, &mut l)?;
    let f64t = DType::F64;
    let mut k = LoopBuilder::new(
        launch_name(name, l.launches.len()),
        tokens,
        items_per_tile(hidden * slots),
    );
    let by = k.read(d, &ys.shape);
    // `top` is read through `pos`; the buffer keeps the operand order.
    let _top = k.read(I64, &top.shape);
    let bw = weighted.then(|| k.read(d, &top.shape));
    let bo = k.write(d, &[tokens, hidden]);
    let bp = k.read(I64, &[1, pairs]);
    let t = k.item();
    let acc = k.var(f64t, cst(0.0, f64t));
    k.for_(idx(0), idx(hidden), |k, j| {
        k.set(acc, cst(0.0, f64t));
        k.for_(idx(0), idx(slots), |k, s| {
            let p = t.clone() * idx(slots) + s;
            let r = load(bp, p.clone());
            let y = load_checked(by, r * idx(hidden) + j.clone()).cast(f64t);
            let term = match bw {
                Some(bw) => load(bw, p).cast(f64t) * y,
                None => y,
            };
            k.set(acc, acc.val() + term);
        });
        k.store(bo, t.clone() * idx(hidden) + j, acc.val().cast(d));
    });
    let mut args: Vec<Arg> = (0..node.inputs.len()).map(Arg::Input).collect();
    args.extend([Arg::Output(0), Arg::Scratch(pos)]);
    l.launches.push(launch(finish(k)?, args));
    Ok(l)
}

/// The gradients of the unpermutation (operands ys, top, weights, dout):
/// `dys[pos(t, j)] = weights[t, j] * dout[t]` and `dweights[t, j] = ys[pos(t, j)] . dout[t]`,
/// the dot product in the interpreter's order (four f64 lanes, then the tail). One item per
/// token; the rows of `dys` a token writes are its own pairs' rows.
fn unpermute_grad(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    let d = float(g, node, 0)?;
    let (ys, top) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let (tokens, slots, hidden, pairs) = (top.shape[0], top.shape[1], ys.shape[1], top.numel());
    let mut l = Lowered::default();
    let pos = positions(g, node, name, 1, &mut l)?;
    let f64t = DType::F64;
    let mut k = LoopBuilder::new(
        launch_name(name, l.launches.len()),
        tokens,
        items_per_tile(2 * hidden * slots),
    );
    let by = k.read(d, &ys.shape);
    // `top` is read through `pos`; the buffer keeps the operand order.
    let _top = k.read(I64, &top.shape);
    let bw = k.read(d, &top.shape);
    let bd = k.read(d, &[tokens, hidden]);
    let bdys = k.write(d, &ys.shape);
    let bdw = k.write(d, &top.shape);
    let bp = k.read(I64, &[1, pairs]);
    let t = k.item();
    let lanes: Vec<Var> = (0..4).map(|_| k.var(f64t, cst(0.0, f64t))).collect();
    let tail = k.var(f64t, cst(0.0, f64t));
    let dout = |j: Expr| load(bd, t.clone() * idx(hidden) + j).cast(f64t);
    k.for_(idx(0), idx(slots), |k, s| {
        let p = k.var(I64, t.clone() * idx(slots) + s);
        let row = k.var(I64, load(bp, p.val()) * idx(hidden));
        let y = |j: Expr| load_checked(by, row.val() + j).cast(f64t);
        for &a in &lanes {
            k.set(a, cst(0.0, f64t));
        }
        k.set(tail, cst(0.0, f64t));
        k.for_(idx(0), idx(hidden / 4), |k, c| {
            for (i, &a) in lanes.iter().enumerate() {
                let j = c.clone() * idx(4) + idx(i);
                k.set(a, a.val() + y(j.clone()) * dout(j));
            }
        });
        k.for_(idx(hidden / 4 * 4), idx(hidden), |k, j| {
            k.set(tail, tail.val() + y(j.clone()) * dout(j));
        });
        let dot = (lanes[0].val() + lanes[1].val()) + (lanes[2].val() + lanes[3].val());
        k.store(bdw, p.val(), (dot + tail.val()).cast(d));
        let w = k.var(f64t, load(bw, p.val()).cast(f64t));
        k.for_(idx(0), idx(hidden), |k, j| {
            k.store_checked(bdys, row.val() + j.clone(), (w.val() * dout(j)).cast(d));
        });
    });
    let args = vec![
        Arg::Input(0),
        Arg::Input(1),
        Arg::Input(2),
        Arg::Input(3),
        Arg::Output(0),
        Arg::Output(1),
        Arg::Scratch(pos),
    ];
    l.launches.push(launch(finish(k)?, args));
    Ok(l)
}
