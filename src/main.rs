//! The `mmc` command line: parses arguments and calls the crates. No logic lives here.

mod compile;
mod console;
mod plot;
mod run;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mmc::driver::{dump_ir as dump_ir_text, DumpFormat, DumpPoint};
use mmc_frontend::Config;
use mmc_ir::Stage;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// mmc compiles InternVL3.5 / Qwen3-MoE fine-tuning into a static plan and runs it.
#[derive(Parser)]
#[command(name = "mmc", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a model TOML into an execution plan.
    Compile {
        /// The model TOML (architecture, [train], [parallel], [target]).
        model: PathBuf,
        /// Where to write the plan.
        #[arg(short, long, default_value = "plan.bin")]
        output: PathBuf,
        /// The target to compile for; overrides the TOML's `[target] kind` (default: that, or
        /// cpu). Only cpu is built yet.
        #[arg(long, value_enum)]
        target: Option<Target>,
        /// Also write each program of the plan as IR text (`<program>.mmcir`) into this
        /// folder. Kernel sources join them with code generation.
        #[arg(long)]
        emit_dir: Option<PathBuf>,
    },
    /// Train with a compiled plan.
    Run {
        /// The plan written by `mmc compile`.
        plan: PathBuf,
        /// The training data: a MindSpeed-MM data.json (which names the chat JSONL files), or
        /// a .safetensors file of token rows.
        #[arg(long)]
        data: PathBuf,
        /// Number of optimizer steps (default: one pass over the data).
        #[arg(long)]
        train_iters: Option<u64>,
        /// Folder for checkpoints: `iter_NNNNNNN/` every --save-interval steps and after the
        /// last step, and `latest_checkpointed_iteration.txt`.
        #[arg(long)]
        save: Option<PathBuf>,
        /// Save every N steps (and after the last); without it, --save saves after the last
        /// step only.
        #[arg(long)]
        save_interval: Option<u64>,
        /// Resume from a save folder (the iteration its latest file names), one iteration
        /// folder, or converted weights (`release`: weights only, iteration 0).
        #[arg(long)]
        load: Option<PathBuf>,
        /// Do not save the optimizer state.
        #[arg(long)]
        no_save_optim: bool,
        /// Do not save the RNG state (the seeds).
        #[arg(long)]
        no_save_rng: bool,
        /// Do not load the optimizer state (it starts from zero).
        #[arg(long)]
        no_load_optim: bool,
        /// Do not load (or check) the RNG state: go on with this run's seeds.
        #[arg(long)]
        no_load_rng: bool,
        /// Load the weights only: the iteration, the data position and the optimizer start
        /// afresh.
        #[arg(long)]
        finetune: bool,
        /// On SIGTERM or SIGINT, finish the current step, save, and exit cleanly.
        #[arg(long)]
        exit_signal_handler: bool,
        /// Keep only the newest K iterations in --save (older ones are removed after a newer
        /// one is complete).
        #[arg(long)]
        keep_last: Option<usize>,
        /// What a failed save does: stop the run (default) or warn and train on.
        #[arg(long, value_enum, default_value_t = SaveErrorArg::Stop)]
        on_save_error: SaveErrorArg,
        /// Print a metrics line every N steps (and after the last).
        #[arg(long, default_value_t = 1)]
        log_interval: u64,
        /// Write one JSON object per step to this file.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Draw the loss curve to this .svg file at the end.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// What runs the steps: the plan's compiled kernels (the default when the plan has
        /// them) or the reference interpreter (slow; for checking a compiled plan).
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Threads of the compiled backend (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Time every kernel launch and library call of the compiled backend (after the
        /// first, warm-up step) and print, at the end, the time per op and the slowest steps.
        #[arg(long)]
        profile: bool,
    },
    /// Print the IR of a model at a pipeline stage (or after a pass), with a size summary.
    DumpIr {
        /// The model TOML.
        model: PathBuf,
        /// Which stage of the pipeline to print: the graph once the pipeline reaches it (from
        /// `optimizer` on, both programs of the training step), or `kernels`: the kernel IR
        /// of the scheduled programs (the nodes that have no generated kernel yet are listed).
        #[arg(long, value_enum, default_value_t = StageArg::Frontend)]
        stage: StageArg,
        /// Print the graph right after each run of this pass instead (as `mmc compile`'s
        /// report names them: simplify, autodiff, ...).
        #[arg(long, conflicts_with = "stage")]
        after: Option<String>,
        /// Text (the IR's own format) or Graphviz dot.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Convert checkpoints between the Hugging Face layout and mmc's.
    #[command(subcommand)]
    Convert(Convert),
}

#[derive(Subcommand)]
enum Convert {
    /// HF checkpoint to mmc checkpoint (experts merged): writes SAVE_DIR/release/ and
    /// SAVE_DIR/latest_checkpointed_iteration.txt, loadable as a released checkpoint.
    HfToMmc {
        /// The HF model folder: config.json and safetensors (one file or shards with their
        /// index), in the OpenGVLab or the transformers-native layout.
        #[arg(long)]
        hf_dir: PathBuf,
        /// The mmc save folder to create (it must not hold a checkpoint).
        #[arg(long)]
        save_dir: PathBuf,
        /// The largest shard (4GB, 500MB, 1000000).
        #[arg(long, value_parser = mmc::convert::parse_size, default_value = "4GB")]
        max_shard_size: u64,
    },
    /// mmc checkpoint back to the HF layout, loadable by transformers.
    MmcToHf {
        /// The HF model folder whose layout, config and tokenizer the export takes.
        #[arg(long)]
        hf_dir: PathBuf,
        /// An mmc save folder (its latest checkpoint), its release/, or an iter_NNNNNNN/.
        #[arg(long)]
        ckpt_dir: PathBuf,
        /// The folder to write (it must not exist, or be empty).
        #[arg(long)]
        save_dir: PathBuf,
        /// The largest shard (4GB, 500MB, 1000000).
        #[arg(long, value_parser = mmc::convert::parse_size, default_value = "4GB")]
        max_shard_size: u64,
        /// Cast every float tensor to this dtype (default: keep each tensor's dtype).
        #[arg(long, value_enum)]
        dtype: Option<DtypeArg>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SaveErrorArg {
    Stop,
    Continue,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Bf16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    Cpu,
    Ascend,
}

/// `mmc run --backend`.
#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Compiled,
    Interpreter,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Dot,
}

#[derive(Clone, Copy, ValueEnum)]
enum StageArg {
    Frontend,
    Fused,
    Parallel,
    Autodiff,
    Optimizer,
    Scheduled,
    /// The kernel IR of the scheduled programs.
    Kernels,
}

impl StageArg {
    /// The graph stage, or `None` for the kernel IR.
    fn stage(self) -> Option<Stage> {
        Some(match self {
            StageArg::Frontend => Stage::Frontend,
            StageArg::Fused => Stage::Fused,
            StageArg::Parallel => Stage::Parallel,
            StageArg::Autodiff => Stage::Autodiff,
            StageArg::Optimizer => Stage::Optimizer,
            StageArg::Scheduled => Stage::Scheduled,
            StageArg::Kernels => return None,
        })
    }
}

fn dump_ir(model: &Path, stage: StageArg, after: Option<String>, format: Format) -> Result<()> {
    let cfg = Config::load(model)?;
    let at = match after {
        Some(pass) => DumpPoint::After(pass),
        None => stage.stage().map_or(DumpPoint::Kernels, DumpPoint::Stage),
    };
    let format = match format {
        Format::Text => DumpFormat::Text,
        Format::Dot => DumpFormat::Dot,
    };
    let text = dump_ir_text(&cfg, &at, format)?;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to standard output"),
    }
}

/// The error and its causes on one line, each cause once: library errors often repeat their
/// source in their own message (`path: No such file`), which a plain chain would print twice.
fn render(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::DumpIr {
            model,
            stage,
            after,
            format,
        } => dump_ir(&model, stage, after, format),
        Command::Compile {
            model,
            output,
            target,
            emit_dir,
        } => {
            if let Some(Target::Ascend) = target {
                bail!("--target ascend: the Ascend target is not built yet; compile with `--target cpu`");
            }
            compile::compile(&model, &output, emit_dir.as_deref(), target.is_some())
        }
        Command::Run {
            plan,
            data,
            train_iters,
            save,
            save_interval,
            load,
            no_save_optim,
            no_save_rng,
            no_load_optim,
            no_load_rng,
            finetune,
            exit_signal_handler,
            keep_last,
            on_save_error,
            log_interval,
            metrics,
            plot,
            backend,
            threads,
            profile,
        } => {
            if threads == Some(0) {
                bail!("--threads must be at least 1");
            }
            if log_interval == 0 {
                bail!("--log-interval must be at least 1 (it prints a line every N steps)");
            }
            run::run(&run::RunArgs {
                plan,
                data,
                train_iters,
                log_interval,
                metrics,
                plot,
                checkpoint: run::CheckpointArgs {
                    save,
                    save_interval,
                    load,
                    save_optim: !no_save_optim,
                    save_rng: !no_save_rng,
                    load_optim: !no_load_optim,
                    load_rng: !no_load_rng,
                    finetune,
                    exit_signal_handler,
                    keep_last,
                    on_save_error: match on_save_error {
                        SaveErrorArg::Stop => run::OnSaveError::Stop,
                        SaveErrorArg::Continue => run::OnSaveError::Continue,
                    },
                },
                compiled: backend.map(|b| matches!(b, BackendArg::Compiled)),
                threads,
                profile,
            })
        }
        Command::Convert(c) => {
            let summary = match c {
                Convert::HfToMmc {
                    hf_dir,
                    save_dir,
                    max_shard_size,
                } => mmc::convert::hf_to_mmc(&hf_dir, &save_dir, max_shard_size, true)?,
                Convert::MmcToHf {
                    hf_dir,
                    ckpt_dir,
                    save_dir,
                    max_shard_size,
                    dtype,
                } => mmc::convert::mmc_to_hf(
                    &hf_dir,
                    &ckpt_dir,
                    &save_dir,
                    max_shard_size,
                    dtype.map(|d| match d {
                        DtypeArg::Bf16 => mmc_ir::DType::BF16,
                        DtypeArg::F32 => mmc_ir::DType::F32,
                    }),
                    true,
                )?,
            };
            let _ = writeln!(
                std::io::stderr(),
                "wrote {}: {}",
                summary.dir.display(),
                mmc::convert::rate(&summary)
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Written, not `eprintln!`: a closed standard error must not turn an error into a
            // panic.
            let _ = writeln!(std::io::stderr(), "error: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}
