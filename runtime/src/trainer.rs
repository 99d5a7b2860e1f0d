//! Replays a plan: holds the persistent state, runs the micro-step program once per
//! micro-batch and the apply program once per optimizer step, and writes program outputs back
//! into the state as the plan says.
//!
//! Programs run on the reference interpreter until code generation lands; the plan, the state
//! and this loop stay the same when they run as kernels.
//!
//! The trainer holds the state the programs read: where the plan stacks logical tensors (a
//! routed MoE's per-expert weights, accumulators and moments, `Plan::stackings`), it holds the
//! stack, and its public view stays logical: [`Trainer::state_specs`], [`Trainer::state`],
//! [`Trainer::set_state`] and [`Trainer::parameters`] name and return the per-expert tensors,
//! so checkpoints are written and read exactly as for an unstacked plan.

use crate::metrics::ExpertLoad;
use crate::weights::{Checkpoint, ParamSpec, WeightError};
use mmc_ir::interp::{Arena, Bindings, InterpError, Precision, Stream};
use mmc_ir::plan::{Init, Plan, StackingError, GRAD_NORM_OUTPUT, LR_INPUT, STEP_INPUT};
use mmc_ir::{Interpreter, Tensor, TensorData};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

/// Why a training step could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// The interpreter's error is part of the message and deliberately not the error's
    /// `source()`, so that printing the chain (`{:#}`) does not repeat it.
    #[error("program `{program}`: {error}")]
    Program {
        program: String,
        error: Box<InterpError>,
    },
    #[error("the plan has no `{0}` program; recompile it with `mmc compile`")]
    MissingProgram(&'static str),
    #[error("the plan's checkpoint {0} is needed but the plan does not name a folder")]
    NoCheckpoint(String),
    #[error("invalid initialiser for `{name}`: {reason}")]
    BadInit { name: String, reason: String },
    /// Every micro-batch of the global batch is all padding (no non-padding token), so there
    /// is nothing to train on. No program ran and the state is unchanged (the step count
    /// included): the caller decides whether to skip the batch or stop.
    #[error(
        "the global batch has no non-padding token ({micro_batches} micro-batch(es), all padding: segment_ids all 0); no optimizer step was taken"
    )]
    EmptyGlobalBatch { micro_batches: usize },
    /// A tensor given to [`Trainer::set_state`] that the plan does not have, or of another
    /// type: a checkpoint is checked against the plan before anything is set, so this names
    /// a caller's mistake rather than bad input.
    #[error("state `{name}`: {reason}")]
    StateMismatch { name: String, reason: String },
    /// A stacking of the plan that does not fit its logical state.
    #[error(transparent)]
    Stacking(#[from] StackingError),
    /// A compiled program failed (bad data such as a token id out of range, or a binding
    /// that does not fit).
    #[error(transparent)]
    Compiled(#[from] crate::compiled::CompiledError),
    /// An expert-load output ([`EXPERT_LOAD_OUTPUT`]) that is not a layer's counts.
    #[error("micro-step output `{name}`: {reason}")]
    ExpertLoadOutput { name: String, reason: String },
}

/// The prefix of the micro-step outputs that count, per MoE layer, the tokens routed to each
/// expert (`moe_load:<layer>`, f32 [experts]); the frontend declares them
/// (`mmc_frontend::EXPERT_LOAD_OUTPUT`, the same string) and [`Trainer::train_step`] sums
/// them into [`StepOutcome::expert_load`].
pub const EXPERT_LOAD_OUTPUT: &str = "moe_load:";

/// One micro-batch: the data inputs of the micro-step program, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MicroBatch(pub BTreeMap<String, Tensor>);

/// What one optimizer step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// The loss of the global batch (sum over the micro-batches that ran, whose weights are
    /// normalised over the global batch), before this step's update.
    pub loss: f64,
    pub lm_loss: f64,
    /// Mean load-balancing loss over the micro-batches that ran.
    pub aux_loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Micro-batches not run because they hold no non-padding token (see
    /// [`Trainer::train_step`]); reported so that a run can say how much of its data was
    /// padding.
    pub skipped_micro_batches: usize,
    /// Tokens per expert of each MoE layer, summed over the micro-batches that ran (the
    /// routing of this step's forward, before its update).
    pub expert_load: ExpertLoad,
}

/// Adds the expert-load outputs of one micro-step to `load`.
fn add_expert_load(
    load: &mut ExpertLoad,
    out: &BTreeMap<String, Tensor>,
) -> Result<(), TrainError> {
    for (name, t) in out.range(EXPERT_LOAD_OUTPUT.to_string()..) {
        let Some(layer) = name.strip_prefix(EXPERT_LOAD_OUTPUT) else {
            break;
        };
        let bad = |reason: String| TrainError::ExpertLoadOutput {
            name: name.clone(),
            reason,
        };
        let layer: usize = layer
            .parse()
            .map_err(|_| bad("the suffix is not a layer index".into()))?;
        if t.shape().len() != 1 {
            return Err(bad(format!("shape {:?}, not [experts]", t.shape())));
        }
        let counts = t
            .to_f64_vec()
            .into_iter()
            .map(|c| {
                (c.is_finite() && c >= 0.0)
                    .then_some(c.round() as u64)
                    .ok_or_else(|| bad(format!("a count of {c}")))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        load.add(layer, &counts).map_err(bad)?;
    }
    Ok(())
}

/// Whether a micro-batch holds no non-padding token: `segment_ids` present and all 0. Such a
/// micro-batch trains nothing (every loss weight is 0), and its load-balancing loss, a mean
/// over non-padding tokens, is 0/0 = NaN, which would poison the step's loss and gradients.
fn all_padding(mb: &MicroBatch) -> bool {
    let Some(t) = mb.0.get("segment_ids") else {
        return false;
    };
    match t.data() {
        TensorData::I64(v) => v.iter().all(|&s| s == 0),
        TensorData::I32(v) => v.iter().all(|&s| s == 0),
        _ => t.to_f64_vec().iter().all(|&s| s == 0.0),
    }
}

/// A plan with its live state.
pub struct Trainer {
    plan: Plan,
    /// What the programs read: logical tensors, and stacks in place of their parts.
    state: HashMap<String, Tensor>,
    /// For each stacked logical tensor, its stacking and its index among the parts.
    stacked: HashMap<String, (usize, usize)>,
    /// The activation arena of the programs that have an interpreter memory plan (their
    /// names in `planned`): allocated once, at the largest of their sizes, and reused by every
    /// program and every step.
    arena: Arena,
    planned: std::collections::HashSet<String>,
    /// Per planned program, the state updates that replace their state as soon as the run
    /// streams them (output name to state name): those whose state no node reads after the
    /// update is computed, and that no other update writes. Other updates wait for the end.
    immediate: HashMap<String, HashMap<String, String>>,
    /// Optimizer steps taken.
    step: u64,
    /// When set, the programs run compiled (kernels and library calls) instead of on the
    /// interpreter.
    compiled: Option<crate::compiled::CompiledRunner>,
}

/// A stable 64-bit hash of a name (FNV-1a), so random init does not depend on state order.
fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

struct Layered<'a>(&'a HashMap<String, Tensor>, &'a BTreeMap<String, Tensor>);

impl Bindings for Layered<'_> {
    fn lookup(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name).or_else(|| self.1.get(name))
    }
}

/// A streaming run's bindings (the state, then the data) and the receiver of its streamed
/// outputs: an update in `immediate` replaces its state at once (dropping the old tensor while
/// the run goes on), every other streamed output is kept for the end of the run.
struct Streaming<'a> {
    state: &'a mut HashMap<String, Tensor>,
    data: &'a BTreeMap<String, Tensor>,
    immediate: Option<&'a HashMap<String, String>>,
    later: BTreeMap<String, Tensor>,
}

