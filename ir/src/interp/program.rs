//! The interpreter's elementwise programs (`fused.elementwise`, `fused.matmul_epilogue`).
//!
//! A program is evaluated instruction by instruction over chunks of its result, each
//! instruction through the interpreter's own primitive op, so a program computes (and rounds)
//! exactly what the chain of primitive nodes it replaced computed. Only one chunk's
//! intermediates exist at a time, and broadcast operands are read in place: that is what the
//! fusion saves. A chunk's operands are read before its result is written, so the result may
//! overwrite an operand of the result's shape (the memory plan's in-place reuse).

use super::kernels::{self, strides, Buf};
use super::planned::Src;
use super::{EvalError, Interpreter, Val};
use crate::elementwise::Program;
use crate::op::Op;
use crate::tensor::Tensor;
use crate::{DType, FusedOp, TensorType};
use std::ops::Range;

/// Elements per chunk: enough to amortise the per-instruction dispatch, few enough that a
/// chunk's registers stay in cache.
const CHUNK: usize = 4096;

/// No parameters or inputs: a program's instructions never bind names.
struct Unbound;

impl super::Bindings for Unbound {
    fn lookup(&self, _name: &str) -> Option<&Tensor> {
        None
    }
}

/// Where a program reads its operands and writes its result, one chunk at a time.
trait ChunkIo {
    /// Elements `start..start + len` of operand `k`, broadcast to the result's shape.
    fn read(&self, k: usize, start: usize, len: usize) -> Buf;
    /// Stores elements `start..` of the result.
    fn write(&mut self, start: usize, chunk: Buf);
}

/// Elements `start..start + len` of `src` (shaped `from`) read broadcast to `to`.
fn chunk_of<T: Copy>(src: &[T], from: &[usize], to: &[usize], start: usize, len: usize) -> Vec<T> {
    if from == to {
        return src[start..start + len].to_vec();
    }
    let rank = to.len();
    let s = strides(from);
    let bs: Vec<usize> = (0..rank)
        .map(|i| if from[i] == 1 { 0 } else { s[i] })
        .collect();
    let mut coord = vec![0usize; rank];
    let mut rem = start;
    for d in (0..rank).rev() {
        coord[d] = rem % to[d];
        rem /= to[d];
    }
    let mut off: usize = (0..rank).map(|d| coord[d] * bs[d]).sum();
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        out.push(src[off]);
        for d in (0..rank).rev() {
            coord[d] += 1;
            off += bs[d];
            if coord[d] < to[d] {
                break;
            }
            off -= bs[d] * to[d];
            coord[d] = 0;
        }
    }
    out
}

fn chunk_of_buf(src: &Buf, from: &[usize], to: &[usize], start: usize, len: usize) -> Buf {
    match src {
        Buf::F(v) => Buf::F(chunk_of(v, from, to, start, len)),
        Buf::I(v) => Buf::I(chunk_of(v, from, to, start, len)),
    }
}

/// Operands held as values; the result appended to a buffer.
struct ValueIo<'a> {
    args: &'a [&'a Val],
    shape: &'a [usize],
    out: Buf,
}

impl ChunkIo for ValueIo<'_> {
    fn read(&self, k: usize, start: usize, len: usize) -> Buf {
        let a = self.args[k];
        chunk_of_buf(&a.buf, &a.ty.shape, self.shape, start, len)
    }
    fn write(&mut self, _start: usize, chunk: Buf) {
        match (&mut self.out, chunk) {
            (Buf::F(o), Buf::F(c)) => o.extend_from_slice(&c),
            (Buf::I(o), Buf::I(c)) => o.extend_from_slice(&c),
            _ => unreachable!("the result buffer has the result's element kind"),
        }
    }
}

/// An operand of a planned run: words of the arena, or a parameter or input.
enum Operand<'a> {
    Arena(Range<usize>, &'a TensorType),
    Owned(&'a Val),
}

/// Operands in the arena (or owned), the result written into its slot.
struct ArenaIo<'a> {
    words: &'a mut [f64],
    operands: Vec<Operand<'a>>,
    shape: &'a [usize],
    out: Range<usize>,
}

