//! The op set of the IR.
//!
//! The set is small (in the spirit of tinygrad and luminal): everything a model needs is built
//! from these primitives, and every later stage (autodiff, kernels, the Ascend backend) only has
//! to understand them. Fused ops are a separate, explicitly marked family that only the fusion
//! pass creates; collectives join as their own family with the parallelize pass.

pub use crate::fused::FusedOp;
use crate::{DType, Shape, TensorType};

/// Elementwise ops of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Tanh,
    Erf,
    Sin,
    Cos,
    /// Logical not; bool only.
    Not,
}

/// Elementwise ops of two operands of the same type and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    /// Float division.
    Div,
    Max,
    Min,
    /// `x ^ y`, float only (RoPE frequencies are `theta ^ (2i / d)`).
    Pow,
    /// Logical and; bool only.
    And,
    /// Logical or; bool only.
    Or,
}

/// Elementwise comparisons; the result is bool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Reductions over a set of axes; reduced axes are kept with size 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    Sum,
    Max,
}

/// Which family an op belongs to; the verifier uses it to enforce what each stage may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// Parameters, per-step inputs and constants: the leaves of the graph.
    Source,
    /// The primitive op set; every stage may contain these.
    Primitive,
    /// Ops that only the fusion pass creates.
    Fused,
}

/// One operation of the graph. Attributes that fix the result type of an op with no
/// type-carrying operand (sources, casts, reshapes) are stored in the op itself.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A model weight, bound by name from a checkpoint. Its name is the checkpoint name.
    Param {
        name: String,
        ty: TensorType,
    },
    /// Per-step data (token ids, labels, pixels), bound by name by the data pipeline.
    Input {
        name: String,
        ty: TensorType,
    },
    /// A tensor filled with one value.
    Const {
        value: f64,
        ty: TensorType,
    },
    /// A tensor whose elements are their coordinate along `axis`.
    Iota {
        axis: usize,
        ty: TensorType,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CmpOp),
    /// `select(cond, a, b)`: `a` where `cond` is true, else `b`.
    Select,
    Cast {
        to: DType,
    },
    Reduce {
        kind: ReduceKind,
        axes: Vec<usize>,
    },
    /// Expands size-1 dimensions to `shape` (same rank).
    Broadcast {
        shape: Shape,
    },
    Reshape {
        shape: Shape,
    },
    /// Result dimension `i` is operand dimension `perm[i]`.
    Permute {
        perm: Vec<usize>,
    },
    /// The box `start..end` on every axis.
    Slice {
        start: Vec<usize>,
        end: Vec<usize>,
    },
    /// Zero padding: `low[i]` elements before and `high[i]` after on axis `i`.
    Pad {
        low: Vec<usize>,
        high: Vec<usize>,
    },
    Concat {
        axis: usize,
    },
    /// `[.., m, k] x [.., k, n] -> [.., m, n]`; batch dimensions must be equal.
    MatMul,
    /// `out[c] = x[c with c[axis] = idx[c]]` (torch.gather); idx has x's rank and x's size on
    /// every other axis.
    Gather {
        axis: usize,
    },
    /// `out = x; out[c with c[axis] = idx[c]] += src[c]` (torch.scatter_add), the transpose of
    /// gather.
    ScatterAdd {
        axis: usize,
    },
    /// Indices (i64) of the `k` largest elements along the last axis, largest first; ties go to
    /// the lower index.
    TopK {
        k: usize,
    },
    /// Indices (i64) that sort the last axis; stable.
    ArgSort {
        descending: bool,
    },
    /// Inclusive prefix sum along `axis`.
    CumSum {
        axis: usize,
    },
    Fused(FusedOp),
}

impl Op {
    /// The family of this op.
    pub fn class(&self) -> OpClass {
        match self {
            Op::Param { .. } | Op::Input { .. } | Op::Const { .. } | Op::Iota { .. } => {
                OpClass::Source
            }
            Op::Fused(_) => OpClass::Fused,
            _ => OpClass::Primitive,
        }
    }

