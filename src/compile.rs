//! `mmc compile`: model TOML to plan.

use anyhow::{Context, Result};
use mmc::driver::compile as compile_model;
use mmc_frontend::config::TargetKind;
use mmc_frontend::Config;
use mmc_ir::plan::StateKind;
use mmc_ir::summary::grouped;
use std::path::Path;

/// `cpu_from_cli`: `--target cpu` was given, which overrides the TOML's `[target] kind`.
pub fn compile(
    model: &Path,
    output: &Path,
    emit_dir: Option<&Path>,
    cpu_from_cli: bool,
) -> Result<()> {
    let mut cfg = Config::load(model)?;
    if cpu_from_cli {
        cfg.target.kind = TargetKind::Cpu;
    }
    crate::run::check_output_path(output, "-o")?;
    if output.exists() && !output.is_file() {
        anyhow::bail!(
            "-o {}: not a regular file; the plan is written beside it and renamed into place",
            output.display()
        );
    }
    if let Some(dir) = emit_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--emit-dir: cannot create {}", dir.display()))?;
    }
    let compiled = compile_model(&cfg)?;
    let plan = compiled.plan;
    let train = &cfg.train;
    let accum = plan.settings.grad_accum_steps;
    let mut console = crate::console::Console::default();
    if let Some(why) = compiled.unbuilt {
        console.out(&compiled.report.to_string());
        console.out(&memory_summary(&plan, "one CPU device, no sharding"));
        anyhow::bail!("{why}; no plan was written");
    }
    let file = native_plan_file(&plan, &mut console)?;
    file.write(output)?;

    if let Some(dir) = emit_dir {
        for p in &plan.programs {
            let path = dir.join(format!("{}.mmcir", p.name));
            std::fs::write(&path, mmc_ir::text::print(&p.graph))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }

    let (mut params, mut trained, mut state_bytes) = (0u64, 0u64, 0u64);
    for s in &plan.state {
        state_bytes += s.ty.size_bytes() as u64;
        if let StateKind::Parameter { trainable } = s.kind {
            params += s.ty.numel() as u64;
            if trainable {
                trained += s.ty.numel() as u64;
            }
        }
    }
    let programs: Vec<String> = plan
        .programs
        .iter()
        .map(|p| {
            format!(
                "{} ({} nodes)",
                p.name,
                grouped(p.graph.nodes().len() as u64)
            )
        })
        .collect();
    console.out(&format!(
        "compiled {} -> {}: {}; {} parameters ({} trained), {} MiB of state, {} micro-batch(es) of {} x {} per step",
        model.display(),
        output.display(),
        programs.join(", "),
        grouped(params),
        grouped(trained),
        state_bytes / (1 << 20),
        accum,
        train.micro_batch_size,
        train.seq_length
    ));
    console.out(&compiled.report.to_string());
    console.out(&memory_summary(&plan, "one CPU device"));
    Ok(())
}

/// The plan's memory, in GB (1e9 bytes): the persistent state by kind, and each program's
/// activation arena, both as a device backend lays them out (declared dtypes) and as the
/// interpreter does (8 bytes per element).
fn memory_summary(plan: &mmc_ir::plan::Plan, device: &str) -> String {
    let (mut weights, mut grads, mut moments) = (0u64, 0u64, 0u64);
    for s in &plan.state {
        let b = s.ty.size_bytes() as u64;
        match s.kind {
            StateKind::Parameter { .. } => weights += b,
            StateKind::GradAccumulator => grads += b,
            StateKind::OptimizerMoment => moments += b,
        }
    }
    let gb = |b: u64| b as f64 / 1e9;
    let mut out = format!(
        "memory plan ({device}): weights {:.3} GB, gradients {:.3} GB, optimizer state {:.3} GB",
        gb(weights),
        gb(grads),
        gb(moments)
    );
    for p in &plan.programs {
        let streamed = mmc_passes::memory::update_values(&p.graph, p);
        let declared = mmc_passes::memory::plan_memory_streaming(
            &p.graph,
            mmc_ir::DType::size_bytes,
            &streamed,
        );
        out.push_str(&format!(
            "; {} arena {:.3} GB",
            p.name,
            gb(declared.arena_bytes())
        ));
        if let Some(layout) = &p.memory {
            out.push_str(&format!(" ({:.3} GB in the interpreter)", gb(layout.size)));
        }
    }
    out
}

/// The plan file `mmc compile` writes: the plan with its programs compiled to kernels for
/// this CPU (native code and steps), or, when some node has no kernel yet, the plan for the
/// interpreter alone, with a note saying which node.
fn native_plan_file(
    plan: &mmc_ir::plan::Plan,
    console: &mut crate::console::Console,
) -> Result<mmc_ir::plan_file::PlanFile> {
    use mmc_codegen::compiled::{CompileError, CompiledSteps};
    use mmc_codegen::cpu::{CpuError, CpuTarget};
    use mmc_ir::plan_file::{NativeLibrary, PlanFile};
    let target = CpuTarget::host();
    let started = std::time::Instant::now();
    match mmc::backend::compile_native(plan, &target) {
        Ok(native) => {
            let kernels = native.kernels.len();
            // What the runtime allocates, once for all programs.
            let (arena, scratch) = mmc_codegen::compiled::shared_regions(&native.programs);
            let each: Vec<String> = native
                .programs
                .iter()
                .map(|p| format!("{} {:.3} GB", p.name, p.arena_bytes as f64 / 1e9))
                .collect();
            let file = PlanFile {
                plan: plan.clone(),
                target: mmc::backend::target_name(&target),
                native: Some(NativeLibrary::new(native.library)),
                steps: Some(
                    CompiledSteps {
                        programs: native.programs,
                        kernels: native.kernels,
                    }
                    .to_bytes(),
                ),
            };
            console.out(&format!(
                "kernels: {kernels} compiled for {} in {:.1} s; compiled arena {:.3} GB ({}; state updates written in place take none) and kernel scratch {:.3} GB, shared by the programs",
                file.target,
                started.elapsed().as_secs_f64(),
                arena as f64 / 1e9,
                each.join(", "),
                scratch as f64 / 1e9
            ));
            Ok(file)
        }
        Err(e) => match e.downcast_ref::<CpuError>() {
            Some(CpuError::Compile(why @ CompileError::Node { .. })) => {
                console.out(&format!(
                    "note: no CPU kernels in this plan ({why}); it runs on the interpreter (`mmc run --backend interpreter`)"
                ));
                Ok(PlanFile::interpreter(plan.clone()))
            }
            _ => Err(e),
        },
    }
}
