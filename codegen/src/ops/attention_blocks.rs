//! Attention on library GEMMs, for sequences long enough that the products dominate: per
//! query head and block of query rows, the block's scores `q k^T` are a GEMM into a
//! [rows, seq] scratch, a row kernel turns them into probabilities in place (scale, causal
//! and segment masks, softmax), and a second GEMM multiplies them with the values. With
//! causal masking a block only multiplies the keys up to its last row. The backward
//! recomputes the block's probabilities the same way, then `dp = do v^T` (GEMM), the score
//! gradients `ds = p (dp - delta) scale` with `delta = rowsum(p dp)` (row kernel), and
//! `dq = ds k`, `dk += ds^T q`, `dv += p^T do` (GEMMs; dk and dv are zeroed first and summed
//! over the blocks and the query heads of their kv head).
//!
//! The row work is in the inputs' dtype (f32 for an f32 model, as PyTorch computes
//! attention; f32 exponentials by the approximate exp, within a few units in the last place),
//! with the exponentials' sum in f64; the interpreter's one-row-at-a-time form in
//! `attention.rs` stays for short sequences, where a launch per head would cost more than it
//! saves.
//!
//! Non-finite inputs: a row whose maximum score is not finite is NaN, as in the
//! interpreter, forward and backward (its dq, the dk of the keys it sees, and the dv of its
//! whole kv head). Because the GEMMs multiply masked zeros too, a NaN or infinity in q, k, v
//! or do can make more gradient elements NaN than the interpreter's (as with PyTorch's
//! attention), never fewer.

use super::{launch_name, Arg, Launch, Lowered};
use crate::kernel::{Access, Buffer, GeneratedKernel, KernelError};
use crate::library::{Float, LibraryCall, View};
use crate::loops::{cst, idx, load, select, Expr, LoopBuilder};
use mmc_ir::{BinaryOp, CmpOp, DType, Graph, Node, TensorType};

const F64: DType = DType::F64;
const I64: DType = DType::I64;

/// Sequences from this length on take the GEMM form.
pub(super) const MIN_SEQ: usize = 64;

/// Score elements per block: the block's [rows, seq] scores stay within 1 MiB of f32 (an L2
/// cache), at least 16 rows.
const BLOCK_ELEMENTS: usize = 1 << 20;

/// An attention's sizes (`attention::Dims`: q [batch, q_heads, seq, d], k and v
/// [batch, kv_heads, seq, d]) and what the GEMM form adds: the dtype, the rows per block and
/// the op's attributes.
#[derive(Clone, Copy, Debug)]
struct Dims {
    shape: super::attention::Dims,
    dtype: DType,
    float: Float,
    /// The scores' and probabilities' type, and of the sums over blocks (dk, dv): the
    /// products' accumulator (f32 for a bf16 model).
    acc: Float,
    /// Query rows per block.
    rows: usize,
    scale: f64,
    causal: bool,
    segments: bool,
}

impl Dims {
    fn of(
        g: &Graph,
        node: &Node,
        (scale, causal): (f64, bool),
        segments: bool,
    ) -> Result<Dims, KernelError> {
        let (q, k): (&TensorType, &TensorType) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
        let Some(float) = Float::of(q.dtype) else {
            return Err(KernelError::Dtype {
                op: node.op.name(),
                dtype: q.dtype,
            });
        };
        let shape = super::attention::Dims::of(q, k);
        let seq = shape.seq;
        Ok(Dims {
            shape,
            dtype: q.dtype,
            float,
            acc: float.accumulator(),
            rows: (BLOCK_ELEMENTS / seq.max(1)).clamp(16, seq.max(1)),
            scale,
            causal,
            segments,
        })
    }

    fn q_len(&self) -> usize {
        self.shape.batch * self.shape.q_heads * self.shape.seq * self.shape.d
    }

    fn kv_len(&self) -> usize {
        self.shape.batch * self.shape.kv_heads * self.shape.seq * self.shape.d
    }

    /// The [rows, seq] scratch of one block's scores (or score gradients).
    fn block(&self) -> Buffer {
        Buffer {
            dtype: self.acc.dtype(),
            shape: vec![self.rows, self.shape.seq],
            access: Access::Write,
        }
    }

    /// Every (batch row, query head, first row, rows) block, in order.
    fn blocks(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::new();
        for b in 0..self.shape.batch {
            for h in 0..self.shape.q_heads {
                for i0 in (0..self.shape.seq).step_by(self.rows) {
                    out.push((b, h, i0, self.rows.min(self.shape.seq - i0)));
                }
            }
        }
        out
    }

