//! Elementwise programs: the body of a fused elementwise kernel (`fused.elementwise`,
//! `fused.matmul_epilogue`).
//!
//! A program is a straight line of primitive elementwise ops over scalars. Registers `$0..$n`
//! are the fused op's operands (for an epilogue, `$0` is the product); each instruction defines
//! the next register; the last instruction is the result. Instructions are primitive ops
//! ([`Op`]) typed by the same inference as the graph, so a program means exactly what the chain
//! of primitive nodes it replaces means, and the interpreter evaluates it with the same scalar
//! functions. Its text form is one line, `$2 = mul $0 $1; $3 = const 0.5 f32; $4 = add $2 $3`,
//! which the graph text carries as a quoted attribute.

use crate::infer::infer;
use crate::op::{Attrs, Op};
use crate::{DType, TensorType};
use std::fmt;

/// A register number: an operand below [`Program::inputs`], an instruction's result above.
pub type Reg = u32;

/// One instruction: a primitive elementwise op over earlier registers.
#[derive(Clone, Debug, PartialEq)]
pub struct Inst {
    /// A unary, binary, comparison, select or cast op, or a constant (rank-0 type).
    pub op: Op,
    pub args: Vec<Reg>,
}

/// A fused elementwise kernel's body.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// How many operands the program reads (registers `$0..$inputs`).
    pub inputs: usize,
    /// At least one; the last is the result.
    pub insts: Vec<Inst>,
}

/// Why a program is not well formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("elementwise program: {0}")]
pub struct ProgramError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ProgramError> {
    Err(ProgramError(msg.into()))
}

/// Whether `op` may be an instruction of a program.
pub fn is_scalar_op(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. }
    ) || matches!(op, Op::Const { ty, .. } if ty.rank() == 0)
}

impl Program {
    /// The program of one op over all `inputs` operands in order (a primitive node as a
    /// program).
    pub fn single(op: Op, inputs: usize) -> Program {
        Program {
            inputs,
            insts: vec![Inst {
                op,
                args: (0..inputs as Reg).collect(),
            }],
        }
    }

    /// The dtype of every register, given the operands' dtypes; checks that each instruction
    /// is an elementwise op reading earlier registers with operand types it accepts.
    pub fn dtypes(&self, operands: &[DType]) -> Result<Vec<DType>, ProgramError> {
        if operands.len() != self.inputs {
            return err(format!(
                "reads {} operand(s), the op has {}",
                self.inputs,
                operands.len()
            ));
        }
        if self.insts.is_empty() {
            return err("has no instruction");
        }
        let mut regs: Vec<DType> = operands.to_vec();
        for (i, inst) in self.insts.iter().enumerate() {
            let at = self.inputs + i;
            if !is_scalar_op(&inst.op) {
                return err(format!(
                    "${at}: `{}` is not an elementwise op",
                    inst.op.name()
                ));
            }
            let mut tys = Vec::with_capacity(inst.args.len());
            for &a in &inst.args {
                let Some(&d) = regs.get(a as usize) else {
                    return err(format!("${at} reads ${a}, which is not defined before it"));
                };
                tys.push(TensorType::scalar(d));
            }
            let refs: Vec<&TensorType> = tys.iter().collect();
            let out = infer(&inst.op, &refs).map_err(|e| ProgramError(format!("${at}: {e}")))?;
            regs.push(out[0].dtype);
        }
        Ok(regs)
    }

    /// The result's dtype.
    pub fn result_dtype(&self, operands: &[DType]) -> Result<DType, ProgramError> {
        Ok(*self.dtypes(operands)?.last().expect("checked non-empty"))
    }

    /// The register that holds the result.
    pub fn result(&self) -> Reg {
        (self.inputs + self.insts.len() - 1) as Reg
    }

