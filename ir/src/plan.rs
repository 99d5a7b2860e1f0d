//! The execution plan: what `mmc compile` writes and `mmc run` replays.
//!
//! A plan is the lowest form of a training job: the persistent state (parameters, optimizer
//! moments, gradient accumulators) with how each is initialised, the programs that run every
//! step (a micro-step that adds one micro-batch's gradients to the accumulators, and an apply
//! step that clips and updates), which program outputs overwrite which state, and the settings
//! the runtime needs (batch geometry, learning-rate schedule, loss reduction). Programs are IR
//! graphs; their kernels travel beside them in the plan file as a native library
//! ([`crate::plan_file`]: a binary container with a magic, the format version, the target, and
//! a SHA-256 per section), so that a plan from another version of mmc or for another machine is
//! rejected with a clear message and any damage to the file is found at load. A plan whose
//! bytes are intact is still checked for settings out of range and for programs that do not
//! fit its state, so a hand-made plan is refused instead of failing mid-run.

use crate::arena::ArenaLayout;
use crate::plan_file::{self, PlanFile, INTERPRETER_TARGET};
pub use crate::stacking::{ParamStacking, StackPart, StackingError};
use crate::text;
use crate::verify::verify;
use crate::{Graph, TensorType, WeightSource};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The plan format this build reads and writes.
///
/// 3: the plan lists its parameter stackings (`Plan::stackings`), and each program may carry
/// its arena layout (`Program::memory`).
/// 4: a binary container ([`crate::plan_file`]): magic, version, target, a section table with
/// a SHA-256 per section; the plan body in postcard, an optional native library.
/// 5: compiled programs take bf16: GEMM calls over bf16 and a strided GEMM's three dtypes.
pub const PLAN_FORMAT_VERSION: u32 = 5;

/// The per-step scalar inputs of the apply program: the optimizer step (from 1) and the
/// learning rate, both f32 scalars.
pub const STEP_INPUT: &str = "step";
pub const LR_INPUT: &str = "lr";
/// The apply program's report of the global gradient norm before clipping.
pub const GRAD_NORM_OUTPUT: &str = "grad_norm";
/// The programs every plan holds: one micro-batch's forward and backward, and the update.
pub const MICRO_STEP_PROGRAM: &str = "micro_step";
pub const APPLY_PROGRAM: &str = "apply";

/// How per-token losses are averaged over the global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossReduction {
    /// Every labelled token weighs the same.
    #[default]
    Token,
    /// Every sample weighs the same (MindSpeed-MM's per_sample_loss).
    Sample,
    /// A sample of n labelled tokens weighs 1/sqrt(n) per token (InternVL).
    Square,
}

/// How the learning rate decays after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrDecayStyle {
    #[default]
    Constant,
    Cosine,
    Linear,
}

/// Megatron's learning-rate schedule: linear warm-up, then constant, linear or cosine decay
/// to `min_lr` over the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_iters: usize,
    /// Warm-up as a fraction of the run (Megatron's `--lr-warmup-fraction`); it keeps its
    /// fraction (0.1 of 25 iterations is 2.5 warm-up iterations). Exclusive with a non-zero
    /// `warmup_iters`, as in Megatron.
    pub warmup_fraction: Option<f64>,
    pub decay_style: LrDecayStyle,
}

