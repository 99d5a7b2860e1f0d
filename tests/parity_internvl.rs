//! Forward parity of InternVL3.5 with transformers' InternVLForConditionalGeneration (qwen3_moe
//! text config, eager, f32), from both checkpoint layouts, plus the ViT's qk-norm and bicubic
//! position-embedding interpolation, and the parameter count of the real 30B architecture.
//! Fixtures: tests/fixtures/make_fixtures.py, sections internvl, internvit_interp and
//! internvl35_30b_count.

mod common;

use common::{assert_close, fixture, read};
use mmc_frontend::config::{NormType, VisionConfig};
use mmc_frontend::models::internvit;
use mmc_frontend::{forward_graph, CheckpointLayout, Config, ForwardOptions, ModelBuilder};
use mmc_ir::plan::LossReduction;
use mmc_ir::{DType, Interpreter, Precision, Tensor, TensorData, WeightSource};
use mmc_runtime::loss::{loss_weights, Row};
use mmc_runtime::weights::param_specs;
use mmc_runtime::Checkpoint;
use std::collections::BTreeMap;

const TOL: f64 = 1e-5;

/// Runs the tiny InternVL of `toml` on the fixture input; the unused 4th tile slot is filled
/// with `junk` to show that it does not leak into the result.
fn run(toml: &str, junk: f64) -> mmc_ir::Outputs {
    let cfg = Config::load(&fixture(&format!("internvl35_tiny/{toml}"))).expect("config loads");
    let graph = forward_graph(
        &cfg,
        ForwardOptions {
            logits: true,
            ..Default::default()
        },
    )
    .expect("model builds")
    .graph;
    let dir = cfg
        .resolve_path(cfg.model.init_from_hf_path.as_deref().unwrap(), "init")
        .unwrap();
    let ckpt = Checkpoint::open(&dir).expect("checkpoint opens");
    let layout = CheckpointLayout::detect(ckpt.names());
    let weights = ckpt
        .load(&param_specs(&graph, |n| layout.source(n)))
        .unwrap_or_else(|e| panic!("{e}"));

    let inputs = fixture("internvl35_tiny/inputs.safetensors");
    let ids = read(&inputs, "input_ids", DType::I64);
    let labels = read(&inputs, "labels", DType::I64);
    let positions = read(&inputs, "position_ids", DType::I64);
    let pixels = read(&inputs, "pixel_values", DType::F32);
    let s = ids.shape()[1];
    let tile: usize = pixels.shape()[1..].iter().product();
    let mut px = pixels.to_f64_vec();
    px.extend((0..tile).map(|i| junk * ((i as f64) * 0.37).sin()));
    let mut shape = pixels.shape().to_vec();
    shape[0] += 1;
    let pixels = Tensor::from_f64(DType::F32, shape, &px).unwrap();

    let TensorData::I64(lv) = labels.data() else {
        unreachable!()
    };
    let seg = vec![1i64; s];
    let w = loss_weights(
        LossReduction::Token,
        &[Row {
            labels: lv,
            segment_ids: &seg,
        }],
    );
    let mut data = BTreeMap::new();
    data.insert("input_ids".to_string(), ids);
    data.insert("labels".to_string(), labels);
    data.insert("position_ids".to_string(), positions);
    data.insert(
        "segment_ids".to_string(),
        Tensor::new(vec![1, s], TensorData::I64(seg)).unwrap(),
    );
    data.insert(
        "loss_weights".to_string(),
        Tensor::new(vec![1, s], TensorData::F32(w.concat())).unwrap(),
    );
    data.insert("pixel_values".to_string(), pixels);

    let interp = Interpreter::new(&graph, Precision::Declared).expect("graph verifies");
    let bindings: [&dyn mmc_ir::interp::Bindings; 2] = [&weights, &data];
    interp.run(&bindings[..]).unwrap_or_else(|e| panic!("{e}"))
}

fn reference(name: &str) -> Tensor {
    read(
        &fixture("internvl35_tiny/reference.safetensors"),
        name,
        DType::F32,
    )
}

