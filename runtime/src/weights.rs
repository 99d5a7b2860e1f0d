//! Safetensors checkpoints: single files or shards with `model.safetensors.index.json`,
//! memory-mapped, checked against the model's parameters before anything is read.

use memmap2::Mmap;
use mmc_ir::{DType, DisplayShape, Tensor, TensorData, TensorType, WeightSource};
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
    /// The OS error is part of the message and deliberately not the error's `source()`: a
    /// caller printing the chain (`{:#}`) would otherwise repeat it.
    #[error("{}: {error}", one_line(&path.display().to_string()))]
    Io {
        path: PathBuf,
        error: std::io::Error,
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
    /// A tensor of another kind (float, integer, bool) than the one it is read as: converting
    /// would turn integer bits into float values (or truncate floats), so the run would train
    /// on garbage. Float-to-float conversion (bf16 checkpoints into f32 master weights) is fine.
    #[error(
        "{}: tensor `{name}` has dtype {found}, but {} {expected}; mmc converts between float types, not between float, integer and bool data",
        file.display(),
        match param { Some(p) => format!("parameter `{p}` needs"), None => "it is read as".to_string() }
    )]
    DtypeMismatch {
        file: PathBuf,
        name: String,
        /// The parameter the tensor is loaded into; `None` for a plain [`Checkpoint::read`].
        param: Option<String>,
        found: DType,
        expected: DType,
    },
    /// NaN or infinite values in a parameter: they would make the first loss NaN, far from
    /// the cause, so loading names the tensor and where the first one is.
    #[error(
        "{}: tensor `{name}` holds {count} NaN or infinite value{} as {dtype} (the first at index {})",
        file.display(),
        if *count == 1 { "" } else { "s" },
        DisplayShape(.first)
    )]
    NonFinite {
        file: PathBuf,
        name: String,
        dtype: DType,
        count: usize,
        /// The multi-dimensional index of the first non-finite value.
        first: Vec<usize>,
    },
    #[error("{first} (and {more} more problems)")]
    Several {
        first: Box<WeightError>,
        more: usize,
    },
}

/// A tensor as stored: see [`Checkpoint::raw`].
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
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
    move |error| WeightError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn map_file(path: &Path) -> Result<Mmap, WeightError> {
    let file = File::open(path).map_err(io(path))?;
    // SAFETY: the map is read-only; a checkpoint changed by another process while training
    // reads it is outside what any framework can guard against.
    unsafe { Mmap::map(&file) }.map_err(io(path))
}

/// Checks a safetensors header before safetensors parses it, so that a damaged header is
/// reported with the tensor it concerns (safetensors' own errors mostly do not name it):
/// unknown dtypes, shapes whose byte size does not match their offsets, offsets that overlap,
/// leave gaps or run past the end of the file. Returns the problem as a one-line message.
fn check_header(map: &[u8]) -> Result<(), String> {
    let Some(len_bytes) = map.get(..8) else {
        return Err(format!(
            "the file is {} bytes, too short for the 8-byte header length",
            map.len()
        ));
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(n);
    let after = (map.len() - 8) as u64;
    if n > after {
        return Err(format!(
            "the header length is {n} bytes, but only {after} bytes follow it (truncated?)"
        ));
    }
    let (header, data) = map[8..].split_at(n as usize);
    let header: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("the header is not valid JSON: {e}"))?;
    let serde_json::Value::Object(header) = header else {
        return Err("the header is not a JSON object".into());
    };
    // (name, begin, end), checked one by one, then for their order.
    let mut ranges = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: String| format!("tensor `{name}`: {what}");
        let dtype = match info.get("dtype") {
            Some(serde_json::Value::String(d)) => {
                serde_json::from_value::<StDtype>(serde_json::Value::String(d.clone()))
                    .map_err(|_| bad(format!("unknown dtype `{d}`")))?
            }
            _ => return Err(bad("no `dtype` string".into())),
        };
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad("`shape` is not a list of sizes".into()))?;
        let (begin, end) = match info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .map(|o| o.iter().map(|x| x.as_u64()).collect::<Vec<_>>())
            .as_deref()
        {
            Some([Some(b), Some(e)]) => (*b, *e),
            _ => return Err(bad("`data_offsets` is not [begin, end]".into())),
        };
        if end < begin {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] end before they begin"
            )));
        }
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("shape {} is too large", DisplayShape(&shape))))?;
        if bits % 8 != 0 {
            return Err(bad(format!(
                "shape {} of {dtype:?} is not a whole number of bytes",
                DisplayShape(&shape)
            )));
        }
        if bits / 8 != end - begin {
            return Err(bad(format!(
                "shape {} of {dtype:?} is {} bytes, but data_offsets [{begin}, {end}] span {}",
                DisplayShape(&shape),
                bits / 8,
                end - begin
            )));
        }
        ranges.push((name.as_str(), begin, end));
    }
    ranges.sort_by_key(|&(name, b, e)| (b, e, name));
    let mut at = 0u64;
    let mut previous: Option<&str> = None;
    for &(name, begin, end) in &ranges {
        if begin != at {
            let side = if begin < at {
                "overlap"
            } else {
                "leave a gap after"
            };
            return Err(match previous {
                Some(p) => format!(
                    "tensor `{name}`: data_offsets [{begin}, {end}] {side} tensor `{p}` (which ends at {at})"
                ),
                None => format!(
                    "tensor `{name}`: data_offsets [{begin}, {end}] do not start at 0, where the data begins"
                ),
            });
        }
        if end > data.len() as u64 {
            return Err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] run past the end of the data ({} bytes after the header; truncated?)",
                data.len()
            ));
        }
        at = end;
        previous = Some(name);
    }
    if at != data.len() as u64 {
        return Err(format!(
            "the tensors end at byte {at} of the data, but {} bytes follow the header (extra bytes at the end)",
            data.len()
        ));
    }
    Ok(())
}

