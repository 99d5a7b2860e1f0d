//! Scheduling and memory planning on random small graphs: the schedule keeps results bit for
//! bit and never raises the peak, every layout passes the overlap check, the arena is never
//! below the largest live set, and the interpreter running over the arena gives exactly the
//! plain run's bits (twice in a row in the same arena, as a runtime replays steps).

use mmc_ir::arena::{ArenaLayout, LayoutError, Slot};
use mmc_ir::interp::Arena;
use mmc_ir::{
    BinaryOp, CmpOp, DType, Graph, Interpreter, Op, Precision, ReduceKind, ScopeId, Stage, Tensor,
    TensorType, UnaryOp, Value,
};
use mmc_passes::memory::{plan_memory, plan_program};
use mmc_passes::schedule::{peak_live_bytes, schedule, schedule_with};
use proptest::prelude::*;
use std::collections::HashMap;

fn add(g: &mut Graph, op: Op, inputs: &[Value]) -> Value {
    let id = g.add_node(op, inputs, ScopeId::default()).unwrap();
    g.result(id)
}

const UNARY: [UnaryOp; 6] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Tanh,
    UnaryOp::Sin,
    UnaryOp::Abs,
    UnaryOp::Erf,
];
const BINARY: [BinaryOp; 5] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Max,
    BinaryOp::Min,
];

/// A random DAG over [m, n] values of `dtype`: elementwise ops reading any earlier value,
/// matmuls with square parameters, reductions broadcast back, reshapes, masks and selects, an
/// integer detour, permutes of square values; several outputs.
fn random_dag(dtype: DType, m: usize, n: usize, steps: &[(u8, u32)]) -> Graph {
    let mut g = Graph::new(Stage::Autodiff);
    let t = TensorType::new(dtype, vec![m, n]);
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: t.clone(),
        },
        &[],
    );
    let mut pool = vec![x];
    for (i, &(kind, seed)) in steps.iter().enumerate() {
        let pick = |k: u32| pool[(seed.rotate_right(k) as usize) % pool.len()];
        let (a, b) = (pick(0), pick(7));
        let v = match kind % 12 {
            0 => add(&mut g, Op::Unary(UNARY[seed as usize % 6]), &[a]),
            1 | 2 => add(&mut g, Op::Binary(BINARY[seed as usize % 5]), &[a, b]),
            3 => {
                let w = add(
                    &mut g,
                    Op::Param {
                        name: format!("w{i}"),
                        ty: TensorType::new(dtype, vec![n, n]),
                    },
                    &[],
                );
                add(&mut g, Op::MatMul, &[a, w])
            }
            4 => {
                let r = add(
                    &mut g,
                    Op::Reduce {
                        kind: ReduceKind::Sum,
                        axes: vec![1],
                    },
                    &[a],
                );
                add(&mut g, Op::Broadcast { shape: vec![m, n] }, &[r])
            }
            5 => {
                let flat = add(&mut g, Op::Reshape { shape: vec![m * n] }, &[a]);
                let e = add(&mut g, Op::Unary(UnaryOp::Exp), &[flat]);
                add(&mut g, Op::Reshape { shape: vec![m, n] }, &[e])
            }
            6 => {
                let c = add(
                    &mut g,
                    Op::Const {
                        value: 0.25,
                        ty: t.clone(),
                    },
                    &[],
                );
                let mask = add(&mut g, Op::Compare(CmpOp::Lt), &[a, c]);
                add(&mut g, Op::Select, &[mask, a, b])
            }
            7 if seed & 1 == 1 => {
                let other = if dtype == DType::BF16 {
                    DType::F32
                } else {
                    DType::BF16
                };
                let k = add(&mut g, Op::Cast { to: other }, &[a]);
                add(&mut g, Op::Cast { to: dtype }, &[k])
            }
            7 => {
                let k = add(&mut g, Op::Cast { to: DType::I64 }, &[a]);
                let k2 = add(&mut g, Op::Binary(BinaryOp::Add), &[k, k]);
                add(&mut g, Op::Cast { to: dtype }, &[k2])
            }
            8 if m == n => add(&mut g, Op::Permute { perm: vec![1, 0] }, &[a]),
            9 | 10 => {
                let idx = add(
                    &mut g,
                    Op::Iota {
                        axis: 1,
                        ty: TensorType::new(DType::I64, vec![m, n]),
                    },
                    &[],
                );
                let rev = add(
                    &mut g,
                    Op::Const {
                        value: (n - 1) as f64,
                        ty: TensorType::new(DType::I64, vec![m, n]),
                    },
                    &[],
                );
                let idx = add(&mut g, Op::Binary(BinaryOp::Sub), &[rev, idx]);
                if kind % 12 == 9 {
                    add(&mut g, Op::Gather { axis: 1 }, &[a, idx])
                } else {
                    add(&mut g, Op::ScatterAdd { axis: 1 }, &[a, idx, b])
                }
            }
            11 if n >= 2 => {
                let r = add(
                    &mut g,
                    Op::Reduce {
                        kind: ReduceKind::Max,
                        axes: vec![0],
                    },
                    &[a],
                );
                let r = add(&mut g, Op::Broadcast { shape: vec![m, n] }, &[r]);
                let s = add(
                    &mut g,
                    Op::Slice {
                        start: vec![0, 1],
                        end: vec![m, n],
                    },
                    &[r],
                );
                add(
                    &mut g,
                    Op::Pad {
                        low: vec![0, 0],
                        high: vec![0, 1],
                    },
                    &[s],
                )
            }
            _ => add(&mut g, Op::Unary(UnaryOp::Cos), &[a]),
        };
        pool.push(v);
    }
    let last = *pool.last().expect("non-empty");
    g.add_output("y", last);
    for (k, &v) in pool.iter().enumerate() {
        if k % 4 == 1 && v != last {
            g.add_output(format!("o{k}"), v);
        }
    }
    g
}

