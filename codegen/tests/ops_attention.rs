//! The generated kernels of flash attention and of the linear cross-entropy, forward and
//! backward, against the interpreter: causal or not, grouped-query heads, packed samples by
//! segment ids (with a padding segment 0), sizes that are multiples of neither the vector width
//! nor the interpreter's 32-row blocks, f32, f64 and bf16, chunks that do not divide the rows,
//! ignored rows, and out-of-range targets refused.
//!
//! Tolerances: both sides compute in f64 and round each result once, so f32 results differ by
//! at most an ulp or two where the f64 values straddle a rounding boundary (2^-23 = 1.2e-7
//! relative); 3e-7 of the larger of the value and 1 allows that and nothing more. f64 results
//! differ by the summation order only (measured 2e-15): 1e-13. The cross-entropy's f32 dw is rounded once per
//! chunk (see `ops/cross_entropy.rs`): 3 chunks, 6e-7.

mod common;

use common::{check, ints, one_node, random, run_compiled};
use mmc_codegen::native::NativeError;
use mmc_ir::{DType, FusedOp, Op, Tensor};

const F32_TOL: f64 = 3e-7;
const F64_TOL: f64 = 1e-13;
/// From 64 keys on, attention runs on f32 GEMMs with f32 row work (PyTorch's precision):
/// a few units of f32 rounding over the sums of scores and products.
const F32_GEMM_TOL: f64 = 4e-6;
/// bf16 results are rounded once from values within the f32 tolerances above of the
/// interpreter's, so where those straddle a bf16 rounding boundary they differ by one unit
/// (2^-7 at 1).
const BF16_TOL: f64 = 1.0 / 128.0;

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => F32_TOL,
        DType::BF16 => BF16_TOL,
        _ => F64_TOL,
    }
}

/// An attention problem: q [b, hq, s, d], k and v [b, hkv, s, d], optional segment ids
/// [b, s], and the output gradient.
struct Attention {
    dtype: DType,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seq: usize,
    d: usize,
    causal: bool,
    segments: Option<Vec<i64>>,
}

impl Attention {
    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }

    fn forward_inputs(&self, seed: u64) -> Vec<Tensor> {
        let q = [self.batch, self.q_heads, self.seq, self.d];
        let kv = [self.batch, self.kv_heads, self.seq, self.d];
        let mut v = vec![
            random(self.dtype, &q, seed),
            random(self.dtype, &kv, seed + 1),
            random(self.dtype, &kv, seed + 2),
        ];
        if let Some(s) = &self.segments {
            v.push(ints(&[self.batch, self.seq], s.clone()));
        }
        v
    }

    fn tol(&self) -> f64 {
        if self.dtype == DType::BF16 {
            BF16_TOL
        } else if self.dtype == DType::F32 && self.seq >= 64 {
            F32_GEMM_TOL
        } else {
            tol(self.dtype)
        }
    }

    fn check(&self, seed: u64) {
        let (scale, causal) = (self.scale(), self.causal);
        let fwd = self.forward_inputs(seed);
        check(
            Op::Fused(FusedOp::Attention { scale, causal }),
            &fwd,
            self.tol(),
        );
        let mut bwd = fwd;
        let q = [self.batch, self.q_heads, self.seq, self.d];
        bwd.push(random(self.dtype, &q, seed + 3));
        check(
            Op::Fused(FusedOp::AttentionGrad { scale, causal }),
            &bwd,
            self.tol(),
        );
    }
}

/// Segment ids of packed samples: runs of the given lengths numbered from 1, then padding
/// (segment 0) up to `seq`.
fn packed(seq: usize, samples: &[usize]) -> Vec<i64> {
    let mut v = Vec::new();
    for (n, &len) in samples.iter().enumerate() {
        v.extend(std::iter::repeat_n(n as i64 + 1, len));
    }
    assert!(v.len() <= seq);
    v.resize(seq, 0);
    v
}

