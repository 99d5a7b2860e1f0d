//! The pass manager: every pass of mmc in one declared order, with the verifier and a stage
//! check after each, as Cranelift's `Context::optimize` runs its passes and `verify_if` after
//! every one.
//!
//! A pipeline is a runtime list, not a type (so `mmc dump-ir` can stop after any pass and
//! `mmc compile` can print what each did). It has three phases, because the training step
//! turns one graph into several programs:
//!
//! 1. **forward**: groups of [`Pass`]es over the model's graph, each group ending at its stage
//!    (`fused` today; `parallel` joins with sharding);
//! 2. **train step**: the `autodiff` group (the [`Autodiff`] pass and what runs on its
//!    forward + backward graph), then the optimizer step ([`StepSpec`], stage `optimizer`),
//!    which adds the gradient accumulation and builds the apply program and the state;
//! 3. **programs**: [`ProgramPass`]es over each program of the step (recompute, scheduling and
//!    memory planning), ending at stage `scheduled`.
//!
//! After every pass the pipeline checks that the graph is at the stage the pass declares and,
//! when [`Options::verify`] is set (the default, in release builds too: CI tests in release),
//! runs [`mmc_ir::verify`]; a failure names the pass. It records each pass's wall time and
//! node counts, and can keep the printed graph after a chosen pass or stage ([`DumpAt`]).
//!
//! [`cpu`] is the pipeline `mmc compile` runs. An `ascend()` pipeline will differ in its
//! fusion rules (the fused ops the Ascend kernels implement, such as its flash-attention with
//! its own layout), in a `parallel` group (sharding into collectives, which the CPU target
//! does not have), and in its program passes (memory planned for the device's HBM, streams in
//! the schedule); the forward simplification and the train step are shared.

use crate::autodiff::autodiff;
use crate::fuse::moe::fuse_moe;
use crate::fuse::{fuse, FuseLimits};
use crate::memory::{plan_memory_streaming, update_values};
use crate::optimizer::AdamW;
use crate::recompute::{recompute, RecomputeMode};
use crate::schedule::{schedule_streaming, schedule_with};
use crate::simplify::{simplify, SimplifyReport};
use crate::train_step::{assemble, TrainStep, TrainStepSpec};
use mmc_ir::arena::WORD_BYTES;
use mmc_ir::plan::{ParamStacking, Program, MICRO_STEP_PROGRAM};
use mmc_ir::{DType, Graph, Stage, TensorType, VerifyError};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pass's own failure (not an invalid result, which the pipeline detects).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One graph-to-graph pass. Its settings (the loss, what is trainable) are fields of the
/// struct that implements it.
pub trait Pass {
    /// A short kebab-case name, as `mmc compile` prints it and `mmc dump-ir --after` takes it.
    fn name(&self) -> &'static str;
    /// The stage of the graph the pass returns when given a graph of stage `input`; most
    /// passes keep the stage.
    fn stage_out(&self, input: Stage) -> Stage {
        input
    }
    /// Runs the pass; a line pushed to `notes` is printed with the pass in the report.
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError>;
}

/// A pass over one program of the training step (its graph and its state updates).
pub trait ProgramPass {
    /// As [`Pass::name`].
    fn name(&self) -> &'static str;
    /// As [`Pass::stage_out`], for the program's graph.
    fn stage_out(&self, input: Stage) -> Stage {
        input
    }
    /// Whether the pass runs on the program named `program` (recompute: the micro-step only).
    fn applies_to(&self, program: &str) -> bool {
        let _ = program;
        true
    }
    /// Runs the pass on one program; notes as for [`Pass::run`].
    fn run(&self, p: Program, notes: &mut Vec<String>) -> Result<Program, BoxError>;
}

/// A graph pass run on the graph of every program.
pub struct EachGraph<P>(pub P);

impl<P: Pass> ProgramPass for EachGraph<P> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn stage_out(&self, input: Stage) -> Stage {
        self.0.stage_out(input)
    }
    fn run(&self, mut p: Program, notes: &mut Vec<String>) -> Result<Program, BoxError> {
        p.graph = self.0.run(p.graph, notes)?;
        Ok(p)
    }
}

/// A graph pass run on one program only (recompute: the micro-step, which holds the backward
/// pass; the apply program has none).
pub struct Only<P> {
    pub program: &'static str,
    pub pass: P,
}

impl<P: Pass> ProgramPass for Only<P> {
    fn name(&self) -> &'static str {
        self.pass.name()
    }
    fn stage_out(&self, input: Stage) -> Stage {
        self.pass.stage_out(input)
    }
    fn applies_to(&self, program: &str) -> bool {
        program == self.program
    }
    fn run(&self, mut p: Program, notes: &mut Vec<String>) -> Result<Program, BoxError> {
        p.graph = self.pass.run(p.graph, notes)?;
        Ok(p)
    }
}

// ---- the passes the pipeline itself provides ----

/// Algebraic simplification ([`crate::simplify`]).
pub struct Simplify;

impl Pass for Simplify {
    fn name(&self) -> &'static str {
        "simplify"
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let (g, report): (Graph, SimplifyReport) = simplify(&g)?;
        notes.push(report.to_string());
        Ok(g)
    }
}

