//! `[model.text]`: the Qwen3-MoE language model's architecture (HF `Qwen3MoeConfig` keys).

use super::Section;
use serde::Deserialize;
use serde_json::{Map, Value as Json};

/// The Qwen3-MoE language model's architecture (HF `Qwen3MoeConfig` keys).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Defaults to hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    /// Width of the dense MLP of layers listed in `mlp_only_layers`.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_aux_coef")]
    pub router_aux_loss_coef: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Every `decoder_sparse_step`-th layer is MoE.
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    /// Layers that use a dense MLP instead of experts.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    /// Standard deviation of the random init of linear and embedding weights.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_init_range() -> f64 {
    0.02
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_aux_coef() -> f64 {
    0.001
}
fn one() -> usize {
    1
}
fn default_act() -> String {
    "silu".into()
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether layer `i` uses experts (HF's rule: not in `mlp_only_layers`, and
    /// `(i + 1) % decoder_sparse_step == 0`).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }

    pub(super) fn check(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim()),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{k}` must be at least 1"));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "`head_dim` ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return Err(format!(
                "`num_experts_per_tok` ({}) exceeds `num_experts` ({})",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        // Whether any layer is dense, without visiting every layer (a huge count would hang):
        // with a sparse step above 1, layer 0 is dense.
        let has_dense = self.num_hidden_layers > 0
            && (self.num_experts == 0
                || self.decoder_sparse_step > 1
                || self
                    .mlp_only_layers
                    .iter()
                    .any(|&i| i < self.num_hidden_layers));
        if has_dense && self.intermediate_size.unwrap_or(0) == 0 {
            return Err(
                "dense layers (`mlp_only_layers`, `decoder_sparse_step`) need `intermediate_size`"
                    .into(),
            );
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "`hidden_act` \"{}\" is not supported (only \"silu\")",
                self.hidden_act
            ));
        }
        let valid = self.rope_theta.is_finite()
            && self.rope_theta > 0.0
            && self.rms_norm_eps.is_finite()
            && self.rms_norm_eps >= 0.0
            && self.router_aux_loss_coef.is_finite()
            && self.router_aux_loss_coef >= 0.0;
        if !valid {
            return Err("`rope_theta` must be positive and `rms_norm_eps`, `router_aux_loss_coef` non-negative".into());
        }
        Ok(())
    }
}

impl Section for TextConfig {
    const TABLE: &'static str = "[model.text]";
    const KEYS: &'static [&'static str] = &[
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "intermediate_size",
        "norm_topk_prob",
        "rope_theta",
        "rms_norm_eps",
        "router_aux_loss_coef",
        "tie_word_embeddings",
        "decoder_sparse_step",
        "mlp_only_layers",
        "hidden_act",
        "attention_bias",
        "initializer_range",
    ];
    const ALIASES: &'static [(&'static str, &'static str)] =
        &[("num_local_experts", "num_experts")];

    /// transformers 5 writes `rope_parameters: {rope_type, rope_theta}` where older files have
    /// `rope_theta`.
    fn normalize(map: &mut Map<String, Json>) -> Result<(), String> {
        if let Some(Json::Object(rp)) = map.get("rope_parameters").cloned() {
            if let Some(t) = rp.get("rope_type").and_then(Json::as_str) {
                if t != "default" {
                    return Err(format!(
                        "rope type \"{t}\" is not supported (only \"default\")"
                    ));
                }
            }
            if let (false, Some(theta)) = (map.contains_key("rope_theta"), rp.get("rope_theta")) {
                map.insert("rope_theta".into(), theta.clone());
            }
        }
        if map.get("rope_scaling").is_some_and(|s| !s.is_null()) {
            return Err("`rope_scaling` is not supported".into());
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        self.check()
    }
}
