//! The expert load a training step reports (`StepOutcome::expert_load`, the metrics'
//! `expert_load`) is the routing of that step: the compiled plan (routed MoE, fused) run by
//! the trainer over two micro-batches gives, per MoE layer, exactly the counts of an
//! independent tally of the top-k experts that the reference interpreter picks on the
//! unfused frontend graph, over the non-padding tokens only.

mod common;

use mmc::driver::compile_plan;
use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::plan::LossReduction;
use mmc_ir::{FusedOp, Interpreter, Op, Precision, Tensor};
use mmc_runtime::data::loader::assemble;
use mmc_runtime::data::pack::PackedMicroBatch;
use mmc_runtime::{MicroBatch, Trainer};
use std::collections::BTreeMap;
use std::path::Path;

const SEQ: usize = 24;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;

/// The tiny Qwen3-MoE with three layers, the middle one dense (so the MoE layers are 0 and
/// 2), two micro-batches of one row per step.
fn config() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/qwen3-moe-tiny.toml");
    let mut cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    cfg.model.text.num_hidden_layers = 3;
    cfg.model.text.mlp_only_layers = vec![1];
    cfg.model.text.intermediate_size = Some(48);
    cfg.train.micro_batch_size = 1;
    cfg.train.global_batch_size = 2;
    cfg.train.seq_length = SEQ;
    assert_eq!(
        (
            cfg.model.text.num_experts,
            cfg.model.text.num_experts_per_tok
        ),
        (EXPERTS, TOP_K)
    );
    cfg
}

/// Two micro-batches of one row each: a sample of 20 tokens then padding, and two packed
/// samples (9 and 6 tokens) then padding.
fn batches() -> (Vec<MicroBatch>, usize) {
    let row = |lens: &[usize], salt: i64| {
        let mut mb = PackedMicroBatch {
            input_ids: vec![0; SEQ],
            labels: vec![-100; SEQ],
            position_ids: vec![0; SEQ],
            segment_ids: vec![0; SEQ],
            pixel_values: Vec::new(),
            samples: lens.len(),
            tiles_used: 0,
        };
        let mut at = 0;
        for (s, &len) in lens.iter().enumerate() {
            for i in 0..len {
                mb.input_ids[at] = 1 + (at as i64 * 37 + salt) % 1000;
                mb.labels[at] = if i > 0 { mb.input_ids[at] } else { -100 };
                mb.position_ids[at] = i as i64;
                mb.segment_ids[at] = s as i64 + 1;
                at += 1;
            }
        }
        mb
    };
    let packed = [row(&[20], 0), row(&[9, 6], 11)];
    assemble(&packed, 1, SEQ, 0, None, LossReduction::Token)
}

/// Per MoE layer, the experts the interpreter's top-k picks for the non-padding tokens of
/// `mb`, tallied here: the frontend graph with each `topk` node returned as an output.
fn tally(
    cfg: &Config,
    params: &BTreeMap<String, Tensor>,
    mb: &MicroBatch,
) -> BTreeMap<usize, Vec<u64>> {
    let mut g = forward_graph(cfg, ForwardOptions::default()).unwrap().graph;
    let tops: Vec<(String, mmc_ir::Value)> = g
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::TopK { .. }))
        .map(|n| (g.scope_name(n.scope).to_string(), n.outputs[0]))
        .collect();
    assert_eq!(tops.len(), 2, "one top-k per MoE layer");
    for (i, (_, v)) in tops.iter().enumerate() {
        g.add_output(format!("top{i}"), *v);
    }
    let interp = Interpreter::new(&g, Precision::Declared).unwrap();
    let bindings: [&dyn mmc_ir::interp::Bindings; 2] = [params, &mb.0];
    let out = interp.run(&bindings[..]).unwrap();
    let real: Vec<bool> = mb.0["segment_ids"]
        .to_f64_vec()
        .iter()
        .map(|&s| s != 0.0)
        .collect();
    let mut counts = BTreeMap::new();
    for (i, (scope, _)) in tops.iter().enumerate() {
        // `model.layers.<L>.mlp`
        let layer: usize = scope
            .strip_prefix("model.layers.")
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("top-k in scope `{scope}`"));
        let top = out.get(&format!("top{i}")).unwrap().to_f64_vec();
        assert_eq!(top.len(), SEQ * TOP_K);
        let mut c = vec![0u64; EXPERTS];
        for (t, picks) in top.chunks(TOP_K).enumerate() {
            if real[t] {
                for &e in picks {
                    c[e as usize] += 1;
                }
            }
        }
        counts.insert(layer, c);
    }
    counts
}

#[test]
fn the_step_reports_the_experts_its_routing_picked() {
    assert_eq!(
        mmc_frontend::EXPERT_LOAD_OUTPUT,
        mmc_runtime::EXPERT_LOAD_OUTPUT
    );
    let cfg = config();
    let plan = compile_plan(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
    // The plan runs the routed MoE: the expert-load outputs do not stop the fusion.
    let micro = plan.program("micro_step").unwrap();
    let routed = micro
        .graph
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Fused(FusedOp::MoePermute { .. })))
        .count();
    assert_eq!(routed, 2, "both MoE layers are routed");
    let outputs: Vec<&str> = micro
        .graph
        .outputs()
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("moe_load:"))
        .collect();
    assert_eq!(outputs, ["moe_load:0", "moe_load:2"]);

    let mut trainer = Trainer::new(plan).unwrap();
    let params = trainer.parameters();
    let (mbs, tokens) = batches();
    assert_eq!(tokens, 35);
    let mut want: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for mb in &mbs {
        for (layer, c) in tally(&cfg, &params, mb) {
            let acc = want.entry(layer).or_insert_with(|| vec![0; EXPERTS]);
            for (a, x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
    }
    let out = trainer.train_step(&mbs, 1e-3).unwrap();
    eprintln!("expert load {:?}", out.expert_load.0);
    assert_eq!(out.expert_load.0, want);
    for (layer, c) in &out.expert_load.0 {
        assert_eq!(
            c.iter().sum::<u64>(),
            (tokens * TOP_K) as u64,
            "layer {layer}"
        );
    }
    // The next step reports its own routing, not a running total.
    let again = trainer.train_step(&mbs, 1e-3).unwrap();
    for c in again.expert_load.0.values() {
        assert_eq!(c.iter().sum::<u64>(), (tokens * TOP_K) as u64);
    }
}
