//! The reference interpreter, op by op, on small hand-built graphs whose expected values are
//! worked out by hand.

use mmc_ir::interp::{Bindings, InterpError};
use mmc_ir::{
    BinaryOp, CmpOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ReduceKind, ScopeId, Stage,
    Tensor, TensorData, TensorType, UnaryOp, Value,
};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::f64::consts::{E, LN_2, PI};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tensor(dtype: DType, shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::from_f64(dtype, shape.to_vec(), values).unwrap()
}

fn f64t(shape: &[usize], values: &[f64]) -> Tensor {
    tensor(DType::F64, shape, values)
}

fn f32t(shape: &[usize], values: &[f64]) -> Tensor {
    tensor(DType::F32, shape, values)
}

fn i64t(shape: &[usize], values: &[i64]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I64(values.to_vec())).unwrap()
}

fn i32t(shape: &[usize], values: &[i32]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I32(values.to_vec())).unwrap()
}

fn boolt(shape: &[usize], values: &[bool]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::Bool(values.to_vec())).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    match t.data() {
        TensorData::F64(v) => v.clone(),
        d => panic!("expected an f64 tensor, got {}", d.dtype()),
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    match t.data() {
        TensorData::F32(v) => v.clone(),
        d => panic!("expected an f32 tensor, got {}", d.dtype()),
    }
}

fn i64s(t: &Tensor) -> Vec<i64> {
    match t.data() {
        TensorData::I64(v) => v.clone(),
        d => panic!("expected an i64 tensor, got {}", d.dtype()),
    }
}

fn i32s(t: &Tensor) -> Vec<i32> {
    match t.data() {
        TensorData::I32(v) => v.clone(),
        d => panic!("expected an i32 tensor, got {}", d.dtype()),
    }
}

fn bools(t: &Tensor) -> Vec<bool> {
    match t.data() {
        TensorData::Bool(v) => v.clone(),
        d => panic!("expected a bool tensor, got {}", d.dtype()),
    }
}

/// Element-wise closeness with NaN == NaN and exact infinities.
#[track_caller]
fn assert_close(actual: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = if e.is_nan() {
            a.is_nan()
        } else if e.is_infinite() {
            a == e
        } else {
            (a - e).abs() <= tol * (1.0 + e.abs())
        };
        assert!(
            ok,
            "element {i}: got {a}, expected {e} ({actual:?} vs {expected:?})"
        );
    }
}

fn root() -> ScopeId {
    ScopeId::default()
}

/// Builds `y = op(x0, x1, ..)` with one input per argument, runs it and returns `y`.
fn eval_in<T: Borrow<Tensor>>(stage: Stage, precision: Precision, op: Op, args: &[T]) -> Tensor {
    let mut g = Graph::new(stage);
    let mut binds = HashMap::new();
    let mut vals = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let a: &Tensor = a.borrow();
        let name = format!("x{i}");
        let id = g
            .add_node(
                Op::Input {
                    name: name.clone(),
                    ty: a.ty(),
                },
                &[],
                root(),
            )
            .unwrap();
        vals.push(g.result(id));
        binds.insert(name, a.clone());
    }
    let id = g.add_node(op, &vals, root()).unwrap();
    g.add_output("y", g.result(id));
    let outs = Interpreter::new(&g, precision)
        .unwrap()
        .run(&binds)
        .unwrap();
    assert_eq!(outs.0.len(), 1);
    outs.get("y").unwrap().clone()
}

fn eval<T: Borrow<Tensor>>(op: Op, args: &[T]) -> Tensor {
    eval_in(Stage::Frontend, Precision::Declared, op, args)
}

fn unary_f64(u: UnaryOp, xs: &[f64]) -> Vec<f64> {
    let y = eval(Op::Unary(u), &[f64t(&[xs.len()], xs)]);
    assert_eq!(y.shape(), &[xs.len()]);
    f64s(&y)
}

fn input(g: &mut Graph, name: &str, ty: TensorType) -> Value {
    let id = g
        .add_node(
            Op::Input {
                name: name.into(),
                ty,
            },
            &[],
            root(),
        )
        .unwrap();
    g.result(id)
}

fn node(g: &mut Graph, op: Op, inputs: &[Value]) -> Value {
    let id = g.add_node(op, inputs, root()).unwrap();
    g.result(id)
}

// ---------------------------------------------------------------------------------------------
// Unary ops
// ---------------------------------------------------------------------------------------------

#[test]
fn unary_neg() {
    let y = unary_f64(UnaryOp::Neg, &[1.5, -2.0, 0.0]);
    assert_eq!(y, [-1.5, 2.0, 0.0]);
    assert!(y[2].is_sign_negative(), "-(+0) is -0");
}

#[test]
fn unary_abs() {
    let y = unary_f64(UnaryOp::Abs, &[-1.5, 2.0, -0.0, f64::NEG_INFINITY]);
    assert_eq!(y, [1.5, 2.0, 0.0, f64::INFINITY]);
    assert!(y[2].is_sign_positive());
}

#[test]
fn unary_exp() {
    let y = unary_f64(UnaryOp::Exp, &[0.0, 1.0, LN_2, f64::NEG_INFINITY]);
    assert_close(&y, &[1.0, E, 2.0, 0.0], 1e-15);
}

#[test]
fn unary_log() {
    let y = unary_f64(UnaryOp::Log, &[1.0, E, 0.0, -1.0, 8.0]);
    assert_close(
        &y,
        &[0.0, 1.0, f64::NEG_INFINITY, f64::NAN, 3.0 * LN_2],
        1e-15,
    );
}

#[test]
fn unary_sqrt() {
    let y = unary_f64(UnaryOp::Sqrt, &[4.0, 2.25, 0.0, -1.0]);
    assert_close(&y, &[2.0, 1.5, 0.0, f64::NAN], 0.0);
}

#[test]
fn unary_rsqrt() {
    let y = unary_f64(UnaryOp::Rsqrt, &[4.0, 0.25, 0.0]);
    assert_close(&y, &[0.5, 2.0, f64::INFINITY], 0.0);
}

#[test]
fn unary_recip() {
    let y = unary_f64(UnaryOp::Recip, &[2.0, -0.5, 0.0]);
    assert_close(&y, &[0.5, -2.0, f64::INFINITY], 0.0);
}

#[test]
fn unary_tanh() {
    // tanh(ln(3)/2) = (3 - 1) / (3 + 1) = 1/2.
    let h = 3f64.ln() / 2.0;
    let y = unary_f64(UnaryOp::Tanh, &[0.0, h, -h, 30.0]);
    assert_close(&y, &[0.0, 0.5, -0.5, 1.0], 1e-15);
}