impl Bindings for Streaming<'_> {
    fn lookup(&self, name: &str) -> Option<&Tensor> {
        self.state.get(name).or_else(|| self.data.get(name))
    }
}

impl Stream for Streaming<'_> {
    fn stream(&mut self, name: &str, value: Tensor) {
        match self.immediate.and_then(|m| m.get(name)) {
            Some(state) => {
                self.state.insert(state.clone(), value);
            }
            None => {
                self.later.insert(name.to_string(), value);
            }
        }
    }
}

/// The updates of `program` that may replace their state as soon as they are computed: the
/// only update writing that state, from an output no other update takes, whose value is
/// computed at or after every node reading the state (a node reads its operands before its
/// result is streamed). (The interpreter binds a parameter or input
/// at each node that reads it, so the state tensor is needed until its last reader; one that
/// is also returned as an output is needed to the end.)
fn immediate_updates(program: &mmc_ir::plan::Program) -> HashMap<String, String> {
    let g = &program.graph;
    let last_use = g.last_uses();
    let returned: std::collections::HashSet<u32> = g.outputs().iter().map(|(_, v)| v.0).collect();
    let mut last_read: HashMap<&str, usize> = HashMap::new();
    for (i, node) in g.nodes().iter().enumerate() {
        if let mmc_ir::Op::Param { name, .. } | mmc_ir::Op::Input { name, .. } = &node.op {
            let v = node.outputs[0];
            let last = if returned.contains(&v.0) {
                usize::MAX
            } else {
                last_use[v.0 as usize].unwrap_or(i).max(i)
            };
            let e = last_read.entry(name.as_str()).or_insert(last);
            *e = (*e).max(last);
        }
    }
    let count = |f: &dyn Fn(&mmc_ir::plan::StateUpdate) -> bool| {
        program.updates.iter().filter(|u| f(u)).count()
    };
    program
        .updates
        .iter()
        .filter(|u| count(&|o| o.state == u.state) == 1 && count(&|o| o.output == u.output) == 1)
        .filter(|u| {
            let Some(def) = g.output(&u.output).and_then(|v| g.value_data(v)) else {
                return false;
            };
            last_read
                .get(u.state.as_str())
                .is_none_or(|&r| r <= def.node.0 as usize)
        })
        .map(|u| (u.output.clone(), u.state.clone()))
        .collect()
}

