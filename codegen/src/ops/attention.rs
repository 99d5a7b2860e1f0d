//! Flash attention with grouped-query heads, a causal mask and packed-sample masking by
//! segment ids, forward and backward, as the interpreter computes it
//! (`ir/src/interp/fused/attention.rs`), but one query row at a time with an online softmax:
//! no [seq, seq] block exists, only per-row statistics.
//!
//! A row's vectors of `head_dim` elements (its query, its output accumulator) are scalar
//! variables of the kernel, one per element, so they live in registers as in a flash kernel;
//! the loop over keys is a loop of the kernel IR. This form is for short sequences (the
//! vision tiles); from `attention_blocks::MIN_SEQ` keys on, attention runs on library GEMMs
//! (`attention_blocks.rs`). Every score is `(q . k_j) * scale` in f64,
//! and a row whose maximum score is not finite (a NaN or infinite score) is all NaN, as in the
//! interpreter; with these masks every query sees itself, so no row is ever fully masked.
//!
//! The backward recomputes the probabilities from per-row statistics that its first launch
//! writes to scratch (the row's maximum, its sum of exponentials, and
//! `delta = rowsum(p * dp) = do . o`); then one launch computes dq with an item per query row,
//! and another dk and dv with an item per key row looping over the query rows of the heads
//! that share its kv head, so no two items write the same element.

use super::attention_blocks as blocks;
use super::{launch_name, Arg, Launch, Lowered, Work};
use crate::kernel::{Access, Buffer, KernelError};
use crate::loops::{cst, idx, load, select, Expr, LoopBuilder, Var};
use mmc_ir::{CmpOp, DType, FusedOp, Graph, Node, Op, TensorType};

const F64: DType = DType::F64;
const I64: DType = DType::I64;

/// Statistics per query row in the backward's scratch: max, sum of exponentials, delta.
const STATS: usize = 3;

/// The lowering of `node` if it is an attention or its backward.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    // Long sequences take the GEMM form (`attention_blocks.rs`).
    let long =
        |node: &Node| g.ty(node.inputs[0]).shape.get(2).copied().unwrap_or(0) >= blocks::MIN_SEQ;
    match &node.op {
        Op::Fused(FusedOp::Attention { scale, causal }) if long(node) => {
            Some(blocks::forward(g, node, name, (*scale, *causal)))
        }
        Op::Fused(FusedOp::AttentionGrad { scale, causal }) if long(node) => {
            Some(blocks::backward(g, node, name, (*scale, *causal)))
        }
        Op::Fused(FusedOp::Attention { scale, causal }) => {
            Some(forward(g, node, name, *scale, *causal))
        }
        Op::Fused(FusedOp::AttentionGrad { scale, causal }) => {
            Some(backward(g, node, name, *scale, *causal))
        }
        _ => None,
    }
}

/// The sizes of an attention: q [batch, q_heads, seq, head_dim], k and v
/// [batch, kv_heads, seq, head_dim]; query head h reads kv head `h / group`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub(super) batch: usize,
    pub(super) q_heads: usize,
    pub(super) kv_heads: usize,
    pub(super) seq: usize,
    pub(super) d: usize,
    /// Query heads per kv head.
    pub(super) group: usize,
}

impl Dims {
    pub(super) fn of(q: &TensorType, k: &TensorType) -> Dims {
        let (q_heads, kv_heads) = (q.shape[1], k.shape[1]);
        Dims {
            batch: q.shape[0],
            q_heads,
            kv_heads,
            seq: q.shape[2],
            d: q.shape[3],
            group: q_heads / kv_heads.max(1),
        }
    }

    /// Query rows over all heads: the items of the row launches.
    fn q_rows(&self) -> usize {
        self.batch * self.q_heads * self.seq
    }

    /// Key rows over all kv heads: the items of the dk/dv launch.
    fn kv_rows(&self) -> usize {
        self.batch * self.kv_heads * self.seq
    }

