//! `training_state.json`: what besides tensors a run needs to continue exactly where it
//! stopped.

use serde::{Deserialize, Serialize};

/// The training-state file's name.
pub const STATE_FILE: &str = "training_state.json";

/// Where the data stream stands after the saved step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataState {
    /// A data.json: the loader's [`crate::data::DataPosition`] (the next stream position not
    /// in a returned batch).
    DataJson { sample: u64 },
    /// Pre-tokenised tensors: the index of the next global batch to draw.
    Tensors { global_batch: u64 },
}

/// mmc's randomness is all seeded (the data order and per-sample choices from the data seed,
/// the initialisation from the plan seed), so the seeds are its whole RNG state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The data seed: data.json's `dataloader_param.seed`, or the plan's seed. `None` for
    /// tensor data, which has no randomness.
    pub data_seed: Option<u64>,
    pub plan_seed: u64,
}

/// The contents of `training_state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps done.
    pub iteration: u64,
    pub data: DataState,
    /// Absent when saved with `--no-save-rng`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngState>,
    /// The SHA-256 of the plan file, for information only: any plan whose tensors fit can
    /// resume.
    #[serde(default)]
    pub plan_sha256: Option<String>,
}
