//! Forward parity of the Qwen3-MoE language model with transformers' Qwen3MoeForCausalLM:
//! logits, loss, cross-entropy and the router load-balancing loss, from the committed fixtures
//! of tests/fixtures/make_fixtures.py (section qwen3_moe).

mod common;

use common::{assert_close, fixture, read};
use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::plan::LossReduction;
use mmc_ir::{DType, Interpreter, Precision, Tensor, TensorData};
use mmc_runtime::loss::{loss_weights, Row};
use mmc_runtime::weights::param_specs;
use mmc_runtime::Checkpoint;
use std::collections::BTreeMap;

const TOL: f64 = 1e-5;

struct Run {
    outputs: mmc_ir::Outputs,
}

fn run(reduction: LossReduction) -> Run {
    run_with(reduction, |_| {})
}

fn run_with(reduction: LossReduction, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> Run {
    let cfg = Config::load(&fixture("qwen3_moe_tiny/model.toml")).expect("config loads");
    let graph = forward_graph(
        &cfg,
        ForwardOptions {
            logits: true,
            ..Default::default()
        },
    )
    .expect("model builds")
    .graph;
    let ckpt = Checkpoint::open(&fixture("qwen3_moe_tiny/checkpoint")).expect("checkpoint opens");
    let mut weights = ckpt
        .load(&param_specs(&graph, |n| {
            mmc_ir::WeightSource::Tensor(n.into())
        }))
        .expect("weights load");
    edit(&mut weights);

    let inputs = fixture("qwen3_moe_tiny/inputs.safetensors");
    let ids = read(&inputs, "input_ids", DType::I64);
    let labels = read(&inputs, "labels", DType::I64);
    let positions = read(&inputs, "position_ids", DType::I64);
    let (b, s) = (ids.shape()[0], ids.shape()[1]);
    let segments = Tensor::new(vec![b, s], TensorData::I64(vec![1; b * s])).unwrap();

    let TensorData::I64(lv) = labels.data() else {
        unreachable!()
    };
    let seg = vec![1i64; s];
    let rows: Vec<Row> = lv
        .chunks(s)
        .map(|l| Row {
            labels: l,
            segment_ids: &seg,
        })
        .collect();
    let w: Vec<f32> = loss_weights(reduction, &rows)
        .into_iter()
        .flatten()
        .collect();
    let weights_t = Tensor::new(vec![b, s], TensorData::F32(w)).unwrap();

    let mut data = BTreeMap::new();
    data.insert("input_ids".to_string(), ids);
    data.insert("labels".to_string(), labels);
    data.insert("position_ids".to_string(), positions);
    data.insert("segment_ids".to_string(), segments);
    data.insert("loss_weights".to_string(), weights_t);

    let interp = Interpreter::new(&graph, Precision::Declared).expect("graph verifies");
    let bindings: [&dyn mmc_ir::interp::Bindings; 2] = [&weights, &data];
    let outputs = interp.run(&bindings[..]).unwrap_or_else(|e| panic!("{e}"));
    Run { outputs }
}

fn reference(name: &str) -> Tensor {
    read(
        &fixture("qwen3_moe_tiny/reference.safetensors"),
        name,
        DType::F32,
    )
}

#[test]
fn logits_and_losses_match_transformers() {
    let r = run(LossReduction::Token);
    let out = |n: &str| r.outputs.get(n).unwrap_or_else(|| panic!("no output {n}"));
    assert_close("logits", out("logits"), &reference("logits"), TOL);
    assert_close("loss", out("loss"), &reference("loss"), TOL);
    assert_close("lm_loss", out("lm_loss"), &reference("lm_loss"), TOL);
    assert_close("aux_loss", out("aux_loss"), &reference("aux_loss"), TOL);
}

#[test]
fn sample_and_square_reductions_match_internvl_weighting() {
    let r = run(LossReduction::Sample);
    assert_close(
        "lm_loss (sample)",
        r.outputs.get("lm_loss").unwrap(),
        &reference("loss_sample"),
        TOL,
    );
    let r = run(LossReduction::Square);
    assert_close(
        "lm_loss (square)",
        r.outputs.get("lm_loss").unwrap(),
        &reference("loss_square"),
        TOL,
    );
}

#[test]
fn a_small_weight_change_breaks_parity() {
    // The tolerance is tight enough to see a 1e-3 change of one expert weight.
    let r = run_with(LossReduction::Token, |w| {
        let name = "model.layers.1.mlp.experts.3.up_proj.weight";
        let t = &w[name];
        let v: Vec<f64> = t.to_f64_vec().iter().map(|x| x * 1.001).collect();
        w.insert(
            name.into(),
            Tensor::from_f64(DType::F32, t.shape().to_vec(), &v).unwrap(),
        );
    });
    let err = mmc_ir::relative_error(r.outputs.get("logits").unwrap(), &reference("logits"));
    assert!(err > TOL, "perturbed weights still match ({err:.2e})");
}
