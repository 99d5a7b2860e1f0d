//! `manifest.json`: the last file written into an iteration (or release) folder. It lists every
//! other file with its size and SHA-256, so that a load finds a truncated or corrupted file and
//! names it, and the logical tensors (names, dtypes, unsharded shapes), so that a checkpoint is
//! checked against a plan before any tensor is read.

use super::store::{verify_files, write_file, FileRecord, StoreError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The format this version of mmc writes and reads.
pub const FORMAT: u32 = 1;

/// One stored tensor: its name in the files (experts stacked), dtype and unsharded shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTensor {
    pub name: String,
    /// The safetensors name of the dtype (`F32`, `BF16`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// What an iteration folder holds: written last, so its presence means the folder is
/// complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Optimizer steps done; `None` for converted weights (`release`).
    pub iteration: Option<u64>,
    /// Every other file of the folder.
    pub files: Vec<FileRecord>,
    /// The logical tensors, model and optimizer.
    pub tensors: Vec<StoredTensor>,
    /// The SHA-256 of the plan that trained it (from the plan's header), for information only.
    #[serde(default)]
    pub plan_sha256: Option<String>,
}

impl Manifest {
    /// Writes `dir/manifest.json` and fsyncs it.
    pub fn write(&self, dir: &Path) -> Result<FileRecord, StoreError> {
        let text = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        write_file(&dir.join(MANIFEST_FILE), &text)
    }

    /// Reads `dir/manifest.json` and checks every file it lists (size and SHA-256), so that
    /// a damaged checkpoint is refused, naming the file, before anything is loaded.
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
            .map_err(|e| damaged(format!("not a checkpoint manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(damaged(format!(
                "format {} (this mmc reads format {FORMAT})",
                m.format
            )));
        }
        if let Some(f) = m
            .files
            .iter()
            .find(|f| Path::new(&f.name).file_name() != Some(std::ffi::OsStr::new(&f.name)))
        {
            return Err(damaged(format!(
                "the file `{}` is not a plain name inside the folder",
                f.name
            )));
        }
        verify_files(dir, &m.files)?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_reads_back_and_names_a_damaged_or_foreign_one() {
        let dir = tempfile::tempdir().unwrap();
        let rec = write_file(&dir.path().join("a.bin"), b"abc").unwrap();
        let m = Manifest {
            format: FORMAT,
            iteration: Some(3),
            files: vec![rec],
            tensors: vec![StoredTensor {
                name: "w".into(),
                dtype: "F32".into(),
                shape: vec![2],
            }],
            plan_sha256: None,
        };
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        // Converted weights: no iteration, no plan.
        let text = r#"{"format": 1, "iteration": null, "files": [], "tensors": []}"#;
        std::fs::write(dir.path().join(MANIFEST_FILE), text).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap().iteration, None);
        for (text, want) in [
            (
                r#"{"format": 2, "iteration": 1, "files": [], "tensors": []}"#,
                "format 2",
            ),
            ("{", "not a checkpoint manifest"),
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