    /// Items per tile for items that each do `work` multiply-adds: enough work per tile to
    /// amortise the launch, small tiles where rows are long.
    fn tile(work: usize) -> usize {
        (32768 / work.max(1)).max(1)
    }
}

fn float(g: &Graph, node: &Node) -> Result<DType, KernelError> {
    let d = g.ty(node.outputs[0]).dtype;
    match d {
        DType::F32 | DType::F64 | DType::BF16 => Ok(d),
        dtype => Err(KernelError::Dtype {
            op: node.op.name(),
            dtype,
        }),
    }
}

fn finish(k: LoopBuilder) -> Result<crate::kernel::GeneratedKernel, KernelError> {
    k.finish()
        .map(Into::into)
        .map_err(|e| KernelError::Invalid(e.to_string()))
}

/// `x` is not finite (NaN or infinite): `x - x` is then NaN, and NaN != 0.
fn not_finite(x: Expr) -> Expr {
    (x.clone() - x).cmp(CmpOp::Ne, cst(0.0, F64))
}

/// `sum_c a(c) * b(c)` over `n` terms, in four interleaved partial sums (term `c` in sum
/// `c % 4`) added as `(s0 + s1) + (s2 + s3)`: independent chains, as the interpreter's dot.
fn dot(n: usize, a: impl Fn(usize) -> Expr, b: impl Fn(usize) -> Expr) -> Expr {
    let mut sums: Vec<Option<Expr>> = vec![None, None, None, None];
    for c in 0..n {
        let t = a(c) * b(c);
        let s = &mut sums[c % 4];
        *s = Some(match s.take() {
            Some(x) => x + t,
            None => t,
        });
    }
    let mut s = sums.into_iter().flatten();
    let pair = |x: Option<Expr>, y: Option<Expr>| match (x, y) {
        (Some(x), Some(y)) => Some(x + y),
        (x, None) => x,
        (None, y) => y,
    };
    let (s0, s1, s2, s3) = (s.next(), s.next(), s.next(), s.next());
    pair(pair(s0, s1), pair(s2, s3)).unwrap_or_else(|| cst(0.0, F64))
}

/// The segment ids of a launch and the query's (or key's) own id, when given.
#[derive(Clone, Copy)]
struct Segments {
    buffer: usize,
    own: Var,
    /// The variable holding `batch * seq`, the first id of the item's batch row.
    base: Var,
}

/// Runs `body` only when row `other` of the item's batch row has the item's segment id (always
/// without segment ids).
fn same_segment(
    k: &mut LoopBuilder,
    seg: Option<Segments>,
    other: Expr,
    body: impl FnOnce(&mut LoopBuilder),
) {
    match seg {
        Some(s) => k.if_(load(s.buffer, s.base.val() + other).eq(s.own.val()), body),
        None => body(k),
    }
}

/// The variables of a query-row item: its batch row, its head and its row.
struct QueryRow {
    b: Var,
    h: Var,
    i: Var,
}

fn query_row(k: &mut LoopBuilder, a: Dims) -> QueryRow {
    let item = k.item();
    let i = k.var(I64, item.clone().irem(idx(a.seq.max(1))));
    let bh = item.idiv(idx(a.seq.max(1)));
    let b = k.var(I64, bh.clone().idiv(idx(a.q_heads.max(1))));
    let h = k.var(I64, bh.irem(idx(a.q_heads.max(1))));
    QueryRow { b, h, i }
}

/// The first element of the keys and values that query head `r.h` of batch row `r.b` reads.
fn kv_base(a: Dims, r: &QueryRow) -> Expr {
    (r.b.val() * idx(a.kv_heads) + r.h.val().idiv(idx(a.group.max(1)))) * idx(a.seq * a.d)
}

/// The keys a query row `i` visits: `0..=i` when causal, else all.
fn key_end(a: Dims, causal: bool, i: Var) -> Expr {
    if causal {
        i.val() + idx(1)
    } else {
        idx(a.seq)
    }
}

