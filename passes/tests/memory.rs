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
use mmc_passes::memory::{plan_memory, plan_memory_streaming, plan_program, update_values};
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

/// A streamed output is needed only to its last reader: a later value may take its slot,
/// while a kept output's slot may not be reused; a streamed output read later stays live to
/// that reader; and the streamed list must name graph outputs in ascending order.
#[test]
fn a_streamed_output_frees_its_slot() {
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
    let b = add(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
    let c = add(&mut g, Op::Binary(BinaryOp::Mul), &[b, x]);
    g.add_output("a", a);
    g.add_output("c", c);
    let kept = plan_memory(&g, |_| 8);
    let streamed = plan_memory_streaming(&g, |_| 8, &[a.0]);
    assert_eq!(streamed.verify(&g), Ok(()));
    assert_eq!(streamed.layout.streamed, vec![a.0]);
    assert!(
        streamed.arena_bytes() < kept.arena_bytes(),
        "{} vs {}",
        streamed.arena_bytes(),
        kept.arena_bytes()
    );
    // b (and c, overwriting it) in a's slot.
    let mut layout = kept.layout.clone();
    let a_slot = layout.slots[a.0 as usize];
    layout.slots[b.0 as usize] = a_slot;
    layout.slots[c.0 as usize] = a_slot;
    assert!(matches!(layout.check(&g), Err(LayoutError::Overlap { .. })));
    layout.streamed = vec![a.0];
    assert_eq!(layout.check(&g), Ok(()));
    // c is kept to the end: streaming a does not let a later value into c's slot.
    let mut d_graph = g.clone();
    let d = add(&mut d_graph, Op::Unary(UnaryOp::Tanh), &[x]);
    d_graph.add_output("d", d);
    let mut l = plan_memory_streaming(&d_graph, |_| 8, &[a.0, d.0]).layout;
    assert_eq!(l.check(&d_graph), Ok(()));
    l.slots[d.0 as usize] = l.slots[c.0 as usize];
    assert!(matches!(
        l.check(&d_graph),
        Err(LayoutError::Overlap { .. })
    ));
    // A streamed output read by a later node stays live to that node.
    let mut r = g.clone();
    let e = add(&mut r, Op::Binary(BinaryOp::Add), &[c, a]);
    r.add_output("e", e);
    let mut l = plan_memory_streaming(&r, |_| 8, &[a.0]).layout;
    assert_eq!(l.check(&r), Ok(()));
    l.slots[b.0 as usize] = l.slots[a.0 as usize];
    l.slots[c.0 as usize] = l.slots[a.0 as usize];
    assert!(matches!(l.check(&r), Err(LayoutError::Overlap { .. })));
    // The list itself.
    let mut l = streamed.layout.clone();
    l.streamed = vec![b.0];
    assert_eq!(l.check(&g), Err(LayoutError::StreamedNotOutput(b.0)));
    l.streamed = vec![c.0, a.0];
    assert_eq!(l.check(&g), Err(LayoutError::StreamedOrder(a.0)));
    l.streamed = vec![a.0, a.0];
    assert_eq!(l.check(&g), Err(LayoutError::StreamedOrder(a.0)));
}

/// `plan_program` streams the outputs that only update state: not the loss, and not a value
/// that is returned under another name as well.
#[test]
fn a_planned_program_streams_its_state_updates() {
    let g = random_dag(
        DType::F32,
        2,
        2,
        &[(0, 1), (1, 5), (3, 9), (5, 2), (2, 77), (0, 3)],
    );
    let names: Vec<String> = g.outputs().iter().map(|(n, _)| n.clone()).collect();
    assert!(names.len() >= 2, "{names:?}");
    let mut g2 = g.clone();
    let y = g.output("y").unwrap();
    g2.add_output("y_again", y);
    let updates = names
        .iter()
        .chain(std::iter::once(&"y_again".to_string()))
        .filter(|n| *n != "y")
        .map(|n| mmc_ir::plan::StateUpdate {
            output: n.clone(),
            state: format!("s_{n}"),
        })
        .collect();
    let p = mmc_ir::plan::Program::new("apply", g2, updates);
    let planned = plan_program(&p).unwrap();
    let layout = planned.memory.as_ref().unwrap();
    let pg = &planned.graph;
    let want: Vec<u32> = {
        let mut v: Vec<u32> = names
            .iter()
            .filter(|n| *n != "y")
            .map(|n| pg.output(n).unwrap().0)
            .filter(|&v| v != pg.output("y").unwrap().0)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert!(!want.is_empty());
    assert_eq!(layout.streamed, want);
    assert_eq!(update_values(pg, &planned), want);
    assert_eq!(layout.check_words(pg), Ok(()));
    let json = serde_json::to_string(&planned).unwrap();
    let back: mmc_ir::plan::Program = serde_json::from_str(&json).unwrap();
    assert_eq!(back, planned);
}

/// The outputs of a value `sample` picks (by output index) to stream, ascending.
fn pick_streamed(g: &Graph, sample: u32) -> Vec<u32> {
    let names: Vec<&str> = g
        .outputs()
        .iter()
        .enumerate()
        .filter(|(k, _)| sample.rotate_right(*k as u32) & 1 == 1)
        .map(|(_, (n, _))| n.as_str())
        .collect();
    mmc_ir::arena::streamed_values(g, |n| names.contains(&n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    /// With some outputs streamed, the planned run hands exactly those to the sink, each once,
    /// returns the others, and every output has the plain run's bits; `run_in` still returns
    /// them all, in output order. Twice in the same arena.
    #[test]
    fn streamed_runs_are_bit_identical(
        dtype in prop::sample::select(vec![DType::F32, DType::BF16]),
        m in 1usize..=3,
        n in 1usize..=3,
        steps in prop::collection::vec((any::<u8>(), any::<u32>()), 1..30),
        sample in any::<u32>(),
    ) {
        let g = schedule(&random_dag(dtype, m, n, &steps)).unwrap();
        let binds = bind_all(&g);
        let plain = bits(&Interpreter::new(&g, Precision::Declared).unwrap().run(&binds).unwrap());
        let streamed = pick_streamed(&g, sample);
        let plan = plan_memory_streaming(&g, |_| 8, &streamed);
        prop_assert_eq!(plan.verify(&g), Ok(()));
        let interp = Interpreter::with_layout(&g, Precision::Declared, &plan.layout).unwrap();
        let mut arena = Arena::default();
        for _ in 0..2 {
            let mut got: Vec<(String, Tensor)> = Vec::new();
            let rest = interp
                .run_in_streaming(&mut arena, &binds, &mut |name, t| got.push((name.to_string(), t)))
                .unwrap();
            for (name, _) in &got {
                let v = g.output(name).unwrap();
                prop_assert!(streamed.contains(&v.0), "{} was streamed", name);
            }
            for (name, _) in &rest.0 {
                let v = g.output(name).unwrap();
                prop_assert!(!streamed.contains(&v.0), "{} was returned", name);
            }
            got.extend(rest.0);
            got.sort_by_key(|(name, _)| {
                g.outputs().iter().position(|(n, _)| n == name).unwrap()
            });
            prop_assert_eq!(bits(&mmc_ir::Outputs(got)), plain.clone());
            prop_assert_eq!(bits(&interp.run_in(&mut arena, &binds).unwrap()), plain.clone());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever a damaged layout holds, the check refuses it or the run in it gives exactly the
    /// plain run's bits: an accepted layout is a correct one.
    #[test]
    fn a_layout_the_check_accepts_runs_correctly(
        steps in prop::collection::vec((any::<u8>(), any::<u32>()), 1..20),
        edits in prop::collection::vec((any::<u16>(), 0u64..8, 0u8..4), 1..4),
        sample in any::<u32>(),
    ) {
        let g = schedule(&random_dag(DType::F32, 2, 3, &steps)).unwrap();
        let binds = bind_all(&g);
        let plain = bits(&Interpreter::new(&g, Precision::Declared).unwrap().run(&binds).unwrap());
        // Some outputs streamed (none for a sample of 0), whose slots the plan reuses.
        let mut layout = plan_memory_streaming(&g, |_| 8, &pick_streamed(&g, sample)).layout;
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
