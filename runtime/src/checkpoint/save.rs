//! Saving a training iteration crash-safely.
//!
//! An iteration is written into `SAVE/iter_NNNNNNN.partial/`: the `model*` shards, the
//! `optimizer*` shards, `training_state.json`, and last `manifest.json`, each fsynced; then
//! the folder is synced and renamed to `iter_NNNNNNN/`, the save folder synced, and only then
//! is `latest_checkpointed_iteration.txt` replaced by an atomic rename of a fsynced temporary
//! file. A crash at any point leaves the latest file naming the previous complete iteration
//! (or nothing); a `.partial` folder is removed by the next save. Old iterations are pruned
//! (`keep_last`) only after the latest file names the new one. One run writes a save folder
//! at a time.

use super::fault;
use super::layout::{stored_tensors, Family, Source, Stored};
use super::manifest::{Manifest, TensorRecord};
use super::state::{TrainingState, STATE_FILE};
use super::store::{safetensors_dtype, sync_dir, write_file, write_shards, StoreError, TensorSpec};
use super::{iteration_dir, CheckpointError, LATEST_FILE};
use crate::Trainer;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What to save, as Megatron's flags say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    /// Save the AdamW moments (`--no-save-optim` turns it off).
    pub optimizer: bool,
    /// Save the seeds (`--no-save-rng` turns it off).
    pub rng: bool,
    /// Keep only the newest K iterations (`--keep-last K`).
    pub keep_last: Option<usize>,
    /// Largest safetensors shard.
    pub max_shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            optimizer: true,
            rng: true,
            keep_last: None,
            max_shard_bytes: 4 << 30,
        }
    }
}

/// A save folder: where `mmc run --save` writes its iterations.
pub struct Saver {
    dir: PathBuf,
    options: SaveOptions,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| {
        StoreError::Io {
            path: path.to_path_buf(),
            error,
        }
        .into()
    }
}

/// The iteration a save folder's latest file names (`None` when there is none, or it says
/// `release`).
pub fn latest_iteration(dir: &Path) -> Result<Option<u64>, CheckpointError> {
    let path = dir.join(LATEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let t = text.trim();
    if t == super::RELEASE {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| CheckpointError::Latest {
        path,
        message: format!("`{t}` is neither an iteration number nor `release`"),
    })
}

/// Iterations with a complete folder (`iter_NNNNNNN`, no `.partial`), ascending.
fn iterations(dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("iter_")?;
            (n.len() == 7 && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse().ok())
                .flatten()
        })
        .collect();
    out.sort_unstable();
    out
}

