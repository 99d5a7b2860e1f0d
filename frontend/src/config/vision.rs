//! `[model.vision]` and `[model.projector]`: InternViT and the MLP projector.
//!
//! Keys follow transformers' `InternVLVisionConfig`; the OpenGVLab spellings (`qkv_bias`,
//! `qk_normalization`, `initializer_factor`, `image_size` as a number) are read too.

use super::Section;
use serde::Deserialize;
use serde_json::{Map, Value as Json};

/// Which normalisation the ViT blocks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormType {
    #[default]
    LayerNorm,
    RmsNorm,
}

/// InternViT's architecture.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// The tile size the position embedding was trained for (its grid is image/patch square).
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    /// Bias on the fused qkv projection.
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// RMSNorm over the full width of q and k.
    #[serde(default)]
    pub use_qk_norm: bool,
    #[serde(default)]
    pub norm_type: NormType,
    #[serde(default = "vit_eps")]
    pub layer_norm_eps: f64,
    /// Initial value of the layer scales `ls1`/`ls2` (used by random init only).
    #[serde(default = "ls_init")]
    pub layer_scale_init_value: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}
fn vit_eps() -> f64 {
    1e-6
}
fn ls_init() -> f64 {
    0.1
}
fn gelu() -> String {
    "gelu".into()
}

impl VisionConfig {
    /// Patches per side of the position-embedding grid.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
}

/// Replaces `[a, a]` (transformers' image_size / patch_size) by `a`.
fn square(map: &mut Map<String, Json>, key: &str) -> Result<(), String> {
    if let Some(Json::Array(v)) = map.get(key) {
        match v.as_slice() {
            [a, b] if a == b => {
                let a = a.clone();
                map.insert(key.into(), a);
            }
            _ => {
                return Err(format!(
                    "`{key}` must be square, got {}",
                    Json::Array(v.clone())
                ))
            }
        }
    }
    Ok(())
}

impl Section for VisionConfig {
    const TABLE: &'static str = "[model.vision]";
    const KEYS: &'static [&'static str] = &[
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "image_size",
        "patch_size",
        "num_channels",
        "qkv_bias",
        "use_qk_norm",
        "norm_type",
        "layer_norm_eps",
        "layer_scale_init_value",
        "hidden_act",
    ];
    const ALIASES: &'static [(&'static str, &'static str)] = &[
        ("attention_bias", "qkv_bias"),
        ("qk_normalization", "use_qk_norm"),
        ("initializer_factor", "layer_scale_init_value"),
    ];

    fn normalize(map: &mut Map<String, Json>) -> Result<(), String> {
        square(map, "image_size")?;
        square(map, "patch_size")
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{k}` must be at least 1"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "`hidden_size` ({}) must be a multiple of `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "`image_size` ({}) must be a multiple of `patch_size` ({})",
                self.image_size, self.patch_size
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "`hidden_act` \"{}\" is not supported (only the exact \"gelu\")",
                self.hidden_act
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err("`layer_norm_eps` must be non-negative".into());
        }
        Ok(())
    }
}

/// The projector: pixel shuffle by `downsample_ratio`, then `mlp1` = LayerNorm, Linear, GELU,
/// Linear.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ProjectorConfig {
    #[serde(default = "half")]
    pub downsample_ratio: f64,
    /// Pixel-shuffle variant; only InternVL's "v2" (the transformers-native order) is built.
    #[serde(default = "v2")]
    pub ps_version: String,
}

fn half() -> f64 {
    0.5
}
fn v2() -> String {
    "v2".into()
}

impl ProjectorConfig {
    /// How many patches per side merge into one token (2 for a ratio of 0.5).
    pub fn merge(&self) -> usize {
        (1.0 / self.downsample_ratio).round() as usize
    }
}

impl Section for ProjectorConfig {
    const TABLE: &'static str = "[model.projector]";
    const KEYS: &'static [&'static str] = &["downsample_ratio", "ps_version"];
    const ALIASES: &'static [(&'static str, &'static str)] =
        &[("down_sample_ratio", "downsample_ratio")];

    fn validate(&self) -> Result<(), String> {
        let m = self.merge();
        if m == 0 || ((1.0 / m as f64) - self.downsample_ratio).abs() > 1e-9 {
            return Err(format!(
                "`downsample_ratio` must be 1/n for a whole n, got {}",
                self.downsample_ratio
            ));
        }
        if self.ps_version != "v2" {
            return Err(format!(
                "`ps_version` \"{}\" is not supported (InternVL3.5 uses \"v2\")",
                self.ps_version
            ));
        }
        Ok(())
    }
}
