//! `mmc run`: replay a plan on training data.

use crate::console::Console;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mmc_ir::plan::Plan;
use mmc_runtime::data::{DataLoader, DataPosition};
use mmc_runtime::metrics::{peak_memory_bytes, MetricsWriter, StepMetrics};
use mmc_runtime::tensor_batches::TensorBatches;
use mmc_runtime::{MicroBatch, TrainError, Trainer};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Global batches of nothing but padding that may follow one another before the data is
/// called unusable.
const MAX_EMPTY_IN_A_ROW: u32 = 100;

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

/// Checks, before any work, that a file can be written at `path` (its folder exists and
/// takes new files, and it is not a folder itself), so that a typo in an output path is
/// found before training, not after the last step. `flag` names the option in errors.
pub fn check_output_path(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() {
        bail!("{flag} {}: is a folder; give a file name", path.display());
    }
    if path.exists() {
        // Opening for appending changes nothing in the file.
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("{flag} {}: cannot write", path.display()))?;
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{flag} {}: the folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let probe = dir.join(format!(".{}.mmc-probe", name.unwrap_or_default()));
    std::fs::File::create(&probe).with_context(|| {
        format!(
            "{flag} {}: cannot write in {}",
            path.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Opens `--data`: a tensor file or a data.json, never a bare annotation file.
fn open_source(args: &RunArgs, plan: &Plan, console: &Console) -> Result<Source> {
    let ext = args
        .data
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("safetensors") => {
            let tile = plan.settings.model.tile_size.map(|t| [3, t, t]);
            return Ok(Source::Tensors(TensorBatches::open(
                &args.data,
                &plan.settings,
                tile,
            )?));
        }
        Some("jsonl") => bail!(
            "--data {}: this is a chat annotation file; pass a MindSpeed-MM data.json whose dataset_param.basic_parameters.data_path names it (configs/demo/data.json is an example)",
            args.data.display()
        ),
        _ => {}
    }
    console.err(&format!("reading {}", args.data.display()));
    let loader = DataLoader::open(&args.data, &plan.settings, DataPosition { sample: 0 })?;
    let ignored = &loader.config().ignored_keys;
    if !ignored.is_empty() {
        console.err(&format!(
            "{}: keys mmc does not use (ignored): {}",
            args.data.display(),
            ignored.join(", ")
        ));
    }
    console.err(&format!(
        "{} samples in {} dataset(s)",
        loader.samples_per_epoch(),
        loader.config().sources.len()
    ));
    Ok(Source::Chat(Box::new(loader)))
}

pub fn run(args: &RunArgs) -> Result<()> {
    let mut console = Console::default();
    if let Some(p) = &args.plot {
        if !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")) {
            bail!(
                "--plot {}: mmc draws the loss curve as SVG only; give a file name ending in .svg",
                p.display()
            );
        }
        check_output_path(p, "--plot")?;
    }
    if let Some(p) = &args.metrics {
        check_output_path(p, "--metrics")?;
    }
    let plan = Plan::read(&args.plan)?;
    let mut source = open_source(args, &plan, &console)?;
    let train_iters = args
        .train_iters
        .unwrap_or_else(|| source.steps_per_epoch(&plan));
    if train_iters == 0 {
        bail!("--train-iters must be at least 1");
    }
    let schedule = plan.settings.schedule.clone();
    let mut metrics = match &args.metrics {
        Some(p) => Some(
            MetricsWriter::create(p)
                .with_context(|| format!("--metrics: cannot create {}", p.display()))?,
        ),
        None => None,
    };

    console.err(&format!(
        "initialising the state of {}",
        args.plan.display()
    ));
    let mut trainer = Trainer::new(plan)?;
    console.err(&format!(
        "training {train_iters} step(s) on {}; {} MiB of state",
        args.data.display(),
        trainer.state_bytes() / (1 << 20)
    ));

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
    // Global batches drawn, and those with no token at all (skipped without a step).
    let (mut drawn, mut empty_batches, mut skipped_micro) = (0u64, 0u64, 0usize);
    for i in 0..train_iters {
        let step = i + 1;
        let lr = schedule.lr_at(step, train_iters);
        let t0 = Instant::now();
        let mut in_a_row = 0;
        let (out, tokens) = loop {
            let (micro_batches, tokens) = source
                .next(drawn)
                .with_context(|| format!("step {step}: reading data"))?;
            drawn += 1;
            match trainer.train_step(&micro_batches, lr) {
                Err(TrainError::EmptyGlobalBatch { .. }) if in_a_row < MAX_EMPTY_IN_A_ROW => {
                    empty_batches += 1;
                    in_a_row += 1;
                }
                r => break (r.with_context(|| format!("step {step}"))?, tokens),
            }
        };
        skipped_micro += out.skipped_micro_batches;
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
            bar.suspend(|| console.out(&m.line(train_iters)));
        }
        bar.set_message(format!("loss {:.4}", m.loss));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if skipped_micro > 0 || empty_batches > 0 {
        console.err(&format!(
            "warning: {skipped_micro} micro-batch(es) held only padding and were skipped; {empty_batches} global batch(es) held no token at all and were skipped without a step"
        ));
    }
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        console.out(&format!(
            "done: {train_iters} step(s) in {:.1} s; loss {:.6} -> {:.6}",
            started.elapsed().as_secs_f64(),
            first.1,
            last.1
        ));
    }
    if let Source::Chat(l) = &source {
        let c = l.counts();
        console.out(&format!(
            "data: {} sample(s) trained on, {} skipped as too long for the plan (seq_length / max_tiles), {} text sample(s) truncated, {} bad sample(s) skipped, {} dropped at epoch ends (drop_last)",
            c.used, c.skipped_too_long, c.truncated, c.bad, c.dropped_last
        ));
        for w in &l.warnings {
            console.err(&format!("warning: skipped {w}"));
        }
    }
    if let Some(p) = &args.plot {
        crate::plot::loss_svg(p, &losses)?;
        console.out(&format!("loss curve written to {}", p.display()));
    }
    Ok(())
}
