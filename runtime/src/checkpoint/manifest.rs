//! The manifest of a checkpoint folder (`release/` or `iter_0000050/`): what it holds, so that a
//! load can check every file before reading any, and know the logical tensors without opening
//! the shards.
//!
//! `manifest.json` is written after every other file of the folder and lists them all with
//! their size and SHA-256; a truncated or corrupted file is then named at load. Fields that
//! only some checkpoints have (the iteration, the plan's hash, training state) are optional, so
//! a converted checkpoint and a training iteration share one format, and readers accept
//! manifests with fields they do not know.

use super::store::{safetensors_dtype, verify_files, write_file, FileRecord, StoreError};
use mmc_ir::DType;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The name of the manifest inside a checkpoint folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The version of the format this mmc writes and reads.
pub const FORMAT: u32 = 1;

/// One stored logical tensor (unsharded): its name, safetensors dtype (`BF16`, `F32`, ...) and
/// shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl TensorRecord {
    /// The record of a tensor of this dtype and shape.
    pub fn new(name: &str, dtype: DType, shape: &[usize]) -> TensorRecord {
        TensorRecord {
            name: name.to_string(),
            dtype: safetensors_dtype(dtype).to_string(),
            shape: shape.to_vec(),
        }
    }
}

/// The contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`]; a reader refuses other versions rather than misread them.
    pub format: u32,
    /// The training iteration saved; `None` (written as `null`) for converted weights.
    #[serde(default)]
    pub iteration: Option<u64>,
    /// The SHA-256 of the plan that trained these weights, for information only: any plan
    /// whose logical tensors match may load them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
    /// Every other file of the folder, with its size and SHA-256.
    pub files: Vec<FileRecord>,
    /// The logical tensors of the model shards (names as stored, experts stacked).
    pub tensors: Vec<TensorRecord>,
}

impl Manifest {
    /// Reads `dir/manifest.json`; a missing, unreadable or malformed manifest, or another
    /// format version, is an error naming the file.
    pub fn read(dir: &Path) -> Result<Manifest, StoreError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|error| StoreError::Io {
            path: path.clone(),
            error,
        })?;
        let damaged = |message: String| StoreError::Damaged {
            path: path.clone(),
            message,
        };
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| damaged(format!("not a valid manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(damaged(format!(
                "format {} is not the format {FORMAT} this mmc reads",
                m.format
            )));
        }
        if let Some(f) = m
            .files
            .iter()
            .find(|f| f.name.contains('/') || f.name.contains('\\') || f.name == "..")
        {
            return Err(damaged(format!(
                "file `{}` is not a plain name inside the folder",
                f.name
            )));
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` (fsynced); call it after every file it lists is on disk.
    pub fn write(&self, dir: &Path) -> Result<FileRecord, StoreError> {
        let text = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        write_file(&dir.join(MANIFEST_FILE), &text)
    }

    /// Reads the manifest and checks every file it lists: what a load does before reading any
    /// tensor.
    pub fn read_verified(dir: &Path) -> Result<Manifest, StoreError> {
        let m = Manifest::read(dir)?;
        m.verify(dir, |_| true)?;
        Ok(m)
    }

    /// Checks the size and SHA-256 of each listed file for which `wanted(name)` holds (a
    /// conversion reads only the model shards, not the optimizer's); the first damaged file
    /// is named.
    pub fn verify(&self, dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<(), StoreError> {
        let files: Vec<FileRecord> = self
            .files
            .iter()
            .filter(|f| wanted(&f.name))
            .cloned()
            .collect();
        verify_files(dir, &files)
    }
}

/// The dtype of a safetensors dtype name, as [`safetensors_dtype`] writes it.
pub fn dtype_from_safetensors(name: &str) -> Option<DType> {
    DType::ALL
        .into_iter()
        .find(|&d| safetensors_dtype(d) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_accepts_fields_it_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        let rec = write_file(&dir.path().join("a.bin"), b"hello").unwrap();
        let m = Manifest {
            format: FORMAT,
            iteration: None,
            plan_sha256: None,
            files: vec![rec],
            tensors: vec![TensorRecord::new("w", DType::BF16, &[2, 3])],
        };
        m.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(text.contains("\"iteration\": null"), "{text}");
        assert!(!text.contains("plan_sha256"), "{text}");
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        m.verify(dir.path(), |_| true).unwrap();
        // A later writer's extra fields are read past.
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["training_state"] = "training_state.json".into();
        json["iteration"] = 50.into();
        std::fs::write(dir.path().join(MANIFEST_FILE), json.to_string()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap().iteration, Some(50));
        std::fs::write(dir.path().join("a.bin"), b"hellO").unwrap();
        let e = m.verify(dir.path(), |_| true).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("corrupted"), "{e}");
        m.verify(dir.path(), |n| n != "a.bin").unwrap();
        assert_eq!(dtype_from_safetensors("BF16"), Some(DType::BF16));
        assert_eq!(dtype_from_safetensors("U8"), None);
        assert!(Manifest::read_verified(dir.path()).is_err());
    }

    #[test]
    fn a_foreign_or_malformed_manifest_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for (text, want) in [
            (
                r#"{"format": 2, "iteration": 1, "files": [], "tensors": []}"#,
                "format 2",
            ),
            ("{", "not a valid manifest"),
            (
                r#"{"format": 1, "iteration": 1, "files": [{"name": "../x", "bytes": 1, "sha256": ""}], "tensors": []}"#,
                "not a plain name",
            ),
        ] {
            std::fs::write(dir.path().join(MANIFEST_FILE), text).unwrap();
            let e = Manifest::read(dir.path()).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(MANIFEST_FILE), "{e}");
        }
    }
}
