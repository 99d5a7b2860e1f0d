//! Writing safetensors shards tensor by tensor, and the manifest that lets a load find any
//! damage: each file's size and SHA-256.
//!
//! A safetensors header lists every tensor's offsets, so a shard's tensors are planned first
//! (names, dtypes, shapes) and their bytes then streamed in that order by a producer; nothing
//! but the tensor being produced is held in memory. Every file is fsynced before the call
//! returns.

use mmc_ir::DType;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Why a checkpoint could not be written or read back. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Damaged { path: PathBuf, message: String },
    #[error(
        "tensor `{name}`: the producer wrote {wrote} bytes, but its dtype and shape take {want}"
    )]
    Size { name: String, wrote: u64, want: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// A tensor to be written: its name, dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_bytes()) as u64
    }
}

/// A written file: its name inside the folder, its size and its SHA-256 (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The safetensors name of a dtype.
pub fn safetensors_dtype(d: DType) -> &'static str {
    match d {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::Bool => "BOOL",
    }
}

/// SHA-256 on a thread of its own, fed in chunks of [`BackgroundSha::CHUNK`] bytes: hashing
/// costs about as much as producing and writing a checkpoint's bytes, so the two overlap. At
/// most [`BackgroundSha::DEPTH`] chunks wait, which bounds the memory it takes.
struct BackgroundSha {
    pending: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<Sha256>>,
}

impl BackgroundSha {
    const CHUNK: usize = 1 << 20;
    const DEPTH: usize = 4;

    fn new() -> BackgroundSha {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(Self::DEPTH);
        let thread = std::thread::spawn(move || {
            let mut hash = Sha256::new();
            for chunk in rx {
                hash.update(&chunk);
            }
            hash
        });
        BackgroundSha {
            pending: Vec::with_capacity(Self::CHUNK),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn send(&mut self) {
        let full = std::mem::replace(&mut self.pending, Vec::with_capacity(Self::CHUNK));
        if let Some(tx) = &self.tx {
            // The thread only stops when the sender is dropped, so this cannot fail.
            let _ = tx.send(full);
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (Self::CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == Self::CHUNK {
                self.send();
            }
        }
    }

    /// The hex digest of everything fed in.
    fn finish(mut self) -> String {
        self.send();
        self.tx = None;
        let hash = self
            .thread
            .take()
            .expect("the thread is joined once")
            .join()
            .expect("hashing does not panic");
        hex(&hash.finalize())
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W: Write> {
    inner: W,
    hash: BackgroundSha,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Splits tensors (in order) into shards of at most `max_bytes` each; a tensor larger than
/// that gets a shard of its own.
pub fn plan_shards(specs: &[TensorSpec], max_bytes: u64) -> Vec<Vec<TensorSpec>> {
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut size = 0;
    for s in specs {
        if shards.is_empty() || (size + s.bytes() > max_bytes && size > 0) {
            shards.push(Vec::new());
            size = 0;
        }
        size += s.bytes();
        shards.last_mut().expect("a shard is open").push(s.clone());
    }
    shards
}

/// Writes one safetensors file holding `specs`, whose bytes `produce` writes in order.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    produce: &mut dyn FnMut(&TensorSpec, &mut dyn Write) -> Result<(), StoreError>,
) -> Result<FileRecord, StoreError> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for s in specs {
        let end = offset + s.bytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype(s.dtype),
                "shape": s.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut text = serde_json::to_vec(&header).expect("a header serialises");
    // safetensors pads the header with spaces to a multiple of 8 bytes.
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let file = File::create(path).map_err(io(path))?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: BackgroundSha::new(),
        bytes: 0,
    };
    w.write_all(&(text.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(&text))
        .map_err(io(path))?;
    for s in specs {
        let before = w.bytes;
        produce(s, &mut w)?;
        let wrote = w.bytes - before;
        if wrote != s.bytes() {
            return Err(StoreError::Size {
                name: s.name.clone(),
                wrote,
                want: s.bytes(),
            });
        }
    }
    w.flush().map_err(io(path))?;
    let Hashing { inner, hash, bytes } = w;
    let file = inner.into_inner().map_err(|e| StoreError::Io {
        path: path.to_path_buf(),
        error: e.into_error(),
    })?;
    file.sync_all().map_err(io(path))?;
    Ok(FileRecord {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes,
        sha256: hash.finish(),
    })
}

/// What [`write_shards`] wrote: the files, and which file holds each tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shards {
    pub files: Vec<FileRecord>,
    pub weight_map: BTreeMap<String, String>,
}

/// Writes `specs` into `dir` as `<stem>.safetensors`, or as `<stem>-00001-of-0000N.safetensors`
/// shards of at most `max_shard_bytes` plus `<stem>.safetensors.index.json` (the HF layout, so
/// that [`crate::Checkpoint::open`] and transformers read it).
pub fn write_shards(
    dir: &Path,
    stem: &str,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    produce: &mut dyn FnMut(&TensorSpec, &mut dyn Write) -> Result<(), StoreError>,
) -> Result<Shards, StoreError> {
    let shards = plan_shards(specs, max_shard_bytes);
    let n = shards.len();
    let mut out = Shards::default();
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            format!("{stem}.safetensors")
        } else {
            format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let rec = write_safetensors(&dir.join(&name), shard, produce)?;
        for s in shard {
            out.weight_map.insert(s.name.clone(), name.clone());
        }
        out.files.push(rec);
    }
    if n > 1 {
        let total: u64 = specs.iter().map(TensorSpec::bytes).sum();
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": out.weight_map,
        });
        let path = dir.join(format!("{stem}.safetensors.index.json"));
        out.files.push(write_file(
            &path,
            &serde_json::to_vec_pretty(&index).expect("an index serialises"),
        )?);
    }
    Ok(out)
}

/// Writes a small file and fsyncs it.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<FileRecord, StoreError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(FileRecord {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(bytes)),
    })
}