impl LrSchedule {
    /// The learning rate Megatron's `OptimizerParamScheduler.get_lr` gives after `n` scheduler
    /// steps of a run of `train_iters` (warm-up while `n <= warmup`, then decay to `min_lr`).
    pub fn megatron_lr(&self, n: u64, train_iters: u64) -> f64 {
        let decay_steps = train_iters as f64;
        let warmup = match self.warmup_fraction {
            Some(f) => f * decay_steps,
            None => self.warmup_iters as f64,
        };
        let s = n as f64;
        if warmup > 0.0 && s <= warmup {
            return self.lr * s / warmup;
        }
        if self.decay_style == LrDecayStyle::Constant {
            return self.lr;
        }
        if s > decay_steps {
            return self.min_lr;
        }
        let ratio = (s - warmup) / (decay_steps - warmup);
        let coeff = match self.decay_style {
            LrDecayStyle::Linear => 1.0 - ratio,
            LrDecayStyle::Cosine => 0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0),
            LrDecayStyle::Constant => 1.0,
        };
        self.min_lr + coeff * (self.lr - self.min_lr)
    }

    /// Checks the values against Megatron's argument validation; messages name the model
    /// TOML's `[train]` keys.
    pub fn check(&self) -> Result<(), String> {
        for (key, v) in [("lr", self.lr), ("min_lr", self.min_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("`{key}` must be a finite number >= 0, not {v}"));
            }
        }
        if self.min_lr > self.lr {
            return Err(format!(
                "`min_lr` ({}) is above `lr` ({}); the schedule decays from lr to min_lr",
                self.min_lr, self.lr
            ));
        }
        if let Some(f) = self.warmup_fraction {
            if !(0.0..=1.0).contains(&f) {
                return Err(format!(
                    "`lr_warmup_fraction` must be between 0 and 1, not {f}"
                ));
            }
            if self.warmup_iters > 0 {
                return Err(format!(
                    "give `lr_warmup_iters` ({}) or `lr_warmup_fraction` ({f}), not both (Megatron refuses the pair)",
                    self.warmup_iters
                ));
            }
        }
        Ok(())
    }

    /// The learning rate applied by optimizer step `step` (counted from 1). Megatron steps its
    /// scheduler after each update, so update `k` uses the rate of `k - 1` scheduler steps
    /// (0 for the first update of a warm-up, as in MindSpeed-MM).
    pub fn lr_at(&self, step: u64, train_iters: u64) -> f64 {
        self.megatron_lr(step.saturating_sub(1), train_iters)
    }
}

/// What the data pipeline must know about the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    pub vocab_size: usize,
    /// `<IMG_CONTEXT>`; `None` for a text-only model.
    pub img_context_token_id: Option<i64>,
    /// Tile side in pixels and language tokens per tile (vision models only).
    pub tile_size: Option<usize>,
    pub tokens_per_tile: Option<usize>,
    pub template: Option<String>,
}

/// Settings the runtime applies around the programs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub micro_batch_size: usize,
    pub seq_length: usize,
    /// Image tile slots per micro-batch (0 for a text-only model).
    pub max_tiles: usize,
    /// Micro-batches per optimizer step on each data-parallel rank.
    pub grad_accum_steps: usize,
    pub data_parallel: usize,
    pub schedule: LrSchedule,
    pub loss_reduction: LossReduction,
    pub seed: u64,
    pub model: ModelFacts,
}

impl TrainSettings {
    /// Checks that the runtime can work with these settings: every size at least 1, the
    /// schedule valid, the vision facts consistent.
    pub fn check(&self) -> Result<(), String> {
        let at_least = |key: &str, v: usize, min: usize| {
            (v >= min)
                .then_some(())
                .ok_or_else(|| format!("`{key}` is {v}, but it must be at least {min}"))
        };
        at_least("micro_batch_size", self.micro_batch_size, 1)?;
        at_least("seq_length", self.seq_length, 2)?;
        at_least("grad_accum_steps", self.grad_accum_steps, 1)?;
        at_least("data_parallel", self.data_parallel, 1)?;
        at_least("vocab_size", self.model.vocab_size, 1)?;
        self.schedule.check()?;
        let m = &self.model;
        match (m.tile_size, m.tokens_per_tile, m.img_context_token_id) {
            (None, None, None) => {
                if self.max_tiles != 0 {
                    return Err(format!(
                        "`max_tiles` is {} for a model without a vision part",
                        self.max_tiles
                    ));
                }
            }
            (Some(tile), Some(tokens), Some(id)) => {
                at_least("tile_size", tile, 1)?;
                at_least("tokens_per_tile", tokens, 1)?;
                at_least("max_tiles", self.max_tiles, 1)?;
                if !(0..m.vocab_size as i64).contains(&id) {
                    return Err(format!(
                        "`img_context_token_id` {id} is outside the vocabulary ({})",
                        m.vocab_size
                    ));
                }
            }
            _ => {
                return Err(
                    "the vision facts (tile_size, tokens_per_tile, img_context_token_id) are incomplete"
                        .into(),
                )
            }
        }
        Ok(())
    }
}

/// How a piece of state gets its first value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Read from the plan's checkpoint.
    Checkpoint(WeightSource),
    /// Normal with mean 0, seeded by the plan's seed and the state's name.
    Normal { std: f64 },
    /// Every element equal (zeros, ones, a layer-scale value).
    Const(f64),
}

/// What a piece of state is, for checkpoints and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    Parameter {
        trainable: bool,
    },
    /// AdamW first or second moment.
    OptimizerMoment,
    GradAccumulator,
}

