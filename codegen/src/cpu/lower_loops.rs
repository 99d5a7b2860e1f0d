//! Loop kernels to LLVM IR: `i64 name(void **buffers, i64 tile_begin, i64 tile_end)`.
//!
//! Variables live in stack slots that LLVM's `mem2reg` turns into registers, so loops come out
//! in the form its vectorisers want. The scalar ops are lowered by the elementwise lowering's
//! own routines (one definition of each op's arithmetic). The function returns 0, or `b + 1`
//! when a checked access of buffer `b` is out of range (at once: the rest of its tiles do not
//! run).

use super::lower::{b, Lower, LowerError, R};
use crate::loops::{Expr, LoopKernel, Stmt};
use inkwell::basic_block::BasicBlock;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::FastMathFlags;
use inkwell::values::{BasicValueEnum, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, IntPredicate};
use mmc_ir::DType;

struct Loops<'a, 'ctx> {
    l: Lower<'a, 'ctx>,
    k: &'a LoopKernel,
    f: FunctionValue<'ctx>,
    bufs: Vec<PointerValue<'ctx>>,
    vars: Vec<PointerValue<'ctx>>,
}

/// Adds loop kernel `k`'s function to `module`.
pub fn lower_loop<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    k: &LoopKernel,
) -> Result<(), LowerError> {
    let err = |message: String| LowerError {
        kernel: k.name.clone(),
        message,
    };
    k.verify().map_err(|e| err(e.message))?;
    lower_kernel(cx, module, k).map_err(err)
}

fn lower_kernel<'ctx>(cx: &'ctx Context, module: &Module<'ctx>, k: &LoopKernel) -> R<()> {
    let bd = cx.create_builder();
    let ptr = cx.ptr_type(AddressSpace::default());
    let i64t = cx.i64_type();
    let fn_ty = i64t.fn_type(&[ptr.into(), i64t.into(), i64t.into()], false);
    let f = module.add_function(&k.name, fn_ty, None);
    let entry = cx.append_basic_block(f, "entry");
    bd.position_at_end(entry);
    let l = Lower {
        cx,
        module,
        bd: &bd,
    };
    let args = f.get_nth_param(0).ok_or("no buffers")?.into_pointer_value();
    let begin = f.get_nth_param(1).ok_or("no begin")?.into_int_value();
    let end = f.get_nth_param(2).ok_or("no end")?.into_int_value();
    let mut bufs = Vec::new();
    for i in 0..k.buffers.len() {
        // SAFETY (of the generated code): the runtime passes one pointer per buffer.
        let p = unsafe { b(bd.build_gep(ptr, args, &[i64t.const_int(i as u64, false)], "bp")) }?;
        bufs.push(b(bd.build_load(ptr, p, "buf"))?.into_pointer_value());
    }
    let mut vars = Vec::new();
    for (i, &d) in k.vars.iter().enumerate() {
        let t = l.reg_type(d);
        let slot = b(bd.build_alloca(t, &format!("v{i}")))?;
        b(bd.build_store(slot, t.const_zero()))?;
        vars.push(slot);
    }
    let mut lw = Loops {
        l,
        k,
        f,
        bufs,
        vars,
    };
    let tile = i64t.const_int(k.tile as u64, false);
    let items = i64t.const_int(k.items as u64, false);
    let start = b(bd.build_int_mul(begin, tile, "start"))?;
    let stop = b(bd.build_int_mul(end, tile, "stop"))?;
    let over = b(bd.build_int_compare(IntPredicate::UGT, stop, items, "over"))?;
    let stop = b(bd.build_select(over, items, stop, "stop"))?.into_int_value();
    let item = lw.vars[0];
    lw.counted(item, start, stop, |lw| lw.block(&k.body))?;
    b(bd.build_return(Some(&i64t.const_zero())))?;
    Ok(())
}

