//! The model TOML (`mmc compile <model.toml>`) and Hugging Face `config.json` files.
//!
//! A model is described by `[model]` (architecture: tables `[model.text]` etc., or an HF
//! `config.json` named by `hf_config`, or both, the tables overriding single keys), `[train]`,
//! `[parallel]` and `[target]`. Architecture keys follow HF config.json; training keys follow
//! Megatron's arguments. Both spellings of keys that transformers renamed are read
//! (`num_experts` / `num_local_experts`, `rope_theta` / `rope_parameters.rope_theta`), and both
//! InternVL config.json forms: OpenGVLab's `InternVLChatConfig` (`vision_config`, `llm_config`,
//! `force_image_size`, ...) and transformers' `InternVLConfig` (`vision_config`, `text_config`).

mod text;
mod train;
mod vision;

pub use text::TextConfig;
pub use train::{
    ComputeDType, LossReduction, LrDecayStyle, ParallelConfig, Recompute, TargetConfig, TargetKind,
    TrainConfig,
};
pub use vision::{NormType, ProjectorConfig, VisionConfig};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};

/// Why a configuration could not be loaded. Every message names the file, and the line or key,
/// on one line: line breaks inside quoted values and keys are shown escaped.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {}", path.display(), one_line(message))]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {table}: {}", path.display(), one_line(message))]
    Invalid {
        path: PathBuf,
        table: String,
        message: String,
    },
    #[error("{what} `{}` not found (looked in {})", one_line(given), one_line(&tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ")))]
    NotFound {
        what: &'static str,
        given: String,
        tried: Vec<PathBuf>,
    },
}

/// `s` with its line breaks escaped, as they are written in TOML and JSON strings.
fn one_line(s: &str) -> String {
    s.replace('\n', "\\n").replace('\r', "\\r")
}

/// One table of the architecture (`[model.text]`, `[model.vision]`, `[model.projector]`):
/// its keys come from an HF config.json section, overridden key by key by the TOML table.
pub(crate) trait Section: DeserializeOwned {
    /// The table's name in messages.
    const TABLE: &'static str;
    /// Keys the TOML table accepts (canonical spellings).
    const KEYS: &'static [&'static str];
    /// Other spellings found in HF files, with their canonical key.
    const ALIASES: &'static [(&'static str, &'static str)];

    /// Brings a merged key map to the form serde reads.
    fn normalize(_map: &mut Map<String, Json>) -> Result<(), String> {
        Ok(())
    }

    /// Checks values that parse but cannot work together.
    fn validate(&self) -> Result<(), String>;
}

fn rename_aliases<T: Section>(map: &mut Map<String, Json>) {
    for (alias, canonical) in T::ALIASES {
        if let Some(v) = map.remove(*alias) {
            if !map.contains_key(*canonical) {
                map.insert((*canonical).to_string(), v);
            }
        }
    }
}

/// Why a table of the architecture could not be built, kept apart so that the caller can
/// blame the file the value came from (the TOML table or the HF config.json).
#[derive(Debug)]
enum SectionError {
    /// A required key is in neither the HF section nor the TOML table.
    Missing(String),
    /// A key has a value of the wrong type or range; `key` when serde says which.
    Value {
        key: Option<String>,
        message: String,
    },
    /// Keys that are fine alone but do not work together, or unknown TOML keys.
    Table(String),
}

/// Rewrites serde's Rust type names in a message as words a user knows.
fn plain_types(message: &str) -> String {
    message
        .replace("expected usize", "expected a whole number >= 0")
        .replace("expected u64", "expected a whole number >= 0")
        .replace("expected u32", "expected a whole number >= 0")
        .replace("expected u8", "expected a whole number from 0 to 255")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace("missing field", "missing key")
}