    /// The first element of query head `h` of batch row `b` (q, o, do, dq).
    fn q_at(&self, b: usize, h: usize) -> usize {
        (b * self.shape.q_heads + h) * self.shape.seq * self.shape.d
    }

    /// The first element of the kv head that query head `h` of batch row `b` reads.
    fn kv_at(&self, b: usize, h: usize) -> usize {
        (b * self.shape.kv_heads + h / self.shape.group.max(1)) * self.shape.seq * self.shape.d
    }

    /// The keys a block of rows `i0..i0 + n` sees: up to its last row when causal.
    fn keys(&self, i0: usize, n: usize) -> usize {
        if self.causal {
            i0 + n
        } else {
            self.shape.seq
        }
    }

    /// `scores[0..n, 0..keys] = q_block k^T` for the block.
    fn scores(&self, (b, h, i0, n): (usize, usize, usize, usize), q: Arg, k: Arg) -> Launch {
        let d = self.shape.d;
        let call = LibraryCall::gemm(
            [self.float, self.float, self.acc],
            (n, d, self.keys(i0, n)),
            (
                View::rows(self.q_at(b, h) + i0 * d, d),
                View::transposed(self.kv_at(b, h), d),
                View::rows(0, self.shape.seq),
            ),
            [self.q_len(), self.kv_len(), self.rows * self.shape.seq],
            false,
        );
        Launch::library(call, vec![q, k, Arg::Scratch(0)])
    }
}

fn finish(k: LoopBuilder) -> Result<GeneratedKernel, KernelError> {
    k.finish()
        .map(Into::into)
        .map_err(|e| KernelError::Invalid(e.to_string()))
}

/// `x` is not finite (NaN or infinite).
fn not_finite(x: Expr) -> Expr {
    (x.clone() - x).cmp(CmpOp::Ne, cst(0.0, F64))
}

/// The row kernel turning a block's scores into probabilities in place: per row `i`, the
/// visible keys' `score * scale` (causal: `j <= i`; segments: the same id), their maximum,
/// `exp(x - max)` summed in f64, then scaled by `1 / sum`; masked keys get 0. A row whose
/// maximum is not finite gets NaN at every key it sees and, when `flags` is given, a 1 in
/// its flag (0 otherwise). Buffers: [segment ids], scores, [flags].
fn softmax_rows(
    a: Dims,
    name: String,
    (b, h, i0, n): (usize, usize, usize, usize),
    flags: bool,
) -> Result<(GeneratedKernel, Vec<Arg>), KernelError> {
    let (dt, s, keys) = (a.acc.dtype(), a.shape.seq, a.keys(i0, n));
    let mut k = LoopBuilder::new(name, n, (4096 / keys.max(1)).max(1));
    let mut args = Vec::new();
    let bseg = a.segments.then(|| {
        args.push(Arg::Input(3));
        k.read(I64, &[a.shape.batch, s])
    });
    let bs = k.write(dt, &[a.rows, s]);
    args.push(Arg::Scratch(0));
    let bfl = flags.then(|| {
        args.push(Arg::Scratch(2));
        k.write(I64, &[a.shape.batch * a.shape.q_heads * s])
    });
    let r = k.item();
    let i = k.var(I64, r.clone() + idx(i0));
    let row = k.var(I64, r * idx(s));
    let own = bseg.map(|seg| k.var(I64, load(seg, idx(b * s) + i.val())));
    let visible = |j: Expr| {
        let mut v = if a.causal {
            Some(j.clone().cmp(CmpOp::Le, i.val()))
        } else {
            None
        };
        if let (Some(seg), Some(own)) = (bseg, own) {
            let same = load(seg, idx(b * s) + j).eq(own.val());
            v = Some(match v {
                Some(c) => c.binary(BinaryOp::And, same),
                None => same,
            });
        }
        v
    };
    let masked = |j: Expr, x: Expr, other: Expr| match visible(j) {
        Some(v) => select(v, x, other),
        None => x,
    };
    let m = k.var(dt, cst(f64::NEG_INFINITY, dt));
    k.for_(idx(0), idx(keys), |k, j| {
        let x = load(bs, row.val() + j.clone()) * cst(a.scale, dt);
        k.set(m, m.val().max(masked(j, x, cst(f64::NEG_INFINITY, dt))));
    });
    let bad = k.var(DType::Bool, not_finite(m.val().cast(F64)));
    let flag_at = idx((b * a.shape.q_heads + h) * s) + i.val();
    k.if_else(
        bad.val(),
        |k| {
            k.for_(idx(0), idx(keys), |k, j| {
                let v = masked(j.clone(), cst(f64::NAN, dt), cst(0.0, dt));
                k.store(bs, row.val() + j, v);
            });
            if let Some(f) = bfl {
                k.store(f, flag_at.clone(), idx(1));
            }
        },
        |k| {
            let sum = k.var(F64, cst(0.0, F64));
            k.for_(idx(0), idx(keys), |k, j| {
                let at = row.val() + j.clone();
                let x = load(bs, at.clone()) * cst(a.scale, dt);
                let e = k.var(dt, masked(j, (x - m.val()).exp_approx(), cst(0.0, dt)));
                k.store(bs, at, e.val());
                k.accumulate(sum, e.val().cast(F64));
            });
            let inv = k.var(dt, (cst(1.0, F64) / sum.val()).cast(dt));
            k.for_(idx(0), idx(keys), |k, j| {
                let at = row.val() + j;
                k.store(bs, at.clone(), load(bs, at) * inv.val());
            });
            if let Some(f) = bfl {
                k.store(f, flag_at.clone(), idx(0));
            }
        },
    );
    Ok((finish(k)?, args))
}