impl<'ctx> Loops<'_, 'ctx> {
    fn i64(&self, v: u64) -> IntValue<'ctx> {
        self.l.cx.i64_type().const_int(v, false)
    }

    fn append(&self, name: &str) -> BasicBlock<'ctx> {
        self.l.cx.append_basic_block(self.f, name)
    }

    /// `for slot in start..end { body }`, the bounds evaluated once.
    fn counted(
        &mut self,
        slot: PointerValue<'ctx>,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        body: impl FnOnce(&mut Self) -> R<()>,
    ) -> R<()> {
        let bd = self.l.bd;
        let i64t = self.l.cx.i64_type();
        b(bd.build_store(slot, start))?;
        let head = self.append("head");
        let inner = self.append("body");
        let done = self.append("done");
        b(bd.build_unconditional_branch(head))?;
        bd.position_at_end(head);
        let i = b(bd.build_load(i64t, slot, "i"))?.into_int_value();
        let more = b(bd.build_int_compare(IntPredicate::SLT, i, end, "more"))?;
        b(bd.build_conditional_branch(more, inner, done))?;
        bd.position_at_end(inner);
        body(self)?;
        let i = b(bd.build_load(i64t, slot, "i"))?.into_int_value();
        let next = b(bd.build_int_add(i, self.i64(1), "next"))?;
        b(bd.build_store(slot, next))?;
        b(bd.build_unconditional_branch(head))?;
        bd.position_at_end(done);
        Ok(())
    }

    fn block(&mut self, body: &[Stmt]) -> R<()> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> R<()> {
        let bd = self.l.bd;
        match s {
            Stmt::Set(v, e) => {
                let x = self.expr(e)?;
                b(bd.build_store(self.vars[v.0 as usize], x))?;
            }
            Stmt::Accumulate(v, e) => {
                let d = self.k.vars[v.0 as usize];
                let slot = self.vars[v.0 as usize];
                let x = self.expr(e)?;
                let acc = b(bd.build_load(self.l.reg_type(d), slot, "acc"))?;
                let sum: BasicValueEnum = if d.is_float() {
                    let sum =
                        b(bd.build_float_add(acc.into_float_value(), x.into_float_value(), "sum"))?;
                    // Reassociable: the vectoriser may keep partial sums.
                    sum.as_instruction()
                        .ok_or("a sum that is not an instruction")?
                        .set_fast_math_flags(FastMathFlags::AllowReassoc)
                        .map_err(|e| format!("{e:?}"))?;
                    self.l.round_bf16_if(d, sum.into())?
                } else {
                    let sum = b(bd.build_int_add(acc.into_int_value(), x.into_int_value(), "sum"))?;
                    sum.into()
                };
                b(bd.build_store(slot, sum))?;
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                let s = self.expr(start)?.into_int_value();
                let e = self.expr(end)?.into_int_value();
                self.counted(self.vars[var.0 as usize], s, e, |lw| lw.block(body))?;
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let c = self.expr(cond)?.into_int_value();
                let (t, o, join) = (
                    self.append("then"),
                    self.append("else"),
                    self.append("join"),
                );
                b(bd.build_conditional_branch(c, t, o))?;
                bd.position_at_end(t);
                self.block(then)?;
                b(bd.build_unconditional_branch(join))?;
                bd.position_at_end(o);
                self.block(otherwise)?;
                b(bd.build_unconditional_branch(join))?;
                bd.position_at_end(join);
            }
            Stmt::Store {
                buffer,
                index,
                value,
                checked,
            } => {
                let i = self.index(*buffer, index, *checked)?;
                let d = self.k.buffers[*buffer].dtype;
                let v = self.expr(value)?;
                let v = self.l.to_mem(d, v)?;
                // SAFETY (of the generated code): the index is in range, checked when it
                // comes from data and by the op's description otherwise.
                let p =
                    unsafe { b(bd.build_gep(self.l.mem_type(d), self.bufs[*buffer], &[i], "p")) }?;
                b(bd.build_store(p, v))?;
            }
        }
        Ok(())
    }

    /// The index of an access to `buffer`; when `checked`, an index outside the buffer
    /// returns the error code `buffer + 1`.
    fn index(&mut self, buffer: usize, e: &Expr, checked: bool) -> R<IntValue<'ctx>> {
        let i = self.expr(e)?.into_int_value();
        if checked {
            let bd = self.l.bd;
            let len: usize = self.k.buffers[buffer].shape.iter().product();
            let ok = b(bd.build_int_compare(IntPredicate::ULT, i, self.i64(len as u64), "inb"))?;
            let (fail, go) = (self.append("oob"), self.append("inb"));
            b(bd.build_conditional_branch(ok, go, fail))?;
            bd.position_at_end(fail);
            b(bd.build_return(Some(&self.i64(buffer as u64 + 1))))?;
            bd.position_at_end(go);
        }
        Ok(i)
    }

    fn expr(&mut self, e: &Expr) -> R<BasicValueEnum<'ctx>> {
        let l = &self.l;
        let bd = l.bd;
        let d = self.k.dtype(e)?;
        Ok(match e {
            Expr::Const(v, d) => l.constant(*v, *d),
            Expr::Var(v) => b(bd.build_load(l.reg_type(d), self.vars[v.0 as usize], "v"))?,
            Expr::Load {
                buffer,
                index,
                checked,
            } => {
                let i = self.index(*buffer, index, *checked)?;
                self.l.load(self.bufs[*buffer], d, i)?
            }
            Expr::Unary(u, x) => {
                let x = self.expr(x)?;
                self.l.unary(*u, d, x)?
            }
            Expr::ExpApprox(x) => {
                let x = self.expr(x)?;
                if d == DType::F32 || d == DType::BF16 {
                    let y = self.l.exp_f32_approx(x.into_float_value())?;
                    self.l.round_bf16_if(d, y.into())?
                } else {
                    self.l.unary(mmc_ir::UnaryOp::Exp, d, x)?
                }
            }
            Expr::Binary(op, x, y) => {
                let (x, y) = (self.expr(x)?, self.expr(y)?);
                self.l.binary(*op, d, x, y)?
            }
            Expr::Compare(c, x, y) => {
                let od = self.k.dtype(x)?;
                let (x, y) = (self.expr(x)?, self.expr(y)?);
                self.l.compare(*c, od, x, y)?
            }
            Expr::Select(c, x, y) => {
                let c = self.expr(c)?.into_int_value();
                let (x, y) = (self.expr(x)?, self.expr(y)?);
                b(self.l.bd.build_select(c, x, y, "sel"))?
            }
            Expr::Cast(to, x) => {
                let from = self.k.dtype(x)?;
                let x = self.expr(x)?;
                self.l.cast(from, *to, x)?
            }
            Expr::IDiv(x, y) => {
                let (x, y) = (self.expr(x)?, self.expr(y)?);
                b(self
                    .l
                    .bd
                    .build_int_signed_div(x.into_int_value(), y.into_int_value(), "div"))?
                .into()
            }
            Expr::IRem(x, y) => {
                let (x, y) = (self.expr(x)?, self.expr(y)?);
                b(self
                    .l
                    .bd
                    .build_int_signed_rem(x.into_int_value(), y.into_int_value(), "rem"))?
                .into()
            }
        })
    }
}
