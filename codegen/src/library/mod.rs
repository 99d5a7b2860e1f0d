//! Library calls: the steps of a compiled program that Rust code in the runtime process runs
//! instead of a generated kernel. Today these are the GEMMs, dense and grouped (the routed
//! experts), which a tuned library does better than a generated loop nest.
//!
//! A call is plain data (dtypes and sizes, no pointers), so a plan can store it; the runtime
//! passes the node's buffers (inputs in operand order, then outputs in result order, each
//! densely packed row-major storage of the declared dtype) and the run's thread pool to
//! [`LibraryCall::execute`].

mod gemm;
mod packed;

use packed::Need;
pub use packed::Workspace;

use std::fmt;

use half::bf16;
use mmc_ir::{DType, FusedOp, Graph, Node, Op};
use serde::{Deserialize, Serialize};

/// The float types the GEMM calls take. f32 accumulates in f32 and f64 in f64, as the
/// precision contract says; bf16 is stored as bf16 and accumulated in f32 (its products run
/// on the f32 kernels over converted blocks: this CPU has no bf16 multiply instructions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Float {
    F32,
    F64,
    BF16,
}

impl Float {
    /// The call's element type for an IR dtype, or `None` for one it does not take.
    pub fn of(dtype: DType) -> Option<Float> {
        match dtype {
            DType::F32 => Some(Float::F32),
            DType::F64 => Some(Float::F64),
            DType::BF16 => Some(Float::BF16),
            _ => None,
        }
    }

    /// The IR dtype of the elements.
    pub fn dtype(self) -> DType {
        match self {
            Float::F32 => DType::F32,
            Float::F64 => DType::F64,
            Float::BF16 => DType::BF16,
        }
    }

