//! The Qwen3-MoE language model (HF `Qwen3MoeForCausalLM`), declared from primitives.
//!
//! The MoE block is in its plain dense form: router softmax (f32), top-k, the (renormalised)
//! weights scattered into a [tokens, experts] matrix that is zero outside the top-k, and every
//! expert's SwiGLU weighted by its column and summed. The fusion pass derives the routed form.

use crate::config::TextConfig;
use crate::dsl::{BuildResult, ModelBuilder, Sym};
use mmc_ir::plan::Init;
use mmc_ir::{CmpOp, DType};

/// The per-step inputs of the language model, all [batch, seq].
#[derive(Clone, Copy, Debug)]
pub struct TextInputs {
    /// Token ids (i64).
    pub input_ids: Sym,
    /// RoPE positions (i64); packed samples restart at 0.
    pub position_ids: Sym,
    /// Which packed sample a token belongs to (i64, from 1); 0 marks padding. Tokens attend
    /// only to earlier tokens of the same sample.
    pub segment_ids: Sym,
    /// Target ids aligned with `input_ids` (i64, -100 = ignore); the model shifts them.
    pub labels: Sym,
    /// Loss weight of each label (f32), already normalised over the global batch.
    pub loss_weights: Sym,
}

impl TextInputs {
    /// Declares the inputs as graph inputs named after the fields.
    pub fn declare(b: &mut ModelBuilder, batch: usize, seq: usize) -> BuildResult<Self> {
        let shape = [batch, seq];
        Ok(TextInputs {
            input_ids: b.input("input_ids", DType::I64, &shape)?,
            position_ids: b.input("position_ids", DType::I64, &shape)?,
            segment_ids: b.input("segment_ids", DType::I64, &shape)?,
            labels: b.input("labels", DType::I64, &shape)?,
            loss_weights: b.input("loss_weights", DType::F32, &shape)?,
        })
    }
}

/// Router statistics of one MoE layer, for the load-balancing loss and the expert load.
struct RouterStats {
    /// The decoder layer's index.
    layer: usize,
    /// Softmax of the router logits, f32 [tokens, experts].
    probs: Sym,
    /// 1 where an expert is in a token's top-k, f32 [tokens, experts].
    chosen: Sym,
}

/// What the language model produces.
#[derive(Clone, Debug)]
pub struct LmOutputs {
    /// The training loss: `lm_loss + router_aux_loss_coef * aux_loss` (0-d, f32).
    pub loss: Sym,
    /// Weighted cross-entropy (0-d, f32).
    pub lm_loss: Sym,
    /// Load-balancing loss pooled over all MoE layers, before its coefficient (0-d, f32).
    pub aux_loss: Sym,
    /// [batch, seq, vocab] f32.
    pub logits: Sym,
    /// Per MoE layer (decoder layer index), the tokens its router sent to each expert: f32
    /// [experts], counting each non-padding token once per top-k pick (so a layer's counts sum
    /// to non-padding tokens x top-k). The same counts as the load-balancing loss's `f_e`.
    pub expert_load: Vec<(usize, Sym)>,
}

/// The rotary tables for `position_ids`: cos and sin of shape [batch, seq, head_dim], computed
/// in f32 as HF does (`inv_freq = 1 / theta^(2i/d)`, angles = position x inv_freq, duplicated)
/// and cast to the compute dtype.
fn rope_tables(
    b: &mut ModelBuilder,
    cfg: &TextConfig,
    position_ids: Sym,
) -> BuildResult<(Sym, Sym)> {
    let d = cfg.head_dim();
    let half = d / 2;
    let i = b.iota(DType::F32, &[half], 0)?;
    let two_i = b.mul_scalar(i, 2.0)?;
    let expo = b.binary_scalar(mmc_ir::BinaryOp::Div, two_i, d as f64)?;
    let theta = b.full(cfg.rope_theta, DType::F32, &[half])?;
    let p = b.pow(theta, expo)?;
    let inv_freq = b.recip(p)?;
    let pos = b.cast(position_ids, DType::F32)?;
    let shape = b.shape(pos);
    let pos = b.reshape(pos, &[shape[0], shape[1], 1])?;
    let freqs = b.mul(pos, inv_freq)?;
    let emb = b.concat(&[freqs, freqs], 2)?;
    let (cos, sin) = (b.cos(emb)?, b.sin(emb)?);
    let dtype = b.compute_dtype();
    Ok((b.cast(cos, dtype)?, b.cast(sin, dtype)?))
}

