//! The interpreter's fused ops: each computed directly from its definition in f64 (never by
//! expanding it back into primitives), so the fusion pass is checked against an independent
//! implementation.
//!
//! The kernels live in one submodule per family; this module dispatches on the op and checks
//! that each kernel returned one buffer of the right size per declared result. Rounding to the
//! declared dtypes is the caller's (the interpreter rounds every result once).

mod attention;
mod cross_entropy;
mod moe;
mod pointwise;

use super::kernels::Buf;
use super::Val;
use crate::fused::FusedOp;
use crate::TensorType;

/// The result buffers of fused op `op` (one per result type in `out`), unrounded.
pub(super) fn eval(op: &FusedOp, a: &[&Val], out: &[&TensorType]) -> Result<Vec<Buf>, String> {
    use FusedOp::*;
    let f = Buf::F;
    let last = |v: &Val| v.ty.shape.last().copied().unwrap_or(1);
    let bufs = match op {
        RmsNorm { eps } => vec![f(pointwise::rms_norm(a[0].f(), a[1].f(), *eps))],
        LayerNorm { eps } => vec![f(pointwise::layer_norm(a[0].f(), a[1].f(), a[2].f(), *eps))],
        Softmax => vec![f(pointwise::softmax(a[0].f(), last(a[0])))],
        LogSoftmax => vec![f(pointwise::log_softmax(a[0].f(), last(a[0])))],
        SwiGlu => vec![f(pointwise::swiglu(a[0].f(), a[1].f()))],
        Gelu => vec![f(pointwise::gelu(a[0].f()))],
        Rope => vec![f(pointwise::rope(
            a[0].f(),
            &a[0].ty.shape,
            (a[1].f(), &a[1].ty.shape),
            (a[2].f(), &a[2].ty.shape),
            false,
        ))],
        Attention { scale, causal } => {
            let (dims, seg) = attention_args(a, a.len() == 4);
            vec![f(attention::forward(
                a[0].f(),
                a[1].f(),
                a[2].f(),
                seg,
                dims,
                *scale,
                *causal,
            ))]
        }
        LinearCrossEntropy { chunk } => {
            let p = ce_args(a, *chunk);
            vec![f(vec![cross_entropy::forward(&p)?])]
        }
        MoePermute { experts } => {
            let hidden = a[0].ty.shape[1];
            vec![f(moe::permute(a[0].f(), pairs(a[1]), hidden, *experts)?)]
        }
        SumSquares => vec![f(vec![a[0].f().iter().map(|&x| x * x).sum()])],
        ExpertOffsets { experts } => vec![Buf::I(moe::expert_offsets(pairs(a[0]), *experts)?)],
        GroupedMatMul => {
            let g = grouped_args(a);
            vec![f(moe::grouped_matmul(&g, a[0].f(), a[1].f())?)]
        }
        Elementwise { .. } | MatMulEpilogue { .. } => {
            return Err(format!(
                "`{}` is a program, evaluated by the interpreter's program evaluator",
                op.name()
            ))
        }
        MoeUnpermute => {
            let hidden = a[0].ty.shape[1];
            vec![f(moe::unpermute(a[0].f(), pairs(a[1]), a[2].f(), hidden)?)]
        }
        RmsNormGrad { eps } => {
            let (dx, dw) = pointwise::rms_norm_grad(a[0].f(), a[1].f(), a[2].f(), *eps);
            vec![f(dx), f(dw)]
        }
        LayerNormGrad { eps } => {
            let (dx, dw, db) = pointwise::layer_norm_grad(a[0].f(), a[1].f(), a[2].f(), *eps);
            vec![f(dx), f(dw), f(db)]
        }
        SoftmaxGrad => vec![f(pointwise::softmax_grad(a[0].f(), a[1].f(), last(a[0])))],
        LogSoftmaxGrad => vec![f(pointwise::log_softmax_grad(
            a[0].f(),
            a[1].f(),
            last(a[0]),
        ))],
        SwiGluGrad => {
            let (dg, du) = pointwise::swiglu_grad(a[0].f(), a[1].f(), a[2].f());
            vec![f(dg), f(du)]
        }
        GeluGrad => vec![f(pointwise::gelu_grad(a[0].f(), a[1].f()))],
        RopeGrad => vec![f(pointwise::rope(
            a[0].f(),
            &a[0].ty.shape,
            (a[1].f(), &a[1].ty.shape),
            (a[2].f(), &a[2].ty.shape),
            true,
        ))],
        AttentionGrad { scale, causal } => {
            let (dims, seg) = attention_args(a, a.len() == 5);
            let d_out = a[a.len() - 1].f();
            let (dq, dk, dv) = attention::backward(
                a[0].f(),
                a[1].f(),
                a[2].f(),
                seg,
                d_out,
                dims,
                *scale,
                *causal,
            );
            vec![f(dq), f(dk), f(dv)]
        }
        LinearCrossEntropyGrad { chunk } => {
            let p = ce_args(a, *chunk);
            let (dh, dw) = cross_entropy::backward(&p, a[4].f()[0])?;
            vec![f(dh), f(dw)]
        }
        LinearCrossEntropyWithGrad { chunk } => {
            let p = ce_args(a, *chunk);
            let loss = cross_entropy::forward(&p)?;
            let (dh, mut dw) = cross_entropy::backward(&p, a[4].f()[0])?;
            if let Some(base) = a.get(5) {
                dw.iter_mut().zip(base.f()).for_each(|(d, b)| *d += b);
            }
            vec![f(vec![loss]), f(dh), f(dw)]
        }
        GroupedMatMulGrad => {
            let g = grouped_args(a);
            let (dxs, dw) = moe::grouped_matmul_grad(&g, a[0].f(), a[1].f(), a[3].f())?;
            vec![f(dxs), f(dw)]
        }
        MoePermuteGrad => {
            let hidden = a[0].ty.shape[1];
            vec![f(moe::permute_grad(a[0].f(), pairs(a[1]), hidden)?)]
        }
        MoeUnpermuteGrad => {
            let hidden = a[0].ty.shape[1];
            let (dys, dw) = moe::unpermute_grad(a[0].f(), pairs(a[1]), a[2].f(), a[3].f(), hidden)?;
            vec![f(dys), f(dw)]
        }
    };
    debug_assert!(
        bufs.len() == out.len()
            && bufs.iter().zip(out).all(|(b, t)| match b {
                Buf::F(v) => v.len() == t.numel(),
                Buf::I(v) => v.len() == t.numel(),
            }),
        "`{}` returned buffers that do not match its result types",
        op.name()
    );
    Ok(bufs)
}