impl ChunkIo for ArenaIo<'_> {
    fn read(&self, k: usize, start: usize, len: usize) -> Buf {
        match &self.operands[k] {
            Operand::Owned(v) => chunk_of_buf(&v.buf, &v.ty.shape, self.shape, start, len),
            Operand::Arena(r, ty) => {
                let w = &self.words[r.clone()];
                if ty.dtype.is_float() {
                    Buf::F(chunk_of(w, &ty.shape, self.shape, start, len))
                } else {
                    let ints = bytemuck::cast_slice::<f64, i64>(w);
                    Buf::I(chunk_of(ints, &ty.shape, self.shape, start, len))
                }
            }
        }
    }
    fn write(&mut self, start: usize, chunk: Buf) {
        let at = self.out.start + start;
        match chunk {
            Buf::F(c) => self.words[at..at + c.len()].copy_from_slice(&c),
            Buf::I(c) => bytemuck::cast_slice_mut::<f64, i64>(&mut self.words[at..at + c.len()])
                .copy_from_slice(&c),
        }
    }
}

impl Interpreter<'_> {
    /// Runs `program` over operands of dtypes `operands`, for a result of `n` elements.
    fn run_program(
        &self,
        program: &Program,
        operands: &[DType],
        n: usize,
        io: &mut dyn ChunkIo,
    ) -> Result<(), EvalError> {
        let dtypes = program
            .dtypes(operands)
            .map_err(|e| EvalError::Msg(e.to_string()))?;
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let mut regs: Vec<Val> = Vec::with_capacity(dtypes.len());
            for (k, &dtype) in operands.iter().enumerate() {
                regs.push(Val {
                    ty: TensorType::new(dtype, [len]),
                    buf: io.read(k, start, len),
                });
            }
            for (inst, &dtype) in program.insts.iter().zip(&dtypes[program.inputs..]) {
                let ty = TensorType::new(dtype, [len]);
                let op = match &inst.op {
                    Op::Const { value, .. } => Op::Const {
                        value: *value,
                        ty: ty.clone(),
                    },
                    other => other.clone(),
                };
                let a: Vec<&Val> = inst.args.iter().map(|&r| &regs[r as usize]).collect();
                let v = self.eval(&op, &a, &ty, &Unbound)?;
                regs.push(v);
            }
            io.write(start, regs.pop().expect("the result register").buf);
            start += len;
        }
        Ok(())
    }

    /// The result buffers of fused op `op`: programs here, every other fused op in
    /// [`super::fused::eval`]. Unrounded as far as the callers know (they round each result).
    pub(super) fn eval_fused(
        &self,
        op: &FusedOp,
        args: &[&Val],
        tys: &[&TensorType],
    ) -> Result<Vec<Buf>, EvalError> {
        let (program, product) = match op {
            FusedOp::Elementwise { program, .. } => (program, None),
            FusedOp::MatMulEpilogue { program } => {
                let ty = product_type(&args[0].ty, &args[1].ty)?;
                (
                    program,
                    Some(self.eval(&Op::MatMul, &args[..2], &ty, &Unbound)?),
                )
            }
            other => return super::fused::eval(other, args, tys).map_err(EvalError::Msg),
        };
        // An epilogue's program reads the product, then the extras.
        let reads: Vec<&Val> = match &product {
            Some(p) => std::iter::once(p)
                .chain(args[2..].iter().copied())
                .collect(),
            None => args.to_vec(),
        };
        let out_ty = tys[0];
        let n = out_ty.numel();
        let mut io = ValueIo {
            args: &reads,
            shape: &out_ty.shape,
            out: if out_ty.dtype.is_float() {
                Buf::F(Vec::with_capacity(n))
            } else {
                Buf::I(Vec::with_capacity(n))
            },
        };
        let dtypes: Vec<DType> = reads.iter().map(|a| a.ty.dtype).collect();
        self.run_program(program, &dtypes, n, &mut io)?;
        Ok(vec![io.out])
    }

    /// A program straight into its arena slot, its operands read in place; `Ok(false)` when
    /// the node is no program, or an epilogue's matmul operand overlaps the result.
    pub(super) fn direct_program(
        &self,
        node: &crate::Node,
        ty: &TensorType,
        out: &Range<usize>,
        srcs: &[Src],
        words: &mut [f64],
    ) -> Result<bool, EvalError> {
        let g = self.graph;
        let product = match &node.op {
            Op::Fused(FusedOp::MatMulEpilogue { .. }) => {
                product_type(g.ty(node.inputs[0]), g.ty(node.inputs[1]))?
            }
            _ => ty.clone(),
        };
        let operand = |k: usize| match &srcs[k] {
            Src::Arena(r) => Operand::Arena(r.clone(), g.ty(node.inputs[k])),
            Src::Owned(v) => Operand::Owned(v),
        };
        let (program, operands) = match &node.op {
            Op::Fused(FusedOp::Elementwise { program, .. }) => {
                (program, (0..srcs.len()).map(operand).collect::<Vec<_>>())
            }
            Op::Fused(FusedOp::MatMulEpilogue { program }) => {
                // The product is rounded to its own dtype, as the matmul it was would round
                // it, before the program reads it back from the result's slot.
                if !self.product_into(node, product.dtype, out, &srcs[..2], words) {
                    return Ok(false);
                }
                let mut ops = vec![Operand::Arena(out.clone(), &product)];
                ops.extend((2..srcs.len()).map(operand));
                (program, ops)
            }
            _ => return Ok(false),
        };
        let dtypes: Vec<DType> = operands
            .iter()
            .map(|o| match o {
                Operand::Arena(_, t) => t.dtype,
                Operand::Owned(v) => v.ty.dtype,
            })
            .collect();
        let mut io = ArenaIo {
            words,
            operands,
            shape: &ty.shape,
            out: out.clone(),
        };
        self.run_program(program, &dtypes, ty.numel(), &mut io)?;
        Ok(true)
    }

    /// The product `a @ b` of the node's first two operands into the result's slot, rounded
    /// to `dtype` (a matmul's, or an epilogue's product); `false` when an operand overlaps the
    /// slot.
    pub(super) fn product_into(
        &self,
        node: &crate::Node,
        dtype: DType,
        out: &Range<usize>,
        srcs: &[Src],
        words: &mut [f64],
    ) -> bool {
        let (xs, ys) = (
            &self.graph.ty(node.inputs[0]).shape,
            &self.graph.ty(node.inputs[1]).shape,
        );
        let r = xs.len();
        let batch: usize = xs[..r - 2].iter().product();
        let arena: Vec<Range<usize>> = srcs
            .iter()
            .filter_map(|s| match s {
                Src::Arena(r) => Some(r.clone()),
                Src::Owned(_) => None,
            })
            .collect();
        let Some((o, ins)) = super::planned::split(words, out, &arena) else {
            return false;
        };
        let mut ins = ins.into_iter();
        let mut pick = |k: usize| -> &[f64] {
            match &srcs[k] {
                Src::Arena(_) => ins.next().expect("one slice per arena operand"),
                Src::Owned(v) => v.f(),
            }
        };
        let a = pick(0);
        let b = pick(1);
        kernels::matmul_into(a, b, batch, xs[r - 2], xs[r - 1], ys[r - 1], o);
        self.round_slice(dtype, o);
        true
    }
}

/// The type of the product `a @ b`.
fn product_type(a: &TensorType, b: &TensorType) -> Result<TensorType, EvalError> {
    Ok(crate::infer::infer(&Op::MatMul, &[a, b])
        .map_err(|e| EvalError::Msg(e.to_string()))?
        .pop()
        .expect("matmul has one result"))
}
