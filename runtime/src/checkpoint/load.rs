//! Loading a checkpoint into a trainer: `--load DIR` (the iteration its latest file names),
//! `--load DIR/iter_0000050`, or converted weights (`release`). Every file is checked against
//! the manifest (size, SHA-256) and every stored tensor against the plan (missing, shape,
//! dtype) before any state is replaced, so a checkpoint that does not fit stops the run before
//! its first step with the tensor named.

use super::layout::{stored_tensors, Family, Source, Stored};
use super::manifest::{Manifest, TensorRecord, MANIFEST_FILE};
use super::state::{TrainingState, STATE_FILE};
use super::store::{safetensors_dtype, StoreError};
use super::{iteration_dir, CheckpointError, LATEST_FILE, RELEASE};
use crate::{Checkpoint, Trainer};
use mmc_ir::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A checkpoint folder found and verified: its manifest and, for a training iteration, its
/// training state.
#[derive(Debug)]
pub struct Located {
    /// The iteration (or release) folder.
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// `None` for converted weights.
    pub state: Option<TrainingState>,
}

impl Located {
    /// Converted weights: weights only, training starts at iteration 0.
    pub fn is_release(&self) -> bool {
        self.manifest.iteration.is_none()
    }

    /// Whether it holds optimizer moments.
    pub fn has_optimizer(&self) -> bool {
        self.manifest.files.iter().any(|f| {
            f.name.starts_with(Family::Optimizer.stem()) && f.name.ends_with(".safetensors")
        })
    }
}

/// Finds the folder to load: `path` itself when it holds a manifest, else the folder its
/// latest file names. `Ok(None)` when `path` is a folder with neither (a first run of a
/// restart loop: nothing saved yet); a latest file that names a missing folder is an error.
/// The folder's files are verified against its manifest.
pub fn locate(path: &Path) -> Result<Option<Located>, CheckpointError> {
    let meta = std::fs::metadata(path).map_err(|error| StoreError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    if !meta.is_dir() {
        return Err(CheckpointError::NotFound {
            dir: path.to_path_buf(),
        });
    }
    let dir = if path.join(MANIFEST_FILE).is_file() {
        path.to_path_buf()
    } else {
        let latest = path.join(LATEST_FILE);
        let text = match std::fs::read_to_string(&latest) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(StoreError::Io {
                    path: latest,
                    error,
                }
                .into())
            }
        };
        let t = text.trim();
        let name = if t == RELEASE {
            RELEASE.to_string()
        } else {
            let n: u64 = t.parse().map_err(|_| CheckpointError::Latest {
                path: latest.clone(),
                message: format!("`{t}` is neither an iteration number nor `release`"),
            })?;
            iteration_dir(n)
        };
        let dir = path.join(name);
        if !dir.join(MANIFEST_FILE).is_file() {
            return Err(CheckpointError::Latest {
                path: latest,
                message: format!(
                    "it names {}, which has no {MANIFEST_FILE} (removed or incomplete)",
                    dir.display()
                ),
            });
        }
        dir
    };
    let manifest = Manifest::read_verified(&dir)?;
    let state = if manifest.iteration.is_some() {
        let p = dir.join(STATE_FILE);
        let text = std::fs::read(&p).map_err(|error| StoreError::Io {
            path: p.clone(),
            error,
        })?;
        let st: TrainingState = serde_json::from_slice(&text).map_err(|e| StoreError::Damaged {
            path: p.clone(),
            message: format!("not a training state: {e}"),
        })?;
        if Some(st.iteration) != manifest.iteration {
            return Err(StoreError::Damaged {
                path: p,
                message: format!(
                    "iteration {} but the manifest says {:?}",
                    st.iteration, manifest.iteration
                ),
            }
            .into());
        }
        Some(st)
    } else {
        None
    };
    Ok(Some(Located {
        dir,
        manifest,
        state,
    }))
}

/// What a load brings into the trainer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Load the optimizer moments (`--no-load-optim`, `--finetune` and converted weights
    /// turn it off).
    pub optimizer: bool,
}

fn describe(dtype: &str, shape: &[usize]) -> String {
    format!("{dtype} {shape:?}")
}