/// E-graph fusion ([`crate::fuse`]): primitive forms to fused ops; the graph leaves it at the
/// `fused` stage.
pub struct Fuse {
    pub limits: FuseLimits,
}

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }
    fn stage_out(&self, _input: Stage) -> Stage {
        Stage::Fused
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let (g, report) = fuse(&g, &self.limits)?;
        let limits: Vec<String> = report
            .templates
            .iter()
            .filter(|t| !matches!(t.stop_reason, egg::StopReason::Saturated))
            .map(|t| format!("template {:?} stopped: {:?}", t.region, t.stop_reason))
            .collect();
        notes.push(format!(
            "{} regions, {} templates{}",
            report.regions,
            report.templates.len(),
            if limits.is_empty() {
                ", all saturated".to_string()
            } else {
                format!("; {}", limits.join("; "))
            }
        ));
        let ops: Vec<String> = report
            .fused_ops
            .iter()
            .map(|(op, n)| format!("{} {n}", op.trim_start_matches("fused.")))
            .collect();
        notes.push(format!("fused: {}", ops.join(", ")));
        Ok(g)
    }
}

/// The routed MoE ([`crate::fuse::moe`]): the dense expert sum becomes grouped GEMMs over
/// stacked expert weights. How each stack is assembled from the per-expert parameters goes
/// to `stackings`, which plan emission needs (the loader fills the stacks from them).
pub struct FuseMoe {
    pub stackings: Arc<Mutex<Vec<ParamStacking>>>,
}

impl Pass for FuseMoe {
    fn name(&self) -> &'static str {
        "fuse-moe"
    }
    fn stage_out(&self, _input: Stage) -> Stage {
        Stage::Fused
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let (mut g, report) = fuse_moe(&g)?;
        g.stage = Stage::Fused;
        notes.push(format!(
            "{} MoE layer(s) routed, {} stacked parameter(s), {} dense form(s) left",
            report.layers.len(),
            report.stackings.len(),
            report.refused.len()
        ));
        for r in &report.refused {
            notes.push(format!("not routed: {r:?}"));
        }
        self.stackings
            .lock()
            .map_err(|_| "the stacking record was poisoned by a panic")?
            .extend(report.stackings);
        Ok(g)
    }
}

/// Activation recomputation ([`crate::recompute`]) on the micro-step.
pub struct Recompute {
    pub mode: RecomputeMode,
}

impl Pass for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let (g, report) = recompute(&g, self.mode)?;
        notes.push(report.to_string());
        Ok(g)
    }
}

/// Elementwise fusion ([`crate::fuse_elementwise`]): the chains of every program, forward,
/// backward and optimizer, into `fused.elementwise` kernels and matmul epilogues.
pub struct FuseElementwise;

impl Pass for FuseElementwise {
    fn name(&self) -> &'static str {
        "fuse-elementwise"
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let (g, report) = crate::fuse_elementwise::fuse_elementwise(&g)?;
        notes.push(report.to_string());
        Ok(g)
    }
}

/// Accumulation fusion ([`crate::fuse_accumulate`]): gradients summed onto their
/// accumulators by the ops that make them, so no parameter-sized gradient is stored.
pub struct FuseAccumulate;

impl Pass for FuseAccumulate {
    fn name(&self) -> &'static str {
        "fuse-accumulate"
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let (g, fused) = crate::fuse_accumulate::fuse_accumulate(&g)?;
        notes.push(format!(
            "{fused} gradient(s) summed onto their accumulator by the op that makes them"
        ));
        Ok(g)
    }
}

/// Loss-gradient fusion ([`crate::fuse_loss_grad`]): each cross-entropy with its backward, so
/// a training step computes the LM head's logits once.
pub struct FuseLossGrad;

impl Pass for FuseLossGrad {
    fn name(&self) -> &'static str {
        "fuse-loss-grad"
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let (g, merged) = crate::fuse_loss_grad::fuse_loss_grad(&g)?;
        notes.push(format!(
            "{merged} cross-entropy forward(s) merged with their backward"
        ));
        Ok(g)
    }
}

/// Scheduling ([`crate::schedule`]): a topological order with a lower peak of live bytes,
/// counted as the interpreter stores values (8-byte words); the program is then `scheduled`.
pub struct Schedule;

impl Pass for Schedule {
    fn name(&self) -> &'static str {
        "schedule"
    }
    fn stage_out(&self, _input: Stage) -> Stage {
        Stage::Scheduled
    }
    fn run(&self, g: Graph, _notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let mut g = schedule_with(&g, |_| WORD_BYTES)?;
        g.stage = Stage::Scheduled;
        Ok(g)
    }
}

/// Memory planning ([`crate::memory`]): every activation gets an offset in one static arena,
/// which the runtime allocates once. The layout is the interpreter's (8-byte words); the
/// notes also give the arena in the declared dtypes, what a device backend allocates. State
/// updates are streamed out of the arena (the program is rescheduled knowing it).
pub struct Memory;

impl ProgramPass for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn run(&self, mut p: Program, notes: &mut Vec<String>) -> Result<Program, BoxError> {
        // Rescheduled knowing which outputs are streamed (their values ids change with it).
        let streamed = update_values(&p.graph, &p);
        p.graph = schedule_streaming(&p.graph, |_| WORD_BYTES, &streamed)?;
        let streamed = update_values(&p.graph, &p);
        let words = plan_memory_streaming(&p.graph, |_| WORD_BYTES, &streamed);
        words.verify(&p.graph)?;
        let declared = plan_memory_streaming(&p.graph, DType::size_bytes, &streamed);
        notes.push(format!(
            "arena {} (largest live set {}) in the declared dtypes; {} as the interpreter stores values",
            gb(declared.arena_bytes()),
            gb(declared.largest_live_set),
            gb(words.arena_bytes()),
        ));
        p.memory = Some(words.layout);
        Ok(p)
    }
}

