//! Model definitions, declared with the DSL.

pub mod internvit;
pub mod internvl;
pub mod qwen3_moe;

use crate::config::{ComputeDType, Config};
use crate::dsl::{BuildError, Model, ModelBuilder};
use mmc_ir::DType;

/// What the forward graph returns besides the losses.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardOptions {
    /// Also output the logits (parity tests; training does not need them).
    pub logits: bool,
    /// Multiplies the load-balancing loss inside `loss` (not `aux_loss`): with gradient
    /// accumulation each micro-batch contributes 1/n of the mean. `None` means 1.
    pub aux_loss_scale: Option<f64>,
}

/// The prefix of the outputs holding an MoE layer's expert load: `moe_load:<layer>`, f32
/// [experts], the non-padding tokens the router of decoder layer `<layer>` sent to each expert
/// (each token once per top-k pick). The trainer sums them over a step's micro-batches;
/// `mmc_runtime::EXPERT_LOAD_OUTPUT` is the same string.
pub const EXPERT_LOAD_OUTPUT: &str = "moe_load:";

/// Declares the model a config describes as a frontend-stage graph for one micro-batch of
/// the configured shape: InternVL3.5 when the config has a vision model, else the Qwen3-MoE
/// causal LM. Inputs: `input_ids`, `position_ids`, `segment_ids`, `labels`, `loss_weights`
/// (all [micro_batch_size, seq_length]) and for InternVL `pixel_values` [max_tiles, channels,
/// tile, tile] (f32). Outputs: `loss`, `lm_loss`, `aux_loss`, for each MoE layer `L` its
/// expert load `moe_load:L` ([`EXPERT_LOAD_OUTPUT`]), and optionally `logits`.
pub fn forward_graph(cfg: &Config, opts: ForwardOptions) -> Result<Model, BuildError> {
    let compute = match cfg.train.dtype {
        ComputeDType::F32 => DType::F32,
        ComputeDType::Bf16 => DType::BF16,
    };
    let mut b = ModelBuilder::new(DType::F32, compute);
    b.set_init_std(cfg.model.text.initializer_range);
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
    let loss = match opts.aux_loss_scale {
        Some(scale) if scale != 1.0 => {
            // loss = lm_loss + coef * scale * aux_loss
            let coef = cfg.model.text.router_aux_loss_coef * scale;
            let scaled = b.mul_scalar(out.aux_loss, coef)?;
            b.add(out.lm_loss, scaled)?
        }
        _ => out.loss,
    };
    b.output("loss", loss);
    b.output("lm_loss", out.lm_loss);
    b.output("aux_loss", out.aux_loss);
    for (layer, load) in &out.expert_load {
        b.output(&format!("{EXPERT_LOAD_OUTPUT}{layer}"), *load);
    }
    if opts.logits {
        b.output("logits", out.logits);
    }
    Ok(b.finish_model())
}
