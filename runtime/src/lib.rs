//! The mmc runtime: checkpoints (and, with later stages, plan execution and the data pipeline).

pub mod weights;

pub use weights::{Checkpoint, WeightError};
