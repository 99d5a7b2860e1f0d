//! mmc's own checkpoints: what `mmc run --save` writes, `mmc run --load` resumes from, and
//! `mmc convert` reads and writes.
//!
//! A save folder holds one folder per saved iteration (`iter_0000050/`, or `release/` for
//! weights converted from Hugging Face, as Megatron names them) and
//! `latest_checkpointed_iteration.txt`, which names the newest complete one and is replaced by
//! an atomic rename only after every file of that iteration is on disk. An iteration folder
//! holds safetensors shards in the HF layout (`model-*.safetensors` + index), with the experts
//! of each MoE layer stacked as MindSpeed-MM merges them ([`experts`]), and a manifest that
//! records each file's size and SHA-256 ([`store`]), so a truncated or corrupted file is named
//! at load.

pub mod experts;
pub mod fault;
pub mod layout;
pub mod load;
pub mod manifest;
pub mod save;
pub mod state;
pub mod store;

use std::path::PathBuf;

/// Why a checkpoint could not be saved or loaded. Each names the folder or file, and a
/// mismatch with the plan names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Weights(#[from] crate::WeightError),
    #[error(transparent)]
    Train(#[from] crate::TrainError),
    #[error("{}: no checkpoint here (neither {LATEST_FILE} nor {})", dir.display(), manifest::MANIFEST_FILE)]
    NotFound { dir: PathBuf },
    #[error("{}: {message}", path.display())]
    Latest { path: PathBuf, message: String },
    /// The checkpoint's tensors do not fit the plan: the first problem in full, and how many
    /// more there are.
    #[error("checkpoint {} does not fit the plan: {first}{}", dir.display(), if *more > 0 { format!(" (and {more} more problem(s))") } else { String::new() })]
    Mismatch {
        dir: PathBuf,
        first: String,
        more: usize,
    },
    /// Something the run asked to load that the checkpoint does not hold.
    #[error("checkpoint {}: {message}", dir.display())]
    Missing { dir: PathBuf, message: String },
    /// A save that failed part-way: the folder it was writing is removed, and the latest file
    /// still names the previous complete iteration.
    #[error("saving iteration {iteration} into {} failed (the latest complete checkpoint is still {}): {source}", dir.display(), previous.map_or("none".to_string(), |p| format!("iteration {p}")))]
    Save {
        iteration: u64,
        dir: PathBuf,
        previous: Option<u64>,
        source: Box<CheckpointError>,
    },
}

/// The file in a save folder that names the newest complete iteration.
pub const LATEST_FILE: &str = "latest_checkpointed_iteration.txt";
/// The folder name of converted weights, and what [`LATEST_FILE`] says for them.
pub const RELEASE: &str = "release";

/// The folder of iteration `n` (`iter_0000050`).
pub fn iteration_dir(n: u64) -> String {
    format!("iter_{n:07}")
}
