//! The CPU backend: kernels compiled ahead of time by LLVM for the host, linked into a shared
//! library, loaded with `libloading`.
//!
//! The target machine is the host's CPU with its features (AVX2, AVX-512 where present), so
//! LLVM's vectorisers use the widest vectors the machine has; [`CpuTarget::portable`] builds
//! for baseline x86-64 instead. A kernel runs a range of its tiles; [`KernelLibrary::launch`]
//! spreads the tiles over threads, and the generated code calls nothing but libm.

mod lower;

pub use lower::LowerError;

use crate::kernel::Kernel;
use inkwell::context::Context;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine,
};
use inkwell::OptimizationLevel;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Failures of building or loading a kernel library.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error("LLVM: {0}")]
    Llvm(String),
    #[error("linking the kernel library with `cc`: {0}")]
    Link(String),
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
}

/// Which CPU the kernels are compiled for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuTarget {
    pub cpu: String,
    pub features: String,
}

impl CpuTarget {
    /// The machine compiling: its CPU and every feature it has.
    pub fn host() -> CpuTarget {
        CpuTarget {
            cpu: TargetMachine::get_host_cpu_name().to_string(),
            features: TargetMachine::get_host_cpu_features().to_string(),
        }
    }

    /// Baseline x86-64 (SSE2), for a plan that must run on any x86-64 machine.
    pub fn portable() -> CpuTarget {
        CpuTarget {
            cpu: "x86-64".into(),
            features: String::new(),
        }
    }
}

fn machine(target: &CpuTarget) -> Result<TargetMachine, CpuError> {
    Target::initialize_native(&InitializationConfig::default()).map_err(CpuError::Llvm)?;
    let triple = TargetMachine::get_default_triple();
    let t = Target::from_triple(&triple).map_err(|e| CpuError::Llvm(e.to_string()))?;
    t.create_target_machine(
        &triple,
        &target.cpu,
        &target.features,
        OptimizationLevel::Aggressive,
        RelocMode::PIC,
        CodeModel::Default,
    )
    .ok_or_else(|| CpuError::Llvm(format!("no target machine for {}", target.cpu)))
}

/// The LLVM IR of `kernels`, optimised, as text (for `--emit-dir` and tests).
pub fn llvm_ir(kernels: &[Kernel], target: &CpuTarget) -> Result<String, CpuError> {
    let cx = Context::create();
    let tm = machine(target)?;
    let module = build_module(&cx, &tm, kernels)?;
    Ok(module.print_to_string().to_string())
}

fn build_module<'ctx>(
    cx: &'ctx Context,
    tm: &TargetMachine,
    kernels: &[Kernel],
) -> Result<inkwell::module::Module<'ctx>, CpuError> {
    let module = cx.create_module("mmc_kernels");
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    for k in kernels {
        lower::lower(cx, &module, k)?;
    }
    module
        .verify()
        .map_err(|e| CpuError::Llvm(format!("the generated module does not verify: {e}")))?;
    module
        .run_passes("default<O3>", tm, PassBuilderOptions::create())
        .map_err(|e| CpuError::Llvm(e.to_string()))?;
    Ok(module)
}

/// Compiles `kernels` into the shared library `path` (an object written by LLVM, linked with
/// `cc -shared`), and returns the library's SHA-256, which a plan records.
pub fn build_library(
    kernels: &[Kernel],
    target: &CpuTarget,
    path: &Path,
) -> Result<String, CpuError> {
    let cx = Context::create();
    let tm = machine(target)?;
    let module = build_module(&cx, &tm, kernels)?;
    let dir = tempfile::tempdir().map_err(|e| CpuError::Link(e.to_string()))?;
    let obj = dir.path().join("kernels.o");
    tm.write_to_file(&module, FileType::Object, &obj)
        .map_err(|e| CpuError::Llvm(e.to_string()))?;
    let out = Command::new("cc")
        .arg("-shared")
        .arg("-o")
        .arg(path)
        .arg(&obj)
        .arg("-lm")
        .output()
        .map_err(|e| CpuError::Link(e.to_string()))?;
    if !out.status.success() {
        return Err(CpuError::Link(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    file_sha256(path)
}

/// The SHA-256 of a file, in hex.
pub fn file_sha256(path: &Path) -> Result<String, CpuError> {
    let bytes = std::fs::read(path).map_err(|e| CpuError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The signature every generated kernel has: its buffers, and the range of tiles to run.
type KernelFn = unsafe extern "C" fn(*const *mut u8, i64, i64);

/// A loaded kernel library: the kernels, callable by index.
pub struct KernelLibrary {
    _lib: libloading::Library,
    fns: Vec<(KernelFn, Kernel)>,
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
    /// The library is native code: it must be one [`build_library`] wrote from `kernels`. A
    /// plan from an untrusted source must not be run, as with pickled checkpoints; the hash
    /// check only guards against a library changed after the plan was written.
    pub unsafe fn load(
        path: &Path,
        sha256: &str,
        kernels: Vec<Kernel>,
    ) -> Result<KernelLibrary, CpuError> {
        let got = file_sha256(path)?;
        if got != sha256 {
            return Err(CpuError::Hash {
                path: path.to_path_buf(),
                want: sha256.to_string(),
                got,
            });
        }
        let err = |e: libloading::Error| CpuError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        // SAFETY: the caller vouches for the library (see above).
        let lib = unsafe { libloading::Library::new(path) }.map_err(err)?;
        let mut fns = Vec::with_capacity(kernels.len());
        for k in kernels {
            // SAFETY: every generated kernel has the `KernelFn` signature.
            let f: KernelFn = unsafe { *lib.get::<KernelFn>(k.name.as_bytes()).map_err(err)? };
            fns.push((f, k));
        }
        Ok(KernelLibrary { _lib: lib, fns })
    }

    /// The kernels, in library order.
    pub fn kernels(&self) -> impl Iterator<Item = &Kernel> {
        self.fns.iter().map(|(_, k)| k)
    }

    /// Runs kernel `index` over all its tiles, spread over `threads` threads.
    ///
    /// # Safety
    /// `buffers` holds one pointer per buffer of the kernel, each to as many elements of its
    /// dtype as the buffer's shape has (bools as one byte each), and the written buffer
    /// overlaps no read buffer unless the kernel reads it contiguously (in place).
    pub unsafe fn launch(
        &self,
        index: usize,
        buffers: &[*mut u8],
        threads: usize,
    ) -> Result<(), CpuError> {
        let (f, k) = &self.fns[index];
        if buffers.len() != k.buffers.len() {
            return Err(CpuError::Arity {
                index,
                want: k.buffers.len(),
                got: buffers.len(),
            });
        }
        let tiles = k.tiles();
        let threads = threads.clamp(1, tiles.max(1));
        let args = Buffers(buffers.as_ptr());
        if threads == 1 {
            // SAFETY: the caller's contract.
            unsafe { f(args.0, 0, tiles as i64) };
            return Ok(());
        }
        let per = tiles.div_ceil(threads);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (begin, end) = (t * per, ((t + 1) * per).min(tiles));
                if begin >= end {
                    continue;
                }
                let f = *f;
                s.spawn(move || {
                    let a = args;
                    // SAFETY: the caller's contract; threads run disjoint tiles.
                    unsafe { f(a.0, begin as i64, end as i64) }
                });
            }
        });
        Ok(())
    }
}
