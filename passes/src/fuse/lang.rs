//! The e-graph language of the fusion pass: one e-node per IR op, attributes as leaf children.
//!
//! As in TENSAT (`uwplse/tensat`, `src/model.rs`), attributes (axes, shapes, dtypes, constant
//! values, eps, ...) are leaf e-nodes of their own, so a pattern binds them as `?axes` or
//! `?eps` and a condition inspects them; a rewrite can move one from the left side to the right
//! side (`(const ?eps ?t)` on the left, `(fused.rms_norm ?x ?w ?eps)` on the right). Tensor
//! operands come first, attributes after them, in the order the IR text prints them.
//!
//! Sources are leaves too: `(arg i ty)` is the i-th value a region reads from outside (a
//! parameter, a per-step input, or a value another region computes); the region keeps the
//! table from argument numbers to names and values, so identical layers give identical
//! e-graphs. Constants and iotas stay in the e-graph (`(const 0.03125 f32[2,1])`), since rules
//! must see them.
//!
//! The analysis gives every tensor e-class its [`TensorType`], computed by
//! [`mmc_ir::infer::infer`], the verifier's own typing rule, and every attribute e-class its
//! value. All ops of the language have one result: the primitive ops and the forward fused ops
//! do. Several-result ops (the fused backward ops) would enter as TENSAT does it, a tuple
//! e-node plus `(get ?t i)` projections whose analysis picks the i-th type.

use egg::{define_language, Analysis, DidMerge, Id, Language};
use mmc_ir::infer::infer;
use mmc_ir::{BinaryOp, CmpOp, DType, FusedOp, Op, ReduceKind, TensorType, UnaryOp};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A list of non-negative integers (axes, shapes, permutations, slice bounds), printed
/// without spaces as `[0,2]` so that it is one s-expression atom.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ints(pub Vec<usize>);

impl fmt::Display for Ints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(|i| i.to_string()).collect();
        write!(f, "[{}]", items.join(","))
    }
}

impl FromStr for Ints {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let inner = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .ok_or_else(|| format!("`{s}` is not an integer list such as [0,2]"))?;
        if inner.is_empty() {
            return Ok(Ints(Vec::new()));
        }
        inner
            .split(',')
            .map(|i| i.parse::<usize>().map_err(|e| format!("`{s}`: {e}")))
            .collect::<Result<_, _>>()
            .map(Ints)
    }
}

/// An f64 attribute compared by its bits, so that NaN, -0.0 and infinities are ordinary
/// values (an e-graph needs `Eq` and `Hash`; the attention mask is built from a `-inf`
/// constant). Printed as Rust's `{:?}` does, which always shows a `.`, an exponent, `inf` or
/// `NaN`, so a float atom never reads as a [`Fuse::Num`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Float(u64);

impl Float {
    /// The attribute holding `x`, bit for bit.
    pub fn new(x: f64) -> Self {
        Float(x.to_bits())
    }

    /// The value.
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl fmt::Debug for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

impl fmt::Display for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

impl FromStr for Float {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<f64>()
            .map(Float::new)
            .map_err(|e| format!("`{s}`: {e}"))
    }
}

/// A tensor type as an attribute, printed without spaces (`f32[2,4]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ty(pub TensorType);

impl Ord for Ty {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.0.dtype, &self.0.shape).cmp(&(other.0.dtype, &other.0.shape))
    }
}

impl PartialOrd for Ty {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0.dtype, Ints(self.0.shape.clone()))
    }
}

impl FromStr for Ty {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The dtype name must come first, so that `[2]` stays an `Ints`.
        if !s.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(format!("`{s}` is not a tensor type such as f32[2,4]"));
        }
        s.parse::<TensorType>().map(Ty)
    }
}

