//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use mmc_ir::plan::{LossReduction, LrDecayStyle, LrSchedule, ModelFacts, TrainSettings};
use std::path::{Path, PathBuf};

/// A path from the repository root.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Plan settings for the tiny InternVL3.5 (56-pixel tiles, 4 tokens per tile).
pub fn settings(micro: usize, seq: usize, max_tiles: usize, accum: usize) -> TrainSettings {
    TrainSettings {
        micro_batch_size: micro,
        seq_length: seq,
        max_tiles,
        grad_accum_steps: accum,
        data_parallel: 1,
        schedule: LrSchedule {
            lr: 1e-3,
            min_lr: 0.0,
            warmup_iters: 0,
            warmup_fraction: None,
            decay_style: LrDecayStyle::Constant,
        },
        loss_reduction: LossReduction::Token,
        seed: 7,
        model: ModelFacts {
            vocab_size: 151936,
            img_context_token_id: Some(151671),
            tile_size: Some(56),
            tokens_per_tile: Some(4),
            template: Some("internvl2_5".into()),
        },
    }
}
