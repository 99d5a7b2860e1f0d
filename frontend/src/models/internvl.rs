//! InternVL3.5: InternViT, the pixel-shuffle + MLP projector (`mlp1`), and the Qwen3-MoE
//! language model, with image features spliced in at the `<IMG_CONTEXT>` tokens.

use super::internvit::vision_model;
use super::qwen3_moe::{causal_lm_from_embeds, embed_tokens, LmOutputs, TextInputs};
use crate::config::{ModelConfig, VisionLanguage};
use crate::dsl::{BuildResult, ModelBuilder, Sym};
use mmc_ir::{CmpOp, DType};

/// InternVL's pixel shuffle (`ps_version` v2) on ViT features [tiles, g, g, c]: every `m x m`
/// block of patches becomes one token of width `c * m * m`; the result is [tiles, (g/m)^2, c m^2].
pub fn pixel_shuffle(b: &mut ModelBuilder, x: Sym, m: usize) -> BuildResult {
    let s = b.shape(x);
    let (n, g, c) = (s[0], s[1], s[3]);
    let x = b.reshape(x, &[n, g, g / m, c * m])?;
    let x = b.permute(x, &[0, 2, 1, 3])?;
    let x = b.reshape(x, &[n, g / m, g / m, c * m * m])?;
    let x = b.permute(x, &[0, 2, 1, 3])?;
    b.reshape(x, &[n, (g / m) * (g / m), c * m * m])
}

/// Image features [tiles * tokens_per_tile, text hidden] for pixels [tiles, 3, size, size]:
/// ViT, drop CLS, pixel shuffle, then `mlp1` = LayerNorm (eps 1e-5), Linear, GELU, Linear.
pub fn image_features(
    b: &mut ModelBuilder,
    vl: &VisionLanguage,
    text_hidden: usize,
    pixels: Sym,
) -> BuildResult {
    let tiles = b.shape(pixels)[0];
    let g = vl.patches_per_side();
    let c = vl.vision.hidden_size;
    let m = vl.projector.merge();
    let pixels = b.cast(pixels, b.compute_dtype())?;
    let x = b.scope("vision_model", |b| vision_model(b, &vl.vision, pixels))?;
    let x = b.slice(x, 1, 1, 1 + g * g)?;
    let x = b.reshape(x, &[tiles, g, g, c])?;
    let x = pixel_shuffle(b, x, m)?;
    let x = b.scope("mlp1", |b| {
        let x = b.layer_norm("0", x, 1e-5)?;
        let x = b.linear("1", x, text_hidden, true)?;
        let x = b.gelu(x)?;
        b.linear("3", x, text_hidden, true)
    })?;
    let tokens = b.shape(x)[1];
    b.reshape(x, &[tiles * tokens, text_hidden])
}

/// Replaces the embeddings [batch, seq, hidden] at `<IMG_CONTEXT>` positions by image
/// features [rows, hidden], in order: the k-th `<IMG_CONTEXT>` token of the micro-batch (row
/// major) takes feature row k. Feature rows that no token takes (unused tile slots) contribute
/// nothing, so their parameters get zero gradients.
pub fn splice_image_features(
    b: &mut ModelBuilder,
    embeds: Sym,
    input_ids: Sym,
    features: Sym,
    img_context_token_id: i64,
) -> BuildResult {
    let s = b.shape(embeds);
    let (bs, seq, h) = (s[0], s[1], s[2]);
    let ids = b.reshape(input_ids, &[bs * seq])?;
    let is_img = b.compare_scalar(CmpOp::Eq, ids, img_context_token_id as f64)?;
    let ones = b.cast(is_img, DType::I64)?;
    let count = b.cumsum(ones, 0)?;
    let rank = b.add_scalar(count, -1.0)?;
    let zero = b.full(0.0, DType::I64, &[bs * seq])?;
    let row = b.select(is_img, rank, zero)?;
    let row = b.reshape(row, &[bs * seq, 1])?;
    let row = b.broadcast_to(row, &[bs * seq, h])?;
    let picked = b.gather(features, row, 0)?;
    let picked = b.cast(picked, b.dtype(embeds))?;
    let flat = b.reshape(embeds, &[bs * seq, h])?;
    let is_img = b.reshape(is_img, &[bs * seq, 1])?;
    let mixed = b.select(is_img, picked, flat)?;
    b.reshape(mixed, &[bs, seq, h])
}

/// The whole InternVL3.5 forward with the OpenGVLab names (`vision_model.*`, `mlp1.*`,
/// `language_model.model.*`, `language_model.lm_head.weight`).
pub fn internvl(
    b: &mut ModelBuilder,
    cfg: &ModelConfig,
    vl: &VisionLanguage,
    inputs: &TextInputs,
    pixels: Sym,
) -> BuildResult<LmOutputs> {
    let text = &cfg.text;
    let features = image_features(b, vl, text.hidden_size, pixels)?;
    b.scope("language_model", |b| {
        let embeds = b.scope("model", |b| embed_tokens(b, text, inputs.input_ids))?;
        let embeds = splice_image_features(
            b,
            embeds,
            inputs.input_ids,
            features,
            cfg.img_context_token_id,
        )?;
        causal_lm_from_embeds(b, text, embeds, inputs)
    })
}