    /// Operations per element: every instruction but the constants, one each, as the cost
    /// model counts the primitive ops the program replaced.
    pub fn flops_per_element(&self) -> u64 {
        self.insts
            .iter()
            .filter(|i| !matches!(i.op, Op::Const { .. }))
            .count() as u64
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, inst) in self.insts.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "${} = {}", self.inputs + i, inst.op.name())?;
            for a in &inst.args {
                write!(f, " ${a}")?;
            }
            match &inst.op {
                Op::Const { value, ty } => {
                    write!(f, " {} {}", crate::text::fmt_float(*value), ty.dtype)?
                }
                Op::Cast { to } => write!(f, " {to}")?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Program {
    type Err = ProgramError;

    /// Parses the text form; `inputs` is one more than the highest register below the first
    /// instruction's (`$2 = ..` first: two operands).
    fn from_str(s: &str) -> Result<Program, ProgramError> {
        let mut insts = Vec::new();
        let mut inputs = None;
        for (i, part) in s.split(';').enumerate() {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (dst, rest) = match words.as_slice() {
                [dst, "=", rest @ ..] if !rest.is_empty() => (*dst, rest),
                _ => return err(format!("instruction {} is not `$N = op ...`", i + 1)),
            };
            let n = reg(dst)?;
            let inputs = *inputs.get_or_insert(n as usize);
            if n as usize != inputs + i {
                return err(format!(
                    "instruction {} defines {dst}, expected ${}",
                    i + 1,
                    inputs + i
                ));
            }
            let (name, tail) = (rest[0], &rest[1..]);
            let nargs = tail.iter().take_while(|w| w.starts_with('$')).count();
            let args = tail[..nargs]
                .iter()
                .map(|w| reg(w))
                .collect::<Result<Vec<_>, _>>()?;
            let extra = &tail[nargs..];
            let dtype = |w: &str| -> Result<DType, ProgramError> {
                w.parse()
                    .map_err(|e: crate::UnknownDType| ProgramError(e.to_string()))
            };
            let op = match (name, extra) {
                ("const", [value, d]) => Op::Const {
                    value: value
                        .parse()
                        .map_err(|_| ProgramError(format!("{dst}: bad constant `{value}`")))?,
                    ty: TensorType::scalar(dtype(d)?),
                },
                ("cast", [d]) => Op::Cast { to: dtype(d)? },
                (_, []) => Op::from_parts(name, None, &Attrs::default(), &[])
                    .map_err(|e| ProgramError(format!("{dst}: {e}")))?,
                _ => return err(format!("{dst}: unexpected `{}`", extra.join(" "))),
            };
            if !is_scalar_op(&op) {
                return err(format!("{dst}: `{name}` is not an elementwise op"));
            }
            insts.push(Inst { op, args });
        }
        match inputs {
            Some(inputs) => Ok(Program { inputs, insts }),
            None => err("has no instruction"),
        }
    }
}

fn reg(w: &str) -> Result<Reg, ProgramError> {
    w.strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ProgramError(format!("`{w}` is not a register such as $3")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::BinaryOp;

    #[test]
    fn text_round_trips_and_types() {
        let text = "$2 = mul $0 $1; $3 = const 0.5 f32; $4 = add $2 $3; $5 = gt $4 $3; \
                    $6 = select $5 $4 $3; $7 = cast $6 bf16";
        let p: Program = text.parse().expect("parses");
        assert_eq!(p.inputs, 2);
        assert_eq!(p.to_string(), text);
        assert_eq!(p.insts[0].op, Op::Binary(BinaryOp::Mul));
        let d = p.dtypes(&[DType::F32, DType::F32]).expect("types");
        assert_eq!(d[5], DType::Bool);
        assert_eq!(p.result_dtype(&[DType::F32, DType::F32]), Ok(DType::BF16));
        assert_eq!(p.flops_per_element(), 5);
    }

    #[test]
    fn bad_programs_are_refused() {
        for (text, why) in [
            ("$2 = mul $0 $3", "not defined before"),
            ("$2 = matmul $0 $1", "not an elementwise op"),
            ("$2 = mul $0 $1; $4 = exp $2", "expected $3"),
            ("$2 = frob $0", "unknown op"),
            ("mul $0 $1", "is not `$N = op"),
            ("$2 = const x f32", "bad constant"),
        ] {
            let e = text
                .parse::<Program>()
                .and_then(|p| p.dtypes(&[DType::F32; 2]).map(|_| p))
                .expect_err(text);
            assert!(e.0.contains(why), "{text}: {e}");
        }
        let p: Program = "$2 = add $0 $1".parse().expect("parses");
        let e = p
            .dtypes(&[DType::F32, DType::I64])
            .expect_err("mixed dtypes");
        assert!(e.0.contains("$2"), "{e}");
        assert!(p.dtypes(&[DType::F32]).is_err(), "operand count");
    }
}