/// Merges an HF section and a TOML table into a validated `T`.
fn section<T: Section>(
    hf: Option<Map<String, Json>>,
    table: Option<&toml::Table>,
) -> Result<T, SectionError> {
    let mut map = hf.unwrap_or_default();
    rename_aliases::<T>(&mut map);
    if let Some(t) = table {
        let known = |k: &str| T::KEYS.contains(&k) || T::ALIASES.iter().any(|(a, _)| *a == k);
        if let Some(k) = t.keys().find(|k| !known(k)) {
            return Err(SectionError::Table(format!(
                "unknown key `{k}` (known keys: {})",
                T::KEYS.join(", ")
            )));
        }
        let mut overrides = toml_to_json(t);
        rename_aliases::<T>(&mut overrides);
        map.extend(overrides);
    }
    T::normalize(&mut map).map_err(SectionError::Table)?;
    let cfg: T = serde_path_to_error::deserialize(Json::Object(map)).map_err(|e| {
        let message = e.inner().to_string();
        match message.strip_prefix("missing field `") {
            Some(rest) => SectionError::Missing(rest.trim_end_matches('`').to_string()),
            None => {
                let key = e.path().to_string();
                SectionError::Value {
                    key: (key != ".").then_some(key),
                    message: plain_types(&message),
                }
            }
        }
    })?;
    cfg.validate().map_err(SectionError::Table)?;
    Ok(cfg)
}

/// The vision half of an InternVL model.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionLanguage {
    pub vision: VisionConfig,
    pub projector: ProjectorConfig,
    /// The side of the square tiles fed to the ViT (`force_image_size`, else the ViT's
    /// `image_size`); the position embedding is bicubic-interpolated when they differ.
    pub tile_size: usize,
}

impl VisionLanguage {
    /// Patches per tile side.
    pub fn patches_per_side(&self) -> usize {
        self.tile_size / self.vision.patch_size
    }

    /// Language-model tokens one tile becomes after the pixel shuffle.
    pub fn tokens_per_tile(&self) -> usize {
        let side = self.patches_per_side() / self.projector.merge();
        side * side
    }
}

/// The architecture: what `[model]` resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    /// InternViT + projector; `None` for a text-only Qwen3-MoE causal LM.
    pub vision_language: Option<VisionLanguage>,
    /// Token id whose positions receive image features.
    pub img_context_token_id: i64,
    /// The chat template named by the HF config (`template`), if any.
    pub template: Option<String>,
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
    force_image_size: Option<usize>,
    template: Option<String>,
    text: Option<toml::Table>,
    vision: Option<toml::Table>,
    projector: Option<toml::Table>,
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

fn toml_to_json(t: &toml::Table) -> Map<String, Json> {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
}

/// The parts of an HF config.json: text section, and for InternVL the vision section plus the
/// top-level keys.
struct HfParts {
    text: Map<String, Json>,
    /// Where the text keys sit in the file (`llm_config`, `text_config`, or the top level).
    text_key: &'static str,
    vision: Option<Map<String, Json>>,
    top: Map<String, Json>,
}

fn split_hf(map: Map<String, Json>) -> Result<HfParts, String> {
    let vision = map.get("vision_config").and_then(Json::as_object).cloned();
    // Each key with its spelling in messages.
    let nested = [
        ("llm_config", "`llm_config`"),
        ("text_config", "`text_config`"),
    ]
    .into_iter()
    .find_map(|(k, shown)| {
        map.get(k)
            .and_then(Json::as_object)
            .map(|t| (shown, t.clone()))
    });
    let (text_key, text) = match (nested, &vision) {
        (Some(t), _) => t,
        (None, None) => ("top level", map.clone()),
        (None, Some(_)) => {
            return Err("an InternVL config needs `llm_config` or `text_config`".into())
        }
    };
    for key in ["select_layer", "vision_feature_layer"] {
        if let Some(v) = map.get(key).and_then(Json::as_i64) {
            if v != -1 {
                return Err(format!(
                    "`{key}` = {v} is not supported (InternVL3.5 uses -1)"
                ));
            }
        }
    }
    if let Some(s) = map
        .get("vision_feature_select_strategy")
        .and_then(Json::as_str)
    {
        if s != "default" {
            return Err(format!(
                "`vision_feature_select_strategy` \"{s}\" is not supported (InternVL drops the CLS token: \"default\")"
            ));
        }
    }
    if vision
        .as_ref()
        .and_then(|v| v.get("use_mean_pooling"))
        .and_then(Json::as_bool)
        == Some(false)
    {
        return Err("`vision_config.use_mean_pooling` = false adds a final ViT norm, which InternVL does not have".into());
    }
    if let Some(act) = map.get("projector_hidden_act").and_then(Json::as_str) {
        if act != "gelu" {
            return Err(format!(
                "`projector_hidden_act` \"{act}\" is not supported (only \"gelu\")"
            ));
        }
    }
    Ok(HfParts {
        text,
        text_key,
        vision,
        top: map,
    })
}

