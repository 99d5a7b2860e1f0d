//! Library calls: the steps of a compiled program that Rust code in the runtime process runs
//! instead of a generated kernel. Today these are the GEMMs, dense and grouped (the routed
//! experts), which a tuned library does better than a generated loop nest.
//!
//! A call is plain data (dtypes and sizes, no pointers), so a plan can store it; the runtime
//! passes the node's buffers (inputs in operand order, then outputs in result order, each
//! densely packed row-major storage of the declared dtype) and the run's thread pool to
//! [`LibraryCall::execute`].

mod gemm;

use mmc_ir::{DType, FusedOp, Graph, Node, Op};
use serde::{Deserialize, Serialize};

/// The float types the GEMM calls take. f32 accumulates in f32 and f64 in f64, as the
/// precision contract says; bf16 needs another route (the `gemm` crate has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Float {
    F32,
    F64,
}

impl Float {
    /// The call's element type for an IR dtype, or `None` for one it does not take.
    pub fn of(dtype: DType) -> Option<Float> {
        match dtype {
            DType::F32 => Some(Float::F32),
            DType::F64 => Some(Float::F64),
            _ => None,
        }
    }

    /// The IR dtype of the elements.
    pub fn dtype(self) -> DType {
        match self {
            Float::F32 => DType::F32,
            Float::F64 => DType::F64,
        }
    }
}

/// `out[i] = a[i] @ b[i]` for each of `batch` matrices: a [m, k], b [k, n], out [m, n], the
/// batch dimensions of `matmul` flattened into one (they are equal on both operands).
/// Buffers: a, b, out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatMul {
    pub dtype: Float,
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// The sizes of a grouped matmul: xs [rows, inner], w [experts, inner, cols] and the i64
/// offsets [experts + 1] that split the rows of xs by expert. The offsets are data (computed
/// from the routing at run time), so every execution checks them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grouped {
    pub dtype: Float,
    pub rows: usize,
    pub inner: usize,
    pub cols: usize,
    pub experts: usize,
}

/// One library call of a compiled program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LibraryCall {
    /// `matmul`, and the product of `fused.matmul_epilogue` (whose program then runs over the
    /// output as a separate kernel). Buffers: a, b, out.
    MatMul(MatMul),
    /// `fused.grouped_matmul`: rows `offsets[e]..offsets[e + 1]` of xs times `w[e]`.
    /// Buffers: xs, w, offsets, out [rows, cols].
    GroupedMatMul(Grouped),
    /// `fused.grouped_matmul_grad`: per expert `dxs_e = dy_e w_e^T`, `dw_e = xs_e^T dy_e`
    /// (zero for an expert without rows). Buffers: xs, w, offsets, dy, dxs, dw.
    GroupedMatMulGrad(Grouped),
}

/// Why a node cannot become a library call, or a call cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LibraryError {
    #[error("`{op}` on {dtype} has no library call (f32 and f64 only)")]
    Dtype { op: &'static str, dtype: DType },
    #[error(
        "`{op}`: the epilogue's result is {result}, not the product's {product}, so the product \
         cannot be stored in its output"
    )]
    EpilogueDtype {
        op: &'static str,
        product: DType,
        result: DType,
    },
    #[error("`{op}`: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("the call takes {expected} buffers, got {got}")]
    Buffers { expected: usize, got: usize },
    #[error("grouped matmul over {rows} rows: offsets {offsets:?} {why}")]
    Offsets {
        rows: usize,
        offsets: Vec<i64>,
        why: &'static str,
    },
}

/// The library call of `node`: `Some` for the GEMM ops (`matmul`, `fused.grouped_matmul`, its
/// gradient, and the product of `fused.matmul_epilogue`), `None` for every other op, which a
/// generated kernel computes.
pub fn for_node(g: &Graph, node: &Node) -> Option<Result<LibraryCall, LibraryError>> {
    let op = node.op.name();
    match &node.op {
        Op::MatMul => Some(matmul(g, node, op)),
        Op::Fused(FusedOp::MatMulEpilogue { .. }) => Some(matmul(g, node, op).and_then(|call| {
            let result = g.ty(node.outputs[0]).dtype;
            let product = g.ty(node.inputs[0]).dtype;
            if result == product {
                Ok(call)
            } else {
                Err(LibraryError::EpilogueDtype {
                    op,
                    product,
                    result,
                })
            }
        })),
        Op::Fused(FusedOp::GroupedMatMul) => {
            Some(grouped(g, node, op, 3, 1).map(LibraryCall::GroupedMatMul))
        }
        Op::Fused(FusedOp::GroupedMatMulGrad) => {
            Some(grouped(g, node, op, 4, 2).map(LibraryCall::GroupedMatMulGrad))
        }
        _ => None,
    }
}

