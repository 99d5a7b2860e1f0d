//! The textual form of graphs: a stable printer and a parser that reads it back.
//!
//! ```text
//! graph frontend {
//!   %0 = input "x" : f32[2, 3]
//!   scope "layer"
//!   %1 = param "layer.weight" : f32[3, 4]
//!   %2 = matmul %0, %1 : f32[2, 4]
//!   %3 = reduce_sum %2 axes=[1] : f32[2, 1]
//!   output "y" = %3
//! }
//! ```
//!
//! Values are renumbered in definition order when printing, so the text of a graph depends only
//! on its program, never on how it was built. A `scope` line sets the name scope of the nodes
//! that follow it. `;` starts a comment.

mod parse;
mod print;

pub use parse::{parse, ParseError};
pub(crate) use print::fmt_float;
pub use print::print;
