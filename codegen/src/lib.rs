//! Code generation of mmc: the execution plan now; CPU (LLVM) and Ascend kernels later.

pub mod plan;

pub use plan::{build_plan, PlanBuildError, PlanRequest, Weights};