/// f64 variables holding elements `at(c)` of a row, `c < n`.
fn row_vars(k: &mut LoopBuilder, n: usize, at: impl Fn(usize) -> Expr) -> Vec<Var> {
    (0..n).map(|c| k.var(F64, at(c).cast(F64))).collect()
}

fn zeros(k: &mut LoopBuilder, n: usize) -> Vec<Var> {
    (0..n).map(|_| k.var(F64, cst(0.0, F64))).collect()
}

/// The online softmax of one query row, leaving in `m` its maximum score, in `l` its sum of
/// `exp(score - m)` and in `acc` the sum of `exp(score - m) * v_j` (so `o = acc / l`).
struct Online {
    m: Var,
    l: Var,
    acc: Vec<Var>,
}

/// Emits the loop over the keys row `r` sees, `q` its query in variables: for each visible key,
/// the score, a rescale when the maximum grows, and the accumulation of its value row.
#[allow(clippy::too_many_arguments)]
fn online_softmax(
    k: &mut LoopBuilder,
    a: Dims,
    (bk, bv): (usize, usize),
    seg: Option<Segments>,
    r: &QueryRow,
    q: &[Var],
    scale: f64,
    causal: bool,
) -> Online {
    let d = a.d;
    let kv = k.var(I64, kv_base(a, r));
    let m = k.var(F64, cst(f64::NEG_INFINITY, F64));
    let l = k.var(F64, cst(0.0, F64));
    let acc = zeros(k, d);
    let (sc, mn, e) = (
        k.var(F64, cst(0.0, F64)),
        k.var(F64, cst(0.0, F64)),
        k.var(F64, cst(0.0, F64)),
    );
    k.for_(idx(0), key_end(a, causal, r.i), |k, j| {
        same_segment(k, seg, j.clone(), |k| {
            let at = kv.val() + j * idx(d);
            let s = dot(
                d,
                |c| q[c].val(),
                |c| load(bk, at.clone() + idx(c)).cast(F64),
            );
            k.set(sc, s * cst(scale, F64));
            // NaN-propagating: a NaN score makes the maximum NaN, and the row NaN.
            k.set(mn, m.val().max(sc.val()));
            k.if_(mn.val().cmp(CmpOp::Gt, m.val()), |k| {
                let alpha = k.var(F64, (m.val() - mn.val()).exp());
                k.set(l, l.val() * alpha.val());
                for &x in &acc {
                    k.set(x, x.val() * alpha.val());
                }
            });
            k.set(m, mn.val());
            k.set(e, (sc.val() - m.val()).exp());
            k.set(l, l.val() + e.val());
            for (c, &x) in acc.iter().enumerate() {
                let vj = load(bv, at.clone() + idx(c)).cast(F64);
                k.set(x, x.val() + e.val() * vj);
            }
        });
    });
    Online { m, l, acc }
}

/// The segment ids of the item's batch row, when the op has them.
fn segments(
    k: &mut LoopBuilder,
    seg: Option<usize>,
    a: Dims,
    b: Var,
    own: Expr,
) -> Option<Segments> {
    seg.map(|buffer| {
        let base = k.var(I64, b.val() * idx(a.seq));
        let own = k.var(I64, load(buffer, base.val() + own));
        Segments { buffer, own, base }
    })
}

