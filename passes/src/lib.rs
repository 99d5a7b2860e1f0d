//! The passes of mmc: plain functions from graph to graph, run in one declared order by the
//! pass manager ([`pipeline`]), which checks each result with the verifier.

pub mod autodiff;
pub mod cost;
pub mod emit;
pub mod fuse;
pub mod fuse_accumulate;
pub mod fuse_elementwise;
pub mod fuse_loss_grad;
pub mod memory;
pub mod optimizer;
pub mod pipeline;
pub mod rebuild;
pub mod recompute;
pub mod schedule;
pub mod simplify;
pub mod train_step;

pub use autodiff::{autodiff, grad_output, AutodiffError, GRAD_PREFIX};
pub use emit::{Emitter, PassError};
pub use pipeline::{Pass, Pipeline, PipelineError, PipelineReport};
pub use recompute::{
    activation_peak, live_values, recompute, LivePeak, RecomputeError, RecomputeMode,
    RecomputeReport,
};
pub use simplify::{simplify, SimplifyReport};
pub use train_step::{assemble, train_step, TrainStep, TrainStepSpec};
