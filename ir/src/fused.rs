//! Fused ops: the faster forms of primitive subgraphs that the fusion pass creates, and the
//! backward ops that autodiff derives from them.
//!
//! Each op's semantics are exactly those of the primitive subgraph it replaces, so a fused
//! graph can be checked against the graph it came from; the interpreter implements every one
//! directly. Everything a fused op needs (its name, attributes and typing rule) lives here, so
//! adding one touches one module of the IR.

use crate::elementwise::Program;
use crate::infer::{ResultTypes, TypeError};
use crate::op::{Attr, Attrs};
use crate::{DType, Shape, TensorType};
use smallvec::smallvec;

/// A fused op. Forward ops come first, then the backward ops autodiff emits for them (which
/// have several results: one gradient per differentiable operand).
#[derive(Clone, Debug, PartialEq)]
pub enum FusedOp {
    /// `w * (x * rsqrt(mean(x^2, last axis) + eps))`, the RMSNorm of Qwen3 (x, w).
    RmsNorm { eps: f64 },
    /// `(x - mean) * rsqrt(var + eps) * w + b` over the last axis, biased variance (x, w, b).
    LayerNorm { eps: f64 },
    /// Softmax over the last axis, stabilised by the row maximum (x).
    Softmax,
    /// `x - logsumexp(x)` over the last axis, the log-sum-exp stabilised by the row maximum
    /// (x): the log-probabilities without the `log(exp(..))` round trip.
    LogSoftmax,
    /// `silu(gate) * up` (gate, up).
    SwiGlu,
    /// The exact GELU `x/2 * (1 + erf(x / sqrt 2))` (x).
    Gelu,
    /// `x * cos + rotate_half(x) * sin` over the last axis (x, cos, sin); cos and sin have x's
    /// rank and on every axis x's size or 1.
    Rope,
    /// Flash attention `softmax(q k^T * scale + mask) v` with grouped-query heads, a causal
    /// mask when `causal`, and packed-sample masking when segment ids are given
    /// (q, k, v [, segment_ids]).
    Attention { scale: f64, causal: bool },
    /// The LM head fused with the weighted cross-entropy, `chunk` rows at a time, so that the
    /// [rows, vocab] logits never exist (h, w, target, weight) -> f32 scalar.
    LinearCrossEntropy { chunk: usize },
    /// The rows of x in expert order, one per (token, slot) pair (x, top).
    MoePermute { experts: usize },
    /// Where each expert's rows start in the permuted order, plus the total (top).
    ExpertOffsets { experts: usize },
    /// One GEMM per expert over its rows of the permuted input (xs, w [E, a, c], offsets).
    GroupedMatMul,
    /// The weighted sum of each token's expert outputs, back in token order (ys, top, weights).
    MoeUnpermute,
    /// `sum(x * x)` over every element into a scalar of x's dtype, squared and summed in
    /// f64 and rounded once (x): the optimizer's gradient norm, without the parameter-sized
    /// tensor of squares that `mul` then `reduce_sum` store.
    SumSquares,
    /// A chain of elementwise ops as one pass over memory: `program` over operands that have
    /// `shape`'s rank and on every axis its size or 1 (read broadcast), one result of `shape`.
    /// Formed after autodiff, over forward, backward and optimizer chains alike.
    Elementwise { program: Program, shape: Shape },
    /// A matmul whose product goes through an elementwise program (bias, activation,
    /// residual) before it is stored: (a, b, extras..) with `$0` the product `a @ b` and the
    /// extras read broadcast to its shape.
    MatMulEpilogue { program: Program },
    /// Backward of [`FusedOp::RmsNorm`]: (x, w, dy) -> (dx, dw).
    RmsNormGrad { eps: f64 },
    /// Backward of [`FusedOp::LayerNorm`]: (x, w, dy) -> (dx, dw, db).
    LayerNormGrad { eps: f64 },
    /// Backward of [`FusedOp::Softmax`] from its result: (y, dy) -> dx.
    SoftmaxGrad,
    /// Backward of [`FusedOp::LogSoftmax`] from its result:
    /// (y, dy) -> dx = dy - exp(y) * sum(dy, last axis).
    LogSoftmaxGrad,
    /// Backward of [`FusedOp::SwiGlu`]: (gate, up, dy) -> (dgate, dup).
    SwiGluGrad,
    /// Backward of [`FusedOp::Gelu`]: (x, dy) -> dx.
    GeluGrad,
    /// Backward of [`FusedOp::Rope`] (linear in x): (dy, cos, sin) -> dx.
    RopeGrad,
    /// Backward of [`FusedOp::Attention`], recomputing the probabilities as flash attention
    /// does: (q, k, v [, segment_ids], do) -> (dq, dk, dv).
    AttentionGrad { scale: f64, causal: bool },
    /// Backward of [`FusedOp::LinearCrossEntropy`], chunked like it:
    /// (h, w, target, weight, dloss) -> (dh, dw).
    LinearCrossEntropyGrad { chunk: usize },
    /// [`FusedOp::LinearCrossEntropy`] and its backward in one pass over each chunk's logits,
    /// so the logits are computed once instead of twice: (h, w, target, weight, dloss
    /// [, dw_base]) -> (loss, dh, dw). Formed after autodiff when dloss does not depend on the
    /// loss, as in a training step, whose loss gradient is fixed before the loss is known.
    /// With `dw_base` (w's type) the result is `dw_base + dw`: the step's gradient
    /// accumulator, summed into in place instead of through a [vocab, hidden] temporary.
    LinearCrossEntropyWithGrad { chunk: usize },
    /// Backward of [`FusedOp::GroupedMatMul`]: (xs, w, offsets, dy) -> (dxs, dw).
    GroupedMatMulGrad,
    /// Backward of [`FusedOp::MoePermute`]: (dxs, top) -> dx.
    MoePermuteGrad,
    /// Backward of [`FusedOp::MoeUnpermute`]: (ys, top, weights, dout) -> (dys, dweights).
    MoeUnpermuteGrad,
}