/// Bytes in GB (1e9), with enough digits for small arenas.
fn gb(bytes: u64) -> String {
    let g = bytes as f64 / 1e9;
    if g >= 10.0 {
        format!("{g:.1} GB")
    } else {
        format!("{g:.3} GB")
    }
}

/// Marks the graph as having reached `stage`, for a stage whose transforming pass is not
/// there yet: the fused stage until the fusion pass is registered (a graph without fused ops
/// is a valid fused graph, so the stages after it are built on the real order).
pub struct EnterStage {
    pub name: &'static str,
    pub stage: Stage,
}

impl Pass for EnterStage {
    fn name(&self) -> &'static str {
        self.name
    }
    fn stage_out(&self, _input: Stage) -> Stage {
        self.stage
    }
    fn run(&self, mut g: Graph, _notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        g.stage = self.stage;
        Ok(g)
    }
}

/// Whether a parameter is trained, shared by the autodiff pass and the optimizer step.
pub type Trainable = Arc<dyn Fn(&str) -> bool + Send + Sync>;
/// Whether weight decay applies to a trainable parameter.
pub type Decay = Arc<dyn Fn(&str, &TensorType) -> bool + Send + Sync>;

/// Reverse-mode differentiation of the scalar output `loss` ([`crate::autodiff`]).
pub struct Autodiff {
    pub loss: String,
    pub trainable: Trainable,
}

impl Pass for Autodiff {
    fn name(&self) -> &'static str {
        "autodiff"
    }
    fn stage_out(&self, _input: Stage) -> Stage {
        Stage::Autodiff
    }
    fn run(&self, g: Graph, _notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let trainable = &self.trainable;
        Ok(autodiff(&g, &self.loss, |n| trainable(n))?)
    }
}

/// Runs a pass and notes its wall time: for a pass inside [`Fixpoint`], whose rounds the
/// pipeline's own timing lumps together.
pub struct Timed<P>(pub P);

impl<P: Pass> Pass for Timed<P> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn stage_out(&self, input: Stage) -> Stage {
        self.0.stage_out(input)
    }
    fn run(&self, g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let t = Instant::now();
        let g = self.0.run(g, notes)?;
        notes.push(format!("{} took {}", self.0.name(), ms(t.elapsed())));
        Ok(g)
    }
}

/// Runs a pass again until the graph stops changing, at most `max_rounds` times (luminal's
/// `Looped`, bounded); the notes say how many rounds ran and whether it converged.
pub struct Fixpoint<P> {
    pub pass: P,
    pub max_rounds: usize,
}

impl<P: Pass> Pass for Fixpoint<P> {
    fn name(&self) -> &'static str {
        self.pass.name()
    }
    fn stage_out(&self, input: Stage) -> Stage {
        self.pass.stage_out(input)
    }
    fn run(&self, mut g: Graph, notes: &mut Vec<String>) -> Result<Graph, BoxError> {
        let mut inner = Vec::new();
        for round in 1..=self.max_rounds.max(1) {
            let before = g.clone();
            g = self.pass.run(g, &mut inner)?;
            if same_program(&before, &g) {
                notes.append(&mut inner);
                notes.push(format!("converged after {round} round(s)"));
                return Ok(g);
            }
        }
        notes.append(&mut inner);
        notes.push(format!(
            "stopped at the limit of {} rounds, still changing",
            self.max_rounds.max(1)
        ));
        Ok(g)
    }
}

/// Whether two graphs are the same program: stage, nodes (op, operands, results, scope name)
/// and outputs, whatever the scope numbering.
pub fn same_program(a: &Graph, b: &Graph) -> bool {
    a.stage == b.stage
        && a.num_values() == b.num_values()
        && a.outputs() == b.outputs()
        && a.nodes().len() == b.nodes().len()
        && a.nodes().iter().zip(b.nodes()).all(|(x, y)| {
            x.op == y.op
                && x.inputs == y.inputs
                && x.outputs == y.outputs
                && a.scope_name(x.scope) == b.scope_name(y.scope)
        })
}

// ---- the pipeline ----

/// Settings of a pipeline run.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Run the verifier after every pass (on by default; a check of the stage runs always).
    pub verify: bool,
    /// Keep the printed graph after this pass or at this stage, in [`PipelineReport::dumps`].
    pub dump: Option<DumpAt>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            verify: true,
            dump: None,
        }
    }
}

/// Where to keep a printed graph.
#[derive(Clone, Debug, PartialEq)]
pub enum DumpAt {
    /// After every run of the pass of this name (each program, for program passes).
    Pass(String),
    /// When the pipeline reaches this stage (each program, from `optimizer` on).
    Stage(Stage),
}

/// A group of graph passes that ends at `stage`.
pub struct Group {
    pub stage: Stage,
    pub passes: Vec<Box<dyn Pass>>,
}

/// How the optimizer step is built from the autodiff graph.
pub struct StepSpec {
    pub trainable: Trainable,
    pub decay: Decay,
    pub adamw: AdamW,
}

