//! The kernel IR: what one generated kernel computes, independent of the target.
//!
//! A kernel is a loop over the elements of its iteration shape, cut into tiles of `tile`
//! elements; a launch runs a range of tiles, so a runtime spreads the ranges over its threads
//! (CPU) or cores (Ascend) and the generated code never calls back into it. Each element loads
//! its operands (contiguously, or broadcast through per-axis strides), runs a straight-line
//! program of scalar ops, and stores the result. Both backends lower from this one description,
//! and `Display` prints it.
//!
//! This first form covers the elementwise kernels (`fused.elementwise`, the primitive
//! elementwise ops, and the layout ops broadcast, permute, slice and reshape as copies through
//! an affine index); reductions, library calls and the other fused ops join it as the CPU
//! backend grows.

use mmc_ir::elementwise::{Inst, Program};
use mmc_ir::{DType, FusedOp, Graph, Node, Op, ReduceKind, Shape};
use std::fmt;

/// Whether a kernel reads or writes a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A buffer argument: its element type and shape, as the kernel addresses it.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub dtype: DType,
    pub shape: Shape,
    pub access: Access,
}

/// How element `i` of the iteration space addresses a buffer read by the kernel.
#[derive(Clone, Debug, PartialEq)]
pub enum Index {
    /// Element `i` itself: the buffer has the iteration shape.
    Contiguous,
    /// `base + Σ coord(i)[a] * strides[a]`, with `coord(i)` the coordinates of element `i`
    /// in the iteration shape: a broadcast (stride 0 on size-1 axes), a permutation (permuted
    /// strides) or a slice (a base).
    Affine { base: usize, strides: Vec<usize> },
}

/// One load per read buffer, in register order (`$0` is the first).
#[derive(Clone, Debug, PartialEq)]
pub struct Load {
    pub buffer: usize,
    pub index: Index,
}

/// A generated kernel: the loads, a program over them, and the store of its result.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// A symbol name: letters, digits and `_`.
    pub name: String,
    /// Read buffers first, then the one written.
    pub buffers: Vec<Buffer>,
    /// The iteration space: the result's shape.
    pub shape: Shape,
    /// Elements per tile.
    pub tile: usize,
    pub loads: Vec<Load>,
    /// When set, the one load is accumulated over the reduced elements of each result
    /// element before the program runs on it.
    pub reduce: Option<Reduction>,
    /// Registers `$0..` are the loads; the result is stored to the written buffer.
    pub program: Program,
}

/// An accumulation of the load over the elements a result element reduces: `extent` lists
/// the sizes of the reduced axes and `strides` their strides in the read buffer, and the
/// elements are visited in row-major order, accumulating floats in f64 (the interpreter's
/// order and precision, so the result is its bit for bit).
#[derive(Clone, Debug, PartialEq)]
pub struct Reduction {
    pub kind: ReduceKind,
    pub extent: Vec<usize>,
    pub strides: Vec<usize>,
}