/// Every fused mnemonic with a representative op, for the parser and exhaustive tests.
pub fn all() -> Vec<FusedOp> {
    use FusedOp::*;
    vec![
        RmsNorm { eps: 1e-6 },
        LayerNorm { eps: 1e-6 },
        Softmax,
        LogSoftmax,
        SwiGlu,
        Gelu,
        Rope,
        Attention {
            scale: 1.0,
            causal: true,
        },
        LinearCrossEntropy { chunk: 1024 },
        MoePermute { experts: 1 },
        ExpertOffsets { experts: 1 },
        GroupedMatMul,
        MoeUnpermute,
        SumSquares,
        Elementwise {
            program: Program::single(crate::Op::Unary(crate::UnaryOp::Neg), 1),
            shape: vec![2, 4],
        },
        MatMulEpilogue {
            program: Program::single(crate::Op::Binary(crate::BinaryOp::Add), 2),
        },
        RmsNormGrad { eps: 1e-6 },
        LayerNormGrad { eps: 1e-6 },
        SoftmaxGrad,
        LogSoftmaxGrad,
        SwiGluGrad,
        GeluGrad,
        RopeGrad,
        AttentionGrad {
            scale: 1.0,
            causal: true,
        },
        LinearCrossEntropyGrad { chunk: 1024 },
        LinearCrossEntropyWithGrad { chunk: 1024 },
        GroupedMatMulGrad,
        MoePermuteGrad,
        MoeUnpermuteGrad,
    ]
}

