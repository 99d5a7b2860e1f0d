//! Elementwise fusion on random programs: chains of every elementwise op over broadcast
//! operands, constants, matmuls and values that other nodes (reductions, outputs) also read.
//! The fused program must verify, hold only well-formed groups, and compute bit for bit what
//! the unfused one computes, in both interpreter precisions and in a memory-planned arena
//! (where a kernel may overwrite an operand).

use mmc_ir::arena::WORD_BYTES;
use mmc_ir::interp::Arena;
use mmc_ir::{
    verify, BinaryOp, CmpOp, DType, FusedOp, Graph, Interpreter, Op, Precision, ReduceKind,
    ScopeId, Stage, Tensor, TensorType, UnaryOp, Value,
};
use mmc_passes::fuse_elementwise::fuse_elementwise;
use mmc_passes::memory::plan_memory;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

const SHAPE: [usize; 2] = [5, 7];

struct Case {
    g: Graph,
    inputs: HashMap<String, Tensor>,
}

fn add(g: &mut Graph, op: Op, ins: &[Value]) -> Value {
    let id = g
        .add_node(op, ins, ScopeId::default())
        .unwrap_or_else(|e| panic!("a well-typed random node: {e}"));
    g.result(id)
}

/// A random program: float values of shape [5, 7] built from inputs, broadcast rows and
/// columns, constants, matmuls and every elementwise op; some values also go to reductions
/// and outputs, so that fusion has to stop at them.
fn random_case(seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut g = Graph::new(Stage::Optimizer);
    let mut inputs = HashMap::new();
    let ty = TensorType::new(DType::F32, SHAPE);
    let mut input = |g: &mut Graph, rng: &mut ChaCha8Rng, shape: &[usize]| {
        let name = format!("in{}", inputs.len());
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| rng.random_range(0.1..2.0)).collect();
        inputs.insert(
            name.clone(),
            Tensor::from_f64(DType::F32, shape.to_vec(), &data).expect("sizes agree"),
        );
        add(
            g,
            Op::Input {
                name,
                ty: TensorType::new(DType::F32, shape),
            },
            &[],
        )
    };
    let mut vals: Vec<Value> = (0..2).map(|_| input(&mut g, &mut rng, &SHAPE)).collect();
    let mut outputs = 0;
    for _ in 0..rng.random_range(4..24) {
        let pick = |rng: &mut ChaCha8Rng, vals: &[Value]| vals[rng.random_range(0..vals.len())];
        let v = match rng.random_range(0..12) {
            0 => {
                // A broadcast row or column.
                let shape = if rng.random_bool(0.5) { [1, 7] } else { [5, 1] };
                let x = input(&mut g, &mut rng, &shape);
                add(
                    &mut g,
                    Op::Broadcast {
                        shape: SHAPE.to_vec(),
                    },
                    &[x],
                )
            }
            1 => add(
                &mut g,
                Op::Const {
                    value: rng.random_range(0.5..1.5),
                    ty: ty.clone(),
                },
                &[],
            ),
            2 => {
                // [5, 7] x [7, 7].
                let w = input(&mut g, &mut rng, &[7, 7]);
                let x = pick(&mut rng, &vals);
                add(&mut g, Op::MatMul, &[x, w])
            }
            3 => {
                let u = [UnaryOp::Exp, UnaryOp::Tanh, UnaryOp::Neg, UnaryOp::Erf]
                    [rng.random_range(0..4)];
                let x = pick(&mut rng, &vals);
                add(&mut g, Op::Unary(u), &[x])
            }
            4 => {
                // Kept positive for sqrt and log: |x| + 1.
                let x = pick(&mut rng, &vals);
                let a = add(&mut g, Op::Unary(UnaryOp::Abs), &[x]);
                let one = add(
                    &mut g,
                    Op::Const {
                        value: 1.0,
                        ty: ty.clone(),
                    },
                    &[],
                );
                let p = add(&mut g, Op::Binary(BinaryOp::Add), &[a, one]);
                let u = if rng.random_bool(0.5) {
                    UnaryOp::Sqrt
                } else {
                    UnaryOp::Log
                };
                add(&mut g, Op::Unary(u), &[p])
            }
            5 => {
                // A value a reduction also reads, broadcast back.
                let x = pick(&mut rng, &vals);
                let r = add(
                    &mut g,
                    Op::Reduce {
                        kind: ReduceKind::Sum,
                        axes: vec![1],
                    },
                    &[x],
                );
                add(
                    &mut g,
                    Op::Broadcast {
                        shape: SHAPE.to_vec(),
                    },
                    &[r],
                )
            }
            6 => {
                // A select on a comparison.
                let (a, b) = (pick(&mut rng, &vals), pick(&mut rng, &vals));
                let c = add(&mut g, Op::Compare(CmpOp::Gt), &[a, b]);
                let (x, y) = (pick(&mut rng, &vals), pick(&mut rng, &vals));
                add(&mut g, Op::Select, &[c, x, y])
            }
            7 => {
                // Through bf16 and back.
                let x = pick(&mut rng, &vals);
                let h = add(&mut g, Op::Cast { to: DType::BF16 }, &[x]);
                add(&mut g, Op::Cast { to: DType::F32 }, &[h])
            }
            8 => {
                // An intermediate that is also an output.
                let x = pick(&mut rng, &vals);
                let y = add(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
                g.add_output(format!("side{outputs}"), y);
                outputs += 1;
                y
            }
            _ => {
                let b = [
                    BinaryOp::Add,
                    BinaryOp::Sub,
                    BinaryOp::Mul,
                    BinaryOp::Max,
                    BinaryOp::Min,
                ][rng.random_range(0..5)];
                let (x, y) = (pick(&mut rng, &vals), pick(&mut rng, &vals));
                add(&mut g, Op::Binary(b), &[x, y])
            }
        };
        vals.push(v);
    }
    // The last value and one more are outputs.
    g.add_output("y", *vals.last().expect("values"));
    g.add_output("z", vals[rng.random_range(0..vals.len())]);
    Case { g, inputs }
}