/// Why a node has no kernel (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("`{op}` has no generated kernel yet")]
    Unsupported { op: &'static str },
    #[error("`{op}` over {dtype}: kernels over this dtype are not built yet")]
    Dtype { op: &'static str, dtype: DType },
    /// An op's description that does not type-check: a bug in mmc.
    #[error("internal error in a kernel description: {0}")]
    Invalid(String),
    /// A GEMM node whose library call cannot be made (a dtype the library lacks, say).
    #[error(transparent)]
    Library(#[from] crate::library::LibraryError),
}

/// Elements per tile of an elementwise kernel: 16 KiB of f32 results, enough to amortise a
/// launch and few enough that a 2-core split of a small tensor still balances.
pub const ELEMENTWISE_TILE: usize = 4096;

/// The dtypes the elementwise kernels load, compute and store.
pub fn supported_dtype(d: DType) -> bool {
    matches!(
        d,
        DType::F32 | DType::BF16 | DType::F64 | DType::I64 | DType::I32 | DType::Bool
    )
}

impl Kernel {
    /// Elements of the iteration space.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Tiles of the iteration space (the last one may be partial).
    pub fn tiles(&self) -> usize {
        self.elements().div_ceil(self.tile)
    }

    /// The kernel of node `node` of `g`: a `fused.elementwise`, or a primitive elementwise op
    /// as a one-instruction program.
    pub fn for_node(g: &Graph, node: &Node, name: String) -> Result<Kernel, KernelError> {
        let out_ty = g.ty(node.outputs[0]);
        if let Some(k) = Self::layout(g, node, &name)? {
            return Ok(k);
        }
        let program = match &node.op {
            Op::Fused(FusedOp::Elementwise { program, .. }) => program.clone(),
            // A filled tensor: a program of one constant, no loads.
            Op::Const { value, ty } => Program {
                inputs: 0,
                insts: vec![Inst {
                    op: Op::Const {
                        value: *value,
                        ty: mmc_ir::TensorType::scalar(ty.dtype),
                    },
                    args: vec![],
                }],
            },
            op @ (Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. }) => {
                Program::single(op.clone(), node.inputs.len())
            }
            op => return Err(KernelError::Unsupported { op: op.name() }),
        };
        let op = node.op.name();
        let operands: Vec<DType> = node.inputs.iter().map(|&v| g.ty(v).dtype).collect();
        check_program(&program, &operands, op)?;
        let shape = out_ty.shape.clone();
        let mut buffers = Vec::new();
        let mut loads = Vec::new();
        for (k, &v) in node.inputs.iter().enumerate() {
            let ty = g.ty(v);
            let index = broadcast_read(&ty.shape, &shape);
            buffers.push(Buffer {
                dtype: ty.dtype,
                shape: ty.shape.clone(),
                access: Access::Read,
            });
            loads.push(Load { buffer: k, index });
        }
        buffers.push(Buffer {
            dtype: out_ty.dtype,
            shape: shape.clone(),
            access: Access::Write,
        });
        Ok(Kernel {
            name,
            buffers,
            shape,
            tile: ELEMENTWISE_TILE,
            loads,
            reduce: None,
            program,
        })
    }

    /// The epilogue of a `fused.matmul_epilogue` node: its program over the product (`$0`,
    /// read from where the GEMM stored it: the node's own result, or a scratch when the result
    /// is of another dtype, as a bf16 product cast to f32) and the extras (read broadcast),
    /// stored to the result. Buffers: the product (read), the extras, the result (written).
    pub fn epilogue(g: &Graph, node: &Node, name: String) -> Result<Kernel, KernelError> {
        let Op::Fused(FusedOp::MatMulEpilogue { program }) = &node.op else {
            return Err(KernelError::Unsupported { op: node.op.name() });
        };
        let op = node.op.name();
        let out = g.ty(node.outputs[0]);
        let product = g.ty(node.inputs[0]).dtype;
        let mut operands = vec![product];
        operands.extend(node.inputs[2..].iter().map(|&v| g.ty(v).dtype));
        check_program(program, &operands, op)?;
        let shape = out.shape.clone();
        let mut buffers = vec![Buffer {
            dtype: product,
            shape: shape.clone(),
            access: Access::Read,
        }];
        let mut loads = vec![Load {
            buffer: 0,
            index: Index::Contiguous,
        }];
        for &v in &node.inputs[2..] {
            let ty = g.ty(v);
            let index = broadcast_read(&ty.shape, &shape);
            loads.push(Load {
                buffer: buffers.len(),
                index,
            });
            buffers.push(Buffer {
                dtype: ty.dtype,
                shape: ty.shape.clone(),
                access: Access::Read,
            });
        }
        buffers.push(Buffer {
            dtype: out.dtype,
            shape: shape.clone(),
            access: Access::Write,
        });
        Ok(Kernel {
            name,
            buffers,
            shape,
            tile: ELEMENTWISE_TILE,
            loads,
            reduce: None,
            program: program.clone(),
        })
    }

    /// The copy kernel of a layout op (broadcast, permute, slice, reshape) or the kernel of a
    /// reduction: one affine load (accumulated for a reduction) and a same-dtype cast (the
    /// identity); `None` for other ops.
    fn layout(g: &Graph, node: &Node, name: &str) -> Result<Option<Kernel>, KernelError> {
        let x = g.ty(node.inputs.first().copied().unwrap_or(node.outputs[0]));
        let out = g.ty(node.outputs[0]);
        let s = row_major_strides(&x.shape);
        let mut reduce = None;
        let index = match &node.op {
            Op::Reshape { .. } => Index::Contiguous,
            Op::Reduce { kind, axes } => {
                reduce = Some(Reduction {
                    kind: *kind,
                    extent: axes.iter().map(|&a| x.shape[a]).collect(),
                    strides: axes.iter().map(|&a| s[a]).collect(),
                });
                Index::Affine {
                    base: 0,
                    strides: (0..x.rank())
                        .map(|a| if axes.contains(&a) { 0 } else { s[a] })
                        .collect(),
                }
            }
            Op::Broadcast { .. } => Index::Affine {
                base: 0,
                strides: (0..x.rank())
                    .map(|a| if x.shape[a] == 1 { 0 } else { s[a] })
                    .collect(),
            },
            Op::Permute { perm } => Index::Affine {
                base: 0,
                strides: perm.iter().map(|&p| s[p]).collect(),
            },
            Op::Slice { start, .. } => Index::Affine {
                base: start.iter().zip(&s).map(|(a, b)| a * b).sum(),
                strides: s.clone(),
            },
            _ => return Ok(None),
        };
        if !supported_dtype(x.dtype) || (reduce.is_some() && x.dtype == DType::Bool) {
            return Err(KernelError::Dtype {
                op: node.op.name(),
                dtype: x.dtype,
            });
        }
        Ok(Some(Kernel {
            name: name.to_string(),
            buffers: vec![
                Buffer {
                    dtype: x.dtype,
                    shape: x.shape.clone(),
                    access: Access::Read,
                },
                Buffer {
                    dtype: out.dtype,
                    shape: out.shape.clone(),
                    access: Access::Write,
                },
            ],
            shape: out.shape.clone(),
            tile: ELEMENTWISE_TILE,
            loads: vec![Load { buffer: 0, index }],
            reduce,
            program: Program::single(Op::Cast { to: x.dtype }, 1),
        }))
    }
}

/// How an element of an iteration space of `shape` reads an operand of shape `from` (the
/// same shape, or size 1 on the axes it is broadcast over).
fn broadcast_read(from: &[usize], shape: &[usize]) -> Index {
    if from == shape {
        return Index::Contiguous;
    }
    let s = row_major_strides(from);
    Index::Affine {
        base: 0,
        strides: (0..shape.len())
            .map(|a| if from[a] == 1 { 0 } else { s[a] })
            .collect(),
    }
}

/// Checks that `program` types over `operands` and computes only in dtypes kernels take.
fn check_program(
    program: &Program,
    operands: &[DType],
    op: &'static str,
) -> Result<(), KernelError> {
    let regs = program
        .dtypes(operands)
        .map_err(|_| KernelError::Unsupported { op })?;
    match regs.iter().find(|d| !supported_dtype(**d)) {
        Some(&dtype) => Err(KernelError::Dtype { op, dtype }),
        None => Ok(()),
    }
}

/// Row-major strides of `shape`, in elements.
pub fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        writeln!(
            f,
            "kernel {} over [{}] tiles={} x {} {{",
            self.name,
            dims.join(", "),
            self.tiles(),
            self.tile
        )?;
        for (k, b) in self.buffers.iter().enumerate() {
            let dims: Vec<String> = b.shape.iter().map(|d| d.to_string()).collect();
            let access = match b.access {
                Access::Read => "read",
                Access::Write => "write",
            };
            writeln!(f, "  buf{k}: {}[{}] {access}", b.dtype, dims.join(", "))?;
        }
        for (r, l) in self.loads.iter().enumerate() {
            match &l.index {
                Index::Contiguous => writeln!(f, "  ${r} = load buf{}[i]", l.buffer)?,
                Index::Affine { base, strides } => {
                    let s: Vec<String> = strides.iter().map(|x| x.to_string()).collect();
                    writeln!(
                        f,
                        "  ${r} = load buf{}[{base} + strides {}]",
                        l.buffer,
                        s.join(", ")
                    )?
                }
            }
        }
        if let Some(r) = &self.reduce {
            let e: Vec<String> = r.extent.iter().map(|x| x.to_string()).collect();
            let st: Vec<String> = r.strides.iter().map(|x| x.to_string()).collect();
            let kind = match r.kind {
                ReduceKind::Sum => "sum",
                ReduceKind::Max => "max",
            };
            writeln!(
                f,
                "  $0 = reduce_{kind} $0 over [{}] strides {}",
                e.join(", "),
                st.join(", ")
            )?;
        }
        for inst in self.program.to_string().split("; ") {
            writeln!(f, "  {inst}")?;
        }
        writeln!(
            f,
            "  store buf{}[i] ${}",
            self.buffers.len() - 1,
            self.program.result()
        )?;
        f.write_str("}")
    }
}