define_language! {
    /// The ops of the IR as e-nodes: tensor operands first, then attribute leaves.
    pub enum Fuse {
        // ---- sources: (arg index type), (const value type), (iota axis type) ----
        "arg" = Arg([Id; 2]),
        "const" = Const([Id; 2]),
        "iota" = Iota([Id; 2]),
        // ---- elementwise ----
        "neg" = Neg(Id),
        "abs" = Abs(Id),
        "exp" = Exp(Id),
        "log" = Log(Id),
        "sqrt" = Sqrt(Id),
        "rsqrt" = Rsqrt(Id),
        "recip" = Recip(Id),
        "tanh" = Tanh(Id),
        "erf" = Erf(Id),
        "sin" = Sin(Id),
        "cos" = Cos(Id),
        "not" = Not(Id),
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "max" = Max([Id; 2]),
        "min" = Min([Id; 2]),
        "pow" = Pow([Id; 2]),
        "and" = And([Id; 2]),
        "or" = Or([Id; 2]),
        "eq" = Eq([Id; 2]),
        "ne" = Ne([Id; 2]),
        "lt" = Lt([Id; 2]),
        "le" = Le([Id; 2]),
        "gt" = Gt([Id; 2]),
        "ge" = Ge([Id; 2]),
        "select" = Select([Id; 3]),
        // ---- (cast x dtype), (reduce_* x axes), layout ops with their shape attributes ----
        "cast" = Cast([Id; 2]),
        "reduce_sum" = ReduceSum([Id; 2]),
        "reduce_max" = ReduceMax([Id; 2]),
        "broadcast" = Broadcast([Id; 2]),
        "reshape" = Reshape([Id; 2]),
        "permute" = Permute([Id; 2]),
        "slice" = Slice([Id; 3]),
        "pad" = Pad([Id; 3]),
        // (concat axis x0 x1 ..): the attribute first, as the operand count varies.
        "concat" = Concat(Box<[Id]>),
        "matmul" = MatMul([Id; 2]),
        "gather" = Gather([Id; 3]),
        "scatter_add" = ScatterAdd([Id; 4]),
        "topk" = TopK([Id; 2]),
        "argsort" = ArgSort([Id; 2]),
        "cumsum" = CumSum([Id; 2]),
        // ---- forward fused ops (ir/src/fused.rs) ----
        "fused.rms_norm" = RmsNorm([Id; 3]),
        "fused.layer_norm" = LayerNorm([Id; 4]),
        "fused.softmax" = Softmax(Id),
        "fused.log_softmax" = LogSoftmax(Id),
        "fused.swiglu" = SwiGlu([Id; 2]),
        "fused.gelu" = Gelu(Id),
        "fused.rope" = Rope([Id; 3]),
        // (fused.attention q k v [segment_ids] scale causal)
        "fused.attention" = Attention(Box<[Id]>),
        "fused.linear_cross_entropy" = LinearCrossEntropy([Id; 5]),
        "fused.moe_permute" = MoePermute([Id; 3]),
        "fused.expert_offsets" = ExpertOffsets([Id; 2]),
        "fused.grouped_matmul" = GroupedMatMul([Id; 3]),
        "fused.moe_unpermute" = MoeUnpermute([Id; 3]),
        // ---- attribute leaves; parsed in this order, so `3` is a Num and `3.0` a Float ----
        Num(usize),
        Float(Float),
        Bool(bool),
        DType(DType),
        Ty(Ty),
        Ints(Ints),
    }
}

/// The value of an attribute e-class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    Num(usize),
    Float(Float),
    Bool(bool),
    DType(DType),
    Ty(TensorType),
    Ints(Vec<usize>),
}

/// What the analysis knows about an e-class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// A tensor of this type.
    Tensor(TensorType),
    /// An attribute leaf.
    Attr(AttrValue),
    /// A tensor e-node whose operands do not type, with the reason. Only hand-built e-graphs
    /// hold these: the pass adds well-typed graphs, and the engine's type guard keeps any rule
    /// from adding an e-node whose type differs from the e-class it would join.
    Ill(String),
}

