//! The LM head fused with the weighted cross-entropy, forward and backward, `chunk` rows at a
//! time as the interpreter computes it (`ir/src/interp/fused/cross_entropy.rs`): the largest
//! buffer is one chunk's logits, a [chunk, vocab] scratch, never [rows, vocab].
//!
//! Per chunk, a first launch computes the logits `h w^T` of the chunk's rows into the scratch
//! (a loop kernel for now; the launch is kept apart so that a library GEMM can replace it),
//! and the launches after it read them back: the per-row loss terms, or the logit gradients
//! and from them dh and the chunk's share of dw. A row whose target is negative is ignored; a
//! target at or above the vocabulary size is refused by a checked load (it addresses past the
//! chunk's logits), as the interpreter refuses it.
//!
//! The scratch: the chunk's logits (f64 for now, [chunk, vocab]), the per-row loss terms
//! ([rows]) forward, and the f64 sums of the chunk's rows of dh ([chunk, hidden]) backward.
//!
//! Everything is computed in f64 and rounded once, except dw, which sums over chunks: its
//! running sum is stored in dw's dtype after each chunk (as a GEMM accumulating into dw will),
//! so an f32 dw is rounded once per chunk.

use super::{launch_name, Arg, Launch, Lowered};
use crate::kernel::{Access, Buffer, GeneratedKernel, KernelError};
use crate::loops::{cst, idx, load, load_checked, select, Expr, LoopBuilder};
use mmc_ir::{DType, FusedOp, Graph, Node, Op};

const F64: DType = DType::F64;
const I64: DType = DType::I64;

/// The dtype of the logits scratch: f64, the interpreter's precision, until the product is a
/// library GEMM.
const LOGITS: DType = F64;

/// The lowering of `node` if it is a linear cross-entropy or its backward.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    match &node.op {
        Op::Fused(FusedOp::LinearCrossEntropy { chunk }) => Some(forward(g, node, name, *chunk)),
        Op::Fused(FusedOp::LinearCrossEntropyGrad { chunk }) => {
            Some(backward(g, node, name, *chunk))
        }
        _ => None,
    }
}

/// The sizes of a linear cross-entropy: h [rows, hidden], w [vocab, hidden], and the rows per
/// chunk (at least 1, at most the rows).
#[derive(Clone, Copy, Debug)]
struct Dims {
    dtype: DType,
    rows: usize,
    hidden: usize,
    vocab: usize,
    chunk: usize,
}

impl Dims {
    fn of(g: &Graph, node: &Node, chunk: usize) -> Result<Dims, KernelError> {
        let (h, w) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
        let dtype = match h.dtype {
            DType::F32 | DType::F64 => h.dtype,
            dtype => {
                return Err(KernelError::Dtype {
                    op: node.op.name(),
                    dtype,
                })
            }
        };
        let rows = h.shape[0];
        Ok(Dims {
            dtype,
            rows,
            hidden: h.shape[1],
            vocab: w.shape[0],
            chunk: chunk.clamp(1, rows.max(1)),
        })
    }

    /// The chunks: (first row, rows).
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.rows)
            .step_by(self.chunk)
            .map(|r0| (r0, self.chunk.min(self.rows - r0)))
    }

    /// The scratch of one chunk's logits.
    fn logits(&self) -> Buffer {
        Buffer {
            dtype: LOGITS,
            shape: vec![self.chunk, self.vocab],
            access: Access::Write,
        }
    }

    /// The backward's f64 accumulators of one chunk's rows of dh.
    fn row_sums(&self) -> Buffer {
        Buffer {
            dtype: F64,
            shape: vec![self.chunk, self.hidden],
            access: Access::Write,
        }
    }

    /// Items per tile for items that each do `work` multiply-adds.
    fn tile(work: usize) -> usize {
        (32768 / work.max(1)).max(1)
    }
}

fn finish(k: LoopBuilder) -> Result<GeneratedKernel, KernelError> {
    k.finish()
        .map(Into::into)
        .map_err(|e| KernelError::Invalid(e.to_string()))
}