/// Every pass in order; see the module documentation.
pub struct Pipeline {
    pub options: Options,
    /// Groups over the forward graph, in stage order (`fused`, later `parallel`).
    pub forward: Vec<Group>,
    /// The `autodiff` group: its first pass turns the forward graph into forward + backward.
    pub autodiff: Group,
    pub step: StepSpec,
    /// Passes over each program, ending at `scheduled`; empty until scheduling lands.
    pub programs: Vec<Box<dyn ProgramPass>>,
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq)]
pub struct PassRecord {
    pub pass: &'static str,
    /// The stage of the group the pass belongs to.
    pub stage: Stage,
    /// The program it ran on (program passes).
    pub program: Option<String>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub time: Duration,
    pub notes: Vec<String>,
}

/// A graph kept by [`Options::dump`].
#[derive(Clone, Debug, PartialEq)]
pub struct Dump {
    /// `after <pass>` or `at <stage>`, with the program when there is one.
    pub label: String,
    pub graph: Graph,
}

/// What a pipeline run did, for `mmc compile` to print.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineReport {
    pub records: Vec<PassRecord>,
    /// Time spent in the verifier, over all passes.
    pub verify_time: Duration,
    /// Wall time of the whole run.
    pub total: Duration,
    pub dumps: Vec<Dump>,
}

/// Where a run stopped.
pub enum Artifact {
    /// The forward graph (stages `frontend`, `fused`, `parallel`) or the autodiff graph.
    Graph(Graph),
    /// The training step (stages `optimizer`, `scheduled`).
    Step(Box<TrainStep>),
}

/// Why a pipeline run failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The pass itself returned an error (a bad setting, an internal failure of a rule).
    #[error("pass `{pass}`{} failed: {source}", on(.program))]
    Pass {
        pass: &'static str,
        program: Option<String>,
        source: BoxError,
    },
    /// The verifier rejected the pass's result: a bug in that pass.
    #[error("pass `{pass}`{} produced an invalid {stage} graph: {error}", on(.program))]
    Invalid {
        pass: &'static str,
        program: Option<String>,
        stage: Stage,
        error: VerifyError,
    },
    /// The result is not at the stage the pass (or its group) declares.
    #[error("pass `{pass}`{} returned a {got} graph, but it declares {expected}", on(.program))]
    WrongStage {
        pass: &'static str,
        program: Option<String>,
        expected: Stage,
        got: Stage,
    },
    /// The input was not a frontend graph.
    #[error("the pipeline was given a {got} graph; it starts from a frontend graph")]
    NotFrontend { got: Stage },
    /// A run was asked to stop at a stage that no pass produces.
    #[error("stage `{0}` is not built yet: no pass of this pipeline produces it")]
    NotBuilt(Stage),
}

fn on(program: &Option<String>) -> String {
    program
        .as_ref()
        .map(|p| format!(" (program `{p}`)"))
        .unwrap_or_default()
}

/// The settings a pipeline is built from: what the model's config says about training. The
/// settings of later passes (the recompute mode, a memory budget) join here as fields.
pub struct Settings {
    /// The scalar output to minimise.
    pub loss: String,
    pub step: StepSpec,
    /// What the backward pass recomputes instead of keeping.
    pub recompute: RecomputeMode,
    /// Where the routed MoE records its parameter stackings.
    pub stackings: Arc<Mutex<Vec<ParamStacking>>>,
}

/// The pipeline of the CPU target: simplify for the fused stage (the fusion pass joins there),
/// autodiff then simplify on forward + backward, the optimizer step, and no program pass yet.
pub fn cpu(settings: Settings) -> Pipeline {
    let Settings {
        loss,
        step,
        recompute,
        stackings,
    } = settings;
    Pipeline {
        options: Options::default(),
        forward: vec![Group {
            stage: Stage::Fused,
            passes: vec![
                // The routed MoE first: it matches the dense expert sum as the frontend
                // declares it, before the e-graph rewrites the experts' SwiGLUs.
                Box::new(FuseMoe { stackings }),
                Box::new(Fuse {
                    limits: FuseLimits::default(),
                }),
                // Then the algebra, CSE and dead code (the attention mask the fused attention
                // no longer reads).
                Box::new(Simplify),
            ],
        }],
        autodiff: Group {
            stage: Stage::Autodiff,
            passes: vec![
                Box::new(Autodiff {
                    loss,
                    trainable: step.trainable.clone(),
                }),
                Box::new(Simplify),
                // Then the loss with its gradient, whose seed simplify has folded.
                Box::new(FuseLossGrad),
            ],
        },
        step,
        programs: vec![
            // Recompute, on the micro-step only (the apply program has no backward pass).
            Box::new(Only {
                program: MICRO_STEP_PROGRAM,
                pass: Recompute { mode: recompute },
            }),
            // Gradients summed onto their accumulators where the op making them can, before
            // elementwise fusion takes the remaining sums into kernels.
            Box::new(Only {
                program: MICRO_STEP_PROGRAM,
                pass: FuseAccumulate,
            }),
            // Elementwise chains into kernels, once the backward and recomputed nodes exist.
            Box::new(EachGraph(FuseElementwise)),
            // Then every program is scheduled and memory-planned.
            Box::new(EachGraph(Schedule)),
            Box::new(Memory),
        ],
    }
}

