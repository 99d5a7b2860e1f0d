//! The row and pointwise fused ops' kernels (norms, softmax, log-softmax, SwiGLU, GELU, RoPE,
//! forward and backward) against the interpreter, over f32, f64 and bf16, on 1 and 2 threads.
//!
//! The shapes cover a row longer than a tile (4,100 elements), many short rows, odd sizes,
//! and column sums of more than one column block (the weight gradients). The kernels follow
//! the interpreter's f64 arithmetic and summation order, so every op but GELU must agree bit
//! for bit (tolerance 0; bf16 too, each result rounded through f32 as the interpreter rounds
//! it); GELU's `erf` is the C library's, the interpreter's the `libm` crate's, which may
//! differ in the last f64 bit (and so, rarely, by a unit of a bf16 result).

mod common;

use common::check;
use mmc_ir::{DType, FusedOp, Op, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DTYPES: [DType; 3] = [DType::F32, DType::F64, DType::BF16];

/// The shapes every row op runs on: a row longer than a tile, many short rows, odd sizes,
/// more than one column block of the weight gradients (130 > 64 columns), a single element.
const SHAPES: [&[usize]; 6] = [&[3, 4100], &[2, 37, 9], &[37, 130], &[5, 1], &[1, 7], &[1]];

/// Random values in `[-scale, scale)` of `dtype` and `shape`, seeded.
fn uniform(dtype: DType, shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_f64(dtype, shape.to_vec(), &v).expect("sizes agree")
}

/// A tensor of the given values.
fn tensor(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::from_f64(dtype, shape.to_vec(), v).expect("sizes agree")
}

fn last(shape: &[usize]) -> usize {
    *shape.last().expect("rank >= 1")
}

#[test]
fn rms_norm_grad_matches_the_interpreter() {
    for d in DTYPES {
        for (s, shape) in SHAPES.iter().enumerate() {
            let s = s as u64;
            let x = uniform(d, shape, 10 + s, 2.0);
            let w = uniform(d, &[last(shape)], 20 + s, 2.0);
            let dy = uniform(d, shape, 30 + s, 2.0);
            check(
                Op::Fused(FusedOp::RmsNormGrad { eps: 1e-6 }),
                &[x, w, dy],
                0.0,
            );
        }
    }
}

#[test]
fn layer_norm_matches_the_interpreter() {
    for d in DTYPES {
        for (s, shape) in SHAPES.iter().enumerate() {
            let s = s as u64;
            // An offset mean, so that the centring matters.
            let x = uniform(d, shape, 40 + s, 3.0);
            let w = uniform(d, &[last(shape)], 50 + s, 2.0);
            let b = uniform(d, &[last(shape)], 60 + s, 2.0);
            check(Op::Fused(FusedOp::LayerNorm { eps: 1e-5 }), &[x, w, b], 0.0);
        }
    }
}

#[test]
fn layer_norm_grad_matches_the_interpreter() {
    for d in DTYPES {
        for (s, shape) in SHAPES.iter().enumerate() {
            let s = s as u64;
            let x = uniform(d, shape, 70 + s, 3.0);
            let w = uniform(d, &[last(shape)], 80 + s, 2.0);
            let dy = uniform(d, shape, 90 + s, 2.0);
            check(
                Op::Fused(FusedOp::LayerNormGrad { eps: 1e-5 }),
                &[x, w, dy],
                0.0,
            );
        }
    }
}

#[test]
fn rms_norm_matches_the_interpreter_on_every_shape() {
    for d in DTYPES {
        for (s, shape) in SHAPES.iter().enumerate() {
            let s = s as u64;
            let x = uniform(d, shape, 100 + s, 2.0);
            let w = uniform(d, &[last(shape)], 110 + s, 2.0);
            check(Op::Fused(FusedOp::RmsNorm { eps: 1e-6 }), &[x, w], 0.0);
        }
    }
}

/// Softmax and log-softmax over rows of large magnitudes (±80: `exp` overflows f32 without
/// the max shift), and over rows with -inf entries and a row of all -inf (NaN, as the
/// interpreter's).
#[test]
fn softmax_and_log_softmax_match_the_interpreter() {
    for d in DTYPES {
        for op in [FusedOp::Softmax, FusedOp::LogSoftmax] {
            for (s, shape) in SHAPES.iter().enumerate() {
                let x = uniform(d, shape, 120 + s as u64, 80.0);
                check(Op::Fused(op.clone()), &[x], 0.0);
            }
            let inf = f64::NEG_INFINITY;
            let masked = tensor(
                d,
                &[3, 4],
                &[
                    1.0, inf, 3.0, -2.0, inf, inf, inf, inf, 0.5, 88.0, -88.0, inf,
                ],
            );
            check(Op::Fused(op.clone()), &[masked], 0.0);
        }
    }
}

/// The backward ops from a forward result (so `exp(y)` of log-softmax's is a probability)
/// and random output gradients.
#[test]
fn softmax_and_log_softmax_grads_match_the_interpreter() {
    for d in DTYPES {
        for (s, shape) in SHAPES.iter().enumerate() {
            let s = s as u64;
            let n: usize = shape.iter().product();
            let rows = n / last(shape);
            let x = uniform(DType::F64, shape, 130 + s, 10.0).to_f64_vec();
            let (mut p, mut lp) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for row in x.chunks(last(shape)).take(rows) {
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
                p.extend(row.iter().map(|v| (v - m).exp() / z));
                lp.extend(row.iter().map(|v| v - m - z.ln()));
            }
            let dy = uniform(d, shape, 140 + s, 2.0);
            check(
                Op::Fused(FusedOp::SoftmaxGrad),
                &[tensor(d, shape, &p), dy.clone()],
                0.0,
            );
            check(
                Op::Fused(FusedOp::LogSoftmaxGrad),
                &[tensor(d, shape, &lp), dy],
                0.0,
            );
        }
    }
}

/// SwiGLU and its backward, with gates out to ±30 (where the sigmoid saturates).
#[test]
fn swiglu_and_its_grad_match_the_interpreter() {
    for d in DTYPES {
        for (s, shape) in SHAPES.iter().enumerate() {
            let s = s as u64;
            let gate = uniform(d, shape, 150 + s, 30.0);
            let up = uniform(d, shape, 160 + s, 2.0);
            let dy = uniform(d, shape, 170 + s, 2.0);
            check(Op::Fused(FusedOp::SwiGlu), &[gate.clone(), up.clone()], 0.0);
            check(Op::Fused(FusedOp::SwiGluGrad), &[gate, up, dy], 0.0);
        }
    }
}

/// GELU and its backward out to ±6; `erf` comes from two libraries (see the module doc).
#[test]
fn gelu_and_its_grad_match_the_interpreter() {
    for (d, tol) in [
        (DType::F32, 1e-7),
        (DType::F64, 1e-14),
        (DType::BF16, 2f64.powi(-7)),
    ] {
        for (s, shape) in SHAPES.iter().enumerate() {
            let s = s as u64;
            let x = uniform(d, shape, 180 + s, 6.0);
            let dy = uniform(d, shape, 190 + s, 2.0);
            check(Op::Fused(FusedOp::Gelu), std::slice::from_ref(&x), tol);
            check(Op::Fused(FusedOp::GeluGrad), &[x, dy], tol);
        }
    }
}

/// RoPE and its backward with the tables broadcast in every way the typing allows: shared by
/// batch and heads, per batch, full, cos and sin broadcast differently, a rank-2 x, and a
/// head dim that is not a multiple of a vector width.
#[test]
fn rope_and_its_grad_match_the_interpreter() {
    type Case<'a> = (&'a [usize], &'a [usize], &'a [usize]);
    let cases: [Case; 6] = [
        (&[2, 3, 5, 8], &[1, 1, 5, 8], &[1, 1, 5, 8]),
        (&[2, 3, 5, 8], &[2, 1, 5, 8], &[2, 1, 5, 8]),
        (&[2, 3, 5, 8], &[2, 3, 5, 8], &[1, 3, 1, 8]),
        (&[3, 2, 7, 6], &[1, 2, 7, 6], &[3, 1, 1, 6]),
        (&[9, 4100], &[9, 4100], &[1, 4100]),
        (&[4, 1, 5, 26], &[4, 1, 1, 26], &[1, 1, 5, 26]),
    ];
    for d in DTYPES {
        for (s, (x, c, sn)) in cases.iter().enumerate() {
            let s = s as u64;
            let x = uniform(d, x, 200 + s, 2.0);
            let cos = uniform(d, c, 210 + s, 1.0);
            let sin = uniform(d, sn, 220 + s, 1.0);
            check(
                Op::Fused(FusedOp::Rope),
                &[x.clone(), cos.clone(), sin.clone()],
                0.0,
            );
            check(Op::Fused(FusedOp::RopeGrad), &[x, cos, sin], 0.0);
        }
    }
}