    /// The mnemonic used by the text format.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Param { .. } => "param",
            Op::Input { .. } => "input",
            Op::Const { .. } => "const",
            Op::Iota { .. } => "iota",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "neg",
                UnaryOp::Abs => "abs",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Recip => "recip",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Erf => "erf",
                UnaryOp::Sin => "sin",
                UnaryOp::Cos => "cos",
                UnaryOp::Not => "not",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Max => "max",
                BinaryOp::Min => "min",
                BinaryOp::Pow => "pow",
                BinaryOp::And => "and",
                BinaryOp::Or => "or",
            },
            Op::Compare(c) => match c {
                CmpOp::Eq => "eq",
                CmpOp::Ne => "ne",
                CmpOp::Lt => "lt",
                CmpOp::Le => "le",
                CmpOp::Gt => "gt",
                CmpOp::Ge => "ge",
            },
            Op::Select => "select",
            Op::Cast { .. } => "cast",
            Op::Reduce { kind, .. } => match kind {
                ReduceKind::Sum => "reduce_sum",
                ReduceKind::Max => "reduce_max",
            },
            Op::Broadcast { .. } => "broadcast",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Slice { .. } => "slice",
            Op::Pad { .. } => "pad",
            Op::Concat { .. } => "concat",
            Op::MatMul => "matmul",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::TopK { .. } => "topk",
            Op::ArgSort { .. } => "argsort",
            Op::CumSum { .. } => "cumsum",
            Op::Fused(f) => f.name(),
        }
    }

    /// The attributes the text format prints after the operands. Attributes that the result
    /// type already states (a cast's dtype, a reshape's shape, a source's type) are left out.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        let ints = |v: &[usize]| Attr::Ints(v.iter().map(|&x| x as i64).collect());
        match self {
            Op::Const { value, .. } => vec![("value", Attr::Float(*value))],
            Op::Iota { axis, .. } | Op::Concat { axis } | Op::CumSum { axis } => {
                vec![("axis", Attr::Int(*axis as i64))]
            }
            Op::Gather { axis } | Op::ScatterAdd { axis } => {
                vec![("axis", Attr::Int(*axis as i64))]
            }
            Op::Reduce { axes, .. } => vec![("axes", ints(axes))],
            Op::Permute { perm } => vec![("perm", ints(perm))],
            Op::Slice { start, end } => vec![("start", ints(start)), ("end", ints(end))],
            Op::Pad { low, high } => vec![("low", ints(low)), ("high", ints(high))],
            Op::TopK { k } => vec![("k", Attr::Int(*k as i64))],
            Op::ArgSort { descending } => vec![("descending", Attr::Bool(*descending))],
            Op::Fused(f) => f.attrs(),
            Op::Param { .. }
            | Op::Input { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Select
            | Op::Cast { .. }
            | Op::Broadcast { .. }
            | Op::Reshape { .. }
            | Op::MatMul => vec![],
        }
    }

    /// Rebuilds an op from its mnemonic, its attributes, an optional leading name (params and
    /// inputs) and its result types: the inverse of [`Op::name`] + [`Op::attrs`].
    pub fn from_parts(
        name: &str,
        label: Option<String>,
        attrs: &Attrs,
        results: &[TensorType],
    ) -> Result<Op, String> {
        let result = || -> Result<TensorType, String> {
            match results {
                [t] => Ok(t.clone()),
                _ => Err(format!("`{name}` has exactly one result type")),
            }
        };
        let label = || {
            label
                .clone()
                .ok_or_else(|| format!("`{name}` needs a quoted name"))
        };
        let op = match name {
            "param" => Op::Param {
                name: label()?,
                ty: result()?,
            },
            "input" => Op::Input {
                name: label()?,
                ty: result()?,
            },
            "const" => Op::Const {
                value: attrs.float("value")?,
                ty: result()?,
            },
            "iota" => Op::Iota {
                axis: attrs.usize("axis")?,
                ty: result()?,
            },
            "select" => Op::Select,
            "cast" => Op::Cast {
                to: result()?.dtype,
            },
            "reduce_sum" => Op::Reduce {
                kind: ReduceKind::Sum,
                axes: attrs.usizes("axes")?,
            },
            "reduce_max" => Op::Reduce {
                kind: ReduceKind::Max,
                axes: attrs.usizes("axes")?,
            },
            "broadcast" => Op::Broadcast {
                shape: result()?.shape,
            },
            "reshape" => Op::Reshape {
                shape: result()?.shape,
            },
            "permute" => Op::Permute {
                perm: attrs.usizes("perm")?,
            },
            "slice" => Op::Slice {
                start: attrs.usizes("start")?,
                end: attrs.usizes("end")?,
            },
            "pad" => Op::Pad {
                low: attrs.usizes("low")?,
                high: attrs.usizes("high")?,
            },
            "concat" => Op::Concat {
                axis: attrs.usize("axis")?,
            },
            "matmul" => Op::MatMul,
            "gather" => Op::Gather {
                axis: attrs.usize("axis")?,
            },
            "scatter_add" => Op::ScatterAdd {
                axis: attrs.usize("axis")?,
            },
            "topk" => Op::TopK {
                k: attrs.usize("k")?,
            },
            "argsort" => Op::ArgSort {
                descending: attrs.bool("descending")?,
            },
            "cumsum" => Op::CumSum {
                axis: attrs.usize("axis")?,
            },
            other => {
                if let Some(f) = FusedOp::from_parts(other, attrs) {
                    Op::Fused(f?)
                } else if let Some(u) = UNARY.iter().find(|u| Op::Unary(**u).name() == other) {
                    Op::Unary(*u)
                } else if let Some(b) = BINARY.iter().find(|b| Op::Binary(**b).name() == other) {
                    Op::Binary(*b)
                } else if let Some(c) = COMPARE.iter().find(|c| Op::Compare(**c).name() == other) {
                    Op::Compare(*c)
                } else {
                    return Err(format!("unknown op `{other}`"));
                }
            }
        };
        let expected: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
        if let Some(extra) = attrs
            .0
            .iter()
            .find(|(k, _)| !expected.contains(&k.as_str()))
        {
            return Err(format!("`{name}` has no attribute `{}`", extra.0));
        }
        Ok(op)
    }
}

