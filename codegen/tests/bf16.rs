//! bf16 storage in the generated kernels and the GEMM calls, against the interpreter.
//!
//! A bf16 value lives in a register as the f32 of the same value; every op computes in f32
//! (or, for the transcendental functions, in f64 as for f32) and rounds its result to the
//! nearest bf16, ties to even, as PyTorch does; the interpreter rounds each result through
//! f32 the same way. So the elementwise kernels, casts and reductions agree with it bit for
//! bit (tolerance 0), the rounding's edge cases included: ties, NaN, infinities, overflow to
//! infinity, subnormals, signed zeros. The GEMMs accumulate in f32 where the interpreter
//! accumulates in f64, so a product whose value straddles a bf16 rounding boundary differs
//! by one unit: 2^-7 of the larger of the value and 1.

mod common;

use common::{check, one_node, random, run_compiled, values};
use mmc_ir::elementwise::Program;
use mmc_ir::{DType, FusedOp, Op, ReduceKind, Tensor};

const BF16: DType = DType::BF16;
/// One bf16 unit at 1 (see the module documentation).
const GEMM_TOL: f64 = 1.0 / 128.0;

fn tensor(dtype: DType, v: &[f64]) -> Tensor {
    Tensor::from_f64(dtype, vec![v.len()], v).expect("sizes agree")
}

/// f32 values at the edges of bf16 rounding: ties (which go to the even neighbour), values
/// just either side of a tie, NaN, the infinities, the largest finite f32 and bf16 values
/// (the first rounds to infinity), subnormals and signed zeros.
fn edges() -> Vec<f64> {
    let tie = |hi: u32| f64::from(f32::from_bits(hi | 0x8000));
    let mut v = vec![
        tie(0x3f80_0000), // 1 + 2^-8: a tie, to 1 (even)
        tie(0x3f81_0000), // a tie above an odd bf16, up
        f64::from(f32::from_bits(0x3f80_8001)),
        f64::from(f32::from_bits(0x3f80_7fff)),
        tie(0xbf81_0000),
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::from(f32::MAX),
        f64::from(f32::from_bits(0x7f7f_0000)), // the largest bf16
        tie(0x7f7f_0000),                       // rounds up to infinity
        f64::from(f32::from_bits(0x0000_8001)), // subnormal, rounds up
        f64::from(f32::from_bits(0x0000_7fff)), // subnormal, rounds to 0
        f64::from(f32::MIN_POSITIVE),
        0.0,
        -0.0,
        1e-40,
        -3.3e38,
        65504.0,
    ];
    // And a run of ordinary values, more than a vector's width.
    v.extend((0..37).map(|i| (i as f64 - 18.3) * 0.377));
    v
}

#[test]
fn casts_to_and_from_bf16_round_as_the_interpreter() {
    let x = edges();
    for from in [DType::F32, DType::F64] {
        check(Op::Cast { to: BF16 }, &[tensor(from, &x)], 0.0);
    }
    let b = tensor(BF16, &x);
    for to in [DType::F32, DType::F64, DType::I64, DType::I32, DType::Bool] {
        check(Op::Cast { to }, std::slice::from_ref(&b), 0.0);
    }
    let ints: Vec<f64> = [0i64, 1, -7, 257, 65535, 1 << 24, (1 << 24) + 1, -(1 << 40)]
        .iter()
        .map(|&i| i as f64)
        .collect();
    check(
        Op::Cast { to: BF16 },
        &[Tensor::from_f64(DType::I64, vec![ints.len()], &ints).expect("sizes agree")],
        0.0,
    );
}

/// The rounding is to nearest even, not truncation: 1 + 3 * 2^-9 rounds up to 1 + 2^-7.
#[test]
fn a_cast_rounds_to_nearest() {
    let x = tensor(DType::F32, &[1.0 + 3.0 / 512.0, -(1.0 + 3.0 / 512.0)]);
    let g = one_node(Op::Cast { to: BF16 }, std::slice::from_ref(&x));
    let run = run_compiled(&g, &[x], 1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        values(BF16, &run.outputs[0]),
        [1.0 + 1.0 / 128.0, -(1.0 + 1.0 / 128.0)]
    );
}

