//! The scheduler and the memory planner on the real training micro-steps: the arena of the
//! tiny InternVL3.5 and of InternVL3.5-30B-A3B within 10% of their largest live sets, every
//! layout checked, and planning fast enough for the 30B graph.

use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::{DType, Graph};
use mmc_passes::memory::plan_memory;
use mmc_passes::optimizer::AdamW;
use mmc_passes::schedule::{peak_live_bytes, schedule};
use mmc_passes::{train_step, TrainStepSpec};
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
