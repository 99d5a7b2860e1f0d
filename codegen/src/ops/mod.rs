//! Node lowering: what each node of a scheduled program becomes in the kernel IR.
//!
//! A node lowers to one or more launches, each of a generated kernel (an elementwise kernel,
//! or a loop kernel for the fused ops) or of a library call (the GEMMs, and the products
//! inside fused ops), over the node's operands, its results and, where an op needs room of
//! its own (a chunk's logits, a column reduction's partial sums), scratch buffers that the
//! runtime allocates once, beside the arena. Each fused op is described here once, in
//! target-independent kernel IR; the CPU backend compiles the descriptions with LLVM and an
//! Ascend backend will lower the same ones.

mod attention;
mod attention_blocks;
mod cross_entropy;
mod moe;
mod movement;
mod norms;
mod pointwise;

use crate::kernel::{Buffer, GeneratedKernel, Kernel, KernelError};
use crate::library::LibraryCall;
use mmc_ir::{FusedOp, Graph, Node, Op};
use std::fmt;

/// A buffer of a launch: one of the node's operands or results, or one of its scratch
/// buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    Input(usize),
    Output(usize),
    Scratch(usize),
}

/// What a launch runs: a generated kernel, or a library routine that the runtime calls.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    Kernel(GeneratedKernel),
    Library(LibraryCall),
    /// A kernel copying its first buffer into its second, dropped when the two are one
    /// place: an op that sums into a copy of its operand (an accumulator) then sums in place
    /// when the accumulator is updated in place.
    Copy(GeneratedKernel),
}

impl Work {
    /// The bytes of each buffer the work takes, in order: what a caller checks its buffers
    /// against.
    pub fn buffer_bytes(&self) -> Vec<u64> {
        match self {
            Work::Kernel(k) | Work::Copy(k) => k
                .buffers()
                .iter()
                .map(|b| (b.shape.iter().product::<usize>() * b.dtype.size_bytes()) as u64)
                .collect(),
            Work::Library(c) => c.buffer_bytes(),
        }
    }
}

impl fmt::Display for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Work::Kernel(k) | Work::Copy(k) => k.fmt(f),
            Work::Library(c) => c.fmt(f),
        }
    }
}

/// One launch of a lowered node, with what each of its buffers is.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub work: Work,
    pub args: Vec<Arg>,
}

impl Launch {
    /// A generated kernel over `args`.
    pub fn kernel(kernel: impl Into<GeneratedKernel>, args: Vec<Arg>) -> Launch {
        Launch {
            work: Work::Kernel(kernel.into()),
            args,
        }
    }

    /// A copy kernel from `args[0]` to `args[1]`, dropped where they are one place.
    pub fn copy(kernel: impl Into<GeneratedKernel>, args: [Arg; 2]) -> Launch {
        Launch {
            work: Work::Copy(kernel.into()),
            args: args.to_vec(),
        }
    }

    /// A library call over `args`.
    pub fn library(call: LibraryCall, args: Vec<Arg>) -> Launch {
        Launch {
            work: Work::Library(call),
            args,
        }
    }
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
        Lowered::one(node, Work::Kernel(kernel))
    }

    /// One launch over the node's operands then its results.
    fn one(node: &Node, work: Work) -> Lowered {
        let args = (0..node.inputs.len())
            .map(Arg::Input)
            .chain((0..node.outputs.len()).map(Arg::Output))
            .collect();
        Lowered {
            launches: vec![Launch { work, args }],
            scratch: Vec::new(),
        }
    }

    /// The generated kernels of the launches, in order.
    pub fn kernels(&self) -> impl Iterator<Item = &GeneratedKernel> {
        self.launches.iter().filter_map(|l| match &l.work {
            Work::Kernel(k) | Work::Copy(k) => Some(k),
            Work::Library(_) => None,
        })
    }
}

/// A GEMM node as a library call over its operands and results; an epilogue's product is
/// stored in its result (or, when the result is of another dtype, in a scratch of the
/// product's), and its program then runs over it as an elementwise kernel.
fn library(g: &Graph, node: &Node, name: &str) -> Option<Result<Lowered, KernelError>> {
    let call = crate::library::for_node(g, node)?;
    Some(call.map_err(KernelError::from).and_then(|call| {
        if !matches!(node.op, Op::Fused(FusedOp::MatMulEpilogue { .. })) {
            return Ok(Lowered::one(node, Work::Library(call)));
        }
        let k = Kernel::epilogue(g, node, launch_name(name, 1))?;
        let out = g.ty(node.outputs[0]);
        let product = g.ty(node.inputs[0]).dtype;
        let (at, scratch) = if product == out.dtype {
            (Arg::Output(0), Vec::new())
        } else {
            let b = crate::kernel::Buffer {
                dtype: product,
                shape: out.shape.clone(),
                access: crate::kernel::Access::Write,
            };
            (Arg::Scratch(0), vec![b])
        };
        let mut args = vec![at];
        args.extend((2..node.inputs.len()).map(Arg::Input));
        args.push(Arg::Output(0));
        Ok(Lowered {
            launches: vec![
                Launch::library(call, vec![Arg::Input(0), Arg::Input(1), at]),
                Launch::kernel(k, args),
            ],
            scratch,
        })
    }))
}

/// The launches of `node`; `name` prefixes their kernels' symbols (each launch gets `name`, then
/// `name_1`, ...).
pub fn lower_node(g: &Graph, node: &Node, name: &str) -> Result<Lowered, KernelError> {
    if let Some(l) = library(g, node, name) {
        return l;
    }
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
