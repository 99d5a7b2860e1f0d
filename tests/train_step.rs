//! The training step on data a run can meet but should not train on: a micro-batch that is all
//! padding (skipped and counted, never a NaN load-balancing loss), a global batch of nothing
//! but padding (an error, no update), and a checkpoint with NaN values (named when the trainer
//! starts).

mod common;

use common::fixture;
use mmc::driver::compile_plan;
use mmc_frontend::Config;
use mmc_ir::plan::{LossReduction, Plan};
use mmc_ir::DType;
use mmc_runtime::data::loader::assemble;
use mmc_runtime::data::pack::PackedMicroBatch;
use mmc_runtime::{Checkpoint, MicroBatch, TrainError, Trainer};
use std::path::Path;

const SEQ: usize = 64;

/// The tiny Qwen3-MoE (random init) with a global batch of two micro-batches of one row.
fn plan() -> Plan {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/qwen3-moe-tiny.toml");
    let mut cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    cfg.train.micro_batch_size = 1;
    cfg.train.global_batch_size = 2;
    cfg.train.seq_length = SEQ;
    compile_plan(&cfg).unwrap_or_else(|e| panic!("{e:#}"))
}

/// One row: a sample of `len` tokens (labels on all but the first when `labelled`), then
/// padding; `len = 0` is a row of padding only.
fn row(len: usize, labelled: bool) -> PackedMicroBatch {
    let ids: Vec<i64> = (0..SEQ)
        .map(|i| {
            if i < len {
                1 + (i as i64 * 37) % 1000
            } else {
                0
            }
        })
        .collect();
    PackedMicroBatch {
        labels: (0..SEQ)
            .map(|i| {
                if labelled && i > 0 && i < len {
                    ids[i]
                } else {
                    -100
                }
            })
            .collect(),
        input_ids: ids,
        position_ids: (0..SEQ)
            .map(|i| if i < len { i as i64 } else { 0 })
            .collect(),
        segment_ids: (0..SEQ).map(|i| (i < len) as i64).collect(),
        pixel_values: Vec::new(),
        samples: (len > 0) as usize,
        tiles_used: 0,
    }
}

/// Micro-batches as the data pipeline assembles them: loss weights over the whole batch.
fn batch(rows: &[PackedMicroBatch]) -> Vec<MicroBatch> {
    assemble(rows, 1, SEQ, 0, None, LossReduction::Token).0
}

#[test]
fn an_all_padding_micro_batch_is_skipped_and_counted() {
    let plan = plan();
    let mut with_padding = Trainer::new(plan.clone()).unwrap();
    let out = with_padding
        .train_step(&batch(&[row(40, true), row(0, false)]), 1e-3)
        .unwrap();
    assert_eq!(out.skipped_micro_batches, 1);
    assert!(out.loss.is_finite() && out.aux_loss.is_finite(), "{out:?}");

    // Exactly the step over the other micro-batch alone: same loss, norm and new weights.
    let mut alone = Trainer::new(plan).unwrap();
    let want = alone.train_step(&batch(&[row(40, true)]), 1e-3).unwrap();
    assert_eq!(want.skipped_micro_batches, 0);
    assert_eq!(out.loss, want.loss);
    assert_eq!(out.lm_loss, want.lm_loss);
    assert_eq!(out.aux_loss, want.aux_loss);
    assert_eq!(out.grad_norm, want.grad_norm);
    assert_eq!(with_padding.parameters(), alone.parameters());
    assert_eq!(with_padding.steps_done(), 1);
}

#[test]
fn a_micro_batch_with_tokens_but_no_trained_label_still_runs() {
    let mut t = Trainer::new(plan()).unwrap();
    let out = t
        .train_step(&batch(&[row(40, true), row(20, false)]), 1e-3)
        .unwrap();
    assert_eq!(out.skipped_micro_batches, 0);
    assert!(out.loss.is_finite() && out.aux_loss.is_finite(), "{out:?}");
}

#[test]
fn a_global_batch_of_only_padding_is_an_error_and_changes_nothing() {
    let mut t = Trainer::new(plan()).unwrap();
    let before = t.parameters();
    let e = t
        .train_step(&batch(&[row(0, false), row(0, false)]), 1e-3)
        .unwrap_err();
    assert!(
        matches!(e, TrainError::EmptyGlobalBatch { micro_batches: 2 }),
        "{e}"
    );
    assert!(e.to_string().contains("no non-padding token"), "{e}");
    assert_eq!(t.steps_done(), 0);
    assert_eq!(t.parameters(), before);
}

#[test]
fn a_nan_in_the_checkpoint_is_named_when_the_trainer_starts() {
    let dir = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(&fixture("qwen3_moe_tiny/checkpoint")).unwrap();
    let ck = dir.path().join("ckpt");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::copy(
        fixture("qwen3_moe_tiny/checkpoint/config.json"),
        ck.join("config.json"),
    )
    .unwrap();
    let broken = "model.layers.1.self_attn.o_proj.weight";
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = src
        .names()
        .map(|name| {
            let t = src.read(name, DType::F32).unwrap();
            let mut v = t.to_f64_vec();
            if name == broken {
                v[70] = f64::NAN;
                v[75] = f64::NAN;
            }
            let t = mmc_ir::Tensor::from_f64(DType::F32, t.shape().to_vec(), &v).unwrap();
            (name.to_string(), t.shape().to_vec(), t.to_le_bytes())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &ck.join("model.safetensors")).unwrap();
    let toml = dir.path().join("model.toml");
    std::fs::write(
        &toml,
        "[model]\nhf_config = \"ckpt/config.json\"\ninit_from_hf_path = \"ckpt\"\n[train]\nseq_length = 8\n",
    )
    .unwrap();
    // Compiling checks names, shapes and dtypes only; the values are read at start.
    let plan = compile_plan(&Config::load(&toml).unwrap()).unwrap();
    let shape = src.shape(broken).unwrap().to_vec();
    let e = Trainer::new(plan)
        .err()
        .expect("a NaN checkpoint is refused");
    assert!(matches!(e, TrainError::Weights(_)), "{e}");
    let (row, col) = (70 / shape[1], 70 % shape[1]);
    assert!(
        e.to_string().ends_with(&format!(
            "model.safetensors: tensor `{broken}` holds 2 NaN or infinite values as f32 (the first at index [{row}, {col}])"
        )),
        "{e}"
    );
}
