//! Plan emission: the training step's programs and state, assembled into the plan that
//! `mmc run` replays. (Kernels join the plan with the CPU and Ascend backends.)

use mmc_ir::plan::{Init, Plan, StateKind, StateSpec, TrainSettings};
use mmc_ir::{Graph, TensorType, WeightSource};
use mmc_passes::optimizer::AdamW;
use mmc_passes::{train_step, AutodiffError, TrainStepSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Why a plan could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PlanBuildError {
    #[error(transparent)]
    Autodiff(#[from] AutodiffError),
    #[error("parameter `{0}` has no initialiser and no checkpoint to load it from")]
    NoInit(String),
}

/// Where the initial weights come from.
pub enum Weights<'a> {
    /// A checkpoint folder, and where each parameter lives in it.
    Checkpoint {
        dir: PathBuf,
        source: &'a dyn Fn(&str) -> WeightSource,
    },
    /// The model's own seeded random initialisers.
    Random(&'a BTreeMap<String, Init>),
}

/// Everything a training plan is made of.
pub struct PlanRequest<'a> {
    /// The model's forward graph with a scalar `loss` output.
    pub forward: &'a Graph,
    pub weights: Weights<'a>,
    pub settings: TrainSettings,
    pub trainable: &'a dyn Fn(&str) -> bool,
    pub decay: &'a dyn Fn(&str, &TensorType) -> bool,
    pub adamw: AdamW,
}

/// Differentiates the forward graph, builds the optimizer step, and lays out the state.
pub fn build_plan(req: PlanRequest) -> Result<Plan, PlanBuildError> {
    let step = train_step(
        req.forward,
        &TrainStepSpec {
            loss: "loss",
            trainable: req.trainable,
            decay: req.decay,
            adamw: req.adamw,
        },
    )?;
    let mut state = Vec::with_capacity(step.state.len());
    for (name, ty, kind) in step.state {
        let init = match (&kind, &req.weights) {
            (StateKind::Parameter { .. }, Weights::Checkpoint { source, .. }) => {
                Init::Checkpoint(source(&name))
            }
            (StateKind::Parameter { .. }, Weights::Random(inits)) => inits
                .get(&name)
                .cloned()
                .ok_or_else(|| PlanBuildError::NoInit(name.clone()))?,
            _ => Init::Const(0.0),
        };
        state.push(StateSpec {
            name,
            ty,
            init,
            kind,
        });
    }
    let checkpoint = match req.weights {
        Weights::Checkpoint { dir, .. } => Some(dir),
        Weights::Random(_) => None,
    };
    Ok(Plan {
        settings: req.settings,
        checkpoint,
        state,
        programs: vec![step.micro_step, step.apply],
        stackings: Vec::new(),
    })
}