/// The state of a run between passes.
struct Run<'p> {
    options: &'p Options,
    report: PipelineReport,
}

impl Run<'_> {
    /// Checks the result of `pass` and records it.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        pass: &'static str,
        group: Stage,
        program: Option<&str>,
        expected: Stage,
        g: &Graph,
        nodes_before: usize,
        time: Duration,
        notes: Vec<String>,
    ) -> Result<(), PipelineError> {
        if g.stage != expected {
            return Err(PipelineError::WrongStage {
                pass,
                program: program.map(String::from),
                expected,
                got: g.stage,
            });
        }
        if self.options.verify {
            let t = Instant::now();
            let verified = mmc_ir::verify(g);
            self.report.verify_time += t.elapsed();
            if let Err(error) = verified {
                return Err(PipelineError::Invalid {
                    pass,
                    program: program.map(String::from),
                    stage: g.stage,
                    error,
                });
            }
        }
        self.report.records.push(PassRecord {
            pass,
            stage: group,
            program: program.map(String::from),
            nodes_before,
            nodes_after: g.nodes().len(),
            time,
            notes,
        });
        if self.options.dump == Some(DumpAt::Pass(pass.to_string())) {
            self.dump(format!("after {pass}"), program, g);
        }
        Ok(())
    }

    fn dump(&mut self, label: String, program: Option<&str>, g: &Graph) {
        let label = match program {
            Some(p) => format!("{label} (program {p})"),
            None => label,
        };
        self.report.dumps.push(Dump {
            label,
            graph: g.clone(),
        });
    }

    fn reached(&mut self, stage: Stage, graphs: &[(Option<&str>, &Graph)]) {
        if self.options.dump == Some(DumpAt::Stage(stage)) {
            for (program, g) in graphs {
                self.dump(format!("at {stage}"), *program, g);
            }
        }
    }

    fn group(&mut self, group: &Group, mut g: Graph) -> Result<Graph, PipelineError> {
        for pass in &group.passes {
            let expected = pass.stage_out(g.stage);
            let before = g.nodes().len();
            let mut notes = Vec::new();
            let t = Instant::now();
            g = pass
                .run(g, &mut notes)
                .map_err(|source| PipelineError::Pass {
                    pass: pass.name(),
                    program: None,
                    source,
                })?;
            self.check(
                pass.name(),
                group.stage,
                None,
                expected,
                &g,
                before,
                t.elapsed(),
                notes,
            )?;
        }
        if g.stage != group.stage {
            return Err(PipelineError::WrongStage {
                pass: group.passes.last().map_or("(empty group)", |p| p.name()),
                program: None,
                expected: group.stage,
                got: g.stage,
            });
        }
        self.reached(group.stage, &[(None, &g)]);
        Ok(g)
    }
}

impl Pipeline {
    /// Whether some pass of this pipeline produces `stage`.
    pub fn builds(&self, stage: Stage) -> bool {
        match stage {
            Stage::Frontend | Stage::Autodiff | Stage::Optimizer => true,
            Stage::Scheduled => !self.programs.is_empty(),
            s => self.forward.iter().any(|g| g.stage == s),
        }
    }

    /// Runs every pass: the training step at the last stage the pipeline builds.
    pub fn run(&self, forward: Graph) -> Result<(TrainStep, PipelineReport), PipelineError> {
        let last = if self.builds(Stage::Scheduled) {
            Stage::Scheduled
        } else {
            Stage::Optimizer
        };
        match self.run_to(forward, last)? {
            (Artifact::Step(step), report) => Ok((*step, report)),
            (Artifact::Graph(_), _) => unreachable!("optimizer and scheduled stop at the step"),
        }
    }