impl FusedOp {
    /// The mnemonic used by the text format.
    pub fn name(&self) -> &'static str {
        use FusedOp::*;
        match self {
            RmsNorm { .. } => "fused.rms_norm",
            LayerNorm { .. } => "fused.layer_norm",
            Softmax => "fused.softmax",
            LogSoftmax => "fused.log_softmax",
            SwiGlu => "fused.swiglu",
            Gelu => "fused.gelu",
            Rope => "fused.rope",
            Attention { .. } => "fused.attention",
            LinearCrossEntropy { .. } => "fused.linear_cross_entropy",
            MoePermute { .. } => "fused.moe_permute",
            ExpertOffsets { .. } => "fused.expert_offsets",
            GroupedMatMul => "fused.grouped_matmul",
            MoeUnpermute => "fused.moe_unpermute",
            SumSquares => "fused.sum_squares",
            Elementwise { .. } => "fused.elementwise",
            MatMulEpilogue { .. } => "fused.matmul_epilogue",
            RmsNormGrad { .. } => "fused.rms_norm_grad",
            LayerNormGrad { .. } => "fused.layer_norm_grad",
            SoftmaxGrad => "fused.softmax_grad",
            LogSoftmaxGrad => "fused.log_softmax_grad",
            SwiGluGrad => "fused.swiglu_grad",
            GeluGrad => "fused.gelu_grad",
            RopeGrad => "fused.rope_grad",
            AttentionGrad { .. } => "fused.attention_grad",
            LinearCrossEntropyGrad { .. } => "fused.linear_cross_entropy_grad",
            LinearCrossEntropyWithGrad { .. } => "fused.linear_cross_entropy_with_grad",
            GroupedMatMulGrad => "fused.grouped_matmul_grad",
            MoePermuteGrad => "fused.moe_permute_grad",
            MoeUnpermuteGrad => "fused.moe_unpermute_grad",
        }
    }

    /// Whether this op is the backward of another fused op (or holds one, as
    /// [`FusedOp::LinearCrossEntropyWithGrad`] does): it has no derivative of its own.
    pub fn is_backward(&self) -> bool {
        use FusedOp::*;
        matches!(
            self,
            RmsNormGrad { .. }
                | LayerNormGrad { .. }
                | SoftmaxGrad
                | LogSoftmaxGrad
                | SwiGluGrad
                | GeluGrad
                | RopeGrad
                | AttentionGrad { .. }
                | LinearCrossEntropyGrad { .. }
                | LinearCrossEntropyWithGrad { .. }
                | GroupedMatMulGrad
                | MoePermuteGrad
                | MoeUnpermuteGrad
        )
    }

    /// The attributes the text format prints after the operands.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        use FusedOp::*;
        match self {
            RmsNorm { eps } | LayerNorm { eps } | RmsNormGrad { eps } | LayerNormGrad { eps } => {
                vec![("eps", Attr::Float(*eps))]
            }
            Attention { scale, causal } | AttentionGrad { scale, causal } => vec![
                ("scale", Attr::Float(*scale)),
                ("causal", Attr::Bool(*causal)),
            ],
            LinearCrossEntropy { chunk }
            | LinearCrossEntropyGrad { chunk }
            | LinearCrossEntropyWithGrad { chunk } => {
                vec![("chunk", Attr::Int(*chunk as i64))]
            }
            MoePermute { experts } | ExpertOffsets { experts } => {
                vec![("experts", Attr::Int(*experts as i64))]
            }
            Elementwise { program, shape } => vec![
                (
                    "shape",
                    Attr::Ints(shape.iter().map(|&d| d as i64).collect()),
                ),
                ("body", Attr::Str(program.to_string())),
            ],
            MatMulEpilogue { program } => vec![("body", Attr::Str(program.to_string()))],
            Softmax | LogSoftmax | SwiGlu | Gelu | Rope | GroupedMatMul | MoeUnpermute
            | SumSquares | SoftmaxGrad | LogSoftmaxGrad | SwiGluGrad | GeluGrad | RopeGrad
            | GroupedMatMulGrad | MoePermuteGrad | MoeUnpermuteGrad => vec![],
        }
    }

    /// Rebuilds a fused op from its mnemonic and attributes; `None` if `name` is not fused.
    pub fn from_parts(name: &str, attrs: &Attrs) -> Option<Result<FusedOp, String>> {
        use FusedOp::*;
        // Every fused mnemonic has this prefix: a primitive name is answered without building
        // the templates.
        if !name.starts_with("fused.") {
            return None;
        }
        let template = all().into_iter().find(|f| f.name() == name)?;
        Some((|| {
            Ok(match template {
                RmsNorm { .. } => RmsNorm {
                    eps: attrs.float("eps")?,
                },
                LayerNorm { .. } => LayerNorm {
                    eps: attrs.float("eps")?,
                },
                RmsNormGrad { .. } => RmsNormGrad {
                    eps: attrs.float("eps")?,
                },
                LayerNormGrad { .. } => LayerNormGrad {
                    eps: attrs.float("eps")?,
                },
                Attention { .. } => Attention {
                    scale: attrs.float("scale")?,
                    causal: attrs.bool("causal")?,
                },
                AttentionGrad { .. } => AttentionGrad {
                    scale: attrs.float("scale")?,
                    causal: attrs.bool("causal")?,
                },
                LinearCrossEntropy { .. } => LinearCrossEntropy {
                    chunk: attrs.usize("chunk")?,
                },
                LinearCrossEntropyGrad { .. } => LinearCrossEntropyGrad {
                    chunk: attrs.usize("chunk")?,
                },
                LinearCrossEntropyWithGrad { .. } => LinearCrossEntropyWithGrad {
                    chunk: attrs.usize("chunk")?,
                },
                MoePermute { .. } => MoePermute {
                    experts: attrs.usize("experts")?,
                },
                ExpertOffsets { .. } => ExpertOffsets {
                    experts: attrs.usize("experts")?,
                },
                Elementwise { .. } => Elementwise {
                    program: attrs.str("body")?.parse().map_err(|e| format!("{e}"))?,
                    shape: attrs.usizes("shape")?.into_iter().collect(),
                },
                MatMulEpilogue { .. } => MatMulEpilogue {
                    program: attrs.str("body")?.parse().map_err(|e| format!("{e}"))?,
                },
                other => other,
            })
        })())
    }

    /// The result types of this op on operands of types `inputs`.
    pub fn infer(&self, inputs: &[&TensorType]) -> Result<ResultTypes, TypeError> {
        use FusedOp::*;
        let t = Typer {
            op: self.name(),
            inputs,
        };
        match self {
            RmsNorm { eps } => {
                t.arity(2)?;
                let (x, w) = (inputs[0], inputs[1]);
                t.float_rank1(x, "x")?;
                t.last_axis_vector(w, x, "weight")?;
                t.check(*eps >= 0.0, || "eps must be non-negative".into())?;
                Ok(smallvec![x.clone()])
            }
            LayerNorm { eps } => {
                t.arity(3)?;
                let x = inputs[0];
                t.float_rank1(x, "x")?;
                t.last_axis_vector(inputs[1], x, "weight")?;
                t.last_axis_vector(inputs[2], x, "bias")?;
                t.check(*eps >= 0.0, || "eps must be non-negative".into())?;
                Ok(smallvec![x.clone()])
            }
            Softmax | LogSoftmax | Gelu => {
                t.arity(1)?;
                t.float_rank1(inputs[0], "x")?;
                Ok(smallvec![inputs[0].clone()])
            }
            SwiGlu => {
                t.arity(2)?;
                t.float_rank1(inputs[0], "gate")?;
                t.same(inputs[0], inputs[1])?;
                Ok(smallvec![inputs[0].clone()])
            }
            Rope => {
                t.arity(3)?;
                let x = inputs[0];
                t.rope_operands(x, inputs[1], inputs[2])?;
                Ok(smallvec![x.clone()])
            }
            Attention { .. } => {
                t.check(inputs.len() == 3 || inputs.len() == 4, || {
                    format!(
                        "takes q, k, v and optional segment ids, got {} operands",
                        inputs.len()
                    )
                })?;
                t.attention_operands(inputs)?;
                Ok(smallvec![inputs[0].clone()])
            }
            LinearCrossEntropy { chunk } => {
                t.arity(4)?;
                t.check(*chunk > 0, || "chunk must be positive".into())?;
                t.cross_entropy_operands(inputs)?;
                Ok(smallvec![TensorType::scalar(DType::F32)])
            }
            MoePermute { experts } => {
                t.arity(2)?;
                let (x, top) = (inputs[0], inputs[1]);
                t.check(*experts > 0, || "experts must be positive".into())?;
                t.check(x.dtype.is_float() && x.rank() == 2, || {
                    format!("x must be a float matrix [tokens, hidden], got {x}")
                })?;
                t.top_of(top, x.shape[0])?;
                Ok(smallvec![TensorType::new(
                    x.dtype,
                    [x.shape[0] * top.shape[1], x.shape[1]]
                )])
            }
            ExpertOffsets { experts } => {
                t.arity(1)?;
                t.check(*experts > 0, || "experts must be positive".into())?;
                let top = inputs[0];
                t.check(top.dtype == DType::I64 && top.rank() == 2, || {
                    format!("top must be i64 [tokens, k], got {top}")
                })?;
                Ok(smallvec![TensorType::new(DType::I64, [experts + 1])])
            }
            GroupedMatMul => {
                t.arity(3)?;
                let (xs, w, off) = (inputs[0], inputs[1], inputs[2]);
                t.grouped_operands(xs, w, off)?;
                Ok(smallvec![TensorType::new(
                    xs.dtype,
                    [xs.shape[0], w.shape[2]]
                )])
            }
            MoeUnpermute => {
                t.arity(3)?;
                let (ys, top, wts) = (inputs[0], inputs[1], inputs[2]);
                t.unpermute_operands(ys, top, wts)?;
                Ok(smallvec![TensorType::new(
                    ys.dtype,
                    [top.shape[0], ys.shape[1]]
                )])
            }
            SumSquares => {
                t.arity(1)?;
                let x = inputs[0];
                t.check(x.dtype.is_float(), || {
                    format!("x must be a float tensor, got {x}")
                })?;
                Ok(smallvec![TensorType::scalar(x.dtype)])
            }
            Elementwise { program, shape } => {
                let dtype = t.program(program, inputs)?;
                for x in inputs {
                    t.broadcasts_to(x, shape)?;
                }
                Ok(smallvec![TensorType::new(dtype, shape.clone())])
            }
            MatMulEpilogue { program } => {
                t.check(inputs.len() >= 2, || {
                    format!("takes a, b and the extras, got {} operand(s)", inputs.len())
                })?;
                let product = crate::infer::infer(&crate::Op::MatMul, &inputs[..2])?
                    .pop()
                    .expect("matmul has one result");
                let mut reads = vec![&product];
                reads.extend_from_slice(&inputs[2..]);
                let dtype = t.program(program, &reads)?;
                for x in &inputs[2..] {
                    t.broadcasts_to(x, &product.shape)?;
                }
                Ok(smallvec![TensorType::new(dtype, product.shape)])
            }
            RmsNormGrad { .. } => {
                t.arity(3)?;
                let (x, w, dy) = (inputs[0], inputs[1], inputs[2]);
                t.float_rank1(x, "x")?;
                t.last_axis_vector(w, x, "weight")?;
                t.same(x, dy)?;
                Ok(smallvec![x.clone(), w.clone()])
            }
            LayerNormGrad { .. } => {
                t.arity(3)?;
                let (x, w, dy) = (inputs[0], inputs[1], inputs[2]);
                t.float_rank1(x, "x")?;
                t.last_axis_vector(w, x, "weight")?;
                t.same(x, dy)?;
                Ok(smallvec![x.clone(), w.clone(), w.clone()])
            }
            SoftmaxGrad | LogSoftmaxGrad | GeluGrad => {
                t.arity(2)?;
                t.float_rank1(inputs[0], "x")?;
                t.same(inputs[0], inputs[1])?;
                Ok(smallvec![inputs[0].clone()])
            }
            SwiGluGrad => {
                t.arity(3)?;
                t.float_rank1(inputs[0], "gate")?;
                t.same(inputs[0], inputs[1])?;
                t.same(inputs[0], inputs[2])?;
                Ok(smallvec![inputs[0].clone(), inputs[0].clone()])
            }
            RopeGrad => {
                t.arity(3)?;
                t.rope_operands(inputs[0], inputs[1], inputs[2])?;
                Ok(smallvec![inputs[0].clone()])
            }
            AttentionGrad { .. } => {
                t.check(inputs.len() == 4 || inputs.len() == 5, || {
                    format!(
                        "takes q, k, v, optional segment ids and the output gradient, got {} operands",
                        inputs.len()
                    )
                })?;
                let (fwd, d_out) = inputs.split_at(inputs.len() - 1);
                t.attention_operands(fwd)?;
                t.same(fwd[0], d_out[0])?;
                Ok(smallvec![
                    inputs[0].clone(),
                    inputs[1].clone(),
                    inputs[2].clone()
                ])
            }
            LinearCrossEntropyGrad { chunk } => {
                t.cross_entropy_grad_operands(*chunk, inputs)?;
                Ok(smallvec![inputs[0].clone(), inputs[1].clone()])
            }
            LinearCrossEntropyWithGrad { chunk } => {
                // An optional sixth operand, the base dw sums onto.
                let (ins, base) = match inputs {
                    [ins @ .., base] if inputs.len() == 6 => (ins, Some(*base)),
                    _ => (inputs, None),
                };
                t.check(ins.len() == 5, || {
                    format!(
                        "takes h, w, target, weight, dloss and an optional dw base, got {} operands",
                        inputs.len()
                    )
                })?;
                t.cross_entropy_grad_operands(*chunk, ins)?;
                if let Some(base) = base {
                    t.check(base == inputs[1], || {
                        format!(
                            "dw_base {base} must have the head weight's type {}",
                            inputs[1]
                        )
                    })?;
                }
                Ok(smallvec![
                    TensorType::scalar(DType::F32),
                    inputs[0].clone(),
                    inputs[1].clone()
                ])
            }
            GroupedMatMulGrad => {
                t.arity(4)?;
                let (xs, w, off, dy) = (inputs[0], inputs[1], inputs[2], inputs[3]);
                t.grouped_operands(xs, w, off)?;
                let want = TensorType::new(xs.dtype, [xs.shape[0], w.shape[2]]);
                t.check(*dy == want, || {
                    format!("the output gradient must be {want}, got {dy}")
                })?;
                Ok(smallvec![xs.clone(), w.clone()])
            }
            MoePermuteGrad => {
                t.arity(2)?;
                let (dxs, top) = (inputs[0], inputs[1]);
                t.check(dxs.dtype.is_float() && dxs.rank() == 2, || {
                    format!("the gradient must be a float matrix, got {dxs}")
                })?;
                t.check(top.dtype == DType::I64 && top.rank() == 2, || {
                    format!("top must be i64 [tokens, k], got {top}")
                })?;
                t.check(top.numel() == dxs.shape[0], || {
                    format!("{dxs} must have one row per entry of {top}")
                })?;
                Ok(smallvec![TensorType::new(
                    dxs.dtype,
                    [top.shape[0], dxs.shape[1]]
                )])
            }
            MoeUnpermuteGrad => {
                t.arity(4)?;
                let (ys, top, wts, dout) = (inputs[0], inputs[1], inputs[2], inputs[3]);
                t.unpermute_operands(ys, top, wts)?;
                let want = TensorType::new(ys.dtype, [top.shape[0], ys.shape[1]]);
                t.check(*dout == want, || {
                    format!("the output gradient must be {want}, got {dout}")
                })?;
                Ok(smallvec![ys.clone(), wts.clone()])
            }
        }
    }
}