#[test]
fn causal_grouped_query_attention_with_packed_samples_matches_the_interpreter() {
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        let mut seg = packed(45, &[10, 20, 9]);
        seg.extend(packed(45, &[1, 30, 7]));
        Attention {
            dtype,
            batch: 2,
            q_heads: 4,
            kv_heads: 2,
            seq: 45,
            d: 12,
            causal: true,
            segments: Some(seg),
        }
        .check(1);
    }
}

#[test]
fn causal_attention_without_segments_matches_the_interpreter() {
    for dtype in [DType::F32, DType::F64] {
        Attention {
            dtype,
            batch: 1,
            q_heads: 4,
            kv_heads: 2,
            seq: 70,
            d: 8,
            causal: true,
            segments: None,
        }
        .check(11);
    }
}

#[test]
fn bidirectional_attention_matches_the_interpreter() {
    for dtype in [DType::F32, DType::F64] {
        // Multi-head (no grouping), one query head per kv head.
        Attention {
            dtype,
            batch: 2,
            q_heads: 3,
            kv_heads: 3,
            seq: 70,
            d: 5,
            causal: false,
            segments: None,
        }
        .check(21);
        // Grouped, with packed samples (segments not in order, and padding in the middle).
        let mut seg = vec![2i64; 13];
        seg.extend([0; 4]);
        seg.extend([1; 16]);
        seg.extend([2; 4]);
        Attention {
            dtype,
            batch: 1,
            q_heads: 4,
            kv_heads: 1,
            seq: 37,
            d: 3,
            causal: false,
            segments: Some(seg),
        }
        .check(31);
    }
}

/// Long sequences (the GEMM form) in several blocks of query rows: 600 keys give blocks of
/// 436 and 164 rows, causal blocks seeing only the keys up to their last row.
#[test]
fn attention_in_several_blocks_matches_the_interpreter() {
    for (dtype, causal) in [
        (DType::F32, true),
        (DType::F64, true),
        (DType::F32, false),
        (DType::BF16, true),
    ] {
        let mut seg = packed(600, &[300, 250, 20]);
        seg.extend(packed(600, &[600]));
        Attention {
            dtype,
            batch: 2,
            q_heads: 4,
            kv_heads: 2,
            seq: 600,
            d: 16,
            causal,
            segments: Some(seg),
        }
        .check(41);
    }
}

/// A NaN in a query, on the GEMM form: the forward's row is NaN and only it; backward, every
/// element the interpreter makes NaN is NaN here too, and the finite ones agree (the GEMMs
/// may make more NaN: see `attention_blocks.rs`).
#[test]
fn a_nan_query_on_the_gemm_form() {
    let a = Attention {
        dtype: DType::F32,
        batch: 1,
        q_heads: 2,
        kv_heads: 1,
        seq: 80,
        d: 8,
        causal: true,
        segments: None,
    };
    let mut ins = a.forward_inputs(61);
    let mut q = ins[0].to_f64_vec();
    q[(80 + 30) * 8 + 3] = f64::NAN;
    ins[0] = Tensor::from_f64(DType::F32, vec![1, 2, 80, 8], &q).expect("sizes agree");
    let (scale, causal) = (a.scale(), true);
    let op = Op::Fused(FusedOp::Attention { scale, causal });
    check(op.clone(), &ins, F32_GEMM_TOL);
    let mut bwd = ins.clone();
    bwd.push(random(DType::F32, &[1, 2, 80, 8], 64));
    let op = Op::Fused(FusedOp::AttentionGrad { scale, causal });
    let g = one_node(op, &bwd);
    let want = common::interpret(&g, &bwd).expect("runs");
    let run = run_compiled(&g, &bwd, 2).expect("runs");
    let mut nan = 0;
    for (i, got) in run.outputs.iter().enumerate() {
        let got = common::values(DType::F32, got);
        let w = want
            .get(&format!("out{i}"))
            .expect("an output")
            .to_f64_vec();
        for (e, (x, y)) in got.iter().zip(&w).enumerate() {
            if y.is_nan() {
                nan += 1;
                assert!(
                    x.is_nan(),
                    "result {i} element {e}: {x}, the interpreter's is NaN"
                );
            } else if !x.is_nan() {
                assert!(
                    (x - y).abs() <= F32_GEMM_TOL * y.abs().max(1.0),
                    "result {i} element {e}: {x} vs {y}"
                );
            }
        }
    }
    // At least dq of the row, dk of the 31 keys it sees and all of dv.
    assert!(nan >= 8 + 31 * 8 + 80 * 8, "{nan} NaN elements");
}