/// `sum_c a(c) * b(c)` over `c in 0..n` in f64, as a loop in four interleaved partial sums
/// (independent chains) added as `(s0 + s1) + (s2 + s3)`.
fn dot_loop(
    k: &mut LoopBuilder,
    n: usize,
    a: impl Fn(Expr) -> Expr,
    b: impl Fn(Expr) -> Expr,
) -> Expr {
    let s: Vec<_> = (0..4).map(|_| k.var(F64, cst(0.0, F64))).collect();
    k.for_(idx(0), idx(n / 4), |k, c| {
        for (lane, &acc) in s.iter().enumerate() {
            let at = c.clone() * idx(4) + idx(lane);
            k.set(acc, acc.val() + a(at.clone()).cast(F64) * b(at).cast(F64));
        }
    });
    k.for_(idx(n / 4 * 4), idx(n), |k, c| {
        k.set(s[0], s[0].val() + a(c.clone()).cast(F64) * b(c).cast(F64));
    });
    (s[0].val() + s[1].val()) + (s[2].val() + s[3].val())
}

/// Rows of w per item of the logits launch: a block of w that stays in the L1 cache while
/// every row of the chunk is multiplied with it.
const W_BLOCK: usize = 32;

/// The launch writing the logits `h w^T` of the `n` rows from `r0` into the scratch (the launch
/// a GEMM will replace): one item per block of [`W_BLOCK`] rows of w, looping over the chunk's
/// rows of h.
fn logits_launch(a: Dims, name: String, (r0, n): (usize, usize)) -> Result<Launch, KernelError> {
    let (hd, v) = (a.hidden, a.vocab);
    let mut k = LoopBuilder::new(name, v.div_ceil(W_BLOCK), 1);
    let bh = k.read(a.dtype, &[a.rows, hd]);
    let bw = k.read(a.dtype, &[v, hd]);
    let bl = k.write(LOGITS, &a.logits().shape);
    let lo = k.var(I64, k.item() * idx(W_BLOCK));
    let hi = k.var(I64, (lo.val() + idx(W_BLOCK)).min(idx(v)));
    k.for_(idx(0), idx(n), |k, r| {
        let hrow = k.var(I64, (r.clone() + idx(r0)) * idx(hd));
        let lrow = k.var(I64, r * idx(v));
        k.for_(lo.val(), hi.val(), |k, j| {
            let wrow = k.var(I64, j.clone() * idx(hd));
            let s = dot_loop(
                k,
                hd,
                |c| load(bh, hrow.val() + c),
                |c| load(bw, wrow.val() + c),
            );
            k.store(bl, lrow.val() + j, s.cast(LOGITS));
        });
    });
    Ok(Launch {
        kernel: finish(k)?,
        args: vec![Arg::Input(0), Arg::Input(1), Arg::Scratch(0)],
    })
}

/// The logsumexp of logits row `row` (`max + log(sum(exp(x - max)))`, the maximum NaN if any
/// logit is).
fn logsumexp(k: &mut LoopBuilder, bl: usize, v: usize, row: Expr) -> Expr {
    let m = k.var(F64, cst(f64::NEG_INFINITY, F64));
    k.for_(idx(0), idx(v), |k, j| {
        k.set(m, m.val().max(load(bl, row.clone() + j).cast(F64)));
    });
    let s = k.var(F64, cst(0.0, F64));
    k.for_(idx(0), idx(v), |k, j| {
        let x = load(bl, row.clone() + j).cast(F64);
        k.set(s, s.val() + (x - m.val()).exp());
    });
    s.val().log() + m.val()
}

/// The element of the target's logit in row `r` of the chunk's logits, for a target `t >= 0`;
/// a target at or above the vocabulary addresses one past the scratch, which a checked access
/// refuses.
fn target_at(a: Dims, r: Expr, t: Expr) -> Expr {
    select(
        t.clone().lt(idx(a.vocab)),
        r * idx(a.vocab) + t,
        idx(a.chunk * a.vocab),
    )
}

