//! The mmc runtime: replays a compiled plan (state, programs, optimizer steps), reads
//! checkpoints and training data, and reports metrics.

pub mod checkpoint;
pub mod compiled;
pub mod data;
pub mod loss;
pub mod metrics;
pub mod tensor_batches;
pub mod trainer;
pub mod weights;

pub use trainer::{MicroBatch, StepOutcome, TrainError, Trainer, EXPERT_LOAD_OUTPUT};
pub use weights::{Checkpoint, WeightError};
