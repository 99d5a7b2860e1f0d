//! The checks that refuse a plan whose file is intact but whose contents do not hold together
//! (settings out of range, programs that do not fit the state), and Megatron's learning-rate
//! schedule that the runtime applies from it. The file format itself: `plan_file.rs`.

mod common;

use common::{plan, schedule};
use mmc_ir::plan::{
    expand_stackings, Init, LrDecayStyle, LrSchedule, ParamStacking, Plan, PlanError, StackPart,
    StateKind, StateSpec,
};
use mmc_ir::plan_file::{RawPlanFile, SectionKind, INTERPRETER_TARGET};
use mmc_ir::text::parse;
use mmc_ir::{DType, TensorType};
use std::path::Path;

/// Reads plan bytes; the error, if any, as its one-line message.
fn load(bytes: &[u8]) -> Result<Plan, String> {
    Plan::from_bytes(Path::new("plan.bin"), bytes).map_err(|e| {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        s
    })
}

/// Writes an edited plan with valid checksums, as a plan made by another tool would be: the
/// settings and program checks must still refuse it.
fn edited(edit: impl FnOnce(&mut Plan)) -> String {
    let mut p = plan();
    edit(&mut p);
    load(&p.to_bytes()).unwrap_err()
}

#[test]
fn settings_out_of_range_are_refused_at_load() {
    let e = edited(|p| p.settings.micro_batch_size = 0);
    assert!(e.contains("`micro_batch_size` is 0"), "{e}");
    let e = edited(|p| p.settings.seq_length = 1);
    assert!(e.contains("`seq_length`"), "{e}");
    let e = edited(|p| p.settings.grad_accum_steps = 0);
    assert!(e.contains("`grad_accum_steps`"), "{e}");
    let e = edited(|p| p.settings.schedule.lr = -1.0);
    assert!(e.contains("`lr`"), "{e}");
    let e = edited(|p| p.settings.max_tiles = 3);
    assert!(e.contains("`max_tiles`"), "{e}");
    let e = edited(|p| p.settings.model.tile_size = Some(56));
    assert!(e.contains("vision facts"), "{e}");
}

#[test]
fn programs_that_do_not_fit_the_state_are_refused_at_load() {
    let e = edited(|p| p.state.retain(|s| s.name != "acc"));
    assert!(
        e.contains("reads `acc`") && e.contains("not in the plan's state"),
        "{e}"
    );
    let e = edited(|p| p.state[0].ty = TensorType::new(DType::F32, vec![3]));
    assert!(e.contains("state `w`"), "{e}");
    let e = edited(|p| p.programs[1].updates[0].state = "nothing".into());
    assert!(e.contains("does not exist"), "{e}");
    let e = edited(|p| p.programs.truncate(1));
    assert!(e.contains("no `apply` program"), "{e}");
}

#[test]
fn warm_up_by_fraction_keeps_its_fraction() {
    // Megatron: 0.1 of 25 iterations is 2.5 warm-up iterations, not 2.
    let s = LrSchedule {
        warmup_fraction: Some(0.1),
        decay_style: LrDecayStyle::Cosine,
        ..schedule()
    };
    let lr = |n| s.megatron_lr(n, 25);
    assert!((lr(1) - 1e-3 / 2.5).abs() < 1e-15, "{}", lr(1));
    assert!((lr(2) - 2e-3 / 2.5).abs() < 1e-15, "{}", lr(2));
    // Step 3 is past the warm-up: cosine decay from 2.5 over the remaining 22.5.
    let ratio = (3.0 - 2.5) / 22.5;
    let want = 0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0) * 1e-3;
    assert!((lr(3) - want).abs() < 1e-15, "{} vs {want}", lr(3));
    assert_eq!(lr(25), 0.0);
}

#[test]
fn schedule_values_are_checked_with_the_keys_named() {
    let check = |edit: fn(&mut LrSchedule)| {
        let mut s = schedule();
        edit(&mut s);
        s.check().unwrap_err()
    };
    assert!(check(|s| s.lr = f64::NAN).contains("`lr`"));
    assert!(check(|s| s.lr = f64::INFINITY).contains("`lr`"));
    assert!(check(|s| s.min_lr = -1.0).contains("`min_lr`"));
    assert!(check(|s| s.min_lr = 1.0).contains("above `lr`"));
    assert!(check(|s| s.warmup_fraction = Some(1.5)).contains("`lr_warmup_fraction`"));
    assert!(check(|s| {
        s.warmup_fraction = Some(0.1);
        s.warmup_iters = 3
    })
    .contains("not both"));
    let mut fine = schedule();
    fine.warmup_fraction = Some(0.1);
    assert_eq!(fine.check(), Ok(()));
}