/// `sum_i weight_i * (logsumexp(h_i w^T) - (h_i w^T)[target_i])` over the rows whose target is
/// not negative, into an f32 scalar: per chunk the logits, then the loss terms per row into a
/// [rows] scratch, and a last launch sums them in row order.
fn forward(g: &Graph, node: &Node, name: &str, chunk: usize) -> Result<Lowered, KernelError> {
    let a = Dims::of(g, node, chunk)?;
    let v = a.vocab;
    let terms = Buffer {
        dtype: F64,
        shape: vec![a.rows],
        access: Access::Write,
    };
    let mut launches = Vec::new();
    for (r0, n) in a.chunks() {
        launches.push(logits_launch(
            a,
            launch_name(name, launches.len()),
            (r0, n),
        )?);
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), n, Dims::tile(2 * v));
        let bt = k.read(I64, &[a.rows]);
        let bwt = k.read(DType::F32, &[a.rows]);
        let bl = k.read(LOGITS, &a.logits().shape);
        let bterm = k.write(F64, &terms.shape);
        let r = k.item();
        let t = k.var(I64, load(bt, r.clone() + idx(r0)));
        let term = k.var(F64, cst(0.0, F64));
        k.if_(t.val().ge(idx(0)), |k| {
            let lse = logsumexp(k, bl, v, r.clone() * idx(v));
            let xt = load_checked(bl, target_at(a, r.clone(), t.val())).cast(F64);
            let wt = load(bwt, r.clone() + idx(r0)).cast(F64);
            k.set(term, (lse - xt) * wt);
        });
        k.store(bterm, r + idx(r0), term.val());
        launches.push(Launch {
            kernel: finish(k)?,
            args: vec![
                Arg::Input(2),
                Arg::Input(3),
                Arg::Scratch(0),
                Arg::Scratch(1),
            ],
        });
    }
    let mut k = LoopBuilder::new(launch_name(name, launches.len()), 1, 1);
    let bterm = k.read(F64, &terms.shape);
    let bloss = k.write(DType::F32, &[]);
    let loss = k.var(F64, cst(0.0, F64));
    k.for_(idx(0), idx(a.rows), |k, r| {
        k.set(loss, loss.val() + load(bterm, r));
    });
    k.store(bloss, idx(0), loss.val().cast(DType::F32));
    launches.push(Launch {
        kernel: finish(k)?,
        args: vec![Arg::Scratch(1), Arg::Output(0)],
    });
    Ok(Lowered {
        launches,
        scratch: vec![a.logits(), terms],
    })
}