#[test]
fn elementwise_ops_over_bf16_match_the_interpreter_bit_for_bit() {
    let n = 4099; // a multiple of no vector width
    let (x, y) = (random(BF16, &[n], 1), random(BF16, &[n], 2));
    let e = tensor(BF16, &edges());
    let f = tensor(BF16, &edges().iter().rev().copied().collect::<Vec<_>>());
    for u in [
        mmc_ir::UnaryOp::Neg,
        mmc_ir::UnaryOp::Abs,
        mmc_ir::UnaryOp::Exp,
        mmc_ir::UnaryOp::Log,
        mmc_ir::UnaryOp::Sqrt,
        mmc_ir::UnaryOp::Rsqrt,
        mmc_ir::UnaryOp::Recip,
        mmc_ir::UnaryOp::Tanh,
        mmc_ir::UnaryOp::Sin,
    ] {
        check(Op::Unary(u), std::slice::from_ref(&x), 0.0);
        check(Op::Unary(u), std::slice::from_ref(&e), 0.0);
    }
    for op in [
        mmc_ir::BinaryOp::Add,
        mmc_ir::BinaryOp::Sub,
        mmc_ir::BinaryOp::Mul,
        mmc_ir::BinaryOp::Div,
        mmc_ir::BinaryOp::Max,
        mmc_ir::BinaryOp::Min,
        mmc_ir::BinaryOp::Pow,
    ] {
        check(Op::Binary(op), &[x.clone(), y.clone()], 0.0);
        check(Op::Binary(op), &[e.clone(), f.clone()], 0.0);
    }
    check(Op::Compare(mmc_ir::CmpOp::Lt), &[e.clone(), f.clone()], 0.0);
}

/// A fused chain as the bf16 model has them: SiLU of a bf16 gate times an up projection,
/// every intermediate rounded to bf16, and an f32 residual added after a cast.
#[test]
fn a_fused_bf16_program_matches_the_interpreter() {
    let shape = [37, 130];
    let gate = random(BF16, &shape, 3);
    let up = random(BF16, &shape, 4);
    let res = random(DType::F32, &shape, 5);
    let program: Program = "$3 = neg $0; $4 = exp $3; $5 = const 1.0 bf16; $6 = add $4 $5; \
                            $7 = div $0 $6; $8 = mul $7 $1; $9 = cast $8 f32; $10 = add $9 $2; \
                            $11 = cast $10 bf16"
        .parse()
        .expect("a program");
    check(
        Op::Fused(FusedOp::Elementwise {
            program,
            shape: shape.to_vec(),
        }),
        &[gate, up, res],
        0.0,
    );
}

#[test]
fn reductions_over_bf16_match_the_interpreter() {
    let x = random(BF16, &[7, 300, 5], 6);
    for kind in [ReduceKind::Sum, ReduceKind::Max] {
        for axes in [vec![1], vec![0, 2], vec![2]] {
            check(Op::Reduce { kind, axes }, std::slice::from_ref(&x), 0.0);
        }
    }
}

#[test]
fn bf16_matmuls_accumulate_in_f32() {
    // Batched, and one large enough for several of the converted tiles and blocks.
    let (a, b) = (random(BF16, &[3, 7, 33], 7), random(BF16, &[3, 33, 13], 8));
    check(Op::MatMul, &[a, b], GEMM_TOL);
    let (a, b) = (random(BF16, &[70, 600], 9), random(BF16, &[600, 1100], 10));
    check(Op::MatMul, &[a, b], GEMM_TOL);
}

/// An epilogue whose result is f32 over a bf16 product (the router's logits): the product goes
/// to a bf16 scratch, the epilogue reads it there.
#[test]
fn an_f32_epilogue_over_a_bf16_product() {
    let (a, b) = (random(BF16, &[9, 40], 11), random(BF16, &[40, 17], 12));
    let bias = random(DType::F32, &[1, 17], 13);
    let program: Program = "$2 = cast $0 f32; $3 = add $2 $1"
        .parse()
        .expect("a program");
    check(
        Op::Fused(FusedOp::MatMulEpilogue { program }),
        &[a, b, bias],
        GEMM_TOL,
    );
}

#[test]
fn bf16_grouped_matmuls_match_the_interpreter() {
    let (rows, inner, cols, experts) = (50, 24, 19, 4);
    let xs = random(BF16, &[rows, inner], 14);
    let w = random(BF16, &[experts, inner, cols], 15);
    // An empty expert in the middle.
    let off = Tensor::from_f64(
        DType::I64,
        vec![experts + 1],
        &[0.0, 20.0, 20.0, 41.0, 50.0],
    )
    .expect("sizes agree");
    check(
        Op::Fused(FusedOp::GroupedMatMul),
        &[xs.clone(), w.clone(), off.clone()],
        GEMM_TOL,
    );
    let dy = random(BF16, &[rows, cols], 16);
    check(
        Op::Fused(FusedOp::GroupedMatMulGrad),
        &[xs, w, off, dy],
        GEMM_TOL,
    );
}