/// `o = softmax(q k^T * scale + mask) v`: one item per query row.
fn forward(
    g: &Graph,
    node: &Node,
    name: &str,
    scale: f64,
    causal: bool,
) -> Result<Lowered, KernelError> {
    let dt = float(g, node)?;
    let (q, kt) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let a = Dims::of(q, kt);
    let d = a.d;
    let mut k = LoopBuilder::new(launch_name(name, 0), a.q_rows(), Dims::tile(a.seq * d * 2));
    let (bq, bk, bv) = (
        k.read(dt, &q.shape),
        k.read(dt, &kt.shape),
        k.read(dt, &kt.shape),
    );
    let bseg = node.inputs.get(3).map(|&s| k.read(I64, &g.ty(s).shape));
    let bo = k.write(dt, &q.shape);
    let r = query_row(&mut k, a);
    let seg = segments(&mut k, bseg, a, r.b, r.i.val());
    let row = k.item() * idx(d);
    let qv = row_vars(&mut k, d, |c| load(bq, row.clone() + idx(c)));
    let o = online_softmax(&mut k, a, (bk, bv), seg, &r, &qv, scale, causal);
    let bad = k.var(DType::Bool, not_finite(o.m.val()));
    for (c, x) in o.acc.iter().enumerate() {
        let v = select(bad.val(), cst(f64::NAN, F64), x.val() / o.l.val());
        k.store(bo, row.clone() + idx(c), v.cast(dt));
    }
    Ok(Lowered::single(node, finish(k)?))
}

