//! The Qwen3-MoE declaration: parameter names, primitive-only graphs, a stable printed form.

use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::{verify, OpClass};
use std::collections::BTreeSet;
use std::path::Path;

fn tiny(layers: usize, experts: usize) -> Config {
    let text = format!(
        r#"
[model.text]
vocab_size = 16
hidden_size = 8
num_hidden_layers = {layers}
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 4
num_experts = {experts}
num_experts_per_tok = 1
moe_intermediate_size = 4
norm_topk_prob = true
router_aux_loss_coef = 0.01
[train]
micro_batch_size = 1
global_batch_size = 1
seq_length = 3
dtype = "f32"
"#
    );
    Config::parse(Path::new("tiny.toml"), &text).unwrap()
}

#[test]
fn parameter_names_are_the_checkpoint_names() {
    let g = forward_graph(&tiny(2, 2), ForwardOptions::default())
        .unwrap()
        .graph;
    let names: BTreeSet<String> = g.params().map(|(n, _, _)| n.to_string()).collect();
    let mut want: BTreeSet<String> = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for l in 0..2 {
        for p in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "self_attn.q_norm",
            "self_attn.k_norm",
            "mlp.gate",
        ] {
            want.insert(format!("model.layers.{l}.{p}.weight"));
        }
        for e in 0..2 {
            for p in ["gate_proj", "up_proj", "down_proj"] {
                want.insert(format!("model.layers.{l}.mlp.experts.{e}.{p}.weight"));
            }
        }
    }
    assert_eq!(names, want);
}

#[test]
fn the_frontend_emits_primitive_ops_only_and_verifies() {
    let g = forward_graph(
        &tiny(2, 3),
        ForwardOptions {
            logits: true,
            ..Default::default()
        },
    )
    .unwrap()
    .graph;
    verify(&g).unwrap();
    assert!(g.nodes().iter().all(|n| n.op.class() != OpClass::Fused));
    let outs: Vec<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        outs,
        [
            "loss",
            "lm_loss",
            "aux_loss",
            "moe_load:0",
            "moe_load:1",
            "logits"
        ]
    );
}

#[test]
fn bf16_compute_casts_every_parameter_read() {
    let mut cfg = tiny(1, 2);
    cfg.train.dtype = mmc_frontend::config::ComputeDType::Bf16;
    let g = forward_graph(&cfg, ForwardOptions::default())
        .unwrap()
        .graph;
    verify(&g).unwrap();
    for (name, ty, v) in g.params() {
        assert_eq!(
            ty.dtype,
            mmc_ir::DType::F32,
            "{name}: master weights stay f32"
        );
        let casts = g.nodes().iter().filter(|n| n.inputs.contains(&v)).all(|n| {
            matches!(
                n.op,
                mmc_ir::Op::Cast {
                    to: mmc_ir::DType::BF16
                }
            )
        });
        assert!(casts, "{name} is read without a bf16 cast");
    }
}

#[test]
fn printed_graph_is_stable() {
    let g = forward_graph(&tiny(1, 2), ForwardOptions::default())
        .unwrap()
        .graph;
    insta::assert_snapshot!(mmc_ir::text::print(&g));
}

#[test]
fn printed_graph_parses_back() {
    let g = forward_graph(
        &tiny(1, 2),
        ForwardOptions {
            logits: true,
            ..Default::default()
        },
    )
    .unwrap()
    .graph;
    let text = mmc_ir::text::print(&g);
    let back = mmc_ir::text::parse(&text).unwrap();
    verify(&back).unwrap();
    assert_eq!(mmc_ir::text::print(&back), text);
}

#[test]
fn tied_embeddings_share_one_parameter() {
    let mut cfg = tiny(1, 2);
    cfg.model.text.tie_word_embeddings = true;
    let g = forward_graph(&cfg, ForwardOptions::default())
        .unwrap()
        .graph;
    verify(&g).unwrap();
    let names: Vec<&str> = g.params().map(|(n, _, _)| n).collect();
    assert!(names.contains(&"model.embed_tokens.weight"));
    assert!(!names.contains(&"lm_head.weight"));
}