/// One persistent tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateSpec {
    pub name: String,
    #[serde(with = "type_text")]
    pub ty: TensorType,
    pub init: Init,
    pub kind: StateKind,
}

/// A program output that becomes the new value of a state tensor after the program runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateUpdate {
    pub output: String,
    pub state: String,
}

/// One graph the runtime runs, with the state it overwrites. Its params and inputs are bound by
/// name: to state first, then to per-step data and scalars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    #[serde(with = "graph_text")]
    pub graph: Graph,
    pub updates: Vec<StateUpdate>,
    /// Where each computed value lives in the program's activation arena, when the memory
    /// planner ran: the runtime allocates the arena once and runs every step in it. Checked
    /// against the graph at load. (Always serialised: the plan body's format, postcard, has no
    /// field names, so a skipped field would shift every later one.)
    #[serde(default)]
    pub memory: Option<ArenaLayout>,
}

impl Program {
    /// A program without a memory plan (its values are allocated as they are computed).
    pub fn new(name: impl Into<String>, graph: Graph, updates: Vec<StateUpdate>) -> Self {
        Program {
            name: name.into(),
            graph,
            updates,
            memory: None,
        }
    }
}

/// A whole training plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub settings: TrainSettings,
    /// The checkpoint folder `Init::Checkpoint` reads from, as `mmc compile` found it: the
    /// TOML's `init_from_hf_path` beside the TOML or from the working directory, never made
    /// absolute by mmc (a relative path is opened from the working directory of `mmc run`).
    pub checkpoint: Option<PathBuf>,
    /// The logical state: every tensor as checkpoints and an unfused plan know it (the
    /// per-expert weights of a routed MoE included), with how it starts.
    pub state: Vec<StateSpec>,
    pub programs: Vec<Program>,
    /// Stacked state tensors that the programs read and write instead of some logical ones
    /// (a routed MoE's `[E, H, 2I]` expert weights, their accumulators and moments). The
    /// runtime holds each stack and gives checkpoints its parts under their logical names.
    pub stackings: Vec<ParamStacking>,
}

/// The state of a plan whose programs read stacked tensors: each entry of `state` that is a
/// stacked parameter of `params`, or a tensor derived from one by a role prefix (the
/// accumulator `grad_acc:<p>`, the moments `adam_m:<p>`, `adam_v:<p>`: any `<role>:<p>`) of the
/// stacked type, is replaced by its logical parts (named with the same prefix, of the same
/// kind), and its stacking is returned. Plan emission calls it on the training step's state,
/// then gives the logical entries their initialisers as it does for an unfused plan.
#[allow(clippy::type_complexity)]
pub fn expand_stackings(
    state: Vec<(String, TensorType, StateKind)>,
    params: &[ParamStacking],
) -> Result<(Vec<(String, TensorType, StateKind)>, Vec<ParamStacking>), StackingError> {
    for p in params {
        p.check()?;
    }
    let by_name: BTreeMap<&str, &ParamStacking> =
        params.iter().map(|p| (p.stacked.as_str(), p)).collect();
    let mut out = Vec::with_capacity(state.len());
    let mut stackings = Vec::new();
    for (name, ty, kind) in state {
        let (prefix, base) = match name.rsplit_once(':') {
            Some((role, base)) if by_name.contains_key(base) => (format!("{role}:"), base),
            _ => (String::new(), name.as_str()),
        };
        match by_name.get(base) {
            Some(p) => {
                if ty != p.ty {
                    return Err(StackingError {
                        stacked: name.clone(),
                        message: format!("the state is {ty}, the stacking is {}", p.ty),
                    });
                }
                let s = p.with_prefix(&prefix);
                for i in 0..s.parts.len() {
                    out.push((s.parts[i].name.clone(), s.part_type(i), kind));
                }
                stackings.push(s);
            }
            None => out.push((name, ty, kind)),
        }
    }
    Ok((out, stackings))
}