impl Config {
    /// Loads and validates a model TOML.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    /// The configuration that an HF checkpoint folder's `config.json` alone gives, for jobs
    /// that touch only the weights (`mmc convert`): the parameters depend on the architecture
    /// only, so the training settings keep their defaults. The `<IMG_CONTEXT>` token id, which
    /// only the data pipeline uses, is taken from `image_token_id` when config.json has it and
    /// is otherwise 0 (an OpenGVLab config.json leaves it to the tokenizer). Errors name
    /// config.json.
    pub fn from_hf_dir(dir: &Path) -> Result<Config, ConfigError> {
        let path = dir.join("config.json");
        let json = read_hf_json(&path)?;
        let mut text = String::from("[model]\nhf_config = \"config.json\"\n");
        if !json.contains_key("image_token_id") {
            text.push_str("img_context_token_id = 0\n");
        }
        Self::parse(&path, &text)
    }

    /// Parses model TOML text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let syntax = |e: &toml::de::Error, key: Option<String>| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            let message = plain_types(e.message().trim()).replace('\n', " ");
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: match key {
                    Some(k) => format!("{k}: {message}"),
                    None => message,
                },
            }
        };
        let de = toml::Deserializer::parse(text).map_err(|e| syntax(&e, None))?;
        let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
            // `train.lr` is written `[train] lr`, as the user sees it in the file.
            let key = e.path().to_string();
            let key = match key.rsplit_once('.') {
                _ if key == "." => None,
                Some((table, k)) => Some(format!("[{table}] {k}")),
                None => Some(key),
            };
            syntax(e.inner(), key)
        })?;
        let invalid = |table: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            table: table.to_string(),
            message,
        };

        if raw.model.hf_config.is_none() && raw.model.text.is_none() {
            return Err(invalid(
                "[model]",
                "give the architecture as `hf_config = \"…/config.json\"` or a [model.text] table"
                    .into(),
            ));
        }
        let hf = match &raw.model.hf_config {
            Some(hf) => {
                let hf_path = resolve_beside(path, hf, "hf_config")?;
                let parts =
                    split_hf(read_hf_json(&hf_path)?).map_err(|message| ConfigError::Invalid {
                        path: hf_path.clone(),
                        table: "config.json".into(),
                        message,
                    })?;
                Some((hf_path, parts))
            }
            None => None,
        };
        // A key missing from both places, or a bad value that came from the HF file, is
        // blamed on that file; everything else on the TOML table.
        let blame = |table_name: &str,
                     table: Option<&toml::Table>,
                     hf_part: Option<&str>,
                     e: SectionError| {
            let from_hf = |key: &str| {
                let top = key.split('.').next().unwrap_or(key);
                !table.is_some_and(|t| t.contains_key(top))
            };
            match (e, &hf, hf_part) {
                (SectionError::Missing(key), Some((hf_path, _)), Some(part)) => {
                    ConfigError::Invalid {
                        path: hf_path.clone(),
                        table: part.to_string(),
                        message: format!(
                            "missing key `{key}` (nor given in {table_name} of {})",
                            path.display()
                        ),
                    }
                }
                (
                    SectionError::Value {
                        key: Some(key),
                        message,
                    },
                    Some((hf_path, _)),
                    Some(part),
                ) if from_hf(&key) => ConfigError::Invalid {
                    path: hf_path.clone(),
                    table: part.to_string(),
                    message: format!("`{key}`: {message}"),
                },
                (SectionError::Missing(key), _, _) => {
                    invalid(table_name, format!("missing key `{key}`"))
                }
                (
                    SectionError::Value {
                        key: Some(key),
                        message,
                    },
                    _,
                    _,
                ) => invalid(table_name, format!("`{key}`: {message}")),
                (SectionError::Value { key: None, message }, _, _)
                | (SectionError::Table(message), _, _) => invalid(table_name, message),
            }
        };
        let parts = hf.as_ref().map(|(_, p)| p);
        let text_cfg: TextConfig = section(parts.map(|p| p.text.clone()), raw.model.text.as_ref())
            .map_err(|e| {
                blame(
                    TextConfig::TABLE,
                    raw.model.text.as_ref(),
                    parts.map(|p| p.text_key),
                    e,
                )
            })?;

        let hf_vision = parts.and_then(|p| p.vision.clone());
        let top = parts.map(|p| p.top.clone()).unwrap_or_default();
        let vision_language = if hf_vision.is_some() || raw.model.vision.is_some() {
            let vision_part = hf_vision.is_some().then_some("`vision_config`");
            let vision: VisionConfig =
                section(hf_vision, raw.model.vision.as_ref()).map_err(|e| {
                    blame(
                        VisionConfig::TABLE,
                        raw.model.vision.as_ref(),
                        vision_part,
                        e,
                    )
                })?;
            let top_projector: Map<String, Json> = top
                .iter()
                .filter(|(k, _)| ProjectorConfig::KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let projector: ProjectorConfig =
                section(Some(top_projector), raw.model.projector.as_ref()).map_err(|e| {
                    blame(
                        ProjectorConfig::TABLE,
                        raw.model.projector.as_ref(),
                        parts.map(|_| "top level"),
                        e,
                    )
                })?;
            let tile_size = raw
                .model
                .force_image_size
                .or_else(|| {
                    top.get("force_image_size")
                        .and_then(Json::as_u64)
                        .map(|v| v as usize)
                })
                .unwrap_or(vision.image_size);
            let vl = VisionLanguage {
                vision,
                projector,
                tile_size,
            };
            let patches = vl.tile_size / vl.vision.patch_size;
            if !vl.tile_size.is_multiple_of(vl.vision.patch_size)
                || !patches.is_multiple_of(vl.projector.merge())
            {
                return Err(invalid(
                    "[model]",
                    format!(
                        "tiles of {} pixels do not split into {}-pixel patches in groups of {} (downsample_ratio {})",
                        vl.tile_size,
                        vl.vision.patch_size,
                        vl.projector.merge(),
                        vl.projector.downsample_ratio
                    ),
                ));
            }
            if raw.train.max_tiles == 0 {
                return Err(invalid(
                    "[train]",
                    "`max_tiles` must be at least 1 for a vision-language model".into(),
                ));
            }
            // One tile is `<img>`, its context tokens and `</img>`; a sequence must hold that
            // and at least one token to train on.
            let one_tile = vl.tokens_per_tile() + 2;
            if raw.train.seq_length <= one_tile {
                return Err(invalid(
                    "[train]",
                    format!(
                        "`seq_length` ({}) cannot hold even one single-tile image: a tile takes {one_tile} tokens ({} context tokens, <img> and </img>), plus at least one to train on",
                        raw.train.seq_length,
                        vl.tokens_per_tile()
                    ),
                ));
            }
            Some(vl)
        } else {
            if raw.model.projector.is_some() || raw.model.force_image_size.is_some() {
                return Err(invalid(
                    "[model]",
                    "[model.projector] and `force_image_size` need a vision model ([model.vision] or an InternVL hf_config)".into(),
                ));
            }
            None
        };
        let img_context_token_id = raw
            .model
            .img_context_token_id
            .or_else(|| top.get("image_token_id").and_then(Json::as_i64))
            .unwrap_or(DEFAULT_IMG_CONTEXT_TOKEN_ID);
        if vision_language.is_some()
            && !(0..text_cfg.vocab_size as i64).contains(&img_context_token_id)
        {
            return Err(invalid(
                "[model]",
                format!(
                    "`img_context_token_id` {img_context_token_id} is outside the vocabulary (vocab_size {})",
                    text_cfg.vocab_size
                ),
            ));
        }
        let template = raw
            .model
            .template
            .clone()
            .or_else(|| top.get("template").and_then(Json::as_str).map(String::from));

        let train = raw.train;
        train
            .check(raw.parallel.dp)
            .map_err(|m| invalid("[train]", m))?;
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
        let t = &raw.target;
        if t.devices == 0 {
            return Err(invalid("[target]", "`devices` must be at least 1".into()));
        }
        if let Some(gb) = t
            .device_memory_gb
            .filter(|gb| !(gb.is_finite() && *gb > 0.0))
        {
            return Err(invalid(
                "[target]",
                format!("`device_memory_gb` must be a number > 0, not {gb}"),
            ));
        }

        Ok(Config {
            path: path.to_path_buf(),
            model: ModelConfig {
                text: text_cfg,
                vision_language,
                img_context_token_id,
                template,
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