fn bind_all(g: &Graph) -> HashMap<String, Tensor> {
    g.params()
        .chain(g.inputs())
        .map(|(name, t, _)| {
            let values: Vec<f64> = (0..t.numel())
                .map(|k| ((k * 7 + name.len()) as f64 * 0.37).sin() * 0.9)
                .collect();
            (
                name.to_string(),
                Tensor::from_f64(t.dtype, t.shape.clone(), &values).unwrap(),
            )
        })
        .collect()
}

/// Outputs as (name, dtype, shape, bytes), in output order.
fn bits(outs: &mmc_ir::Outputs) -> Vec<(String, TensorType, Vec<u8>)> {
    outs.0
        .iter()
        .map(|(n, t)| (n.clone(), t.ty(), t.to_le_bytes()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn planned_runs_are_bit_identical(
        dtype in prop::sample::select(vec![DType::F32, DType::F64, DType::BF16]),
        m in 1usize..=4,
        n in 1usize..=4,
        steps in prop::collection::vec((any::<u8>(), any::<u32>()), 1..30),
    ) {
        let g = random_dag(dtype, m, n, &steps);
        let binds = bind_all(&g);
        let plain = bits(&Interpreter::new(&g, Precision::Declared).unwrap().run(&binds).unwrap());

        let s = schedule(&g).unwrap();
        prop_assert_eq!(mmc_ir::verify(&s), Ok(()));
        prop_assert!(peak_live_bytes(&s, DType::size_bytes) <= peak_live_bytes(&g, DType::size_bytes));
        let scheduled = bits(&Interpreter::new(&s, Precision::Declared).unwrap().run(&binds).unwrap());
        prop_assert_eq!(&scheduled, &plain);

        let declared = plan_memory(&s, DType::size_bytes);
        prop_assert_eq!(declared.verify(&s), Ok(()));
        prop_assert!(declared.arena_bytes() >= declared.largest_live_set);

        let plan = plan_memory(&s, |_| 8);
        prop_assert_eq!(plan.verify(&s), Ok(()));
        prop_assert!(plan.arena_bytes() >= plan.largest_live_set);
        let mut arena = Arena::default();
        let interp = Interpreter::with_layout(&s, Precision::Declared, &plan.layout).unwrap();
        for _ in 0..2 {
            let planned = bits(&interp.run_in(&mut arena, &binds).unwrap());
            prop_assert_eq!(&planned, &plain);
        }
    }
}

/// `x -> exp -> neg -> reshape -> tanh`, with x an input: the ops run in one buffer.
#[test]
fn an_elementwise_chain_runs_in_one_buffer() {
    let mut g = Graph::new(Stage::Autodiff);
    let t = TensorType::new(DType::F32, vec![4, 8]);
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: t.clone(),
        },
        &[],
    );
    let a = add(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
    let b = add(&mut g, Op::Unary(UnaryOp::Neg), &[a]);
    let c = add(&mut g, Op::Reshape { shape: vec![32] }, &[b]);
    let d = add(&mut g, Op::Unary(UnaryOp::Tanh), &[c]);
    g.add_output("y", d);
    let plan = plan_memory(&g, DType::size_bytes);
    assert_eq!(plan.slot(x), None, "inputs live outside the arena");
    let s = plan.slot(a).unwrap();
    for v in [b, c, d] {
        assert_eq!(plan.slot(v), Some(s));
    }
    assert_eq!(plan.arena_bytes(), 128);
    assert_eq!(plan.largest_live_set, 128);
    assert_eq!(plan.interval(&g, a), Some((1, 2)));
    assert_eq!(plan.interval(&g, d), Some((4, 5)));
}

/// An operand still needed later is not overwritten: `b = exp(a)` while `a` is read again.
#[test]
fn a_live_operand_is_not_overwritten() {
    let mut g = Graph::new(Stage::Autodiff);
    let t = TensorType::new(DType::F32, vec![16]);
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: t.clone(),
        },
        &[],
    );
    let a = add(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
    let b = add(&mut g, Op::Unary(UnaryOp::Neg), &[a]);
    let c = add(&mut g, Op::Binary(BinaryOp::Add), &[a, b]);
    g.add_output("y", c);
    let plan = plan_memory(&g, DType::size_bytes);
    assert_ne!(plan.slot(a), plan.slot(b));
    // c may take over a or b, both dying at it.
    assert!(plan.slot(c) == plan.slot(a) || plan.slot(c) == plan.slot(b));
    assert_eq!(plan.arena_bytes(), 128);
}