impl Data {
    /// The tensor type, if this is a well-typed tensor class.
    pub fn tensor(&self) -> Option<&TensorType> {
        match self {
            Data::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The attribute value, if this is an attribute class.
    pub fn attr(&self) -> Option<&AttrValue> {
        match self {
            Data::Attr(a) => Some(a),
            _ => None,
        }
    }
}

/// The e-graph analysis: tensor types from the IR's typing rules, attribute values.
#[derive(Clone, Copy, Debug, Default)]
pub struct TensorAnalysis;

/// The e-graph type of the fusion pass.
pub type FuseGraph = egg::EGraph<Fuse, TensorAnalysis>;

/// Why an e-node cannot become an IR op.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LangError {
    #[error("`{op}`: attribute operand {index} is not {expected}")]
    BadAttr {
        op: String,
        index: usize,
        expected: &'static str,
    },
    #[error("`{0}` is an attribute or an argument, not an op")]
    NotAnOp(String),
    #[error("`{0}` has no e-node form (several results, a backward op or an elementwise program)")]
    Unsupported(&'static str),
    #[error("`{op}` takes {want} operand(s), got {got}")]
    Arity {
        op: &'static str,
        want: String,
        got: usize,
    },
}

/// Whether `op` takes `n` tensor operands (the typing rules check the rest).
fn arity_ok(op: &Op, n: usize) -> Result<(), LangError> {
    let (lo, hi) = match op {
        Op::Param { .. } | Op::Input { .. } | Op::Const { .. } | Op::Iota { .. } => (0, 0),
        Op::Binary(_) | Op::Compare(_) | Op::MatMul | Op::Gather { .. } => (2, 2),
        Op::Select | Op::ScatterAdd { .. } => (3, 3),
        Op::Concat { .. } => (1, usize::MAX),
        Op::Fused(f) => match f {
            FusedOp::Softmax
            | FusedOp::LogSoftmax
            | FusedOp::Gelu
            | FusedOp::ExpertOffsets { .. } => (1, 1),
            FusedOp::RmsNorm { .. } | FusedOp::SwiGlu | FusedOp::MoePermute { .. } => (2, 2),
            FusedOp::LayerNorm { .. }
            | FusedOp::Rope
            | FusedOp::GroupedMatMul
            | FusedOp::MoeUnpermute => (3, 3),
            FusedOp::Attention { .. } => (3, 4),
            FusedOp::LinearCrossEntropy { .. } => (4, 4),
            other => return Err(LangError::Unsupported(other.name())),
        },
        _ => (1, 1),
    };
    if (lo..=hi).contains(&n) {
        return Ok(());
    }
    let want = match (lo, hi) {
        (lo, usize::MAX) => format!("at least {lo}"),
        (lo, hi) if lo == hi => lo.to_string(),
        (lo, hi) => format!("{lo} to {hi}"),
    };
    Err(LangError::Arity {
        op: op.name(),
        want,
        got: n,
    })
}

impl Fuse {
    /// The leaf e-node of an attribute value.
    pub fn leaf(a: &AttrValue) -> Fuse {
        match a {
            AttrValue::Num(n) => Fuse::Num(*n),
            AttrValue::Float(x) => Fuse::Float(*x),
            AttrValue::Bool(b) => Fuse::Bool(*b),
            AttrValue::DType(d) => Fuse::DType(*d),
            AttrValue::Ty(t) => Fuse::Ty(Ty(t.clone())),
            AttrValue::Ints(v) => Fuse::Ints(Ints(v.clone())),
        }
    }

    /// The value of a leaf e-node; `None` for ops.
    pub fn leaf_value(&self) -> Option<AttrValue> {
        Some(match self {
            Fuse::Num(n) => AttrValue::Num(*n),
            Fuse::Float(x) => AttrValue::Float(*x),
            Fuse::Bool(b) => AttrValue::Bool(*b),
            Fuse::DType(d) => AttrValue::DType(*d),
            Fuse::Ty(t) => AttrValue::Ty(t.0.clone()),
            Fuse::Ints(v) => AttrValue::Ints(v.0.clone()),
            _ => return None,
        })
    }

    /// Builds the e-node of `op` over the e-classes `inputs`, creating attribute leaves with
    /// `leaf` (which adds them to an e-graph or a node list and returns their id). Params and
    /// inputs have no e-node of their own: the caller turns them into numbered arguments.
    pub fn from_op(
        op: &Op,
        inputs: &[Id],
        mut leaf: impl FnMut(AttrValue) -> Id,
    ) -> Result<Fuse, LangError> {
        use AttrValue as A;
        if let Op::Param { .. } | Op::Input { .. } = op {
            return Err(LangError::NotAnOp(op.name().to_string()));
        }
        arity_ok(op, inputs.len())?;
        let ins = |n: usize| -> Id { inputs[n] };
        let ints = |v: &[usize]| A::Ints(v.to_vec());
        let one = |f: fn(Id) -> Fuse| f(ins(0));
        let two = |f: fn([Id; 2]) -> Fuse| f([ins(0), ins(1)]);
        Ok(match op {
            Op::Param { .. } | Op::Input { .. } => {
                return Err(LangError::NotAnOp(op.name().to_string()))
            }
            Op::Const { value, ty } => {
                Fuse::Const([leaf(A::Float(Float::new(*value))), leaf(A::Ty(ty.clone()))])
            }
            Op::Iota { axis, ty } => Fuse::Iota([leaf(A::Num(*axis)), leaf(A::Ty(ty.clone()))]),
            Op::Unary(u) => one(match u {
                UnaryOp::Neg => Fuse::Neg,
                UnaryOp::Abs => Fuse::Abs,
                UnaryOp::Exp => Fuse::Exp,
                UnaryOp::Log => Fuse::Log,
                UnaryOp::Sqrt => Fuse::Sqrt,
                UnaryOp::Rsqrt => Fuse::Rsqrt,
                UnaryOp::Recip => Fuse::Recip,
                UnaryOp::Tanh => Fuse::Tanh,
                UnaryOp::Erf => Fuse::Erf,
                UnaryOp::Sin => Fuse::Sin,
                UnaryOp::Cos => Fuse::Cos,
                UnaryOp::Not => Fuse::Not,
            }),
            Op::Binary(b) => two(match b {
                BinaryOp::Add => Fuse::Add,
                BinaryOp::Sub => Fuse::Sub,
                BinaryOp::Mul => Fuse::Mul,
                BinaryOp::Div => Fuse::Div,
                BinaryOp::Max => Fuse::Max,
                BinaryOp::Min => Fuse::Min,
                BinaryOp::Pow => Fuse::Pow,
                BinaryOp::And => Fuse::And,
                BinaryOp::Or => Fuse::Or,
            }),
            Op::Compare(c) => two(match c {
                CmpOp::Eq => Fuse::Eq,
                CmpOp::Ne => Fuse::Ne,
                CmpOp::Lt => Fuse::Lt,
                CmpOp::Le => Fuse::Le,
                CmpOp::Gt => Fuse::Gt,
                CmpOp::Ge => Fuse::Ge,
            }),
            Op::Select => Fuse::Select([ins(0), ins(1), ins(2)]),
            Op::Cast { to } => Fuse::Cast([ins(0), leaf(A::DType(*to))]),
            Op::Reduce { kind, axes } => {
                let a = leaf(ints(axes));
                match kind {
                    ReduceKind::Sum => Fuse::ReduceSum([ins(0), a]),
                    ReduceKind::Max => Fuse::ReduceMax([ins(0), a]),
                }
            }
            Op::Broadcast { shape } => Fuse::Broadcast([ins(0), leaf(ints(shape))]),
            Op::Reshape { shape } => Fuse::Reshape([ins(0), leaf(ints(shape))]),
            Op::Permute { perm } => Fuse::Permute([ins(0), leaf(ints(perm))]),
            Op::Slice { start, end } => Fuse::Slice([ins(0), leaf(ints(start)), leaf(ints(end))]),
            Op::Pad { low, high } => Fuse::Pad([ins(0), leaf(ints(low)), leaf(ints(high))]),
            Op::Concat { axis } => {
                let mut ch = vec![leaf(A::Num(*axis))];
                ch.extend_from_slice(inputs);
                Fuse::Concat(ch.into_boxed_slice())
            }
            Op::MatMul => Fuse::MatMul([ins(0), ins(1)]),
            Op::Gather { axis } => Fuse::Gather([ins(0), ins(1), leaf(A::Num(*axis))]),
            Op::ScatterAdd { axis } => {
                Fuse::ScatterAdd([ins(0), ins(1), ins(2), leaf(A::Num(*axis))])
            }
            Op::TopK { k } => Fuse::TopK([ins(0), leaf(A::Num(*k))]),
            Op::ArgSort { descending } => Fuse::ArgSort([ins(0), leaf(A::Bool(*descending))]),
            Op::CumSum { axis } => Fuse::CumSum([ins(0), leaf(A::Num(*axis))]),
            Op::Fused(f) => fused_node(f, inputs, leaf)?,
        })
    }

    /// The IR op of a tensor e-node and its tensor operands, reading attribute values with
    /// `attr`. Arguments and attribute leaves are not ops.
    pub fn to_op<'a>(
        &self,
        attr: impl Fn(Id) -> Option<&'a AttrValue>,
    ) -> Result<(Op, Vec<Id>), LangError> {
        let name = || self.to_string();
        let get = |index: usize| -> Option<&'a AttrValue> { attr(self.children()[index]) };
        let bad = |index: usize, expected: &'static str| LangError::BadAttr {
            op: name(),
            index,
            expected,
        };
        let num = |i: usize| match get(i) {
            Some(AttrValue::Num(n)) => Ok(*n),
            _ => Err(bad(i, "an integer")),
        };
        let float = |i: usize| match get(i) {
            Some(AttrValue::Float(x)) => Ok(x.get()),
            _ => Err(bad(i, "a float")),
        };
        let boolean = |i: usize| match get(i) {
            Some(AttrValue::Bool(b)) => Ok(*b),
            _ => Err(bad(i, "a bool")),
        };
        let ints = |i: usize| match get(i) {
            Some(AttrValue::Ints(v)) => Ok(v.clone()),
            _ => Err(bad(i, "an integer list")),
        };
        let ty = |i: usize| match get(i) {
            Some(AttrValue::Ty(t)) => Ok(t.clone()),
            _ => Err(bad(i, "a tensor type")),
        };
        let ch = self.children();
        let first = |n: usize| ch[..n].to_vec();
        let un = |u: UnaryOp| (Op::Unary(u), first(1));
        let bin = |b: BinaryOp| (Op::Binary(b), first(2));
        let cmp = |c: CmpOp| (Op::Compare(c), first(2));
        let fused = |f: FusedOp, n: usize| (Op::Fused(f), first(n));
        Ok(match self {
            Fuse::Arg(_)
            | Fuse::Num(_)
            | Fuse::Float(_)
            | Fuse::Bool(_)
            | Fuse::DType(_)
            | Fuse::Ty(_)
            | Fuse::Ints(_) => return Err(LangError::NotAnOp(name())),
            Fuse::Const(_) => (
                Op::Const {
                    value: float(0)?,
                    ty: ty(1)?,
                },
                vec![],
            ),
            Fuse::Iota(_) => (
                Op::Iota {
                    axis: num(0)?,
                    ty: ty(1)?,
                },
                vec![],
            ),
            Fuse::Neg(_) => un(UnaryOp::Neg),
            Fuse::Abs(_) => un(UnaryOp::Abs),
            Fuse::Exp(_) => un(UnaryOp::Exp),
            Fuse::Log(_) => un(UnaryOp::Log),
            Fuse::Sqrt(_) => un(UnaryOp::Sqrt),
            Fuse::Rsqrt(_) => un(UnaryOp::Rsqrt),
            Fuse::Recip(_) => un(UnaryOp::Recip),
            Fuse::Tanh(_) => un(UnaryOp::Tanh),
            Fuse::Erf(_) => un(UnaryOp::Erf),
            Fuse::Sin(_) => un(UnaryOp::Sin),
            Fuse::Cos(_) => un(UnaryOp::Cos),
            Fuse::Not(_) => un(UnaryOp::Not),
            Fuse::Add(_) => bin(BinaryOp::Add),
            Fuse::Sub(_) => bin(BinaryOp::Sub),
            Fuse::Mul(_) => bin(BinaryOp::Mul),
            Fuse::Div(_) => bin(BinaryOp::Div),
            Fuse::Max(_) => bin(BinaryOp::Max),
            Fuse::Min(_) => bin(BinaryOp::Min),
            Fuse::Pow(_) => bin(BinaryOp::Pow),
            Fuse::And(_) => bin(BinaryOp::And),
            Fuse::Or(_) => bin(BinaryOp::Or),
            Fuse::Eq(_) => cmp(CmpOp::Eq),
            Fuse::Ne(_) => cmp(CmpOp::Ne),
            Fuse::Lt(_) => cmp(CmpOp::Lt),
            Fuse::Le(_) => cmp(CmpOp::Le),
            Fuse::Gt(_) => cmp(CmpOp::Gt),
            Fuse::Ge(_) => cmp(CmpOp::Ge),
            Fuse::Select(_) => (Op::Select, first(3)),
            Fuse::Cast(_) => {
                let to = match get(1) {
                    Some(AttrValue::DType(d)) => *d,
                    _ => return Err(bad(1, "a dtype")),
                };
                (Op::Cast { to }, first(1))
            }
            Fuse::ReduceSum(_) => (
                Op::Reduce {
                    kind: ReduceKind::Sum,
                    axes: ints(1)?,
                },
                first(1),
            ),
            Fuse::ReduceMax(_) => (
                Op::Reduce {
                    kind: ReduceKind::Max,
                    axes: ints(1)?,
                },
                first(1),
            ),
            Fuse::Broadcast(_) => (Op::Broadcast { shape: ints(1)? }, first(1)),
            Fuse::Reshape(_) => (Op::Reshape { shape: ints(1)? }, first(1)),
            Fuse::Permute(_) => (Op::Permute { perm: ints(1)? }, first(1)),
            Fuse::Slice(_) => (
                Op::Slice {
                    start: ints(1)?,
                    end: ints(2)?,
                },
                first(1),
            ),
            Fuse::Pad(_) => (
                Op::Pad {
                    low: ints(1)?,
                    high: ints(2)?,
                },
                first(1),
            ),
            Fuse::Concat(_) => (Op::Concat { axis: num(0)? }, ch[1..].to_vec()),
            Fuse::MatMul(_) => (Op::MatMul, first(2)),
            Fuse::Gather(_) => (Op::Gather { axis: num(2)? }, first(2)),
            Fuse::ScatterAdd(_) => (Op::ScatterAdd { axis: num(3)? }, first(3)),
            Fuse::TopK(_) => (Op::TopK { k: num(1)? }, first(1)),
            Fuse::ArgSort(_) => (
                Op::ArgSort {
                    descending: boolean(1)?,
                },
                first(1),
            ),
            Fuse::CumSum(_) => (Op::CumSum { axis: num(1)? }, first(1)),
            Fuse::RmsNorm(_) => fused(FusedOp::RmsNorm { eps: float(2)? }, 2),
            Fuse::LayerNorm(_) => fused(FusedOp::LayerNorm { eps: float(3)? }, 3),
            Fuse::Softmax(_) => fused(FusedOp::Softmax, 1),
            Fuse::LogSoftmax(_) => fused(FusedOp::LogSoftmax, 1),
            Fuse::SwiGlu(_) => fused(FusedOp::SwiGlu, 2),
            Fuse::Gelu(_) => fused(FusedOp::Gelu, 1),
            Fuse::Rope(_) => fused(FusedOp::Rope, 3),
            Fuse::Attention(_) => {
                let n = ch.len();
                if n != 5 && n != 6 {
                    return Err(bad(n.saturating_sub(1), "q k v [segment_ids] scale causal"));
                }
                let op = FusedOp::Attention {
                    scale: float(n - 2)?,
                    causal: boolean(n - 1)?,
                };
                fused(op, n - 2)
            }
            Fuse::LinearCrossEntropy(_) => fused(FusedOp::LinearCrossEntropy { chunk: num(4)? }, 4),
            Fuse::MoePermute(_) => fused(FusedOp::MoePermute { experts: num(2)? }, 2),
            Fuse::ExpertOffsets(_) => fused(FusedOp::ExpertOffsets { experts: num(1)? }, 1),
            Fuse::GroupedMatMul(_) => fused(FusedOp::GroupedMatMul, 3),
            Fuse::MoeUnpermute(_) => fused(FusedOp::MoeUnpermute, 3),
        })
    }
}

