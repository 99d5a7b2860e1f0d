//! The model TOML (`mmc compile <model.toml>`) and Hugging Face `config.json` files.
//!
//! A model is described by `[model]` (architecture: tables `[model.text]` etc., or an HF
//! `config.json` named by `hf_config`, or both, the tables overriding single keys), `[train]`,
//! `[parallel]` and `[target]`. Architecture keys follow HF config.json; training keys follow
//! Megatron's arguments. Both spellings of keys that transformers renamed are read
//! (`num_experts` / `num_local_experts`, `rope_theta` / `rope_parameters.rope_theta`).

use serde::Deserialize;
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};

/// Why a configuration could not be loaded. Every message names the file, and the line or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {table}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        table: String,
        message: String,
    },
    #[error("{what} `{given}` not found (looked in {})", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and "))]
    NotFound {
        what: &'static str,
        given: String,
        tried: Vec<PathBuf>,
    },
}

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
    #[serde(alias = "num_local_experts")]
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
    /// Keys accepted in `[model.text]`.
    pub const KEYS: &'static [&'static str] = &[
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_experts",
        "num_local_experts",
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
    ];

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

    fn validate(&self) -> Result<(), String> {
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
        if (0..self.num_hidden_layers).any(|i| !self.is_moe_layer(i))
            && self.intermediate_size.unwrap_or(0) == 0
        {
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

/// Number formats for compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    F32,
    #[default]
    Bf16,
}

/// How the learning rate decays after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrDecayStyle {
    #[default]
    Constant,
    Cosine,
    Linear,
}

/// Which activations are recomputed in the backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    #[default]
    None,
    Selective,
    Full,
}

/// How per-token losses are averaged over the global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossReduction {
    /// Every labelled token weighs the same.
    #[default]
    Token,
    /// Every sample weighs the same (MindSpeed-MM's per_sample_loss).
    Sample,
    /// A sample of n labelled tokens weighs 1/sqrt(n) per token (InternVL).
    Square,
}

/// `[train]`: batch geometry and optimizer settings (Megatron's argument names).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub micro_batch_size: usize,
    pub global_batch_size: usize,
    pub seq_length: usize,
    pub max_tiles: usize,
    pub dtype: ComputeDType,
    pub lr: f64,
    pub min_lr: f64,
    pub lr_warmup_iters: usize,
    pub lr_warmup_fraction: Option<f64>,
    pub lr_decay_style: LrDecayStyle,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub clip_grad: f64,
    pub seed: u64,
    pub freeze: Vec<String>,
    pub recompute: Recompute,
    pub loss_reduction: LossReduction,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            micro_batch_size: 1,
            global_batch_size: 1,
            seq_length: 4096,
            max_tiles: 12,
            dtype: ComputeDType::Bf16,
            lr: 1e-5,
            min_lr: 0.0,
            lr_warmup_iters: 0,
            lr_warmup_fraction: None,
            lr_decay_style: LrDecayStyle::Constant,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            clip_grad: 1.0,
            seed: 1234,
            freeze: Vec::new(),
            recompute: Recompute::None,
            loss_reduction: LossReduction::Token,
        }
    }
}

/// `[parallel]`: world size = tp x dp; ep divides dp.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    pub tp: usize,
    pub ep: usize,
    pub dp: usize,
    pub zero: u8,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            tp: 1,
            ep: 1,
            dp: 1,
            zero: 0,
        }
    }
}

/// Which machine the plan is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    #[default]
    Cpu,
    Ascend,
}

/// `[target]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    pub kind: TargetKind,
    pub devices: usize,
    pub device_memory_gb: f64,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            kind: TargetKind::Cpu,
            devices: 1,
            device_memory_gb: 64.0,
        }
    }
}

/// The architecture: what `[model]` resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    /// Token id whose positions receive image features.
    pub img_context_token_id: i64,
    /// Where initial weights come from, as written (resolve with [`Config::resolve_path`]);
    /// absent means a seeded random init.
    pub init_from_hf_path: Option<String>,
}

/// A whole model TOML.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it was read from; relative paths inside are looked up beside it first.
    pub path: PathBuf,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub parallel: ParallelConfig,
    pub target: TargetConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    model: RawModel,
    #[serde(default)]
    train: TrainConfig,
    #[serde(default)]
    parallel: ParallelConfig,
    #[serde(default)]
    target: TargetConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    hf_config: Option<String>,
    init_from_hf_path: Option<String>,
    img_context_token_id: Option<i64>,
    text: Option<toml::Table>,
}

/// InternVL3.5's `<IMG_CONTEXT>` token id (MindSpeed-MM's model.json default).
pub const DEFAULT_IMG_CONTEXT_TOKEN_ID: i64 = 151671;

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Looks a relative path up beside `base_file` first, then in the working directory.
pub fn resolve_beside(
    base_file: &Path,
    given: &str,
    what: &'static str,
) -> Result<PathBuf, ConfigError> {
    let p = Path::new(given);
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        let beside = base_file.parent().unwrap_or(Path::new(".")).join(p);
        vec![beside, p.to_path_buf()]
    };
    candidates
        .iter()
        .find(|c| c.exists())
        .cloned()
        .ok_or_else(|| ConfigError::NotFound {
            what,
            given: given.to_string(),
            tried: candidates,
        })
}