/// `x * cos + rotate_half(x) * sin` for x [batch, heads, seq, head_dim].
fn apply_rope(b: &mut ModelBuilder, x: Sym, cos: Sym, sin: Sym) -> BuildResult {
    let shape = b.shape(x);
    let d = shape[3];
    let x1 = b.slice(x, 3, 0, d / 2)?;
    let x2 = b.slice(x, 3, d / 2, d)?;
    let nx2 = b.neg(x2)?;
    let rot = b.concat(&[nx2, x1], 3)?;
    let a = b.mul(x, cos)?;
    let r = b.mul(rot, sin)?;
    b.add(a, r)
}

/// The attention mask [batch, 1, seq, seq]: key j is visible to query i when j <= i and both
/// belong to the same packed sample.
pub fn packed_causal_mask(b: &mut ModelBuilder, segment_ids: Sym) -> BuildResult {
    let shape = b.shape(segment_ids);
    let (bs, s) = (shape[0], shape[1]);
    let qi = b.iota(DType::I64, &[s, s], 0)?;
    let kj = b.iota(DType::I64, &[s, s], 1)?;
    let causal = b.compare(CmpOp::Le, kj, qi)?;
    let seg_q = b.reshape(segment_ids, &[bs, s, 1])?;
    let seg_k = b.reshape(segment_ids, &[bs, 1, s])?;
    let same = b.compare(CmpOp::Eq, seg_q, seg_k)?;
    let mask = b.and(same, causal)?;
    b.reshape(mask, &[bs, 1, s, s])
}

/// Grouped-query attention with q/k RMSNorm and RoPE (`self_attn` of a decoder layer).
fn attention(
    b: &mut ModelBuilder,
    cfg: &TextConfig,
    x: Sym,
    rope: (Sym, Sym),
    mask: Sym,
) -> BuildResult {
    let shape = b.shape(x);
    let (bs, s) = (shape[0], shape[1]);
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let eps = cfg.rms_norm_eps;
    let bias = cfg.attention_bias;
    b.scope("self_attn", |b| {
        let q = b.linear("q_proj", x, nh * hd, bias)?;
        let k = b.linear("k_proj", x, nkv * hd, bias)?;
        let v = b.linear("v_proj", x, nkv * hd, bias)?;
        let q = b.reshape(q, &[bs, s, nh, hd])?;
        let k = b.reshape(k, &[bs, s, nkv, hd])?;
        let v = b.reshape(v, &[bs, s, nkv, hd])?;
        let q = b.rms_norm("q_norm", q, eps)?;
        let k = b.rms_norm("k_norm", k, eps)?;
        let q = b.transpose(q, 1, 2)?;
        let k = b.transpose(k, 1, 2)?;
        let v = b.transpose(v, 1, 2)?;
        let (cos, sin) = rope;
        let cos = b.reshape(cos, &[bs, 1, s, hd])?;
        let sin = b.reshape(sin, &[bs, 1, s, hd])?;
        let q = apply_rope(b, q, cos, sin)?;
        let k = apply_rope(b, k, cos, sin)?;
        // Each group of nh / nkv query heads shares one key/value head.
        let rep = nh / nkv;
        let expand = |b: &mut ModelBuilder, t: Sym| -> BuildResult {
            let t = b.reshape(t, &[bs, nkv, 1, s, hd])?;
            let t = b.broadcast_to(t, &[bs, nkv, rep, s, hd])?;
            b.reshape(t, &[bs, nh, s, hd])
        };
        let k = expand(b, k)?;
        let v = expand(b, v)?;
        let kt = b.transpose(k, 2, 3)?;
        let scores = b.matmul(q, kt)?;
        let scores = b.mul_scalar(scores, (hd as f64).powf(-0.5))?;
        let scores = b.cast(scores, DType::F32)?;
        let neg_inf = b.full(f64::NEG_INFINITY, DType::F32, &[1])?;
        let scores = b.select(mask, scores, neg_inf)?;
        let probs = b.softmax(scores, 3)?;
        let probs = b.cast(probs, b.dtype(q))?;
        let o = b.matmul(probs, v)?;
        let o = b.transpose(o, 1, 2)?;
        let o = b.reshape(o, &[bs, s, nh * hd])?;
        b.linear("o_proj", o, cfg.hidden_size, bias)
    })
}

/// `down(silu(gate(x)) * up(x))`.
fn swiglu(b: &mut ModelBuilder, x: Sym, hidden: usize, inter: usize) -> BuildResult {
    let g = b.linear("gate_proj", x, inter, false)?;
    let u = b.linear("up_proj", x, inter, false)?;
    let a = b.silu(g)?;
    let h = b.mul(a, u)?;
    b.linear("down_proj", h, hidden, false)
}