/// The forward: per block, the scores, the probabilities, and `o_block = p v`.
pub(super) fn forward(
    g: &Graph,
    node: &Node,
    name: &str,
    attrs: (f64, bool),
) -> Result<Lowered, KernelError> {
    let a = Dims::of(g, node, attrs, node.inputs.len() == 4)?;
    let d = a.shape.d;
    let mut launches = Vec::new();
    for blk in a.blocks() {
        let (b, h, i0, n) = blk;
        launches.push(a.scores(blk, Arg::Input(0), Arg::Input(1)));
        let (k, args) = softmax_rows(a, launch_name(name, launches.len()), blk, false)?;
        launches.push(Launch::kernel(k, args));
        let call = LibraryCall::gemm(
            [a.acc, a.float, a.float],
            (n, a.keys(i0, n), d),
            (
                View::rows(0, a.shape.seq),
                View::rows(a.kv_at(b, h), d),
                View::rows(a.q_at(b, h) + i0 * d, d),
            ),
            [a.rows * a.shape.seq, a.kv_len(), a.q_len()],
            false,
        );
        launches.push(Launch::library(
            call,
            vec![Arg::Scratch(0), Arg::Input(2), Arg::Output(0)],
        ));
    }
    Ok(Lowered {
        launches,
        scratch: vec![a.block()],
    })
}

