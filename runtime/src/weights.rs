//! Safetensors checkpoints: single files or shards with `model.safetensors.index.json`,
//! memory-mapped, checked against the model's parameters before anything is read.

use memmap2::Mmap;
use mmc_ir::{DType, DisplayShape, Tensor, TensorType, WeightSource};
use safetensors::tensor::{Dtype as StDtype, Metadata};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One problem with a checkpoint. Each names the file or tensor concerned, on one line: names
/// from an index or a header are shown with their line breaks escaped.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{}: {source}", one_line(&path.display().to_string()))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid safetensors file: {}", path.display(), one_line(message))]
    Format { path: PathBuf, message: String },
    #[error("{}: {}", path.display(), one_line(message))]
    Index { path: PathBuf, message: String },
    #[error("{}: no model.safetensors.index.json and no .safetensors file", dir.display())]
    Empty { dir: PathBuf },
    #[error("checkpoint {}: tensor `{name}` is missing (parameter `{param}` needs it)", dir.display())]
    Missing {
        dir: PathBuf,
        name: String,
        param: String,
    },
    #[error("{}: tensor `{name}` is not a parameter of this model", file.display())]
    Unexpected { file: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {got}, but parameter `{param}` needs {expected}", file.display(), got = DisplayShape(.got), expected = DisplayShape(.expected))]
    Shape {
        file: PathBuf,
        name: String,
        param: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{}: tensor `{name}` has dtype {dtype}, which mmc cannot load", file.display())]
    Dtype {
        file: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{first} (and {more} more problems)")]
    Several {
        first: Box<WeightError>,
        more: usize,
    },
}

/// `s` with its line breaks escaped, as JSON writes them.
fn one_line(s: &str) -> String {
    s.replace('\n', "\\n").replace('\r', "\\r")
}

/// Where a tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range inside the file.
    range: (usize, usize),
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// An opened checkpoint folder (or single file): tensor names, types and memory-mapped data.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WeightError + '_ {
    move |source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn map_file(path: &Path) -> Result<Mmap, WeightError> {
    let file = File::open(path).map_err(io(path))?;
    // SAFETY: the map is read-only; a checkpoint changed by another process while training
    // reads it is outside what any framework can guard against.
    unsafe { Mmap::map(&file) }.map_err(io(path))
}

fn read_header(path: &Path, map: &[u8]) -> Result<(usize, Metadata), WeightError> {
    SafeTensors::read_metadata(map).map_err(|e| WeightError::Format {
        path: path.to_path_buf(),
        message: match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                "the file is shorter or longer than its header says (truncated?)".to_string()
            }
            e => e.to_string(),
        },
    })
}

