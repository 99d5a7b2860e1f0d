//! Loading and launching a kernel library: what the runtime needs of generated code, without
//! LLVM (a plan is compiled once and replayed on machines that need not have it).

use crate::kernel::GeneratedKernel;
use crate::loops::out_of_range_buffer;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What the runtime needs of a kernel to launch it: its symbol, tiles and buffer shapes (for
/// the arity check and error messages); the kernel IR itself stays at compile time.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelEntry {
    pub name: String,
    pub tiles: usize,
    /// Each buffer's dtype and shape.
    pub buffers: Vec<(mmc_ir::DType, Vec<usize>)>,
}

impl From<&GeneratedKernel> for KernelEntry {
    fn from(k: &GeneratedKernel) -> Self {
        KernelEntry {
            name: k.name().to_string(),
            tiles: k.tiles(),
            buffers: k
                .buffers()
                .iter()
                .map(|b| (b.dtype, b.shape.clone()))
                .collect(),
        }
    }
}

impl From<GeneratedKernel> for KernelEntry {
    fn from(k: GeneratedKernel) -> Self {
        KernelEntry::from(&k)
    }
}

/// Failures of loading a kernel library or of a kernel run.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("loading the kernel library {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("the kernel library {path} has SHA-256 {got}, the plan records {want}: refusing to run a changed library")]
    Hash {
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error("kernel {index} takes {want} buffers, got {got}")]
    Arity {
        index: usize,
        want: usize,
        got: usize,
    },
    /// A checked access out of range: data (a token id, an expert id, offsets) outside what
    /// the plan's shapes allow. The kernel stopped before touching the memory.
    #[error("kernel `{kernel}` read or wrote element outside buffer {buffer} ({shape:?}): an index in the data is out of range")]
    OutOfRange {
        kernel: String,
        buffer: usize,
        shape: Vec<usize>,
    },
    /// A library call refused its data (GEMM offsets out of order, say).
    #[error("library call: {0}")]
    Library(String),
    #[error("kernel `{kernel}` returned unknown status {code}")]
    Status { kernel: String, code: i64 },
}

/// The SHA-256 of a file, in hex.
pub fn file_sha256(path: &Path) -> Result<String, NativeError> {
    let bytes = std::fs::read(path).map_err(|e| NativeError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The signature every generated kernel has: its buffers and the range of tiles to run, to a
/// status (0, or a checked access's buffer + 1).
type KernelFn = unsafe extern "C" fn(*const *mut u8, i64, i64) -> i64;

/// A loaded kernel library: the kernels, callable by index.
pub struct KernelLibrary {
    _lib: libloading::Library,
    fns: Vec<(KernelFn, KernelEntry)>,
}

/// A buffer pointer that may cross to a worker thread: the tiles a thread runs write only
/// their own elements, so concurrent launches over disjoint tiles do not race.
#[derive(Clone, Copy)]
struct Buffers(*const *mut u8);
// SAFETY: see the type's documentation; the pointers outlive the scoped threads.
unsafe impl Send for Buffers {}
unsafe impl Sync for Buffers {}

impl KernelLibrary {
    /// Loads the library at `path`, whose SHA-256 must be `sha256` (a changed library is
    /// refused, not run), with the kernels it was built from.
    ///
    /// # Safety
    /// The library is native code: it must be one `crate::cpu::build_library` wrote from `kernels`. A
    /// plan from an untrusted source must not be run, as with pickled checkpoints; the hash
    /// check only guards against a library changed after the plan was written.
    pub unsafe fn load(
        path: &Path,
        sha256: &str,
        kernels: Vec<impl Into<KernelEntry>>,
    ) -> Result<KernelLibrary, NativeError> {
        let got = file_sha256(path)?;
        if got != sha256 {
            return Err(NativeError::Hash {
                path: path.to_path_buf(),
                want: sha256.to_string(),
                got,
            });
        }
        let err = |e: libloading::Error| NativeError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        // SAFETY: the caller vouches for the library (see above).
        let lib = unsafe { libloading::Library::new(path) }.map_err(err)?;
        let mut fns = Vec::with_capacity(kernels.len());
        for k in kernels {
            let k: KernelEntry = k.into();
            // SAFETY: every generated kernel has the `KernelFn` signature.
            let f: KernelFn = unsafe { *lib.get::<KernelFn>(k.name.as_bytes()).map_err(err)? };
            fns.push((f, k));
        }
        Ok(KernelLibrary { _lib: lib, fns })
    }

    /// The kernels, in library order.
    pub fn kernels(&self) -> impl Iterator<Item = &KernelEntry> {
        self.fns.iter().map(|(_, k)| k)
    }

    /// Runs kernel `index` over all its tiles, spread over the threads of `pool`.
    ///
    /// # Safety
    /// `buffers` holds one pointer per buffer of the kernel, each to as many elements of its
    /// dtype as the buffer's shape has (bools as one byte each), and the written buffers
    /// overlap no read buffer unless the kernel reads them elementwise in place.
    pub unsafe fn launch(
        &self,
        index: usize,
        buffers: &[*mut u8],
        pool: &rayon::ThreadPool,
    ) -> Result<(), NativeError> {
        let (f, k) = &self.fns[index];
        if buffers.len() != k.buffers.len() {
            return Err(NativeError::Arity {
                index,
                want: k.buffers.len(),
                got: buffers.len(),
            });
        }
        let tiles = k.tiles;
        let threads = pool.current_num_threads().clamp(1, tiles.max(1));
        let args = Buffers(buffers.as_ptr());
        let status = if threads == 1 {
            // SAFETY: the caller's contract.
            unsafe { f(args.0, 0, tiles as i64) }
        } else {
            let per = tiles.div_ceil(threads);
            // SAFETY: the caller's contract; the parts run disjoint tiles.
            pool.install(|| unsafe { run_parts(*f, args, (0, tiles), per, threads) })
        };
        match status {
            0 => Ok(()),
            code => {
                match out_of_range_buffer(code).and_then(|b| k.buffers.get(b).map(|x| (b, x))) {
                    Some((buffer, (_, shape))) => Err(NativeError::OutOfRange {
                        kernel: k.name.clone(),
                        buffer,
                        shape: shape.clone(),
                    }),
                    None => Err(NativeError::Status {
                        kernel: k.name.clone(),
                        code,
                    }),
                }
            }
        }
    }
}

/// Runs `f` over tiles `range` split into `parts` ranges of `per` tiles (the last shorter),
/// halving by `rayon::join` so the parts run on the pool's threads without a heap allocation
/// per launch (a spawned job would box itself); the first non-zero status wins.
///
/// # Safety
/// As for [`KernelLibrary::launch`]: `args` are the kernel's buffers.
unsafe fn run_parts(
    f: KernelFn,
    args: Buffers,
    range: (usize, usize),
    per: usize,
    parts: usize,
) -> i64 {
    let (begin, end) = range;
    if begin >= end {
        return 0;
    }
    if parts <= 1 {
        // SAFETY: the caller's contract.
        return unsafe { f(args.0, begin as i64, end as i64) };
    }
    let half = parts / 2;
    let mid = (begin + half * per).min(end);
    // SAFETY: the two halves cover disjoint tiles.
    let (a, b) = rayon::join(
        || unsafe { run_parts(f, args, (begin, mid), per, half) },
        || unsafe { run_parts(f, args, (mid, end), per, parts - half) },
    );
    if a != 0 {
        a
    } else {
        b
    }
}
