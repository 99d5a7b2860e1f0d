//! Kernel IR to LLVM IR: one function per kernel,
//! `i64 name(void **buffers, i64 tile_begin, i64 tile_end)`, returning 0 (the elementwise
//! kernels cannot fail; a loop kernel returns an error code, see `lower_loops`).
//!
//! Each op computes what the interpreter computes: the interpreter evaluates every float op in
//! f64 and rounds the result once to the declared dtype. For `+ - * /`, `sqrt`, negation,
//! `abs` and the reciprocal, the f32 instruction is that correctly rounded result; the
//! transcendental functions, `pow` and `rsqrt` are computed in f64 through libm (the functions
//! the interpreter's own f64 arithmetic calls) and rounded once. Integer ops wrap as the
//! interpreter's do, and float-to-int casts saturate as Rust's `as` does.

use crate::kernel::{Index, Kernel, Reduction};
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicTypeEnum, FloatType};
use inkwell::values::{BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use mmc_ir::{BinaryOp, CmpOp, DType, Op, ReduceKind, UnaryOp};

/// A failure to build LLVM IR: an LLVM builder error (a bug in mmc).
#[derive(Debug, thiserror::Error)]
#[error("kernel `{kernel}`: {message}")]
pub struct LowerError {
    pub kernel: String,
    pub message: String,
}

pub(super) type R<T> = Result<T, String>;

pub(super) fn b<T, E: std::fmt::Display>(r: Result<T, E>) -> R<T> {
    r.map_err(|e| e.to_string())
}

pub(super) struct Lower<'a, 'ctx> {
    pub(super) cx: &'ctx Context,
    pub(super) module: &'a Module<'ctx>,
    pub(super) bd: &'a Builder<'ctx>,
}

impl<'ctx> Lower<'_, 'ctx> {
    /// The register type of `d` (bool as i1; a bf16 as the f32 of the same value, so its
    /// arithmetic is f32's, rounded back after each op).
    pub(super) fn reg_type(&self, d: DType) -> BasicTypeEnum<'ctx> {
        match d {
            DType::F32 | DType::BF16 => self.cx.f32_type().into(),
            DType::F64 => self.cx.f64_type().into(),
            DType::I64 => self.cx.i64_type().into(),
            DType::I32 => self.cx.i32_type().into(),
            DType::Bool => self.cx.bool_type().into(),
            other => unreachable!("kernels are built only over supported dtypes, not {other}"),
        }
    }

    /// The in-memory type of `d` (bool as one byte, bf16 as its 16 bits).
    pub(super) fn mem_type(&self, d: DType) -> BasicTypeEnum<'ctx> {
        match d {
            DType::Bool => self.cx.i8_type().into(),
            DType::BF16 => self.cx.i16_type().into(),
            d => self.reg_type(d),
        }
    }

    /// A register of dtype `d` in its in-memory form, to be stored: a bool as a byte, a bf16
    /// (an f32 that every op has rounded to bf16) as the high half of its bits.
    pub(super) fn to_mem(&self, d: DType, v: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let (cx, bd) = (self.cx, self.bd);
        Ok(match d {
            DType::Bool => {
                b(bd.build_int_z_extend(v.into_int_value(), cx.i8_type(), "byte"))?.into()
            }
            DType::BF16 => {
                let bits = b(bd.build_bit_cast(v, cx.i32_type(), "bits"))?.into_int_value();
                let hi =
                    b(bd.build_right_shift(bits, cx.i32_type().const_int(16, false), false, "hi"))?;
                b(bd.build_int_truncate(hi, cx.i16_type(), "bf16"))?.into()
            }
            _ => v,
        })
    }

    /// `x` (an f32) rounded to the nearest bf16, ties to even, as an f32: what PyTorch and
    /// the `half` crate do (a NaN stays a NaN, made quiet). Plain integer arithmetic, so it
    /// vectorises.
    pub(super) fn round_bf16(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let (cx, bd) = (self.cx, self.bd);
        let i32t = cx.i32_type();
        let c = |v: u64| i32t.const_int(v, false);
        let bits = b(bd.build_bit_cast(x, i32t, "bits"))?.into_int_value();
        let lsb = b(bd.build_right_shift(bits, c(16), false, "lsb"))?;
        let lsb = b(bd.build_and(lsb, c(1), "lsb"))?;
        let up = b(bd.build_int_add(bits, c(0x7fff), "up"))?;
        let up = b(bd.build_int_add(up, lsb, "up"))?;
        let quiet = b(bd.build_or(bits, c(0x0040_0000), "quiet"))?;
        let nan = b(bd.build_float_compare(FloatPredicate::UNO, x, x, "nan"))?;
        let r = b(bd.build_select(nan, quiet, up, "r"))?.into_int_value();
        let r = b(bd.build_and(r, c(0xffff_0000), "r"))?;
        Ok(b(bd.build_bit_cast(r, cx.f32_type(), "bf16"))?.into_float_value())
    }

    /// `v` rounded to bf16 when `d` is bf16 (an op's f32 result), as it is otherwise.
    pub(super) fn round_bf16_if(
        &self,
        d: DType,
        v: BasicValueEnum<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        Ok(if d == DType::BF16 {
            self.round_bf16(v.into_float_value())?.into()
        } else {
            v
        })
    }

    pub(super) fn float_type(&self, d: DType) -> FloatType<'ctx> {
        match d {
            DType::F64 => self.cx.f64_type(),
            _ => self.cx.f32_type(),
        }
    }

    /// The libm function `name` over doubles, declared once.
    fn libm(&self, name: &str, arity: usize) -> FunctionValue<'ctx> {
        if let Some(f) = self.module.get_function(name) {
            return f;
        }
        let f64t = self.cx.f64_type();
        let params = vec![f64t.into(); arity];
        let ty = f64t.fn_type(&params, false);
        self.module.add_function(name, ty, Some(Linkage::External))
    }

    fn call_f64(&self, name: &str, args: &[FloatValue<'ctx>]) -> R<FloatValue<'ctx>> {
        let f = self.libm(name, args.len());
        let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
        let v = b(self.bd.build_call(f, &args, name))?;
        v.try_as_basic_value()
            .basic()
            .map(|v| v.into_float_value())
            .ok_or_else(|| format!("`{name}` returned no value"))
    }

    /// `f` applied in f64 to floats of dtype `d`, rounded back once.
    fn via_f64(
        &self,
        d: DType,
        args: &[FloatValue<'ctx>],
        f: impl FnOnce(&[FloatValue<'ctx>]) -> R<FloatValue<'ctx>>,
    ) -> R<FloatValue<'ctx>> {
        if d == DType::F64 {
            return f(args);
        }
        let f64t = self.cx.f64_type();
        let wide: Vec<FloatValue> = args
            .iter()
            .map(|a| b(self.bd.build_float_ext(*a, f64t, "w")))
            .collect::<R<_>>()?;
        let r = f(&wide)?;
        b(self.bd.build_float_trunc(r, self.float_type(d), "n"))
    }

    pub(super) fn unary(
        &self,
        u: UnaryOp,
        d: DType,
        x: BasicValueEnum<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        if !d.is_float() {
            let x = x.into_int_value();
            return Ok(match u {
                UnaryOp::Neg => b(self.bd.build_int_neg(x, "neg"))?.into(),
                UnaryOp::Abs => {
                    // wrapping_abs: i64::MIN stays MIN (no poison).
                    let neg = b(self.bd.build_int_neg(x, "neg"))?;
                    let lt = b(self.bd.build_int_compare(
                        IntPredicate::SLT,
                        x,
                        x.get_type().const_zero(),
                        "lt",
                    ))?;
                    b(self.bd.build_select(lt, neg, x, "abs"))?
                }
                UnaryOp::Not => b(self.bd.build_not(x, "not"))?.into(),
                other => return Err(format!("{other:?} on integers")),
            });
        }
        if d == DType::BF16 {
            // f32's result rounded to bf16: for the basic ops one correct rounding (f32 has
            // more than twice bf16's precision), for the others as the interpreter rounds.
            let r = self.unary(u, DType::F32, x)?;
            return self.round_bf16_if(d, r);
        }
        let x = x.into_float_value();
        let ft = self.float_type(d);
        let one = |t: FloatType<'ctx>| t.const_float(1.0);
        Ok(match u {
            UnaryOp::Neg => b(self.bd.build_float_neg(x, "neg"))?.into(),
            UnaryOp::Abs => {
                let f = self.intrinsic("llvm.fabs", ft.into())?;
                self.call_intrinsic(f, &[x])?.into()
            }
            UnaryOp::Sqrt => {
                let f = self.intrinsic("llvm.sqrt", ft.into())?;
                self.call_intrinsic(f, &[x])?.into()
            }
            UnaryOp::Recip => b(self.bd.build_float_div(one(ft), x, "recip"))?.into(),
            UnaryOp::Rsqrt => self
                .via_f64(d, &[x], |a| {
                    let f64t = self.cx.f64_type();
                    let f = self.intrinsic("llvm.sqrt", f64t.into())?;
                    let s = self.call_intrinsic(f, &[a[0]])?;
                    b(self.bd.build_float_div(one(f64t), s, "rsqrt"))
                })?
                .into(),
            // f32: an inline f64 exp that LLVM vectorises (see `exp_f32_range`); f64 keeps
            // libm's, the interpreter's own.
            UnaryOp::Exp if d == DType::F32 => {
                self.via_f64(d, &[x], |a| self.exp_f32_range(a[0]))?.into()
            }
            UnaryOp::Exp => self.via_f64(d, &[x], |a| self.call_f64("exp", a))?.into(),
            UnaryOp::Log => self.via_f64(d, &[x], |a| self.call_f64("log", a))?.into(),
            UnaryOp::Tanh => self.via_f64(d, &[x], |a| self.call_f64("tanh", a))?.into(),
            UnaryOp::Erf => self.via_f64(d, &[x], |a| self.call_f64("erf", a))?.into(),
            UnaryOp::Sin => self.via_f64(d, &[x], |a| self.call_f64("sin", a))?.into(),
            UnaryOp::Cos => self.via_f64(d, &[x], |a| self.call_f64("cos", a))?.into(),
            UnaryOp::Not => return Err("not on floats".into()),
        })
    }

    /// `exp(x)` in f64 for an `x` that came from an f32, to be rounded to f32: plain
    /// arithmetic, so loops over it vectorise (a libm call does not). `x` is clamped to
    /// [-104, 89], outside which the f32 result is 0 or infinity anyway, so `2^n` stays a
    /// normal double; then `exp(x) = 2^n * exp(r)` with `r = x - n ln 2` (|r| <= ln 2 / 2, by
    /// two FMAs with a split ln 2) and `exp(r)` by its Taylor series to degree 13 (truncation
    /// below 1e-17 relative). The error is within 2 units of the last place of a double, so
    /// the f32 rounding agrees with libm's exp except within 2^-28 of a rounding midpoint.
    /// NaN stays NaN.
    fn exp_f32_range(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let (cx, bd) = (self.cx, self.bd);
        let f64t = cx.f64_type();
        // ln 2 split: the high part has its low 32 bits zero, so n * hi is exact.
        let ln2 = (
            f64::from_bits(0x3FE6_2E42_FEE0_0000),
            1.908_214_929_270_587_7e-10,
        );
        let (n, p) = self.exp_reduced(x, f64t, ln2, 13)?;
        let i64t = cx.i64_type();
        let ni = b(bd.build_float_to_signed_int(n, i64t, "ni"))?;
        let e = b(bd.build_int_add(ni, i64t.const_int(1023, false), "e"))?;
        let bits = b(bd.build_left_shift(e, i64t.const_int(52, false), "bits"))?;
        let scale = b(bd.build_bit_cast(bits, f64t, "scale"))?.into_float_value();
        let y = b(bd.build_float_mul(p, scale, "exp"))?;
        self.keep_nan(x, y)
    }

    /// `exp(x)` of an f32 in f32 arithmetic, for [`crate::loops::Expr::ExpApprox`]: `x`
    /// clamped to [-104, 89] (beyond which the result is 0 or infinity anyway), `exp(x) = 2^n
    /// exp(r)` with `r = x - n ln 2` by two FMAs with a split ln 2 (|r| <= ln 2 / 2), `exp(r)`
    /// by its Taylor series to degree 7 (truncation below 6e-9 relative, a tenth of an f32
    /// unit), and `2^n` as two normal powers of two (`n` reaches -150), so results that are
    /// subnormal or overflow round as the product does. Within a few units in the last place
    /// of libm's; NaN stays NaN.
    pub(super) fn exp_f32_approx(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let (cx, bd) = (self.cx, self.bd);
        let f32t = cx.f32_type();
        // ln 2 split for f32: the high part has 9 significant bits, so n * hi is exact.
        let (n, p) = self.exp_reduced(x, f32t, (0.693_359_375, -2.121_944_4e-4), 7)?;
        let i32t = cx.i32_type();
        let ni = b(bd.build_float_to_signed_int(n, i32t, "ni"))?;
        let n1 = b(bd.build_right_shift(ni, i32t.const_int(1, false), true, "n1"))?;
        let n2 = b(bd.build_int_sub(ni, n1, "n2"))?;
        let pow2 = |k: inkwell::values::IntValue<'ctx>| -> R<FloatValue<'ctx>> {
            let e = b(bd.build_int_add(k, i32t.const_int(127, false), "e"))?;
            let bits = b(bd.build_left_shift(e, i32t.const_int(23, false), "bits"))?;
            Ok(b(bd.build_bit_cast(bits, f32t, "pow2"))?.into_float_value())
        };
        let y = b(bd.build_float_mul(p, pow2(n1)?, "exp"))?;
        let y = b(bd.build_float_mul(y, pow2(n2)?, "exp"))?;
        self.keep_nan(x, y)
    }

    /// The range reduction and series shared by the two exps: `x` clamped to [-104, 89],
    /// `n = rint(x log2 e)`, `r = x - n ln 2` by two FMAs with `ln2 = (hi, lo)` (hi exact
    /// times any n), and `exp(r)` by its Taylor series to `degree`, in `ft`. Returns (n, exp(r)).
    fn exp_reduced(
        &self,
        x: FloatValue<'ctx>,
        ft: inkwell::types::FloatType<'ctx>,
        (hi, lo): (f64, f64),
        degree: u32,
    ) -> R<(FloatValue<'ctx>, FloatValue<'ctx>)> {
        let c = |v: f64| ft.const_float(v);
        let call = |name: &str, args: &[FloatValue<'ctx>]| -> R<FloatValue<'ctx>> {
            let f = self.intrinsic(name, ft.into())?;
            self.call_intrinsic(f, args)
        };
        let low = call("llvm.maxnum", &[x, c(-104.0)])?;
        let xc = call("llvm.minnum", &[low, c(89.0)])?;
        let t = b(self
            .bd
            .build_float_mul(xc, c(std::f64::consts::LOG2_E), "t"))?;
        let n = call("llvm.rint", &[t])?;
        let neg_n = b(self.bd.build_float_neg(n, "nn"))?;
        let r = call("llvm.fma", &[neg_n, c(hi), xc])?;
        let r = call("llvm.fma", &[neg_n, c(lo), r])?;
        let mut p = c(1.0 / factorial(degree));
        for k in (0..degree).rev() {
            p = call("llvm.fma", &[p, r, c(1.0 / factorial(k))])?;
        }
        Ok((n, p))
    }

    /// `y`, or `x` where `x` is NaN (minnum and maxnum drop a NaN: this puts it back).
    fn keep_nan(&self, x: FloatValue<'ctx>, y: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let bd = self.bd;
        let nan = b(bd.build_float_compare(FloatPredicate::UNO, x, x, "nan"))?;
        Ok(b(bd.build_select(nan, x, y, "exp"))?.into_float_value())
    }

    pub(super) fn intrinsic(&self, name: &str, ty: BasicTypeEnum<'ctx>) -> R<FunctionValue<'ctx>> {
        let i = inkwell::intrinsics::Intrinsic::find(name).ok_or(format!("no {name}"))?;
        i.get_declaration(self.module, &[ty])
            .ok_or(format!("no declaration of {name}"))
    }

    fn call_intrinsic(
        &self,
        f: FunctionValue<'ctx>,
        args: &[FloatValue<'ctx>],
    ) -> R<FloatValue<'ctx>> {
        let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
        let v = b(self.bd.build_call(f, &args, "i"))?;
        v.try_as_basic_value()
            .basic()
            .map(|v| v.into_float_value())
            .ok_or_else(|| "an intrinsic returned no value".into())
    }

    pub(super) fn binary(
        &self,
        op: BinaryOp,
        d: DType,
        x: BasicValueEnum<'ctx>,
        y: BasicValueEnum<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        if !d.is_float() {
            let (x, y) = (x.into_int_value(), y.into_int_value());
            let pick = |p: IntPredicate| -> R<BasicValueEnum<'ctx>> {
                let c = b(self.bd.build_int_compare(p, x, y, "c"))?;
                b(self.bd.build_select(c, x, y, "m"))
            };
            return Ok(match op {
                BinaryOp::Add => b(self.bd.build_int_add(x, y, "add"))?.into(),
                BinaryOp::Sub => b(self.bd.build_int_sub(x, y, "sub"))?.into(),
                BinaryOp::Mul => b(self.bd.build_int_mul(x, y, "mul"))?.into(),
                // Bools are 0 and 1: unsigned, since an i1 `true` is -1 signed.
                BinaryOp::Max if d == DType::Bool => pick(IntPredicate::UGE)?,
                BinaryOp::Min if d == DType::Bool => pick(IntPredicate::ULE)?,
                BinaryOp::Max => pick(IntPredicate::SGE)?,
                BinaryOp::Min => pick(IntPredicate::SLE)?,
                BinaryOp::And => b(self.bd.build_and(x, y, "and"))?.into(),
                BinaryOp::Or => b(self.bd.build_or(x, y, "or"))?.into(),
                other => return Err(format!("{other:?} on integers")),
            });
        }
        if d == DType::BF16 {
            let r = self.binary(op, DType::F32, x, y)?;
            return self.round_bf16_if(d, r);
        }
        let (x, y) = (x.into_float_value(), y.into_float_value());
        Ok(match op {
            BinaryOp::Add => b(self.bd.build_float_add(x, y, "add"))?.into(),
            BinaryOp::Sub => b(self.bd.build_float_sub(x, y, "sub"))?.into(),
            BinaryOp::Mul => b(self.bd.build_float_mul(x, y, "mul"))?.into(),
            BinaryOp::Div => b(self.bd.build_float_div(x, y, "div"))?.into(),
            BinaryOp::Pow => self
                .via_f64(d, &[x, y], |a| self.call_f64("pow", a))?
                .into(),
            // NaN if either is NaN, +0 above -0: the interpreter's max and min.
            BinaryOp::Max | BinaryOp::Min => {
                let name = if op == BinaryOp::Max {
                    "llvm.maximum"
                } else {
                    "llvm.minimum"
                };
                let f = self.intrinsic(name, self.float_type(d).into())?;
                let args = [x.into(), y.into()];
                b(self.bd.build_call(f, &args, "m"))?
                    .try_as_basic_value()
                    .basic()
                    .ok_or("max returned no value")?
            }
            other => return Err(format!("{other:?} on floats")),
        })
    }

    pub(super) fn compare(
        &self,
        c: CmpOp,
        d: DType,
        x: BasicValueEnum<'ctx>,
        y: BasicValueEnum<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        Ok(if d.is_float() {
            let p = match c {
                CmpOp::Eq => FloatPredicate::OEQ,
                CmpOp::Ne => FloatPredicate::UNE,
                CmpOp::Lt => FloatPredicate::OLT,
                CmpOp::Le => FloatPredicate::OLE,
                CmpOp::Gt => FloatPredicate::OGT,
                CmpOp::Ge => FloatPredicate::OGE,
            };
            b(self
                .bd
                .build_float_compare(p, x.into_float_value(), y.into_float_value(), "cmp"))?
            .into()
        } else {
            let unsigned = d == DType::Bool;
            let p = match (c, unsigned) {
                (CmpOp::Eq, _) => IntPredicate::EQ,
                (CmpOp::Ne, _) => IntPredicate::NE,
                (CmpOp::Lt, false) => IntPredicate::SLT,
                (CmpOp::Le, false) => IntPredicate::SLE,
                (CmpOp::Gt, false) => IntPredicate::SGT,
                (CmpOp::Ge, false) => IntPredicate::SGE,
                (CmpOp::Lt, true) => IntPredicate::ULT,
                (CmpOp::Le, true) => IntPredicate::ULE,
                (CmpOp::Gt, true) => IntPredicate::UGT,
                (CmpOp::Ge, true) => IntPredicate::UGE,
            };
            b(self
                .bd
                .build_int_compare(p, x.into_int_value(), y.into_int_value(), "cmp"))?
            .into()
        })
    }

    pub(super) fn cast(
        &self,
        from: DType,
        to: DType,
        x: BasicValueEnum<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        let bd = self.bd;
        if to == DType::BF16 && from != DType::BF16 {
            // Through f32, as the interpreter rounds to bf16.
            let r = self.cast(from, DType::F32, x)?;
            return self.round_bf16_if(to, r);
        }
        // A bf16 register is the f32 of the same value.
        let from = if from == DType::BF16 {
            DType::F32
        } else {
            from
        };
        Ok(match (from.is_float(), to.is_float()) {
            (true, true) => {
                let x = x.into_float_value();
                let t = self.float_type(to);
                match (from, to) {
                    (f, t2) if f == t2 => x.into(),
                    (DType::F32, DType::F64) => b(bd.build_float_ext(x, t, "ext"))?.into(),
                    _ => b(bd.build_float_trunc(x, t, "trunc"))?.into(),
                }
            }
            (true, false) => {
                let x = x.into_float_value();
                if to == DType::Bool {
                    let zero = x.get_type().const_zero();
                    b(bd.build_float_compare(FloatPredicate::UNE, x, zero, "nz"))?.into()
                } else {
                    // Rust's `as i64`: saturating, NaN to 0; then wrapped to i32.
                    let i64t = self.cx.i64_type();
                    let name = "llvm.fptosi.sat";
                    let i = inkwell::intrinsics::Intrinsic::find(name).ok_or("no fptosi.sat")?;
                    let f = i
                        .get_declaration(self.module, &[i64t.into(), x.get_type().into()])
                        .ok_or("no fptosi.sat declaration")?;
                    let v = b(bd.build_call(f, &[x.into()], "fi"))?
                        .try_as_basic_value()
                        .basic()
                        .ok_or("fptosi.sat returned no value")?
                        .into_int_value();
                    if to == DType::I32 {
                        b(bd.build_int_truncate(v, self.cx.i32_type(), "t"))?.into()
                    } else {
                        v.into()
                    }
                }
            }
            (false, true) => {
                let x = x.into_int_value();
                // Through f64 as the interpreter does (`x as f64`, then rounded once more).
                let f64t = self.cx.f64_type();
                let w = if from == DType::Bool {
                    b(bd.build_unsigned_int_to_float(x, f64t, "u"))?
                } else {
                    b(bd.build_signed_int_to_float(x, f64t, "s"))?
                };
                if to == DType::F64 {
                    w.into()
                } else {
                    b(bd.build_float_trunc(w, self.float_type(to), "t"))?.into()
                }
            }
            (false, false) => {
                let x = x.into_int_value();
                if to == DType::Bool {
                    let zero = x.get_type().const_zero();
                    b(bd.build_int_compare(IntPredicate::NE, x, zero, "nz"))?.into()
                } else {
                    let t = self.reg_type(to).into_int_type();
                    let (fw, tw) = (x.get_type().get_bit_width(), t.get_bit_width());
                    if fw == tw {
                        x.into()
                    } else if fw > tw {
                        b(bd.build_int_truncate(x, t, "t"))?.into()
                    } else if from == DType::Bool {
                        b(bd.build_int_z_extend(x, t, "z"))?.into()
                    } else {
                        b(bd.build_int_s_extend(x, t, "s"))?.into()
                    }
                }
            }
        })
    }

    /// Element `idx` of `buf` (of dtype `d`) as a register (a bool byte as i1).
    pub(super) fn load(
        &self,
        buf: PointerValue<'ctx>,
        d: DType,
        idx: IntValue<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        let mt = self.mem_type(d);
        // SAFETY (of the generated code): idx < the buffer's element count by construction.
        let p = unsafe { b(self.bd.build_gep(mt, buf, &[idx], "p")) }?;
        let v = b(self.bd.build_load(mt, p, "v"))?;
        Ok(if d == DType::BF16 {
            let i32t = self.cx.i32_type();
            let w = b(self.bd.build_int_z_extend(v.into_int_value(), i32t, "w"))?;
            let bits = b(self
                .bd
                .build_left_shift(w, i32t.const_int(16, false), "bits"))?;
            b(self.bd.build_bit_cast(bits, self.cx.f32_type(), "f"))?
        } else if d == DType::Bool {
            let byte = v.into_int_value();
            b(self
                .bd
                .build_int_compare(IntPredicate::NE, byte, byte.get_type().const_zero(), "b"))?
            .into()
        } else {
            v
        })
    }

    /// The reduction `r` of `buf` from offset `base`: an inner loop over the reduced elements
    /// in row-major order, floats accumulated in f64, the result rounded once to `d`.
    fn reduce(
        &self,
        f: FunctionValue<'ctx>,
        r: &Reduction,
        buf: PointerValue<'ctx>,
        d: DType,
        base: IntValue<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        let (cx, bd) = (self.cx, self.bd);
        let i64t = cx.i64_type();
        let acc_ty: BasicTypeEnum = if d.is_float() {
            cx.f64_type().into()
        } else {
            self.reg_type(d)
        };
        let init: BasicValueEnum = match (d.is_float(), r.kind) {
            (true, ReduceKind::Sum) => cx.f64_type().const_float(0.0).into(),
            (true, ReduceKind::Max) => cx.f64_type().const_float(f64::NEG_INFINITY).into(),
            (false, ReduceKind::Sum) => acc_ty.into_int_type().const_zero().into(),
            (false, ReduceKind::Max) => {
                let t = acc_ty.into_int_type();
                t.const_int(1u64 << (t.get_bit_width() - 1), false).into()
            }
        };
        let total: usize = r.extent.iter().product();
        let pre = bd.get_insert_block().ok_or("no block")?;
        let head = cx.append_basic_block(f, "rhead");
        let body = cx.append_basic_block(f, "rbody");
        let done = cx.append_basic_block(f, "rdone");
        b(bd.build_unconditional_branch(head))?;
        bd.position_at_end(head);
        let j = b(bd.build_phi(i64t, "j"))?;
        let acc = b(bd.build_phi(acc_ty, "acc"))?;
        j.add_incoming(&[(&i64t.const_zero(), pre)]);
        acc.add_incoming(&[(&init, pre)]);
        let jv = j.as_basic_value().into_int_value();
        let more = b(bd.build_int_compare(
            IntPredicate::ULT,
            jv,
            i64t.const_int(total as u64, false),
            "rmore",
        ))?;
        b(bd.build_conditional_branch(more, body, done))?;
        bd.position_at_end(body);
        // A reduction over contiguous elements (the usual case: a whole tensor, a row)
        // reads element `base + j`; others take each coordinate of j apart.
        let mut contiguous = true;
        let mut expect = 1;
        for (&dim, &stride) in r.extent.iter().zip(&r.strides).rev() {
            if dim != 1 {
                contiguous &= stride == expect;
                expect *= dim;
            }
        }
        let mut off = base;
        let mut inner = total;
        for (&dim, &stride) in r.extent.iter().zip(&r.strides) {
            inner /= dim.max(1);
            if contiguous {
                off = b(bd.build_int_add(base, jv, "off"))?;
                break;
            }
            if dim == 1 {
                continue;
            }
            let q = b(bd.build_int_unsigned_div(jv, i64t.const_int(inner as u64, false), "q"))?;
            let c = b(bd.build_int_unsigned_rem(q, i64t.const_int(dim as u64, false), "c"))?;
            let t = b(bd.build_int_mul(c, i64t.const_int(stride as u64, false), "t"))?;
            off = b(bd.build_int_add(off, t, "off"))?;
        }
        let x = self.load(buf, d, off)?;
        let a = acc.as_basic_value();
        let next: BasicValueEnum = if d.is_float() {
            let x = x.into_float_value();
            let x = if d == DType::F64 {
                x
            } else {
                b(bd.build_float_ext(x, cx.f64_type(), "w"))?
            };
            match r.kind {
                ReduceKind::Sum => {
                    let sum = b(bd.build_float_add(a.into_float_value(), x, "s"))?;
                    if d != DType::F64 {
                        // f32 terms summed in f64 and rounded once to f32: the order of the
                        // f64 sums cannot change the result beyond the final rounding's
                        // midpoints, so the vectoriser may keep partial sums.
                        sum.as_instruction()
                            .ok_or("a sum that is not an instruction")?
                            .set_fast_math_flags(inkwell::values::FastMathFlags::AllowReassoc)
                            .map_err(|e| format!("{e:?}"))?;
                    }
                    sum.into()
                }
                ReduceKind::Max => {
                    let m = self.intrinsic("llvm.maximum", cx.f64_type().into())?;
                    b(bd.build_call(m, &[a.into(), x.into()], "m"))?
                        .try_as_basic_value()
                        .basic()
                        .ok_or("maximum returned no value")?
                }
            }
        } else {
            let (a, x) = (a.into_int_value(), x.into_int_value());
            match r.kind {
                ReduceKind::Sum => b(bd.build_int_add(a, x, "s"))?.into(),
                ReduceKind::Max => {
                    let c = b(bd.build_int_compare(IntPredicate::SGE, a, x, "c"))?;
                    b(bd.build_select(c, a, x, "m"))?
                }
            }
        };
        let jn = b(bd.build_int_add(jv, i64t.const_int(1, false), "jn"))?;
        let end = bd.get_insert_block().ok_or("no block")?;
        j.add_incoming(&[(&jn, end)]);
        acc.add_incoming(&[(&next, end)]);
        b(bd.build_unconditional_branch(head))?;
        bd.position_at_end(done);
        let a = acc.as_basic_value();
        Ok(if d.is_float() && d != DType::F64 {
            let r = b(bd.build_float_trunc(a.into_float_value(), self.float_type(d), "r"))?;
            self.round_bf16_if(d, r.into())?
        } else {
            a
        })
    }

    pub(super) fn constant(&self, value: f64, d: DType) -> BasicValueEnum<'ctx> {
        match d {
            DType::F32 => self.cx.f32_type().const_float(value as f32 as f64).into(),
            // Rounded by the interpreter's own rule.
            DType::BF16 => self
                .cx
                .f32_type()
                .const_float(mmc_ir::tensor::round_bf16(value))
                .into(),
            DType::F64 => self.cx.f64_type().const_float(value).into(),
            DType::Bool => self
                .cx
                .bool_type()
                .const_int(u64::from(value as i64 != 0), false)
                .into(),
            d => {
                let v = value as i64;
                let v = if d == DType::I32 { v as i32 as i64 } else { v };
                self.reg_type(d)
                    .into_int_type()
                    .const_int(v as u64, true)
                    .into()
            }
        }
    }
}

/// Adds kernel `k`'s function to `module`.
pub fn lower<'ctx>(cx: &'ctx Context, module: &Module<'ctx>, k: &Kernel) -> Result<(), LowerError> {
    lower_kernel(cx, module, k).map_err(|message| LowerError {
        kernel: k.name.clone(),
        message,
    })
}

fn lower_kernel<'ctx>(cx: &'ctx Context, module: &Module<'ctx>, k: &Kernel) -> R<()> {
    let bd = cx.create_builder();
    let l = Lower {
        cx,
        module,
        bd: &bd,
    };
    let ptr = cx.ptr_type(AddressSpace::default());
    let i64t = cx.i64_type();
    let fn_ty = i64t.fn_type(&[ptr.into(), i64t.into(), i64t.into()], false);
    let f = module.add_function(&k.name, fn_ty, None);
    let entry = cx.append_basic_block(f, "entry");
    let header = cx.append_basic_block(f, "header");
    let body = cx.append_basic_block(f, "body");
    let exit = cx.append_basic_block(f, "exit");
    bd.position_at_end(entry);
    let args = f.get_nth_param(0).ok_or("no buffers")?.into_pointer_value();
    let begin = f.get_nth_param(1).ok_or("no begin")?.into_int_value();
    let end = f.get_nth_param(2).ok_or("no end")?.into_int_value();
    let mut bufs = Vec::new();
    for i in 0..k.buffers.len() {
        // SAFETY (of the generated code): the runtime passes one pointer per buffer.
        let p = unsafe { b(bd.build_gep(ptr, args, &[i64t.const_int(i as u64, false)], "bp")) }?;
        bufs.push(b(bd.build_load(ptr, p, "buf"))?.into_pointer_value());
    }
    let n = i64t.const_int(k.elements() as u64, false);
    let tile = i64t.const_int(k.tile as u64, false);
    let start = b(bd.build_int_mul(begin, tile, "start"))?;
    let stop = b(bd.build_int_mul(end, tile, "stop"))?;
    let over = b(bd.build_int_compare(IntPredicate::UGT, stop, n, "over"))?;
    let stop = b(bd.build_select(over, n, stop, "stop"))?.into_int_value();
    b(bd.build_unconditional_branch(header))?;

    bd.position_at_end(header);
    let i = b(bd.build_phi(i64t, "i"))?;
    i.add_incoming(&[(&start, entry)]);
    let iv = i.as_basic_value().into_int_value();
    let more = b(bd.build_int_compare(IntPredicate::ULT, iv, stop, "more"))?;
    b(bd.build_conditional_branch(more, body, exit))?;

    bd.position_at_end(body);
    let operand_dtypes: Vec<DType> = k
        .loads
        .iter()
        .map(|ld| k.buffers[ld.buffer].dtype)
        .collect();
    let dtypes = k
        .program
        .dtypes(&operand_dtypes)
        .map_err(|e| e.to_string())?;
    let mut regs: Vec<BasicValueEnum> = Vec::new();
    for ld in &k.loads {
        let buf = &k.buffers[ld.buffer];
        let idx = match &ld.index {
            Index::Contiguous => iv,
            Index::Affine { base, strides } => {
                let mut off = i64t.const_int(*base as u64, false);
                let mut inner: usize = k.elements();
                for (a, &dim) in k.shape.iter().enumerate() {
                    inner /= dim.max(1);
                    if strides[a] == 0 || dim == 1 {
                        continue;
                    }
                    let q =
                        b(bd.build_int_unsigned_div(iv, i64t.const_int(inner as u64, false), "q"))?;
                    let c =
                        b(bd.build_int_unsigned_rem(q, i64t.const_int(dim as u64, false), "c"))?;
                    let t = b(bd.build_int_mul(c, i64t.const_int(strides[a] as u64, false), "t"))?;
                    off = b(bd.build_int_add(off, t, "off"))?;
                }
                off
            }
        };
        let v = match &k.reduce {
            None => l.load(bufs[ld.buffer], buf.dtype, idx)?,
            Some(r) => l.reduce(f, r, bufs[ld.buffer], buf.dtype, idx)?,
        };
        regs.push(v);
    }
    for (inst, &d) in k.program.insts.iter().zip(&dtypes[k.program.inputs..]) {
        let a = |j: usize| regs[inst.args[j] as usize];
        let ad = |j: usize| dtypes[inst.args[j] as usize];
        let v = match &inst.op {
            Op::Const { value, .. } => l.constant(*value, d),
            Op::Unary(u) => l.unary(*u, d, a(0))?,
            Op::Binary(op) => l.binary(*op, d, a(0), a(1))?,
            Op::Compare(c) => l.compare(*c, ad(0), a(0), a(1))?,
            Op::Select => b(bd.build_select(a(0).into_int_value(), a(1), a(2), "sel"))?,
            Op::Cast { to } => l.cast(ad(0), *to, a(0))?,
            other => return Err(format!("`{}` in a kernel program", other.name())),
        };
        regs.push(v);
    }
    let out = k.buffers.len() - 1;
    let od = k.buffers[out].dtype;
    let result = l.to_mem(od, *regs.last().ok_or("an empty program")?)?;
    // SAFETY (of the generated code): i < the result's element count.
    let p = unsafe { b(bd.build_gep(l.mem_type(od), bufs[out], &[iv], "o")) }?;
    b(bd.build_store(p, result))?;
    let next = b(bd.build_int_add(iv, i64t.const_int(1, false), "next"))?;
    let body_end = bd.get_insert_block().ok_or("no block")?;
    i.add_incoming(&[(&next, body_end)]);
    b(bd.build_unconditional_branch(header))?;

    bd.position_at_end(exit);
    b(bd.build_return(Some(&i64t.const_zero())))?;
    Ok(())
}

/// `k!` as a double (exact for the small `k` the series use).
fn factorial(k: u32) -> f64 {
    (1..=k).map(f64::from).product()
}