/// Every unary op, for parsers and exhaustive tests.
pub const UNARY: [UnaryOp; 12] = [
    UnaryOp::Neg,
    UnaryOp::Abs,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Recip,
    UnaryOp::Tanh,
    UnaryOp::Erf,
    UnaryOp::Sin,
    UnaryOp::Cos,
    UnaryOp::Not,
];

/// Every binary op.
pub const BINARY: [BinaryOp; 9] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Max,
    BinaryOp::Min,
    BinaryOp::Pow,
    BinaryOp::And,
    BinaryOp::Or,
];

/// Every comparison.
pub const COMPARE: [CmpOp; 6] = [
    CmpOp::Eq,
    CmpOp::Ne,
    CmpOp::Lt,
    CmpOp::Le,
    CmpOp::Gt,
    CmpOp::Ge,
];

/// An attribute value in the text format.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f64),
    Bool(bool),
    Ints(Vec<i64>),
    /// A quoted string (an elementwise program's body).
    Str(String),
}

/// The attributes of one op as parsed from text, in source order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attrs(pub Vec<(String, Attr)>);

impl Attrs {
    pub(crate) fn get(&self, key: &str) -> Result<&Attr, String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("missing attribute `{key}`"))
    }

    pub(crate) fn float(&self, key: &str) -> Result<f64, String> {
        match self.get(key)? {
            Attr::Float(f) => Ok(*f),
            Attr::Int(i) => Ok(*i as f64),
            _ => Err(format!("attribute `{key}` must be a number")),
        }
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize, String> {
        match self.get(key)? {
            Attr::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => Err(format!("attribute `{key}` must be a non-negative integer")),
        }
    }

    pub(crate) fn usizes(&self, key: &str) -> Result<Vec<usize>, String> {
        match self.get(key)? {
            Attr::Ints(v) if v.iter().all(|&i| i >= 0) => {
                Ok(v.iter().map(|&i| i as usize).collect())
            }
            _ => Err(format!(
                "attribute `{key}` must be a list of non-negative integers"
            )),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&str, String> {
        match self.get(key)? {
            Attr::Str(s) => Ok(s),
            _ => Err(format!("attribute `{key}` must be a quoted string")),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> Result<bool, String> {
        match self.get(key)? {
            Attr::Bool(b) => Ok(*b),
            _ => Err(format!("attribute `{key}` must be true or false")),
        }
    }
}
