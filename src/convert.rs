//! `mmc convert`: Hugging Face checkpoints to mmc's own format and back.
//!
//! `hf-to-mmc` reads an HF folder in either InternVL layout (OpenGVLab or transformers-native,
//! or a Qwen3-MoE causal LM), checks every tensor against the model its `config.json`
//! describes, and writes `OUT/release/` with the model's parameter names and the experts of
//! each MoE layer stacked as MindSpeed-MM merges them (`mmc_runtime::checkpoint::experts`),
//! then `OUT/latest_checkpointed_iteration.txt` = `release`, last. `mmc-to-hf` reads such a
//! folder (or a training iteration), checks its manifest, and writes the layout that the HF
//! folder it is given holds, with per-expert tensors, plus that folder's other files.
//!
//! Both stream tensor by tensor from memory maps: the only buffers are one expert's block (a
//! transpose needs its whole block) and the writer's; bytes are copied bit-exactly unless a
//! dtype cast is asked for.

use indicatif::{ProgressBar, ProgressStyle};
use mmc_frontend::ForwardOptions;
use mmc_frontend::{forward_graph, BuildError, CheckpointLayout, Config, ConfigError};
use mmc_ir::{DType, DisplayShape, WeightSource};
use mmc_runtime::checkpoint::experts::{expert_stacks, ExpertStack};
use mmc_runtime::checkpoint::manifest::{
    dtype_from_safetensors, Manifest, TensorRecord, FORMAT, MANIFEST_FILE,
};
use mmc_runtime::checkpoint::store::{sync_dir, write_file, write_shards, StoreError, TensorSpec};
use mmc_runtime::checkpoint::{iteration_dir, LATEST_FILE, RELEASE};
use mmc_runtime::weights::{param_specs, ParamSpec};
use mmc_runtime::{Checkpoint, WeightError};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Why a conversion failed. Each names the file or folder concerned, in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the model of config.json: {0}")]
    Build(#[from] BuildError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A folder that cannot be used as it is (an output that already holds a checkpoint, an
    /// input that is not a checkpoint).
    #[error("{}: {message}", path.display())]
    Folder { path: PathBuf, message: String },
    /// A checkpoint whose tensors do not fit the model, or its own manifest.
    #[error("{}: {message}", path.display())]
    Mismatch { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError + '_ {
    move |error| ConvertError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The default largest shard of an export, as transformers' `save_pretrained` has it.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 4_000_000_000;

/// Parses a shard size as `save_pretrained` spells it: `4GB`, `500MB`, `1000000` (bytes);
/// KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 4GB, 500MB or 1000000"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "`{text}`: unknown unit `{u}` (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("`{text}`: a shard must hold at least one byte")),
        Some(b) => Ok(b),
        None => Err(format!("`{text}` is too large")),
    }
}

/// What a conversion wrote, for the closing line.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The folder holding the weights (`OUT/release`, or the export).
    pub dir: PathBuf,
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    pub seconds: f64,
}

/// Progress on a terminal as a bar, otherwise as a line every tenth (only for checkpoints big
/// enough to take a while, so that logs of small conversions stay short).
struct Progress {
    bar: Option<ProgressBar>,
    label: &'static str,
    total: u64,
    done: u64,
    next_line: u64,
}

impl Progress {
    const PLAIN_FROM_BYTES: u64 = 256 << 20;