/// A mask dropped or shifted changes the result: the same problem with the mask's other
/// setting or other segments gives outputs that differ from the interpreter's by far more
/// than the tolerance (so the tests above would fail on a mask bug).
#[test]
fn the_masks_matter() {
    let a = Attention {
        dtype: DType::F64,
        batch: 1,
        q_heads: 2,
        kv_heads: 1,
        seq: 20,
        d: 4,
        causal: true,
        segments: Some(packed(20, &[7, 8])),
    };
    let ins = a.forward_inputs(41);
    let out = |causal: bool, ins: &[Tensor]| {
        let op = Op::Fused(FusedOp::Attention {
            scale: a.scale(),
            causal,
        });
        let g = one_node(op, ins);
        let run = run_compiled(&g, ins, 1).expect("runs");
        common::values(DType::F64, &run.outputs[0])
    };
    let base = out(true, &ins);
    let diff = |x: &[f64]| {
        base.iter()
            .zip(x)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    };
    assert!(diff(&out(false, &ins)) > 1e-3);
    let mut other = ins.clone();
    other[3] = ints(&[1, 20], packed(20, &[8, 7]));
    assert!(diff(&out(true, &other)) > 1e-3);
}

/// A NaN in a query makes its row NaN (a NaN score), and only its row.
#[test]
fn a_nan_score_makes_its_row_nan() {
    let a = Attention {
        dtype: DType::F32,
        batch: 1,
        q_heads: 2,
        kv_heads: 2,
        seq: 9,
        d: 4,
        causal: true,
        segments: None,
    };
    let mut ins = a.forward_inputs(51);
    let mut q = ins[0].to_f64_vec();
    q[(9 + 5) * 4 + 2] = f64::NAN;
    ins[0] = Tensor::from_f64(DType::F32, vec![1, 2, 9, 4], &q).expect("sizes agree");
    let op = Op::Fused(FusedOp::Attention {
        scale: a.scale(),
        causal: true,
    });
    check(op.clone(), &ins, F32_TOL);
    let run = run_compiled(&one_node(op, &ins), &ins, 2).expect("runs");
    let o = common::values(DType::F32, &run.outputs[0]);
    let nan: Vec<usize> = (0..o.len()).filter(|&e| o[e].is_nan()).collect();
    assert_eq!(nan, ((9 + 5) * 4..(9 + 6) * 4).collect::<Vec<_>>());
}

/// A linear cross-entropy problem: h [rows, hidden], w [vocab, hidden], targets, weights.
fn cross_entropy_inputs(
    dtype: DType,
    (rows, hidden, vocab): (usize, usize, usize),
    targets: Vec<i64>,
    seed: u64,
) -> Vec<Tensor> {
    let mut weight = random(DType::F32, &[rows], seed + 2).to_f64_vec();
    // Some rows weigh nothing (their gradient is 0 but they are computed).
    weight[1] = 0.0;
    vec![
        random(dtype, &[rows, hidden], seed),
        random(dtype, &[vocab, hidden], seed + 1),
        ints(&[rows], targets),
        Tensor::from_f64(DType::F32, vec![rows], &weight).expect("sizes agree"),
    ]
}

