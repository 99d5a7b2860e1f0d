//! Loop kernels: the kernel IR's general form, for the ops that are not one pass of
//! elementwise work (norms, softmax, RoPE, gathers and scatters, top-k, the MoE permutation,
//! attention, the cross-entropy).
//!
//! A loop kernel runs its body once per *item* (a row, a column, a token), `items` of them,
//! cut into tiles of `tile` items; a launch runs a range of tiles, so the runtime spreads the
//! ranges over its threads exactly as for the elementwise kernels, and the generated code
//! never calls back into it. The body is a small structured program over typed scalar
//! variables: assignments, counted loops, conditionals, and loads and stores at computed
//! element indices. Variable 0 is the item. Ops are the IR's own scalar ops (one op set for
//! the graph, the elementwise programs and the kernels), plus integer division and remainder
//! for index arithmetic.
//!
//! A load or store can be *checked*: its index is compared with the buffer's length, and an
//! index out of range stops the kernel with an error code instead of touching memory. Every
//! index computed from data (token ids, expert ids, offsets) is checked; indices computed
//! from the static shapes alone need no check. Each fused op is described once here, and both
//! backends lower from the description.

use crate::kernel::{Access, Buffer};
use mmc_ir::{BinaryOp, CmpOp, DType, UnaryOp};
use std::fmt;

/// A scalar variable of a loop kernel (`v0` is the item index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub u32);

/// A scalar expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Const(f64, DType),
    Var(Var),
    /// Element `index` (an i64 expression) of buffer `buffer`.
    Load {
        buffer: usize,
        index: Box<Expr>,
        checked: bool,
    },
    Unary(UnaryOp, Box<Expr>),
    /// `exp(x)` for a float `x` to within a few units in the last place, for the exponentials
    /// of a softmax, whose sum is what matters: f32 arithmetic (twice the vector width of the
    /// exact `exp`, which computes in f64 to round as libm does). f64 takes the exact `exp`.
    ExpApprox(Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    Cast(DType, Box<Expr>),
    /// Integer division, truncating (index arithmetic over non-negative values).
    IDiv(Box<Expr>, Box<Expr>),
    /// Integer remainder, with the dividend's sign.
    IRem(Box<Expr>, Box<Expr>),
}

/// A statement of a loop kernel's body.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Set(Var, Expr),
    /// `var = var + value` for a sum whose order does not matter to the op (a row's
    /// exponentials, a dot product): the backend may split it into partial sums in any order
    /// (vectorised), fixed for a kernel and target, so a run still repeats bit for bit.
    Accumulate(Var, Expr),
    /// `for var in start..end` (i64), in order.
    For {
        var: Var,
        start: Expr,
        end: Expr,
        body: Vec<Stmt>,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        otherwise: Vec<Stmt>,
    },
    Store {
        buffer: usize,
        index: Expr,
        value: Expr,
        checked: bool,
    },
}

/// A loop kernel (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct LoopKernel {
    /// A symbol name: letters, digits and `_`.
    pub name: String,
    pub buffers: Vec<Buffer>,
    /// The type of each variable; `vars[0]` is the item, i64.
    pub vars: Vec<DType>,
    pub items: usize,
    /// Items per tile.
    pub tile: usize,
    pub body: Vec<Stmt>,
}

/// A loop kernel that does not type-check (a bug in the op's description).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("loop kernel `{kernel}`: {message}")]
pub struct LoopError {
    pub kernel: String,
    pub message: String,
}

/// What a kernel's error code means: the code a kernel returns when a checked access of
/// buffer `b` is out of range is `b + 1`.
pub fn out_of_range_buffer(code: i64) -> Option<usize> {
    (code > 0).then(|| code as usize - 1)
}

impl LoopKernel {
    /// Tiles of the item space (the last one may be partial).
    pub fn tiles(&self) -> usize {
        self.items.div_ceil(self.tile.max(1))
    }

