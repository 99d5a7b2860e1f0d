//! `mmc run`: replay a plan on training data.

use crate::console::Console;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mmc_ir::plan::Plan;
use mmc_runtime::checkpoint::load::{load_into, locate, LoadOptions};
use mmc_runtime::checkpoint::save::{SaveOptions, Saver};
use mmc_runtime::checkpoint::state::{DataState, RngState, TrainingState};
use mmc_runtime::data::{DataLoader, DataPosition};
use mmc_runtime::metrics::{peak_memory_bytes, MetricsWriter, StepMetrics, Throughput};
use mmc_runtime::tensor_batches::TensorBatches;
use mmc_runtime::{MicroBatch, TrainError, Trainer};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    pub checkpoint: CheckpointArgs,
    /// Run the plan's compiled kernels (`Some(true)`), the reference interpreter
    /// (`Some(false)`), or the kernels when the plan has them (`None`).
    pub compiled: Option<bool>,
    /// Threads of the compiled backend (default: every core).
    pub threads: Option<usize>,
    /// Time every compiled step after the first training step and print where the time went.
    pub profile: bool,
}

/// What a failed save does to the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSaveError {
    /// Stop with the error (the default: a run that cannot save is usually on a full disk).
    Stop,
    /// Print the error as a warning and train on; the save after the last step still stops
    /// the run with its error.
    Continue,
}

/// Saving and resuming, with Megatron's flags.
#[derive(Clone, Debug)]
pub struct CheckpointArgs {
    pub save: Option<PathBuf>,
    pub save_interval: Option<u64>,
    pub load: Option<PathBuf>,
    pub save_optim: bool,
    pub save_rng: bool,
    pub load_optim: bool,
    pub load_rng: bool,
    pub finetune: bool,
    pub exit_signal_handler: bool,
    pub keep_last: Option<usize>,
    pub on_save_error: OnSaveError,
}

impl CheckpointArgs {
    /// Flags that only make sense together, checked before any work.
    fn check(&self) -> Result<()> {
        let no_save = self.save.is_none();
        for (given, flag) in [
            (self.save_interval.is_some(), "--save-interval"),
            (self.keep_last.is_some(), "--keep-last"),
            (self.exit_signal_handler, "--exit-signal-handler"),
        ] {
            if given && no_save {
                bail!("{flag} needs --save DIR (where to save)");
            }
        }
        if self.save_interval == Some(0) {
            bail!("--save-interval must be at least 1 (it saves every N steps)");
        }
        if self.keep_last == Some(0) {
            bail!("--keep-last must be at least 1 (the newest iteration is always kept)");
        }
        Ok(())
    }
}