#[test]
fn unary_erf() {
    // erf(1) = 0.8427007929497149 (standard tables); erf is odd and tends to 1.
    let y = unary_f64(UnaryOp::Erf, &[0.0, 1.0, -1.0, f64::INFINITY]);
    assert_close(
        &y,
        &[0.0, 0.8427007929497149, -0.8427007929497149, 1.0],
        1e-15,
    );
}

#[test]
fn unary_sin() {
    let y = unary_f64(UnaryOp::Sin, &[0.0, PI / 2.0, PI / 6.0, -PI / 2.0]);
    assert_close(&y, &[0.0, 1.0, 0.5, -1.0], 1e-15);
}

#[test]
fn unary_cos() {
    let y = unary_f64(UnaryOp::Cos, &[0.0, PI, PI / 3.0]);
    assert_close(&y, &[1.0, -1.0, 0.5], 1e-15);
}

#[test]
fn unary_not() {
    let y = eval(
        Op::Unary(UnaryOp::Not),
        &[boolt(&[2, 2], &[true, false, false, true])],
    );
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(bools(&y), [false, true, true, false]);
}

#[test]
fn unary_int_neg_and_abs() {
    let x = i64t(&[3], &[3, -4, 0]);
    assert_eq!(i64s(&eval(Op::Unary(UnaryOp::Neg), &[&x])), [-3, 4, 0]);
    assert_eq!(i64s(&eval(Op::Unary(UnaryOp::Abs), &[x])), [3, 4, 0]);
    // i32 wraps like two's complement: -MIN and |MIN| are MIN again.
    let x = i32t(&[2], &[i32::MIN, 5]);
    assert_eq!(i32s(&eval(Op::Unary(UnaryOp::Neg), &[&x])), [i32::MIN, -5]);
    assert_eq!(i32s(&eval(Op::Unary(UnaryOp::Abs), &[x])), [i32::MIN, 5]);
}

#[test]
fn unary_f32_results_are_rounded_to_f32() {
    let y = eval(Op::Unary(UnaryOp::Sqrt), &[f32t(&[2], &[2.0, 9.0])]);
    assert_eq!(f32s(&y), [std::f32::consts::SQRT_2, 3.0]);
}

// ---------------------------------------------------------------------------------------------
// Binary ops
// ---------------------------------------------------------------------------------------------

fn binary_f64(b: BinaryOp) -> Vec<f64> {
    let x = f64t(&[4], &[1.0, -2.0, 3.0, f64::NAN]);
    let y = f64t(&[4], &[4.0, 0.5, 3.0, 1.0]);
    f64s(&eval(Op::Binary(b), &[x, y]))
}

fn binary_i64(b: BinaryOp) -> Vec<i64> {
    let x = i64t(&[3], &[7, -2, 3]);
    let y = i64t(&[3], &[2, 5, 3]);
    i64s(&eval(Op::Binary(b), &[x, y]))
}

#[test]
fn binary_add() {
    assert_close(&binary_f64(BinaryOp::Add), &[5.0, -1.5, 6.0, f64::NAN], 0.0);
    assert_eq!(binary_i64(BinaryOp::Add), [9, 3, 6]);
}

#[test]
fn binary_sub() {
    assert_close(
        &binary_f64(BinaryOp::Sub),
        &[-3.0, -2.5, 0.0, f64::NAN],
        0.0,
    );
    assert_eq!(binary_i64(BinaryOp::Sub), [5, -7, 0]);
}

#[test]
fn binary_mul() {
    assert_close(&binary_f64(BinaryOp::Mul), &[4.0, -1.0, 9.0, f64::NAN], 0.0);
    assert_eq!(binary_i64(BinaryOp::Mul), [14, -10, 9]);
}

#[test]
fn binary_div() {
    assert_close(
        &binary_f64(BinaryOp::Div),
        &[0.25, -4.0, 1.0, f64::NAN],
        0.0,
    );
    let y = eval(
        Op::Binary(BinaryOp::Div),
        &[f64t(&[3], &[1.0, -1.0, 0.0]), f64t(&[3], &[0.0, 0.0, 0.0])],
    );
    assert_close(
        &f64s(&y),
        &[f64::INFINITY, f64::NEG_INFINITY, f64::NAN],
        0.0,
    );
}

#[test]
fn binary_max() {
    // NaN propagates, as torch.maximum does.
    assert_close(&binary_f64(BinaryOp::Max), &[4.0, 0.5, 3.0, f64::NAN], 0.0);
    assert_eq!(binary_i64(BinaryOp::Max), [7, 5, 3]);
}

#[test]
fn binary_min() {
    assert_close(&binary_f64(BinaryOp::Min), &[1.0, -2.0, 3.0, f64::NAN], 0.0);
    assert_eq!(binary_i64(BinaryOp::Min), [2, -2, 3]);
}

#[test]
fn binary_and_or() {
    let a = boolt(&[4], &[true, true, false, false]);
    let b = boolt(&[4], &[true, false, true, false]);
    let and = eval(Op::Binary(BinaryOp::And), &[&a, &b]);
    let or = eval(Op::Binary(BinaryOp::Or), &[a, b]);
    assert_eq!(bools(&and), [true, false, false, false]);
    assert_eq!(bools(&or), [true, true, true, false]);
}

#[test]
fn binary_i32_wraps() {
    let add = eval(
        Op::Binary(BinaryOp::Add),
        &[i32t(&[2], &[i32::MAX, -1]), i32t(&[2], &[1, i32::MIN])],
    );
    assert_eq!(i32s(&add), [i32::MIN, i32::MAX]);
    // 2^16 * 2^16 = 2^32, which is 0 in 32 bits.
    let mul = eval(
        Op::Binary(BinaryOp::Mul),
        &[i32t(&[1], &[65536]), i32t(&[1], &[65536])],
    );
    assert_eq!(i32s(&mul), [0]);
}