fn ir_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F64 => DType::F64,
        StDtype::F32 => DType::F32,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::BOOL => DType::Bool,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens a folder holding `model.safetensors.index.json` and its shards, or a single
    /// `.safetensors` file, or a folder with exactly one `.safetensors` file.
    pub fn open(path: &Path) -> Result<Checkpoint, WeightError> {
        if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Self::from_files(dir, &[name], None);
        }
        let index = path.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let bad = |message: String| WeightError::Index {
                path: index.clone(),
                message,
            };
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut weight_map = BTreeMap::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(format!("the file of `{name}` is not a string")))?;
                weight_map.insert(name.clone(), file.to_string());
            }
            let files: Vec<String> = weight_map
                .values()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            return Self::from_files(path.to_path_buf(), &files, Some((index, weight_map)));
        }
        let mut files: Vec<String> = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        files.sort();
        match files.len() {
            0 => Err(WeightError::Empty {
                dir: path.to_path_buf(),
            }),
            1 => Self::from_files(path.to_path_buf(), &files, None),
            _ => Err(WeightError::Index {
                path: path.to_path_buf(),
                message: format!(
                    "{} .safetensors files but no model.safetensors.index.json to say which tensor is where",
                    files.len()
                ),
            }),
        }
    }

    fn from_files(
        dir: PathBuf,
        files: &[String],
        index: Option<(PathBuf, BTreeMap<String, String>)>,
    ) -> Result<Checkpoint, WeightError> {
        let mut shards = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, name) in files.iter().enumerate() {
            let path = dir.join(name);
            let map = map_file(&path)?;
            let (n, meta) = read_header(&path, &map)?;
            let start = 8 + n;
            for (tname, info) in meta.tensors() {
                if let Some((ipath, wm)) = &index {
                    if wm.get(&tname) != Some(name) {
                        return Err(WeightError::Index {
                            path: ipath.clone(),
                            message: format!(
                                "tensor `{tname}` is in {name} but the index does not say so"
                            ),
                        });
                    }
                }
                entries.insert(
                    tname,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: (start + info.data_offsets.0, start + info.data_offsets.1),
                    },
                );
            }
            shards.push(Shard { path, map });
        }
        if let Some((ipath, wm)) = &index {
            if let Some((tname, file)) = wm.iter().find(|(t, _)| !entries.contains_key(*t)) {
                return Err(WeightError::Index {
                    path: ipath.clone(),
                    message: format!(
                        "the index puts `{tname}` in {file}, but that file does not hold it"
                    ),
                });
            }
        }
        Ok(Checkpoint {
            dir,
            shards,
            entries,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn file_of(&self, e: &Entry) -> PathBuf {
        self.shards[e.file].path.clone()
    }

    /// Checks that the checkpoint holds exactly the tensors `params` need, with the right
    /// shapes and loadable dtypes; every problem found is reported (the first in full).
    pub fn check(&self, params: &[ParamSpec]) -> Result<(), WeightError> {
        let mut problems = Vec::new();
        let mut used = BTreeSet::new();
        for p in params {
            let mut shapes = Vec::new();
            for name in p.source.tensors() {
                used.insert(name);
                match self.entries.get(name) {
                    None => problems.push(WeightError::Missing {
                        dir: self.dir.clone(),
                        name: name.to_string(),
                        param: p.name.clone(),
                    }),
                    Some(e) if ir_dtype(e.dtype).is_none() => problems.push(WeightError::Dtype {
                        name: name.to_string(),
                        file: self.file_of(e),
                        dtype: format!("{:?}", e.dtype),
                    }),
                    Some(e) => shapes.push((name, e)),
                }
            }
            if shapes.len() != p.source.tensors().len() {
                continue;
            }
            let combined = match &p.source {
                WeightSource::Tensor(_) => Some(shapes[0].1.shape.clone()),
                WeightSource::Concat { axis, .. } => concat_shape(&shapes, *axis),
            };
            if combined.as_deref() != Some(p.ty.shape.as_slice()) {
                let (name, e) = shapes[0];
                let got = match &p.source {
                    WeightSource::Tensor(_) => e.shape.clone(),
                    WeightSource::Concat { .. } => combined.unwrap_or_else(|| e.shape.clone()),
                };
                problems.push(WeightError::Shape {
                    name: match &p.source {
                        WeightSource::Tensor(_) => name.to_string(),
                        WeightSource::Concat { parts, .. } => parts.join(" ++ "),
                    },
                    file: self.file_of(e),
                    param: p.name.clone(),
                    got,
                    expected: p.ty.shape.clone(),
                });
            }
        }
        for (name, e) in &self.entries {
            if !used.contains(name.as_str()) {
                problems.push(WeightError::Unexpected {
                    name: name.clone(),
                    file: self.file_of(e),
                });
            }
        }
        let more = problems.len().saturating_sub(1);
        match problems.into_iter().next() {
            None => Ok(()),
            Some(first) if more == 0 => Err(first),
            Some(first) => Err(WeightError::Several {
                first: Box::new(first),
                more,
            }),
        }
    }

    /// Reads one tensor, converted to `dtype`.
    pub fn read(&self, name: &str, dtype: DType) -> Result<Tensor, WeightError> {
        let e = self.entries.get(name).ok_or_else(|| WeightError::Missing {
            dir: self.dir.clone(),
            name: name.to_string(),
            param: name.to_string(),
        })?;
        let src = ir_dtype(e.dtype).ok_or_else(|| WeightError::Dtype {
            name: name.to_string(),
            file: self.file_of(e),
            dtype: format!("{:?}", e.dtype),
        })?;
        let shard = &self.shards[e.file];
        let bytes = &shard.map[e.range.0..e.range.1];
        let t = Tensor::from_le_bytes(src, e.shape.clone(), bytes).map_err(|err| {
            WeightError::Format {
                path: shard.path.clone(),
                message: format!("tensor `{name}`: {err}"),
            }
        })?;
        Ok(t.cast(dtype))
    }

    /// Checks, then reads, every parameter: returns parameter name -> tensor in its dtype.
    pub fn load(&self, params: &[ParamSpec]) -> Result<BTreeMap<String, Tensor>, WeightError> {
        self.check(params)?;
        let mut out = BTreeMap::new();
        for p in params {
            let t = match &p.source {
                WeightSource::Tensor(name) => self.read(name, p.ty.dtype)?,
                WeightSource::Concat { parts, axis } => {
                    let parts = parts
                        .iter()
                        .map(|n| self.read(n, p.ty.dtype))
                        .collect::<Result<Vec<_>, _>>()?;
                    Tensor::concat(&parts, *axis).expect("shapes were checked")
                }
            };
            out.insert(p.name.clone(), t);
        }
        Ok(out)
    }
}

/// The shape of tensors concatenated along `axis`, if they fit together.
fn concat_shape(parts: &[(&str, &Entry)], axis: usize) -> Option<Vec<usize>> {
    let first = &parts.first()?.1.shape;
    let fits = parts.iter().all(|(_, e)| {
        e.shape.len() == first.len()
            && axis < first.len()
            && (0..first.len()).all(|i| i == axis || e.shape[i] == first[i])
    });
    fits.then(|| {
        let mut s = first.clone();
        s[axis] = parts.iter().map(|(_, e)| e.shape[axis]).sum();
        s
    })
}

/// One parameter the model needs: its name, where its value comes from, and its type.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub source: WeightSource,
    pub ty: TensorType,
}

/// The parameters of a graph with their sources in a checkpoint, given by `source_of`
/// (`|n| WeightSource::Tensor(n.into())` for checkpoints in the model's own naming).
pub fn param_specs(
    graph: &mmc_ir::Graph,
    source_of: impl Fn(&str) -> WeightSource,
) -> Vec<ParamSpec> {
    graph
        .params()
        .map(|(name, ty, _)| ParamSpec {
            name: name.to_string(),
            source: source_of(name),
            ty: ty.clone(),
        })
        .collect()
}
