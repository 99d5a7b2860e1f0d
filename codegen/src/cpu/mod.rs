//! The CPU backend: kernels compiled ahead of time by LLVM for the host, linked into a shared
//! library, loaded with `libloading`.
//!
//! The target machine is the host's CPU with its features (AVX2, AVX-512 where present), so
//! LLVM's vectorisers use the widest vectors the machine has; [`CpuTarget::portable`] builds
//! for baseline x86-64 instead. A kernel runs a range of its tiles;
//! [`crate::native::KernelLibrary::launch`] spreads the tiles over threads, and the generated
//! code calls nothing but libm. Loading and launching need no LLVM (`crate::native`).

mod lower;
mod lower_loops;

pub use lower::LowerError;

use crate::kernel::GeneratedKernel;
use crate::native::{file_sha256, NativeError};
use inkwell::context::Context;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine,
};
use inkwell::OptimizationLevel;
use std::path::Path;
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
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Compile(#[from] crate::compiled::CompileError),
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
pub fn llvm_ir(kernels: &[GeneratedKernel], target: &CpuTarget) -> Result<String, CpuError> {
    let cx = Context::create();
    let tm = machine(target)?;
    let module = build_module(&cx, &tm, kernels)?;
    Ok(module.print_to_string().to_string())
}

fn build_module<'ctx>(
    cx: &'ctx Context,
    tm: &TargetMachine,
    kernels: &[GeneratedKernel],
) -> Result<inkwell::module::Module<'ctx>, CpuError> {
    let module = cx.create_module("mmc_kernels");
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    for k in kernels {
        match k {
            GeneratedKernel::Elementwise(k) => lower::lower(cx, &module, k)?,
            GeneratedKernel::Loop(k) => lower_loops::lower_loop(cx, &module, k)?,
        }
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
    kernels: &[GeneratedKernel],
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
    Ok(file_sha256(path)?)
}

/// A plan's programs compiled for a CPU: their steps, the kernel table, and the shared
/// library holding the kernels, with its SHA-256 (which the plan records).
pub struct NativeBuild {
    pub programs: Vec<crate::compiled::CompiledProgram>,
    pub kernels: Vec<crate::native::KernelEntry>,
    pub library: Vec<u8>,
    pub sha256: String,
    pub target: CpuTarget,
}

/// Compiles scheduled programs for `target`: lowers every node, compiles the kernels with
/// LLVM and links them into a library (in memory; the plan carries it).
pub fn compile_programs(
    programs: &[mmc_ir::plan::Program],
    target: &CpuTarget,
) -> Result<NativeBuild, CpuError> {
    let mut compiler = crate::compiled::Compiler::default();
    let programs = programs
        .iter()
        .map(|p| compiler.program(p))
        .collect::<Result<Vec<_>, _>>()?;
    let dir = tempfile::tempdir().map_err(|e| CpuError::Link(e.to_string()))?;
    let so = dir.path().join("kernels.so");
    let sha256 = build_library(&compiler.kernels, target, &so)?;
    let library = std::fs::read(&so).map_err(|e| CpuError::Link(e.to_string()))?;
    Ok(NativeBuild {
        programs,
        kernels: compiler.kernels.iter().map(Into::into).collect(),
        library,
        sha256,
        target: target.clone(),
    })
}
