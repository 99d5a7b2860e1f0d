//! The frontend of mmc: the model DSL, the InternVL3.5 / Qwen3-MoE model definitions, and
//! configuration loading. The frontend says what a model computes, never how to run it fast:
//! it emits primitive ops only.

pub mod config;
pub mod dsl;
pub mod models;
pub mod names;

pub use config::{Config, ConfigError, TextConfig};
pub use dsl::{BuildError, Model, ModelBuilder, Sym};
pub use models::{forward_graph, ForwardOptions, EXPERT_LOAD_OUTPUT};
pub use names::CheckpointLayout;
