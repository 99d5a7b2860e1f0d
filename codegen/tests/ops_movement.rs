//! The data-movement, routing and MoE lowerings (`ops/movement.rs`, `ops/moe.rs`) against the
//! interpreter: results bit for bit (sums too, since the kernels keep the interpreter's
//! order), on odd sizes, ties and NaN in top-k and argsort, duplicate scatter indices, empty
//! experts and every pair on one expert; and indices out of range refused by the kernels.

mod common;

use common::{bytes, interpret, ints, one_node, random, run_compiled};
use mmc_codegen::native::NativeError;
use mmc_ir::{DType, FusedOp, Op, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `op` over `inputs`: every result's bytes equal the interpreter's, on 1 and 2 threads
/// (stricter than the harness's `check` at tolerance 0: -0.0 is not 0.0).
fn exact(op: Op, inputs: &[Tensor]) {
    let g = one_node(op, inputs);
    let want = interpret(&g, inputs).expect("the interpreter runs it");
    for threads in [1, 2] {
        let run = run_compiled(&g, inputs, threads).unwrap_or_else(|e| panic!("{e}"));
        for (i, got) in run.outputs.iter().enumerate() {
            let w = want.get(&format!("out{i}")).expect("an output");
            if *got != bytes(w) {
                let kernels: Vec<String> = run
                    .lowered
                    .launches
                    .iter()
                    .map(|l| l.work.to_string())
                    .collect();
                panic!(
                    "result {i} on {threads} thread(s): {:?}\nthe interpreter's {:?}\n{}",
                    common::values(w.dtype(), got),
                    w.to_f64_vec(),
                    kernels.join("\n")
                );
            }
        }
    }
}

/// The error of running `op` compiled over `inputs` (which the interpreter refuses too).
fn refused(op: Op, inputs: &[Tensor]) -> NativeError {
    let g = one_node(op, inputs);
    assert!(
        interpret(&g, inputs).is_err(),
        "the interpreter accepts these inputs"
    );
    let mut last = None;
    for threads in [1, 2] {
        match run_compiled(&g, inputs, threads) {
            Err(e) => last = Some(e),
            Ok(_) => panic!("the compiled op accepts out-of-range data"),
        }
    }
    last.expect("refused")
}

fn is_out_of_range(e: &NativeError) -> bool {
    matches!(e, NativeError::OutOfRange { .. })
}

fn i32s(shape: &[usize], v: Vec<i32>) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I32(v)).expect("sizes agree")
}

fn bools(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v = (0..n).map(|_| rng.random_bool(0.5)).collect();
    Tensor::new(shape.to_vec(), TensorData::Bool(v)).expect("sizes agree")
}

/// Random integers in `lo..hi`.
fn rand_ints(shape: &[usize], lo: i64, hi: i64, seed: u64) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Random values of `dtype`: floats in [-2, 2), integers in [-50, 50), bools.
fn values(dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    match dtype {
        DType::I64 => ints(shape, rand_ints(shape, -50, 50, seed)),
        DType::I32 => i32s(
            shape,
            rand_ints(shape, -50, 50, seed)
                .into_iter()
                .map(|v| v as i32)
                .collect(),
        ),
        DType::Bool => bools(shape, seed),
        d => random(d, shape, seed),
    }
}

fn index(dtype: DType, shape: &[usize], v: Vec<i64>) -> Tensor {
    match dtype {
        DType::I32 => i32s(shape, v.into_iter().map(|v| v as i32).collect()),
        _ => ints(shape, v),
    }
}