/// Why a plan could not be read or written. Every message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an mmc plan (it does not start with `MMCPLAN`); write one with `mmc compile`", path.display())]
    NotAPlan { path: PathBuf },
    #[error("{}: written in plan format {found}, but this mmc reads format {PLAN_FORMAT_VERSION} only; recompile it with this version's `mmc compile`", path.display())]
    Version { path: PathBuf, found: String },
    #[error("{}: compiled for `{plan}`, but this machine runs `{host}` ({difference}); recompile it on this machine with `mmc compile`", path.display())]
    Target {
        path: PathBuf,
        plan: String,
        host: String,
        difference: String,
    },
    #[error("{}: the plan is damaged: the file is cut short in its {part}, {} bytes are missing; copy it again or recompile it with `mmc compile`", path.display(), if *exact { missing.to_string() } else { format!("at least {missing}") })]
    Truncated {
        path: PathBuf,
        /// Where the file ends: the header (and which field) or a section.
        part: String,
        missing: u64,
        /// Whether `missing` is the exact count (a cut in a section) or a lower bound (a cut
        /// in the header, before the section table says how long the file is).
        exact: bool,
    },
    #[error("{}: the plan is damaged: its {section} does not match its SHA-256 checksum (changed after `mmc compile` wrote it); recompile it with `mmc compile`", path.display())]
    Section {
        path: PathBuf,
        section: &'static str,
    },
    #[error("{}: the plan is damaged: {extra} bytes follow its last section; recompile it with `mmc compile`", path.display())]
    TrailingBytes { path: PathBuf, extra: u64 },
    /// The message can quote the damaged text; its line breaks are shown escaped.
    #[error("{}: the plan is damaged: {}; recompile it with `mmc compile`", path.display(), message.replace('\n', "\\n"))]
    Malformed { path: PathBuf, message: String },
}

impl Plan {
    /// The program called `name`.
    pub fn program(&self, name: &str) -> Option<&Program> {
        self.programs.iter().find(|p| p.name == name)
    }

    /// Serialises the plan as a plan file for the interpreter (no native code): see
    /// [`PlanFile`] for a plan with its kernels.
    pub fn to_bytes(&self) -> Vec<u8> {
        plan_file::encode(self, INTERPRETER_TARGET, None, None)
    }

    /// Writes the plan as [`Plan::to_bytes`] does; the file appears complete or not at all.
    pub fn write(&self, path: &Path) -> Result<(), PlanError> {
        plan_file::write_atomically(path, &self.to_bytes())
    }

    /// Reads and verifies a plan file; its programs, whatever target its native code is for
    /// (the interpreter runs any plan's IR). [`PlanFile::read`] keeps the target and the code.
    pub fn read(path: &Path) -> Result<Plan, PlanError> {
        PlanFile::read(path).map(|f| f.plan)
    }

