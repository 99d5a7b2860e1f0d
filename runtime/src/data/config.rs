//! MindSpeed-MM's data.json, as its examples/internvl3.5/data.json lays it out.
//!
//! ```json
//! { "dataset_param": {
//!     "dataset_type": "multimodal",
//!     "basic_parameters": { "data_path": "...jsonl or meta.json", "data_folder": "...", "repeat_time": 1 },
//!     "preprocess_parameters": { "image_reader_type": "torchvision", "train_pipeline": { "image": [ ... ] } },
//!     "tokenizer_config": { "from_pretrained": "...", "use_fast": false, ... },
//!     "template_name": "internvl2_5", "patch_size": 14, "image_size": 448, "down_sample_ratio": 0.5,
//!     "dynamic_image_size": true, "use_thumbnail": true, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
//!     "min_num_frame": 8, "max_num_frame": 32, "sampling_method": "rand", ... },
//!   "dataloader_param": { "shuffle": true, "seed": 1234, "drop_last": true, "collate_param": { "pad_id": 2 }, ... } }
//! ```
//!
//! Keys mmc does not use are accepted and reported once. Relative paths are looked up beside the
//! data.json first, then in the working directory. `data_path` may also be an InternVL meta JSON
//! naming several datasets (`root`, `annotation`, `repeat_time`, `length`, optional
//! `max_dynamic_patch`).

use super::one_line;
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};

/// Why a data.json cannot be used. Every message names the file and the key, on one line:
/// line breaks inside quoted values and keys are shown escaped.
#[derive(Debug, thiserror::Error)]
pub enum DataConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: not valid JSON: {}", path.display(), one_line(message))]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: `{}`: {}", path.display(), one_line(key), one_line(message))]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}: {what} `{}` not found (looked in {})", path.display(), one_line(given), one_line(&tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ")))]
    NotFound {
        path: PathBuf,
        what: &'static str,
        given: String,
        tried: Vec<PathBuf>,
    },
}

// Limits on values that size the loader's work: each makes it build a list that long, so an
// absurd value would exhaust memory or time before any message. Far above any real setting.

/// Most `dataloader_param.num_workers` (threads started).
pub const MAX_NUM_WORKERS: usize = 256;
/// Most repeats of a dataset (`repeat_time`; each repeat is a copy of its sample list).
pub const MAX_REPEAT_TIME: f64 = 1000.0;
/// Most `max_dynamic_patch` (the candidate tile grids of every image grow with it).
pub const MAX_DYNAMIC_PATCH: usize = 1024;

/// What to do with a text-only sample longer than the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLength {
    /// Cut it to the sequence length (InternVL's behaviour).
    Truncate,
    /// Leave it out and count it.
    Skip,
}

/// One annotation file with its image root.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSource {
    pub name: String,
    /// The JSONL file.
    pub annotation: PathBuf,
    /// Where relative image and video paths of the file are looked up.
    pub root: PathBuf,
    /// Repeat factor: below 1 keeps that fraction of the samples (a prefix), above 1 repeats
    /// them (a whole number).
    pub repeat_time: f64,
    /// Tiles per image for this dataset (the meta file's `max_dynamic_patch`).
    pub max_dynamic_patch: Option<usize>,
}

