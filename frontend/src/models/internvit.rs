//! InternViT, the vision encoder of InternVL, with the OpenGVLab parameter names
//! (`vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`).
//!
//! Patch embedding is a patchify (reshape + permute) followed by a matmul; a CLS token is
//! prepended; the absolute position embedding is bicubic-interpolated (from primitives) when
//! the tile size differs from the one it was trained for; pre-norm blocks with a fused qkv
//! projection, optional qk RMSNorm, layer scales `ls1`/`ls2` and an exact-GELU MLP. There is no
//! final norm.

use crate::config::{NormType, VisionConfig};
use crate::dsl::{BuildResult, ModelBuilder, Sym};
use mmc_ir::plan::Init;
use mmc_ir::{BinaryOp, DType};

/// torch's bicubic kernel parameter.
const CUBIC_A: f64 = -0.75;

/// `((A + 2) x - (A + 3)) x^2 + 1`, the cubic kernel for |x| <= 1.
fn cubic_near(b: &mut ModelBuilder, x: Sym) -> BuildResult {
    let p = b.mul_scalar(x, CUBIC_A + 2.0)?;
    let p = b.add_scalar(p, -(CUBIC_A + 3.0))?;
    let x2 = b.mul(x, x)?;
    let p = b.mul(p, x2)?;
    b.add_scalar(p, 1.0)
}

/// `((A x - 5A) x + 8A) x - 4A`, the cubic kernel for 1 < |x| < 2.
fn cubic_far(b: &mut ModelBuilder, x: Sym) -> BuildResult {
    let p = b.mul_scalar(x, CUBIC_A)?;
    let p = b.add_scalar(p, -5.0 * CUBIC_A)?;
    let p = b.mul(p, x)?;
    let p = b.add_scalar(p, 8.0 * CUBIC_A)?;
    let p = b.mul(p, x)?;
    b.add_scalar(p, -4.0 * CUBIC_A)
}

/// The [n_out, n_in] matrix of 1-D bicubic resampling as torch's `interpolate(mode="bicubic",
/// align_corners=False)` computes it: source coordinate `(i + 0.5) * n_in / n_out - 0.5`,
/// four taps around its floor with the cubic kernel (A = -0.75), taps clamped to the edge.
pub fn bicubic_matrix(b: &mut ModelBuilder, n_in: usize, n_out: usize) -> BuildResult {
    let i = b.iota(DType::F32, &[n_out, 1], 0)?;
    let src = b.add_scalar(i, 0.5)?;
    let src = b.mul_scalar(src, n_in as f64 / n_out as f64)?;
    let src = b.add_scalar(src, -0.5)?;
    // src >= -0.5, so floor(src) = trunc(src + 1) - 1.
    let shifted = b.add_scalar(src, 1.0)?;
    let floor = b.cast(shifted, DType::I64)?;
    let floor = b.add_scalar(floor, -1.0)?;
    let floor_f = b.cast(floor, DType::F32)?;
    let t = b.sub(src, floor_f)?;
    let one = b.full_like(1.0, t)?;
    let one_minus_t = b.sub(one, t)?;
    let t_plus_1 = b.add_scalar(t, 1.0)?;
    let two_minus_t = b.add_scalar(one_minus_t, 1.0)?;
    let w = [
        cubic_far(b, t_plus_1)?,
        cubic_near(b, t)?,
        cubic_near(b, one_minus_t)?,
        cubic_far(b, two_minus_t)?,
    ];
    let mut taps = Vec::with_capacity(4);
    for k in 0..4i64 {
        let idx = b.add_scalar(floor, (k - 1) as f64)?;
        let lo = b.full(0.0, DType::I64, &[n_out, 1])?;
        let hi = b.full((n_in - 1) as f64, DType::I64, &[n_out, 1])?;
        let idx = b.binary(BinaryOp::Max, idx, lo)?;
        taps.push(b.binary(BinaryOp::Min, idx, hi)?);
    }
    let weights = b.concat(&w, 1)?;
    let indices = b.concat(&taps, 1)?;
    let zeros = b.full(0.0, DType::F32, &[n_out, n_in])?;
    b.scatter_add(zeros, indices, weights, 1)
}

/// Resamples a [g_in, g_in, c] grid to [g_out, g_out, c] bicubically, rows then columns.
fn resize_grid(b: &mut ModelBuilder, grid: Sym, g_in: usize, g_out: usize) -> BuildResult {
    let c = b.shape(grid)[2];
    let dtype = b.dtype(grid);
    let m = bicubic_matrix(b, g_in, g_out)?;
    let m = b.cast(m, dtype)?;
    let x = b.reshape(grid, &[g_in, g_in * c])?;
    let x = b.matmul(m, x)?; // [g_out (rows), g_in (cols) * c]
    let x = b.reshape(x, &[g_out, g_in, c])?;
    let x = b.transpose(x, 0, 1)?; // [cols, rows, c]
    let x = b.reshape(x, &[g_in, g_out * c])?;
    let x = b.matmul(m, x)?; // [g_out (cols), g_out (rows) * c]
    let x = b.reshape(x, &[g_out, g_out, c])?;
    b.transpose(x, 0, 1)
}

/// The position embedding `<scope>.position_embedding` [1, 1 + grid^2, hidden] for a tile of
/// `g x g` patches: as stored when `g` is the trained grid, else its patch part resized
/// bicubically (the CLS position is kept).
pub fn position_embedding(b: &mut ModelBuilder, cfg: &VisionConfig, g: usize) -> BuildResult {
    let grid = cfg.grid();
    let c = cfg.hidden_size;
    // InternViT initialises its class and position embeddings from a standard normal.
    let pos = b.param(
        "position_embedding",
        &[1, grid * grid + 1, c],
        Init::Normal { std: 1.0 },
    )?;
    if grid == g {
        return Ok(pos);
    }
    let cls_pos = b.slice(pos, 1, 0, 1)?;
    let patch_pos = b.slice(pos, 1, 1, grid * grid + 1)?;
    let patch_pos = b.reshape(patch_pos, &[grid, grid, c])?;
    let patch_pos = resize_grid(b, patch_pos, grid, g)?;
    let patch_pos = b.reshape(patch_pos, &[1, g * g, c])?;
    b.concat(&[cls_pos, patch_pos], 1)
}