/// The e-node of a forward fused op.
fn fused_node(
    f: &FusedOp,
    inputs: &[Id],
    mut leaf: impl FnMut(AttrValue) -> Id,
) -> Result<Fuse, LangError> {
    use AttrValue as A;
    let i = |n: usize| inputs[n];
    let float = |x: f64| A::Float(Float::new(x));
    Ok(match f {
        FusedOp::RmsNorm { eps } => Fuse::RmsNorm([i(0), i(1), leaf(float(*eps))]),
        FusedOp::LayerNorm { eps } => Fuse::LayerNorm([i(0), i(1), i(2), leaf(float(*eps))]),
        FusedOp::Softmax => Fuse::Softmax(i(0)),
        FusedOp::LogSoftmax => Fuse::LogSoftmax(i(0)),
        FusedOp::SwiGlu => Fuse::SwiGlu([i(0), i(1)]),
        FusedOp::Gelu => Fuse::Gelu(i(0)),
        FusedOp::Rope => Fuse::Rope([i(0), i(1), i(2)]),
        FusedOp::Attention { scale, causal } => {
            let mut ch = inputs.to_vec();
            ch.push(leaf(float(*scale)));
            ch.push(leaf(A::Bool(*causal)));
            Fuse::Attention(ch.into_boxed_slice())
        }
        FusedOp::LinearCrossEntropy { chunk } => {
            Fuse::LinearCrossEntropy([i(0), i(1), i(2), i(3), leaf(A::Num(*chunk))])
        }
        FusedOp::MoePermute { experts } => Fuse::MoePermute([i(0), i(1), leaf(A::Num(*experts))]),
        FusedOp::ExpertOffsets { experts } => Fuse::ExpertOffsets([i(0), leaf(A::Num(*experts))]),
        FusedOp::GroupedMatMul => Fuse::GroupedMatMul([i(0), i(1), i(2)]),
        FusedOp::MoeUnpermute => Fuse::MoeUnpermute([i(0), i(1), i(2)]),
        other => return Err(LangError::Unsupported(other.name())),
    })
}