    fn new(label: &'static str, total: u64, enabled: bool) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label);
            bar
        });
        let plain = enabled && bar.is_none() && total >= Self::PLAIN_FROM_BYTES;
        Progress {
            bar,
            label,
            total,
            done: 0,
            next_line: if plain { total / 10 } else { u64::MAX },
        }
    }

    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        } else if self.done >= self.next_line && self.done < self.total {
            let _ = writeln!(
                std::io::stderr(),
                "{}: {}% ({:.2} of {:.2} GB)",
                self.label,
                self.done * 100 / self.total.max(1),
                self.done as f64 / 1e9,
                self.total as f64 / 1e9
            );
            self.next_line = self.done + self.total / 10;
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The parameters of the model that `hf_dir/config.json` describes, with their sources in a
/// checkpoint of `layout`.
fn model_params(hf_dir: &Path, layout: &CheckpointLayout) -> Result<Vec<ParamSpec>, ConvertError> {
    let cfg = Config::from_hf_dir(hf_dir)?;
    let graph = forward_graph(&cfg, ForwardOptions::default())?.graph;
    Ok(param_specs(&graph, |n| layout.source(n)))
}

/// One tensor of mmc's layout: a parameter kept as it is, or a stack of experts.
enum Stored {
    Param(usize),
    Stack(usize),
}

/// mmc's layout of a model's parameters: the experts' stacks, and the stored tensors in model
/// order (a stack where its first expert's parameter is).
struct MmcLayout {
    stacks: Vec<ExpertStack>,
    /// Per-expert parameter name -> (stack, expert, part).
    member: HashMap<String, (usize, usize, usize)>,
    stored: Vec<Stored>,
}

impl MmcLayout {
    fn of(params: &[ParamSpec]) -> MmcLayout {
        let stacks = expert_stacks(
            params
                .iter()
                .map(|p| (p.name.as_str(), p.ty.shape.as_slice())),
        );
        let mut member = HashMap::new();
        for (si, s) in stacks.iter().enumerate() {
            for (e, parts) in s.experts.iter().enumerate() {
                for (k, name) in parts.iter().enumerate() {
                    member.insert(name.clone(), (si, e, k));
                }
            }
        }
        let mut seen = vec![false; stacks.len()];
        let mut stored = Vec::new();
        for (pi, p) in params.iter().enumerate() {
            match member.get(&p.name) {
                Some(&(si, _, _)) => {
                    if !seen[si] {
                        seen[si] = true;
                        stored.push(Stored::Stack(si));
                    }
                }
                None => stored.push(Stored::Param(pi)),
            }
        }
        MmcLayout {
            stacks,
            member,
            stored,
        }
    }

    fn name<'a>(&'a self, s: &Stored, params: &'a [ParamSpec]) -> &'a str {
        match *s {
            Stored::Param(i) => &params[i].name,
            Stored::Stack(i) => &self.stacks[i].name,
        }
    }

    fn shape(&self, s: &Stored, params: &[ParamSpec]) -> Vec<usize> {
        match *s {
            Stored::Param(i) => params[i].ty.shape.clone(),
            Stored::Stack(i) => self.stacks[i].shape(),
        }
    }
}

fn write_err(dir: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::Io {
        path: dir.to_path_buf(),
        error,
    }
}

/// Removes a partial output left by an interrupted run (only ever a folder of ours, by its
/// name) and creates it afresh.
fn fresh_partial(path: &Path) -> Result<(), ConvertError> {
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(io(path))?;
    }
    std::fs::create_dir_all(path).map_err(io(path))
}