#[test]
fn binary_f32_rounds_each_result() {
    // 0.1 + 0.2 in f32 arithmetic is 0.3f32 exactly (the f32 sum rounds to the f32 nearest 0.3),
    // unlike f64 where it is 0.30000000000000004.
    let y = eval(
        Op::Binary(BinaryOp::Add),
        &[f32t(&[1], &[0.1]), f32t(&[1], &[0.2])],
    );
    assert_eq!(f32s(&y), [0.3f32]);
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

fn compare_f32(c: CmpOp) -> Vec<bool> {
    let x = f32t(&[4], &[1.0, 2.0, 3.0, f64::NAN]);
    let y = f32t(&[4], &[2.0, 2.0, 2.0, f64::NAN]);
    let out = eval(Op::Compare(c), &[x, y]);
    assert_eq!(out.dtype(), DType::Bool);
    bools(&out)
}

fn compare_i32(c: CmpOp) -> Vec<bool> {
    let x = i32t(&[3], &[1, 2, 3]);
    let y = i32t(&[3], &[2, 2, 2]);
    bools(&eval(Op::Compare(c), &[x, y]))
}

#[test]
fn compare_eq() {
    assert_eq!(compare_f32(CmpOp::Eq), [false, true, false, false]);
    assert_eq!(compare_i32(CmpOp::Eq), [false, true, false]);
}

#[test]
fn compare_ne() {
    // NaN != NaN is true.
    assert_eq!(compare_f32(CmpOp::Ne), [true, false, true, true]);
    assert_eq!(compare_i32(CmpOp::Ne), [true, false, true]);
}

#[test]
fn compare_lt() {
    assert_eq!(compare_f32(CmpOp::Lt), [true, false, false, false]);
    assert_eq!(compare_i32(CmpOp::Lt), [true, false, false]);
}

#[test]
fn compare_le() {
    assert_eq!(compare_f32(CmpOp::Le), [true, true, false, false]);
    assert_eq!(compare_i32(CmpOp::Le), [true, true, false]);
}

#[test]
fn compare_gt() {
    assert_eq!(compare_f32(CmpOp::Gt), [false, false, true, false]);
    assert_eq!(compare_i32(CmpOp::Gt), [false, false, true]);
}

#[test]
fn compare_ge() {
    assert_eq!(compare_f32(CmpOp::Ge), [false, true, true, false]);
    assert_eq!(compare_i32(CmpOp::Ge), [false, true, true]);
}

#[test]
fn compare_bools() {
    let a = boolt(&[2], &[true, false]);
    let b = boolt(&[2], &[true, true]);
    assert_eq!(
        bools(&eval(Op::Compare(CmpOp::Eq), &[&a, &b])),
        [true, false]
    );
    assert_eq!(bools(&eval(Op::Compare(CmpOp::Lt), &[a, b])), [false, true]);
}

// ---------------------------------------------------------------------------------------------
// Select and cast
// ---------------------------------------------------------------------------------------------

#[test]
fn select_float_and_int() {
    let c = boolt(&[3], &[true, false, true]);
    let y = eval(
        Op::Select,
        &[
            c.clone(),
            f32t(&[3], &[1.0, 2.0, 3.0]),
            f32t(&[3], &[10.0, 20.0, 30.0]),
        ],
    );
    assert_eq!(f32s(&y), [1.0, 20.0, 3.0]);
    let y = eval(
        Op::Select,
        &[c, i64t(&[3], &[1, 2, 3]), i64t(&[3], &[-1, -2, -3])],
    );
    assert_eq!(i64s(&y), [1, -2, 3]);
}

#[test]
fn cast_float_to_int_truncates_toward_zero() {
    let x = f32t(&[5], &[-2.7, 2.7, -0.5, 0.5, 3.0]);
    let y = eval(Op::Cast { to: DType::I64 }, &[&x]);
    assert_eq!(i64s(&y), [-2, 2, 0, 0, 3]);
    let y = eval(Op::Cast { to: DType::I32 }, &[x]);
    assert_eq!(i32s(&y), [-2, 2, 0, 0, 3]);
}

#[test]
fn cast_float_to_bool_is_nonzero() {
    // 0.5 must become true even though it truncates to the integer 0; NaN is true (nonzero).
    let x = f64t(&[5], &[0.0, 0.5, -0.0, f64::NAN, -3.0]);
    let y = eval(Op::Cast { to: DType::Bool }, &[x]);
    assert_eq!(bools(&y), [false, true, false, true, true]);
}

#[test]
fn cast_int_to_bool_and_back() {
    let y = eval(Op::Cast { to: DType::Bool }, &[i64t(&[3], &[0, 2, -1])]);
    assert_eq!(bools(&y), [false, true, true]);
    let y = eval(Op::Cast { to: DType::F32 }, &[boolt(&[2], &[true, false])]);
    assert_eq!(f32s(&y), [1.0, 0.0]);
    let y = eval(Op::Cast { to: DType::I32 }, &[boolt(&[2], &[true, false])]);
    assert_eq!(i32s(&y), [1, 0]);
}

#[test]
fn cast_i64_to_i32_wraps() {
    let x = i64t(&[4], &[1 << 31, (1 << 32) + 1, -(1 << 31) - 1, -7]);
    let y = eval(Op::Cast { to: DType::I32 }, &[x]);
    assert_eq!(i32s(&y), [i32::MIN, 1, i32::MAX, -7]);
    let y = eval(Op::Cast { to: DType::I64 }, &[i32t(&[2], &[i32::MIN, 9])]);
    assert_eq!(i64s(&y), [-(1 << 31), 9]);
}

#[test]
fn cast_int_to_float() {
    let y = eval(Op::Cast { to: DType::F64 }, &[i32t(&[3], &[-3, 0, 7])]);
    assert_eq!(f64s(&y), [-3.0, 0.0, 7.0]);
}

#[test]
fn cast_to_f32_rounds_unless_precision_is_f64() {
    let x = f64t(&[1], &[0.1]);
    let declared = eval_in(
        Stage::Frontend,
        Precision::Declared,
        Op::Cast { to: DType::F32 },
        &[&x],
    );
    assert_eq!(f32s(&declared), [0.1f32]);
    // 0.1f32 is 0.100000001490116119384765625 (printed as 0.10000000149011612 in f64), not 0.1.
    assert_eq!(declared.to_f64_vec(), [0.100_000_001_490_116_12]);
    let wide = eval_in(
        Stage::Frontend,
        Precision::F64,
        Op::Cast { to: DType::F32 },
        &[x],
    );
    // With Precision::F64 float results come back as f64 and keep every bit.
    assert_eq!(f64s(&wide), [0.1]);
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

fn reduce(kind: ReduceKind, axes: &[usize], x: Tensor) -> Tensor {
    eval(
        Op::Reduce {
            kind,
            axes: axes.to_vec(),
        },
        &[x],
    )
}

#[test]
fn reduce_sum_float() {
    let x = f64t(&[2, 3], &[1.0, 5.0, 3.0, 4.0, 2.0, 6.0]);
    let y = reduce(ReduceKind::Sum, &[1], x.clone());
    assert_eq!(y.shape(), &[2, 1]);
    assert_eq!(f64s(&y), [9.0, 12.0]);
    let y = reduce(ReduceKind::Sum, &[0], x.clone());
    assert_eq!(y.shape(), &[1, 3]);
    assert_eq!(f64s(&y), [5.0, 7.0, 9.0]);
    let y = reduce(ReduceKind::Sum, &[1, 0], x);
    assert_eq!(y.shape(), &[1, 1]);
    assert_eq!(f64s(&y), [21.0]);
}

#[test]
fn reduce_max_float() {
    let x = f64t(&[2, 3], &[1.0, 5.0, 3.0, 4.0, 2.0, 6.0]);
    let y = reduce(ReduceKind::Max, &[1], x.clone());
    assert_eq!(y.shape(), &[2, 1]);
    assert_eq!(f64s(&y), [5.0, 6.0]);
    let y = reduce(ReduceKind::Max, &[0], x);
    assert_eq!(f64s(&y), [4.0, 5.0, 6.0]);
    // NaN wins a max; -inf is a valid maximum.
    let x = f64t(
        &[2, 3],
        &[
            1.0,
            f64::NAN,
            3.0,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
        ],
    );
    let y = reduce(ReduceKind::Max, &[1], x);
    assert_close(&f64s(&y), &[f64::NAN, f64::NEG_INFINITY], 0.0);
}

#[test]
fn reduce_int_rank3() {
    // x[a, b, c] = 1 + 4a + 2b + c.
    let x = i64t(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
    let y = reduce(ReduceKind::Sum, &[0, 2], x.clone());
    assert_eq!(y.shape(), &[1, 2, 1]);
    assert_eq!(i64s(&y), [1 + 2 + 5 + 6, 3 + 4 + 7 + 8]);
    let y = reduce(ReduceKind::Max, &[2], x);
    assert_eq!(y.shape(), &[2, 2, 1]);
    assert_eq!(i64s(&y), [2, 4, 6, 8]);
    let y = reduce(ReduceKind::Max, &[1], i32t(&[1, 3], &[-5, -9, -7]));
    assert_eq!(i32s(&y), [-5]);
}

#[test]
fn reduce_i32_sum_wraps() {
    let y = reduce(ReduceKind::Sum, &[0], i32t(&[2], &[i32::MAX, 1]));
    assert_eq!(i32s(&y), [i32::MIN]);
}

// ---------------------------------------------------------------------------------------------
// Data movement
// ---------------------------------------------------------------------------------------------

#[test]
fn broadcast_size_one_dims() {
    let y = eval(
        Op::Broadcast { shape: vec![2, 3] },
        &[f32t(&[2, 1], &[1.0, 2.0])],
    );
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(f32s(&y), [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    let y = eval(
        Op::Broadcast { shape: vec![2, 3] },
        &[f32t(&[1, 3], &[1.0, 2.0, 3.0])],
    );
    assert_eq!(f32s(&y), [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    // Two size-1 dims at once, on an int tensor.
    let y = eval(
        Op::Broadcast {
            shape: vec![2, 2, 3],
        },
        &[i64t(&[1, 2, 1], &[5, 6])],
    );
    assert_eq!(i64s(&y), [5, 5, 5, 6, 6, 6, 5, 5, 5, 6, 6, 6]);
    // Bools broadcast too.
    let y = eval(Op::Broadcast { shape: vec![3] }, &[boolt(&[1], &[true])]);
    assert_eq!(bools(&y), [true, true, true]);
}

#[test]
fn reshape_keeps_row_major_order() {
    let y = eval(
        Op::Reshape { shape: vec![3, 2] },
        &[i64t(&[2, 3], &[1, 2, 3, 4, 5, 6])],
    );
    assert_eq!(y.shape(), &[3, 2]);
    assert_eq!(i64s(&y), [1, 2, 3, 4, 5, 6]);
    let y = eval(Op::Reshape { shape: vec![] }, &[f64t(&[1, 1], &[7.0])]);
    assert_eq!(y.shape(), &[] as &[usize]);
    assert_eq!(f64s(&y), [7.0]);
}

#[test]
fn permute_rank3() {
    // x[a, b, c] = 12a + 4b + c over [2, 3, 4]; perm [2, 0, 1] gives y[i, j, k] = x[j, k, i]
    // = 12j + 4k + i over [4, 2, 3].
    let x: Vec<i64> = (0..24).collect();
    let y = eval(
        Op::Permute {
            perm: vec![2, 0, 1],
        },
        &[i64t(&[2, 3, 4], &x)],
    );
    assert_eq!(y.shape(), &[4, 2, 3]);
    #[rustfmt::skip]
    let expected = [
        0, 4, 8, 12, 16, 20,
        1, 5, 9, 13, 17, 21,
        2, 6, 10, 14, 18, 22,
        3, 7, 11, 15, 19, 23,
    ];
    assert_eq!(i64s(&y), expected);
    // The same on floats, with perm [1, 0, 2] (swap the two outer axes): y[b, a, c] = x[a, b, c].
    let xf: Vec<f64> = (0..24).map(|v| v as f64).collect();
    let y = eval(
        Op::Permute {
            perm: vec![1, 0, 2],
        },
        &[f32t(&[2, 3, 4], &xf)],
    );
    assert_eq!(y.shape(), &[3, 2, 4]);
    #[rustfmt::skip]
    let expected = [
        0.0, 1.0, 2.0, 3.0, 12.0, 13.0, 14.0, 15.0,
        4.0, 5.0, 6.0, 7.0, 16.0, 17.0, 18.0, 19.0,
        8.0, 9.0, 10.0, 11.0, 20.0, 21.0, 22.0, 23.0,
    ];
    assert_eq!(f32s(&y), expected);
}

#[test]
fn slice_with_nonzero_starts() {
    // x[r, c] = 4r + c over [3, 4].
    let x: Vec<f64> = (0..12).map(|v| v as f64).collect();
    let y = eval(
        Op::Slice {
            start: vec![1, 1],
            end: vec![3, 3],
        },
        &[f64t(&[3, 4], &x)],
    );
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(f64s(&y), [5.0, 6.0, 9.0, 10.0]);
    // x[a, b, c] = 6a + 3b + c over [2, 2, 3]; the box [1..2, 0..2, 1..3].
    let x: Vec<i64> = (0..12).collect();
    let y = eval(
        Op::Slice {
            start: vec![1, 0, 1],
            end: vec![2, 2, 3],
        },
        &[i64t(&[2, 2, 3], &x)],
    );
    assert_eq!(y.shape(), &[1, 2, 2]);
    assert_eq!(i64s(&y), [7, 8, 10, 11]);
    // An empty slice.
    let y = eval(
        Op::Slice {
            start: vec![2],
            end: vec![2],
        },
        &[f64t(&[3], &[1.0, 2.0, 3.0])],
    );
    assert_eq!(y.shape(), &[0]);
    assert!(f64s(&y).is_empty());
}

#[test]
fn pad_with_zeros() {
    let y = eval(
        Op::Pad {
            low: vec![1, 0],
            high: vec![0, 2],
        },
        &[f32t(&[2, 2], &[1.0, 2.0, 3.0, 4.0])],
    );
    assert_eq!(y.shape(), &[3, 4]);
    #[rustfmt::skip]
    let expected = [
        0.0, 0.0, 0.0, 0.0,
        1.0, 2.0, 0.0, 0.0,
        3.0, 4.0, 0.0, 0.0,
    ];
    assert_eq!(f32s(&y), expected);
    let y = eval(
        Op::Pad {
            low: vec![2],
            high: vec![1],
        },
        &[i64t(&[2], &[7, 8])],
    );
    assert_eq!(i64s(&y), [0, 0, 7, 8, 0]);
}

#[test]
fn concat_middle_axis_float() {
    let a = f64t(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f64t(
        &[2, 2, 2],
        &[10.0, 11.0, 12.0, 13.0, 20.0, 21.0, 22.0, 23.0],
    );
    let y = eval(Op::Concat { axis: 1 }, &[a, b]);
    assert_eq!(y.shape(), &[2, 3, 2]);
    #[rustfmt::skip]
    let expected = [
        1.0, 2.0, 10.0, 11.0, 12.0, 13.0,
        3.0, 4.0, 20.0, 21.0, 22.0, 23.0,
    ];
    assert_eq!(f64s(&y), expected);
}

#[test]
fn concat_middle_axis_int_three_operands() {
    let a = i32t(&[2, 1, 2], &[1, 2, 3, 4]);
    let b = i32t(&[2, 2, 2], &[10, 11, 12, 13, 20, 21, 22, 23]);
    let c = i32t(&[2, 1, 2], &[-1, -2, -3, -4]);
    let y = eval(Op::Concat { axis: 1 }, &[a, b, c]);
    assert_eq!(y.shape(), &[2, 4, 2]);
    #[rustfmt::skip]
    let expected = [
        1, 2, 10, 11, 12, 13, -1, -2,
        3, 4, 20, 21, 22, 23, -3, -4,
    ];
    assert_eq!(i32s(&y), expected);
    // Bools concatenate on the int path as well.
    let y = eval(
        Op::Concat { axis: 0 },
        &[boolt(&[1], &[true]), boolt(&[2], &[false, true])],
    );
    assert_eq!(bools(&y), [true, false, true]);
}

#[test]
fn matmul_rank2() {
    let a = f64t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f64t(&[3, 2], &[7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
    let y = eval(Op::MatMul, &[a, b]);
    assert_eq!(y.shape(), &[2, 2]);
    // [1 2 3]·[7 9 11] = 58, [1 2 3]·[8 10 12] = 64, [4 5 6]·[7 9 11] = 139, ... = 154.
    assert_eq!(f64s(&y), [58.0, 64.0, 139.0, 154.0]);
}

#[test]
fn matmul_batched_rank3() {
    // Batch 0: [[1, 2], [3, 4]] x [[5], [6]] = [[17], [39]].
    // Batch 1: [[2, 0], [1, 1]] x [[1], [-1]] = [[2], [0]].
    let a = f32t(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 2.0, 0.0, 1.0, 1.0]);
    let b = f32t(&[2, 2, 1], &[5.0, 6.0, 1.0, -1.0]);
    let y = eval(Op::MatMul, &[a, b]);
    assert_eq!(y.shape(), &[2, 2, 1]);
    assert_eq!(f32s(&y), [17.0, 39.0, 2.0, 0.0]);
}

#[test]
fn gather_axis0_embedding_lookup_with_broadcast_indices() {
    // A [4, 2] embedding table, rows r = [10r, 10r + 1], looked up with tokens [2, 0, 2] that
    // are broadcast from [3, 1] to [3, 2] inside the graph.
    let mut g = Graph::new(Stage::Frontend);
    let table = input(&mut g, "table", TensorType::new(DType::F32, vec![4, 2]));
    let tokens = input(&mut g, "tokens", TensorType::new(DType::I64, vec![3, 1]));
    let idx = node(&mut g, Op::Broadcast { shape: vec![3, 2] }, &[tokens]);
    let y = node(&mut g, Op::Gather { axis: 0 }, &[table, idx]);
    g.add_output("y", y);
    let mut binds = HashMap::new();
    binds.insert(
        "table".to_string(),
        f32t(&[4, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0]),
    );
    binds.insert("tokens".to_string(), i64t(&[3, 1], &[2, 0, 2]));
    let outs = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&binds)
        .unwrap();
    let y = outs.get("y").unwrap();
    assert_eq!(y.shape(), &[3, 2]);
    assert_eq!(f32s(y), [20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
}

#[test]
fn gather_axis1() {
    // y[r, j] = x[r, idx[r, j]]
    let x = f64t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let idx = i32t(&[2, 2], &[2, 0, 1, 1]);
    let y = eval(Op::Gather { axis: 1 }, &[x, idx]);
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(f64s(&y), [3.0, 1.0, 5.0, 5.0]);
    // Integer data, more indices than the axis is long.
    let x = i64t(&[1, 2], &[7, 9]);
    let idx = i64t(&[1, 4], &[1, 1, 0, 1]);
    assert_eq!(i64s(&eval(Op::Gather { axis: 1 }, &[x, idx])), [9, 9, 7, 9]);
}

#[test]
fn scatter_add_accumulates_repeated_indices() {
    // out = [1, 1, 1]; out[0] += 1 + 3 + 4; out[2] += 2.
    let x = f64t(&[3], &[1.0, 1.0, 1.0]);
    let idx = i64t(&[4], &[0, 2, 0, 0]);
    let src = f64t(&[4], &[1.0, 2.0, 3.0, 4.0]);
    let y = eval(Op::ScatterAdd { axis: 0 }, &[x, idx, src]);
    assert_eq!(f64s(&y), [9.0, 1.0, 3.0]);
}

#[test]
fn scatter_add_rank2_axis0_int() {
    // out[idx[i, j], j] += src[i, j]:
    //   (0,0) += 1, (2,1) += 2, (0,0) += 3, (0,1) += 4.
    let x = i64t(&[3, 2], &[0, 0, 0, 0, 0, 100]);
    let idx = i32t(&[2, 2], &[0, 2, 0, 0]);
    let src = i64t(&[2, 2], &[1, 2, 3, 4]);
    let y = eval(Op::ScatterAdd { axis: 0 }, &[x, idx, src]);
    assert_eq!(y.shape(), &[3, 2]);
    assert_eq!(i64s(&y), [4, 4, 0, 0, 0, 102]);
}

#[test]
fn scatter_add_axis1_float_is_gather_transpose() {
    // out[r, idx[r, j]] += src[r, j]
    let x = f32t(&[2, 3], &[0.0; 6]);
    let idx = i64t(&[2, 2], &[2, 2, 0, 1]);
    let src = f32t(&[2, 2], &[0.5, 0.25, 1.0, 2.0]);
    let y = eval(Op::ScatterAdd { axis: 1 }, &[x, idx, src]);
    assert_eq!(f32s(&y), [0.0, 0.0, 0.75, 1.0, 2.0, 0.0]);
}

// ---------------------------------------------------------------------------------------------
// Sorting, scans, sources
// ---------------------------------------------------------------------------------------------

#[test]
fn topk_ties_and_nan() {
    // Row 0: 3 is the largest (indices 1 and 2 tie: lower first), then 2 (index 3).
    // Row 1: NaN counts as largest (two NaNs, lower index first), then the 5 at index 1.
    let x = f32t(
        &[2, 5],
        &[1.0, 3.0, 3.0, 2.0, 0.0, f64::NAN, 5.0, f64::NAN, 1.0, 5.0],
    );
    let y = eval(Op::TopK { k: 3 }, &[x]);
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(i64s(&y), [1, 2, 3, 0, 2, 1]);
}

#[test]
fn topk_int_k1() {
    let y = eval(Op::TopK { k: 1 }, &[i32t(&[3], &[-4, 9, 9])]);
    assert_eq!(i64s(&y), [1]);
}

#[test]
fn argsort_ascending_is_stable() {
    let x = f64t(&[5], &[3.0, 1.0, 2.0, 1.0, 3.0]);
    let y = eval(Op::ArgSort { descending: false }, &[x]);
    assert_eq!(i64s(&y), [1, 3, 2, 0, 4]);
}

#[test]
fn argsort_descending_is_stable() {
    let x = f64t(&[5], &[3.0, 1.0, 2.0, 1.0, 3.0]);
    let y = eval(Op::ArgSort { descending: true }, &[x]);
    assert_eq!(i64s(&y), [0, 4, 2, 1, 3]);
}

#[test]
fn argsort_rows_int_and_nan() {
    // Rows sort independently; NaN sorts above everything (last ascending).
    let x = f32t(&[2, 3], &[f64::NAN, 0.0, -1.0, 2.0, 2.0, 1.0]);
    let y = eval(Op::ArgSort { descending: false }, &[x]);
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(i64s(&y), [2, 1, 0, 2, 0, 1]);
    let y = eval(
        Op::ArgSort { descending: true },
        &[i64t(&[2, 2], &[5, 6, 6, 5])],
    );
    assert_eq!(i64s(&y), [1, 0, 0, 1]);
}

#[test]
fn cumsum_float_both_axes() {
    let x = f64t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let y = eval(Op::CumSum { axis: 1 }, &[&x]);
    assert_eq!(f64s(&y), [1.0, 3.0, 6.0, 4.0, 9.0, 15.0]);
    let y = eval(Op::CumSum { axis: 0 }, &[x]);
    assert_eq!(f64s(&y), [1.0, 2.0, 3.0, 5.0, 7.0, 9.0]);
}

#[test]
fn cumsum_int_both_axes() {
    let x = i64t(&[2, 3], &[1, -2, 3, 4, 5, -6]);
    let y = eval(Op::CumSum { axis: 1 }, &[&x]);
    assert_eq!(i64s(&y), [1, -1, 2, 4, 9, 3]);
    let y = eval(Op::CumSum { axis: 0 }, &[x]);
    assert_eq!(i64s(&y), [1, -2, 3, 5, 3, -3]);
    // A rank-3 tensor along the middle axis: x[a, b, c] = 1 everywhere over [2, 3, 2].
    let y = eval(Op::CumSum { axis: 1 }, &[i32t(&[2, 3, 2], &[1; 12])]);
    assert_eq!(i32s(&y), [1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3]);
}

#[test]
fn cumsum_int_wraps_like_the_other_int_ops() {
    let y = eval(Op::CumSum { axis: 0 }, &[i64t(&[2], &[i64::MAX, 1])]);
    assert_eq!(i64s(&y), [i64::MAX, i64::MIN]);
    let y = eval(Op::CumSum { axis: 0 }, &[i32t(&[2], &[i32::MAX, 1])]);
    assert_eq!(i32s(&y), [i32::MAX, i32::MIN]);
}

fn source(op: Op) -> Tensor {
    eval::<Tensor>(op, &[])
}

#[test]
fn iota() {
    let y = source(Op::Iota {
        axis: 0,
        ty: TensorType::new(DType::I64, vec![2, 3]),
    });
    assert_eq!(i64s(&y), [0, 0, 0, 1, 1, 1]);
    let y = source(Op::Iota {
        axis: 1,
        ty: TensorType::new(DType::I32, vec![2, 3]),
    });
    assert_eq!(i32s(&y), [0, 1, 2, 0, 1, 2]);
    let y = source(Op::Iota {
        axis: 1,
        ty: TensorType::new(DType::F32, vec![2, 2, 2]),
    });
    assert_eq!(f32s(&y), [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
}

#[test]
fn constants() {
    let y = source(Op::Const {
        value: 1.5,
        ty: TensorType::new(DType::F32, vec![2]),
    });
    assert_eq!(f32s(&y), [1.5, 1.5]);
    let y = source(Op::Const {
        value: f64::NEG_INFINITY,
        ty: TensorType::scalar(DType::F64),
    });
    assert_eq!(y.shape(), &[] as &[usize]);
    assert_eq!(f64s(&y), [f64::NEG_INFINITY]);
    let y = source(Op::Const {
        value: -7.0,
        ty: TensorType::new(DType::I32, vec![3]),
    });
    assert_eq!(i32s(&y), [-7, -7, -7]);
    let y = source(Op::Const {
        value: 1.0,
        ty: TensorType::new(DType::Bool, vec![2]),
    });
    assert_eq!(bools(&y), [true, true]);
    // A declared-f32 constant is rounded to f32.
    let y = source(Op::Const {
        value: 0.1,
        ty: TensorType::scalar(DType::F32),
    });
    assert_eq!(f32s(&y), [0.1f32]);
}

#[test]
fn fused_rms_norm() {
    // Row [1, 1]: mean square 1, eps 0 -> scale 1 -> w * x = [1, 2].
    // Row [3, -3]: mean square 9 -> scale 1/3 -> [1, -1] * [1, 2] = [1, -2].
    let x = f64t(&[2, 2], &[1.0, 1.0, 3.0, -3.0]);
    let w = f64t(&[2], &[1.0, 2.0]);
    let op = Op::Fused(FusedOp::RmsNorm { eps: 0.0 });
    let y = eval_in(Stage::Fused, Precision::Declared, op, &[x, w.clone()]);
    assert_close(&f64s(&y), &[1.0, 2.0, 1.0, -2.0], 1e-15);
    // With eps: row [2, 2] has mean square 4; 4 + 5 = 9 -> scale 1/3 -> [2/3, 4/3].
    let op = Op::Fused(FusedOp::RmsNorm { eps: 5.0 });
    let y = eval_in(
        Stage::Fused,
        Precision::Declared,
        op,
        &[f64t(&[1, 2], &[2.0, 2.0]), w],
    );
    assert_close(&f64s(&y), &[2.0 / 3.0, 4.0 / 3.0], 1e-15);
}

#[test]
fn fused_op_is_refused_in_a_frontend_graph() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", TensorType::new(DType::F32, vec![2]));
    let w = input(&mut g, "w", TensorType::new(DType::F32, vec![2]));
    let y = node(&mut g, Op::Fused(FusedOp::RmsNorm { eps: 1e-6 }), &[x, w]);
    g.add_output("y", y);
    match Interpreter::new(&g, Precision::Declared) {
        Err(InterpError::Malformed(e)) => assert!(e.to_string().contains("fused.rms_norm")),
        other => panic!("expected a verifier error, got {:?}", other.err()),
    }
}

// ---------------------------------------------------------------------------------------------
// Precision, chains and bindings
// ---------------------------------------------------------------------------------------------

fn bf16_one_plus_tiny(precision: Precision) -> Tensor {
    // 1 + 2^-9 needs 9 fraction bits; bf16 has 7, so it rounds back to 1.
    let x = tensor(DType::BF16, &[1], &[1.0]);
    let tiny = Op::Const {
        value: 2f64.powi(-9),
        ty: TensorType::new(DType::BF16, vec![1]),
    };
    let mut g = Graph::new(Stage::Frontend);
    let xv = input(&mut g, "x", TensorType::new(DType::BF16, vec![1]));
    let c = node(&mut g, tiny, &[]);
    let y = node(&mut g, Op::Binary(BinaryOp::Add), &[xv, c]);
    g.add_output("y", y);
    let mut binds = BTreeMap::new();
    binds.insert("x".to_string(), x);
    let outs = Interpreter::new(&g, precision)
        .unwrap()
        .run(&binds)
        .unwrap();
    outs.get("y").unwrap().clone()
}

#[test]
fn declared_precision_rounds_bf16() {
    let y = bf16_one_plus_tiny(Precision::Declared);
    assert_eq!(y.dtype(), DType::BF16);
    assert_eq!(y.to_f64_vec(), [1.0]);
}

#[test]
fn f64_precision_does_not_round_bf16() {
    let y = bf16_one_plus_tiny(Precision::F64);
    assert_eq!(y.dtype(), DType::F64);
    assert_eq!(f64s(&y), [1.0 + 2f64.powi(-9)]);
}

#[test]
fn precision_default_is_declared() {
    assert_eq!(Precision::default(), Precision::Declared);
}

#[test]
fn f64_precision_accepts_f64_tensors_for_narrow_declarations() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", TensorType::new(DType::F32, vec![1]));
    let y = node(&mut g, Op::Binary(BinaryOp::Add), &[x, x]);
    g.add_output("y", y);
    let mut binds = HashMap::new();
    binds.insert("x".to_string(), f64t(&[1], &[0.1]));
    let outs = Interpreter::new(&g, Precision::F64)
        .unwrap()
        .run(&binds)
        .unwrap();
    assert_eq!(f64s(outs.get("y").unwrap()), [0.2]);
    // Declared precision insists on the declared dtype.
    let err = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&binds)
        .unwrap_err();
    assert!(matches!(err, InterpError::Mismatch { .. }), "{err}");
}

#[test]
fn multi_node_chain_with_params_and_several_outputs() {
    // softmax-free attention-score-like chain: s = (x @ w^T) * 0.5, m = max over the last axis.
    let mut g = Graph::new(Stage::Frontend);
    let scope = g.intern_scope("layer");
    let x = input(&mut g, "x", TensorType::new(DType::F64, vec![2, 2]));
    let w = g
        .add_node(
            Op::Param {
                name: "layer.w".into(),
                ty: TensorType::new(DType::F64, vec![3, 2]),
            },
            &[],
            scope,
        )
        .unwrap();
    let w = g.result(w);
    let wt = node(&mut g, Op::Permute { perm: vec![1, 0] }, &[w]);
    let s = node(&mut g, Op::MatMul, &[x, wt]);
    let half = node(
        &mut g,
        Op::Const {
            value: 0.5,
            ty: TensorType::new(DType::F64, vec![2, 3]),
        },
        &[],
    );
    let s = node(&mut g, Op::Binary(BinaryOp::Mul), &[s, half]);
    let m = node(
        &mut g,
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: vec![1],
        },
        &[s],
    );
    g.add_output("scores", s);
    g.add_output("max", m);
    let mut weights = HashMap::new();
    // w rows: [1, 0], [0, 1], [1, 1]
    weights.insert(
        "layer.w".to_string(),
        f64t(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]),
    );
    let mut batch = HashMap::new();
    batch.insert("x".to_string(), f64t(&[2, 2], &[2.0, 4.0, -2.0, 6.0]));
    // Weights and batch live in different binding sets.
    let both = Both(&weights, &batch);
    let outs = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&both)
        .unwrap();
    assert_eq!(outs.0.len(), 2);
    assert_eq!(outs.0[0].0, "scores");
    assert_eq!(outs.0[1].0, "max");
    // x @ w^T = [[2, 4, 6], [-2, 6, 4]], halved.
    assert_eq!(
        f64s(outs.get("scores").unwrap()),
        [1.0, 2.0, 3.0, -1.0, 3.0, 2.0]
    );
    assert_eq!(f64s(outs.get("max").unwrap()), [3.0, 3.0]);
    // The interpreter can run again with the same bindings.
    let again = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&both)
        .unwrap();
    assert_eq!(again, outs);
}

/// Two binding sets looked up in turn.
struct Both<'a>(&'a HashMap<String, Tensor>, &'a HashMap<String, Tensor>);

impl Bindings for Both<'_> {
    fn lookup(&self, name: &str) -> Option<&Tensor> {
        self.0.lookup(name).or_else(|| self.1.lookup(name))
    }
}

#[test]
fn slice_of_binding_sets_looks_up_in_turn() {
    let mut weights = HashMap::new();
    weights.insert("w".to_string(), f32t(&[1], &[1.0]));
    weights.insert("x".to_string(), f32t(&[1], &[2.0]));
    let mut batch = BTreeMap::new();
    batch.insert("x".to_string(), f32t(&[1], &[3.0]));
    batch.insert("y".to_string(), f32t(&[1], &[4.0]));
    let sets: [&dyn Bindings; 2] = [&weights, &batch];
    let first = |name: &str| sets[..].lookup(name).map(|t| f32s(t)[0]);
    assert_eq!(first("w"), Some(1.0));
    assert_eq!(first("x"), Some(2.0), "the first set wins");
    assert_eq!(first("y"), Some(4.0));
    assert_eq!(first("z"), None);

    let mut g = Graph::new(Stage::Frontend);
    let w = input(&mut g, "w", TensorType::new(DType::F32, vec![1]));
    let y = input(&mut g, "y", TensorType::new(DType::F32, vec![1]));
    let s = node(&mut g, Op::Binary(BinaryOp::Add), &[w, y]);
    g.add_output("s", s);
    let outs = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&sets[..])
        .unwrap();
    assert_eq!(f32s(outs.get("s").unwrap()), [5.0]);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn out_of_range_gather_index_is_an_op_error() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", TensorType::new(DType::F32, vec![4, 2]));
    let idx = input(&mut g, "idx", TensorType::new(DType::I64, vec![2, 2]));
    let y = node(&mut g, Op::Gather { axis: 0 }, &[x, idx]);
    g.add_output("y", y);
    let interp = Interpreter::new(&g, Precision::Declared).unwrap();
    for bad in [4i64, -1] {
        let mut binds = HashMap::new();
        binds.insert("x".to_string(), f32t(&[4, 2], &[0.0; 8]));
        binds.insert("idx".to_string(), i64t(&[2, 2], &[0, 1, bad, 3]));
        let err = interp.run(&binds).unwrap_err();
        match &err {
            InterpError::Op { node, op, message } => {
                assert_eq!(*node, 2);
                assert_eq!(*op, "gather");
                assert!(message.contains(&format!("index {bad}")), "{message}");
                assert!(message.contains("0..4"), "{message}");
            }
            other => panic!("expected an op error, got {other}"),
        }
        assert!(err.to_string().contains("gather"));
    }
}

#[test]
fn out_of_range_scatter_index_is_an_op_error() {
    let err_msg = {
        let mut g = Graph::new(Stage::Frontend);
        let x = input(&mut g, "x", TensorType::new(DType::F32, vec![3]));
        let idx = input(&mut g, "idx", TensorType::new(DType::I32, vec![2]));
        let src = input(&mut g, "src", TensorType::new(DType::F32, vec![2]));
        let y = node(&mut g, Op::ScatterAdd { axis: 0 }, &[x, idx, src]);
        g.add_output("y", y);
        let mut binds = HashMap::new();
        binds.insert("x".to_string(), f32t(&[3], &[0.0; 3]));
        binds.insert("idx".to_string(), i32t(&[2], &[0, 7]));
        binds.insert("src".to_string(), f32t(&[2], &[1.0, 1.0]));
        let interp = Interpreter::new(&g, Precision::Declared).unwrap();
        interp.run(&binds).unwrap_err().to_string()
    };
    assert!(err_msg.contains("index 7"), "{err_msg}");
}

#[test]
fn missing_binding_is_unbound() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", TensorType::new(DType::F32, vec![2]));
    let w = g
        .add_node(
            Op::Param {
                name: "model.w".into(),
                ty: TensorType::new(DType::F32, vec![2]),
            },
            &[],
            root(),
        )
        .unwrap();
    let w = g.result(w);
    let y = node(&mut g, Op::Binary(BinaryOp::Mul), &[x, w]);
    g.add_output("y", y);
    let mut binds = HashMap::new();
    binds.insert("x".to_string(), f32t(&[2], &[1.0, 2.0]));
    let err = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&binds)
        .unwrap_err();
    match &err {
        InterpError::Unbound { kind, name } => {
            assert_eq!(*kind, "parameter");
            assert_eq!(name, "model.w");
        }
        other => panic!("expected Unbound, got {other}"),
    }
    assert!(err.to_string().contains("\"model.w\""), "{err}");

    let err = Interpreter::new(&g, Precision::Declared)
        .unwrap()
        .run(&HashMap::new())
        .unwrap_err();
    assert!(
        matches!(&err, InterpError::Unbound { kind: "input", name } if name == "x"),
        "{err}"
    );
}

#[test]
fn wrong_shape_binding_is_a_mismatch() {
    let mut g = Graph::new(Stage::Frontend);
    let x = input(&mut g, "x", TensorType::new(DType::F32, vec![2]));
    let y = node(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
    g.add_output("y", y);
    let interp = Interpreter::new(&g, Precision::Declared).unwrap();
    let mut binds = HashMap::new();
    binds.insert("x".to_string(), f32t(&[3], &[1.0, 2.0, 3.0]));
    let err = interp.run(&binds).unwrap_err();
    match &err {
        InterpError::Mismatch {
            kind,
            name,
            expected,
            got,
        } => {
            assert_eq!(*kind, "input");
            assert_eq!(name, "x");
            assert_eq!(expected, &TensorType::new(DType::F32, vec![2]));
            assert_eq!(got, &TensorType::new(DType::F32, vec![3]));
        }
        other => panic!("expected Mismatch, got {other}"),
    }
    assert!(err.to_string().contains("f32[2]"), "{err}");
    assert!(err.to_string().contains("f32[3]"), "{err}");

    // A wrong dtype is a mismatch too.
    binds.insert("x".to_string(), i32t(&[2], &[1, 2]));
    assert!(matches!(
        interp.run(&binds).unwrap_err(),
        InterpError::Mismatch { .. }
    ));
}
