//! The LM head fused with the weighted cross-entropy, forward and backward, `chunk` rows at a
//! time as the interpreter computes it (`ir/src/interp/fused/cross_entropy.rs`): the largest
//! buffer is one chunk's logits, a [chunk, vocab] scratch, never [rows, vocab].
//!
//! The products are library GEMMs over views of the operands (a chunk's rows of h, w read
//! transposed in place); the loop kernels between them do the row work. Forward, per chunk:
//! the logits `h w^T` into the scratch, then each row's loss term. Backward, per chunk: the
//! logits, the logit gradients in place, then `dh = dlogits w` for the chunk's rows and
//! `dw += dlogits^T h`. Both at once (`fused.linear_cross_entropy_with_grad`, a training
//! step's loss) are the backward with each row's loss term taken from the logits before they
//! become gradients: one logits GEMM per chunk instead of two; with a dw base (an
//! accumulator) dw sums onto a copy of it, a copy dropped when dw is the base itself. A row
//! whose target is negative is ignored; a target at or above the vocabulary size is refused
//! by a checked load (it addresses past the chunk's logits), as the interpreter refuses it.
//!
//! Precision: the logits are in the inputs' dtype (f32 for an f32 model, as PyTorch computes
//! them), f32 for a bf16 model (the GEMMs accumulate in f32, and the logits are not rounded
//! to bf16, as the interpreter's fused op does not round them); each row's maximum and
//! exponentials are in the logits' dtype too (f32 by the approximate exp), their sums and the
//! loss terms f64. dw sums over chunks in its own dtype, rounded once per chunk; for a bf16
//! model over more than one chunk it sums in an f32 scratch, rounded to bf16 once at the end.

use super::{launch_name, Arg, Launch, Lowered};
use crate::kernel::{Access, Buffer, GeneratedKernel, KernelError};
use crate::library::{Float, LibraryCall, View};
use crate::loops::{cst, idx, load, load_checked, select, Expr, LoopBuilder};
use mmc_ir::{DType, FusedOp, Graph, Node, Op};

const F64: DType = DType::F64;
const I64: DType = DType::I64;

/// The lowering of `node` if it is a linear cross-entropy, its backward, or both at once.
pub(super) fn lower(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    match &node.op {
        Op::Fused(FusedOp::LinearCrossEntropy { chunk }) => Some(forward(g, node, name, *chunk)),
        Op::Fused(FusedOp::LinearCrossEntropyGrad { chunk }) => {
            Some(backward(g, node, name, *chunk, false))
        }
        Op::Fused(FusedOp::LinearCrossEntropyWithGrad { chunk }) => {
            Some(backward(g, node, name, *chunk, true))
        }
        _ => None,
    }
}

/// The sizes of a linear cross-entropy: h [rows, hidden], w [vocab, hidden], and the rows per
/// chunk (at least 1, at most the rows).
#[derive(Clone, Copy, Debug)]
struct Dims {
    dtype: DType,
    float: Float,
    /// The logits' type (the products' accumulator: f32 for bf16).
    logit: Float,
    rows: usize,
    hidden: usize,
    vocab: usize,
    chunk: usize,
}