/// The gradients (dh, dw) scaled by dloss: per chunk the logits, then in place the logit
/// gradients `dloss * weight_i * (softmax(logits_i) - onehot(target_i))` (0 for an ignored
/// row), then `dh = dlogits w` for the chunk's rows and `dw += dlogits^T h`.
fn backward(g: &Graph, node: &Node, name: &str, chunk: usize) -> Result<Lowered, KernelError> {
    let a = Dims::of(g, node, chunk)?;
    let (hd, v, dt) = (a.hidden, a.vocab, a.dtype);
    let logits = a.logits().shape;
    let mut launches = Vec::new();
    for (ci, (r0, n)) in a.chunks().enumerate() {
        launches.push(logits_launch(
            a,
            launch_name(name, launches.len()),
            (r0, n),
        )?);

        // The logit gradients of each row, in place.
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), n, Dims::tile(3 * v));
        let bt = k.read(I64, &[a.rows]);
        let bwt = k.read(DType::F32, &[a.rows]);
        let bdl = k.read(DType::F32, &[]);
        let bl = k.write(LOGITS, &logits);
        let r = k.item();
        let row = k.var(I64, r.clone() * idx(v));
        let t = k.var(I64, load(bt, r.clone() + idx(r0)));
        k.if_else(
            t.val().ge(idx(0)),
            |k| {
                let gr = load(bdl, idx(0)).cast(F64) * load(bwt, r.clone() + idx(r0)).cast(F64);
                let gr = k.var(F64, gr);
                let lse = logsumexp(k, bl, v, row.val());
                let lse = k.var(F64, lse);
                k.for_(idx(0), idx(v), |k, j| {
                    let at = row.val() + j;
                    let x = load(bl, at.clone()).cast(F64);
                    k.store(bl, at, ((x - lse.val()).exp() * gr.val()).cast(LOGITS));
                });
                let at = k.var(I64, target_at(a, r.clone(), t.val()));
                let x = load_checked(bl, at.val()).cast(F64);
                k.store_checked(bl, at.val(), (x - gr.val()).cast(LOGITS));
            },
            |k| {
                k.for_(idx(0), idx(v), |k, j| {
                    k.store(bl, row.val() + j, cst(0.0, LOGITS));
                });
            },
        );
        launches.push(Launch {
            kernel: finish(k)?,
            args: vec![Arg::Input(2), Arg::Input(3), Arg::Input(4), Arg::Scratch(0)],
        });

        // dh of the chunk's rows, one item per row: `sum_j dlogits[r, j] w[j, :]` accumulated
        // in f64 in the row's slot of a [chunk, hidden] scratch, streaming w's rows in order.
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), n, 1);
        let bw = k.read(dt, &[v, hd]);
        let bl = k.read(LOGITS, &logits);
        let bacc = k.write(F64, &a.row_sums().shape);
        let bdh = k.write(dt, &[a.rows, hd]);
        let acc = k.var(I64, k.item() * idx(hd));
        k.for_(idx(0), idx(hd), |k, c| {
            k.store(bacc, acc.val() + c, cst(0.0, F64));
        });
        let gj = k.var(F64, cst(0.0, F64));
        k.for_(idx(0), idx(v), |k, j| {
            k.set(gj, load(bl, k.item() * idx(v) + j.clone()).cast(F64));
            let wrow = k.var(I64, j * idx(hd));
            k.for_(idx(0), idx(hd), |k, c| {
                let at = acc.val() + c.clone();
                let w = load(bw, wrow.val() + c).cast(F64);
                k.store(bacc, at.clone(), load(bacc, at) + gj.val() * w);
            });
        });
        let out = k.var(I64, (k.item() + idx(r0)) * idx(hd));
        k.for_(idx(0), idx(hd), |k, c| {
            let x = load(bacc, acc.val() + c.clone());
            k.store(bdh, out.val() + c, x.cast(dt));
        });
        launches.push(Launch {
            kernel: finish(k)?,
            args: vec![
                Arg::Input(1),
                Arg::Scratch(0),
                Arg::Scratch(1),
                Arg::Output(0),
            ],
        });

        // dw += the chunk's `dlogits^T h`: one item per element of dw.
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), v * hd, Dims::tile(n));
        let bh = k.read(dt, &[a.rows, hd]);
        let bl = k.read(LOGITS, &logits);
        let bdw = k.write(dt, &[v, hd]);
        let item = k.item();
        let j = k.var(I64, item.clone().idiv(idx(hd.max(1))));
        let col = k.var(I64, item.irem(idx(hd.max(1))) + idx(r0 * hd));
        let s = dot_loop(
            &mut k,
            n,
            |r| load(bl, r.clone() * idx(v) + j.val()),
            |r| load(bh, r * idx(hd) + col.val()),
        );
        let total = if ci == 0 {
            s
        } else {
            load(bdw, k.item()).cast(F64) + s
        };
        k.store(bdw, k.item(), total.cast(dt));
        launches.push(Launch {
            kernel: finish(k)?,
            args: vec![Arg::Input(0), Arg::Scratch(0), Arg::Output(1)],
        });
    }
    if a.rows == 0 {
        // No chunk: dw is zero (dh has no elements).
        let mut k = LoopBuilder::new(launch_name(name, 0), v * hd, 4096);
        let bdw = k.write(dt, &[v, hd]);
        k.store(bdw, k.item(), cst(0.0, dt));
        launches.push(Launch {
            kernel: finish(k)?,
            args: vec![Arg::Output(1)],
        });
    }
    Ok(Lowered {
        launches,
        scratch: vec![a.logits(), a.row_sums()],
    })
}