impl Trainer {
    /// Verifies the plan's programs (once: each step replays them as they are), then creates
    /// the state: parameters from the plan's checkpoint or seeded random init, optimizer state
    /// zeroed.
    pub fn new(plan: Plan) -> Result<Trainer, TrainError> {
        Self::with_backend(plan, None)
    }

    /// A trainer whose programs run compiled by `runner` (built from the same plan): the
    /// state is created as for [`Trainer::new`], and no interpreter arena is allocated.
    pub fn compiled(
        plan: Plan,
        runner: crate::compiled::CompiledRunner,
    ) -> Result<Trainer, TrainError> {
        Self::with_backend(plan, Some(runner))
    }

    fn with_backend(
        plan: Plan,
        compiled: Option<crate::compiled::CompiledRunner>,
    ) -> Result<Trainer, TrainError> {
        let mut arena = Arena::default();
        let mut planned = std::collections::HashSet::new();
        let mut immediate = HashMap::new();
        for p in &plan.programs {
            let err = |error| TrainError::Program {
                program: p.name.clone(),
                error: Box::new(error),
            };
            mmc_ir::verify(&p.graph).map_err(|e| err(InterpError::Malformed(e)))?;
            // A layout planned for other element sizes (generated code) is not the
            // interpreter's; the program then runs without an arena.
            let interpreted = compiled.is_none();
            if let Some(layout) = p
                .memory
                .as_ref()
                .filter(|l| interpreted && l.elem_bytes.is_words())
            {
                layout
                    .check_words(&p.graph)
                    .map_err(|e| err(InterpError::Layout(e)))?;
                arena
                    .reserve(layout.size)
                    .map_err(|e| err(InterpError::Layout(e)))?;
                planned.insert(p.name.clone());
                immediate.insert(p.name.clone(), immediate_updates(p));
            }
        }
        let mut state = HashMap::new();
        let from_checkpoint: Vec<ParamSpec> = plan
            .state
            .iter()
            .filter_map(|s| match &s.init {
                Init::Checkpoint(src) => Some(ParamSpec {
                    name: s.name.clone(),
                    source: src.clone(),
                    ty: s.ty.clone(),
                }),
                _ => None,
            })
            .collect();
        if !from_checkpoint.is_empty() {
            let dir = plan
                .checkpoint
                .as_ref()
                .ok_or_else(|| TrainError::NoCheckpoint(from_checkpoint[0].name.clone()))?;
            let ckpt = Checkpoint::open(dir)?;
            state.extend(ckpt.load(&from_checkpoint)?);
        }
        for s in &plan.state {
            let n = s.ty.numel();
            // Each value rounded to the state's dtype as it is drawn: no f64 copy of a
            // vocabulary-sized weight is ever held.
            let (dtype, shape) = (s.ty.dtype, s.ty.shape.clone());
            let t = match &s.init {
                Init::Checkpoint(_) => continue,
                Init::Const(c) => Tensor::from_f64_iter(dtype, shape, std::iter::repeat_n(*c, n)),
                Init::Normal { std } => {
                    let normal = Normal::new(0.0, *std).map_err(|e| TrainError::BadInit {
                        name: s.name.clone(),
                        reason: e.to_string(),
                    })?;
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(name_seed(
                        plan.settings.seed,
                        &s.name,
                    ));
                    let draws = (0..n).map(|_| normal.sample(&mut rng));
                    Tensor::from_f64_iter(dtype, shape, draws)
                }
            }
            .expect("sizes come from the type");
            state.insert(s.name.clone(), t);
        }
        // Each stack from its parts, initialised (or loaded) above as an unstacked plan would.
        let mut stacked = HashMap::new();
        for (i, st) in plan.stackings.iter().enumerate() {
            let parts = st
                .parts
                .iter()
                .map(|p| {
                    state
                        .remove(&p.name)
                        .ok_or_else(|| TrainError::StateMismatch {
                            name: p.name.clone(),
                            reason: format!(
                                "stacked into `{}` but not in the plan's state",
                                st.stacked
                            ),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<&Tensor> = parts.iter().collect();
            state.insert(st.stacked.clone(), st.stack(&refs)?);
            for (j, p) in st.parts.iter().enumerate() {
                stacked.insert(p.name.clone(), (i, j));
            }
        }
        Ok(Trainer {
            plan,
            state,
            stacked,
            arena,
            planned,
            immediate,
            step: 0,
            compiled,
        })
    }

    /// Whether the programs run compiled.
    pub fn is_compiled(&self) -> bool {
        self.compiled.is_some()
    }

    /// The compiled runner, to start its profile (`None` on the interpreter).
    pub fn compiled_runner_mut(&mut self) -> Option<&mut crate::compiled::CompiledRunner> {
        self.compiled.as_mut()
    }

    /// The compiled runner, to read its profile.
    pub fn compiled_runner(&self) -> Option<&crate::compiled::CompiledRunner> {
        self.compiled.as_ref()
    }

    /// Bytes of the compiled programs' arena and scratch (0 on the interpreter).
    pub fn compiled_buffer_bytes(&self) -> u64 {
        self.compiled.as_ref().map_or(0, |c| c.buffer_bytes())
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Optimizer steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The current value of a logical state tensor (a parameter, `adam_m:<p>`, ...); a
    /// stacked one is copied out of its stack. A stack itself is found by its name too (what
    /// the programs read), though it is not among [`Trainer::state_specs`].
    pub fn state(&self, name: &str) -> Option<Cow<'_, Tensor>> {
        match self.stacked.get(name) {
            Some(&(i, j)) => {
                let st = &self.plan.stackings[i];
                let whole = self.state.get(&st.stacked)?;
                Some(Cow::Owned(
                    st.read_part(whole, j)
                        .expect("stacks are built to their stacking"),
                ))
            }
            None => self.state.get(name).map(Cow::Borrowed),
        }
    }

    /// The plan's logical state tensors (name, type, kind), in plan order: what a checkpoint
    /// stores and what a loaded checkpoint must fit, whether or not the programs read them
    /// stacked.
    pub fn state_specs(&self) -> &[mmc_ir::plan::StateSpec] {
        &self.plan.state
    }

    /// Replaces a state tensor, which must exist in the plan with the same dtype and shape:
    /// resuming from a checkpoint sets parameters and optimizer moments this way.
    pub fn set_state(&mut self, name: &str, value: Tensor) -> Result<(), TrainError> {
        let mismatch = |reason: String| TrainError::StateMismatch {
            name: name.to_string(),
            reason,
        };
        let spec = self
            .plan
            .state
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| mismatch("the plan has no such state".into()))?;
        if value.dtype() != spec.ty.dtype || value.shape() != spec.ty.shape.as_slice() {
            return Err(mismatch(format!(
                "the plan holds {:?} {:?}, the value is {:?} {:?}",
                spec.ty.dtype,
                spec.ty.shape,
                value.dtype(),
                value.shape()
            )));
        }
        match self.stacked.get(name) {
            Some(&(i, j)) => {
                let st = &self.plan.stackings[i];
                let whole = self.state.remove(&st.stacked).expect("every stack is held");
                let whole = st.write_part(whole, j, &value)?;
                self.state.insert(st.stacked.clone(), whole);
            }
            None => {
                self.state.insert(name.to_string(), value);
            }
        }
        Ok(())
    }

    /// Sets the count of optimizer steps taken: a resumed run continues AdamW's bias
    /// correction (and the caller its LR schedule) from the saved step.
    pub fn set_steps_done(&mut self, steps: u64) {
        self.step = steps;
    }

    /// Bytes of the activation arena (0 when no program has a memory plan).
    pub fn arena_bytes(&self) -> u64 {
        self.arena.bytes()
    }

    /// Bytes of persistent state.
    pub fn state_bytes(&self) -> u64 {
        self.state
            .values()
            .map(|t| (t.numel() * t.dtype().size_bytes()) as u64)
            .sum()
    }

    /// Runs a program and writes its state updates back; returns its other outputs. A planned
    /// program streams its updates out of the arena, and each that can
    /// ([`immediate_updates`]) replaces its state while the program still runs, so a program
    /// that fails part way may leave some of its updates applied.
    fn run(
        &mut self,
        name: &'static str,
        data: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, TrainError> {
        let program = self
            .plan
            .program(name)
            .ok_or(TrainError::MissingProgram(name))?;
        let err = |error| TrainError::Program {
            program: name.to_string(),
            error: Box::new(error),
        };
        if let Some(runner) = &mut self.compiled {
            // Updates are written into the state by the runner; only the rest comes back.
            return Ok(runner.run(name, &mut self.state, data)?);
        }
        let mut rest: BTreeMap<String, Tensor> = match &program.memory {
            Some(layout) if self.planned.contains(name) => {
                let mut io = Streaming {
                    state: &mut self.state,
                    data,
                    immediate: self.immediate.get(name),
                    later: BTreeMap::new(),
                };
                let outputs =
                    Interpreter::for_checked_layout(&program.graph, Precision::Declared, layout)
                        .run_in_stream(&mut self.arena, &mut io)
                        .map_err(err)?;
                let mut rest = io.later;
                rest.extend(outputs.0);
                rest
            }
            _ => Interpreter::for_verified(&program.graph, Precision::Declared)
                .run(&Layered(&self.state, data))
                .map_err(err)?
                .0
                .into_iter()
                .collect(),
        };
        for u in &program.updates {
            if let Some(t) = rest.remove(&u.output) {
                self.state.insert(u.state.clone(), t);
            }
        }
        Ok(rest)
    }

    /// One optimizer step over the micro-batches of a global batch, at learning rate `lr`.
    ///
    /// A micro-batch with no non-padding token (`segment_ids` all 0) is not run and is
    /// counted in [`StepOutcome::skipped_micro_batches`]: it has no trained label, so it adds
    /// nothing to the loss or the gradients, but its load-balancing loss would be NaN (a mean
    /// over no tokens). The step is then exactly the step over the other micro-batches. A
    /// micro-batch that has tokens but no trained label still runs: its load-balancing loss is
    /// valid, and InternVL's dummy image of a text-only sample must go through the ViT.
    ///
    /// When every micro-batch is skipped (or there is none) this returns [`TrainError::EmptyGlobalBatch`]
    /// without running `apply` (AdamW would still move the weights on zero gradients through
    /// momentum and decay) and without advancing the step count.
    pub fn train_step(
        &mut self,
        micro_batches: &[MicroBatch],
        lr: f64,
    ) -> Result<StepOutcome, TrainError> {
        let scalar = |name: &str, out: &BTreeMap<String, Tensor>| -> f64 {
            out.get(name).map_or(0.0, |t| t.to_f64_vec()[0])
        };
        let to_run: Vec<&MicroBatch> = micro_batches.iter().filter(|m| !all_padding(m)).collect();
        let skipped = micro_batches.len() - to_run.len();
        if to_run.is_empty() {
            return Err(TrainError::EmptyGlobalBatch {
                micro_batches: skipped,
            });
        }
        let (mut loss, mut lm_loss, mut aux) = (0.0, 0.0, 0.0);
        let mut expert_load = ExpertLoad::default();
        for mb in &to_run {
            let out = self.run("micro_step", &mb.0)?;
            loss += scalar("loss", &out);
            lm_loss += scalar("lm_loss", &out);
            aux += scalar("aux_loss", &out);
            add_expert_load(&mut expert_load, &out)?;
        }
        self.step += 1;
        let mut scalars = BTreeMap::new();
        let s = |v: f64| Tensor::new(vec![], TensorData::F32(vec![v as f32])).expect("scalar");
        scalars.insert(STEP_INPUT.to_string(), s(self.step as f64));
        scalars.insert(LR_INPUT.to_string(), s(lr));
        let out = self.run("apply", &scalars)?;
        Ok(StepOutcome {
            loss,
            lm_loss,
            aux_loss: aux / to_run.len().max(1) as f64,
            grad_norm: scalar(GRAD_NORM_OUTPUT, &out),
            skipped_micro_batches: skipped,
            expert_load,
        })
    }

    /// The current parameters (trainable or frozen), by name.
    pub fn parameters(&self) -> BTreeMap<String, Tensor> {
        self.plan
            .state
            .iter()
            .filter(|s| matches!(s.kind, mmc_ir::plan::StateKind::Parameter { .. }))
            .filter_map(|s| {
                self.state(&s.name)
                    .map(|t| (s.name.clone(), t.into_owned()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{add_expert_load, immediate_updates, TrainError};
    use crate::metrics::ExpertLoad;
    use mmc_ir::{Tensor, TensorData};
    use std::collections::BTreeMap;

    /// The expert-load outputs of micro-steps are summed per layer; other outputs are not
    /// read, and an output that is not a layer's counts is an error naming it.
    #[test]
    fn expert_load_outputs_are_summed_per_layer() {
        let t = |v: Vec<f32>| Tensor::new(vec![v.len()], TensorData::F32(v)).unwrap();
        let out = |a: Vec<f32>, b: Vec<f32>| {
            BTreeMap::from([
                ("loss".to_string(), t(vec![2.0])),
                ("moe_load:1".to_string(), t(a)),
                ("moe_load:10".to_string(), t(b)),
                ("z".to_string(), t(vec![7.0])),
            ])
        };
        let mut load = ExpertLoad::default();
        add_expert_load(&mut load, &out(vec![1.0, 3.0], vec![0.0, 4.0, 0.0])).unwrap();
        add_expert_load(&mut load, &out(vec![2.0, 2.0], vec![1.0, 1.0, 2.0])).unwrap();
        assert_eq!(
            load.0,
            BTreeMap::from([(1, vec![3, 5]), (10, vec![1, 5, 2])])
        );
        for (name, v) in [("moe_load:x", vec![1.0]), ("moe_load:2", vec![f32::NAN])] {
            let bad = BTreeMap::from([(name.to_string(), t(v))]);
            let e = add_expert_load(&mut load, &bad).unwrap_err();
            assert!(matches!(e, TrainError::ExpertLoadOutput { .. }), "{e}");
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    use mmc_ir::plan::{Program, StateUpdate};
    use mmc_ir::{DType, Graph, Op, ScopeId, Stage, TensorType, UnaryOp};

    /// An update replaces its state at once only when every read of that state comes before
    /// it: a zeroing computed before the accumulator is read, or a state updated twice, waits.
    #[test]
    fn only_updates_after_every_read_of_their_state_are_immediate() {
        let t = TensorType::new(DType::F32, vec![2]);
        let mut g = Graph::new(Stage::Autodiff);
        let add = |g: &mut Graph, op: Op, ins: &[mmc_ir::Value]| {
            let id = g.add_node(op, ins, ScopeId::default()).expect("valid node");
            g.result(id)
        };
        let zero = add(
            &mut g,
            Op::Const {
                value: 0.0,
                ty: t.clone(),
            },
            &[],
        );
        let acc = add(
            &mut g,
            Op::Param {
                name: "acc".into(),
                ty: t.clone(),
            },
            &[],
        );
        let w = add(
            &mut g,
            Op::Param {
                name: "w".into(),
                ty: t.clone(),
            },
            &[],
        );
        let w_new = add(&mut g, Op::Unary(UnaryOp::Neg), &[w]);
        let acc_neg = add(&mut g, Op::Unary(UnaryOp::Neg), &[acc]);
        g.add_output("acc_zero", zero);
        g.add_output("w_new", w_new);
        g.add_output("acc_neg", acc_neg);
        let up = |output: &str, state: &str| StateUpdate {
            output: output.into(),
            state: state.into(),
        };
        let p = Program::new(
            "apply",
            g.clone(),
            vec![up("acc_zero", "acc"), up("w_new", "w")],
        );
        let m = immediate_updates(&p);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m.get("w_new").map(String::as_str), Some("w"));
        // Two updates of one state keep the plan's order: both wait.
        let p = Program::new(
            "apply",
            g,
            vec![up("w_new", "w"), up("acc_neg", "w"), up("acc_neg", "acc")],
        );
        assert!(immediate_updates(&p).is_empty());

        // The interpreter binds an input at each reader: an update computed between two reads
        // of its state waits for the second.
        let mut g = Graph::new(Stage::Autodiff);
        let m = add(
            &mut g,
            Op::Input {
                name: "m".into(),
                ty: t.clone(),
            },
            &[],
        );
        let first = add(&mut g, Op::Unary(UnaryOp::Neg), &[m]);
        let m_new = add(&mut g, Op::Unary(UnaryOp::Exp), &[first]);
        let second = add(&mut g, Op::Unary(UnaryOp::Abs), &[m]);
        g.add_output("m_new", m_new);
        g.add_output("other", second);
        let p = Program::new("apply", g, vec![up("m_new", "m")]);
        assert!(immediate_updates(&p).is_empty());
    }
}