fn bits(t: &Tensor) -> Vec<u8> {
    t.to_le_bytes()
}

/// Counts of one checked case: kernels, epilogues, and kernels that overwrite an operand's
/// slot in the arena.
fn check(seed: u64) -> (usize, usize, usize) {
    let Case { g, inputs } = random_case(seed);
    let what = format!("seed {seed}");
    verify(&g).unwrap_or_else(|e| panic!("{what}: the input verifies: {e}"));
    let (f, report) = fuse_elementwise(&g).unwrap_or_else(|e| panic!("{what}: {e}"));
    verify(&f).unwrap_or_else(|e| panic!("{what}: the result verifies: {e}"));
    // Nothing elementwise is left that could have joined a kernel: every remaining primitive
    // elementwise node reads no other elementwise node read only by it.
    for precision in [Precision::Declared, Precision::F64] {
        let want = Interpreter::new(&g, precision)
            .expect("verifies")
            .run(&inputs)
            .expect("runs");
        let got = Interpreter::new(&f, precision)
            .expect("verifies")
            .run(&inputs)
            .expect("runs");
        assert_eq!(want.0.len(), got.0.len(), "{what}");
        for ((n, w), (m, o)) in want.0.iter().zip(&got.0) {
            assert_eq!(n, m, "{what}");
            assert!(
                bits(w) == bits(o),
                "{what}, {precision:?}: `{n}` differs\n{}\n{}",
                mmc_ir::text::print(&g),
                mmc_ir::text::print(&f)
            );
        }
        // In a planned arena, twice (the arena is reused).
        let plan = plan_memory(&f, |_| WORD_BYTES);
        plan.verify(&f)
            .unwrap_or_else(|e| panic!("{what}: layout: {e}"));
        let interp = Interpreter::with_layout(&f, precision, &plan.layout).expect("a layout");
        let mut arena = Arena::default();
        for round in 0..2 {
            let planned = interp.run_in(&mut arena, &inputs).expect("runs");
            for ((n, w), (_, o)) in want.0.iter().zip(&planned.0) {
                assert!(
                    bits(w) == bits(o),
                    "{what}, {precision:?}: `{n}` differs in the arena (round {round})\n{}",
                    mmc_ir::text::print(&f)
                );
            }
        }
    }
    let kernels = f
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Fused(FusedOp::Elementwise { .. })))
        .count();
    let epilogues = f
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Fused(FusedOp::MatMulEpilogue { .. })))
        .count();
    assert_eq!(
        (kernels, epilogues),
        (report.kernels, report.epilogues),
        "{what}"
    );
    let plan = plan_memory(&f, |_| WORD_BYTES);
    let in_place = f
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Fused(FusedOp::Elementwise { .. })))
        .filter(|n| {
            let slot = |v: Value| plan.layout.slots[v.0 as usize];
            let out = slot(n.outputs[0]);
            out.is_some() && n.inputs.iter().any(|&v| slot(v) == out)
        })
        .count();
    (kernels, epilogues, in_place)
}