impl Saver {
    /// Creates the save folder if needed and checks that it takes files, so that a bad
    /// `--save` stops a run before its first step, not at its first save.
    pub fn new(dir: &Path, options: SaveOptions) -> Result<Saver, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let probe = dir.join(".mmc-save-probe");
        std::fs::File::create(&probe).map_err(io(dir))?;
        let _ = std::fs::remove_file(&probe);
        latest_iteration(dir)?;
        Ok(Saver {
            dir: dir.to_path_buf(),
            options,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves the trainer's state as iteration `state.iteration`, with `state` as its
    /// training state. On failure the partial folder is removed and the error says which
    /// iteration is still the latest complete one.
    pub fn save(
        &self,
        trainer: &Trainer,
        state: &TrainingState,
    ) -> Result<PathBuf, CheckpointError> {
        let iteration = state.iteration;
        let partial = self
            .dir
            .join(format!("{}.partial", iteration_dir(iteration)));
        match self.write(trainer, state, &partial) {
            Ok(p) => Ok(p),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                Err(CheckpointError::Save {
                    iteration,
                    dir: self.dir.clone(),
                    previous: latest_iteration(&self.dir).ok().flatten(),
                    source: Box::new(e),
                })
            }
        }
    }

    fn write(
        &self,
        trainer: &Trainer,
        state: &TrainingState,
        partial: &Path,
    ) -> Result<PathBuf, CheckpointError> {
        let iteration = state.iteration;
        // Partial (and set-aside) folders of earlier crashed saves: this run is the folder's
        // only writer.
        for e in std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("iter_")
                && (name.ends_with(".partial") || name.ends_with(".replaced"))
            {
                let p = e.path();
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
            }
        }
        std::fs::create_dir(partial).map_err(io(partial))?;
        fault::point("before-weights", iteration);

        let stored: Vec<Stored> = stored_tensors(trainer.state_specs())
            .into_iter()
            .filter(|s| s.family == Family::Model || self.options.optimizer)
            .collect();
        let by_name: HashMap<&str, &Stored> =
            stored.iter().map(|s| (s.spec.name.as_str(), s)).collect();
        let mut produce = |spec: &TensorSpec, w: &mut dyn Write| -> Result<(), StoreError> {
            let s = by_name[spec.name.as_str()];
            let err = |error| StoreError::Io {
                path: partial.to_path_buf(),
                error,
            };
            let get = |name: &str| {
                trainer.state(name).ok_or_else(|| StoreError::Damaged {
                    path: partial.to_path_buf(),
                    message: format!("the trainer has no state `{name}`"),
                })
            };
            match &s.source {
                Source::Plain => w.write_all(&get(&spec.name)?.to_le_bytes()).map_err(err),
                Source::Stack(st) => {
                    let elem = spec.dtype.size_bytes();
                    for names in &st.experts {
                        let parts = names
                            .iter()
                            .map(|n| get(n).map(|t| t.to_le_bytes()))
                            .collect::<Result<Vec<_>, _>>()?;
                        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                        w.write_all(&st.block(&refs, elem)).map_err(err)?;
                    }
                    Ok(())
                }
            }
        };

        let mut files = Vec::new();
        let mut first = true;
        for family in [Family::Model, Family::Optimizer] {
            let specs: Vec<TensorSpec> = stored
                .iter()
                .filter(|s| s.family == family)
                .map(|s| s.spec.clone())
                .collect();
            if specs.is_empty() {
                continue;
            }
            if !first {
                fault::point("between-files", iteration);
            }
            first = false;
            let shards = write_shards(
                partial,
                family.stem(),
                &specs,
                self.options.max_shard_bytes,
                &mut produce,
            )?;
            files.extend(shards.files);
        }
        if !self.options.optimizer {
            fault::point("between-files", iteration);
        }
        let mut st = state.clone();
        if !self.options.rng {
            st.rng = None;
        }
        files.push(write_file(
            &partial.join(STATE_FILE),
            &serde_json::to_vec_pretty(&st).expect("a training state serialises"),
        )?);
        let manifest = Manifest {
            format: super::manifest::FORMAT,
            iteration: Some(iteration),
            files,
            tensors: stored
                .iter()
                .map(|s| TensorRecord {
                    name: s.spec.name.clone(),
                    dtype: safetensors_dtype(s.spec.dtype).to_string(),
                    shape: s.spec.shape.clone(),
                })
                .collect(),
            plan_sha256: state.plan_sha256.clone(),
        };
        manifest.write(partial)?;
        sync_dir(partial)?;
        fault::point("before-rename", iteration);

        let done = self.dir.join(iteration_dir(iteration));
        if done.exists() {
            // A complete folder of this iteration from a run that crashed before naming it
            // latest (the latest file names an older one): set aside, then replaced.
            let old = self
                .dir
                .join(format!("{}.replaced", iteration_dir(iteration)));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&done, &old).map_err(io(&done))?;
            std::fs::rename(partial, &done).map_err(io(&done))?;
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            std::fs::rename(partial, &done).map_err(io(&done))?;
        }
        sync_dir(&self.dir)?;
        fault::point("after-rename", iteration);

        let tmp = self.dir.join(format!(".{LATEST_FILE}.tmp"));
        write_file(&tmp, iteration.to_string().as_bytes())?;
        let latest = self.dir.join(LATEST_FILE);
        std::fs::rename(&tmp, &latest).map_err(io(&latest))?;
        sync_dir(&self.dir)?;

        if let Some(k) = self.options.keep_last {
            let older: Vec<u64> = iterations(&self.dir)
                .into_iter()
                .filter(|&n| n < iteration)
                .collect();
            let drop = older.len().saturating_sub(k.saturating_sub(1));
            for n in &older[..drop] {
                let p = self.dir.join(iteration_dir(*n));
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
            }
            if drop > 0 {
                sync_dir(&self.dir)?;
            }
        }
        Ok(done)
    }
}