/// `hf-to-mmc`: converts the HF checkpoint in `hf_dir` into `save_dir/release/` and marks it
/// complete in `save_dir/latest_checkpointed_iteration.txt`, last.
pub fn hf_to_mmc(
    hf_dir: &Path,
    save_dir: &Path,
    max_shard_bytes: u64,
    progress: bool,
) -> Result<Summary, ConvertError> {
    let start = Instant::now();
    if !std::fs::metadata(hf_dir).map_err(io(hf_dir))?.is_dir() {
        return Err(ConvertError::Folder {
            path: hf_dir.to_path_buf(),
            message: "not a folder (--hf-dir takes the HF model folder)".into(),
        });
    }
    let ckpt = Checkpoint::open(hf_dir)?;
    let layout = CheckpointLayout::detect(ckpt.names());
    let params = model_params(hf_dir, &layout)?;
    ckpt.check(&params)?;

    // Each parameter's stored bytes (the parts of a concatenation in order) and dtype.
    let mut sources: Vec<(DType, Vec<&[u8]>)> = Vec::with_capacity(params.len());
    for p in &params {
        let names = p.source.tensors();
        let raws = names
            .iter()
            .map(|n| ckpt.raw(n))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = raws[0].dtype;
        if let Some((n, r)) = names.iter().zip(&raws).find(|(_, r)| r.dtype != dtype) {
            return Err(ConvertError::Mismatch {
                path: hf_dir.to_path_buf(),
                message: format!(
                    "tensor `{n}` is {}, but `{}` is {dtype}; the parts of parameter `{}` must share a dtype",
                    r.dtype, names[0], p.name
                ),
            });
        }
        if let WeightSource::Concat { axis, .. } = &p.source {
            if *axis != 0 {
                return Err(ConvertError::Mismatch {
                    path: hf_dir.to_path_buf(),
                    message: format!(
                        "parameter `{}` is a concatenation along axis {axis}; conversion joins parts along axis 0 only",
                        p.name
                    ),
                });
            }
        }
        sources.push((dtype, raws.iter().map(|r| r.bytes).collect()));
    }
    let mmc = MmcLayout::of(&params);
    let index: HashMap<&str, usize> = params
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let mut specs = Vec::with_capacity(mmc.stored.len());
    for s in &mmc.stored {
        let dtype = match *s {
            Stored::Param(i) => sources[i].0,
            Stored::Stack(si) => {
                let stack = &mmc.stacks[si];
                let first = &stack.experts[0][0];
                let dtype = sources[index[first.as_str()]].0;
                for name in stack.experts.iter().flatten() {
                    let d = sources[index[name.as_str()]].0;
                    if d != dtype {
                        return Err(ConvertError::Mismatch {
                            path: hf_dir.to_path_buf(),
                            message: format!(
                                "expert tensor `{name}` is {d}, but `{first}` is {dtype}; the experts of `{}` are stacked into one tensor and must share a dtype",
                                stack.name
                            ),
                        });
                    }
                }
                dtype
            }
        };
        specs.push(TensorSpec {
            name: mmc.name(s, &params).to_string(),
            dtype,
            shape: mmc.shape(s, &params),
        });
    }
    let by_name: HashMap<&str, &Stored> = mmc
        .stored
        .iter()
        .map(|s| (mmc.name(s, &params), s))
        .collect();

    // The output folder: refuse one that holds a checkpoint; write into a partial folder that
    // becomes `release/` by a rename, then the latest file.
    if save_dir.exists() && !save_dir.is_dir() {
        return Err(ConvertError::Folder {
            path: save_dir.to_path_buf(),
            message: "exists and is not a folder".into(),
        });
    }
    for held in [LATEST_FILE, RELEASE] {
        let p = save_dir.join(held);
        if p.exists() {
            return Err(ConvertError::Folder {
                path: p,
                message:
                    "--save-dir already holds a checkpoint; choose another folder or remove it"
                        .into(),
            });
        }
    }
    std::fs::create_dir_all(save_dir).map_err(io(save_dir))?;
    let partial = save_dir.join(format!(".{RELEASE}.partial"));
    fresh_partial(&partial)?;

    let total: u64 = specs.iter().map(TensorSpec::bytes).sum();
    let mut bar = Progress::new("hf-to-mmc", total, progress);
    let werr = write_err(&partial);
    let mut produce = |spec: &TensorSpec, w: &mut dyn Write| -> Result<(), StoreError> {
        match by_name[spec.name.as_str()] {
            Stored::Param(i) => {
                for part in &sources[*i].1 {
                    w.write_all(part).map_err(&werr)?;
                }
            }
            Stored::Stack(si) => {
                let stack = &mmc.stacks[*si];
                let elem = spec.dtype.size_bytes();
                for parts in &stack.experts {
                    let bytes: Vec<&[u8]> = parts
                        .iter()
                        .map(|n| sources[index[n.as_str()]].1[0])
                        .collect();
                    w.write_all(&stack.block(&bytes, elem)).map_err(&werr)?;
                }
            }
        }
        bar.add(spec.bytes());
        Ok(())
    };
    let shards = write_shards(&partial, "model", &specs, max_shard_bytes, &mut produce)?;
    bar.finish();
    let manifest = Manifest {
        format: FORMAT,
        iteration: None,
        plan_sha256: None,
        files: shards.files,
        tensors: specs
            .iter()
            .map(|s| TensorRecord::new(&s.name, s.dtype, &s.shape))
            .collect(),
    };
    manifest.write(&partial)?;
    sync_dir(&partial)?;
    let release = save_dir.join(RELEASE);
    std::fs::rename(&partial, &release).map_err(io(&release))?;
    sync_dir(save_dir)?;
    let tmp = save_dir.join(format!(".{LATEST_FILE}.tmp"));
    write_file(&tmp, RELEASE.as_bytes())?;
    let latest = save_dir.join(LATEST_FILE);
    std::fs::rename(&tmp, &latest).map_err(io(&latest))?;
    sync_dir(save_dir)?;
    Ok(Summary {
        dir: release,
        tensors: specs.len(),
        bytes: total,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The checkpoint folder that `dir` names: the one its latest file points at (`release` or an
/// iteration number, as Megatron writes it), or `dir` itself when it holds a manifest.
pub fn resolve_checkpoint(dir: &Path) -> Result<PathBuf, ConvertError> {
    std::fs::metadata(dir).map_err(io(dir))?;
    let latest = dir.join(LATEST_FILE);
    if latest.is_file() {
        let text = std::fs::read_to_string(&latest).map_err(io(&latest))?;
        let t = text.trim();
        let sub = if t == RELEASE {
            RELEASE.to_string()
        } else {
            match t.parse::<u64>() {
                Ok(n) => iteration_dir(n),
                Err(_) => {
                    return Err(ConvertError::Mismatch {
                        path: latest,
                        message: format!("holds `{t}`, neither `release` nor an iteration number"),
                    })
                }
            }
        };
        return Ok(dir.join(sub));
    }
    if dir.join(MANIFEST_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    Err(ConvertError::Folder {
        path: dir.to_path_buf(),
        message: format!(
            "not an mmc checkpoint: neither {LATEST_FILE} nor {MANIFEST_FILE} (give the save folder, its release/ or an iter_NNNNNNN/ folder)"
        ),
    })
}

/// Whether a file of a checkpoint folder is one of the model's shards or their index (an
/// iteration also holds optimizer shards and training state, which an export does not read).
fn is_model_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Whether a file of an HF folder holds weights (which an export writes afresh) rather than
/// configuration, tokenizer or code (which it copies).
fn is_hf_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || (name.starts_with("pytorch_model")
            && (name.ends_with(".bin") || name.ends_with(".bin.index.json")))
}

/// Opens the model shards of an mmc checkpoint folder and checks them against its manifest's
/// tensor list.
fn open_mmc(folder: &Path, manifest: &Manifest) -> Result<Checkpoint, ConvertError> {
    let ckpt = if folder.join("model.safetensors.index.json").is_file() {
        Checkpoint::open(folder)?
    } else {
        Checkpoint::open(&folder.join("model.safetensors"))?
    };
    let path = folder.join(MANIFEST_FILE);
    let mismatch = |message: String| ConvertError::Mismatch {
        path: path.clone(),
        message,
    };
    // A training iteration's manifest also lists the optimizer's tensors, which live in other
    // files: each tensor of the model shards must be listed as it is stored.
    let listed: std::collections::HashMap<&str, _> = manifest
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for name in ckpt.names() {
        let t = listed.get(name).ok_or_else(|| {
            mismatch(format!(
                "does not list tensor `{name}`, which the model shards hold"
            ))
        })?;
        let raw = ckpt.raw(name)?;
        if dtype_from_safetensors(&t.dtype) != Some(raw.dtype) || raw.shape != t.shape.as_slice() {
            return Err(mismatch(format!(
                "lists tensor `{}` as {} {}, but the shards hold {} {}",
                t.name,
                t.dtype,
                DisplayShape(&t.shape),
                raw.dtype,
                DisplayShape(raw.shape)
            )));
        }
    }
    Ok(ckpt)
}

/// Where an exported tensor's bytes come from.
enum Piece {
    /// A byte range of a stored tensor (the whole of it, or one part of a concatenation).
    Slice { name: String, range: (usize, usize) },
    /// Part `part` of expert `expert` of stack `stack`.
    Expert {
        stack: usize,
        expert: usize,
        part: usize,
    },
}

/// One expert's block unstacked: (stack, expert) and its per-expert tensors' bytes.
type Unstacked = ((usize, usize), Vec<Vec<u8>>);

/// Writes `bytes` of dtype `from` as dtype `to` (float to float, by round to nearest even), in
/// chunks so that a cast needs no copy of the whole tensor. Values go through f32, which holds
/// bf16 and f16 exactly (half's own f64 -> bf16 drops low mantissa bits before rounding, so it
/// can round a tie the wrong way); an f64 tensor cast to bf16 is rounded twice.
fn write_cast(w: &mut dyn Write, bytes: &[u8], from: DType, to: DType) -> std::io::Result<()> {
    if from == to {
        return w.write_all(bytes);
    }
    let (fs, ts) = (from.size_bytes(), to.size_bytes());
    let mut buf = Vec::with_capacity(65536 * ts);
    for chunk in bytes.chunks(65536 * fs) {
        buf.clear();
        for x in chunk.chunks_exact(fs) {
            let v = match from {
                DType::F32 => f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
                DType::BF16 => half::bf16::from_le_bytes([x[0], x[1]]).to_f32(),
                DType::F16 => half::f16::from_le_bytes([x[0], x[1]]).to_f32(),
                _ => f64::from_le_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]) as f32,
            };
            match to {
                DType::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                _ => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

/// `mmc-to-hf`: writes the mmc checkpoint `ckpt_dir` in the layout of the HF folder `hf_dir`
/// (per-expert tensors), with that folder's other files, as `save_dir`: everything goes to a
/// partial folder first, renamed to `save_dir` once complete. `dtype` casts every float
/// tensor (`bf16` or `f32`); `None` keeps each tensor's dtype.
pub fn mmc_to_hf(
    hf_dir: &Path,
    ckpt_dir: &Path,
    save_dir: &Path,
    max_shard_bytes: u64,
    dtype: Option<DType>,
    progress: bool,
) -> Result<Summary, ConvertError> {
    let start = Instant::now();
    if let Some(d) = dtype {
        if !matches!(d, DType::BF16 | DType::F32) {
            return Err(ConvertError::Folder {
                path: save_dir.to_path_buf(),
                message: format!("--dtype {d}: an export casts to bf16 or f32 only"),
            });
        }
    }
    if !std::fs::metadata(hf_dir).map_err(io(hf_dir))?.is_dir() {
        return Err(ConvertError::Folder {
            path: hf_dir.to_path_buf(),
            message: "not a folder (--hf-dir takes the HF model folder)".into(),
        });
    }
    let folder = resolve_checkpoint(ckpt_dir)?;
    let manifest = Manifest::read(&folder)?;
    manifest.verify(&folder, is_model_file)?;
    let ckpt = open_mmc(&folder, &manifest)?;

    let hf = Checkpoint::open(hf_dir)?;
    let layout = CheckpointLayout::detect(hf.names());
    let params = model_params(hf_dir, &layout)?;
    hf.check(&params)?;
    let mmc = MmcLayout::of(&params);

    // The checkpoint must hold exactly mmc's layout of this model.
    let mismatch = |message: String| ConvertError::Mismatch {
        path: folder.clone(),
        message,
    };
    let mut stored_dtype: HashMap<String, DType> = HashMap::new();
    for s in &mmc.stored {
        let name = mmc.name(s, &params);
        let want = mmc.shape(s, &params);
        let raw = ckpt.raw(name).map_err(|_| {
            mismatch(format!(
                "tensor `{name}` is missing (the model of {} needs it)",
                hf_dir.join("config.json").display()
            ))
        })?;
        if raw.shape != want.as_slice() {
            return Err(mismatch(format!(
                "tensor `{name}` has shape {}, but the model of {} needs {}",
                DisplayShape(raw.shape),
                hf_dir.join("config.json").display(),
                DisplayShape(&want)
            )));
        }
        if !raw.dtype.is_float() {
            return Err(mismatch(format!(
                "tensor `{name}` has dtype {}, but model parameters are floats",
                raw.dtype
            )));
        }
        stored_dtype.insert(name.to_string(), raw.dtype);
    }
    if let Some(extra) = ckpt.names().find(|n| !stored_dtype.contains_key(*n)) {
        return Err(mismatch(format!(
            "tensor `{extra}` is not a tensor of the model of {}",
            hf_dir.join("config.json").display()
        )));
    }

    // The exported tensors, in model order.
    let mut specs = Vec::new();
    let mut pieces: HashMap<String, (Piece, DType)> = HashMap::new();
    for p in &params {
        if let Some(&(stack, expert, part)) = mmc.member.get(&p.name) {
            let from = stored_dtype[&mmc.stacks[stack].name];
            let name = p.source.tensors()[0].to_string();
            specs.push(TensorSpec {
                name: name.clone(),
                dtype: dtype.unwrap_or(from),
                shape: p.ty.shape.clone(),
            });
            pieces.insert(
                name,
                (
                    Piece::Expert {
                        stack,
                        expert,
                        part,
                    },
                    from,
                ),
            );
            continue;
        }
        let from = stored_dtype[&p.name];
        let elem = from.size_bytes();
        let mut at = 0usize;
        for name in p.source.tensors() {
            let shape = match &p.source {
                WeightSource::Tensor(_) => p.ty.shape.clone(),
                WeightSource::Concat { .. } => {
                    hf.shape(name).map(<[usize]>::to_vec).unwrap_or_default()
                }
            };
            let len = shape.iter().product::<usize>() * elem;
            specs.push(TensorSpec {
                name: name.to_string(),
                dtype: dtype.unwrap_or(from),
                shape,
            });
            pieces.insert(
                name.to_string(),
                (
                    Piece::Slice {
                        name: p.name.clone(),
                        range: (at, at + len),
                    },
                    from,
                ),
            );
            at += len;
        }
    }

    // The output: a partial folder beside it, renamed into place at the end.
    if save_dir.exists() {
        let empty = std::fs::read_dir(save_dir)
            .map_err(io(save_dir))?
            .next()
            .is_none();
        if !empty {
            return Err(ConvertError::Folder {
                path: save_dir.to_path_buf(),
                message:
                    "--save-dir already exists and is not empty; choose another folder or remove it"
                        .into(),
            });
        }
    }
    let parent = match save_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = save_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ConvertError::Folder {
            path: save_dir.to_path_buf(),
            message: "--save-dir must name a folder".into(),
        })?;
    let partial = parent.join(format!(".{base}.partial"));
    fresh_partial(&partial).map_err(|e| ConvertError::Folder {
        path: save_dir.to_path_buf(),
        message: format!("cannot be written (the export is assembled beside it first): {e}"),
    })?;

    let total: u64 = specs.iter().map(TensorSpec::bytes).sum();
    let mut bar = Progress::new("mmc-to-hf", total, progress);
    let werr = write_err(&partial);
    // The last expert block unstacked: gate and up come from one block.
    let mut cache: Option<Unstacked> = None;
    let mut produce = |spec: &TensorSpec, w: &mut dyn Write| -> Result<(), StoreError> {
        let (piece, from) = &pieces[&spec.name];
        match piece {
            Piece::Slice { name, range } => {
                let raw = ckpt.raw(name).map_err(|e| StoreError::Damaged {
                    path: folder.clone(),
                    message: e.to_string(),
                })?;
                write_cast(w, &raw.bytes[range.0..range.1], *from, spec.dtype).map_err(&werr)?;
            }
            Piece::Expert {
                stack,
                expert,
                part,
            } => {
                let key = (*stack, *expert);
                if cache.as_ref().map(|c| c.0) != Some(key) {
                    let s = &mmc.stacks[*stack];
                    let raw = ckpt.raw(&s.name).map_err(|e| StoreError::Damaged {
                        path: folder.clone(),
                        message: e.to_string(),
                    })?;
                    let elem = from.size_bytes();
                    let len = s.block_len() * elem;
                    let block = &raw.bytes[expert * len..(expert + 1) * len];
                    cache = Some((key, s.unblock(block, elem)));
                }
                let parts = &cache.as_ref().expect("the block was just unstacked").1;
                write_cast(w, &parts[*part], *from, spec.dtype).map_err(&werr)?;
            }
        }
        bar.add(spec.bytes());
        Ok(())
    };
    write_shards(&partial, "model", &specs, max_shard_bytes, &mut produce)?;
    bar.finish();
    copy_other_files(hf_dir, &partial)?;
    sync_dir(&partial)?;
    std::fs::rename(&partial, save_dir).map_err(io(save_dir))?;
    sync_dir(&parent)?;
    Ok(Summary {
        dir: save_dir.to_path_buf(),
        tensors: specs.len(),
        bytes: total,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Copies every file of `from` but the weights (config, tokenizer, `*.py`, ...) into `to`,
/// sub-folders included, each fsynced.
fn copy_other_files(from: &Path, to: &Path) -> Result<(), ConvertError> {
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let name = entry.file_name();
        let src = entry.path();
        let dst = to.join(&name);
        if src.is_dir() {
            std::fs::create_dir_all(&dst).map_err(io(&dst))?;
            copy_other_files(&src, &dst)?;
            sync_dir(&dst)?;
        } else if !is_hf_weight_file(&name.to_string_lossy()) {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(io(&dst))?;
        }
    }
    Ok(())
}

/// What a conversion wrote and how fast, for the closing line (and for comparing speeds).
pub fn rate(s: &Summary) -> String {
    let secs = s.seconds.max(1e-9);
    format!(
        "{} tensors, {:.3} GB in {:.2} s ({:.2} GB/s)",
        s.tensors,
        s.bytes as f64 / 1e9,
        secs,
        s.bytes as f64 / 1e9 / secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_save_pretrained_spells_them() {
        assert_eq!(parse_size("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1000000"), Ok(1_000_000));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10kb"), Ok(10_000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("4XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999TB").is_err());
    }

    #[test]
    fn casts_round_to_nearest_even_and_widen_exactly() {
        let mut out = Vec::new();
        let x: f32 = 1.0 + 3.0 * f32::EPSILON; // rounds to 1.0 in bf16
        write_cast(&mut out, &x.to_le_bytes(), DType::F32, DType::BF16).unwrap();
        assert_eq!(out, half::bf16::from_f32(x).to_le_bytes());
        let mut back = Vec::new();
        write_cast(&mut back, &out, DType::BF16, DType::F32).unwrap();
        assert_eq!(
            f32::from_le_bytes([back[0], back[1], back[2], back[3]]),
            1.0
        );
    }
}