#[test]
fn random_programs_fuse_bit_identically() {
    let (mut kernels, mut epilogues, mut in_place) = (0, 0, 0);
    for seed in 0..300 {
        let (k, e, p) = check(seed);
        kernels += k;
        epilogues += e;
        in_place += p;
    }
    // The generator exercises both kinds of kernel, and kernels that overwrite an operand.
    assert!(
        kernels > 300 && epilogues > 30 && in_place > 30,
        "{kernels} kernels, {epilogues} epilogues, {in_place} in place"
    );
}

/// Fusion stops at a value read outside its chain: here `t` is read by a reduction, so it is
/// stored, and the two chains around it are two kernels (not one that would recompute it).
#[test]
fn a_value_read_outside_the_chain_is_stored() {
    let mut g = Graph::new(Stage::Optimizer);
    let ty = TensorType::new(DType::F32, SHAPE);
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: ty.clone(),
        },
        &[],
    );
    let e = add(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
    let t = add(&mut g, Op::Unary(UnaryOp::Tanh), &[e]);
    let s = add(
        &mut g,
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![0, 1],
        },
        &[t],
    );
    let n = add(&mut g, Op::Unary(UnaryOp::Neg), &[t]);
    let y = add(&mut g, Op::Binary(BinaryOp::Mul), &[n, t]);
    g.add_output("s", s);
    g.add_output("y", y);
    let (f, report) = fuse_elementwise(&g).expect("fuses");
    assert_eq!((report.kernels, report.ops_fused), (2, 4), "{report}");
    let reduce = f
        .nodes()
        .iter()
        .find(|n| matches!(n.op, Op::Reduce { .. }))
        .expect("the reduction stays");
    let producer = &f.node(f.value_data(reduce.inputs[0]).expect("a value").node);
    assert!(
        matches!(&producer.op, Op::Fused(FusedOp::Elementwise { program, .. }) if program.to_string() == "$1 = exp $0; $2 = tanh $1"),
        "{}",
        mmc_ir::text::print(&f)
    );
}

/// An epilogue whose result has another dtype than its product (a bf16 store of an f32
/// product): the product is rounded as the matmul's own result, in an arena too.
#[test]
fn an_epilogue_rounds_its_product_to_the_product_dtype() {
    let mut g = Graph::new(Stage::Optimizer);
    let mut inputs = HashMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut input = |g: &mut Graph, name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        inputs.insert(
            name.to_string(),
            Tensor::from_f64(DType::F32, shape.to_vec(), &data).expect("sizes agree"),
        );
        add(
            g,
            Op::Input {
                name: name.into(),
                ty: TensorType::new(DType::F32, shape),
            },
            &[],
        )
    };
    let x = input(&mut g, "x", &[5, 9]);
    let w = input(&mut g, "w", &[9, 7]);
    let r = input(&mut g, "r", &[5, 7]);
    let p = add(&mut g, Op::MatMul, &[x, w]);
    let s = add(&mut g, Op::Binary(BinaryOp::Add), &[p, r]);
    let y = add(&mut g, Op::Cast { to: DType::BF16 }, &[s]);
    g.add_output("y", y);
    let (f, report) = fuse_elementwise(&g).expect("fuses");
    assert_eq!(report.epilogues, 1, "{}", mmc_ir::text::print(&f));
    let want = Interpreter::new(&g, Precision::Declared)
        .expect("verifies")
        .run(&inputs)
        .expect("runs");
    let plan = plan_memory(&f, |_| WORD_BYTES);
    let interp = Interpreter::with_layout(&f, Precision::Declared, &plan.layout).expect("a layout");
    let got = interp.run_in(&mut Arena::default(), &inputs).expect("runs");
    assert_eq!(bits(&want.0[0].1), bits(&got.0[0].1));
}