/// The layout check refuses overlapping live slots, wrong sizes, missing slots and slots for
/// inputs, and slots past the arena.
#[test]
fn the_layout_check_refuses_bad_layouts() {
    let mut g = Graph::new(Stage::Autodiff);
    let t = TensorType::new(DType::F32, vec![16]);
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: t.clone(),
        },
        &[],
    );
    let a = add(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
    let b = add(&mut g, Op::Unary(UnaryOp::Neg), &[a]);
    let c = add(&mut g, Op::Binary(BinaryOp::Add), &[a, b]);
    g.add_output("y", c);
    let good = plan_memory(&g, DType::size_bytes).layout;
    assert_eq!(good.check(&g), Ok(()));
    let edit = |f: &dyn Fn(&mut ArenaLayout)| {
        let mut l = good.clone();
        f(&mut l);
        l.check(&g)
    };
    let slot = |o, b| {
        Some(Slot {
            offset: o,
            bytes: b,
        })
    };
    // b shares a's slot while a is still needed by c.
    let a_slot = good.slots[a.0 as usize];
    assert!(matches!(
        edit(&|l| l.slots[b.0 as usize] = a_slot),
        Err(LayoutError::Overlap { .. })
    ));
    // Half-overlapping slots are never legal.
    assert!(matches!(
        edit(&|l| {
            l.slots[a.0 as usize] = slot(0, 64);
            l.slots[b.0 as usize] = slot(32, 64);
            l.slots[c.0 as usize] = slot(0, 64);
            l.size = 96;
        }),
        Err(LayoutError::Overlap { .. })
    ));
    assert!(matches!(
        edit(&|l| l.slots[b.0 as usize] = slot(0, 60)),
        Err(LayoutError::Size { .. })
    ));
    assert_eq!(
        edit(&|l| l.slots[b.0 as usize] = None),
        Err(LayoutError::MissingSlot(b.0))
    );
    assert_eq!(
        edit(&|l| l.slots[x.0 as usize] = slot(0, 64)),
        Err(LayoutError::OutsideValue(x.0))
    );
    assert!(matches!(
        edit(&|l| l.size = 64),
        Err(LayoutError::OutOfArena { .. })
    ));
    assert!(matches!(
        edit(&|l| l.size = u64::MAX / 2),
        Err(LayoutError::Oversized { .. })
    ));
    assert!(matches!(
        edit(&|l| {
            l.slots.pop();
        }),
        Err(LayoutError::SlotCount { .. })
    ));
    // Only interpreter-word layouts make an interpreter arena.
    assert!(matches!(
        Interpreter::with_layout(&g, Precision::Declared, &good),
        Err(mmc_ir::interp::InterpError::Layout(LayoutError::NotWords(
            _
        )))
    ));
}