    /// Parses plan-file bytes as [`Plan::read`] does; `path` names the plan in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Plan, PlanError> {
        PlanFile::from_bytes(path, bytes).map(|f| f.plan)
    }

    /// Decodes and checks a plan body whose hash the container has checked: the postcard
    /// bytes (all of them), the settings, then the programs against the state.
    pub(crate) fn from_body(path: &Path, body: &[u8]) -> Result<Plan, PlanError> {
        let damaged = |message: String| PlanError::Malformed {
            path: path.to_path_buf(),
            message,
        };
        LAST_CUSTOM_ERROR.with(|m| m.borrow_mut().take());
        let (plan, rest): (Plan, _) = postcard::take_from_bytes(body).map_err(|e| {
            let custom = LAST_CUSTOM_ERROR.with(|m| m.borrow_mut().take());
            match (e, custom) {
                (postcard::Error::SerdeDeCustom, Some(m)) => damaged(format!("its plan body: {m}")),
                (e, _) => damaged(format!("its plan body: {e}")),
            }
        })?;
        if !rest.is_empty() {
            return Err(damaged(format!(
                "its plan body has {} bytes after the plan",
                rest.len()
            )));
        }
        plan.settings
            .check()
            .map_err(|m| damaged(format!("settings: {m}")))?;
        plan.check_programs().map_err(damaged)?;
        Ok(plan)
    }

    /// Checks each stacking against the logical state: its parts are state tensors of the
    /// part type and one kind, each in one stacking, and its name is new. Then replaces, in
    /// `state`, the parts by the stacks: what the programs may read and write.
    fn check_stackings<'a>(
        &'a self,
        state: &mut BTreeMap<&'a str, &'a TensorType>,
    ) -> Result<(), String> {
        let kinds: BTreeMap<&str, StateKind> = self
            .state
            .iter()
            .map(|s| (s.name.as_str(), s.kind))
            .collect();
        let mut parts = std::collections::BTreeSet::new();
        for st in &self.stackings {
            st.check().map_err(|e| e.to_string())?;
            if kinds.contains_key(st.stacked.as_str()) {
                return Err(format!(
                    "stacking `{}` has the name of a logical state tensor",
                    st.stacked
                ));
            }
            let mut kind = None;
            for (i, p) in st.parts.iter().enumerate() {
                let want = st.part_type(i);
                match (state.get(p.name.as_str()), kinds.get(p.name.as_str())) {
                    (Some(t), Some(k)) if **t == want => {
                        if kind.get_or_insert(*k) != k {
                            return Err(format!(
                                "stacking `{}` mixes kinds of state (`{}`)",
                                st.stacked, p.name
                            ));
                        }
                    }
                    (Some(t), _) => {
                        return Err(format!(
                            "stacking `{}` takes `{}` as {want}, but the state is {t}",
                            st.stacked, p.name
                        ))
                    }
                    _ => {
                        return Err(format!(
                            "stacking `{}` takes `{}`, which is not in the plan's state",
                            st.stacked, p.name
                        ))
                    }
                }
                if !parts.insert(p.name.as_str()) {
                    return Err(format!("`{}` is stacked twice", p.name));
                }
            }
        }
        for p in &parts {
            state.remove(p);
        }
        for st in &self.stackings {
            if state.insert(st.stacked.as_str(), &st.ty).is_some() {
                return Err(format!("two stackings are called `{}`", st.stacked));
            }
        }
        Ok(())
    }

    /// Checks that each program verifies, that its memory layout (if any) fits it, that its
    /// params are state of the same type, and
    /// that each update writes an existing state from an output of the same type.
    fn check_programs(&self) -> Result<(), String> {
        let mut state: BTreeMap<&str, &TensorType> = self
            .state
            .iter()
            .map(|s| (s.name.as_str(), &s.ty))
            .collect();
        if state.len() != self.state.len() {
            return Err("two state tensors have the same name".into());
        }
        self.check_stackings(&mut state)?;
        for name in [MICRO_STEP_PROGRAM, APPLY_PROGRAM] {
            if self.program(name).is_none() {
                return Err(format!("there is no `{name}` program"));
            }
        }
        for p in &self.programs {
            verify(&p.graph).map_err(|e| format!("program `{}`: {e}", p.name))?;
            if let Some(layout) = &p.memory {
                layout
                    .check(&p.graph)
                    .map_err(|e| format!("program `{}`: its memory layout: {e}", p.name))?;
            }
            for (name, ty, _) in p.graph.params() {
                match state.get(name) {
                    Some(t) if *t == ty => {}
                    Some(t) => {
                        return Err(format!(
                            "program `{}` reads state `{name}` as {ty}, but the state is {t}",
                            p.name
                        ))
                    }
                    None => {
                        return Err(format!(
                            "program `{}` reads `{name}`, which is not in the plan's state",
                            p.name
                        ))
                    }
                }
            }
            let outputs: BTreeMap<&str, &TensorType> = p
                .graph
                .outputs()
                .iter()
                .map(|(n, v)| (n.as_str(), p.graph.ty(*v)))
                .collect();
            for u in &p.updates {
                let (Some(o), Some(t)) =
                    (outputs.get(u.output.as_str()), state.get(u.state.as_str()))
                else {
                    return Err(format!(
                        "program `{}` updates `{}` from `{}`, but one of them does not exist",
                        p.name, u.state, u.output
                    ));
                };
                if o != t {
                    return Err(format!(
                        "program `{}` writes {o} output `{}` into {t} state `{}`",
                        p.name, u.output, u.state
                    ));
                }
            }
        }
        Ok(())
    }
}

thread_local! {
    /// The message of the last failure of one of the plan's own deserialisers (a type, a
    /// graph, a layout): postcard keeps only the fact of a custom error, not its text.
    static LAST_CUSTOM_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// A deserialiser's error that keeps its message for [`Plan::from_body`] (see
/// `LAST_CUSTOM_ERROR`); formats that keep messages themselves (JSON) get it too.
pub(crate) fn custom_error<E: serde::de::Error>(message: impl std::fmt::Display) -> E {
    let message = message.to_string();
    let e = E::custom(&message);
    LAST_CUSTOM_ERROR.with(|m| *m.borrow_mut() = Some(message));
    e
}

pub(crate) mod type_text {
    use crate::TensorType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &TensorType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TensorType, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(super::custom_error)
    }
}

mod graph_text {
    use super::text;
    use crate::Graph;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(g: &Graph, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text::print(g))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Graph, D::Error> {
        let s = String::deserialize(d)?;
        text::parse(&s).map_err(super::custom_error)
    }
}