    /// Runs the passes up to and including those of `stage`, and stops there.
    pub fn run_to(
        &self,
        forward: Graph,
        stage: Stage,
    ) -> Result<(Artifact, PipelineReport), PipelineError> {
        if !self.builds(stage) {
            return Err(PipelineError::NotBuilt(stage));
        }
        if forward.stage != Stage::Frontend {
            return Err(PipelineError::NotFrontend { got: forward.stage });
        }
        let start = Instant::now();
        let mut run = Run {
            options: &self.options,
            report: PipelineReport::default(),
        };
        let n = forward.nodes().len();
        run.check(
            "frontend",
            Stage::Frontend,
            None,
            Stage::Frontend,
            &forward,
            n,
            Duration::ZERO,
            vec![],
        )?;
        run.reached(Stage::Frontend, &[(None, &forward)]);
        let finish = |mut run: Run<'_>,
                      artifact: Artifact|
         -> Result<(Artifact, PipelineReport), PipelineError> {
            run.report.total = start.elapsed();
            Ok((artifact, run.report))
        };
        let mut g = forward;
        if stage == Stage::Frontend {
            return finish(run, Artifact::Graph(g));
        }
        for group in &self.forward {
            g = run.group(group, g)?;
            if group.stage == stage {
                return finish(run, Artifact::Graph(g));
            }
        }
        g = run.group(&self.autodiff, g)?;
        if stage == Stage::Autodiff {
            return finish(run, Artifact::Graph(g));
        }

        let before = g.nodes().len();
        let t = Instant::now();
        let trainable = &self.step.trainable;
        let decay = &self.step.decay;
        let spec = TrainStepSpec {
            // `assemble` reads only the settings below; the loss was the autodiff pass's.
            loss: "",
            trainable: &|n| trainable(n),
            decay: &|n, t| decay(n, t),
            adamw: self.step.adamw,
        };
        let mut step = assemble(g, &spec).map_err(|e| PipelineError::Pass {
            pass: "optimizer",
            program: None,
            source: Box::new(e),
        })?;
        step.micro_step.graph.stage = Stage::Optimizer;
        let time = t.elapsed();
        for p in [&step.micro_step, &step.apply] {
            let notes = vec![format!(
                "{} program: {} nodes",
                p.name,
                p.graph.nodes().len()
            )];
            let before = if p.name == step.micro_step.name {
                before
            } else {
                0
            };
            run.check(
                "optimizer",
                Stage::Optimizer,
                Some(&p.name),
                Stage::Optimizer,
                &p.graph,
                before,
                time,
                notes,
            )?;
        }
        run.reached(
            Stage::Optimizer,
            &[
                (Some(step.micro_step.name.as_str()), &step.micro_step.graph),
                (Some(step.apply.name.as_str()), &step.apply.graph),
            ],
        );
        if stage == Stage::Optimizer {
            return finish(run, Artifact::Step(Box::new(step)));
        }

        for pass in &self.programs {
            for program in [&mut step.micro_step, &mut step.apply] {
                if !pass.applies_to(&program.name) {
                    continue;
                }
                let name = program.name.clone();
                let expected = pass.stage_out(program.graph.stage);
                let before = program.graph.nodes().len();
                let mut notes = Vec::new();
                let t = Instant::now();
                let taken = std::mem::replace(
                    program,
                    Program::new(name.clone(), Graph::new(Stage::Optimizer), Vec::new()),
                );
                *program = pass
                    .run(taken, &mut notes)
                    .map_err(|source| PipelineError::Pass {
                        pass: pass.name(),
                        program: Some(name.clone()),
                        source,
                    })?;
                run.check(
                    pass.name(),
                    Stage::Scheduled,
                    Some(&name),
                    expected,
                    &program.graph,
                    before,
                    t.elapsed(),
                    notes,
                )?;
            }
        }
        for p in [&step.micro_step, &step.apply] {
            if p.graph.stage != Stage::Scheduled {
                return Err(PipelineError::WrongStage {
                    pass: self.programs.last().map_or("(none)", |p| p.name()),
                    program: Some(p.name.clone()),
                    expected: Stage::Scheduled,
                    got: p.graph.stage,
                });
            }
        }
        run.reached(
            Stage::Scheduled,
            &[
                (Some(step.micro_step.name.as_str()), &step.micro_step.graph),
                (Some(step.apply.name.as_str()), &step.apply.graph),
            ],
        );
        finish(run, Artifact::Step(Box::new(step)))
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

impl fmt::Display for PipelineReport {
    /// One line per pass run (stage, pass, program, nodes before -> after, time, notes), a
    /// line per stage with its node counts, and the total time.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:<16} {:<11} {:>21} {:>10}",
            "stage", "pass", "program", "nodes before -> after", "time"
        )?;
        for r in &self.records {
            let nodes = format!("{} -> {}", r.nodes_before, r.nodes_after);
            writeln!(
                f,
                "{:<10} {:<16} {:<11} {:>21} {:>10}{}",
                r.stage.name(),
                r.pass,
                r.program.as_deref().unwrap_or("-"),
                nodes,
                ms(r.time),
                if r.notes.is_empty() {
                    String::new()
                } else {
                    format!("  {}", r.notes.join("; "))
                }
            )?;
        }
        let stages: Vec<String> = self
            .stage_nodes()
            .iter()
            .map(|(stage, program, n)| match program {
                Some(p) => format!("{stage} {p} {n}"),
                None => format!("{stage} {n}"),
            })
            .collect();
        writeln!(f, "nodes by stage: {}", stages.join(", "))?;
        write!(
            f,
            "pipeline: {} ({} in the verifier)",
            ms(self.total),
            ms(self.verify_time)
        )
    }
}