/// The type of e-node `node` from the data of its children, as the verifier computes it.
pub fn node_data(node: &Fuse, data: impl Fn(Id) -> Data) -> Data {
    if let Some(a) = node.leaf_value() {
        return Data::Attr(a);
    }
    if let Fuse::Arg([_, ty]) = node {
        return match data(*ty) {
            Data::Attr(AttrValue::Ty(t)) => Data::Tensor(t),
            _ => Data::Ill("the type operand of `arg` is not a tensor type".into()),
        };
    }
    let attrs: Vec<(Id, Data)> = node.children().iter().map(|&c| (c, data(c))).collect();
    let lookup = |id: Id| {
        attrs
            .iter()
            .find(|(c, _)| *c == id)
            .and_then(|(_, d)| d.attr())
    };
    let (op, inputs) = match node.to_op(lookup) {
        Ok(x) => x,
        Err(e) => return Data::Ill(e.to_string()),
    };
    let mut tys = Vec::with_capacity(inputs.len());
    for i in &inputs {
        match attrs.iter().find(|(c, _)| c == i).map(|(_, d)| d) {
            Some(Data::Tensor(t)) => tys.push(t.clone()),
            Some(Data::Ill(why)) => return Data::Ill(format!("operand is ill-typed: {why}")),
            _ => return Data::Ill(format!("`{node}`: an operand is not a tensor")),
        }
    }
    let refs: Vec<&TensorType> = tys.iter().collect();
    match infer(&op, &refs) {
        Ok(r) if r.len() == 1 => Data::Tensor(r.into_iter().next().expect("one result")),
        Ok(r) => Data::Ill(format!("`{node}` has {} results", r.len())),
        Err(e) => Data::Ill(e.to_string()),
    }
}