/// Targets in `0..vocab`, with ignored rows (negative targets, -1 and -100).
fn targets(rows: usize, vocab: usize) -> Vec<i64> {
    (0..rows)
        .map(|r| match r % 7 {
            3 => -100,
            5 if r % 2 == 1 => -1,
            _ => ((r * 13 + 5) % vocab) as i64,
        })
        .collect()
}

#[test]
fn linear_cross_entropy_matches_the_interpreter() {
    for (dtype, dims, chunk) in [
        // 3 chunks of 16, 16 and 5 rows; a vocabulary that is not a multiple of 8.
        (DType::F32, (37, 13, 29), 16),
        (DType::F64, (10, 6, 21), 4),
        // One chunk larger than the rows.
        (DType::F32, (9, 3, 11), 64),
        // bf16: f32 logits, dw summed over the 3 chunks in f32; and one chunk.
        (DType::BF16, (37, 13, 29), 16),
        (DType::BF16, (9, 3, 11), 64),
    ] {
        let (rows, _, vocab) = dims;
        let ins = cross_entropy_inputs(dtype, dims, targets(rows, vocab), 61);
        check(
            Op::Fused(FusedOp::LinearCrossEntropy { chunk }),
            &ins,
            tol(dtype),
        );
        let mut bwd = ins;
        bwd.push(Tensor::from_f64(DType::F32, vec![], &[0.75]).expect("a scalar"));
        // f32 logits and f32 GEMMs (PyTorch's precision) against the interpreter's f64: a
        // few units of f32 rounding over 29-term sums of the gradient.
        let dw_tol = match dtype {
            DType::F32 => 4e-6,
            DType::BF16 => BF16_TOL,
            _ => F64_TOL,
        };
        check(
            Op::Fused(FusedOp::LinearCrossEntropyGrad { chunk }),
            &bwd,
            dw_tol,
        );
        // Both at once: the loss from the logits the gradients are made of; then with a
        // base that dw sums onto (an accumulator).
        check(
            Op::Fused(FusedOp::LinearCrossEntropyWithGrad { chunk }),
            &bwd,
            dw_tol.max(tol(dtype)),
        );
        let w = &bwd[1];
        let base: Vec<f64> = (0..w.numel())
            .map(|i| (i % 11) as f64 * 0.25 - 1.0)
            .collect();
        bwd.push(Tensor::from_f64(dtype, w.shape().to_vec(), &base).expect("sizes agree"));
        check(
            Op::Fused(FusedOp::LinearCrossEntropyWithGrad { chunk }),
            &bwd,
            dw_tol.max(tol(dtype)),
        );
    }
}

/// A target at or above the vocabulary size is refused by a checked load, forward and
/// backward, in the first chunk and in the last (partial) one, as the interpreter refuses it.
#[test]
fn out_of_range_targets_are_refused() {
    let (rows, hidden, vocab) = (11, 5, 13);
    for (row, bad) in [(2, 13), (10, 1000), (0, i64::MAX)] {
        let mut t = targets(rows, vocab);
        t[row] = bad;
        let ins = cross_entropy_inputs(DType::F32, (rows, hidden, vocab), t, 71);
        let mut bwd = ins.clone();
        bwd.push(Tensor::from_f64(DType::F32, vec![], &[1.0]).expect("a scalar"));
        for (op, ins) in [
            (FusedOp::LinearCrossEntropy { chunk: 4 }, &ins),
            (FusedOp::LinearCrossEntropyGrad { chunk: 4 }, &bwd),
            (FusedOp::LinearCrossEntropyWithGrad { chunk: 4 }, &bwd),
        ] {
            let g = one_node(Op::Fused(op), ins);
            for threads in [1, 2] {
                match run_compiled(&g, ins, threads) {
                    Err(NativeError::OutOfRange { .. }) => {}
                    Err(e) => panic!("target {bad}: another error {e}"),
                    Ok(_) => panic!("target {bad} of row {row} was not refused"),
                }
            }
        }
    }
}