impl PipelineReport {
    /// Node counts at the end of each stage: (stage, program, nodes), in pipeline order.
    pub fn stage_nodes(&self) -> Vec<(Stage, Option<String>, usize)> {
        let mut out: Vec<(Stage, Option<String>, usize)> = Vec::new();
        for r in &self.records {
            match out
                .iter_mut()
                .find(|(s, p, _)| *s == r.stage && *p == r.program)
            {
                Some(entry) => entry.2 = r.nodes_after,
                None => out.push((r.stage, r.program.clone(), r.nodes_after)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmc_ir::text::parse;
    use mmc_ir::{Op, Value};

    /// A forward graph with a scalar loss: `loss = sum(exp(x * w) * 1)`, with a no-op reshape.
    fn forward() -> Graph {
        parse(
            "graph frontend {
  %0 = input \"x\" : f32[3]
  %1 = param \"w\" : f32[3]
  %2 = mul %0, %1 : f32[3]
  %3 = reshape %2 : f32[3]
  %4 = exp %3 : f32[3]
  %5 = const value=1.0 : f32[3]
  %6 = mul %4, %5 : f32[3]
  %7 = reduce_sum %6 axes=[0] : f32[1]
  %8 = reshape %7 : f32[]
  output \"loss\" = %8
}",
        )
        .expect("parses")
    }

    fn settings() -> Settings {
        Settings {
            loss: "loss".into(),
            step: StepSpec {
                trainable: Arc::new(|_| true),
                decay: Arc::new(|_, _| true),
                adamw: AdamW {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.0,
                    clip_grad: 1.0,
                },
            },
            recompute: RecomputeMode::None,
            stackings: Default::default(),
        }
    }

    /// A pass that breaks SSA: its last node reads a value defined after it.
    struct Breaks;
    impl Pass for Breaks {
        fn name(&self) -> &'static str {
            "breaks"
        }
        fn run(&self, mut g: Graph, _: &mut Vec<String>) -> Result<Graph, BoxError> {
            let ahead = Value(g.num_values() as u32 + 1);
            let ty = g.ty(Value(0)).clone();
            let scope = g.intern_scope("");
            g.push_node_unchecked(Op::Unary(mmc_ir::UnaryOp::Exp), &[ahead], vec![ty], scope);
            Ok(g)
        }
    }

    /// A pass that appends one dead `exp` each time: never converges.
    struct Grows;
    impl Pass for Grows {
        fn name(&self) -> &'static str {
            "grows"
        }
        fn run(&self, mut g: Graph, _: &mut Vec<String>) -> Result<Graph, BoxError> {
            let scope = g.intern_scope("");
            g.add_node(Op::Unary(mmc_ir::UnaryOp::Exp), &[Value(0)], scope)?;
            Ok(g)
        }
    }

    fn with_forward(passes: Vec<Box<dyn Pass>>) -> Pipeline {
        let mut p = cpu(settings());
        p.forward[0].passes = passes;
        p
    }

    #[test]
    fn cpu_runs_every_stage_and_records_each_pass() {
        let (step, report) = cpu(settings()).run(forward()).expect("runs");
        assert_eq!(step.micro_step.graph.stage, Stage::Scheduled);
        assert_eq!(step.apply.graph.stage, Stage::Scheduled);
        assert!(step.micro_step.memory.is_some() && step.apply.memory.is_some());
        let passes: Vec<&str> = report.records.iter().map(|r| r.pass).collect();
        assert_eq!(
            passes,
            [
                "frontend",
                "fuse-moe",
                "fuse",
                "simplify",
                "autodiff",
                "simplify",
                "fuse-loss-grad",
                "optimizer",
                "optimizer",
                "recompute",
                "fuse-accumulate",
                "fuse-elementwise",
                "fuse-elementwise",
                "schedule",
                "schedule",
                "memory",
                "memory"
            ]
        );
        let simplify = &report.records[3];
        assert_eq!((simplify.nodes_before, simplify.nodes_after), (9, 6));
        assert!(report.to_string().contains("pipeline: "), "{report}");
        let stages: Vec<Stage> = report.stage_nodes().iter().map(|s| s.0).collect();
        assert_eq!(
            stages,
            [
                Stage::Frontend,
                Stage::Fused,
                Stage::Autodiff,
                Stage::Optimizer,
                Stage::Optimizer,
                Stage::Scheduled,
                Stage::Scheduled
            ]
        );
    }

    #[test]
    fn an_invalid_graph_names_the_pass_and_the_node() {
        let err = with_forward(vec![Box::new(Breaks)])
            .run_to(forward(), Stage::Fused)
            .err()
            .expect("the verifier rejects it");
        let text = err.to_string();
        assert!(
            matches!(err, PipelineError::Invalid { pass: "breaks", .. }),
            "{text}"
        );
        assert!(
            text.contains("pass `breaks` produced an invalid frontend graph"),
            "{text}"
        );
        assert!(text.contains("(`%9 = exp %?10 : f32[3]`)"), "{text}");
    }

    #[test]
    fn without_the_verifier_an_invalid_graph_passes() {
        let mut p = with_forward(vec![
            Box::new(Breaks),
            Box::new(EnterStage {
                name: "enter-fused",
                stage: Stage::Fused,
            }),
        ]);
        p.options.verify = false;
        assert!(p.run_to(forward(), Stage::Fused).is_ok());
    }

    #[test]
    fn a_pass_that_lies_about_its_stage_is_an_error() {
        struct Lies;
        impl Pass for Lies {
            fn name(&self) -> &'static str {
                "lies"
            }
            fn stage_out(&self, _: Stage) -> Stage {
                Stage::Fused
            }
            fn run(&self, g: Graph, _: &mut Vec<String>) -> Result<Graph, BoxError> {
                Ok(g)
            }
        }
        let err = with_forward(vec![Box::new(Lies)])
            .run_to(forward(), Stage::Fused)
            .err()
            .expect("a wrong stage");
        assert!(
            matches!(
                err,
                PipelineError::WrongStage {
                    pass: "lies",
                    expected: Stage::Fused,
                    got: Stage::Frontend,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_group_that_does_not_reach_its_stage_is_an_error() {
        let err = with_forward(vec![Box::new(Simplify)])
            .run_to(forward(), Stage::Fused)
            .err()
            .expect("still frontend");
        assert!(err.to_string().contains("declares fused"), "{err}");
    }

    #[test]
    fn stages_without_passes_are_not_built() {
        let mut without_programs = cpu(settings());
        without_programs.programs.clear();
        for (stage, p) in [
            (Stage::Parallel, cpu(settings())),
            (Stage::Scheduled, without_programs),
        ] {
            let err = p.run_to(forward(), stage).err().expect("not built");
            assert_eq!(
                err.to_string(),
                format!("stage `{stage}` is not built yet: no pass of this pipeline produces it")
            );
        }
    }

    #[test]
    fn run_to_stops_at_the_stage() {
        let p = cpu(settings());
        let (Artifact::Graph(g), report) = p.run_to(forward(), Stage::Fused).unwrap() else {
            panic!("a graph")
        };
        assert_eq!(g.stage, Stage::Fused);
        assert!(report.records.iter().all(|r| r.pass != "autodiff"));
        let (Artifact::Graph(g), _) = p.run_to(forward(), Stage::Autodiff).unwrap() else {
            panic!("a graph")
        };
        assert_eq!(g.stage, Stage::Autodiff);
        assert!(g.output("grad:w").is_some());
    }

    #[test]
    fn dumps_after_a_pass_and_at_a_stage() {
        let mut p = cpu(settings());
        p.options.dump = Some(DumpAt::Pass("simplify".into()));
        let (_, report) = p.run(forward()).unwrap();
        let labels: Vec<&str> = report.dumps.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["after simplify", "after simplify"]);
        assert_eq!(report.dumps[1].graph.stage, Stage::Autodiff);

        p.options.dump = Some(DumpAt::Stage(Stage::Optimizer));
        let (_, report) = p.run(forward()).unwrap();
        let labels: Vec<&str> = report.dumps.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "at optimizer (program micro_step)",
                "at optimizer (program apply)"
            ]
        );
    }

    #[test]
    fn fixpoint_stops_when_nothing_changes_or_at_its_limit() {
        let mut notes = Vec::new();
        let g = Fixpoint {
            pass: Simplify,
            max_rounds: 5,
        }
        .run(forward(), &mut notes)
        .unwrap();
        assert_eq!(g.nodes().len(), 6);
        assert_eq!(notes.last().unwrap(), "converged after 2 round(s)");

        let mut notes = Vec::new();
        let g = Fixpoint {
            pass: Grows,
            max_rounds: 3,
        }
        .run(forward(), &mut notes)
        .unwrap();
        assert_eq!(g.nodes().len(), 12);
        assert_eq!(
            notes.last().unwrap(),
            "stopped at the limit of 3 rounds, still changing"
        );
    }

    #[test]
    fn timed_notes_the_time() {
        let mut notes = Vec::new();
        Timed(Simplify).run(forward(), &mut notes).unwrap();
        assert!(
            notes.last().unwrap().starts_with("simplify took "),
            "{notes:?}"
        );
    }

    #[test]
    fn program_passes_run_on_the_programs_they_apply_to() {
        /// Marks the graph scheduled, and counts nothing else.
        struct Schedules;
        impl ProgramPass for Schedules {
            fn name(&self) -> &'static str {
                "schedules"
            }
            fn stage_out(&self, _: Stage) -> Stage {
                Stage::Scheduled
            }
            fn run(&self, mut p: Program, notes: &mut Vec<String>) -> Result<Program, BoxError> {
                p.graph.stage = Stage::Scheduled;
                notes.push(format!("scheduled {}", p.name));
                Ok(p)
            }
        }
        let mut p = cpu(settings());
        p.programs.clear();
        assert!(!p.builds(Stage::Scheduled));
        p.programs.push(Box::new(Schedules));
        assert!(p.builds(Stage::Scheduled));
        let (step, report) = p.run(forward()).unwrap();
        assert_eq!(step.apply.graph.stage, Stage::Scheduled);
        let last: Vec<_> = report
            .records
            .iter()
            .rev()
            .take(2)
            .map(|r| r.notes[0].clone())
            .collect();
        assert_eq!(last, ["scheduled apply", "scheduled micro_step"]);
    }