fn float(op: &'static str, dtype: DType) -> Result<Float, LibraryError> {
    Float::of(dtype).ok_or(LibraryError::Dtype { op, dtype })
}

fn shape_error(op: &'static str, msg: String) -> LibraryError {
    LibraryError::Shape { op, msg }
}

/// The sizes of `a @ b` from the first two operands (a verified graph has checked them; a
/// graph that was not is refused, not trusted).
fn matmul(g: &Graph, node: &Node, op: &'static str) -> Result<LibraryCall, LibraryError> {
    if node.inputs.len() < 2 || node.outputs.is_empty() {
        return Err(shape_error(
            op,
            "needs operands a and b and a result".into(),
        ));
    }
    let (a, b) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]));
    let dtype = float(op, a.dtype)?;
    let r = a.rank();
    let fits = r >= 2
        && b.dtype == a.dtype
        && b.rank() == r
        && a.shape[..r - 2] == b.shape[..r - 2]
        && a.shape[r - 1] == b.shape[r - 2];
    if !fits {
        return Err(shape_error(op, format!("{a} @ {b} is not a matmul")));
    }
    let out = g.ty(node.outputs[0]);
    let (m, k, n) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1]);
    let batch: usize = a.shape[..r - 2].iter().product();
    if out.numel() != batch * m * n {
        return Err(shape_error(
            op,
            format!("result {out} does not hold {batch} x [{m}, {n}]"),
        ));
    }
    Ok(LibraryCall::MatMul(MatMul {
        dtype,
        batch,
        m,
        k,
        n,
    }))
}

/// The sizes of a grouped matmul (or its gradient) from xs, w and offsets.
fn grouped(
    g: &Graph,
    node: &Node,
    op: &'static str,
    inputs: usize,
    outputs: usize,
) -> Result<Grouped, LibraryError> {
    if node.inputs.len() != inputs || node.outputs.len() != outputs {
        return Err(shape_error(
            op,
            format!("needs {inputs} operands and {outputs} results"),
        ));
    }
    let (xs, w, off) = (
        g.ty(node.inputs[0]),
        g.ty(node.inputs[1]),
        g.ty(node.inputs[2]),
    );
    let dtype = float(op, xs.dtype)?;
    let fits = xs.rank() == 2
        && w.rank() == 3
        && w.dtype == xs.dtype
        && w.shape[1] == xs.shape[1]
        && off.dtype == DType::I64
        && off.shape[..] == [w.shape[0] + 1];
    if !fits {
        return Err(shape_error(
            op,
            format!("xs {xs}, w {w} and offsets {off} are not a grouped matmul"),
        ));
    }
    Ok(Grouped {
        dtype,
        rows: xs.shape[0],
        inner: xs.shape[1],
        cols: w.shape[2],
        experts: w.shape[0],
    })
}

impl LibraryCall {
    /// How many buffers [`LibraryCall::execute`] takes: the inputs, then the outputs.
    pub fn buffers(&self) -> usize {
        match self {
            LibraryCall::MatMul(_) => 3,
            LibraryCall::GroupedMatMul(_) => 4,
            LibraryCall::GroupedMatMulGrad(_) => 6,
        }
    }

    /// The element type of the float buffers.
    pub fn dtype(&self) -> Float {
        match self {
            LibraryCall::MatMul(c) => c.dtype,
            LibraryCall::GroupedMatMul(c) | LibraryCall::GroupedMatMulGrad(c) => c.dtype,
        }
    }

    /// The call's floating-point operations (2 per multiply-add), for the benchmark and the
    /// fraction of the machine's peak. A grouped call's count is the same for every valid
    /// split of its rows.
    pub fn flops(&self) -> f64 {
        match self {
            LibraryCall::MatMul(c) => 2.0 * (c.batch * c.m) as f64 * (c.k * c.n) as f64,
            LibraryCall::GroupedMatMul(c) => 2.0 * c.rows as f64 * (c.inner * c.cols) as f64,
            LibraryCall::GroupedMatMulGrad(c) => 4.0 * c.rows as f64 * (c.inner * c.cols) as f64,
        }
    }