/// The sparse MoE block in dense form (`mlp` of a decoder layer), on x [tokens, hidden].
fn moe(
    b: &mut ModelBuilder,
    cfg: &TextConfig,
    layer: usize,
    x: Sym,
) -> BuildResult<(Sym, RouterStats)> {
    let t = b.shape(x)[0];
    let (e, k) = (cfg.num_experts, cfg.num_experts_per_tok);
    b.scope("mlp", |b| {
        let logits = b.linear("gate", x, e, false)?;
        let logits = b.cast(logits, DType::F32)?;
        let probs = b.softmax(logits, 1)?;
        let top = b.topk(probs, k)?;
        let mut weights = b.gather(probs, top, 1)?;
        if cfg.norm_topk_prob {
            let s = b.sum(weights, &[1], true)?;
            weights = b.div(weights, s)?;
        }
        let weights = b.cast(weights, b.dtype(x))?;
        let zeros = b.full(0.0, b.dtype(x), &[t, e])?;
        let dense = b.scatter_add(zeros, top, weights, 1)?;
        let fzeros = b.full(0.0, DType::F32, &[t, e])?;
        let ones = b.full(1.0, DType::F32, &[t, k])?;
        let chosen = b.scatter_add(fzeros, top, ones, 1)?;
        let mut out: Option<Sym> = None;
        for ei in 0..e {
            let y = b.scope(format!("experts.{ei}"), |b| {
                swiglu(b, x, cfg.hidden_size, cfg.moe_intermediate_size)
            })?;
            let w = b.slice(dense, 1, ei, ei + 1)?;
            let y = b.mul(y, w)?;
            out = Some(match out {
                Some(acc) => b.add(acc, y)?,
                None => y,
            });
        }
        let out = out.map_or_else(|| b.full(0.0, b.dtype(x), &[t, cfg.hidden_size]), Ok)?;
        Ok((
            out,
            RouterStats {
                layer,
                probs,
                chosen,
            },
        ))
    })
}

/// HF's `load_balancing_loss_func`, pooled over all MoE layers and restricted to tokens where
/// `token_mask` [tokens, 1] is 1: `E * sum_e f_e * P_e`, with f_e the share of top-k picks that
/// went to expert e and P_e its mean router probability. Also returns each layer's top-k
/// picks per expert over those tokens (f32 [experts]), the loss's numerators of `f_e`, which
/// the trainer reports as the expert load.
fn load_balancing_loss(
    b: &mut ModelBuilder,
    cfg: &TextConfig,
    stats: &[RouterStats],
    token_mask: Sym,
) -> BuildResult<(Sym, Vec<(usize, Sym)>)> {
    if stats.is_empty() {
        return Ok((b.full(0.0, DType::F32, &[])?, Vec::new()));
    }
    let mut chosen_sum: Option<Sym> = None;
    let mut prob_sum: Option<Sym> = None;
    let mut load = Vec::with_capacity(stats.len());
    for s in stats {
        let c = b.mul(s.chosen, token_mask)?;
        let c = b.sum(c, &[0], false)?;
        load.push((s.layer, c));
        let p = b.mul(s.probs, token_mask)?;
        let p = b.sum(p, &[0], false)?;
        chosen_sum = Some(match chosen_sum {
            Some(acc) => b.add(acc, c)?,
            None => c,
        });
        prob_sum = Some(match prob_sum {
            Some(acc) => b.add(acc, p)?,
            None => p,
        });
    }
    let (Some(chosen_sum), Some(prob_sum)) = (chosen_sum, prob_sum) else {
        unreachable!("stats is not empty")
    };
    let rows = b.sum_all(token_mask)?;
    let rows = b.mul_scalar(rows, stats.len() as f64)?;
    let f = b.div(chosen_sum, rows)?;
    let p = b.div(prob_sum, rows)?;
    let fp = b.mul(f, p)?;
    let total = b.sum_all(fp)?;
    Ok((b.mul_scalar(total, cfg.num_experts as f64)?, load))
}

/// The weighted, shifted cross-entropy: position t predicts `labels[t+1]` with weight
/// `loss_weights[t+1]`; labels of -100 (or any negative id) are ignored.
fn shifted_cross_entropy(
    b: &mut ModelBuilder,
    logits: Sym,
    labels: Sym,
    weights: Sym,
) -> BuildResult {
    let shape = b.shape(logits);
    let (bs, s) = (shape[0], shape[1]);
    let next = b.slice(labels, 1, 1, s)?;
    let pad = b.full(-100.0, DType::I64, &[bs, 1])?;
    let target = b.concat(&[next, pad], 1)?;
    let wnext = b.slice(weights, 1, 1, s)?;
    let wpad = b.full(0.0, DType::F32, &[bs, 1])?;
    let w = b.concat(&[wnext, wpad], 1)?;
    let valid = b.compare_scalar(CmpOp::Ge, target, 0.0)?;
    let zero_id = b.full(0.0, DType::I64, &[bs, s])?;
    let safe = b.select(valid, target, zero_id)?;
    let logits = b.cast(logits, DType::F32)?;
    let lse = b.logsumexp(logits, 2)?;
    let idx = b.reshape(safe, &[bs, s, 1])?;
    let picked = b.gather(logits, idx, 2)?;
    let ce = b.sub(lse, picked)?;
    let ce = b.reshape(ce, &[bs, s])?;
    let zero_w = b.full(0.0, DType::F32, &[bs, s])?;
    let w = b.select(valid, w, zero_w)?;
    let wce = b.mul(ce, w)?;
    b.sum_all(wce)
}