/// Patch embedding, CLS token and position embedding: pixels [tiles, channels, size, size] to
/// tokens [tiles, 1 + patches, hidden].
fn embeddings(b: &mut ModelBuilder, cfg: &VisionConfig, pixels: Sym) -> BuildResult {
    let shape = b.shape(pixels);
    let (tiles, ch, size) = (shape[0], shape[1], shape[2]);
    let (p, c) = (cfg.patch_size, cfg.hidden_size);
    let g = size / p;
    b.scope("embeddings", |b| {
        let std = b.init_std();
        let w = b.param(
            "patch_embedding.weight",
            &[c, ch, p, p],
            Init::Normal { std },
        )?;
        let bias = b.param("patch_embedding.bias", &[c], Init::Const(0.0))?;
        let x = b.reshape(pixels, &[tiles, ch, g, p, g, p])?;
        let x = b.permute(x, &[0, 2, 4, 1, 3, 5])?;
        let x = b.reshape(x, &[tiles * g * g, ch * p * p])?;
        let w = b.reshape(w, &[c, ch * p * p])?;
        let x = b.linear_with(x, w)?;
        let x = b.add(x, bias)?;
        let x = b.reshape(x, &[tiles, g * g, c])?;
        let cls = b.param("class_embedding", &[1, 1, c], Init::Normal { std: 1.0 })?;
        let cls = b.broadcast_to(cls, &[tiles, 1, c])?;
        let x = b.concat(&[cls, x], 1)?;
        let pos = position_embedding(b, cfg, g)?;
        b.add(x, pos)
    })
}

fn norm(b: &mut ModelBuilder, cfg: &VisionConfig, name: &str, x: Sym) -> BuildResult {
    match cfg.norm_type {
        NormType::LayerNorm => b.layer_norm(name, x, cfg.layer_norm_eps),
        NormType::RmsNorm => b.rms_norm(name, x, cfg.layer_norm_eps),
    }
}

/// Bidirectional multi-head self-attention with a fused qkv projection (`attn`).
fn attention(b: &mut ModelBuilder, cfg: &VisionConfig, x: Sym) -> BuildResult {
    let shape = b.shape(x);
    let (t, n, c) = (shape[0], shape[1], shape[2]);
    let (h, d) = (cfg.num_attention_heads, cfg.head_dim());
    b.scope("attn", |b| {
        let qkv = b.linear("qkv", x, 3 * c, cfg.qkv_bias)?;
        let mut q = b.slice(qkv, 2, 0, c)?;
        let mut k = b.slice(qkv, 2, c, 2 * c)?;
        let v = b.slice(qkv, 2, 2 * c, 3 * c)?;
        if cfg.use_qk_norm {
            q = b.rms_norm("q_norm", q, cfg.layer_norm_eps)?;
            k = b.rms_norm("k_norm", k, cfg.layer_norm_eps)?;
        }
        let heads = |b: &mut ModelBuilder, s: Sym| -> BuildResult {
            let s = b.reshape(s, &[t, n, h, d])?;
            b.transpose(s, 1, 2)
        };
        let (q, k, v) = (heads(b, q)?, heads(b, k)?, heads(b, v)?);
        let kt = b.transpose(k, 2, 3)?;
        let scores = b.matmul(q, kt)?;
        let scores = b.mul_scalar(scores, (d as f64).powf(-0.5))?;
        let probs = b.softmax(scores, 3)?;
        let o = b.matmul(probs, v)?;
        let o = b.transpose(o, 1, 2)?;
        let o = b.reshape(o, &[t, n, c])?;
        b.linear("proj", o, c, true)
    })
}

/// One pre-norm block: `x + ls1 * attn(norm1(x))`, then `x + ls2 * mlp(norm2(x))`.
fn block(b: &mut ModelBuilder, cfg: &VisionConfig, x: Sym) -> BuildResult {
    let c = cfg.hidden_size;
    let h = norm(b, cfg, "norm1", x)?;
    let a = attention(b, cfg, h)?;
    let ls1 = b.param("ls1", &[c], Init::Const(cfg.layer_scale_init_value))?;
    let a = b.mul(a, ls1)?;
    let x = b.add(x, a)?;
    let h = norm(b, cfg, "norm2", x)?;
    let m = b.scope("mlp", |b| {
        let h = b.linear("fc1", h, cfg.intermediate_size, true)?;
        let h = b.gelu(h)?;
        b.linear("fc2", h, c, true)
    })?;
    let ls2 = b.param("ls2", &[c], Init::Const(cfg.layer_scale_init_value))?;
    let m = b.mul(m, ls2)?;
    b.add(x, m)
}

/// The encoder's last hidden state [tiles, 1 + patches, hidden] for pixels [tiles, channels,
/// size, size], declared under the current scope (InternVL puts it in `vision_model`).
pub fn vision_model(b: &mut ModelBuilder, cfg: &VisionConfig, pixels: Sym) -> BuildResult {
    let mut x = embeddings(b, cfg, pixels)?;
    for layer in 0..cfg.num_hidden_layers {
        x = b.scope(format!("encoder.layers.{layer}"), |b| block(b, cfg, x))?;
    }
    Ok(x)
}