/// Every axis in f32 with i64 indices; every other value dtype and i32 indices on one axis.
#[test]
fn gather_matches_on_every_axis_and_dtype() {
    let xs = [5usize, 7, 3];
    let case = |d: DType, id: DType, axis: usize| {
        // Indices with more or fewer entries along the axis than x has.
        let mut is = xs;
        is[axis] = [4, 9, 2][axis];
        let v = rand_ints(&is, 0, xs[axis] as i64, axis as u64 + 11);
        exact(Op::Gather { axis }, &[values(d, &xs, 3), index(id, &is, v)]);
    };
    for axis in 0..3 {
        case(DType::F32, DType::I64, axis);
    }
    for (i, d) in [DType::F64, DType::I64, DType::I32, DType::Bool]
        .into_iter()
        .enumerate()
    {
        case(d, DType::I64, i % 3);
    }
    case(DType::F32, DType::I32, 1);
    // An embedding-sized gather: past one tile of elements.
    let v = rand_ints(&[700, 9], 0, 301, 5);
    exact(
        Op::Gather { axis: 0 },
        &[random(DType::F32, &[301, 9], 4), ints(&[700, 9], v)],
    );
}

#[test]
fn gather_refuses_indices_outside_their_axis() {
    let x = random(DType::F32, &[4, 3], 1);
    // 3 on axis 1 of [4, 3] would land inside the buffer (the next row): still refused.
    for (axis, bad) in [(0usize, 4i64), (0, -1), (1, 3), (1, -2), (1, i64::MAX)] {
        let mut v = vec![0i64; 12];
        v[7] = bad;
        let e = refused(Op::Gather { axis }, &[x.clone(), ints(&[4, 3], v)]);
        assert!(is_out_of_range(&e), "axis {axis}, index {bad}: {e}");
    }
}

/// Sources whose f64 sum depends on its order: in order it is 4, in reverse 0.
const ORDERED: [f64; 6] = [1.0e17, -1.0e17, 1.0, 3.0, 0.5, 0.25];

/// Every axis in f32; the other dtypes and i32 indices on one axis; few destinations for many
/// sources, so every destination sums several.
#[test]
fn scatter_add_matches_with_duplicate_indices() {
    let xs = [5usize, 6, 3];
    let case = |d: DType, id: DType, axis: usize| {
        let mut is = xs;
        is[axis] = [9, 11, 7][axis];
        let v = rand_ints(&is, 0, xs[axis] as i64, axis as u64 + 21);
        exact(
            Op::ScatterAdd { axis },
            &[values(d, &xs, 1), index(id, &is, v), values(d, &is, 2)],
        );
    };
    for axis in 0..3 {
        case(DType::F32, DType::I64, axis);
    }
    for (i, d) in [DType::F64, DType::I64, DType::I32].into_iter().enumerate() {
        case(d, DType::I64, i);
    }
    case(DType::F32, DType::I32, 0);
    // Sums whose value depends on their order, even in f64, over more columns than a block
    // (70 = 64 + 6), and rows of the MoE's dense routing matrix [T, E].
    let n = 70;
    let src: Vec<f64> = (0..6 * n).map(|c| ORDERED[c / n]).collect();
    let src = Tensor::from_f64(DType::F32, vec![6, n], &src).unwrap();
    let idx = ints(&[6, n], vec![1; 6 * n]);
    exact(
        Op::ScatterAdd { axis: 0 },
        &[random(DType::F32, &[2, n], 3), idx, src],
    );
    // A result much larger than the sources (an embedding's gradient) takes the sorted form
    // in f32: order-dependent sums into one row, duplicates among random rows, both axes and
    // i32 indices. In f64 it is summed in place in chunks of rows (5,000 rows: two chunks).
    let src: Vec<f64> = (0..18).map(|c| ORDERED[c / 3]).collect();
    let src = Tensor::from_f64(DType::F32, vec![6, 3], &src).unwrap();
    exact(
        Op::ScatterAdd { axis: 0 },
        &[
            random(DType::F32, &[50, 3], 5),
            ints(&[6, 3], vec![7; 18]),
            src,
        ],
    );
    for (axis, xs, is) in [(0usize, [301usize, 9], [40usize, 9]), (1, [7, 90], [7, 11])] {
        let v = rand_ints(&is, 0, xs[axis] as i64 / 9, 6);
        for id in [DType::I64, DType::I32] {
            exact(
                Op::ScatterAdd { axis },
                &[
                    random(DType::F32, &xs, 1),
                    index(id, &is, v.clone()),
                    random(DType::F32, &is, 2),
                ],
            );
        }
    }
    // Indices on both sides of the chunks' boundaries (2,048 rows each).
    let mut v = rand_ints(&[9, 2], 0, 5000, 7);
    v[..6].copy_from_slice(&[2047, 2048, 4095, 4096, 2048, 2047]);
    exact(
        Op::ScatterAdd { axis: 0 },
        &[
            random(DType::F64, &[5000, 2], 1),
            ints(&[9, 2], v),
            random(DType::F64, &[9, 2], 2),
        ],
    );
    let top = rand_ints(&[37, 2], 0, 4, 8);
    exact(
        Op::ScatterAdd { axis: 1 },
        &[
            Tensor::from_f64(DType::F32, vec![37, 4], &[0.0; 148]).unwrap(),
            ints(&[37, 2], top),
            random(DType::F32, &[37, 2], 9),
        ],
    );
}