/// Makes the entries of a folder (new files, renames) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that each recorded file in `dir` has its size and SHA-256; the first that does not
/// (in the order of `files`) is named, with what is wrong. Sizes are checked first, so a
/// truncated file is found without reading the others; the files are then hashed on up to as
/// many threads as the machine has cores, since hashing a large checkpoint is what a load waits
/// for.
pub fn verify_files(dir: &Path, files: &[FileRecord]) -> Result<(), StoreError> {
    for f in files {
        let path = dir.join(&f.name);
        let meta = std::fs::metadata(&path).map_err(io(&path))?;
        if meta.len() != f.bytes {
            return Err(StoreError::Damaged {
                path,
                message: format!(
                    "{} bytes, but the manifest records {} (truncated or overwritten)",
                    meta.len(),
                    f.bytes
                ),
            });
        }
    }
    let check = |f: &FileRecord| -> Result<(), StoreError> {
        let path = dir.join(&f.name);
        let mut hash = Sha256::new();
        let mut file = File::open(&path).map_err(io(&path))?;
        std::io::copy(&mut file, &mut hash).map_err(io(&path))?;
        if hex(&hash.finalize()) != f.sha256 {
            return Err(StoreError::Damaged {
                path,
                message: "its contents do not match the SHA-256 in the manifest (corrupted)".into(),
            });
        }
        Ok(())
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, Result<(), StoreError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break };
                        out.push((i, check(f)));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("hashing does not panic"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().try_for_each(|(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
        }
    }

    #[test]
    fn shards_hold_at_most_their_size_and_a_large_tensor_gets_its_own() {
        let s = [spec("a", 10), spec("b", 10), spec("c", 30), spec("d", 5)];
        let names = |sh: Vec<Vec<TensorSpec>>| -> Vec<Vec<String>> {
            sh.into_iter()
                .map(|v| v.into_iter().map(|t| t.name).collect())
                .collect()
        };
        assert_eq!(
            names(plan_shards(&s, 80)),
            [vec!["a", "b"], vec!["c"], vec!["d"]]
        );
        assert_eq!(names(plan_shards(&s, 1 << 20)), [vec!["a", "b", "c", "d"]]);
    }

    #[test]
    fn written_shards_read_back_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [spec("a", 3), spec("b", 20), spec("c", 2)];
        let mut produce = |s: &TensorSpec, w: &mut dyn Write| -> Result<(), StoreError> {
            let v: Vec<u8> = (0..s.shape[0] as u32)
                .flat_map(|i| (i as f32 + s.name.len() as f32).to_le_bytes())
                .collect();
            w.write_all(&v).map_err(|error| StoreError::Io {
                path: PathBuf::from(&s.name),
                error,
            })
        };
        let out = write_shards(dir.path(), "model", &specs, 40, &mut produce).unwrap();
        assert_eq!(out.files.len(), 4, "3 shards and the index");
        let ck = crate::Checkpoint::open(dir.path()).unwrap();
        let b = ck.read("b", DType::F32).unwrap();
        assert_eq!(b.to_f64_vec()[19], 20.0);
        verify_files(dir.path(), &out.files).unwrap();
        // A flipped byte and a truncation are named.
        let f = dir.path().join(&out.files[1].name);
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&f, &bytes).unwrap();
        let e = verify_files(dir.path(), &out.files)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model-00002-of-00003.safetensors") && e.contains("corrupted"),
            "{e}"
        );
        std::fs::write(&f, &bytes[..10]).unwrap();
        let e = verify_files(dir.path(), &out.files)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn a_producer_that_writes_the_wrong_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut produce = |_: &TensorSpec, w: &mut dyn Write| -> Result<(), StoreError> {
            w.write_all(&[0; 3]).map_err(|error| StoreError::Io {
                path: PathBuf::new(),
                error,
            })
        };
        let e = write_shards(dir.path(), "m", &[spec("a", 2)], 100, &mut produce).unwrap_err();
        assert!(matches!(e, StoreError::Size { .. }), "{e}");
    }
}