/// Checks the checkpoint's tensors against the trainer's plan, then replaces the trainer's
/// parameters (and optimizer moments, with `options.optimizer`). Nothing is replaced unless
/// every tensor fits. The step count is the caller's: see [`Trainer::set_steps_done`].
pub fn load_into(
    located: &Located,
    trainer: &mut Trainer,
    options: LoadOptions,
) -> Result<(), CheckpointError> {
    let dir = &located.dir;
    if options.optimizer && !located.has_optimizer() {
        return Err(CheckpointError::Missing {
            dir: dir.clone(),
            message: "it holds no optimizer state (saved with --no-save-optim); pass --no-load-optim to start the optimizer afresh".into(),
        });
    }
    let wanted: Vec<Stored> = stored_tensors(trainer.state_specs())
        .into_iter()
        .filter(|s| s.family == Family::Model || options.optimizer)
        .collect();
    let stored: HashMap<&str, &TensorRecord> = located
        .manifest
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut problems = Vec::new();
    for w in &wanted {
        let want_dtype = safetensors_dtype(w.spec.dtype);
        let want = describe(want_dtype, &w.spec.shape);
        match stored.get(w.spec.name.as_str()) {
            None => problems.push(format!(
                "tensor `{}`: missing (the plan needs {want})",
                w.spec.name
            )),
            Some(t) if t.shape != w.spec.shape => problems.push(format!(
                "tensor `{}`: shape {:?} in the checkpoint, the plan needs {:?}",
                w.spec.name, t.shape, w.spec.shape
            )),
            Some(t)
                if t.dtype != want_dtype && !(is_float(&t.dtype) && w.spec.dtype.is_float()) =>
            {
                problems.push(format!(
                    "tensor `{}`: dtype {} in the checkpoint, the plan needs {want_dtype}",
                    w.spec.name, t.dtype
                ))
            }
            Some(_) => {}
        }
    }
    let wanted_names: std::collections::HashSet<&str> =
        wanted.iter().map(|w| w.spec.name.as_str()).collect();
    for t in &located.manifest.tensors {
        let optimizer = t.name.starts_with("adam_");
        if !wanted_names.contains(t.name.as_str()) && (options.optimizer || !optimizer) {
            problems.push(format!(
                "tensor `{}` ({}): not in the plan",
                t.name,
                describe(&t.dtype, &t.shape)
            ));
        }
    }
    if let Some(first) = problems.first() {
        return Err(CheckpointError::Mismatch {
            dir: dir.clone(),
            first: first.clone(),
            more: problems.len() - 1,
        });
    }

    // Every tensor fits: open the files (already verified) and read.
    let mut files = Vec::new();
    let mut where_: BTreeMap<String, usize> = BTreeMap::new();
    for f in &located.manifest.files {
        if !f.name.ends_with(".safetensors") {
            continue;
        }
        let ck = Checkpoint::open(&dir.join(&f.name))?;
        for n in ck.names() {
            where_.insert(n.to_string(), files.len());
        }
        files.push(ck);
    }
    // Set as read, so that at most one tensor is held twice (the files were verified and the
    // tensors checked above, so a failure here is an I/O error).
    let shapes: HashMap<String, Vec<usize>> = trainer
        .state_specs()
        .iter()
        .map(|s| (s.name.clone(), s.ty.shape.clone()))
        .collect();
    for w in &wanted {
        let ck = where_
            .get(&w.spec.name)
            .map(|&i| &files[i])
            .ok_or_else(|| StoreError::Damaged {
                path: dir.join(MANIFEST_FILE),
                message: format!("it lists `{}`, but no file holds it", w.spec.name),
            })?;
        let raw = ck.raw(&w.spec.name)?;
        let to_state = |bytes: &[u8], shape: Vec<usize>| -> Result<Tensor, CheckpointError> {
            let t = Tensor::from_le_bytes(raw.dtype, shape, bytes).map_err(|e| {
                StoreError::Damaged {
                    path: ck.dir().to_path_buf(),
                    message: format!("tensor `{}`: {e}", w.spec.name),
                }
            })?;
            Ok(if t.dtype() == w.spec.dtype {
                t
            } else {
                t.cast(w.spec.dtype)
            })
        };
        match &w.source {
            Source::Plain => {
                let t = to_state(raw.bytes, w.spec.shape.clone())?;
                trainer.set_state(&w.spec.name, t)?;
            }
            Source::Stack(st) => {
                let elem = raw.dtype.size_bytes();
                let block = st.block_len() * elem;
                for (e, names) in st.experts.iter().enumerate() {
                    let parts = st.unblock(&raw.bytes[e * block..(e + 1) * block], elem);
                    for (name, bytes) in names.iter().zip(parts) {
                        let shape = shapes.get(name).cloned().unwrap_or_default();
                        let t = to_state(&bytes, shape)?;
                        trainer.set_state(name, t)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn is_float(safetensors_dtype: &str) -> bool {
    matches!(safetensors_dtype, "F64" | "F32" | "F16" | "BF16")
}
