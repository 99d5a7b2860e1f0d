//! `mmc run`: replay a plan on training data.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mmc_ir::plan::Plan;
use mmc_runtime::metrics::{peak_memory_bytes, MetricsWriter, StepMetrics};
use mmc_runtime::tensor_batches::TensorBatches;
use mmc_runtime::Trainer;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

pub struct RunArgs {
    pub plan: PathBuf,
    pub data: PathBuf,
    pub train_iters: Option<u64>,
    pub log_interval: u64,
    pub metrics: Option<PathBuf>,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let plan = Plan::read(&args.plan)?;
    let is_tensors = args
        .data
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !is_tensors {
        bail!(
            "{}: data.json training data is not built yet; give a .safetensors file with input_ids and labels",
            args.data.display()
        );
    }
    let tile = plan.settings.model.tile_size.map(|t| [3, t, t]);
    let data = TensorBatches::open(&args.data, &plan.settings, tile)?;
    let train_iters = args.train_iters.unwrap_or_else(|| data.batches_per_epoch());
    if train_iters == 0 {
        bail!("--train-iters must be at least 1");
    }
    let schedule = plan.settings.schedule.clone();
    let mut metrics = match &args.metrics {
        Some(p) => Some(
            MetricsWriter::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => None,
    };

    eprintln!("initialising the state of {}", args.plan.display());
    let mut trainer = Trainer::new(plan)?;
    eprintln!(
        "training {train_iters} step(s) on {} ({} rows); {} MiB of state",
        args.data.display(),
        data.rows(),
        trainer.state_bytes() / (1 << 20)
    );

    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(train_iters);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut first_loss = None;
    let mut last = None;
    for i in 0..train_iters {
        let step = i + 1;
        let lr = schedule.lr_at(step, train_iters);
        let t0 = Instant::now();
        let (micro_batches, tokens) = data.global_batch(i);
        let out = trainer
            .train_step(&micro_batches, lr)
            .with_context(|| format!("step {step}"))?;
        let secs = t0.elapsed().as_secs_f64();
        let m = StepMetrics {
            step,
            loss: out.loss,
            lm_loss: out.lm_loss,
            aux_loss: out.aux_loss,
            grad_norm: out.grad_norm,
            lr,
            tokens,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            step_ms: secs * 1e3,
            peak_memory_bytes: peak_memory_bytes(),
        };
        if !m.loss.is_finite() {
            bail!("step {step}: the loss is {} (diverged); stopping", m.loss);
        }
        first_loss.get_or_insert(m.loss);
        if let Some(w) = metrics.as_mut() {
            w.write(&m)
                .with_context(|| format!("cannot write {}", w.path().display()))?;
        }
        if step % args.log_interval == 0 || step == train_iters {
            bar.suspend(|| println!("{}", m.line(train_iters)));
        }
        bar.set_message(format!("loss {:.4}", m.loss));
        bar.inc(1);
        last = Some(m);
    }
    bar.finish_and_clear();
    if let (Some(first), Some(last)) = (first_loss, last) {
        println!(
            "done: {train_iters} step(s) in {:.1} s; loss {first:.6} -> {:.6}",
            started.elapsed().as_secs_f64(),
            last.loss
        );
    }
    Ok(())
}