impl Dims {
    fn of(g: &Graph, node: &Node, chunk: usize) -> Result<Dims, KernelError> {
        let (h, w) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
        let Some(float) = Float::of(h.dtype) else {
            return Err(KernelError::Dtype {
                op: node.op.name(),
                dtype: h.dtype,
            });
        };
        let rows = h.shape[0];
        Ok(Dims {
            dtype: h.dtype,
            float,
            logit: float.accumulator(),
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
            dtype: self.logit.dtype(),
            shape: vec![self.chunk, self.vocab],
            access: Access::Write,
        }
    }

    /// Elements of h (and dh), w (and dw) and the logits scratch.
    fn lens(&self) -> (usize, usize, usize) {
        (
            self.rows * self.hidden,
            self.vocab * self.hidden,
            self.chunk * self.vocab,
        )
    }

    /// The launch writing the logits `h w^T` of the `n` rows from `r0` into the scratch.
    fn logits_launch(&self, (r0, n): (usize, usize)) -> Launch {
        let (hd, v) = (self.hidden, self.vocab);
        let (lh, lw, ll) = self.lens();
        let call = LibraryCall::gemm(
            [self.float, self.float, self.logit],
            (n, hd, v),
            (
                View::rows(r0 * hd, hd),
                View::transposed(0, hd),
                View::rows(0, v),
            ),
            [lh, lw, ll],
            false,
        );
        Launch::library(call, vec![Arg::Input(0), Arg::Input(1), Arg::Scratch(0)])
    }

    /// Rows per tile of a row loop over the vocabulary: enough rows for about 64 K logits.
    fn rows_per_tile(&self) -> usize {
        (65536 / self.vocab.max(1)).max(1)
    }
}

fn finish(k: LoopBuilder) -> Result<GeneratedKernel, KernelError> {
    k.finish()
        .map(Into::into)
        .map_err(|e| KernelError::Invalid(e.to_string()))
}

/// The logsumexp of the `v` logits of buffer `bl` from element `row` (`max + log(sum(exp(x -
/// max)))`, the maximum NaN if any logit is): the exponentials in the logits' dtype (f32's
/// approximate exp, within a few units in the last place), summed in f64 in any order.
fn logsumexp(k: &mut LoopBuilder, bl: usize, dt: DType, v: usize, row: Expr) -> Expr {
    let m = k.var(dt, cst(f64::NEG_INFINITY, dt));
    k.for_(idx(0), idx(v), |k, c| {
        k.set(m, m.val().max(load(bl, row.clone() + c)));
    });
    let s = k.var(F64, cst(0.0, F64));
    k.for_(idx(0), idx(v), |k, c| {
        let e = (load(bl, row.clone() + c) - m.val()).exp_approx();
        k.accumulate(s, e.cast(F64));
    });
    s.val().log() + m.val().cast(F64)
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

/// The [rows] f64 scratch of each row's loss term.
fn terms(a: Dims) -> Buffer {
    Buffer {
        dtype: F64,
        shape: vec![a.rows],
        access: Access::Write,
    }
}

/// The launch summing the loss terms of scratch `terms` in row order into the f32 scalar
/// output `loss`.
fn sum_terms(
    a: Dims,
    name: &str,
    at: usize,
    terms: usize,
    loss: usize,
) -> Result<Launch, KernelError> {
    let mut k = LoopBuilder::new(launch_name(name, at), 1, 1);
    let bterm = k.read(F64, &[a.rows]);
    let bloss = k.write(DType::F32, &[]);
    let sum = k.var(F64, cst(0.0, F64));
    k.for_(idx(0), idx(a.rows), |k, r| {
        k.set(sum, sum.val() + load(bterm, r));
    });
    k.store(bloss, idx(0), sum.val().cast(DType::F32));
    Ok(Launch::kernel(
        finish(k)?,
        vec![Arg::Scratch(terms), Arg::Output(loss)],
    ))
}

/// `sum_i weight_i * (logsumexp(h_i w^T) - (h_i w^T)[target_i])` over the rows whose target is
/// not negative, into an f32 scalar: per chunk the logits, then the loss terms per row into a
/// [rows] scratch, and a last launch sums them in row order.
fn forward(g: &Graph, node: &Node, name: &str, chunk: usize) -> Result<Lowered, KernelError> {
    let a = Dims::of(g, node, chunk)?;
    let (v, dt) = (a.vocab, a.logit.dtype());
    let mut launches = Vec::new();
    for (r0, n) in a.chunks() {
        launches.push(a.logits_launch((r0, n)));
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), n, a.rows_per_tile());
        let bt = k.read(I64, &[a.rows]);
        let bwt = k.read(DType::F32, &[a.rows]);
        let bl = k.read(dt, &a.logits().shape);
        let bterm = k.write(F64, &[a.rows]);
        let r = k.item();
        let t = k.var(I64, load(bt, r.clone() + idx(r0)));
        let term = k.var(F64, cst(0.0, F64));
        k.if_(t.val().ge(idx(0)), |k| {
            let lse = logsumexp(k, bl, dt, v, r.clone() * idx(v));
            let xt = load_checked(bl, target_at(a, r.clone(), t.val())).cast(F64);
            let wt = load(bwt, r.clone() + idx(r0)).cast(F64);
            k.set(term, (lse - xt) * wt);
        });
        k.store(bterm, r + idx(r0), term.val());
        launches.push(Launch::kernel(
            finish(k)?,
            vec![
                Arg::Input(2),
                Arg::Input(3),
                Arg::Scratch(0),
                Arg::Scratch(1),
            ],
        ));
    }
    launches.push(sum_terms(a, name, launches.len(), 1, 0)?);
    Ok(Lowered {
        launches,
        scratch: vec![a.logits(), terms(a)],
    })
}

