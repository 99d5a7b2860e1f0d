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
pub mod manifest;
pub mod store;

/// The file in a save folder that names the newest complete iteration.
pub const LATEST_FILE: &str = "latest_checkpointed_iteration.txt";
/// The folder name of converted weights, and what [`LATEST_FILE`] says for them.
pub const RELEASE: &str = "release";

/// The folder of iteration `n` (`iter_0000050`).
pub fn iteration_dir(n: u64) -> String {
    format!("iter_{n:07}")
}