impl Analysis<Fuse> for TensorAnalysis {
    type Data = Data;

    fn make(egraph: &mut FuseGraph, enode: &Fuse) -> Data {
        node_data(enode, |id| egraph[id].data.clone())
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        if *a == b {
            return DidMerge(false, false);
        }
        match (&*a, &b) {
            (Data::Ill(_), _) => {
                *a = b;
                DidMerge(true, false)
            }
            (_, Data::Ill(_)) => DidMerge(false, true),
            _ => panic!(
                "internal invariant: the type guard only unions e-classes of one type, \
                 but {a:?} met {b:?}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egg::RecExpr;
    use mmc_ir::op::{BINARY, COMPARE, UNARY};
    use mmc_ir::Shape;

    fn every_op() -> Vec<Op> {
        let ty = TensorType::new(DType::F32, [2, 3]);
        let shape: Shape = vec![2, 3];
        let mut ops = vec![
            Op::Const {
                value: f64::NEG_INFINITY,
                ty: ty.clone(),
            },
            Op::Iota { axis: 1, ty },
            Op::Select,
            Op::Cast { to: DType::BF16 },
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes: vec![0, 1],
            },
            Op::Reduce {
                kind: ReduceKind::Max,
                axes: vec![1],
            },
            Op::Broadcast {
                shape: shape.clone(),
            },
            Op::Reshape { shape },
            Op::Permute { perm: vec![1, 0] },
            Op::Slice {
                start: vec![0, 1],
                end: vec![2, 3],
            },
            Op::Pad {
                low: vec![1, 0],
                high: vec![0, 2],
            },
            Op::Concat { axis: 1 },
            Op::MatMul,
            Op::Gather { axis: 1 },
            Op::ScatterAdd { axis: 0 },
            Op::TopK { k: 2 },
            Op::ArgSort { descending: true },
            Op::CumSum { axis: 0 },
        ];
        ops.extend(UNARY.iter().map(|&u| Op::Unary(u)));
        ops.extend(BINARY.iter().map(|&b| Op::Binary(b)));
        ops.extend(COMPARE.iter().map(|&c| Op::Compare(c)));
        ops.extend(
            mmc_ir::fused::all()
                .into_iter()
                // Elementwise programs form after autodiff, outside the e-graph, and the
                // optimizer alone emits the sum of squares.
                .filter(|f| {
                    !f.is_backward()
                        && !matches!(
                            f,
                            FusedOp::Elementwise { .. }
                                | FusedOp::MatMulEpilogue { .. }
                                | FusedOp::SumSquares
                        )
                })
                .map(Op::Fused),
        );
        ops
    }

    #[test]
    fn every_single_result_op_round_trips_through_its_enode() {
        for op in every_op() {
            let mut forms = 0;
            for n_inputs in 0..=4 {
                let inputs: Vec<Id> = (0..n_inputs).map(|i| Id::from(1000 + i)).collect();
                let mut leaves: Vec<AttrValue> = Vec::new();
                let node = match Fuse::from_op(&op, &inputs, |a| {
                    leaves.push(a);
                    Id::from(leaves.len() - 1)
                }) {
                    Ok(node) => node,
                    Err(LangError::Arity { .. }) => continue,
                    Err(e) => panic!("{}: {e}", op.name()),
                };
                forms += 1;
                assert_eq!(node.to_string(), op.name());
                let (back, operands) = node
                    .to_op(|id| leaves.get(usize::from(id)))
                    .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
                assert_eq!(back, op);
                assert_eq!(operands, inputs, "{}", op.name());
            }
            assert!(forms > 0, "{} has no form", op.name());
        }
    }

    #[test]
    fn sources_and_backward_ops_have_no_enode() {
        let p = Op::Param {
            name: "w".into(),
            ty: TensorType::new(DType::F32, [2]),
        };
        assert!(Fuse::from_op(&p, &[], |_| Id::from(0)).is_err());
        let g = Op::Fused(FusedOp::SoftmaxGrad);
        let ids = [Id::from(0), Id::from(1)];
        assert!(Fuse::from_op(&g, &ids, |_| Id::from(0)).is_err());
    }

    #[test]
    fn attribute_leaves_print_and_parse_back() {
        let leaves = [
            AttrValue::Num(3),
            AttrValue::Float(Float::new(f64::NEG_INFINITY)),
            AttrValue::Float(Float::new(f64::NAN)),
            AttrValue::Float(Float::new(-0.0)),
            AttrValue::Float(Float::new(1e-6)),
            AttrValue::Float(Float::new(2.0)),
            AttrValue::Bool(true),
            AttrValue::DType(DType::BF16),
            AttrValue::Ty(TensorType::new(DType::F32, [2, 4])),
            AttrValue::Ty(TensorType::scalar(DType::I64)),
            AttrValue::Ints(vec![]),
            AttrValue::Ints(vec![0, 2]),
        ];
        for a in leaves {
            let text = Fuse::leaf(&a).to_string();
            let expr: RecExpr<Fuse> = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            let back = expr.as_ref()[0].leaf_value();
            assert_eq!(back.as_ref(), Some(&a), "{text}");
        }
    }

    #[test]
    fn the_analysis_types_enodes_as_the_verifier_does() {
        let mut eg = FuseGraph::default();
        let ok: RecExpr<Fuse> = "(reduce_sum (mul (arg 0 f32[2,3]) (arg 0 f32[2,3])) [1])"
            .parse()
            .expect("valid");
        let id = eg.add_expr(&ok);
        assert_eq!(
            eg[id].data,
            Data::Tensor(TensorType::new(DType::F32, [2, 1]))
        );
        let bad: RecExpr<Fuse> = "(matmul (arg 0 f32[2,3]) (arg 1 f32[2,3]))"
            .parse()
            .expect("valid");
        let id = eg.add_expr(&bad);
        assert!(matches!(&eg[id].data, Data::Ill(why) if why.contains("contraction")));
    }
}