fn read_header(path: &Path, map: &[u8]) -> Result<(usize, Metadata), WeightError> {
    check_header(map).map_err(|message| WeightError::Format {
        path: path.to_path_buf(),
        message,
    })?;
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

/// The kinds of value a tensor can hold; a checkpoint tensor is read only as its own kind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
    Bool,
}

fn kind(d: DType) -> Kind {
    if d.is_float() {
        Kind::Float
    } else if d.is_int() {
        Kind::Int
    } else {
        Kind::Bool
    }
}

/// How many values of a float tensor are NaN or infinite, and the flat index of the first;
/// `None` when all are finite (or the tensor holds integers or bools). One pass, with an early
/// exit only for the common all-finite case.
fn non_finite(t: &Tensor) -> Option<(usize, usize)> {
    fn scan<T: Copy>(v: &[T], finite: impl Fn(T) -> bool) -> Option<(usize, usize)> {
        if v.iter().all(|&x| finite(x)) {
            return None;
        }
        let first = v.iter().position(|&x| !finite(x))?;
        let count = v[first..].iter().filter(|&&x| !finite(x)).count();
        Some((count, first))
    }
    match t.data() {
        TensorData::F64(v) => scan(v, f64::is_finite),
        TensorData::F32(v) => scan(v, f32::is_finite),
        TensorData::BF16(v) => scan(v, |x| x.is_finite()),
        TensorData::F16(v) => scan(v, |x| x.is_finite()),
        TensorData::I64(_) | TensorData::I32(_) | TensorData::Bool(_) => None,
    }
}