/// A plan file whose container is intact but whose body is not a plan (hashes recomputed).
fn with_body(body: &[u8]) -> Vec<u8> {
    RawPlanFile {
        target: INTERPRETER_TARGET.into(),
        sections: vec![(SectionKind::Body, body)],
    }
    .to_bytes()
}

#[test]
fn errors_are_plan_errors() {
    // The damaged-plan error says to recompile, like the version error.
    let e = Plan::from_bytes(Path::new("p.bin"), &with_body(b"{}")).unwrap_err();
    assert!(matches!(e, PlanError::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("mmc compile"), "{e}");
    // A body with bytes after the plan is damaged too.
    let bytes = plan().to_bytes();
    let raw = RawPlanFile::parse(Path::new("p.bin"), &bytes).unwrap();
    let mut body = raw.section(SectionKind::Body).unwrap().to_vec();
    body.push(0);
    let e = load(&with_body(&body)).unwrap_err();
    assert!(e.contains("1 bytes after the plan"), "{e}");
}

/// A plan whose programs read `s` [2, 2, 1], stacked from the logical `a` and `b` [1, 2]
/// (transposed), with the accumulator `grad_acc:s` stacked from `grad_acc:a` and
/// `grad_acc:b`.
fn stacked_plan() -> Plan {
    let mut p = plan();
    let logical = |name: &str, kind| StateSpec {
        name: name.into(),
        ty: TensorType::new(DType::F32, vec![1, 2]),
        init: Init::Const(0.0),
        kind,
    };
    let param = StateKind::Parameter { trainable: true };
    let (state, stackings) = expand_stackings(
        vec![
            ("s".into(), stack_ty(), param),
            ("grad_acc:s".into(), stack_ty(), StateKind::GradAccumulator),
        ],
        &[stacking()],
    )
    .unwrap();
    assert_eq!(
        state.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["a", "b", "grad_acc:a", "grad_acc:b"]
    );
    p.state = state.into_iter().map(|(n, _, k)| logical(&n, k)).collect();
    p.stackings = stackings;
    let micro = parse(
        "graph autodiff {
  %0 = param \"s\" : f32[2, 2, 1]
  %1 = param \"grad_acc:s\" : f32[2, 2, 1]
  %2 = add %0, %1 : f32[2, 2, 1]
  output \"acc_new\" = %2
}",
    )
    .unwrap();
    p.programs[0].graph = micro;
    p.programs[0].updates[0].state = "grad_acc:s".into();
    p.programs[1].graph = parse(
        "graph optimizer {
  %0 = param \"s\" : f32[2, 2, 1]
  %1 = neg %0 : f32[2, 2, 1]
  output \"w_new\" = %1
}",
    )
    .unwrap();
    p.programs[1].updates[0].state = "s".into();
    p
}

fn stack_ty() -> TensorType {
    TensorType::new(DType::F32, vec![2, 2, 1])
}

fn stacking() -> ParamStacking {
    let part = |name: &str, expert| StackPart {
        name: name.into(),
        expert,
        column: 0,
        width: 1,
        transposed: true,
    };
    ParamStacking {
        stacked: "s".into(),
        ty: stack_ty(),
        parts: vec![part("a", 0), part("b", 1)],
    }
}

#[test]
fn a_plan_with_stacked_state_round_trips_and_its_programs_read_the_stacks() {
    let p = stacked_plan();
    assert_eq!(p.stackings.len(), 2);
    assert_eq!(p.stackings[1].stacked, "grad_acc:s");
    assert_eq!(p.stackings[1].parts[1].name, "grad_acc:b");
    assert_eq!(load(&p.to_bytes()).unwrap(), p);
}

fn edited_stacked(edit: impl FnOnce(&mut Plan)) -> String {
    let mut p = stacked_plan();
    edit(&mut p);
    load(&p.to_bytes()).unwrap_err()
}