/// The gradients (dh, dw) scaled by dloss, and with `with_loss` the loss before them (as
/// [`forward`] computes it, from the same logits) and dw added to its base when the node has
/// one: per chunk the logits, then per row its
/// loss term and in place the logit gradients `dloss * weight_i * (softmax(logits_i) -
/// onehot(target_i))` (0 for an ignored row), then `dh = dlogits w` for the chunk's rows and
/// `dw += dlogits^T h` (`=` for the first chunk).
fn backward(
    g: &Graph,
    node: &Node,
    name: &str,
    chunk: usize,
    with_loss: bool,
) -> Result<Lowered, KernelError> {
    let a = Dims::of(g, node, chunk)?;
    let (hd, v, dt) = (a.hidden, a.vocab, a.logit.dtype());
    let (lh, lw, ll) = a.lens();
    let logits = a.logits().shape;
    let mut scratch = vec![a.logits()];
    // The results: the loss first when it is computed.
    let (dh_out, dw_out) = if with_loss { (1, 2) } else { (0, 1) };
    let terms_at = with_loss.then(|| {
        scratch.push(terms(a));
        scratch.len() - 1
    });
    // dw's sum over chunks: in dw itself, or in an f32 scratch for a bf16 model.
    let dw_sum = (a.logit != a.float && a.chunks().count() > 1).then(|| {
        scratch.push(Buffer {
            dtype: a.logit.dtype(),
            shape: vec![v, hd],
            access: Access::Write,
        });
        scratch.len() - 1
    });
    let (dw_arg, dw_float) = match dw_sum {
        Some(s) => (Arg::Scratch(s), a.logit),
        None => (Arg::Output(dw_out), a.float),
    };
    let mut launches = Vec::new();
    // A base of dw (an accumulator) is copied where dw sums, and every chunk adds to it; the
    // copy is dropped when dw is the base itself, updated in place.
    let base = node.inputs.len() == 6;
    if base {
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), v * hd, 4096);
        let bb = k.read(a.dtype, &[v, hd]);
        let bd = k.write(dw_float.dtype(), &[v, hd]);
        k.store(bd, k.item(), load(bb, k.item()).cast(dw_float.dtype()));
        let k = finish(k)?;
        launches.push(match dw_sum {
            Some(_) => Launch::kernel(k, vec![Arg::Input(5), dw_arg]),
            None => Launch::copy(k, [Arg::Input(5), dw_arg]),
        });
    }
    for (ci, (r0, n)) in a.chunks().enumerate() {
        launches.push(a.logits_launch((r0, n)));

        // The logit gradients of each row, in place: the maximum, then `exp(x - max)`
        // stored while it is summed (the loss term read from them first), then scaled by
        // `dloss * weight / sum` (one exponential per logit).
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), n, a.rows_per_tile());
        let bt = k.read(I64, &[a.rows]);
        let bwt = k.read(DType::F32, &[a.rows]);
        let bdl = k.read(DType::F32, &[]);
        let bl = k.write(dt, &logits);
        let bterm = terms_at.map(|_| k.write(F64, &[a.rows]));
        let r = k.item();
        let row = k.var(I64, r.clone() * idx(v));
        let t = k.var(I64, load(bt, r.clone() + idx(r0)));
        k.if_else(
            t.val().ge(idx(0)),
            |k| {
                let wt = k.var(F64, load(bwt, r.clone() + idx(r0)).cast(F64));
                let gr = k.var(F64, load(bdl, idx(0)).cast(F64) * wt.val());
                let m = k.var(dt, cst(f64::NEG_INFINITY, dt));
                k.for_(idx(0), idx(v), |k, j| {
                    k.set(m, m.val().max(load(bl, row.val() + j)));
                });
                let at = k.var(I64, target_at(a, r.clone(), t.val()));
                let xt = k.var(F64, load_checked(bl, at.val()).cast(F64));
                let s = k.var(F64, cst(0.0, F64));
                k.for_(idx(0), idx(v), |k, j| {
                    let at = row.val() + j;
                    let e = k.var(dt, (load(bl, at.clone()) - m.val()).exp_approx());
                    k.store(bl, at, e.val());
                    k.accumulate(s, e.val().cast(F64));
                });
                if let Some(bterm) = bterm {
                    let lse = s.val().log() + m.val().cast(F64);
                    k.store(bterm, r.clone() + idx(r0), (lse - xt.val()) * wt.val());
                }
                let scale = k.var(dt, (gr.val() / s.val()).cast(dt));
                k.for_(idx(0), idx(v), |k, j| {
                    let at = row.val() + j;
                    k.store(bl, at.clone(), load(bl, at) * scale.val());
                });
                let x = load_checked(bl, at.val()).cast(F64);
                k.store_checked(bl, at.val(), (x - gr.val()).cast(dt));
            },
            |k| {
                if let Some(bterm) = bterm {
                    k.store(bterm, r.clone() + idx(r0), cst(0.0, F64));
                }
                k.for_(idx(0), idx(v), |k, j| {
                    k.store(bl, row.val() + j, cst(0.0, dt));
                });
            },
        );
        let mut args = vec![Arg::Input(2), Arg::Input(3), Arg::Input(4), Arg::Scratch(0)];
        args.extend(terms_at.map(Arg::Scratch));
        launches.push(Launch::kernel(finish(k)?, args));

        // dh of the chunk's rows: dlogits [n, v] @ w [v, hd].
        let dh = LibraryCall::gemm(
            [a.logit, a.float, a.float],
            (n, v, hd),
            (View::rows(0, v), View::rows(0, hd), View::rows(r0 * hd, hd)),
            [ll, lw, lh],
            false,
        );
        launches.push(Launch::library(
            dh,
            vec![Arg::Scratch(0), Arg::Input(1), Arg::Output(dh_out)],
        ));

        // dw (+)= dlogits^T [v, n] @ h [n, hd] of the chunk's rows.
        let dw = LibraryCall::gemm(
            [a.logit, a.float, dw_float],
            (v, n, hd),
            (
                View::transposed(0, v),
                View::rows(r0 * hd, hd),
                View::rows(0, hd),
            ),
            [ll, lh, lw],
            base || ci > 0,
        );
        launches.push(Launch::library(
            dw,
            vec![Arg::Scratch(0), Arg::Input(0), dw_arg],
        ));
    }
    if let Some(sum) = dw_sum {
        // dw rounded once from its f32 sum.
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), v * hd, 4096);
        let bs = k.read(a.logit.dtype(), &[v, hd]);
        let bdw = k.write(a.dtype, &[v, hd]);
        k.store(bdw, k.item(), load(bs, k.item()).cast(a.dtype));
        launches.push(Launch::kernel(
            finish(k)?,
            vec![Arg::Scratch(sum), Arg::Output(dw_out)],
        ));
    }
    if a.rows == 0 && !base {
        // No chunk: dw is zero (dh has no elements).
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), v * hd, 4096);
        let bdw = k.write(a.dtype, &[v, hd]);
        k.store(bdw, k.item(), cst(0.0, a.dtype));
        launches.push(Launch::kernel(finish(k)?, vec![Arg::Output(dw_out)]));
    }
    if let Some(terms) = terms_at {
        launches.push(sum_terms(a, name, launches.len(), terms, 0)?);
    }
    Ok(Lowered { launches, scratch })
}
