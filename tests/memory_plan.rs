//! The scheduler and the memory planner on the real training micro-steps: the arena of the
//! tiny InternVL3.5 and of InternVL3.5-30B-A3B within 10% of their largest live sets, every
//! layout checked, and planning fast enough for the 30B graph; and the tiny model trained in
//! its arenas, bit for bit as without them, its state updates streamed out of the arenas.

mod common;

use common::fixture;
use mmc::driver::compile_plan;
use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::plan::Plan;
use mmc_ir::{DType, Graph};
use mmc_ir::{Tensor, TensorData};
use mmc_passes::memory::plan_memory;
use mmc_passes::memory::{plan_program, update_values};
use mmc_passes::optimizer::AdamW;
use mmc_passes::schedule::{peak_live_bytes, schedule};
use mmc_passes::{train_step, TrainStepSpec};
use mmc_runtime::{MicroBatch, Trainer};
use std::path::Path;
use std::time::Instant;

/// The micro-step program of a config, built as `mmc compile` builds it.
fn micro_step(config: &str) -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(config);
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let model = forward_graph(
        &cfg,
        ForwardOptions {
            logits: false,
            aux_loss_scale: Some(1.0),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let step = train_step(
        &model.graph,
        &TrainStepSpec {
            loss: "loss",
            trainable: &|_| true,
            decay: &|_, t| t.rank() > 1,
            adamw: AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                clip_grad: 1.0,
            },
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    step.micro_step.graph
}

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

/// Schedules and plans `config`'s micro-step at declared sizes and in interpreter words.
fn check_config(config: &str) {
    let g = micro_step(config);
    let t = Instant::now();
    let s = schedule(&g).unwrap();
    let t_sched = t.elapsed();
    mmc_ir::verify(&s).unwrap();
    let before = peak_live_bytes(&g, DType::size_bytes);
    let after = peak_live_bytes(&s, DType::size_bytes);
    assert!(after <= before, "{before} -> {after}");
    for (what, elem) in [
        ("declared", DType::size_bytes as fn(DType) -> usize),
        ("words", |_| 8),
    ] {
        let t = Instant::now();
        let plan = plan_memory(&s, elem);
        let t_plan = t.elapsed();
        plan.verify(&s).unwrap();
        let (arena, lower) = (plan.arena_bytes(), plan.largest_live_set);
        println!(
            "{config} ({what}): {} values; peak live {:.3} -> {:.3} GB scheduled ({t_sched:.2?}); \
             arena {:.3} GB, largest live set {:.3} GB ({:+.2}%, {:?}, {t_plan:.2?})",
            s.num_values(),
            gb(before),
            gb(after),
            gb(arena),
            gb(lower),
            100.0 * (arena as f64 / lower as f64 - 1.0),
            plan.placement,
        );
        assert!(
            arena as f64 <= 1.1 * lower as f64,
            "{config} ({what}): arena {arena} B is more than 10% above the largest live set {lower} B"
        );
    }
}

#[test]
fn the_tiny_micro_step_plans_within_ten_percent() {
    check_config("internvl35-tiny.toml");
}

#[test]
fn the_30b_micro_step_plans_within_ten_percent() {
    check_config("internvl35-30b-a3b.toml");
}

/// A config's plan without memory plans, and the same plan with every program scheduled and
/// memory-planned
/// (through the plan's bytes, as `mmc run` would read it).
fn plans(cfg: &Config) -> (Plan, Plan) {
    // The plain plan: `mmc compile`'s, with the layouts the pipeline attached removed.
    let mut plan = compile_plan(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    for p in &mut plan.programs {
        p.memory = None;
    }
    let mut planned = plan.clone();
    planned.programs = plan
        .programs
        .iter()
        .map(|p| plan_program(p).unwrap())
        .collect();
    let planned = Plan::from_bytes(Path::new("plan.bin"), &planned.to_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    (plan, planned)
}

/// The tiny InternVL fixture's plans (see [`plans`]).
fn tiny_plans() -> (Plan, Plan) {
    plans(&Config::load(&fixture("internvl35_tiny/model_ogv.toml")).unwrap())
}

/// A text micro-batch for `configs/internvl35-tiny.toml` (seq 256, 7 empty tile slots).
fn tiny_config_batch(cfg: &Config) -> MicroBatch {
    let s = cfg.train.seq_length;
    let tiles = cfg.train.max_tiles;
    let ids: Vec<i64> = (0..s as i64).map(|i| 1 + (i * 7919) % 150_000).collect();
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i == 0 { -100 } else { t })
        .collect();
    let seg = vec![1i64; s];
    let w = mmc_runtime::loss::loss_weights(
        mmc_ir::plan::LossReduction::Token,
        &[mmc_runtime::loss::Row {
            labels: &labels,
            segment_ids: &seg,
        }],
    );
    let t = |shape: Vec<usize>, d: TensorData| Tensor::new(shape, d).unwrap();
    MicroBatch(
        [
            ("input_ids", t(vec![1, s], TensorData::I64(ids))),
            ("labels", t(vec![1, s], TensorData::I64(labels))),
            (
                "position_ids",
                t(vec![1, s], TensorData::I64((0..s as i64).collect())),
            ),
            ("segment_ids", t(vec![1, s], TensorData::I64(seg))),
            ("loss_weights", t(vec![1, s], TensorData::F32(w.concat()))),
            (
                "pixel_values",
                t(
                    vec![tiles, 3, 56, 56],
                    TensorData::F32(vec![0.0; tiles * 3 * 56 * 56]),
                ),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    )
}

#[test]
fn the_tiny_model_trains_bit_identically_in_its_arenas() {
    let (plan, planned) = tiny_plans();
    assert!(planned.programs.iter().all(|p| p.memory.is_some()));
    // Every program streams its state updates, and the apply program, whose outputs are all
    // updates but the gradient norm, needs far less arena for it.
    for p in &planned.programs {
        let layout = p.memory.as_ref().unwrap();
        assert_eq!(layout.streamed, update_values(&p.graph, p), "{}", p.name);
        assert!(!layout.streamed.is_empty(), "{}", p.name);
        let kept = plan_memory(&p.graph, |_| 8).arena_bytes();
        println!(
            "{}: arena {} B streamed, {kept} B kept",
            p.name, layout.size
        );
        if p.name == "apply" {
            assert!(2 * layout.size < kept, "{} vs {kept}", layout.size);
        }
    }
    let batch = [common::internvl_image_batch()];
    let mut plain = Trainer::new(plan).unwrap();
    let mut arena = Trainer::new(planned).unwrap();
    // The plan as `mmc compile` writes it: memory-planned by the pipeline, updates streamed.
    let compiled =
        compile_plan(&Config::load(&fixture("internvl35_tiny/model_ogv.toml")).unwrap()).unwrap();
    assert!(compiled
        .programs
        .iter()
        .all(|p| p.memory.as_ref().is_some_and(|l| !l.streamed.is_empty())));
    // It runs elementwise kernels and matmul epilogues (checked bit for bit below).
    let count = |f: fn(&mmc_ir::FusedOp) -> bool| {
        compiled
            .programs
            .iter()
            .flat_map(|p| p.graph.nodes())
            .filter(|n| matches!(&n.op, mmc_ir::Op::Fused(x) if f(x)))
            .count()
    };
    assert!(count(|f| matches!(f, mmc_ir::FusedOp::Elementwise { .. })) > 100);
    assert!(count(|f| matches!(f, mmc_ir::FusedOp::MatMulEpilogue { .. })) > 0);
    let mut compiled = Trainer::new(compiled).unwrap();
    assert_eq!(plain.arena_bytes(), 0);
    assert!(arena.arena_bytes() > 0);
    for step in 0..2 {
        let a = plain.train_step(&batch, 1e-3).unwrap();
        let b = arena.train_step(&batch, 1e-3).unwrap();
        let c = compiled.train_step(&batch, 1e-3).unwrap();
        assert_eq!(a.loss.to_bits(), c.loss.to_bits(), "step {step}");
        assert_eq!(a.grad_norm.to_bits(), c.grad_norm.to_bits(), "step {step}");
        assert_eq!(
            a.loss.to_bits(),
            b.loss.to_bits(),
            "step {step}: {a:?} vs {b:?}"
        );
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "step {step}");
        assert_eq!(a.aux_loss.to_bits(), b.aux_loss.to_bits(), "step {step}");
    }
    for s in plain.state_specs() {
        let (x, y) = (plain.state(&s.name).unwrap(), arena.state(&s.name).unwrap());
        let z = compiled.state(&s.name).unwrap();
        assert_eq!(
            x.to_le_bytes(),
            z.to_le_bytes(),
            "state `{}` differs",
            s.name
        );
        assert_eq!(
            x.to_le_bytes(),
            y.to_le_bytes(),
            "state `{}` differs",
            s.name
        );
    }
}

/// Peak RSS of three training steps, with the arena when `MMC_ARENA=1`, of the tiny fixture
/// or (`MMC_CONFIG=tiny`) of `configs/internvl35-tiny.toml`: run it once per mode, each in
/// its own process, e.g.
/// `MMC_ARENA=1 cargo test --release --test memory_plan -- --ignored --nocapture peak_rss`.
#[test]
#[ignore = "a measurement: run by hand, one process per mode"]
fn peak_rss_of_a_short_run() {
    let with_arena = std::env::var("MMC_ARENA").is_ok_and(|v| v == "1");
    let (plan, planned, batch) = if std::env::var("MMC_CONFIG").is_ok_and(|v| v == "tiny") {
        let cfg = Config::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/internvl35-tiny.toml"),
        )
        .unwrap();
        let (a, b) = plans(&cfg);
        (a, b, tiny_config_batch(&cfg))
    } else {
        let (a, b) = tiny_plans();
        (a, b, common::internvl_image_batch())
    };
    drop(if with_arena {
        plan.clone()
    } else {
        planned.clone()
    });
    let mut t = Trainer::new(if with_arena { planned } else { plan }).unwrap();
    let batch = [batch];
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..3 {
        loss = t.train_step(&batch, 1e-3).unwrap().loss;
    }
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    println!(
        "arena {with_arena}: arena {:.3} GB, state {:.3} GB, 3 steps {:.2?}, loss {loss}, peak RSS {:.3} GB",
        gb(t.arena_bytes()),
        gb(t.state_bytes()),
        start.elapsed(),
        usage.ru_maxrss as f64 * 1024.0 / 1e9
    );
}
