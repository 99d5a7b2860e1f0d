//! Model definitions, declared with the DSL.

pub mod internvit;
pub mod internvl;
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
/// the configured shape: InternVL3.5 when the config has a vision model, else the Qwen3-MoE
/// causal LM. Inputs: `input_ids`, `position_ids`, `segment_ids`, `labels`, `loss_weights`
/// (all [micro_batch_size, seq_length]) and for InternVL `pixel_values` [max_tiles, channels,
/// tile, tile] (f32). Outputs: `loss`, `lm_loss`, `aux_loss` and optionally `logits`.
pub fn forward_graph(cfg: &Config, opts: ForwardOptions) -> Result<Graph, BuildError> {
    let compute = match cfg.train.dtype {
        ComputeDType::F32 => DType::F32,
        ComputeDType::Bf16 => DType::BF16,
    };
    let mut b = ModelBuilder::new(DType::F32, compute);
    let inputs =
        qwen3_moe::TextInputs::declare(&mut b, cfg.train.micro_batch_size, cfg.train.seq_length)?;
    let out = match &cfg.model.vision_language {
        Some(vl) => {
            let size = vl.tile_size;
            let shape = [cfg.train.max_tiles, vl.vision.num_channels, size, size];
            let pixels = b.input("pixel_values", DType::F32, &shape)?;
            internvl::internvl(&mut b, &cfg.model, vl, &inputs, pixels)?
        }
        None => qwen3_moe::causal_lm(&mut b, &cfg.model.text, &inputs)?,
    };
    b.output("loss", out.loss);
    b.output("lm_loss", out.lm_loss);
    b.output("aux_loss", out.aux_loss);
    if opts.logits {
        b.output("logits", out.logits);
    }
    Ok(b.finish())
}