/// The loops that are not reductions come out of LLVM vectorised (vector types in the
/// optimised IR of every launch): RoPE's half rows, the norms' stores, the weight gradients'
/// column blocks. A description that defeats the vectoriser (a data-dependent branch, a
/// non-contiguous inner loop) fails here.
#[test]
fn the_non_reduction_loops_vectorise() {
    use mmc_codegen::cpu::{llvm_ir, CpuTarget};
    use mmc_codegen::ops::lower_node;
    let d = DType::F32;
    let (x, w) = (uniform(d, &[64, 256], 1, 2.0), uniform(d, &[256], 2, 2.0));
    let (xr, cs) = (
        uniform(d, &[2, 4, 16, 64], 3, 2.0),
        uniform(d, &[1, 1, 16, 64], 4, 1.0),
    );
    let cases: Vec<(FusedOp, Vec<Tensor>)> = vec![
        (FusedOp::Rope, vec![xr.clone(), cs.clone(), cs.clone()]),
        (FusedOp::RopeGrad, vec![xr, cs.clone(), cs]),
        (FusedOp::RmsNorm { eps: 1e-6 }, vec![x.clone(), w.clone()]),
        (
            FusedOp::RmsNormGrad { eps: 1e-6 },
            vec![x.clone(), w.clone(), x.clone()],
        ),
        (
            FusedOp::LayerNorm { eps: 1e-6 },
            vec![x.clone(), w.clone(), w.clone()],
        ),
        (
            FusedOp::LayerNormGrad { eps: 1e-6 },
            vec![x.clone(), w, x.clone()],
        ),
        (FusedOp::SoftmaxGrad, vec![x.clone(), x]),
    ];
    for (op, ins) in cases {
        let g = common::one_node(Op::Fused(op.clone()), &ins);
        let node = g
            .nodes()
            .iter()
            .find(|n| !matches!(n.op, Op::Input { .. }))
            .expect("the node");
        let lowered = lower_node(&g, node, "t").expect("lowers");
        let kernels: Vec<_> = lowered.kernels().cloned().collect();
        let ir = llvm_ir(&kernels, &CpuTarget::host()).expect("compiles");
        let defs: Vec<&str> = ir.split("define ").skip(1).collect();
        assert_eq!(defs.len(), kernels.len(), "{}", op.name());
        for f in defs {
            assert!(
                f.contains(" x float>") && f.contains(" x double>"),
                "`{}`: a launch without vector code:\n{f}",
                op.name()
            );
        }
    }
}

/// The sum of squares over several blocks of 65,536 (a partial last block), one block, a
/// single element and none, against the interpreter's f64 sum; and a NaN propagates.
#[test]
fn sum_squares_matches_the_interpreter() {
    for dtype in DTYPES {
        for (i, shape) in [vec![3, 70001], vec![257, 3], vec![1], vec![0, 4]]
            .into_iter()
            .enumerate()
        {
            let x = uniform(dtype, &shape, 90 + i as u64, 2.0);
            // f32 result of an f64 sum: one rounding; the partial sums reorder f64 additions.
            check(Op::Fused(FusedOp::SumSquares), &[x], 1e-7);
        }
    }
    let mut v = vec![0.5; 100_000];
    v[77_777] = f64::NAN;
    let x = tensor(DType::F32, &[100_000], &v);
    check(Op::Fused(FusedOp::SumSquares), &[x], 0.0);
}