    /// Runs the call on `buffers` (inputs in operand order, then outputs), spreading the work
    /// over `pool`. Outputs are overwritten whatever they hold. Offsets that do not split the
    /// rows into consecutive groups (not starting at 0, decreasing, or not ending at the row
    /// count) are an error, found before anything is written.
    ///
    /// # Safety
    /// `buffers` must hold [`LibraryCall::buffers`] pointers, each to densely packed row-major
    /// storage of the size the call's fields give (the operand and result types of the node it
    /// was made from) in its dtype (the call's [`Float`]; offsets i64), valid for reads, and
    /// for writes for the outputs, during the call. The outputs must not overlap each other
    /// or any input; inputs may overlap each other. Nothing else may write these buffers
    /// during the call. Each pointer is aligned for its element type.
    pub unsafe fn execute(
        &self,
        buffers: &[*mut u8],
        pool: &rayon::ThreadPool,
    ) -> Result<(), LibraryError> {
        if buffers.len() != self.buffers() {
            return Err(LibraryError::Buffers {
                expected: self.buffers(),
                got: buffers.len(),
            });
        }
        let b = buffers;
        // SAFETY: the caller's contract, with the buffer count just checked.
        unsafe {
            match (self, self.dtype()) {
                (LibraryCall::MatMul(c), Float::F32) => {
                    gemm::matmul::<f32>(c, b[0].cast(), b[1].cast(), b[2].cast(), pool);
                }
                (LibraryCall::MatMul(c), Float::F64) => {
                    gemm::matmul::<f64>(c, b[0].cast(), b[1].cast(), b[2].cast(), pool);
                }
                (LibraryCall::GroupedMatMul(c), dtype) => {
                    let groups = groups(c, b[2].cast())?;
                    match dtype {
                        Float::F32 => gemm::grouped::<f32>(
                            c,
                            &groups,
                            b[0].cast(),
                            b[1].cast(),
                            b[3].cast(),
                            pool,
                        ),
                        Float::F64 => gemm::grouped::<f64>(
                            c,
                            &groups,
                            b[0].cast(),
                            b[1].cast(),
                            b[3].cast(),
                            pool,
                        ),
                    }
                }
                (LibraryCall::GroupedMatMulGrad(c), dtype) => {
                    let groups = groups(c, b[2].cast())?;
                    let [xs, w, _, dy, dxs, dw] = [b[0], b[1], b[2], b[3], b[4], b[5]];
                    match dtype {
                        Float::F32 => gemm::grouped_grad::<f32>(
                            c,
                            &groups,
                            [xs.cast(), w.cast(), dy.cast()],
                            [dxs.cast(), dw.cast()],
                            pool,
                        ),
                        Float::F64 => gemm::grouped_grad::<f64>(
                            c,
                            &groups,
                            [xs.cast(), w.cast(), dy.cast()],
                            [dxs.cast(), dw.cast()],
                            pool,
                        ),
                    }
                }
            }
        }
        Ok(())
    }
}

/// The row range of each expert from the `experts + 1` offsets at `offsets`: they must start
/// at 0, never decrease and end at the row count (the interpreter's rule).
///
/// # Safety
/// `offsets` points to `c.experts + 1` readable i64s.
unsafe fn groups(c: &Grouped, offsets: *const i64) -> Result<Vec<(usize, usize)>, LibraryError> {
    // SAFETY: the caller's contract.
    let off = unsafe { std::slice::from_raw_parts(offsets, c.experts + 1) };
    let err = |why| LibraryError::Offsets {
        rows: c.rows,
        offsets: off.to_vec(),
        why,
    };
    if off[0] != 0 {
        return Err(err("do not start at 0"));
    }
    if off.windows(2).any(|w| w[1] < w[0]) {
        return Err(err("decrease, giving an expert a negative row count"));
    }
    if off[c.experts] != c.rows as i64 {
        return Err(err("do not end at the row count"));
    }
    Ok(off
        .windows(2)
        .map(|w| (w[0] as usize, w[1] as usize))
        .collect())
}
