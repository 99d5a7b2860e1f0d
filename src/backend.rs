//! The compiled backend's wiring: a plan's programs compiled to kernels for this CPU, and a
//! trainer that replays them.

use anyhow::{Context, Result};
use mmc_codegen::cpu::{compile_programs, CpuTarget, NativeBuild};
use mmc_ir::plan::Plan;
use mmc_runtime::compiled::CompiledRunner;
use mmc_runtime::Trainer;

/// Compiles the plan's programs for `target` (kernels, library, steps). A node without a
/// kernel yet is a [`mmc_codegen::cpu::CpuError::Compile`] at the root of the error.
pub fn compile_native(plan: &Plan, target: &CpuTarget) -> Result<NativeBuild> {
    Ok(compile_programs(&plan.programs, target)?)
}

/// The plan file's name for a CPU target: the architecture, the CPU and its features.
pub fn target_name(target: &CpuTarget) -> String {
    mmc_ir::plan_file::cpu_target(std::env::consts::ARCH, &target.cpu, &target.features)
}

/// The runner of a plan file's compiled programs: the steps decoded, the library written to
/// a private temporary file, checked against its hash and loaded.
pub fn file_runner(
    path: &std::path::Path,
    file: &mmc_ir::plan_file::PlanFile,
    threads: usize,
) -> Result<CompiledRunner> {
    use mmc_codegen::compiled::CompiledSteps;
    let (Some(lib), Some(steps)) = (&file.native, &file.steps) else {
        anyhow::bail!(
            "{}: the plan has no compiled kernels (it was written for the interpreter); run it with `--backend interpreter`, or recompile it with `mmc compile`",
            path.display()
        );
    };
    let steps = CompiledSteps::from_bytes(steps)
        .map_err(|m| anyhow::anyhow!("{}: the plan is damaged: {m}", path.display()))?;
    let extracted = lib
        .extract()
        .with_context(|| format!("{}: cannot unpack its kernels", path.display()))?;
    extracted.check()?;
    // SAFETY: the library is the plan's own (hash-checked); running a plan means trusting
    // it (see the README on untrusted plans). Once loaded, the file may go.
    let r = unsafe {
        CompiledRunner::new(
            extracted.path(),
            lib.sha256(),
            steps.kernels,
            steps.programs,
            threads,
        )
    }
    .with_context(|| format!("{}: cannot load its kernels", path.display()))?;
    Ok(r)
}

/// A runner for `native`, its library written to a private temporary file and loaded only
/// when its SHA-256 is the recorded one.
pub fn runner(native: &NativeBuild, threads: usize) -> Result<CompiledRunner> {
    let dir = tempfile::tempdir().context("cannot create a temporary folder for the kernels")?;
    let so = dir.path().join("kernels.so");
    std::fs::write(&so, &native.library)
        .with_context(|| format!("cannot write {}", so.display()))?;
    // SAFETY: the library was compiled with these programs by this process (or comes from a
    // plan the user chose to run; see the README on untrusted plans). Once loaded, the file
    // may go: the mapping stays.
    let r = unsafe {
        CompiledRunner::new(
            &so,
            &native.sha256,
            native.kernels.clone(),
            native.programs.clone(),
            threads,
        )
    }?;
    Ok(r)
}

/// A trainer over `plan` whose programs run compiled for this CPU.
pub fn compiled_trainer(plan: Plan, threads: usize) -> Result<Trainer> {
    let native = compile_native(&plan, &CpuTarget::host())?;
    let runner = runner(&native, threads)?;
    Ok(Trainer::compiled(plan, runner)?)
}