/// The row-major multi-dimensional index of flat position `flat` in `shape`.
fn unflatten(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[i] = flat % d;
            flat /= d;
        }
    }
    index
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

    /// A tensor's stored bytes (little-endian, row-major) with its dtype and shape, straight
    /// from the memory map: conversion streams them without decoding, so it is bit-exact.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, WeightError> {
        let e = self.entries.get(name).ok_or_else(|| WeightError::Missing {
            dir: self.dir.clone(),
            name: name.to_string(),
            param: name.to_string(),
        })?;
        let dtype = ir_dtype(e.dtype).ok_or_else(|| WeightError::Dtype {
            name: name.to_string(),
            file: self.file_of(e),
            dtype: format!("{:?}", e.dtype),
        })?;
        Ok(RawTensor {
            dtype,
            shape: &e.shape,
            bytes: &self.shards[e.file].map[e.range.0..e.range.1],
        })
    }

    fn file_of(&self, e: &Entry) -> PathBuf {
        self.shards[e.file].path.clone()
    }

    /// Checks that the checkpoint holds exactly the tensors `params` need, with the right
    /// shapes and loadable dtypes of the parameter's kind (a float parameter takes any float
    /// dtype, never integers or bools, and the other way round); every problem found is
    /// reported (the first in full). Values are not read: [`Checkpoint::load`] checks those.
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
                    Some(e) => match ir_dtype(e.dtype) {
                        None => problems.push(WeightError::Dtype {
                            name: name.to_string(),
                            file: self.file_of(e),
                            dtype: format!("{:?}", e.dtype),
                        }),
                        Some(found) if kind(found) != kind(p.ty.dtype) => {
                            problems.push(WeightError::DtypeMismatch {
                                name: name.to_string(),
                                file: self.file_of(e),
                                param: Some(p.name.clone()),
                                found,
                                expected: p.ty.dtype,
                            })
                        }
                        Some(_) => shapes.push((name, e)),
                    },
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

    /// Reads one tensor, converted to `dtype` of the same kind: any float dtype into any other
    /// (bf16 checkpoints into f32), i32 and i64 into each other (token ids), bool as bool.
    /// Reading integers as floats or floats as integers is refused
    /// ([`WeightError::DtypeMismatch`]), since it is almost certainly the wrong tensor.
    pub fn read(&self, name: &str, dtype: DType) -> Result<Tensor, WeightError> {
        self.read_for(name, dtype, None)
    }

    fn read_for(
        &self,
        name: &str,
        dtype: DType,
        param: Option<&str>,
    ) -> Result<Tensor, WeightError> {
        let e = self.entries.get(name).ok_or_else(|| WeightError::Missing {
            dir: self.dir.clone(),
            name: name.to_string(),
            param: param.unwrap_or(name).to_string(),
        })?;
        let src = ir_dtype(e.dtype).ok_or_else(|| WeightError::Dtype {
            name: name.to_string(),
            file: self.file_of(e),
            dtype: format!("{:?}", e.dtype),
        })?;
        if kind(src) != kind(dtype) {
            return Err(WeightError::DtypeMismatch {
                file: self.file_of(e),
                name: name.to_string(),
                param: param.map(str::to_string),
                found: src,
                expected: dtype,
            });
        }
        let shard = &self.shards[e.file];
        let bytes = &shard.map[e.range.0..e.range.1];
        let t = Tensor::from_le_bytes(src, e.shape.clone(), bytes).map_err(|err| {
            WeightError::Format {
                path: shard.path.clone(),
                message: format!("tensor `{name}`: {err}"),
            }
        })?;
        // `cast` copies even to the same dtype; the common f32 -> f32 case needs no copy.
        Ok(if src == dtype { t } else { t.cast(dtype) })
    }

    /// Reads a parameter's part and refuses NaN or infinite values (after conversion to the
    /// parameter's dtype, so an f64 value too large for f32 counts too).
    fn read_finite(&self, name: &str, p: &ParamSpec) -> Result<Tensor, WeightError> {
        let t = self.read_for(name, p.ty.dtype, Some(&p.name))?;
        match non_finite(&t) {
            None => Ok(t),
            Some((count, first)) => Err(WeightError::NonFinite {
                file: self
                    .entries
                    .get(name)
                    .map_or_else(|| self.dir.clone(), |e| self.file_of(e)),
                name: name.to_string(),
                dtype: t.dtype(),
                count,
                first: unflatten(first, t.shape()),
            }),
        }
    }

    /// Checks, then reads, every parameter: returns parameter name -> tensor in its dtype.
    /// A tensor holding NaN or infinite values is an error ([`WeightError::NonFinite`]): every
    /// such tensor is reported, the first in full, after one pass over the values.
    pub fn load(&self, params: &[ParamSpec]) -> Result<BTreeMap<String, Tensor>, WeightError> {
        self.check(params)?;
        let mut out = BTreeMap::new();
        let mut problems = Vec::new();
        for p in params {
            let names: &[String] = match &p.source {
                WeightSource::Tensor(name) => std::slice::from_ref(name),
                WeightSource::Concat { parts, .. } => parts,
            };
            let mut parts = Vec::with_capacity(names.len());
            for name in names {
                match self.read_finite(name, p) {
                    Ok(t) => parts.push(t),
                    Err(e @ WeightError::NonFinite { .. }) => problems.push(e),
                    Err(e) => return Err(e),
                }
            }
            if parts.len() != names.len() {
                continue;
            }
            let t = match &p.source {
                WeightSource::Tensor(_) => parts.pop().expect("one part was read"),
                WeightSource::Concat { axis, .. } => {
                    Tensor::concat(&parts, *axis).expect("shapes were checked")
                }
            };
            out.insert(p.name.clone(), t);
        }
        let more = problems.len().saturating_sub(1);
        match problems.into_iter().next() {
            None => Ok(out),
            Some(first) if more == 0 => Err(first),
            Some(first) => Err(WeightError::Several {
                first: Box::new(first),
                more,
            }),
        }
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