/// The parts of data.json mmc uses.
#[derive(Clone, Debug, PartialEq)]
pub struct DataConfig {
    /// The data.json file (anchors relative paths, named in errors).
    pub path: PathBuf,
    pub sources: Vec<DatasetSource>,
    /// The per-tile transform list (`preprocess_parameters.train_pipeline.image`).
    pub train_pipeline: Option<Json>,
    /// The tokenizer folder (`tokenizer_config.from_pretrained`).
    pub tokenizer_dir: PathBuf,
    /// `template_name` as the file gives it; the loader checks it against the model's
    /// template (and uses that when the file names none).
    pub template_name: Option<String>,
    pub image_size: usize,
    pub patch_size: usize,
    pub down_sample_ratio: f64,
    pub dynamic_image_size: bool,
    pub use_thumbnail: bool,
    pub min_dynamic_patch: usize,
    pub max_dynamic_patch: usize,
    pub min_num_frame: usize,
    pub max_num_frame: usize,
    pub sampling_method: String,
    pub shuffle: bool,
    /// InternVL's length-grouped sampling (`dataset_param.group_by_length`): each global
    /// batch's samples are sorted by length and spread evenly over its micro-batches.
    pub group_by_length: bool,
    /// Shuffle seed (`dataloader_param.seed`); `None` means the plan's seed.
    pub seed: Option<u64>,
    /// Drop each epoch's last, incomplete micro-batch (else it is padded); false by default,
    /// as in PyTorch's DataLoader and MindSpeed-MM.
    pub drop_last: bool,
    /// Token id of padding (`collate_param.pad_id`).
    pub pad_id: i64,
    /// Pack several samples into one row (mmc's `dataloader_param.packing`; default false:
    /// one sample per row, padded).
    pub packing: bool,
    /// mmc's `dataset_param.text_over_length`.
    pub text_over_length: OverLength,
    /// mmc's `dataset_param.skip_bad_samples`: a bad sample is a warning and a count instead of
    /// an error.
    pub skip_bad_samples: bool,
    /// Worker threads that decode and tile ahead of the step (`dataloader_param.num_workers`).
    pub num_workers: usize,
    /// Dotted names of the keys present but not used, for one report.
    pub ignored_keys: Vec<String>,
}

/// Keys of data.json that mmc reads; any other key is reported as ignored.
const USED: &[&str] = &[
    "dataset_param",
    "dataset_param.basic_parameters",
    "dataset_param.basic_parameters.data_path",
    "dataset_param.basic_parameters.data_folder",
    "dataset_param.basic_parameters.repeat_time",
    "dataset_param.preprocess_parameters",
    "dataset_param.preprocess_parameters.image_reader_type",
    "dataset_param.preprocess_parameters.train_pipeline",
    "dataset_param.preprocess_parameters.train_pipeline.image",
    "dataset_param.tokenizer_config",
    "dataset_param.tokenizer_config.from_pretrained",
    "dataset_param.tokenizer_config.use_fast",
    "dataset_param.tokenizer_config.add_eos_token",
    "dataset_param.template_name",
    "dataset_param.group_by_length",
    "dataset_param.image_size",
    "dataset_param.patch_size",
    "dataset_param.down_sample_ratio",
    "dataset_param.dynamic_image_size",
    "dataset_param.use_thumbnail",
    "dataset_param.min_dynamic_patch",
    "dataset_param.max_dynamic_patch",
    "dataset_param.min_num_frame",
    "dataset_param.max_num_frame",
    "dataset_param.sampling_method",
    "dataset_param.text_over_length",
    "dataset_param.skip_bad_samples",
    "dataloader_param",
    "dataloader_param.shuffle",
    "dataloader_param.seed",
    "dataloader_param.drop_last",
    "dataloader_param.num_workers",
    "dataloader_param.packing",
    "dataloader_param.collate_param",
    "dataloader_param.collate_param.pad_id",
];

/// Objects whose whole content is used as a value (not walked for ignored keys).
const OPAQUE: &[&str] = &["dataset_param.preprocess_parameters.train_pipeline.image"];

fn collect_ignored(prefix: &str, v: &Json, out: &mut Vec<String>) {
    if OPAQUE.contains(&prefix) {
        return;
    }
    if let Json::Object(m) = v {
        for (k, child) in m {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if USED.contains(&key.as_str()) {
                collect_ignored(&key, child, out);
            } else {
                out.push(key);
            }
        }
    }
}