/// The backward (see the module documentation). Scratch: the block's probabilities, its
/// score gradients, and a NaN-row flag per query row.
pub(super) fn backward(
    g: &Graph,
    node: &Node,
    name: &str,
    attrs: (f64, bool),
) -> Result<Lowered, KernelError> {
    let a = Dims::of(g, node, attrs, node.inputs.len() == 5)?;
    let (d, s, dt) = (a.shape.d, a.shape.seq, a.acc.dtype());
    // dk and dv sum over blocks in the outputs, or, for a bf16 model, in f32 scratch rounded
    // to bf16 once at the end.
    let sums = a.acc != a.float;
    let (dk_at, dv_at) = if sums {
        (Arg::Scratch(3), Arg::Scratch(4))
    } else {
        (Arg::Output(1), Arg::Output(2))
    };
    let d_out = Arg::Input(node.inputs.len() - 1);
    let flags = Buffer {
        dtype: I64,
        shape: vec![a.shape.batch * a.shape.q_heads * s],
        access: Access::Write,
    };
    let block_len = a.rows * s;
    let mut launches = Vec::new();

    // dk and dv are sums over blocks: zero them first.
    let mut k = LoopBuilder::new(launch_name(name, 0), a.kv_len(), 4096);
    let (bdk, bdv) = (k.write(dt, &[a.kv_len()]), k.write(dt, &[a.kv_len()]));
    k.store(bdk, k.item(), cst(0.0, dt));
    k.store(bdv, k.item(), cst(0.0, dt));
    launches.push(Launch::kernel(finish(k)?, vec![dk_at, dv_at]));

    for blk in a.blocks() {
        let (b, h, i0, n) = blk;
        let keys = a.keys(i0, n);
        let (qa, kva) = (a.q_at(b, h) + i0 * d, a.kv_at(b, h));
        launches.push(a.scores(blk, Arg::Input(0), Arg::Input(1)));
        let (k, args) = softmax_rows(a, launch_name(name, launches.len()), blk, true)?;
        launches.push(Launch::kernel(k, args));

        // dp = do_block v^T into the second scratch.
        let call = LibraryCall::gemm(
            [a.float, a.float, a.acc],
            (n, d, keys),
            (
                View::rows(qa, d),
                View::transposed(kva, d),
                View::rows(0, s),
            ),
            [a.q_len(), a.kv_len(), block_len],
            false,
        );
        launches.push(Launch::library(
            call,
            vec![d_out, Arg::Input(2), Arg::Scratch(1)],
        ));

        // ds = p (dp - delta) scale in place of dp, 0 where p is 0.
        let mut k = LoopBuilder::new(
            launch_name(name, launches.len()),
            n,
            (4096 / keys.max(1)).max(1),
        );
        let bp = k.read(dt, &[a.rows, s]);
        let bds = k.write(dt, &[a.rows, s]);
        let row = k.var(I64, k.item() * idx(s));
        let delta = k.var(F64, cst(0.0, F64));
        k.for_(idx(0), idx(keys), |k, j| {
            let at = row.val() + j;
            let p = load(bp, at.clone());
            let t = select(p.clone().eq(cst(0.0, dt)), cst(0.0, dt), p * load(bds, at));
            k.accumulate(delta, t.cast(F64));
        });
        let delta = k.var(dt, delta.val().cast(dt));
        k.for_(idx(0), idx(keys), |k, j| {
            let at = row.val() + j;
            let p = k.var(dt, load(bp, at.clone()));
            let ds = (load(bds, at.clone()) - delta.val()) * p.val() * cst(a.scale, dt);
            let ds = select(p.val().eq(cst(0.0, dt)), cst(0.0, dt), ds);
            k.store(bds, at, ds);
        });
        launches.push(Launch::kernel(
            finish(k)?,
            vec![Arg::Scratch(0), Arg::Scratch(1)],
        ));

        // dq_block = ds k.
        let call = LibraryCall::gemm(
            [a.acc, a.float, a.float],
            (n, keys, d),
            (View::rows(0, s), View::rows(kva, d), View::rows(qa, d)),
            [block_len, a.kv_len(), a.q_len()],
            false,
        );
        launches.push(Launch::library(
            call,
            vec![Arg::Scratch(1), Arg::Input(1), Arg::Output(0)],
        ));
        // dk += ds^T q_block and dv += p^T do_block: the same product over the key rows.
        for (lhs, rhs, out) in [
            (Arg::Scratch(1), Arg::Input(0), dk_at),
            (Arg::Scratch(0), d_out, dv_at),
        ] {
            let call = LibraryCall::gemm(
                [a.acc, a.float, a.acc],
                (keys, n, d),
                (
                    View::transposed(0, s),
                    View::rows(qa, d),
                    View::rows(kva, d),
                ),
                [block_len, a.q_len(), a.kv_len()],
                true,
            );
            launches.push(Launch::library(call, vec![lhs, rhs, out]));
        }
    }

    // A NaN row makes the dv of its whole kv head NaN (the interpreter's rule).
    let mut k = LoopBuilder::new(
        launch_name(name, launches.len()),
        a.shape.batch * a.shape.kv_heads,
        1,
    );
    let bfl = k.read(I64, &flags.shape);
    let bdv = k.write(dt, &[a.kv_len()]);
    let bkv = k.item();
    let first = k.var(
        I64,
        (bkv.clone().idiv(idx(a.shape.kv_heads.max(1))) * idx(a.shape.q_heads)
            + bkv.clone().irem(idx(a.shape.kv_heads.max(1))) * idx(a.shape.group))
            * idx(s),
    );
    let count = k.var(I64, idx(0));
    k.for_(first.val(), first.val() + idx(a.shape.group * s), |k, r| {
        k.accumulate(count, load(bfl, r));
    });
    k.if_(count.val().cmp(CmpOp::Gt, idx(0)), |k| {
        let base = k.var(I64, bkv * idx(s * d));
        k.for_(idx(0), idx(s * d), |k, e| {
            k.store(bdv, base.val() + e, cst(f64::NAN, dt));
        });
    });
    launches.push(Launch::kernel(finish(k)?, vec![Arg::Scratch(2), dv_at]));

    let mut scratch = vec![a.block(), a.block(), flags];
    if sums {
        let sum = Buffer {
            dtype: dt,
            shape: vec![a.kv_len()],
            access: Access::Write,
        };
        let mut k = LoopBuilder::new(launch_name(name, launches.len()), a.kv_len(), 4096);
        let (sk, sv) = (k.read(dt, &sum.shape), k.read(dt, &sum.shape));
        let (bdk, bdv) = (k.write(a.dtype, &sum.shape), k.write(a.dtype, &sum.shape));
        k.store(bdk, k.item(), load(sk, k.item()).cast(a.dtype));
        k.store(bdv, k.item(), load(sv, k.item()).cast(a.dtype));
        launches.push(Launch::kernel(
            finish(k)?,
            vec![dk_at, dv_at, Arg::Output(1), Arg::Output(2)],
        ));
        scratch.extend([sum.clone(), sum]);
    }
    Ok(Lowered { launches, scratch })
}