fn check(toml: &str) {
    let out = run(toml, 1.0);
    let get = |n: &str| out.get(n).unwrap_or_else(|| panic!("no output {n}"));
    assert_close(
        &format!("{toml} logits"),
        get("logits"),
        &reference("logits"),
        TOL,
    );
    assert_close(
        &format!("{toml} lm_loss"),
        get("lm_loss"),
        &reference("lm_loss"),
        TOL,
    );
    assert_close(
        &format!("{toml} aux_loss"),
        get("aux_loss"),
        &reference("aux_loss"),
        TOL,
    );
    assert_close(
        &format!("{toml} loss"),
        get("loss"),
        &reference("loss"),
        TOL,
    );
}

#[test]
fn opengvlab_layout_matches_transformers() {
    check("model_ogv.toml");
}

#[test]
fn transformers_layout_matches_transformers() {
    check("model_hf.toml");
}

#[test]
fn an_unused_tile_slot_changes_nothing() {
    let a = run("model_ogv.toml", 0.0);
    let b = run("model_ogv.toml", 100.0);
    assert_eq!(a.get("logits"), b.get("logits"));
    assert_eq!(a.get("loss"), b.get("loss"));
}

/// The ViT alone on 84-pixel tiles (6 x 6 patches) with a 4 x 4 position grid and qk-norm.
#[test]
fn vit_with_qk_norm_and_interpolated_positions_matches_transformers() {
    let cfg = VisionConfig {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 64,
        image_size: 56,
        patch_size: 14,
        num_channels: 3,
        qkv_bias: true,
        use_qk_norm: true,
        norm_type: NormType::LayerNorm,
        layer_norm_eps: 1e-6,
        layer_scale_init_value: 0.1,
        hidden_act: "gelu".into(),
    };
    let mut b = ModelBuilder::default();
    let pixels = b
        .input("pixel_values", DType::F32, &[2, 3, 84, 84])
        .unwrap();
    let hidden = b
        .scope("vision_model", |b| internvit::vision_model(b, &cfg, pixels))
        .unwrap();
    let pos = b
        .scope("vision_model.embeddings", |b| {
            internvit::position_embedding(b, &cfg, 6)
        })
        .unwrap();
    b.output("last_hidden_state", hidden);
    b.output("position_embedding", pos);
    let graph = b.finish();

    let ckpt = Checkpoint::open(&fixture("internvit_interp/weights.safetensors")).unwrap();
    let weights = ckpt
        .load(&param_specs(&graph, |n| WeightSource::Tensor(n.into())))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut data = BTreeMap::new();
    data.insert(
        "pixel_values".to_string(),
        read(
            &fixture("internvit_interp/inputs.safetensors"),
            "pixel_values",
            DType::F32,
        ),
    );
    let interp = Interpreter::new(&graph, Precision::Declared).unwrap();
    let bindings: [&dyn mmc_ir::interp::Bindings; 2] = [&weights, &data];
    let out = interp.run(&bindings[..]).unwrap_or_else(|e| panic!("{e}"));
    let reference = |n: &str| {
        read(
            &fixture("internvit_interp/reference.safetensors"),
            n,
            DType::F32,
        )
    };
    assert_close(
        "interpolated position embedding",
        out.get("position_embedding").unwrap(),
        &reference("position_embedding_interpolated"),
        TOL,
    );
    assert_close(
        "ViT last hidden state",
        out.get("last_hidden_state").unwrap(),
        &reference("last_hidden_state"),
        TOL,
    );
}

/// transformers' `num_parameters()` of InternVLForConditionalGeneration with the
/// InternVL3.5-30B-A3B configuration (on the meta device), as recorded by the fixture script.
const INTERNVL35_30B_PARAMETERS: u64 = 30_848_730_112;

#[test]
fn the_30b_parameter_count_equals_transformers() {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("internvl35_30b_param_count.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        json["num_parameters"].as_u64(),
        Some(INTERNVL35_30B_PARAMETERS)
    );
    let cfg = Config::load(std::path::Path::new("configs/internvl35-30b-a3b.toml")).unwrap();
    let graph = forward_graph(&cfg, ForwardOptions::default())
        .unwrap()
        .graph;
    let summary = mmc_ir::summary::GraphSummary::of(&graph);
    assert_eq!(summary.param_count, INTERNVL35_30B_PARAMETERS);
}