/// Both forms: in place (x as large as the sources, and f64) and sorted (an f32 x larger).
#[test]
fn scatter_add_refuses_indices_outside_their_axis() {
    let src = random(DType::F32, &[4, 3], 2);
    for (shape, d, axis) in [
        ([4usize, 3usize], DType::F32, 0usize),
        ([4, 3], DType::F32, 1),
        ([4, 3], DType::F64, 1),
        ([40, 3], DType::F32, 0),
        ([4, 30], DType::F32, 1),
    ] {
        for bad in [shape[axis] as i64, -1] {
            let mut v = vec![0i64; 12];
            v[5] = bad;
            let e = refused(
                Op::ScatterAdd { axis },
                &[random(d, &shape, 1), ints(&[4, 3], v), src.cast(d)],
            );
            assert!(
                is_out_of_range(&e),
                "{shape:?}, axis {axis}, index {bad}: {e}"
            );
        }
    }
}

#[test]
fn pad_matches() {
    let pad3 = || Op::Pad {
        low: vec![1, 0, 2],
        high: vec![2, 3, 1],
    };
    exact(pad3(), &[random(DType::F32, &[3, 5, 7], 1)]);
    for d in [DType::F32, DType::F64, DType::I64, DType::I32, DType::Bool] {
        exact(
            Op::Pad {
                low: vec![3],
                high: vec![0],
            },
            &[values(d, &[5], 2)],
        );
    }
    exact(pad3(), &[values(DType::Bool, &[2, 3, 4], 2)]);
    // Nothing to copy: an empty operand pads to zeros.
    exact(
        Op::Pad {
            low: vec![1, 1],
            high: vec![0, 2],
        },
        &[random(DType::F32, &[0, 3], 3)],
    );
}

/// Four operands, one of them empty along the axis: every axis in f32, the other dtypes on
/// one axis.
#[test]
fn concat_matches_on_every_axis() {
    let case = |d: DType, axis: usize| {
        let mut parts = Vec::new();
        for (i, n) in [3usize, 0, 5, 1].into_iter().enumerate() {
            let mut s = [2usize, 3, 4];
            s[axis] = n;
            parts.push(values(d, &s, i as u64));
        }
        exact(Op::Concat { axis }, &parts);
    };
    for axis in 0..3 {
        case(DType::F32, axis);
    }
    for (i, d) in [DType::F64, DType::I64, DType::I32, DType::Bool]
        .into_iter()
        .enumerate()
    {
        case(d, i % 3);
    }
}

#[test]
fn iota_matches() {
    for (axis, d) in [
        (0, DType::I64),
        (1, DType::I64),
        (2, DType::I32),
        (1, DType::F32),
        (0, DType::F64),
    ] {
        exact(
            Op::Iota {
                axis,
                ty: mmc_ir::TensorType::new(d, [3, 5, 7]),
            },
            &[],
        );
    }
}