    #[test]
    fn only_runs_on_its_program() {
        let only = Only {
            program: mmc_ir::plan::MICRO_STEP_PROGRAM,
            pass: Simplify,
        };
        assert!(only.applies_to("micro_step") && !only.applies_to("apply"));
        let mut p = cpu(settings());
        p.programs.clear();
        p.programs.push(Box::new(only));
        p.programs.push(Box::new(EachGraph(EnterStage {
            name: "enter-scheduled",
            stage: Stage::Scheduled,
        })));
        let (_, report) = p.run(forward()).unwrap();
        let ran: Vec<(&str, Option<&str>)> = report
            .records
            .iter()
            .skip(9)
            .map(|r| (r.pass, r.program.as_deref()))
            .collect();
        assert_eq!(
            ran,
            [
                ("simplify", Some("micro_step")),
                ("enter-scheduled", Some("micro_step")),
                ("enter-scheduled", Some("apply"))
            ]
        );
        assert!(report
            .to_string()
            .contains("nodes by stage: frontend 9, fused 6, autodiff "));
    }

    #[test]
    fn a_graph_past_the_frontend_is_refused() {
        let mut g = forward();
        g.stage = Stage::Fused;
        let err = cpu(settings()).run(g).err().expect("refused");
        assert!(matches!(
            err,
            PipelineError::NotFrontend { got: Stage::Fused }
        ));
    }

    #[test]
    fn same_program_ignores_scope_numbering_only() {
        let a = forward();
        let (b, _) = simplify(&a).unwrap();
        assert!(same_program(&a, &a.clone()));
        assert!(!same_program(&a, &b));
    }
}
