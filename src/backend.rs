//! The compiled backend's wiring: a plan's programs compiled to kernels for this CPU, and a
//! trainer that replays them.

use anyhow::{Context, Result};
use mmc_codegen::cpu::{compile_programs, CpuTarget, NativeBuild};
use mmc_ir::plan::Plan;
use mmc_runtime::compiled::CompiledRunner;
use mmc_runtime::Trainer;

/// Compiles the plan's programs for `target` (kernels, library, steps).
pub fn compile_native(plan: &Plan, target: &CpuTarget) -> Result<NativeBuild> {
    compile_programs(&plan.programs, target)
        .context("internal error: the plan's programs do not compile to kernels")
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
