//! Model definitions, declared with the DSL.

pub mod qwen3_moe;

use crate::config::{ComputeDType, Config};
use crate::dsl::{BuildError, ModelBuilder};
use mmc_ir::{DType, Graph};

/// What the forward graph returns besides the losses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Also output the logits (parity tests; training does not need them).
    pub logits: bool,
}

/// Declares the model a config describes as a frontend-stage graph for one micro-batch of
/// the configured shape. Outputs: `loss`, `lm_loss`, `aux_loss` and optionally `logits`.
pub fn forward_graph(cfg: &Config, opts: ForwardOptions) -> Result<Graph, BuildError> {
    let compute = match cfg.train.dtype {
        ComputeDType::F32 => DType::F32,
        ComputeDType::Bf16 => DType::BF16,
    };
    let mut b = ModelBuilder::new(DType::F32, compute);
    let inputs =
        qwen3_moe::TextInputs::declare(&mut b, cfg.train.micro_batch_size, cfg.train.seq_length)?;
    let out = qwen3_moe::causal_lm(&mut b, &cfg.model.text, &inputs)?;
    b.output("loss", out.loss);
    b.output("lm_loss", out.lm_loss);
    b.output("aux_loss", out.aux_loss);
    if opts.logits {
        b.output("logits", out.logits);
    }
    Ok(b.finish())
}
