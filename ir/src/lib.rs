//! The tensor IR of mmc: a typed SSA graph of a small op set, its verifier and shape inference,
//! a text format that round-trips, Graphviz output, and the reference interpreter that every
//! pass and kernel is checked against.

pub mod arena;
pub mod dot;
mod dtype;
pub mod elementwise;
pub mod fused;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod op;
pub mod plan;
pub mod plan_file;
pub mod stacking;
pub mod summary;
pub mod tensor;
pub mod text;
mod types;
pub mod verify;
mod weight_source;

pub use dtype::{DType, UnknownDType};
pub use graph::{Graph, GraphError, Node, NodeId, ReorderError, ScopeId, Stage, Value};
pub use infer::TypeError;
pub use interp::{Interpreter, Outputs, Precision};
pub use op::{BinaryOp, CmpOp, FusedOp, Op, OpClass, ReduceKind, UnaryOp};
pub use tensor::{relative_error, Tensor, TensorData};
pub use types::{DisplayShape, Shape, TensorType};
pub use verify::{verify, VerifyError};
pub use weight_source::WeightSource;