    /// The dtype of `e`, checking its operands.
    pub fn dtype(&self, e: &Expr) -> Result<DType, String> {
        use DType::*;
        Ok(match e {
            Expr::Const(_, d) => *d,
            Expr::Var(v) => *self
                .vars
                .get(v.0 as usize)
                .ok_or_else(|| format!("variable v{} is not declared", v.0))?,
            Expr::Load { buffer, index, .. } => {
                let b = self
                    .buffers
                    .get(*buffer)
                    .ok_or_else(|| format!("no buffer {buffer}"))?;
                self.index(index)?;
                b.dtype
            }
            Expr::ExpApprox(x) => {
                let d = self.dtype(x)?;
                if !d.is_float() {
                    return Err(format!("exp~ over {d}"));
                }
                d
            }
            Expr::Unary(u, x) => {
                let d = self.dtype(x)?;
                let ok = match u {
                    UnaryOp::Not => d == Bool,
                    UnaryOp::Neg | UnaryOp::Abs => d != Bool,
                    _ => d.is_float(),
                };
                if !ok {
                    return Err(format!("{u:?} over {d}"));
                }
                d
            }
            Expr::Binary(op, x, y) => {
                let (a, b) = (self.dtype(x)?, self.dtype(y)?);
                if a != b {
                    return Err(format!("{op:?} over {a} and {b}"));
                }
                let ok = match op {
                    BinaryOp::And | BinaryOp::Or => a == Bool,
                    BinaryOp::Div | BinaryOp::Pow => a.is_float(),
                    _ => a != Bool || matches!(op, BinaryOp::Max | BinaryOp::Min),
                };
                if !ok {
                    return Err(format!("{op:?} over {a}"));
                }
                a
            }
            Expr::Compare(c, x, y) => {
                let (a, b) = (self.dtype(x)?, self.dtype(y)?);
                if a != b {
                    return Err(format!("{c:?} over {a} and {b}"));
                }
                Bool
            }
            Expr::Select(c, x, y) => {
                let (c, a, b) = (self.dtype(c)?, self.dtype(x)?, self.dtype(y)?);
                if c != Bool || a != b {
                    return Err(format!("select over {c}, {a} and {b}"));
                }
                a
            }
            Expr::Cast(to, x) => {
                self.dtype(x)?;
                *to
            }
            Expr::IDiv(x, y) | Expr::IRem(x, y) => {
                // A static positive divisor: a zero one would be undefined behaviour.
                if !matches!(**y, Expr::Const(v, _) if v >= 1.0) {
                    return Err(format!("integer division by {y}, not a positive constant"));
                }
                let (a, b) = (self.dtype(x)?, self.dtype(y)?);
                if a != b || !matches!(a, I64 | I32) {
                    return Err(format!("integer division over {a} and {b}"));
                }
                a
            }
        })
    }

    fn index(&self, e: &Expr) -> Result<(), String> {
        match self.dtype(e)? {
            DType::I64 => Ok(()),
            d => Err(format!("an index of type {d} (indices are i64)")),
        }
    }

    /// Type-checks the kernel: every expression is well typed, indices are i64, assignments
    /// and stores match their target's dtype, and only written buffers are stored to.
    pub fn verify(&self) -> Result<(), LoopError> {
        let err = |message: String| LoopError {
            kernel: self.name.clone(),
            message,
        };
        if self.vars.first() != Some(&DType::I64) {
            return Err(err("variable 0 (the item) must be i64".into()));
        }
        if let Some(b) = self
            .buffers
            .iter()
            .find(|b| !crate::kernel::supported_dtype(b.dtype))
        {
            return Err(err(format!("a buffer of dtype {}", b.dtype)));
        }
        self.verify_block(&self.body).map_err(err)
    }

