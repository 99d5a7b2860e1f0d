//! Plan emission: the training step's programs and state, assembled into the plan that
//! `mmc run` replays. The programs come from the pass pipeline (`mmc_passes::pipeline`); this
//! module only decides where each state tensor starts from. (Kernels join the plan with the
//! CPU and Ascend backends.)

use mmc_ir::plan::{
    expand_stackings, Init, ParamStacking, Plan, StateKind, StateSpec, TrainSettings,
};
use mmc_ir::WeightSource;
use mmc_passes::TrainStep;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Why a plan could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PlanBuildError {
    #[error("parameter `{0}` has no initialiser and no checkpoint to load it from")]
    NoInit(String),
    #[error("internal error in the expert stacking: {0}")]
    Stacking(#[from] mmc_ir::stacking::StackingError),
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
    /// The training step as the pass pipeline left it: its programs and state.
    pub step: TrainStep,
    pub weights: Weights<'a>,
    pub settings: TrainSettings,
    /// The stacked parameters the programs read (the routed MoE's expert stacks), each
    /// assembled from logical per-expert state.
    pub stackings: Vec<ParamStacking>,
}

/// Lays out the state of the training step (each tensor with where it starts from) and
/// assembles the plan.
pub fn build_plan(req: PlanRequest) -> Result<Plan, PlanBuildError> {
    let step = req.step;
    // The state stays logical (per-expert tensors, as checkpoints name them); the stackings
    // say how the programs' stacked tensors are assembled from it, for every role (the
    // parameter, its gradient accumulator and its moments).
    let (logical, stackings) = expand_stackings(step.state, &req.stackings)?;
    let mut state = Vec::with_capacity(logical.len());
    for (name, ty, kind) in logical {
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
        stackings,
    })
}