/// Constants and masks declared long before their reader are sunk to it, which lowers the
/// peak; the order keeps the results.
#[test]
fn scheduling_sinks_early_values_to_their_readers() {
    let mut g = Graph::new(Stage::Autodiff);
    let t = TensorType::new(DType::F32, vec![64]);
    let x = add(
        &mut g,
        Op::Input {
            name: "x".into(),
            ty: t.clone(),
        },
        &[],
    );
    let consts: Vec<Value> = (0..4)
        .map(|k| {
            add(
                &mut g,
                Op::Const {
                    value: k as f64,
                    ty: t.clone(),
                },
                &[],
            )
        })
        .collect();
    let mut cur = x;
    for &c in &consts {
        let e = add(&mut g, Op::Unary(UnaryOp::Exp), &[cur]);
        cur = add(&mut g, Op::Binary(BinaryOp::Mul), &[e, c]);
    }
    g.add_output("y", cur);
    let before = peak_live_bytes(&g, DType::size_bytes);
    let s = schedule(&g).unwrap();
    let after = peak_live_bytes(&s, DType::size_bytes);
    assert!(after < before, "{before} -> {after}");
    assert_eq!(after, 3 * 256);
    let binds = bind_all(&g);
    let run = |g: &Graph| {
        bits(
            &Interpreter::new(g, Precision::Declared)
                .unwrap()
                .run(&binds)
                .unwrap(),
        )
    };
    assert_eq!(run(&s), run(&g));
    // At words, too.
    let w = schedule_with(&g, |_| 8).unwrap();
    assert!(peak_live_bytes(&w, |_| 8) < peak_live_bytes(&g, |_| 8));
}

/// A program planned for the interpreter carries a checked word layout, and survives the
/// plan's text form.
#[test]
fn a_planned_program_carries_its_layout() {
    let g = random_dag(DType::F32, 3, 3, &[(0, 1), (1, 5), (3, 9), (5, 2), (2, 77)]);
    let p = mmc_ir::plan::Program::new("micro_step", g, vec![]);
    let planned = plan_program(&p).unwrap();
    let layout = planned.memory.as_ref().unwrap();
    assert!(layout.elem_bytes.is_words());
    assert_eq!(layout.check_words(&planned.graph), Ok(()));
    let json = serde_json::to_string(&planned).unwrap();
    let back: mmc_ir::plan::Program = serde_json::from_str(&json).unwrap();
    assert_eq!(back, planned);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever a damaged layout holds, the check refuses it or the run in it gives exactly the
    /// plain run's bits: an accepted layout is a correct one.
    #[test]
    fn a_layout_the_check_accepts_runs_correctly(
        steps in prop::collection::vec((any::<u8>(), any::<u32>()), 1..20),
        edits in prop::collection::vec((any::<u16>(), 0u64..8, 0u8..4), 1..4),
    ) {
        let g = schedule(&random_dag(DType::F32, 2, 3, &steps)).unwrap();
        let binds = bind_all(&g);
        let plain = bits(&Interpreter::new(&g, Precision::Declared).unwrap().run(&binds).unwrap());
        let mut layout = plan_memory(&g, |_| 8).layout;
        for &(v, k, what) in &edits {
            let v = v as usize % layout.slots.len();
            match (what, layout.slots[v]) {
                (0, Some(s)) => layout.slots[v] = Some(Slot { offset: k * 8, ..s }),
                (1, Some(s)) => layout.slots[v] = Some(Slot { offset: s.offset + 8 * k, ..s }),
                (2, _) => {
                    // Share another value's slot.
                    let other = layout.slots[(v + k as usize + 1) % layout.slots.len()];
                    if other.is_some() && layout.slots[v].is_some() {
                        layout.slots[v] = other;
                    }
                }
                _ => layout.size += 8 * k,
            }
        }
        if let Ok(interp) = Interpreter::with_layout(&g, Precision::Declared, &layout) {
            let mut arena = Arena::default();
            let planned = bits(&interp.run_in(&mut arena, &binds).unwrap());
            prop_assert_eq!(planned, plain);
        }
    }
}
