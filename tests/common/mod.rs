//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

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