/// The SHA-256 of the plan file, for the checkpoint's information (its header covers every
/// section's hash, but the whole file is what `sha256sum` shows).
fn plan_sha256(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|b| mmc_ir::plan_file::sha256_hex(&b))
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

    /// Samples trained on so far, for data.json (packed samples each count); `None` for
    /// tensor data, whose samples are the rows of each global batch.
    fn samples_used(&self) -> Option<u64> {
        match self {
            Source::Tensors(_) => None,
            Source::Chat(l) => Some(l.counts().used),
        }
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
fn open_source(
    args: &RunArgs,
    plan: &Plan,
    console: &Console,
    start: DataPosition,
) -> Result<Source> {
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
    let loader = DataLoader::open(&args.data, &plan.settings, start)?;
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

/// Rows of one global batch: micro-batch rows times micro-batches.
fn plan_rows_per_step(trainer: &Trainer) -> usize {
    let s = &trainer.plan().settings;
    s.micro_batch_size * s.grad_accum_steps
}

/// The progress bar's message after a step, short enough for the bar to fit an 80-column
/// terminal: loss, speed, time per iteration and, with MoE layers, the worst layer's max/mean
/// expert load.
fn bar_message(m: &StepMetrics) -> String {
    let per_it = if m.step_ms >= 1e3 {
        format!("{:.1} s/it", m.step_ms / 1e3)
    } else {
        format!("{:.0} ms/it", m.step_ms)
    };
    let mut msg = format!("loss {:.4}, {:.0} tok/s, {per_it}", m.loss, m.tokens_per_s);
    if let Some((_, x)) = m.expert_load.worst() {
        msg.push_str(&format!(", experts max/mean {x:.2}"));
    }
    msg
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
    let ck = &args.checkpoint;
    ck.check()?;
    let file = mmc_ir::plan_file::PlanFile::read(&args.plan)?;
    let use_compiled = args.compiled.unwrap_or(file.native.is_some());
    if use_compiled {
        let host = mmc::backend::target_name(&mmc_codegen::cpu::CpuTarget::host());
        file.check_target(&args.plan, &host)?;
    } else if args.threads.is_some() {
        bail!("--threads sets the compiled backend's threads; the interpreter runs on one (with multi-threaded matmuls)");
    } else if args.profile {
        bail!("--profile times the compiled backend's steps; it has no effect on the interpreter");
    }
    let plan = file.plan.clone();
    // The op of each node of each program, for the profile.
    let ops: HashMap<String, Vec<&'static str>> = plan
        .programs
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.graph.nodes().iter().map(|n| n.op.name()).collect(),
            )
        })
        .collect();
    let plan_sha = plan_sha256(&args.plan);
    let plan_seed = plan.settings.seed;

    // The checkpoint to resume from, verified (files against the manifest) before any work.
    let located = match &ck.load {
        // A restart loop passes the same folder to --save and --load from the first run on.
        Some(dir) if !dir.exists() && ck.save.as_ref() == Some(dir) => {
            console.err(&format!(
                "warning: --load {}: no checkpoint saved there yet; starting from the plan's initial state",
                dir.display()
            ));
            None
        }
        Some(dir) => {
            let l = locate(dir).with_context(|| format!("--load {}", dir.display()))?;
            if l.is_none() {
                console.err(&format!(
                    "warning: --load {}: no checkpoint saved there yet; starting from the plan's initial state",
                    dir.display()
                ));
            }
            l
        }
        None => None,
    };
    // A training iteration resumes (step, data position, optimizer); converted weights and
    // --finetune load the weights only.
    let resume = located
        .as_ref()
        .filter(|_| !ck.finetune)
        .and_then(|l| l.state.clone());
    let start_iteration = resume.as_ref().map_or(0, |s| s.iteration);
    let is_data_json = !args
        .data
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let (start, mut drawn) = match resume.as_ref().map(|s| s.data) {
        None => (DataPosition { sample: 0 }, 0),
        Some(DataState::DataJson { sample }) if is_data_json => (DataPosition { sample }, 0),
        Some(DataState::Tensors { global_batch }) if !is_data_json => {
            (DataPosition { sample: 0 }, global_batch)
        }
        Some(_) => bail!(
            "--load: the checkpoint's data position is for {} data, but --data {} is not; resume on the same data, or pass --finetune to start the data afresh",
            if is_data_json { "tensor" } else { "data.json" },
            args.data.display()
        ),
    };
    let mut source = open_source(args, &plan, &console, start)?;
    let data_seed = match &source {
        Source::Chat(l) => Some(l.config().seed.unwrap_or(plan_seed)),
        Source::Tensors(_) => None,
    };
    if let (Some(st), true) = (&resume, ck.load_rng) {
        match st.rng {
            None => bail!(
                "--load: the checkpoint holds no RNG state (saved with --no-save-rng); pass --no-load-rng to go on with this run's seeds"
            ),
            Some(r) if r.data_seed != data_seed => bail!(
                "--load: the checkpoint's data seed is {:?}, this run's is {:?}, so the data would not continue where it stopped; use the same seed, or pass --no-load-rng to go on with the new one",
                r.data_seed,
                data_seed
            ),
            Some(_) => {}
        }
    }
    let saver = match &ck.save {
        Some(dir) => Some(
            Saver::new(
                dir,
                SaveOptions {
                    optimizer: ck.save_optim,
                    rng: ck.save_rng,
                    keep_last: ck.keep_last,
                    ..SaveOptions::default()
                },
            )
            .with_context(|| format!("--save {}", dir.display()))?,
        ),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    if ck.exit_signal_handler {
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&stop))
                .context("--exit-signal-handler: cannot install the signal handler")?;
        }
    }
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
    let mut trainer = if use_compiled {
        let threads = args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let runner = mmc::backend::file_runner(&args.plan, &file, threads)?;
        console.err(&format!(
            "backend: compiled kernels for {}, {threads} thread(s)",
            file.target
        ));
        Trainer::compiled(plan, runner)?
    } else {
        console.err("backend: the reference interpreter");
        Trainer::new(plan)?
    };
    drop(file);
    if let Some(l) = &located {
        let optimizer = ck.load_optim && resume.is_some();
        load_into(l, &mut trainer, LoadOptions { optimizer })
            .with_context(|| format!("--load {}", l.dir.display()))?;
        trainer.set_steps_done(start_iteration);
        console.err(&format!(
            "loaded {} ({}{})",
            l.dir.display(),
            if resume.is_some() {
                format!("iteration {start_iteration}")
            } else {
                "weights only, iteration 0".to_string()
            },
            if optimizer {
                ", with the optimizer state"
            } else {
                ""
            }
        ));
    }
    if start_iteration >= train_iters {
        console.out(&format!(
            "the checkpoint is at iteration {start_iteration} and --train-iters is {train_iters}: nothing to train"
        ));
        return Ok(());
    }
    let save_state = |trainer: &Trainer, source: &Source, drawn: u64| TrainingState {
        iteration: trainer.steps_done(),
        data: match source {
            Source::Chat(l) => DataState::DataJson {
                sample: l.position().sample,
            },
            Source::Tensors(_) => DataState::Tensors {
                global_batch: drawn,
            },
        },
        rng: Some(RngState {
            data_seed,
            plan_seed,
        }),
        plan_sha256: plan_sha.clone(),
    };
    console.err(&format!(
        "training {} step(s) on {}; {} MiB of state",
        train_iters - start_iteration,
        args.data.display(),
        trainer.state_bytes() / (1 << 20)
    ));

    // On a terminal a bar (step, loss, speed, ETA) on standard error; otherwise only the
    // plain step lines. Every line of the run goes through the console, around the bar.
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(train_iters);
        b.set_position(start_iteration);
        b.reset_eta();
        b.set_style(
            ProgressStyle::with_template("{wide_bar} {pos}/{len} [{elapsed}<{eta}] {msg}")
                .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    console.set_bar(bar.clone());
    let rows_per_step = plan_rows_per_step(&trainer);
    let started = Instant::now();
    let mut losses = Vec::with_capacity(train_iters as usize);
    let mut throughput = Throughput::default();
    // Global batches drawn, and those with no token at all (skipped without a step).
    let (mut empty_batches, mut skipped_micro) = (0u64, 0usize);
    for i in start_iteration..train_iters {
        let step = i + 1;
        let lr = schedule.lr_at(step, train_iters);
        let t0 = Instant::now();
        let samples_before = source.samples_used();
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
        let samples = match (samples_before, source.samples_used()) {
            (Some(before), Some(after)) => (after - before) as usize,
            _ => rows_per_step,
        };
        throughput.record(step, secs, samples, tokens);
        if args.profile && i == start_iteration {
            // The first step is warm-up (page faults, the pool starting): not profiled.
            if let Some(r) = trainer.compiled_runner_mut() {
                r.start_profile();
            }
        }
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
            expert_imbalance: out.expert_load.imbalances(),
            expert_load: out.expert_load,
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
            console.out(&m.line(train_iters));
        }
        bar.set_message(bar_message(&m));
        bar.inc(1);
        let signalled = stop.load(Ordering::SeqCst);
        if let Some(saver) = &saver {
            let last = step == train_iters;
            if last || signalled || args.checkpoint.save_interval.is_some_and(|n| step % n == 0) {
                match saver.save(&trainer, &save_state(&trainer, &source, drawn)) {
                    Ok(p) => console.err(&format!("saved iteration {step} to {}", p.display())),
                    Err(e) if ck.on_save_error == OnSaveError::Continue && !last && !signalled => {
                        console.err(&format!("warning: {e}; training goes on"))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if signalled {
            console.out(&format!(
                "stopping after step {step} on a termination signal (--exit-signal-handler)"
            ));
            break;
        }
    }
    console.clear_bar();
    if skipped_micro > 0 || empty_batches > 0 {
        console.err(&format!(
            "warning: {skipped_micro} micro-batch(es) held only padding and were skipped; {empty_batches} global batch(es) held no token at all and were skipped without a step"
        ));
    }
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        console.out(&format!(
            "done: {} step(s) in {:.1} s; loss {:.6} -> {:.6}",
            losses.len(),
            started.elapsed().as_secs_f64(),
            first.1,
            last.1
        ));
    }
    if let Some(t) = throughput.summary() {
        console.out(&t.line(started.elapsed().as_secs_f64()));
    }
    if args.profile {
        match trainer.compiled_runner().map(|r| r.profile()) {
            Some(times) if !times.is_empty() => console.out(&profile_report(&times, &ops)),
            _ => console.out("profile: no step after the first (warm-up) one was timed"),
        }
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

/// Where the compiled steps' time went: the total per op (in each program), then the slowest
/// steps, as `mmc run --profile` prints them.
fn profile_report(
    times: &[mmc_runtime::compiled::StepTime],
    ops: &HashMap<String, Vec<&'static str>>,
) -> String {
    let op = |t: &mmc_runtime::compiled::StepTime| {
        ops.get(&t.program)
            .and_then(|o| o.get(t.node as usize))
            .copied()
            .unwrap_or("?")
    };
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    let runs = times.iter().map(|t| t.runs).max().unwrap_or(1).max(1);
    let mut by_op: HashMap<(String, &'static str), (f64, usize)> = HashMap::new();
    for t in times {
        let e = by_op.entry((t.program.clone(), op(t))).or_default();
        e.0 += t.seconds;
        e.1 += 1;
    }
    let mut by_op: Vec<_> = by_op.into_iter().collect();
    by_op.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut out = format!(
        "profile: {:.1} ms of compiled steps per run of the programs (mean over {runs} run(s) after the first step)\n",
        total * 1e3 / runs as f64
    );
    out.push_str("  by op (program, op: ms per run, share, steps):\n");
    for ((program, op), (secs, steps)) in by_op.iter().take(20) {
        out.push_str(&format!(
            "    {program:<10} {op:<38} {:>9.2} ms {:>5.1}% {steps:>5}\n",
            secs * 1e3 / runs as f64,
            100.0 * secs / total.max(1e-12)
        ));
    }
    out.push_str("  slowest steps (program, step, node, op, callee: ms per run):\n");
    for t in times.iter().take(12) {
        out.push_str(&format!(
            "    {:<10} {:>5} n{:<6} {:<38} {:>9.2} ms  {}\n",
            t.program,
            t.step,
            t.node,
            op(t),
            t.seconds * 1e3 / t.runs.max(1) as f64,
            t.callee
        ));
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use super::bar_message;
    use mmc_runtime::metrics::{ExpertLoad, StepMetrics};

    #[test]
    fn the_bar_message_is_short_and_names_the_expert_load() {
        let mut load = ExpertLoad::default();
        load.add(0, &[30, 10, 0, 0]).unwrap();
        let mut m = StepMetrics {
            step: 3,
            loss: 11.69479,
            lm_loss: 11.6,
            aux_loss: 2.0,
            grad_norm: 1.9,
            lr: 5e-3,
            tokens: 160,
            tokens_per_s: 15.93,
            step_ms: 10049.0,
            peak_memory_bytes: 0,
            expert_imbalance: load.imbalances(),
            expert_load: load,
        };
        assert_eq!(
            bar_message(&m),
            "loss 11.6948, 16 tok/s, 10.0 s/it, experts max/mean 3.00"
        );
        m.step_ms = 812.4;
        m.expert_load = ExpertLoad::default();
        assert_eq!(bar_message(&m), "loss 11.6948, 16 tok/s, 812 ms/it");
    }
}