/// Looks a relative path up beside `anchor` (a file) first, then in the working directory.
pub fn find_path(anchor: &Path, given: &str) -> Result<PathBuf, Vec<PathBuf>> {
    let p = Path::new(given);
    let tried: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        vec![
            anchor.parent().unwrap_or(Path::new(".")).join(p),
            p.to_path_buf(),
        ]
    };
    tried.iter().find(|c| c.exists()).cloned().ok_or(tried)
}

struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> DataConfigError {
        DataConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn get<'j>(&self, obj: &'j Map<String, Json>, key: &str) -> Option<&'j Json> {
        obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(
        &self,
        obj: &Map<String, Json>,
        key: &str,
        dotted: &str,
        default: usize,
    ) -> Result<usize, DataConfigError> {
        match self.get(obj, key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.invalid(dotted, format!("must be a whole number, not {v}"))),
        }
    }

    fn bool(
        &self,
        obj: &Map<String, Json>,
        key: &str,
        dotted: &str,
        default: bool,
    ) -> Result<bool, DataConfigError> {
        match self.get(obj, key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(dotted, format!("must be true or false, not {v}"))),
        }
    }

    fn f64(
        &self,
        obj: &Map<String, Json>,
        key: &str,
        dotted: &str,
        default: f64,
    ) -> Result<f64, DataConfigError> {
        match self.get(obj, key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.invalid(dotted, format!("must be a number, not {v}"))),
        }
    }

    fn string(
        &self,
        obj: &Map<String, Json>,
        key: &str,
        dotted: &str,
    ) -> Result<Option<String>, DataConfigError> {
        match self.get(obj, key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.invalid(dotted, format!("must be a string, not {v}"))),
        }
    }

    fn object<'j>(
        &self,
        obj: &'j Map<String, Json>,
        key: &str,
        dotted: &str,
    ) -> Result<Option<&'j Map<String, Json>>, DataConfigError> {
        match self.get(obj, key) {
            None => Ok(None),
            Some(Json::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.invalid(dotted, format!("must be an object, not {v}"))),
        }
    }

    fn find(&self, what: &'static str, given: &str) -> Result<PathBuf, DataConfigError> {
        find_path(self.path, given).map_err(|tried| DataConfigError::NotFound {
            path: self.path.to_path_buf(),
            what,
            given: given.to_string(),
            tried,
        })
    }
}

fn read_json(path: &Path) -> Result<Json, DataConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| DataConfigError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e
            .to_string()
            .split(" at line")
            .next()
            .unwrap_or_default()
            .to_string(),
    })
}