    fn verify_block(&self, body: &[Stmt]) -> Result<(), String> {
        for s in body {
            match s {
                Stmt::Set(v, e) | Stmt::Accumulate(v, e) => {
                    let want = self.dtype(&Expr::Var(*v))?;
                    let got = self.dtype(e)?;
                    if v.0 == 0 {
                        return Err("the item variable v0 is assigned".into());
                    }
                    if want != got {
                        return Err(format!("v{} of type {want} set to a {got}", v.0));
                    }
                    if matches!(s, Stmt::Accumulate(..)) && want == DType::Bool {
                        return Err(format!("a sum into bool v{}", v.0));
                    }
                }
                Stmt::For {
                    var,
                    start,
                    end,
                    body,
                } => {
                    self.index(&Expr::Var(*var))?;
                    self.index(start)?;
                    self.index(end)?;
                    self.verify_block(body)?;
                }
                Stmt::If {
                    cond,
                    then,
                    otherwise,
                } => {
                    if self.dtype(cond)? != DType::Bool {
                        return Err("a condition that is not bool".into());
                    }
                    self.verify_block(then)?;
                    self.verify_block(otherwise)?;
                }
                Stmt::Store {
                    buffer,
                    index,
                    value,
                    ..
                } => {
                    let b = self
                        .buffers
                        .get(*buffer)
                        .ok_or_else(|| format!("a store to missing buffer {buffer}"))?;
                    if b.access != Access::Write {
                        return Err(format!("a store to read-only buffer {buffer}"));
                    }
                    self.index(index)?;
                    let d = self.dtype(value)?;
                    if d != b.dtype {
                        return Err(format!("a {d} stored to buffer {buffer} of {}", b.dtype));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Builds a loop kernel's body with structured control flow: `for_` and `if_` take closures
/// that add the inner statements.
pub struct LoopBuilder {
    kernel: LoopKernel,
    blocks: Vec<Vec<Stmt>>,
}

impl LoopBuilder {
    /// A kernel named `name` over `items` items, `tile` per tile.
    pub fn new(name: impl Into<String>, items: usize, tile: usize) -> LoopBuilder {
        LoopBuilder {
            kernel: LoopKernel {
                name: name.into(),
                buffers: Vec::new(),
                vars: vec![DType::I64],
                items,
                tile: tile.max(1),
                body: Vec::new(),
            },
            blocks: vec![Vec::new()],
        }
    }

    /// Adds a buffer the kernel reads; returns its number.
    pub fn read(&mut self, dtype: DType, shape: &[usize]) -> usize {
        self.buffer(dtype, shape, Access::Read)
    }

    /// Adds a buffer the kernel writes (and may read back); returns its number.
    pub fn write(&mut self, dtype: DType, shape: &[usize]) -> usize {
        self.buffer(dtype, shape, Access::Write)
    }

    fn buffer(&mut self, dtype: DType, shape: &[usize], access: Access) -> usize {
        self.kernel.buffers.push(Buffer {
            dtype,
            shape: shape.to_vec(),
            access,
        });
        self.kernel.buffers.len() - 1
    }

    /// The item index (i64).
    pub fn item(&self) -> Expr {
        Expr::Var(Var(0))
    }

    /// A new variable of `dtype`, set to `init`.
    pub fn var(&mut self, dtype: DType, init: Expr) -> Var {
        self.kernel.vars.push(dtype);
        let v = Var(self.kernel.vars.len() as u32 - 1);
        self.set(v, init);
        v
    }

    pub fn set(&mut self, v: Var, e: Expr) {
        self.push(Stmt::Set(v, e));
    }

    /// `v += e`, in an order the backend may choose (see [`Stmt::Accumulate`]).
    pub fn accumulate(&mut self, v: Var, e: Expr) {
        self.push(Stmt::Accumulate(v, e));
    }

    /// `for j in start..end { body(j) }`.
    pub fn for_(&mut self, start: Expr, end: Expr, body: impl FnOnce(&mut Self, Expr)) {
        self.kernel.vars.push(DType::I64);
        let var = Var(self.kernel.vars.len() as u32 - 1);
        self.blocks.push(Vec::new());
        body(self, Expr::Var(var));
        let body = self.blocks.pop().expect("pushed above");
        self.push(Stmt::For {
            var,
            start,
            end,
            body,
        });
    }

    /// `if cond { then }`.
    pub fn if_(&mut self, cond: Expr, then: impl FnOnce(&mut Self)) {
        self.if_else(cond, then, |_| {});
    }

    /// `if cond { then } else { otherwise }`.
    pub fn if_else(
        &mut self,
        cond: Expr,
        then: impl FnOnce(&mut Self),
        otherwise: impl FnOnce(&mut Self),
    ) {
        self.blocks.push(Vec::new());
        then(self);
        let then = self.blocks.pop().expect("pushed above");
        self.blocks.push(Vec::new());
        otherwise(self);
        let otherwise = self.blocks.pop().expect("pushed above");
        self.push(Stmt::If {
            cond,
            then,
            otherwise,
        });
    }

    /// Stores `value` at element `index` of `buffer` (static index).
    pub fn store(&mut self, buffer: usize, index: Expr, value: Expr) {
        self.push(Stmt::Store {
            buffer,
            index,
            value,
            checked: false,
        });
    }

    /// Stores at an index computed from data: checked against the buffer's length.
    pub fn store_checked(&mut self, buffer: usize, index: Expr, value: Expr) {
        self.push(Stmt::Store {
            buffer,
            index,
            value,
            checked: true,
        });
    }

    fn push(&mut self, s: Stmt) {
        self.blocks.last_mut().expect("a block is open").push(s);
    }

    /// The finished kernel, type-checked.
    pub fn finish(mut self) -> Result<LoopKernel, LoopError> {
        assert_eq!(self.blocks.len(), 1, "every block is closed by its closure");
        self.kernel.body = self.blocks.pop().expect("the top block");
        self.kernel.verify()?;
        Ok(self.kernel)
    }
}

/// An i64 constant.
pub fn idx(v: usize) -> Expr {
    Expr::Const(v as f64, DType::I64)
}

/// A constant of `dtype`.
pub fn cst(v: f64, dtype: DType) -> Expr {
    Expr::Const(v, dtype)
}

/// Element `index` of `buffer` (static index).
pub fn load(buffer: usize, index: Expr) -> Expr {
    Expr::Load {
        buffer,
        index: Box::new(index),
        checked: false,
    }
}

/// Element `index` of `buffer`, the index computed from data: checked.
pub fn load_checked(buffer: usize, index: Expr) -> Expr {
    Expr::Load {
        buffer,
        index: Box::new(index),
        checked: true,
    }
}

/// `if c { a } else { b }`.
pub fn select(c: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(b))
}

impl Var {
    /// The variable's value, as an expression.
    pub fn val(self) -> Expr {
        Expr::Var(self)
    }
}

impl From<Var> for Expr {
    fn from(v: Var) -> Expr {
        Expr::Var(v)
    }
}

impl Expr {
    pub fn unary(self, u: UnaryOp) -> Expr {
        Expr::Unary(u, Box::new(self))
    }
    pub fn binary(self, op: BinaryOp, y: Expr) -> Expr {
        Expr::Binary(op, Box::new(self), Box::new(y))
    }
    pub fn cmp(self, c: CmpOp, y: Expr) -> Expr {
        Expr::Compare(c, Box::new(self), Box::new(y))
    }
    pub fn cast(self, to: DType) -> Expr {
        Expr::Cast(to, Box::new(self))
    }
    pub fn max(self, y: Expr) -> Expr {
        self.binary(BinaryOp::Max, y)
    }
    pub fn min(self, y: Expr) -> Expr {
        self.binary(BinaryOp::Min, y)
    }
    pub fn exp(self) -> Expr {
        self.unary(UnaryOp::Exp)
    }
    /// See [`Expr::ExpApprox`].
    pub fn exp_approx(self) -> Expr {
        Expr::ExpApprox(Box::new(self))
    }
    pub fn log(self) -> Expr {
        self.unary(UnaryOp::Log)
    }
    pub fn sqrt(self) -> Expr {
        self.unary(UnaryOp::Sqrt)
    }
    pub fn rsqrt(self) -> Expr {
        self.unary(UnaryOp::Rsqrt)
    }
    pub fn lt(self, y: Expr) -> Expr {
        self.cmp(CmpOp::Lt, y)
    }
    pub fn ge(self, y: Expr) -> Expr {
        self.cmp(CmpOp::Ge, y)
    }
    pub fn eq(self, y: Expr) -> Expr {
        self.cmp(CmpOp::Eq, y)
    }
    /// Integer division (index arithmetic).
    pub fn idiv(self, y: Expr) -> Expr {
        Expr::IDiv(Box::new(self), Box::new(y))
    }
    /// Integer remainder (index arithmetic).
    pub fn irem(self, y: Expr) -> Expr {
        Expr::IRem(Box::new(self), Box::new(y))
    }
}

macro_rules! expr_op {
    ($tr:ident, $f:ident, $op:expr) => {
        impl std::ops::$tr for Expr {
            type Output = Expr;
            fn $f(self, y: Expr) -> Expr {
                self.binary($op, y)
            }
        }
    };
}
expr_op!(Add, add, BinaryOp::Add);
expr_op!(Sub, sub, BinaryOp::Sub);
expr_op!(Mul, mul, BinaryOp::Mul);
expr_op!(Div, div, BinaryOp::Div);

impl std::ops::Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        self.unary(UnaryOp::Neg)
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Const(v, d) => write!(f, "{v}:{d}"),
            Expr::Var(v) => write!(f, "v{}", v.0),
            Expr::Load {
                buffer,
                index,
                checked,
            } => write!(f, "buf{buffer}[{index}]{}", if *checked { "?" } else { "" }),
            Expr::Unary(u, x) => write!(f, "{}({x})", format!("{u:?}").to_lowercase()),
            Expr::ExpApprox(x) => write!(f, "exp~({x})"),
            Expr::Binary(op, x, y) => {
                let sym = match op {
                    BinaryOp::Add => "+",
                    BinaryOp::Sub => "-",
                    BinaryOp::Mul => "*",
                    BinaryOp::Div => "/",
                    _ => return write!(f, "{}({x}, {y})", format!("{op:?}").to_lowercase()),
                };
                write!(f, "({x} {sym} {y})")
            }
            Expr::Compare(c, x, y) => {
                write!(f, "{}({x}, {y})", format!("{c:?}").to_lowercase())
            }
            Expr::Select(c, x, y) => write!(f, "select({c}, {x}, {y})"),
            Expr::Cast(d, x) => write!(f, "{d}({x})"),
            Expr::IDiv(x, y) => write!(f, "({x} div {y})"),
            Expr::IRem(x, y) => write!(f, "({x} rem {y})"),
        }
    }
}

fn write_block(f: &mut fmt::Formatter<'_>, body: &[Stmt], depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth);
    for s in body {
        match s {
            Stmt::Set(v, e) => writeln!(f, "{pad}v{} = {e}", v.0)?,
            Stmt::Accumulate(v, e) => writeln!(f, "{pad}v{} += {e}", v.0)?,
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                writeln!(f, "{pad}for v{} in {start}..{end} {{", var.0)?;
                write_block(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")?;
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                writeln!(f, "{pad}if {cond} {{")?;
                write_block(f, then, depth + 1)?;
                if !otherwise.is_empty() {
                    writeln!(f, "{pad}}} else {{")?;
                    write_block(f, otherwise, depth + 1)?;
                }
                writeln!(f, "{pad}}}")?;
            }
            Stmt::Store {
                buffer,
                index,
                value,
                checked,
            } => writeln!(
                f,
                "{pad}buf{buffer}[{index}]{} = {value}",
                if *checked { "?" } else { "" }
            )?,
        }
    }
    Ok(())
}

impl fmt::Display for LoopKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "loop kernel {} over v0 in 0..{} tiles={} x {} {{",
            self.name,
            self.items,
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
        write_block(f, &self.body, 1)?;
        f.write_str("}")
    }
}