    /// The type products over this one accumulate in (f32 for bf16): what a fused op keeps
    /// a partial result in across calls.
    pub fn accumulator(self) -> Float {
        match self {
            Float::BF16 => Float::F32,
            f => f,
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

/// A matrix inside a buffer: the element where it starts and how many elements apart its
/// rows and its columns are. A chunk of rows, or an operand transposed in place, is a view of
/// the whole buffer, so a fused op's products read their operands where they lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// The dense row-major matrix of `cols` columns starting at `offset`.
    pub fn rows(offset: usize, cols: usize) -> View {
        View {
            offset,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, read in place, of the dense row-major matrix of `cols` columns
    /// starting at `offset`.
    pub fn transposed(offset: usize, cols: usize) -> View {
        View {
            offset,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// One past the last element a [rows, cols] matrix of this view touches (`offset` when
    /// it has no elements), or `None` on overflow.
    fn end(&self, rows: usize, cols: usize) -> Option<usize> {
        if rows == 0 || cols == 0 {
            return Some(self.offset);
        }
        let last = (rows - 1)
            .checked_mul(self.row_stride)?
            .checked_add((cols - 1).checked_mul(self.col_stride)?)?;
        self.offset.checked_add(last)?.checked_add(1)
    }
}

/// `dst = lhs @ rhs`, or `dst += lhs @ rhs` when `accumulate`, with lhs [m, k], rhs [k, n] and
/// dst [m, n] views of buffers of `lens` elements: the products inside a fused op (the
/// cross-entropy's logits and gradients, chunk by chunk). dst is row-major (column stride 1,
/// rows at least n apart), so its elements are distinct. Buffers: lhs, rhs, dst, of the
/// three `dtypes`: f64 with f64 only; f32 and bf16 mix (a bf16 model's f32 logits times its
/// bf16 weights), accumulating in f32.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gemm {
    pub dtypes: [Float; 3],
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub lhs: View,
    pub rhs: View,
    pub dst: View,
    pub lens: [usize; 3],
    pub accumulate: bool,
}

impl Gemm {
    /// Checks that each view lies inside its buffer and that dst's elements are distinct: a
    /// call that fails this (from a damaged plan) is refused, never run.
    pub fn check(&self) -> Result<(), LibraryError> {
        let (m, k, n) = (self.m, self.k, self.n);
        let wide = self.dtypes.iter().filter(|&&d| d == Float::F64).count();
        if wide != 0 && wide != 3 {
            return Err(LibraryError::View {
                what: "dtypes",
                msg: format!("{:?} mix f64 with narrower types", self.dtypes),
            });
        }
        let views = [
            ("lhs", self.lhs, m, k),
            ("rhs", self.rhs, k, n),
            ("dst", self.dst, m, n),
        ];
        for ((what, view, rows, cols), len) in views.into_iter().zip(self.lens) {
            if view.end(rows, cols).is_none_or(|end| end > len) {
                return Err(LibraryError::View {
                    what,
                    msg: format!("[{rows}, {cols}] at {view:?} does not fit its {len} elements"),
                });
            }
        }
        if m > 1 && n > 0 && (self.dst.col_stride != 1 || self.dst.row_stride < n) {
            return Err(LibraryError::View {
                what: "dst",
                msg: format!("{:?} is not row-major over {n} columns", self.dst),
            });
        }
        if m == 1 && n > 1 && self.dst.col_stride != 1 {
            return Err(LibraryError::View {
                what: "dst",
                msg: format!("{:?} is not row-major", self.dst),
            });
        }
        Ok(())
    }
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
    /// A product over views of its buffers, inside a fused op. Buffers: lhs, rhs, dst.
    Gemm(Gemm),
}

/// Why a node cannot become a library call, or a call cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LibraryError {
    #[error("`{op}` on {dtype} has no library call (f32, f64 and bf16 only)")]
    Dtype { op: &'static str, dtype: DType },
    #[error("`{op}`: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("the call takes {expected} buffers, got {got}")]
    Buffers { expected: usize, got: usize },
    #[error("gemm: its {what} {msg}")]
    View { what: &'static str, msg: String },
    #[error("the call needs a workspace of {need} bytes on {threads} threads, but it has {have}")]
    Workspace {
        need: usize,
        have: usize,
        threads: usize,
    },
    #[error("grouped matmul over {rows} rows: offsets {offsets:?} {why}")]
    Offsets {
        rows: usize,
        offsets: Vec<i64>,
        why: &'static str,
    },
}

/// The library call of `node`: `Some` for the GEMM ops (`matmul`, `fused.grouped_matmul`, its
/// gradient, and the product of `fused.matmul_epilogue`, in its operands' dtype), `None` for
/// every other op, which a generated kernel computes.
pub fn for_node(g: &Graph, node: &Node) -> Option<Result<LibraryCall, LibraryError>> {
    let op = node.op.name();
    match &node.op {
        Op::MatMul | Op::Fused(FusedOp::MatMulEpilogue { .. }) => Some(matmul(g, node, op)),
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
    /// The strided product `lhs [m, k] @ rhs [k, n] => dst` (`+=` when `accumulate`) over
    /// buffers of `lens` elements: what the fused ops' lowerings launch.
    pub fn gemm(
        dtypes: [Float; 3],
        (m, k, n): (usize, usize, usize),
        (lhs, rhs, dst): (View, View, View),
        lens: [usize; 3],
        accumulate: bool,
    ) -> LibraryCall {
        LibraryCall::Gemm(Gemm {
            dtypes,
            m,
            k,
            n,
            lhs,
            rhs,
            dst,
            lens,
            accumulate,
        })
    }

    /// How many buffers [`LibraryCall::execute`] takes: the inputs, then the outputs.
    pub fn buffers(&self) -> usize {
        match self {
            LibraryCall::MatMul(_) => 3,
            LibraryCall::GroupedMatMul(_) => 4,
            LibraryCall::GroupedMatMulGrad(_) => 6,
            LibraryCall::Gemm(_) => 3,
        }
    }

    /// Checks what can be checked before the call runs (a [`Gemm`]'s views): what a runner
    /// does when it loads a plan.
    pub fn check(&self) -> Result<(), LibraryError> {
        match self {
            LibraryCall::Gemm(c) => c.check(),
            _ => Ok(()),
        }
    }

    /// The bytes of each buffer the call takes, in buffer order: what a runner checks a
    /// step's buffers against before it replays it.
    pub fn buffer_bytes(&self) -> Vec<u64> {
        let e = |n: usize, f: Float| (n * f.dtype().size_bytes()) as u64;
        match self {
            LibraryCall::MatMul(c) => vec![
                e(c.batch * c.m * c.k, c.dtype),
                e(c.batch * c.k * c.n, c.dtype),
                e(c.batch * c.m * c.n, c.dtype),
            ],
            LibraryCall::GroupedMatMul(c) => vec![
                e(c.rows * c.inner, c.dtype),
                e(c.experts * c.inner * c.cols, c.dtype),
                ((c.experts + 1) * 8) as u64,
                e(c.rows * c.cols, c.dtype),
            ],
            LibraryCall::GroupedMatMulGrad(c) => vec![
                e(c.rows * c.inner, c.dtype),
                e(c.experts * c.inner * c.cols, c.dtype),
                ((c.experts + 1) * 8) as u64,
                e(c.rows * c.cols, c.dtype),
                e(c.rows * c.inner, c.dtype),
                e(c.experts * c.inner * c.cols, c.dtype),
            ],
            LibraryCall::Gemm(c) => c.lens.iter().zip(c.dtypes).map(|(&n, f)| e(n, f)).collect(),
        }
    }

    /// The element type of the float buffers (of a [`Gemm`], its output's).
    pub fn dtype(&self) -> Float {
        match self {
            LibraryCall::MatMul(c) => c.dtype,
            LibraryCall::GroupedMatMul(c) | LibraryCall::GroupedMatMulGrad(c) => c.dtype,
            LibraryCall::Gemm(c) => c.dtypes[2],
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
            LibraryCall::Gemm(c) => 2.0 * c.m as f64 * (c.k * c.n) as f64,
        }
    }

    /// What the call needs of the workspace on `threads` threads.
    fn need(&self, threads: usize) -> Need {
        match self {
            LibraryCall::MatMul(c) => match c.dtype {
                Float::F32 => gemm::matmul_need::<f32>(c, threads),
                Float::F64 => gemm::matmul_need::<f64>(c, threads),
                Float::BF16 => gemm::matmul_need::<bf16>(c, threads),
            },
            LibraryCall::Gemm(c) => {
                use Float::{BF16 as H, F32 as S, F64 as D};
                match c.dtypes {
                    [S, S, S] => gemm::strided_need::<f32, f32, f32>(c, threads),
                    [D, D, D] => gemm::strided_need::<f64, f64, f64>(c, threads),
                    // Mixed or bf16 types: never a split contraction; the result's type
                    // decides the rest.
                    [_, _, S] => gemm::strided_need::<bf16, f32, f32>(c, threads),
                    [_, _, H] => gemm::strided_need::<f32, f32, bf16>(c, threads),
                    [_, _, D] => gemm::strided_need::<f64, f64, f64>(c, threads),
                }
            }
            LibraryCall::GroupedMatMul(c) | LibraryCall::GroupedMatMulGrad(c) => {
                let grad = matches!(self, LibraryCall::GroupedMatMulGrad(_));
                match c.dtype {
                    Float::F32 => gemm::grouped_need::<f32>(c, grad),
                    Float::F64 => gemm::grouped_need::<f64>(c, grad),
                    Float::BF16 => gemm::grouped_need::<bf16>(c, grad),
                }
            }
        }
    }

    /// The bytes of workspace the call packs its operands into on a pool of `threads`: a
    /// runner allocates the largest over its calls once, so that no call allocates.
    pub fn workspace_bytes(&self, threads: usize) -> usize {
        self.need(threads).bytes(threads)
    }

    /// Runs the call on `buffers` (inputs in operand order, then outputs), spreading the work
    /// over `pool` and packing its operands into `workspace` (refused when that is smaller
    /// than [`LibraryCall::workspace_bytes`] for the pool). Outputs are overwritten whatever they hold (an accumulating [`Gemm`] adds
    /// to its dst). A [`Gemm`] whose views do not fit is refused. Offsets that do not split the
    /// rows into consecutive groups (not starting at 0, decreasing, or not ending at the row
    /// count) are an error, found before anything is written.
    ///
    /// # Safety
    /// `buffers` must hold [`LibraryCall::buffers`] pointers, each to densely packed row-major
    /// storage of the size the call's fields give (the operand and result types of the node it
    /// was made from) in its dtype (the call's [`Float`]; offsets i64), valid for reads, and
    /// for writes for the outputs, during the call. The outputs must not overlap each other
    /// or any input; inputs may overlap each other (a [`Gemm`]'s buffers are whole buffers, of
    /// its `lens` elements, its views inside them). Nothing else may write these buffers
    /// during the call. Each pointer is aligned for its element type.
    pub unsafe fn execute(
        &self,
        buffers: &[*mut u8],
        workspace: &mut Workspace,
        pool: &rayon::ThreadPool,
    ) -> Result<(), LibraryError> {
        if buffers.len() != self.buffers() {
            return Err(LibraryError::Buffers {
                expected: self.buffers(),
                got: buffers.len(),
            });
        }
        let threads = pool.current_num_threads();
        let need = self.need(threads);
        if need.bytes(threads) > workspace.bytes() {
            return Err(LibraryError::Workspace {
                need: need.bytes(threads),
                have: workspace.bytes(),
                threads,
            });
        }
        let ws = workspace.parts(need, threads);
        let b = buffers;
        // SAFETY: the caller's contract, with the buffer count just checked.
        unsafe {
            match self {
                LibraryCall::MatMul(c) => match c.dtype {
                    Float::F32 => {
                        gemm::matmul::<f32>(c, b[0].cast(), b[1].cast(), b[2].cast(), pool, ws)
                    }
                    Float::F64 => {
                        gemm::matmul::<f64>(c, b[0].cast(), b[1].cast(), b[2].cast(), pool, ws)
                    }
                    Float::BF16 => {
                        gemm::matmul::<bf16>(c, b[0].cast(), b[1].cast(), b[2].cast(), pool, ws)
                    }
                },
                LibraryCall::Gemm(c) => {
                    c.check()?;
                    let b = [b[0], b[1], b[2]];
                    use Float::{BF16 as H, F32 as S, F64 as D};
                    match c.dtypes {
                        [D, D, D] => gemm::strided::<f64, f64, f64>(c, b, pool, ws),
                        [S, S, S] => gemm::strided::<f32, f32, f32>(c, b, pool, ws),
                        [S, S, H] => gemm::strided::<f32, f32, bf16>(c, b, pool, ws),
                        [S, H, S] => gemm::strided::<f32, bf16, f32>(c, b, pool, ws),
                        [S, H, H] => gemm::strided::<f32, bf16, bf16>(c, b, pool, ws),
                        [H, S, S] => gemm::strided::<bf16, f32, f32>(c, b, pool, ws),
                        [H, S, H] => gemm::strided::<bf16, f32, bf16>(c, b, pool, ws),
                        [H, H, S] => gemm::strided::<bf16, bf16, f32>(c, b, pool, ws),
                        [H, H, H] => gemm::strided::<bf16, bf16, bf16>(c, b, pool, ws),
                        // Refused by `check`.
                        _ => unreachable!("f64 mixed with narrower types passed the check"),
                    }
                }
                LibraryCall::GroupedMatMul(c) => {
                    let off = offsets(c, b[2].cast())?;
                    let (xs, w, out) = (b[0], b[1], b[3]);
                    match c.dtype {
                        Float::F32 => gemm::grouped::<f32>(
                            c,
                            off,
                            [xs.cast(), w.cast()],
                            out.cast(),
                            pool,
                            ws,
                        ),
                        Float::F64 => gemm::grouped::<f64>(
                            c,
                            off,
                            [xs.cast(), w.cast()],
                            out.cast(),
                            pool,
                            ws,
                        ),
                        Float::BF16 => gemm::grouped::<bf16>(
                            c,
                            off,
                            [xs.cast(), w.cast()],
                            out.cast(),
                            pool,
                            ws,
                        ),
                    }
                }
                LibraryCall::GroupedMatMulGrad(c) => {
                    let off = offsets(c, b[2].cast())?;
                    let [xs, w, _, dy, dxs, dw] = [b[0], b[1], b[2], b[3], b[4], b[5]];
                    match c.dtype {
                        Float::F32 => gemm::grouped_grad::<f32>(
                            c,
                            off,
                            [xs.cast(), w.cast(), dy.cast()],
                            [dxs.cast(), dw.cast()],
                            pool,
                            ws,
                        ),
                        Float::F64 => gemm::grouped_grad::<f64>(
                            c,
                            off,
                            [xs.cast(), w.cast(), dy.cast()],
                            [dxs.cast(), dw.cast()],
                            pool,
                            ws,
                        ),
                        Float::BF16 => gemm::grouped_grad::<bf16>(
                            c,
                            off,
                            [xs.cast(), w.cast(), dy.cast()],
                            [dxs.cast(), dw.cast()],
                            pool,
                            ws,
                        ),
                    }
                }
            }
        }
        Ok(())
    }
}

/// The `experts + 1` offsets at `offsets`, checked: they must start at 0, never decrease and
/// end at the row count (the interpreter's rule), so expert e has rows `off[e]..off[e + 1]`.
///
/// # Safety
/// `offsets` points to `c.experts + 1` readable i64s, unchanged while the slice lives.
unsafe fn offsets<'a>(c: &Grouped, offsets: *const i64) -> Result<&'a [i64], LibraryError> {
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
    Ok(off)
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "@{} strides ({}, {})",
            self.offset, self.row_stride, self.col_stride
        )
    }
}

/// The call as `dump-ir --stage kernels` prints it.
impl fmt::Display for LibraryCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.dtype().dtype();
        match self {
            LibraryCall::MatMul(c) => write!(
                f,
                "library matmul {d} {} x [{}, {}] @ [{}, {}]",
                c.batch, c.m, c.k, c.k, c.n
            ),
            LibraryCall::GroupedMatMul(c) => write!(
                f,
                "library grouped_matmul {d} [{}, {}] @ {} x [{}, {}]",
                c.rows, c.inner, c.experts, c.inner, c.cols
            ),
            LibraryCall::GroupedMatMulGrad(c) => write!(
                f,
                "library grouped_matmul_grad {d} [{}, {}] @ {} x [{}, {}]",
                c.rows, c.inner, c.experts, c.inner, c.cols
            ),
            LibraryCall::Gemm(c) => write!(
                f,
                "library gemm {} [{}, {}] {} @ {} [{}, {}] {} {} {d} [{}, {}] {}",
                c.dtypes[0].dtype(),
                c.m,
                c.k,
                c.lhs,
                c.dtypes[1].dtype(),
                c.k,
                c.n,
                c.rhs,
                if c.accumulate { "+=>" } else { "=>" },
                c.m,
                c.n,
                c.dst
            ),
        }
    }
}