impl DataConfig {
    /// Reads and checks a data.json.
    pub fn load(path: &Path) -> Result<DataConfig, DataConfigError> {
        let r = Reader { path };
        let annotations = || {
            r.invalid(
                "(top level)",
                "this is a chat annotation file (one sample per line), not a data.json; pass a MindSpeed-MM data.json whose dataset_param.basic_parameters.data_path names it",
            )
        };
        let json = read_json(path).map_err(|e| {
            // A JSONL file fails as JSON on its second line; say what it is instead.
            let first = std::fs::read_to_string(path).ok().and_then(|t| {
                let line = t.lines().next()?.to_string();
                serde_json::from_str::<Json>(&line).ok()
            });
            match first {
                Some(Json::Object(m)) if m.contains_key("conversations") => annotations(),
                _ => e,
            }
        })?;
        let top = json
            .as_object()
            .ok_or_else(|| r.invalid("(top level)", "must be a JSON object"))?;
        if top.contains_key("conversations") {
            return Err(annotations());
        }
        let ds = r
            .object(top, "dataset_param", "dataset_param")?
            .ok_or_else(|| r.invalid("dataset_param", "is missing"))?;
        let empty = Map::new();
        let basic = r
            .object(ds, "basic_parameters", "dataset_param.basic_parameters")?
            .ok_or_else(|| r.invalid("dataset_param.basic_parameters", "is missing"))?;
        let pre = r
            .object(
                ds,
                "preprocess_parameters",
                "dataset_param.preprocess_parameters",
            )?
            .unwrap_or(&empty);
        let tok = r
            .object(ds, "tokenizer_config", "dataset_param.tokenizer_config")?
            .ok_or_else(|| r.invalid("dataset_param.tokenizer_config", "is missing"))?;
        let dl = r
            .object(top, "dataloader_param", "dataloader_param")?
            .unwrap_or(&empty);
        let collate = r
            .object(dl, "collate_param", "dataloader_param.collate_param")?
            .unwrap_or(&empty);

        if let Some(kind) = r.string(
            pre,
            "image_reader_type",
            "dataset_param.preprocess_parameters.image_reader_type",
        )? {
            if !matches!(kind.as_str(), "torchvision" | "PIL" | "pil") {
                return Err(r.invalid(
                    "dataset_param.preprocess_parameters.image_reader_type",
                    format!("\"{kind}\" is not supported (mmc decodes images like PIL, as \"torchvision\" does)"),
                ));
            }
        }
        let train_pipeline = match r.object(
            pre,
            "train_pipeline",
            "dataset_param.preprocess_parameters.train_pipeline",
        )? {
            Some(tp) => tp.get("image").cloned(),
            None => None,
        };
        let tokenizer = r
            .string(
                tok,
                "from_pretrained",
                "dataset_param.tokenizer_config.from_pretrained",
            )?
            .ok_or_else(|| {
                r.invalid(
                    "dataset_param.tokenizer_config.from_pretrained",
                    "is missing",
                )
            })?;
        let tokenizer_dir = r.find("tokenizer folder", &tokenizer)?;
        if r.bool(
            tok,
            "add_eos_token",
            "dataset_param.tokenizer_config.add_eos_token",
            false,
        )? {
            return Err(r.invalid(
                "dataset_param.tokenizer_config.add_eos_token",
                "true is not supported (the internvl2_5 template ends turns with <|im_end|>)",
            ));
        }
        let template_name = r.string(ds, "template_name", "dataset_param.template_name")?;
        if let Some(t) = template_name.as_deref().filter(|t| *t != "internvl2_5") {
            return Err(r.invalid(
                "dataset_param.template_name",
                format!("unknown template \"{t}\" (mmc knows \"internvl2_5\", the template of InternVL3.5)"),
            ));
        }

        let data_path = r
            .string(
                basic,
                "data_path",
                "dataset_param.basic_parameters.data_path",
            )?
            .ok_or_else(|| r.invalid("dataset_param.basic_parameters.data_path", "is missing"))?;
        let data_path = r.find("data_path", &data_path)?;
        let folder = r.string(
            basic,
            "data_folder",
            "dataset_param.basic_parameters.data_folder",
        )?;
        let repeat_time = r.f64(
            basic,
            "repeat_time",
            "dataset_param.basic_parameters.repeat_time",
            1.0,
        )?;
        let sources = Self::sources(&r, &data_path, folder.as_deref(), repeat_time)?;

        let over = r.string(ds, "text_over_length", "dataset_param.text_over_length")?;
        let text_over_length = match over.as_deref() {
            None | Some("truncate") => OverLength::Truncate,
            Some("skip") => OverLength::Skip,
            Some(o) => {
                return Err(r.invalid(
                    "dataset_param.text_over_length",
                    format!("\"{o}\" is neither \"truncate\" nor \"skip\""),
                ))
            }
        };
        let cfg = DataConfig {
            path: path.to_path_buf(),
            sources,
            train_pipeline,
            tokenizer_dir,
            template_name,
            image_size: r.usize(ds, "image_size", "dataset_param.image_size", 448)?,
            patch_size: r.usize(ds, "patch_size", "dataset_param.patch_size", 14)?,
            down_sample_ratio: r.f64(
                ds,
                "down_sample_ratio",
                "dataset_param.down_sample_ratio",
                0.5,
            )?,
            dynamic_image_size: r.bool(
                ds,
                "dynamic_image_size",
                "dataset_param.dynamic_image_size",
                false,
            )?,
            use_thumbnail: r.bool(ds, "use_thumbnail", "dataset_param.use_thumbnail", false)?,
            min_dynamic_patch: r.usize(
                ds,
                "min_dynamic_patch",
                "dataset_param.min_dynamic_patch",
                1,
            )?,
            max_dynamic_patch: r.usize(
                ds,
                "max_dynamic_patch",
                "dataset_param.max_dynamic_patch",
                6,
            )?,
            min_num_frame: r.usize(ds, "min_num_frame", "dataset_param.min_num_frame", 4)?,
            max_num_frame: r.usize(ds, "max_num_frame", "dataset_param.max_num_frame", 12)?,
            sampling_method: r
                .string(ds, "sampling_method", "dataset_param.sampling_method")?
                .unwrap_or_else(|| "rand".into()),
            shuffle: r.bool(dl, "shuffle", "dataloader_param.shuffle", false)?,
            group_by_length: r.bool(
                ds,
                "group_by_length",
                "dataset_param.group_by_length",
                false,
            )?,
            seed: match r.get(dl, "seed") {
                None => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    r.invalid(
                        "dataloader_param.seed",
                        format!("must be a whole number, not {v}"),
                    )
                })?),
            },
            drop_last: r.bool(dl, "drop_last", "dataloader_param.drop_last", false)?,
            pad_id: r.usize(
                collate,
                "pad_id",
                "dataloader_param.collate_param.pad_id",
                0,
            )? as i64,
            packing: r.bool(dl, "packing", "dataloader_param.packing", false)?,
            text_over_length,
            skip_bad_samples: r.bool(
                ds,
                "skip_bad_samples",
                "dataset_param.skip_bad_samples",
                false,
            )?,
            num_workers: r
                .usize(dl, "num_workers", "dataloader_param.num_workers", 2)?
                .max(1),
            ignored_keys: {
                let mut v = Vec::new();
                collect_ignored("", &json, &mut v);
                v
            },
        };
        cfg.check(&r)?;
        Ok(cfg)
    }

    fn check(&self, r: &Reader) -> Result<(), DataConfigError> {
        if self.patch_size == 0
            || self.image_size == 0
            || !self.image_size.is_multiple_of(self.patch_size)
        {
            return Err(r.invalid(
                "dataset_param.image_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.image_size, self.patch_size
                ),
            ));
        }
        if self.down_sample_ratio.is_nan()
            || self.down_sample_ratio <= 0.0
            || self.down_sample_ratio > 1.0
        {
            return Err(r.invalid("dataset_param.down_sample_ratio", "must be in (0, 1]"));
        }
        if self.min_dynamic_patch == 0 || self.min_dynamic_patch > self.max_dynamic_patch {
            return Err(r.invalid(
                "dataset_param.min_dynamic_patch",
                format!(
                    "must be between 1 and max_dynamic_patch ({}), not {}",
                    self.max_dynamic_patch, self.min_dynamic_patch
                ),
            ));
        }
        if self.max_dynamic_patch > MAX_DYNAMIC_PATCH {
            return Err(r.invalid(
                "dataset_param.max_dynamic_patch",
                format!(
                    "{} tiles per image is more than mmc supports ({MAX_DYNAMIC_PATCH})",
                    self.max_dynamic_patch
                ),
            ));
        }
        if self.num_workers > MAX_NUM_WORKERS {
            return Err(r.invalid(
                "dataloader_param.num_workers",
                format!(
                    "{} threads is more than mmc starts ({MAX_NUM_WORKERS})",
                    self.num_workers
                ),
            ));
        }
        if self.min_num_frame == 0 || self.min_num_frame > self.max_num_frame {
            return Err(r.invalid(
                "dataset_param.min_num_frame",
                format!(
                    "must be between 1 and max_num_frame ({}), not {}",
                    self.max_num_frame, self.min_num_frame
                ),
            ));
        }
        Ok(())
    }

    /// Language tokens per tile: (image_size / patch_size)^2 x down_sample_ratio^2.
    pub fn tokens_per_tile(&self) -> usize {
        let side = (self.image_size / self.patch_size) as f64 * self.down_sample_ratio;
        (side * side).round() as usize
    }

    fn sources(
        r: &Reader,
        data_path: &Path,
        folder: Option<&str>,
        repeat_time: f64,
    ) -> Result<Vec<DatasetSource>, DataConfigError> {
        let root_of = |given: Option<&str>| -> Result<PathBuf, DataConfigError> {
            match given {
                None | Some("") => Ok(data_path.parent().unwrap_or(Path::new(".")).to_path_buf()),
                Some(f) => r.find("data_folder", f),
            }
        };
        let is_meta = data_path.extension().is_some_and(|e| e == "json");
        if !is_meta {
            check_repeat(r, "dataset_param.basic_parameters.repeat_time", repeat_time)?;
            return Ok(vec![DatasetSource {
                name: data_path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                annotation: data_path.to_path_buf(),
                root: root_of(folder)?,
                repeat_time,
                max_dynamic_patch: None,
            }]);
        }
        // An InternVL meta file: {"name": {"root": ..., "annotation": ..., "repeat_time": ...}, ...}
        let meta = read_json(data_path)?;
        let mr = Reader { path: data_path };
        let obj = meta.as_object().ok_or_else(|| {
            mr.invalid("(top level)", "a meta file must be an object of datasets")
        })?;
        let mut out = Vec::new();
        for (name, entry) in obj {
            let e = entry.as_object().ok_or_else(|| {
                mr.invalid(name, "must be an object with `root` and `annotation`")
            })?;
            let ann = mr
                .string(e, "annotation", &format!("{name}.annotation"))?
                .ok_or_else(|| mr.invalid(&format!("{name}.annotation"), "is missing"))?;
            let root = mr
                .string(e, "root", &format!("{name}.root"))?
                .unwrap_or_default();
            out.push(DatasetSource {
                name: name.clone(),
                annotation: mr.find("annotation", &ann)?,
                root: if root.is_empty() {
                    data_path.parent().unwrap_or(Path::new(".")).to_path_buf()
                } else {
                    mr.find("root", &root)?
                },
                repeat_time: mr.f64(e, "repeat_time", &format!("{name}.repeat_time"), 1.0)?,
                max_dynamic_patch: match mr.get(e, "max_dynamic_patch") {
                    None => None,
                    Some(v) => Some(
                        v.as_u64()
                            .filter(|&m| m <= MAX_DYNAMIC_PATCH as u64)
                            .ok_or_else(|| {
                                mr.invalid(
                                    &format!("{name}.max_dynamic_patch"),
                                    format!("must be a whole number up to {MAX_DYNAMIC_PATCH}"),
                                )
                            })? as usize,
                    ),
                },
            });
        }
        if out.is_empty() {
            return Err(mr.invalid("(top level)", "the meta file names no dataset"));
        }
        for s in &out {
            check_repeat(&mr, &format!("{}.repeat_time", s.name), s.repeat_time)?;
        }
        Ok(out)
    }
}

/// A repeat factor is a fraction in (0, 1] or a whole number (up to [`MAX_REPEAT_TIME`]).
fn check_repeat(r: &Reader, key: &str, t: f64) -> Result<(), DataConfigError> {
    if t.is_nan() || t <= 0.0 || (t > 1.0 && t.fract() != 0.0) || t > MAX_REPEAT_TIME {
        return Err(r.invalid(
            key,
            format!("{t} must be a fraction in (0, 1] or a whole number of repeats up to {MAX_REPEAT_TIME}"),
        ));
    }
    Ok(())
}