/// The dimensions of an attention (q [b, hq, s, d], k/v [b, hkv, s, d]) and its segment ids.
fn attention_args<'v>(a: &[&'v Val], has_seg: bool) -> (attention::Dims, Option<&'v [i64]>) {
    let (q, k) = (&a[0].ty.shape, &a[1].ty.shape);
    let dims = attention::Dims {
        batch: q[0],
        q_heads: q[1],
        kv_heads: k[1],
        seq: q[2],
        head_dim: q[3],
    };
    (dims, has_seg.then(|| a[3].i()))
}

/// The operands of a linear cross-entropy (h, w, target, weight).
fn ce_args<'v>(a: &[&'v Val], chunk: usize) -> cross_entropy::Problem<'v> {
    let (h, w) = (&a[0].ty.shape, &a[1].ty.shape);
    cross_entropy::Problem {
        h: a[0].f(),
        w: a[1].f(),
        target: a[2].i(),
        weight: a[3].f(),
        rows: h[0],
        hidden: h[1],
        vocab: w[0],
        chunk,
    }
}

/// The routing operand `top` [tokens, k] of the MoE ops.
fn pairs<'v>(top: &'v Val) -> moe::Pairs<'v> {
    moe::Pairs {
        top: top.i(),
        tokens: top.ty.shape[0],
        k: top.ty.shape[1],
    }
}

/// The shape of a grouped matmul (xs [n, a], w [E, a, c], offsets [E+1]).
fn grouped_args<'v>(a: &[&'v Val]) -> moe::Grouped<'v> {
    let (xs, w) = (&a[0].ty.shape, &a[1].ty.shape);
    moe::Grouped {
        rows: xs[0],
        inner: xs[1],
        cols: w[2],
        experts: w[0],
        offsets: a[2].i(),
    }
}

/// `c = a b + beta c` for an m x k matrix `a` and a k x n matrix `b`, each given as a slice
/// with its row and column strides (so transposes cost nothing); `c` is m x n, row-major.
///
/// # Panics
/// If a slice is too short for its matrix: callers pass views of buffers whose sizes the
/// verifier checked, so that is a bug here, never a user error.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, k, n): (usize, usize, usize),
    a: &[f64],
    (rsa, csa): (usize, usize),
    b: &[f64],
    (rsb, csb): (usize, usize),
    beta: f64,
    c: &mut [f64],
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= m * n, "gemm: the result slice is too short");
    if k == 0 {
        let c = &mut c[..m * n];
        if beta == 0.0 {
            c.fill(0.0);
        } else {
            c.iter_mut().for_each(|x| *x *= beta);
        }
        return;
    }
    let need = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(a.len() > need(m, k, rsa, csa), "gemm: a is too short");
    assert!(b.len() > need(k, n, rsb, csb), "gemm: b is too short");
    // SAFETY: the assertions above keep every element the strides address inside `a`, `b` and
    // `c`; `c` is a unique borrow, so it aliases neither operand.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// The dot product of two equally long slices, in four independent partial sums so that the
/// compiler can keep them in vector registers (the attention kernels are made of these).
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f64 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    let mut acc = [0.0f64; 4];
    for (a, b) in xc.zip(yc) {
        for i in 0..4 {
            acc[i] += a[i] * b[i];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}