/// The decoder stack on input embeddings [batch, seq, hidden], ending with the final norm.
/// Declared in the current scope (the HF `model.` prefix is the caller's).
fn decoder(
    b: &mut ModelBuilder,
    cfg: &TextConfig,
    embeds: Sym,
    inputs: &TextInputs,
) -> BuildResult<(Sym, Vec<RouterStats>)> {
    let shape = b.shape(embeds);
    let (bs, s, h) = (shape[0], shape[1], shape[2]);
    let rope = rope_tables(b, cfg, inputs.position_ids)?;
    let mask = packed_causal_mask(b, inputs.segment_ids)?;
    let mut x = embeds;
    let mut stats = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        x = b.scope(format!("layers.{layer}"), |b| {
            let n = b.rms_norm("input_layernorm", x, cfg.rms_norm_eps)?;
            let a = attention(b, cfg, n, rope, mask)?;
            let x = b.add(x, a)?;
            let n = b.rms_norm("post_attention_layernorm", x, cfg.rms_norm_eps)?;
            let flat = b.reshape(n, &[bs * s, h])?;
            let m = if cfg.is_moe_layer(layer) {
                let (m, st) = moe(b, cfg, layer, flat)?;
                stats.push(st);
                m
            } else {
                let inter = cfg.intermediate_size.unwrap_or(0);
                b.scope("mlp", |b| swiglu(b, flat, h, inter))?
            };
            let m = b.reshape(m, &[bs, s, h])?;
            b.add(x, m)
        })?;
    }
    let x = b.rms_norm("norm", x, cfg.rms_norm_eps)?;
    Ok((x, stats))
}

/// The token embedding table `<scope>.embed_tokens.weight` looked up at `ids`.
pub fn embed_tokens(b: &mut ModelBuilder, cfg: &TextConfig, ids: Sym) -> BuildResult {
    b.scope("embed_tokens", |b| {
        let std = b.init_std();
        let table = b.param(
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            Init::Normal { std },
        )?;
        b.embedding(table, ids)
    })
}

/// The causal LM head and losses on top of input embeddings: declares `model.*` (decoder) and
/// `lm_head.weight` in the current scope. `embed_table` is the embedding for tied heads.
pub fn causal_lm_from_embeds(
    b: &mut ModelBuilder,
    cfg: &TextConfig,
    embeds: Sym,
    inputs: &TextInputs,
) -> BuildResult<LmOutputs> {
    let (hidden, stats) = b.scope("model", |b| decoder(b, cfg, embeds, inputs))?;
    let logits = if cfg.tie_word_embeddings {
        let table = b.scope("model.embed_tokens", |b| {
            let std = b.init_std();
            b.param(
                "weight",
                &[cfg.vocab_size, cfg.hidden_size],
                Init::Normal { std },
            )
        })?;
        b.linear_with(hidden, table)?
    } else {
        b.linear("lm_head", hidden, cfg.vocab_size, false)?
    };
    let logits = b.cast(logits, DType::F32)?;
    let lm_loss = shifted_cross_entropy(b, logits, inputs.labels, inputs.loss_weights)?;
    let shape = b.shape(inputs.segment_ids);
    let seg = b.reshape(inputs.segment_ids, &[shape[0] * shape[1], 1])?;
    let real = b.compare_scalar(CmpOp::Ne, seg, 0.0)?;
    let token_mask = b.cast(real, DType::F32)?;
    let (aux_loss, expert_load) = load_balancing_loss(b, cfg, &stats, token_mask)?;
    let scaled = b.mul_scalar(aux_loss, cfg.router_aux_loss_coef)?;
    let loss = b.add(lm_loss, scaled)?;
    Ok(LmOutputs {
        loss,
        lm_loss,
        aux_loss,
        logits,
        expert_load,
    })
}

/// The whole `Qwen3MoeForCausalLM` with HF parameter names (`model.*`, `lm_head.weight`).
pub fn causal_lm(
    b: &mut ModelBuilder,
    cfg: &TextConfig,
    inputs: &TextInputs,
) -> BuildResult<LmOutputs> {
    let embeds = b.scope("model", |b| embed_tokens(b, cfg, inputs.input_ids))?;
    causal_lm_from_embeds(b, cfg, embeds, inputs)
}
