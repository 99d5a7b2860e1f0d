//! `mmc run`: replay a plan on training data.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mmc_ir::plan::Plan;
use mmc_runtime::data::{DataLoader, DataPosition};
use mmc_runtime::metrics::{peak_memory_bytes, MetricsWriter, StepMetrics};
use mmc_runtime::tensor_batches::TensorBatches;
use mmc_runtime::{MicroBatch, Trainer};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

pub struct RunArgs {
    pub plan: PathBuf,
    pub data: PathBuf,
    pub train_iters: Option<u64>,
    pub log_interval: u64,
    pub metrics: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

/// Where global batches come from.
enum Source {
    /// Pre-tokenised tensors.
    Tensors(TensorBatches),
    /// data.json: the chat data pipeline.
    Chat(Box<DataLoader>),
}

impl Source {
    fn next(&mut self, index: u64) -> Result<(Vec<MicroBatch>, usize)> {
        Ok(match self {
            Source::Tensors(t) => t.global_batch(index),
            Source::Chat(l) => l.next_global_batch()?,
        })
    }

    /// Optimizer steps in one pass over the data (an estimate for packed chat data).
    fn steps_per_epoch(&self, plan: &Plan) -> u64 {
        match self {
            Source::Tensors(t) => t.batches_per_epoch(),
            Source::Chat(l) => {
                let per_step =
                    (plan.settings.micro_batch_size * plan.settings.grad_accum_steps) as u64;
                l.samples_per_epoch().div_ceil(per_step).max(1)
            }
        }
    }
}

pub fn run(args: &RunArgs) -> Result<()> {
    let plan = Plan::read(&args.plan)?;
    let is_tensors = args
        .data
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let mut source = if is_tensors {
        let tile = plan.settings.model.tile_size.map(|t| [3, t, t]);
        Source::Tensors(TensorBatches::open(&args.data, &plan.settings, tile)?)
    } else {
        eprintln!("reading {}", args.data.display());
        let loader = DataLoader::open(&args.data, &plan.settings, DataPosition { sample: 0 })?;
        let ignored = &loader.config().ignored_keys;
        if !ignored.is_empty() {
            eprintln!(
                "{}: keys mmc does not use (ignored): {}",
                args.data.display(),
                ignored.join(", ")
            );
        }
        eprintln!(
            "{} samples in {} dataset(s)",
            loader.samples_per_epoch(),
            loader.config().sources.len()
        );
        Source::Chat(Box::new(loader))
    };
    let train_iters = args
        .train_iters
        .unwrap_or_else(|| source.steps_per_epoch(&plan));
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
        "training {train_iters} step(s) on {}; {} MiB of state",
        args.data.display(),
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
    let mut losses = Vec::with_capacity(train_iters as usize);
    for i in 0..train_iters {
        let step = i + 1;
        let lr = schedule.lr_at(step, train_iters);
        let t0 = Instant::now();
        let (micro_batches, tokens) = source
            .next(i)
            .with_context(|| format!("step {step}: reading data"))?;
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
        losses.push((step, m.loss));
        if let Some(w) = metrics.as_mut() {
            w.write(&m)
                .with_context(|| format!("cannot write {}", w.path().display()))?;
        }
        if step % args.log_interval == 0 || step == train_iters {
            bar.suspend(|| println!("{}", m.line(train_iters)));
        }
        bar.set_message(format!("loss {:.4}", m.loss));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        println!(
            "done: {train_iters} step(s) in {:.1} s; loss {:.6} -> {:.6}",
            started.elapsed().as_secs_f64(),
            first.1,
            last.1
        );
    }
    if let Source::Chat(l) = &source {
        let c = l.counts();
        println!(
            "data: {} sample(s) trained on, {} skipped as too long for the plan (seq_length / max_tiles), {} text sample(s) truncated, {} bad sample(s) skipped",
            c.used, c.skipped_too_long, c.truncated, c.bad
        );
        for w in &l.warnings {
            eprintln!("warning: skipped {w}");
        }
    }
    if let Some(p) = &args.plot {
        crate::plot::loss_svg(p, &losses)?;
        println!("loss curve written to {}", p.display());
    }
    Ok(())
}
