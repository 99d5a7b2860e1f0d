//! Code generation of mmc: the target-independent kernel IR, the CPU backend (LLVM), and the
//! execution plan.

pub mod compiled;
#[cfg(feature = "llvm")]
pub mod cpu;
pub mod kernel;
pub mod library;
pub mod loops;
pub mod native;
pub mod ops;
pub mod plan;

pub use plan::{build_plan, PlanBuildError, PlanRequest, Weights};