#[test]
fn cumsum_matches() {
    for (axis, d) in [
        (0, DType::F32),
        (1, DType::F32),
        (2, DType::F32),
        (1, DType::F64),
        (0, DType::I64),
        (2, DType::I32),
    ] {
        exact(Op::CumSum { axis }, &[values(d, &[4, 9, 3], axis as u64)]);
    }
    // A leading -0.0 stays -0.0 (the sum starts from the first element); large and small
    // terms whose f32 partial sums would differ from f64 ones.
    let v = [-0.0, -0.0, 1.0e8, 1.0, -1.0e8, 0.5, 3.0];
    exact(
        Op::CumSum { axis: 0 },
        &[Tensor::from_f64(DType::F32, vec![7], &v).unwrap()],
    );
    // Wrapping integer sums.
    exact(
        Op::CumSum { axis: 0 },
        &[i32s(&[3], vec![i32::MAX, 5, i32::MIN])],
    );
    // An empty axis.
    exact(Op::CumSum { axis: 1 }, &[random(DType::F32, &[3, 0], 1)]);
}

/// Rows with ties, NaN, -0.0 and 0.0, infinities.
fn tricky_rows() -> Tensor {
    let nan = f64::NAN;
    let rows: Vec<f64> = [
        [3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 0.0],
        [nan, 1.0, nan, 5.0, -1.0, 5.0, nan],
        [0.0, -0.0, 0.0, -0.0, 1.0, -1.0, -0.0],
        [f64::INFINITY, 2.0, f64::NEG_INFINITY, 2.0, nan, 2.0, 2.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    ]
    .concat();
    Tensor::from_f64(DType::F64, vec![5, 7], &rows).unwrap()
}

#[test]
fn topk_breaks_ties_and_orders_nan_as_the_interpreter() {
    let t = tricky_rows();
    for k in [1, 3, 7] {
        exact(Op::TopK { k }, &[t.cast(DType::F32)]);
    }
    exact(Op::TopK { k: 4 }, &[t]);
    // Many ties among integers; router-shaped rows of 128.
    for d in [DType::I64, DType::I32] {
        exact(
            Op::TopK { k: 4 },
            &[ints(&[6, 11], rand_ints(&[6, 11], 0, 4, 3)).cast(d)],
        );
    }
    exact(Op::TopK { k: 8 }, &[values(DType::F32, &[5, 128], 4)]);
    exact(Op::TopK { k: 8 }, &[values(DType::F64, &[3, 128], 4)]);
}

#[test]
fn argsort_is_stable_and_orders_nan_as_the_interpreter() {
    let t = tricky_rows();
    for descending in [false, true] {
        exact(Op::ArgSort { descending }, &[t.cast(DType::F32)]);
        let d = if descending { DType::I64 } else { DType::I32 };
        let x = ints(&[3, 2, 13], rand_ints(&[3, 2, 13], -3, 3, 5)).cast(d);
        exact(Op::ArgSort { descending }, &[x]);
    }
    exact(Op::ArgSort { descending: false }, &[t]);
    exact(
        Op::ArgSort { descending: true },
        &[random(DType::F32, &[1], 1)],
    );
}

/// `top` [tokens, k] with distinct experts per token, drawn from `0..experts`.
fn routing(tokens: usize, k: usize, experts: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::new();
    for _ in 0..tokens {
        let mut row: Vec<i64> = Vec::new();
        while row.len() < k {
            let e = rng.random_range(0..experts as i64);
            if !row.contains(&e) {
                row.push(e);
            }
        }
        v.extend(row);
    }
    ints(&[tokens, k], v)
}

/// Routings to test, over `tokens[i]` tokens each, with their expert counts: random with 2
/// and 3 slots, empty experts (only 1 and 3 of 6 used), every pair on expert 2 (one slot),
/// and every token on the same two experts.
fn routings(tokens: &[usize; 5]) -> Vec<(Tensor, usize)> {
    let [a, b, c, d, e] = *tokens;
    let sparse: Vec<i64> = (0..c * 2).map(|p| [1, 3][p % 2]).collect();
    let pair: Vec<i64> = (0..e * 2).map(|p| [4, 0][p % 2]).collect();
    vec![
        (routing(a, 2, 4, 1), 4),
        (routing(b, 3, 8, 2), 8),
        (ints(&[c, 2], sparse), 6),
        (ints(&[d, 1], vec![2; d]), 3),
        (ints(&[e, 2], pair), 5),
    ]
}

/// Each routing at its own token count (1, 7 and 37 tokens), f32, and one in f64.
#[test]
fn moe_permute_and_offsets_match() {
    for (i, (top, experts)) in routings(&[37, 7, 37, 1, 7]).into_iter().enumerate() {
        let tokens = top.shape()[0];
        let d = if i == 1 { DType::F64 } else { DType::F32 };
        let x = random(d, &[tokens, 13], i as u64);
        exact(
            Op::Fused(FusedOp::MoePermute { experts }),
            &[x, top.clone()],
        );
        exact(Op::Fused(FusedOp::ExpertOffsets { experts }), &[top]);
    }
}

/// Each routing with its own token count (37 tokens of 2 slots: 74 pairs, not a power of two,
/// so the merge passes' last runs are short) and hidden size (below, at and off a multiple of
/// the dot product's 4 lanes), f32, and one in f64.
#[test]
fn moe_unpermute_and_gradients_match() {
    let hidden = [13usize, 8, 3, 5, 13];
    for (i, (top, _)) in routings(&[37, 7, 2, 1, 37]).into_iter().enumerate() {
        let (tokens, pairs, h) = (top.shape()[0], top.numel(), hidden[i]);
        let d = if i == 1 { DType::F64 } else { DType::F32 };
        let ys = random(d, &[pairs, h], 1);
        let w = random(d, top.shape(), 2);
        let dout = random(d, &[tokens, h], 3);
        exact(
            Op::Fused(FusedOp::MoeUnpermute),
            &[ys.clone(), top.clone(), w.clone()],
        );
        exact(
            Op::Fused(FusedOp::MoePermuteGrad),
            &[ys.clone(), top.clone()],
        );
        exact(Op::Fused(FusedOp::MoeUnpermuteGrad), &[ys, top, w, dout]);
    }
    // The unpermutation knows no expert count: any id that is not negative sorts.
    let top = ints(&[5, 2], vec![900, 3, 3, 900, 7, 0, 1 << 40, 3, 0, 2]);
    let ys = random(DType::F32, &[10, 5], 4);
    exact(
        Op::Fused(FusedOp::MoeUnpermute),
        &[ys.clone(), top.clone(), random(DType::F32, &[5, 2], 5)],
    );
    exact(Op::Fused(FusedOp::MoePermuteGrad), &[ys, top]);
}

#[test]
fn moe_ops_refuse_experts_out_of_range() {
    let x = random(DType::F32, &[4, 6], 1);
    for bad in [4i64, -1, i64::MIN] {
        let top = ints(&[4, 2], vec![0, 1, 2, bad, 3, 0, 1, 2]);
        let e = refused(
            Op::Fused(FusedOp::MoePermute { experts: 4 }),
            &[x.clone(), top.clone()],
        );
        assert!(is_out_of_range(&e), "permute, {bad}: {e}");
        let e = refused(Op::Fused(FusedOp::ExpertOffsets { experts: 4 }), &[top]);
        assert!(is_out_of_range(&e), "offsets, {bad}: {e}");
    }
    let top = ints(&[4, 2], vec![0, 1, 2, -3, 3, 0, 1, 2]);
    let ys = random(DType::F32, &[8, 6], 2);
    let w = random(DType::F32, &[4, 2], 3);
    let dout = random(DType::F32, &[4, 6], 4);
    for (op, inputs) in [
        (
            FusedOp::MoeUnpermute,
            vec![ys.clone(), top.clone(), w.clone()],
        ),
        (FusedOp::MoePermuteGrad, vec![ys.clone(), top.clone()]),
        (FusedOp::MoeUnpermuteGrad, vec![ys, top, w, dout]),
    ] {
        let name = op.name();
        let e = refused(Op::Fused(op), &inputs);
        assert!(is_out_of_range(&e), "{name}: {e}");
    }
}
