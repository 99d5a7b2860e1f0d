//! The passes of mmc: plain functions from graph to graph, each checked by the verifier.

pub mod autodiff;
pub mod emit;
pub mod memory;
pub mod optimizer;
pub mod schedule;
pub mod train_step;

pub use autodiff::{autodiff, grad_output, AutodiffError, GRAD_PREFIX};
pub use emit::{Emitter, PassError};
pub use train_step::{train_step, TrainStep, TrainStepSpec};