/// Reads an HF config.json into a JSON object.
pub fn read_hf_json(path: &Path) -> Result<Map<String, Json>, ConfigError> {
    let text = read(path)?;
    match serde_json::from_str::<Json>(&text) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(_) => Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            table: "config.json".into(),
            message: "the top level must be a JSON object".into(),
        }),
        Err(e) => Err(ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e
                .to_string()
                .split(" at line")
                .next()
                .unwrap_or_default()
                .to_string(),
        }),
    }
}

/// Brings the renamed HF keys to one spelling: `rope_parameters.rope_theta` to `rope_theta`.
fn normalize_text_keys(map: &mut Map<String, Json>) -> Result<(), String> {
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
    if let Some(s) = map.get("rope_scaling") {
        if !s.is_null() {
            return Err("`rope_scaling` is not supported".into());
        }
    }
    Ok(())
}

fn toml_to_json(t: &toml::Table) -> Map<String, Json> {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
}

impl Config {
    /// Loads and validates a model TOML.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    /// Parses model TOML text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        let invalid = |table: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            table: table.to_string(),
            message,
        };

        let mut text_map = Map::new();
        if let Some(hf) = &raw.model.hf_config {
            let hf_path = resolve_beside(path, hf, "hf_config")?;
            let hf_map = read_hf_json(&hf_path)?;
            let section = ["text_config", "llm_config"]
                .iter()
                .find_map(|k| hf_map.get(*k).and_then(Json::as_object).cloned())
                .unwrap_or(hf_map);
            text_map = section;
        }
        if let Some(t) = &raw.model.text {
            if let Some(k) = t.keys().find(|k| !TextConfig::KEYS.contains(&k.as_str())) {
                return Err(invalid(
                    "[model.text]",
                    format!(
                        "unknown key `{k}` (known keys: {})",
                        TextConfig::KEYS.join(", ")
                    ),
                ));
            }
            if t.contains_key("num_experts") || t.contains_key("num_local_experts") {
                text_map.remove("num_experts");
                text_map.remove("num_local_experts");
            }
            text_map.extend(toml_to_json(t));
        }
        if raw.model.hf_config.is_none() && raw.model.text.is_none() {
            return Err(invalid(
                "[model]",
                "give the architecture as `hf_config = \"…/config.json\"` or a [model.text] table"
                    .into(),
            ));
        }
        normalize_text_keys(&mut text_map).map_err(|m| invalid("[model.text]", m))?;
        let text_cfg: TextConfig = serde_json::from_value(Json::Object(text_map)).map_err(|e| {
            invalid(
                "[model.text]",
                e.to_string().replace("missing field", "missing key"),
            )
        })?;
        text_cfg
            .validate()
            .map_err(|m| invalid("[model.text]", m))?;

        let train = raw.train;
        if train.micro_batch_size == 0 || train.seq_length < 2 {
            return Err(invalid(
                "[train]",
                "`micro_batch_size` must be at least 1 and `seq_length` at least 2".into(),
            ));
        }
        let per_step = train.micro_batch_size * raw.parallel.dp.max(1);
        if train.global_batch_size == 0 || !train.global_batch_size.is_multiple_of(per_step) {
            return Err(invalid(
                "[train]",
                format!(
                    "`global_batch_size` ({}) must be a positive multiple of micro_batch_size x dp ({per_step})",
                    train.global_batch_size
                ),
            ));
        }
        let p = &raw.parallel;
        if p.tp == 0 || p.dp == 0 || p.ep == 0 || !p.dp.is_multiple_of(p.ep) {
            return Err(invalid(
                "[parallel]",
                format!(
                    "tp, dp and ep must be at least 1 and ep must divide dp (tp={}, dp={}, ep={})",
                    p.tp, p.dp, p.ep
                ),
            ));
        }
        if !matches!(p.zero, 0 | 1 | 3) {
            return Err(invalid(
                "[parallel]",
                format!("`zero` must be 0, 1 or 3, not {}", p.zero),
            ));
        }

        Ok(Config {
            path: path.to_path_buf(),
            model: ModelConfig {
                text: text_cfg,
                img_context_token_id: raw
                    .model
                    .img_context_token_id
                    .unwrap_or(DEFAULT_IMG_CONTEXT_TOKEN_ID),
                init_from_hf_path: raw.model.init_from_hf_path,
            },
            train,
            parallel: raw.parallel,
            target: raw.target,
        })
    }

    /// Resolves a path written in this config: beside the TOML first, then the working
    /// directory.
    pub fn resolve_path(&self, given: &str, what: &'static str) -> Result<PathBuf, ConfigError> {
        resolve_beside(&self.path, given, what)
    }
}
