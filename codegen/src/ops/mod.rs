//! Node lowering: what each node of a scheduled program becomes in the kernel IR.
//!
//! A node lowers to one or more launches of generated kernels (elementwise kernels, or loop
//! kernels for the fused ops), each over the node's operands, its results and, where an op
//! needs room of its own (a column reduction's partial sums, say), scratch buffers that the
//! runtime allocates once, beside the arena. Each fused op is described here once, in
//! target-independent kernel IR; the CPU backend compiles the descriptions with LLVM and an
//! Ascend backend will lower the same ones.

mod attention;
mod cross_entropy;
mod moe;
mod movement;
mod norms;
mod pointwise;

use crate::kernel::{Buffer, GeneratedKernel, Kernel, KernelError};
use mmc_ir::{Graph, Node};

/// A buffer of a launch: one of the node's operands or results, or one of its scratch
/// buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    Input(usize),
    Output(usize),
    Scratch(usize),
}

/// One kernel launch of a lowered node, with what each of the kernel's buffers is.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: GeneratedKernel,
    pub args: Vec<Arg>,
}

/// What a node lowers to: launches, run in order, and the scratch buffers they share.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Lowered {
    pub launches: Vec<Launch>,
    pub scratch: Vec<Buffer>,
}

impl Lowered {
    /// One kernel over the node's operands then its results (the spec's buffer convention).
    pub fn single(node: &Node, kernel: GeneratedKernel) -> Lowered {
        let args = (0..node.inputs.len())
            .map(Arg::Input)
            .chain((0..node.outputs.len()).map(Arg::Output))
            .collect();
        Lowered {
            launches: vec![Launch { kernel, args }],
            scratch: Vec::new(),
        }
    }
}

/// The kernels of `node`; `name` prefixes their symbols (each launch gets `name`, then
/// `name_1`, ...).
pub fn lower_node(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    if let Some(l) = norms::lower(g, node, name) {
        return l;
    }
    if let Some(l) = attention::lower(g, node, name) {
        return l;
    }
    if let Some(l) = cross_entropy::lower(g, node, name) {
        return l;
    }
    if let Some(l) = pointwise::lower(g, node, name) {
        return l;
    }
    if let Some(l) = movement::lower(g, node, name).or_else(|| moe::lower(g, node, name)) {
        return l;
    }
    let k = Kernel::for_node(g, node, name.to_string())?;
    Ok(Lowered::single(node, k.into()))
}

/// The symbol of launch `i` of a node named `name`.
pub fn launch_name(name: &str, i: usize) -> String {
    if i == 0 {
        name.to_string()
    } else {
        format!("{name}_{i}")
    }
}