/// The backward: statistics per query row, a flag per kv head with a NaN row, dq per query
/// row, then dk and dv per key row (see the module documentation).
fn backward(
    g: &Graph,
    node: &Node,
    name: &str,
    scale: f64,
    causal: bool,
) -> Result<Lowered, KernelError> {
    let dt = float(g, node)?;
    let (q, kt) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let a = Dims::of(q, kt);
    let d = a.d;
    let has_seg = node.inputs.len() == 5;
    let seg_ty = has_seg.then(|| g.ty(node.inputs[3]).shape.clone());
    let d_out = node.inputs.len() - 1;
    let stats = Buffer {
        dtype: F64,
        shape: vec![a.q_rows(), STATS],
        access: Access::Write,
    };
    let flags = Buffer {
        dtype: I64,
        shape: vec![a.batch * a.kv_heads],
        access: Access::Write,
    };
    // The operands every launch reads, in the op's order: q, k, v, [segment ids], do.
    let read_operands = |k: &mut LoopBuilder| {
        let bq = k.read(dt, &q.shape);
        let bk = k.read(dt, &kt.shape);
        let bv = k.read(dt, &kt.shape);
        let bseg = seg_ty.as_ref().map(|s| k.read(I64, s));
        let bdo = k.read(dt, &q.shape);
        (bq, bk, bv, bseg, bdo)
    };
    let mut operand_args: Vec<Arg> = (0..3).map(Arg::Input).collect();
    if has_seg {
        operand_args.push(Arg::Input(3));
    }
    operand_args.push(Arg::Input(d_out));
    let with = |extra: &[Arg]| {
        let mut v = operand_args.clone();
        v.extend_from_slice(extra);
        v
    };

    // Launch 0: per query row, the maximum, the sum of exponentials and delta = do . o.
    let mut k = LoopBuilder::new(launch_name(name, 0), a.q_rows(), Dims::tile(a.seq * d * 2));
    let (bq, bk, bv, bseg, bdo) = read_operands(&mut k);
    let bst = k.write(F64, &stats.shape);
    let r = query_row(&mut k, a);
    let seg = segments(&mut k, bseg, a, r.b, r.i.val());
    let row = k.item() * idx(d);
    let qv = row_vars(&mut k, d, |c| load(bq, row.clone() + idx(c)));
    let o = online_softmax(&mut k, a, (bk, bv), seg, &r, &qv, scale, causal);
    let delta = dot(
        d,
        |c| load(bdo, row.clone() + idx(c)).cast(F64),
        |c| o.acc[c].val() / o.l.val(),
    );
    let at = k.item() * idx(STATS);
    k.store(bst, at.clone(), o.m.val());
    k.store(bst, at.clone() + idx(1), o.l.val());
    k.store(bst, at + idx(2), delta);
    let stats_launch = Launch {
        work: Work::Kernel(finish(k)?),
        args: with(&[Arg::Scratch(0)]),
    };

    // Launch 1: per (batch row, kv head), how many rows of its query heads are NaN rows.
    let mut k = LoopBuilder::new(launch_name(name, 1), a.batch * a.kv_heads, 64);
    let bst = k.read(F64, &stats.shape);
    let bfl = k.write(I64, &flags.shape);
    let first = k.var(I64, k.item() * idx(a.group * a.seq));
    let count = k.var(I64, idx(0));
    k.for_(first.val(), first.val() + idx(a.group * a.seq), |k, row| {
        k.if_(not_finite(load(bst, row * idx(STATS))), |k| {
            k.set(count, count.val() + idx(1));
        });
    });
    k.store(bfl, k.item(), count.val());
    let flags_launch = Launch {
        work: Work::Kernel(finish(k)?),
        args: vec![Arg::Scratch(0), Arg::Scratch(1)],
    };

    // Launch 2: dq per query row, `dq = sum_j ds_j k_j`.
    let mut k = LoopBuilder::new(launch_name(name, 2), a.q_rows(), Dims::tile(a.seq * d * 3));
    let (bq, bk, bv, bseg, bdo) = read_operands(&mut k);
    let bst = k.read(F64, &stats.shape);
    let bdq = k.write(dt, &q.shape);
    let r = query_row(&mut k, a);
    let seg = segments(&mut k, bseg, a, r.b, r.i.val());
    let row = k.item() * idx(d);
    let qv = row_vars(&mut k, d, |c| load(bq, row.clone() + idx(c)));
    let dov = row_vars(&mut k, d, |c| load(bdo, row.clone() + idx(c)));
    let at = k.item() * idx(STATS);
    let m = k.var(F64, load(bst, at.clone()));
    let l = k.var(F64, load(bst, at.clone() + idx(1)));
    let delta = k.var(F64, load(bst, at + idx(2)));
    let kv = k.var(I64, kv_base(a, &r));
    let acc = zeros(&mut k, d);
    let ds = k.var(F64, cst(0.0, F64));
    k.for_(idx(0), key_end(a, causal, r.i), |k, j| {
        same_segment(k, seg, j.clone(), |k| {
            let at = kv.val() + j * idx(d);
            let s = dot(
                d,
                |c| qv[c].val(),
                |c| load(bk, at.clone() + idx(c)).cast(F64),
            );
            let p = k.var(F64, (s * cst(scale, F64) - m.val()).exp() / l.val());
            let dp = dot(
                d,
                |c| dov[c].val(),
                |c| load(bv, at.clone() + idx(c)).cast(F64),
            );
            k.set(ds, score_grad(p, dp, delta, scale));
            for (c, &x) in acc.iter().enumerate() {
                let kj = load(bk, at.clone() + idx(c)).cast(F64);
                k.set(x, x.val() + ds.val() * kj);
            }
        });
    });
    // A NaN row sees at least itself, so its dq is NaN (the interpreter's `nan_row`).
    let bad = k.var(DType::Bool, not_finite(m.val()));
    for (c, x) in acc.iter().enumerate() {
        let v = select(bad.val(), cst(f64::NAN, F64), x.val());
        k.store(bdq, row.clone() + idx(c), v.cast(dt));
    }
    let dq_launch = Launch {
        work: Work::Kernel(finish(k)?),
        args: with(&[Arg::Scratch(0), Arg::Output(0)]),
    };

    // Launch 3: dk and dv per key row, over the query rows of the heads sharing its kv head
    // that see it: `dv = sum p do`, `dk = sum ds q`.
    let mut k = LoopBuilder::new(
        launch_name(name, 3),
        a.kv_rows(),
        Dims::tile(a.group * a.seq * d * 4),
    );
    let (bq, bk, bv, bseg, bdo) = read_operands(&mut k);
    let bst = k.read(F64, &stats.shape);
    let bfl = k.read(I64, &flags.shape);
    let bdk = k.write(dt, &kt.shape);
    let bdv = k.write(dt, &kt.shape);
    let item = k.item();
    let j = k.var(I64, item.clone().irem(idx(a.seq.max(1))));
    let bkv = k.var(I64, item.idiv(idx(a.seq.max(1))));
    let b = k.var(I64, bkv.val().idiv(idx(a.kv_heads.max(1))));
    let kvh = k.var(I64, bkv.val().irem(idx(a.kv_heads.max(1))));
    let seg = segments(&mut k, bseg, a, b, j.val());
    let row = k.item() * idx(d);
    let kv = row_vars(&mut k, d, |c| load(bk, row.clone() + idx(c)));
    let vv = row_vars(&mut k, d, |c| load(bv, row.clone() + idx(c)));
    let dk = zeros(&mut k, d);
    let dv = zeros(&mut k, d);
    let nan_dk = k.var(DType::Bool, cst(0.0, DType::Bool));
    let (qrow, p, ds) = (
        k.var(I64, idx(0)),
        k.var(F64, cst(0.0, F64)),
        k.var(F64, cst(0.0, F64)),
    );
    let first_head = (b.val() * idx(a.q_heads) + kvh.val() * idx(a.group)) * idx(a.seq);
    let first_head = k.var(I64, first_head);
    let start = if causal { j.val() } else { idx(0) };
    k.for_(idx(0), idx(a.group), |k, hh| {
        k.for_(start, idx(a.seq), |k, i| {
            same_segment(k, seg, i.clone(), |k| {
                k.set(qrow, first_head.val() + hh * idx(a.seq) + i);
                let at = qrow.val() * idx(STATS);
                let m = k.var(F64, load(bst, at.clone()));
                let l = load(bst, at.clone() + idx(1));
                let delta = k.var(F64, load(bst, at + idx(2)));
                let base = qrow.val() * idx(d);
                let s = dot(
                    d,
                    |c| load(bq, base.clone() + idx(c)).cast(F64),
                    |c| kv[c].val(),
                );
                k.set(p, (s * cst(scale, F64) - m.val()).exp() / l);
                let dp = dot(
                    d,
                    |c| load(bdo, base.clone() + idx(c)).cast(F64),
                    |c| vv[c].val(),
                );
                k.set(ds, score_grad(p, dp, delta, scale));
                for c in 0..d {
                    let doc = load(bdo, base.clone() + idx(c)).cast(F64);
                    k.set(dv[c], dv[c].val() + p.val() * doc);
                    let qc = load(bq, base.clone() + idx(c)).cast(F64);
                    k.set(dk[c], dk[c].val() + ds.val() * qc);
                }
                // A NaN row that sees this key makes its dk NaN.
                k.set(
                    nan_dk,
                    nan_dk
                        .val()
                        .binary(mmc_ir::BinaryOp::Or, not_finite(m.val())),
                );
            });
        });
    });
    // Any NaN row of the heads sharing this kv head makes every value row's gradient NaN.
    let any_bad = k.var(DType::Bool, load(bfl, bkv.val()).cmp(CmpOp::Gt, idx(0)));
    for c in 0..d {
        let x = select(any_bad.val(), cst(f64::NAN, F64), dv[c].val());
        k.store(bdv, row.clone() + idx(c), x.cast(dt));
        let x = select(nan_dk.val(), cst(f64::NAN, F64), dk[c].val());
        k.store(bdk, row.clone() + idx(c), x.cast(dt));
    }
    let dkdv_launch = Launch {
        work: Work::Kernel(finish(k)?),
        args: with(&[
            Arg::Scratch(0),
            Arg::Scratch(1),
            Arg::Output(1),
            Arg::Output(2),
        ]),
    };

    Ok(Lowered {
        launches: vec![stats_launch, flags_launch, dq_launch, dkdv_launch],
        scratch: vec![stats, flags],
    })
}

/// `ds = p * (dp - delta) * scale`, and 0 where `p` is 0 (as the interpreter, so that an
/// infinite `dp` at a vanishing probability adds nothing).
fn score_grad(p: Var, dp: Expr, delta: Var, scale: f64) -> Expr {
    select(
        p.val().eq(cst(0.0, F64)),
        cst(0.0, F64),
        p.val() * (dp - delta.val()) * cst(scale, F64),
    )
}
