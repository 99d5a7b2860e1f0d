//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use assert_cmd::Command;
use mmc_ir::{DType, Tensor};
use mmc_runtime::Checkpoint;
use std::path::{Path, PathBuf};

/// A path inside tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Reads one tensor of a safetensors fixture file in its stored dtype (or `as_dtype`).
pub fn read(file: &Path, name: &str, as_dtype: DType) -> Tensor {
    let ck = Checkpoint::open(file).unwrap_or_else(|e| panic!("{e}"));
    ck.read(name, as_dtype).unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts ‖a−b‖/‖b‖ <= tol and returns the error.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes differ");
    let err = mmc_ir::relative_error(got, want);
    assert!(
        err <= tol,
        "{what}: relative error {err:.3e} exceeds {tol:.0e}"
    );
    eprintln!("{what}: relative error {err:.3e}");
    err
}

/// A micro-batch of the tiny InternVL fixture: token ids and labels [1, 48] with position ids
/// from 0, one sample, token-mean loss weights, and 4 tile slots (the image's 3 tiles, if any,
/// then zeros).
pub fn internvl_batch(
    ids: &Tensor,
    labels: &Tensor,
    tiles: Option<&Tensor>,
) -> mmc_runtime::MicroBatch {
    internvl_batch_with(ids, labels, tiles, mmc_ir::plan::LossReduction::Token)
}

/// [`internvl_batch`] with another loss reduction.
pub fn internvl_batch_with(
    ids: &Tensor,
    labels: &Tensor,
    tiles: Option<&Tensor>,
    reduction: mmc_ir::plan::LossReduction,
) -> mmc_runtime::MicroBatch {
    use mmc_ir::TensorData;
    let s = ids.shape()[1];
    let lv: Vec<i64> = labels.to_f64_vec().iter().map(|&x| x as i64).collect();
    let seg = vec![1i64; s];
    let w = mmc_runtime::loss::loss_weights(
        reduction,
        &[mmc_runtime::loss::Row {
            labels: &lv,
            segment_ids: &seg,
        }],
    );
    let slot: usize = 3 * 56 * 56;
    let mut px = vec![0.0f32; 4 * slot];
    if let Some(t) = tiles {
        for (d, v) in px.iter_mut().zip(t.to_f64_vec()) {
            *d = v as f32;
        }
    }
    let mut m = std::collections::BTreeMap::new();
    m.insert("input_ids".to_string(), ids.clone());
    m.insert("labels".to_string(), labels.clone());
    m.insert(
        "position_ids".to_string(),
        Tensor::new(vec![1, s], TensorData::I64((0..s as i64).collect())).unwrap(),
    );
    m.insert(
        "segment_ids".to_string(),
        Tensor::new(vec![1, s], TensorData::I64(seg)).unwrap(),
    );
    m.insert(
        "loss_weights".to_string(),
        Tensor::new(vec![1, s], TensorData::F32(w.concat())).unwrap(),
    );
    m.insert(
        "pixel_values".to_string(),
        Tensor::new(vec![4, 3, 56, 56], TensorData::F32(px)).unwrap(),
    );
    mmc_runtime::MicroBatch(m)
}

/// The fixture's image batch.
pub fn internvl_image_batch() -> mmc_runtime::MicroBatch {
    let inputs = fixture("internvl35_tiny/inputs.safetensors");
    internvl_batch(
        &read(&inputs, "input_ids", DType::I64),
        &read(&inputs, "labels", DType::I64),
        Some(&read(&inputs, "pixel_values", DType::F32)),
    )
}

/// The text-only batch of the zero-gradient scenario (no image tokens, empty tile slots).
pub fn internvl_text_batch() -> mmc_runtime::MicroBatch {
    let f = fixture("internvl35_train/zero_grad.safetensors");
    internvl_batch(
        &read(&f, "text_input_ids", DType::I64),
        &read(&f, "text_labels", DType::I64),
        None,
    )
}

/// The `mmc` binary of this build.
pub fn mmc() -> Command {
    Command::cargo_bin("mmc").expect("the mmc binary is built")
}

/// Runs mmc expecting failure; returns its error, asserting it is one line (progress lines
/// before it are allowed) and that nothing panicked.
pub fn fails(args: &[&str]) -> String {
    let out = mmc().args(args).output().unwrap();
    assert!(!out.status.success(), "mmc {args:?} should fail");
    assert_eq!(
        out.status.code(),
        Some(1),
        "mmc {args:?} did not exit with 1"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    let last = err
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        last.starts_with("error: "),
        "the last line is not the error: {err}"
    );
    assert_eq!(
        err.matches("error: ").count(),
        1,
        "not one error line: {err}"
    );
    last
}

/// Compiles `model` into `dir/plan.bin` and returns the plan's path.
pub fn compile(model: &str, dir: &Path) -> PathBuf {
    let plan = dir.join("plan.bin");
    let out = mmc()
        .args(["compile", model, "-o", plan.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    plan
}