#[test]
fn stackings_that_do_not_fit_the_state_are_refused_at_load() {
    let e = edited_stacked(|p| p.state.retain(|s| s.name != "b"));
    assert!(
        e.contains("takes `b`") && e.contains("not in the plan's state"),
        "{e}"
    );
    let e = edited_stacked(|p| p.state[0].ty = TensorType::new(DType::F32, vec![2, 1]));
    assert!(e.contains("takes `a` as f32[1, 2]"), "{e}");
    let e = edited_stacked(|p| {
        p.stackings[0].parts.pop();
    });
    assert!(e.contains("not covered"), "{e}");
    let e = edited_stacked(|p| p.stackings[0].stacked = "a".into());
    assert!(e.contains("name of a logical state"), "{e}");
    let e = edited_stacked(|p| p.stackings[1].parts[1].name = "b".into());
    assert!(
        e.contains("mixes kinds") || e.contains("stacked twice"),
        "{e}"
    );
    // Programs read the stacks, never the parts they replace.
    let e = edited_stacked(|p| {
        p.programs[1].graph = parse(
            "graph optimizer {
  %0 = param \"a\" : f32[1, 2]
  output \"w_new\" = %0
}",
        )
        .unwrap();
        p.programs[1].updates.clear();
    });
    assert!(e.contains("reads `a`"), "{e}");
}

#[test]
fn expanding_a_state_of_another_type_than_its_stacking_fails() {
    let e = expand_stackings(
        vec![(
            "adam_m:s".into(),
            TensorType::new(DType::F32, vec![4]),
            StateKind::OptimizerMoment,
        )],
        &[stacking()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("adam_m:s"), "{e}");
    // Names that only end like a stack are left alone.
    let (state, st) = expand_stackings(
        vec![(
            "other".into(),
            TensorType::new(DType::F32, vec![4]),
            StateKind::OptimizerMoment,
        )],
        &[stacking()],
    )
    .unwrap();
    assert_eq!(state.len(), 1);
    assert!(st.is_empty());
}

/// A plan whose program carries a memory layout that does not fit its graph is refused at
/// load with a message naming the program and the fault; a fitting one round-trips.
#[test]
fn a_layout_that_does_not_fit_its_graph_is_refused() {
    use mmc_ir::arena::{ArenaLayout, ElemBytes, Slot};
    let mut p = plan();
    let slot = |offset, bytes| Some(Slot { offset, bytes });
    // micro_step: %0, %1 params (outside), %2 = add: one f32[2] slot, in words 16 bytes.
    let good = ArenaLayout {
        elem_bytes: ElemBytes::words(),
        size: 16,
        slots: vec![None, None, slot(0, 16)],
        streamed: vec![],
    };
    p.programs[0].memory = Some(good.clone());
    assert_eq!(load(&p.to_bytes()).unwrap(), p);
    for (bad, want) in [
        (
            ArenaLayout {
                size: 8,
                ..good.clone()
            },
            "past the arena",
        ),
        (
            ArenaLayout {
                slots: vec![None, None, slot(0, 8)],
                ..good.clone()
            },
            "needs 16 bytes",
        ),
        (
            ArenaLayout {
                slots: vec![slot(0, 16), None, slot(0, 16)],
                ..good.clone()
            },
            "parameter or input",
        ),
        (
            ArenaLayout {
                slots: vec![None, None],
                ..good.clone()
            },
            "2 slots",
        ),
        (
            ArenaLayout {
                streamed: vec![1],
                ..good.clone()
            },
            "not a graph output",
        ),
    ] {
        p.programs[0].memory = Some(bad);
        let e = load(&p.to_bytes()).unwrap_err();
        assert!(
            e.contains("program `micro_step`: its memory layout") && e.contains(want),
            "{e}"
        );
    }
    // A damaged layout in the body is an error too, not a panic, and the layout's own message
    // comes through (postcard keeps only the fact of a custom error). In postcard the entry
    // `"f64": 8` of `elem_bytes` is the string's length, its bytes, then the varint 8.
    p.programs[0].memory = Some(good);
    let bytes = p.to_bytes();
    let raw = RawPlanFile::parse(Path::new("plan.bin"), &bytes).unwrap();
    let body = raw.section(SectionKind::Body).unwrap();
    let entry = b"\x03f64\x08";
    let at = body
        .windows(entry.len())
        .position(|w| w == entry)
        .expect("the f64 entry of elem_bytes");
    let mut edited = body.to_vec();
    edited[at + entry.len() - 1] = 0;
    let e = load(&with_body(&edited)).unwrap_err();
    assert!(e.contains("f64 0 bytes"), "{e}");
}
