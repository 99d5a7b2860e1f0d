//! The recompute pass on the tiny InternVL3.5 micro-step (`configs/internvl35-tiny.toml`, built
//! as `mmc compile` builds it): loss and every gradient bit-identical under each mode, `full`
//! lowers the activation peak, `selective` lies between, and a budget is met. An ignored test
//! prints the 30B figures.

mod common;

use common::{assert_bit_identical, assert_only_layer_outputs_kept, bindings, run, Rng};
use mmc_frontend::config::{Recompute, TrainConfig};
use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::{verify, Graph, Tensor};
use mmc_passes::optimizer::AdamW;
use mmc_passes::{
    activation_peak, live_values, recompute, train_step, RecomputeMode, RecomputeReport,
    TrainStepSpec,
};
use std::path::Path;
use std::time::Instant;

/// The mode the `[train]` keys select, as the driver maps them.
fn mode_of(train: &TrainConfig) -> RecomputeMode {
    match (train.recompute_budget_gb, train.recompute) {
        (Some(gb), _) => RecomputeMode::budget_gb(gb),
        (None, Recompute::None) => RecomputeMode::None,
        (None, Recompute::Selective) => RecomputeMode::Selective,
        (None, Recompute::Full) => RecomputeMode::Full,
    }
}

fn config(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name);
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The micro-step graph of `cfg`, as `compile_plan` builds it (every parameter trained).
fn micro_step(cfg: &Config) -> Graph {
    let t = &cfg.train;
    let accum = t.global_batch_size / (t.micro_batch_size * cfg.parallel.dp);
    let fwd = forward_graph(
        cfg,
        ForwardOptions {
            logits: false,
            aux_loss_scale: Some(1.0 / (accum * cfg.parallel.dp) as f64),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let step = train_step(
        &fwd.graph,
        &TrainStepSpec {
            loss: "loss",
            trainable: &|_| true,
            decay: &|_, ty| ty.rank() > 1,
            adamw: AdamW {
                beta1: t.adam_beta1,
                beta2: t.adam_beta2,
                eps: t.adam_eps,
                weight_decay: t.weight_decay,
                clip_grad: t.clip_grad,
            },
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    step.micro_step.graph
}

/// Token data: two tiles' worth of `<IMG_CONTEXT>` tokens, then text with labels.
fn data(cfg: &Config, g: &Graph, seed: u64) -> std::collections::BTreeMap<String, Tensor> {
    let img = cfg.model.img_context_token_id;
    let per_tile = cfg
        .model
        .vision_language
        .as_ref()
        .expect("InternVL has a vision tower")
        .tokens_per_tile();
    bindings(g, &mut Rng(seed), &|name, ty, rng| {
        let s = *ty.shape.last()?;
        let ids: Vec<f64> = (0..s)
            .map(|i| {
                if i < 2 * per_tile {
                    img as f64
                } else {
                    rng.below(1000) as f64
                }
            })
            .collect();
        let vals: Vec<f64> = match name {
            "input_ids" | "labels" => ids
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    if name == "labels" && i < 2 * per_tile {
                        -100.0
                    } else {
                        t
                    }
                })
                .collect(),
            "position_ids" => (0..s).map(|i| i as f64).collect(),
            "segment_ids" => vec![1.0; s],
            "loss_weights" => vec![1.0 / s as f64; s],
            _ => return None,
        };
        Some(Tensor::from_f64(ty.dtype, ty.shape.clone(), &vals).unwrap())
    })
}

fn apply(g: &Graph, mode: RecomputeMode) -> (Graph, RecomputeReport) {
    let (out, report) = recompute(g, mode).unwrap_or_else(|e| panic!("{mode}: {e}"));
    verify(&out).unwrap_or_else(|e| panic!("{mode}: {e}"));
    (out, report)
}

#[test]
fn the_tiny_internvl_micro_step_is_bit_identical_and_lighter_under_recompute() {
    let mut cfg = config("internvl35-tiny.toml");
    cfg.train.seq_length = 24;
    cfg.train.max_tiles = 2;
    assert_eq!(mode_of(&cfg.train), RecomputeMode::None);
    let g = micro_step(&cfg);
    let b = data(&cfg, &g, 11);
    let want = run(&g, &b);
    let loss = want.get("loss").expect("the micro-step outputs the loss");
    assert!(loss.to_f64_vec()[0].is_finite(), "loss {loss:?}");

    let (full_g, full) = apply(&g, RecomputeMode::Full);
    let (sel_g, sel) = apply(&g, RecomputeMode::Selective);
    // 2 InternViT + 2 Qwen3-MoE layers; per layer one attention core, and the GELU of each
    // ViT layer, the SiLU of each expert (4 per MoE layer), the projector's GELU.
    assert_eq!(full.full_layers, 4, "{full}");
    assert_only_layer_outputs_kept(&full_g);
    assert_eq!(sel.selective_units, 2 * 2 + 2 * (1 + 4) + 1, "{sel}");
    assert!(full.peak_after < full.peak_before, "{full}");
    assert!(
        full.peak_after <= sel.peak_after && sel.peak_after < sel.peak_before,
        "{sel} / {full}"
    );
    assert!(sel.extra_flops < full.extra_flops, "{sel} / {full}");
    eprintln!("{sel}\n{full}");
    assert_bit_identical(&want, &run(&full_g, &b), "full");
    assert_bit_identical(&want, &run(&sel_g, &b), "selective");

    // A budget halfway between selective and full, given as the TOML key.
    let mid = (sel.peak_after + full.peak_after) / 2;
    cfg.train.recompute_budget_gb = Some(mid as f64 / mmc_passes::recompute::GB);
    let mode = mode_of(&cfg.train);
    let (bud_g, bud) = apply(&g, mode);
    assert!(bud.peak_after <= mid, "{bud} over {mid}");
    assert_eq!(bud.peak_after, activation_peak(&bud_g).bytes);
    assert!(bud.extra_flops <= full.extra_flops, "{bud} / {full}");
    assert_bit_identical(&want, &run(&bud_g, &b), "budget");
}

/// Prints the activation peak of the 30B micro-step (seq 4096, micro batch 1, bf16) for each
/// mode. `cargo test --release -p mmc-passes --test recompute_internvl -- --ignored --nocapture`
#[test]
#[ignore = "builds the 30B graph: about a minute"]
fn internvl35_30b_activation_peaks() {
    let mut cfg = config("internvl35-30b-a3b.toml");
    cfg.train.seq_length = 4096;
    cfg.train.micro_batch_size = 1;
    assert_eq!(cfg.train.dtype, mmc_frontend::config::ComputeDType::Bf16);
    let t0 = Instant::now();
    let g = micro_step(&cfg);
    eprintln!(
        "30B micro-step: {} nodes, built in {:.1} s",
        g.nodes().len(),
        t0.elapsed().as_secs_f64()
    );
    for mode in [
        RecomputeMode::None,
        RecomputeMode::Selective,
        RecomputeMode::Full,
    ] {
        let t = Instant::now();
        let (out, r) = apply(&g, mode);
        eprintln!(
            "{mode:>9}: activation peak {:.2} GB ({} nodes, pass {:.1} s); {r}",
            r.peak_after as f64 / 1e9,
            out.nodes().len(),
            t.elapsed().as_secs_f64()
        );
        print_peak(&out);
    }
    let t = Instant::now();
    let (_, r) = apply(&g, RecomputeMode::budget_gb(300.0));
    eprintln!("budget: pass {:.1} s; {r}", t.elapsed().as_secs_f64());
}

/// Where the peak of `g` lies and what is live there, summed by scope (top 8).
fn print_peak(g: &Graph) {
    let peak = activation_peak(g);
    let mut by_scope: std::collections::BTreeMap<String, u64> = Default::default();
    for v in live_values(g, peak.node) {
        let node = g.node(g.value_data(v).expect("a value of g").node);
        let key = g
            .scope_name(node.scope)
            .split('.')
            .take(4)
            .collect::<Vec<_>>()
            .join(".");
        *by_scope.entry(key).or_default() += g.ty(v).size_bytes() as u64;
    }
    let mut v: Vec<_> = by_scope.into_iter().collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    let node = &g.nodes()[peak.node];
    eprintln!(
        "    peak at node {} ({} in `{}`); largest live groups:",
        peak.node,
        node.op.name(),
        g.scope_name(node.scope)
    );
    for (k, b) in v.iter().take(8) {
        eprintln!("      {:>9.2} GB  {k}", *b as f64 / 1e9);
    }
}