/// The typing checks fused ops share, each naming the op in its error.
struct Typer<'a> {
    op: &'static str,
    inputs: &'a [&'a TensorType],
}

impl Typer<'_> {
    fn check(&self, cond: bool, reason: impl FnOnce() -> String) -> Result<(), TypeError> {
        if cond {
            Ok(())
        } else {
            Err(TypeError {
                op: self.op,
                reason: reason(),
            })
        }
    }

    fn arity(&self, n: usize) -> Result<(), TypeError> {
        let got = self.inputs.len();
        self.check(got == n, || format!("takes {n} operand(s), got {got}"))
    }

    fn same(&self, a: &TensorType, b: &TensorType) -> Result<(), TypeError> {
        self.check(a == b, || format!("operand types differ: {a} vs {b}"))
    }

    /// The result dtype of `program` over operands of types `ins`.
    fn program(&self, program: &Program, ins: &[&TensorType]) -> Result<DType, TypeError> {
        let dtypes: Vec<DType> = ins.iter().map(|t| t.dtype).collect();
        program.result_dtype(&dtypes).map_err(|e| TypeError {
            op: self.op,
            reason: e.0,
        })
    }

    /// `x` has `shape`'s rank and on every axis its size or 1.
    fn broadcasts_to(&self, x: &TensorType, shape: &[usize]) -> Result<(), TypeError> {
        self.check(
            x.rank() == shape.len()
                && x.shape.iter().zip(shape).all(|(&a, &b)| a == b || a == 1),
            || format!("operand {x} does not broadcast to {shape:?} (same rank, size 1 or equal on every axis)"),
        )
    }

    fn float_rank1(&self, x: &TensorType, what: &str) -> Result<(), TypeError> {
        self.check(x.dtype.is_float() && x.rank() >= 1, || {
            format!("{what} must be a float tensor of rank >= 1, got {x}")
        })
    }

    fn last_axis_vector(
        &self,
        w: &TensorType,
        x: &TensorType,
        what: &str,
    ) -> Result<(), TypeError> {
        self.check(
            w.dtype == x.dtype && w.shape == [x.shape[x.rank() - 1]],
            || format!("{what} {w} must be a vector over the last axis of {x}"),
        )
    }

    fn rope_operands(
        &self,
        x: &TensorType,
        cos: &TensorType,
        sin: &TensorType,
    ) -> Result<(), TypeError> {
        self.float_rank1(x, "x")?;
        let d = x.shape[x.rank() - 1];
        self.check(d.is_multiple_of(2), || {
            format!("the last axis of {x} must be even")
        })?;
        for t in [cos, sin] {
            self.check(
                t.dtype == x.dtype
                    && t.rank() == x.rank()
                    && t.shape[x.rank() - 1] == d
                    && t.shape
                        .iter()
                        .zip(&x.shape)
                        .all(|(&a, &b)| a == b || a == 1),
                || {
                    format!(
                        "the table {t} must broadcast to {x} (size 1 or x's size on every axis)"
                    )
                },
            )?;
        }
        Ok(())
    }

    fn attention_operands(&self, ins: &[&TensorType]) -> Result<(), TypeError> {
        let (q, k, v) = (ins[0], ins[1], ins[2]);
        self.check(q.dtype.is_float() && q.rank() == 4, || {
            format!("q must be a float [batch, heads, seq, head_dim], got {q}")
        })?;
        self.check(
            k.dtype == q.dtype
                && k.rank() == 4
                && k.shape[0] == q.shape[0]
                && k.shape[2] == q.shape[2]
                && k.shape[3] == q.shape[3],
            || format!("k {k} must be [batch, kv_heads, seq, head_dim] like q {q}"),
        )?;
        self.same(k, v)?;
        let (hq, hkv) = (q.shape[1], k.shape[1]);
        self.check(hkv > 0 && hq.is_multiple_of(hkv), || {
            format!("{hq} query heads are not a multiple of {hkv} key/value heads")
        })?;
        if let Some(seg) = ins.get(3) {
            let want = TensorType::new(DType::I64, [q.shape[0], q.shape[2]]);
            self.check(**seg == want, || {
                format!("segment ids must be {want}, got {seg}")
            })?;
        }
        Ok(())
    }

    fn cross_entropy_operands(&self, ins: &[&TensorType]) -> Result<(), TypeError> {
        let (h, w, target, weight) = (ins[0], ins[1], ins[2], ins[3]);
        self.check(h.dtype.is_float() && h.rank() == 2, || {
            format!("h must be a float matrix [rows, hidden], got {h}")
        })?;
        self.check(
            w.dtype == h.dtype && w.rank() == 2 && w.shape[1] == h.shape[1],
            || format!("the head weight {w} must be [vocab, hidden] for h {h}"),
        )?;
        let rows = h.shape[0];
        self.check(*target == TensorType::new(DType::I64, [rows]), || {
            format!("targets must be i64 [{rows}], got {target}")
        })?;
        self.check(*weight == TensorType::new(DType::F32, [rows]), || {
            format!("weights must be f32 [{rows}], got {weight}")
        })
    }

    /// The operands of a cross-entropy's backward: the forward's, then an f32 scalar dloss.
    fn cross_entropy_grad_operands(
        &self,
        chunk: usize,
        ins: &[&TensorType],
    ) -> Result<(), TypeError> {
        let got = ins.len();
        self.check(got == 5, || format!("takes 5 operand(s), got {got}"))?;
        self.check(chunk > 0, || "chunk must be positive".into())?;
        self.cross_entropy_operands(&ins[..4])?;
        let dl = ins[4];
        self.check(*dl == TensorType::scalar(DType::F32), || {
            format!("the loss gradient must be an f32 scalar, got {dl}")
        })
    }

    fn top_of(&self, top: &TensorType, tokens: usize) -> Result<(), TypeError> {
        self.check(
            top.dtype == DType::I64 && top.rank() == 2 && top.shape[0] == tokens,
            || format!("top must be i64 [{tokens}, k], got {top}"),
        )
    }

    fn grouped_operands(
        &self,
        xs: &TensorType,
        w: &TensorType,
        off: &TensorType,
    ) -> Result<(), TypeError> {
        self.check(xs.dtype.is_float() && xs.rank() == 2, || {
            format!("xs must be a float matrix, got {xs}")
        })?;
        self.check(
            w.dtype == xs.dtype && w.rank() == 3 && w.shape[1] == xs.shape[1],
            || format!("w {w} must be [experts, {}, out]", xs.shape[1]),
        )?;
        let want = TensorType::new(DType::I64, [w.shape[0] + 1]);
        self.check(*off == want, || {
            format!("offsets must be {want}, got {off}")
        })
    }

    fn unpermute_operands(
        &self,
        ys: &TensorType,
        top: &TensorType,
        wts: &TensorType,
    ) -> Result<(), TypeError> {
        self.check(ys.dtype.is_float() && ys.rank() == 2, || {
            format!("ys must be a float matrix, got {ys}")
        })?;
        self.check(top.dtype == DType::I64 && top.rank() == 2, || {
            format!("top must be i64 [tokens, k], got {top}")
        })?;
        self.check(top.numel() == ys.shape[0], || {
            format!("{ys} must have one row per entry of {top}")
        })?;
        self.check(wts.dtype == ys.dtype && wts.shape == top.shape, || {
            format!(
                "weights {wts} must have top's shape {:?} and ys's dtype",
                top.shape
            )
        })
    }
}