/// A kernel of either form, as a library holds them: both compile to the same signature and
/// launch over tiles the same way.
#[derive(Clone, Debug, PartialEq)]
pub enum GeneratedKernel {
    Elementwise(Kernel),
    Loop(crate::loops::LoopKernel),
}

impl GeneratedKernel {
    pub fn name(&self) -> &str {
        match self {
            GeneratedKernel::Elementwise(k) => &k.name,
            GeneratedKernel::Loop(k) => &k.name,
        }
    }

    pub fn buffers(&self) -> &[Buffer] {
        match self {
            GeneratedKernel::Elementwise(k) => &k.buffers,
            GeneratedKernel::Loop(k) => &k.buffers,
        }
    }

    pub fn tiles(&self) -> usize {
        match self {
            GeneratedKernel::Elementwise(k) => k.tiles(),
            GeneratedKernel::Loop(k) => k.tiles(),
        }
    }

    /// The same kernel under another symbol name.
    pub fn renamed(&self, name: String) -> GeneratedKernel {
        let mut k = self.clone();
        match &mut k {
            GeneratedKernel::Elementwise(k) => k.name = name,
            GeneratedKernel::Loop(k) => k.name = name,
        }
        k
    }
}

impl From<Kernel> for GeneratedKernel {
    fn from(k: Kernel) -> Self {
        GeneratedKernel::Elementwise(k)
    }
}

impl From<crate::loops::LoopKernel> for GeneratedKernel {
    fn from(k: crate::loops::LoopKernel) -> Self {
        GeneratedKernel::Loop(k)
    }
}

impl fmt::Display for GeneratedKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GeneratedKernel::Elementwise(k) => k.fmt(f),
            GeneratedKernel::Loop(k) => k.fmt(f),
        }
    }
}
