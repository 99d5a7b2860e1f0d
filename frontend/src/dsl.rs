//! The model DSL: a graph builder with name scopes, so that parameter names come out as the
//! checkpoint names, plus numpy-style broadcasting and the composite layers models are made of
//! (linear, norms, softmax, activations), all lowered onto the IR's primitive ops.
//!
//! Every method returns `Result`: a shape error while declaring a model (say, a config whose
//! head count does not divide the hidden size) becomes an error naming the scope, never a panic.

use mmc_ir::plan::Init;
use mmc_ir::{
    BinaryOp, CmpOp, DType, Graph, GraphError, Op, ReduceKind, ScopeId, Stage, TensorType, UnaryOp,
    Value,
};
use std::collections::BTreeMap;

/// A symbolic tensor: a value of the graph under construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sym(pub Value);

/// A failure while declaring a model, with the scope it happened in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("while declaring {}: {source}", if scope.is_empty() { "the model" } else { scope.as_str() })]
pub struct BuildError {
    pub scope: String,
    pub source: GraphError,
}

pub type BuildResult<T = Sym> = Result<T, BuildError>;

/// Builds a graph with scoped parameter names.
///
/// Parameters are stored in `param_dtype` (the master copy, f32) and used in `compute_dtype`:
/// with bf16 compute, every parameter read is followed by a cast, the compute copy.
pub struct ModelBuilder {
    graph: Graph,
    path: Vec<String>,
    scope: ScopeId,
    param_dtype: DType,
    compute_dtype: DType,
    /// Parameters declared so far: declaring a name again reuses it (tied weights).
    params: std::collections::HashMap<String, Value>,
    /// How each parameter is initialised when training starts from scratch.
    inits: BTreeMap<String, Init>,
    /// Standard deviation of the normal init of linear and embedding weights.
    init_std: f64,
}

/// A declared model: its forward graph and how to initialise its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub graph: Graph,
    pub inits: BTreeMap<String, Init>,
}

impl Default for ModelBuilder {
    fn default() -> Self {
        Self::new(DType::F32, DType::F32)
    }
}

impl ModelBuilder {
    /// A builder for a frontend-stage graph.
    pub fn new(param_dtype: DType, compute_dtype: DType) -> Self {
        ModelBuilder {
            graph: Graph::new(Stage::Frontend),
            path: Vec::new(),
            scope: ScopeId::default(),
            param_dtype,
            compute_dtype,
            params: Default::default(),
            inits: BTreeMap::new(),
            init_std: 0.02,
        }
    }

    /// The dtype activations are computed in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Sets the standard deviation of the random init of linear and embedding weights.
    pub fn set_init_std(&mut self, std: f64) {
        self.init_std = std;
    }

    /// The standard deviation of the random init of linear and embedding weights.
    pub fn init_std(&self) -> f64 {
        self.init_std
    }

    /// The finished graph.
    pub fn finish(self) -> Graph {
        self.graph
    }

    /// The finished graph with its parameters' initialisers.
    pub fn finish_model(self) -> Model {
        Model {
            graph: self.graph,
            inits: self.inits,
        }
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The current scope as a dotted path.
    pub fn scope_path(&self) -> String {
        self.path.join(".")
    }

    /// Runs `f` inside the child scope `name` (which may itself contain dots).
    pub fn scope<R>(
        &mut self,
        name: impl AsRef<str>,
        f: impl FnOnce(&mut Self) -> BuildResult<R>,
    ) -> BuildResult<R> {
        let saved = self.scope;
        self.path.push(name.as_ref().to_string());
        self.scope = self.graph.intern_scope(&self.path.join("."));
        let r = f(self);
        self.path.pop();
        self.scope = saved;
        r
    }

    /// The type of a symbolic tensor.
    pub fn ty(&self, x: Sym) -> &TensorType {
        self.graph.ty(x.0)
    }

    pub fn shape(&self, x: Sym) -> Vec<usize> {
        self.ty(x).shape.clone()
    }

    pub fn dtype(&self, x: Sym) -> DType {
        self.ty(x).dtype
    }

    fn op(&mut self, op: Op, inputs: &[Sym]) -> BuildResult {
        let inputs: Vec<Value> = inputs.iter().map(|s| s.0).collect();
        match self.graph.add_node(op, &inputs, self.scope) {
            Ok(id) => Ok(Sym(self.graph.result(id))),
            Err(source) => Err(BuildError {
                scope: self.scope_path(),
                source,
            }),
        }
    }

    /// A graph output.
    pub fn output(&mut self, name: &str, x: Sym) {
        self.graph.add_output(name, x.0);
    }

    // ---- sources ----

    /// A parameter named `<scope>.<name>`, initialised by `init` when training starts from
    /// scratch, returned in the compute dtype. Declaring the same name again returns the same
    /// parameter (tied weights); with another shape it is an error.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> BuildResult {
        let full = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.scope_path())
        };
        let ty = TensorType::new(self.param_dtype, shape);
        let p = match self.params.get(&full) {
            Some(&v) if self.graph.ty(v) == &ty => Sym(v),
            Some(&v) => {
                let had = self.graph.ty(v).clone();
                return Err(self.error(
                    "param",
                    format!("parameter `{full}` is declared as {had} and again as {ty}"),
                ));
            }
            None => {
                let p = self.op(
                    Op::Param {
                        name: full.clone(),
                        ty,
                    },
                    &[],
                )?;
                self.params.insert(full.clone(), p.0);
                self.inits.insert(full, init);
                p
            }
        };
        self.cast(p, self.compute_dtype)
    }

    /// A per-step input (not scoped: inputs have global names).
    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> BuildResult {
        self.op(
            Op::Input {
                name: name.to_string(),
                ty: TensorType::new(dtype, shape),
            },
            &[],
        )
    }

    pub fn full(&mut self, value: f64, dtype: DType, shape: &[usize]) -> BuildResult {
        self.op(
            Op::Const {
                value,
                ty: TensorType::new(dtype, shape),
            },
            &[],
        )
    }

    /// A constant with the type of `like`.
    pub fn full_like(&mut self, value: f64, like: Sym) -> BuildResult {
        let ty = self.ty(like).clone();
        self.op(Op::Const { value, ty }, &[])
    }

    pub fn iota(&mut self, dtype: DType, shape: &[usize], axis: usize) -> BuildResult {
        self.op(
            Op::Iota {
                axis,
                ty: TensorType::new(dtype, shape),
            },
            &[],
        )
    }

    // ---- elementwise ----

    pub fn unary(&mut self, op: UnaryOp, x: Sym) -> BuildResult {
        self.op(Op::Unary(op), &[x])
    }

    pub fn neg(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Neg, x)
    }
    pub fn exp(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Exp, x)
    }
    pub fn log(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Log, x)
    }
    pub fn rsqrt(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Rsqrt, x)
    }
    pub fn recip(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Recip, x)
    }
    pub fn erf(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Erf, x)
    }
    pub fn sin(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Sin, x)
    }
    pub fn cos(&mut self, x: Sym) -> BuildResult {
        self.unary(UnaryOp::Cos, x)
    }

    /// The shape both operands broadcast to (numpy rules).
    fn broadcast_shape(&self, a: &[usize], b: &[usize]) -> BuildResult<Vec<usize>> {
        let rank = a.len().max(b.len());
        let pad = |s: &[usize]| {
            let mut v = vec![1; rank - s.len()];
            v.extend_from_slice(s);
            v
        };
        let (a, b) = (pad(a), pad(b));
        a.iter()
            .zip(&b)
            .map(|(&x, &y)| match (x, y) {
                _ if x == y => Ok(x),
                (1, _) => Ok(y),
                (_, 1) => Ok(x),
                _ => Err(self.error(
                    "broadcast",
                    format!("shapes {a:?} and {b:?} do not broadcast"),
                )),
            })
            .collect()
    }

    fn error(&self, op: &'static str, reason: String) -> BuildError {
        BuildError {
            scope: self.scope_path(),
            source: GraphError::Type(mmc_ir::TypeError { op, reason }),
        }
    }

    /// Broadcasts `x` to `shape`, adding leading dimensions as needed (numpy rules).
    pub fn broadcast_to(&mut self, x: Sym, shape: &[usize]) -> BuildResult {
        let s = self.shape(x);
        if s == shape {
            return Ok(x);
        }
        if s.len() > shape.len() {
            return Err(self.error(
                "broadcast",
                format!("cannot broadcast {s:?} to the smaller rank of {shape:?}"),
            ));
        }
        let mut padded = vec![1; shape.len() - s.len()];
        padded.extend_from_slice(&s);
        let x = if padded != s {
            self.reshape(x, &padded)?
        } else {
            x
        };
        if padded == shape {
            return Ok(x);
        }
        self.op(
            Op::Broadcast {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    fn broadcast_pair(&mut self, a: Sym, b: Sym) -> BuildResult<(Sym, Sym)> {
        let shape = self.broadcast_shape(&self.shape(a), &self.shape(b))?;
        Ok((self.broadcast_to(a, &shape)?, self.broadcast_to(b, &shape)?))
    }

    /// A binary op with numpy broadcasting.
    pub fn binary(&mut self, op: BinaryOp, a: Sym, b: Sym) -> BuildResult {
        let (a, b) = self.broadcast_pair(a, b)?;
        self.op(Op::Binary(op), &[a, b])
    }

    pub fn add(&mut self, a: Sym, b: Sym) -> BuildResult {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: Sym, b: Sym) -> BuildResult {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: Sym, b: Sym) -> BuildResult {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: Sym, b: Sym) -> BuildResult {
        self.binary(BinaryOp::Div, a, b)
    }
    pub fn pow(&mut self, a: Sym, b: Sym) -> BuildResult {
        self.binary(BinaryOp::Pow, a, b)
    }
    pub fn and(&mut self, a: Sym, b: Sym) -> BuildResult {
        self.binary(BinaryOp::And, a, b)
    }

    /// `x op c` for a scalar `c` of x's dtype.
    pub fn binary_scalar(&mut self, op: BinaryOp, x: Sym, c: f64) -> BuildResult {
        let c = self.full_like(c, x)?;
        self.op(Op::Binary(op), &[x, c])
    }

    pub fn add_scalar(&mut self, x: Sym, c: f64) -> BuildResult {
        self.binary_scalar(BinaryOp::Add, x, c)
    }
    pub fn mul_scalar(&mut self, x: Sym, c: f64) -> BuildResult {
        self.binary_scalar(BinaryOp::Mul, x, c)
    }

    /// A comparison with numpy broadcasting; the result is bool.
    pub fn compare(&mut self, op: CmpOp, a: Sym, b: Sym) -> BuildResult {
        let (a, b) = self.broadcast_pair(a, b)?;
        self.op(Op::Compare(op), &[a, b])
    }

    /// `x op c` for a scalar `c`; the result is bool.
    pub fn compare_scalar(&mut self, op: CmpOp, x: Sym, c: f64) -> BuildResult {
        let c = self.full_like(c, x)?;
        self.op(Op::Compare(op), &[x, c])
    }

    /// `a` where `cond`, else `b`, with broadcasting of all three.
    pub fn select(&mut self, cond: Sym, a: Sym, b: Sym) -> BuildResult {
        let shape = self.broadcast_shape(&self.shape(a), &self.shape(b))?;
        let shape = self.broadcast_shape(&self.shape(cond), &shape)?;
        let cond = self.broadcast_to(cond, &shape)?;
        let a = self.broadcast_to(a, &shape)?;
        let b = self.broadcast_to(b, &shape)?;
        self.op(Op::Select, &[cond, a, b])
    }

    /// Converts to `dtype`; a no-op when x already has it.
    pub fn cast(&mut self, x: Sym, dtype: DType) -> BuildResult {
        if self.dtype(x) == dtype {
            return Ok(x);
        }
        self.op(Op::Cast { to: dtype }, &[x])
    }

    // ---- reductions ----

    fn reduce(&mut self, kind: ReduceKind, x: Sym, axes: &[usize], keepdim: bool) -> BuildResult {
        let r = self.op(
            Op::Reduce {
                kind,
                axes: axes.to_vec(),
            },
            &[x],
        )?;
        if keepdim {
            return Ok(r);
        }
        let shape: Vec<usize> = self
            .shape(x)
            .iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, &d)| d)
            .collect();
        self.reshape(r, &shape)
    }

    pub fn sum(&mut self, x: Sym, axes: &[usize], keepdim: bool) -> BuildResult {
        self.reduce(ReduceKind::Sum, x, axes, keepdim)
    }

    pub fn max(&mut self, x: Sym, axes: &[usize], keepdim: bool) -> BuildResult {
        self.reduce(ReduceKind::Max, x, axes, keepdim)
    }

    pub fn mean(&mut self, x: Sym, axes: &[usize], keepdim: bool) -> BuildResult {
        let shape = self.shape(x);
        let n: usize = axes.iter().filter_map(|&a| shape.get(a)).product();
        let s = self.sum(x, axes, keepdim)?;
        self.mul_scalar(s, 1.0 / n as f64)
    }

    /// The sum of all elements, as a 0-d tensor.
    pub fn sum_all(&mut self, x: Sym) -> BuildResult {
        let axes: Vec<usize> = (0..self.ty(x).rank()).collect();
        self.sum(x, &axes, false)
    }

    // ---- layout ----

    pub fn reshape(&mut self, x: Sym, shape: &[usize]) -> BuildResult {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.op(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    pub fn permute(&mut self, x: Sym, perm: &[usize]) -> BuildResult {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.op(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    /// Swaps two axes.
    pub fn transpose(&mut self, x: Sym, a: usize, b: usize) -> BuildResult {
        let mut perm: Vec<usize> = (0..self.ty(x).rank()).collect();
        if a >= perm.len() || b >= perm.len() {
            return Err(self.error(
                "permute",
                format!("axes {a} and {b} do not fit rank {}", perm.len()),
            ));
        }
        perm.swap(a, b);
        self.permute(x, &perm)
    }

    /// `x[start..end]` along one axis.
    pub fn slice(&mut self, x: Sym, axis: usize, start: usize, end: usize) -> BuildResult {
        let shape = self.shape(x);
        if axis >= shape.len() {
            return Err(self.error(
                "slice",
                format!("axis {axis} does not fit rank {}", shape.len()),
            ));
        }
        let mut s = vec![0; shape.len()];
        let mut e = shape.clone();
        s[axis] = start;
        e[axis] = end;
        self.op(Op::Slice { start: s, end: e }, &[x])
    }

    pub fn concat(&mut self, xs: &[Sym], axis: usize) -> BuildResult {
        self.op(Op::Concat { axis }, xs)
    }

    // ---- linear algebra ----

    /// Matrix product over the last two axes, broadcasting the batch axes.
    pub fn matmul(&mut self, a: Sym, b: Sym) -> BuildResult {
        let (sa, sb) = (self.shape(a), self.shape(b));
        if sa.len() < 2 || sb.len() < 2 {
            return Err(self.error(
                "matmul",
                format!("operands {sa:?} and {sb:?} need rank >= 2"),
            ));
        }
        let batch = self.broadcast_shape(&sa[..sa.len() - 2], &sb[..sb.len() - 2])?;
        let full = |s: &[usize]| {
            let mut v = batch.clone();
            v.extend_from_slice(&s[s.len() - 2..]);
            v
        };
        let a = self.broadcast_to(a, &full(&sa))?;
        let b = self.broadcast_to(b, &full(&sb))?;
        self.op(Op::MatMul, &[a, b])
    }

    /// `x @ w^T` for a weight `w` of shape [out, in] (the torch Linear layout).
    pub fn linear_with(&mut self, x: Sym, w: Sym) -> BuildResult {
        let wt = self.transpose(w, 0, 1)?;
        let shape = self.shape(x);
        let Some((&last, lead)) = shape.split_last() else {
            return Err(self.error("matmul", "linear needs an input of rank >= 1".into()));
        };
        let rows: usize = lead.iter().product();
        let x2 = self.reshape(x, &[rows, last])?;
        let y = self.matmul(x2, wt)?;
        let mut out = lead.to_vec();
        out.push(self.shape(w)[0]);
        self.reshape(y, &out)
    }

    /// A linear layer `<scope>.<name>.weight` [out, in] (and `.bias` [out] when `bias`).
    pub fn linear(&mut self, name: &str, x: Sym, out: usize, bias: bool) -> BuildResult {
        let shape = self.shape(x);
        let inp = shape.last().copied().unwrap_or(1);
        self.scope(name, |b| {
            let std = b.init_std;
            let w = b.param("weight", &[out, inp], Init::Normal { std })?;
            let y = b.linear_with(x, w)?;
            if bias {
                let bv = b.param("bias", &[out], Init::Const(0.0))?;
                b.add(y, bv)
            } else {
                Ok(y)
            }
        })
    }

    // ---- indexing ----

    pub fn gather(&mut self, x: Sym, idx: Sym, axis: usize) -> BuildResult {
        self.op(Op::Gather { axis }, &[x, idx])
    }

    pub fn scatter_add(&mut self, x: Sym, idx: Sym, src: Sym, axis: usize) -> BuildResult {
        self.op(Op::ScatterAdd { axis }, &[x, idx, src])
    }

    /// Rows of `table` [n, d] at integer `ids` of any shape: result `ids.shape + [d]`.
    pub fn embedding(&mut self, table: Sym, ids: Sym) -> BuildResult {
        let ids_shape = self.shape(ids);
        let d = self.shape(table).get(1).copied().unwrap_or(0);
        let n: usize = ids_shape.iter().product();
        let flat = self.reshape(ids, &[n, 1])?;
        let idx = self.broadcast_to(flat, &[n, d])?;
        let rows = self.gather(table, idx, 0)?;
        let mut out = ids_shape;
        out.push(d);
        self.reshape(rows, &out)
    }

    /// Inclusive prefix sum along `axis`.
    pub fn cumsum(&mut self, x: Sym, axis: usize) -> BuildResult {
        self.op(Op::CumSum { axis }, &[x])
    }

    pub fn topk(&mut self, x: Sym, k: usize) -> BuildResult {
        self.op(Op::TopK { k }, &[x])
    }

    // ---- composites ----

    /// Softmax along `axis`, stabilised by the row maximum.
    pub fn softmax(&mut self, x: Sym, axis: usize) -> BuildResult {
        let m = self.max(x, &[axis], true)?;
        let z = self.sub(x, m)?;
        let e = self.exp(z)?;
        let s = self.sum(e, &[axis], true)?;
        self.div(e, s)
    }

    /// `log(sum(exp(x)))` along `axis`, keeping the axis.
    pub fn logsumexp(&mut self, x: Sym, axis: usize) -> BuildResult {
        let m = self.max(x, &[axis], true)?;
        let z = self.sub(x, m)?;
        let e = self.exp(z)?;
        let s = self.sum(e, &[axis], true)?;
        let l = self.log(s)?;
        self.add(l, m)
    }

    /// Log-softmax along `axis`, `x - logsumexp(x)`: the log-probabilities without a
    /// `log(exp(..))` round trip, stabilised by the row maximum inside [`Self::logsumexp`]. The
    /// fusion pass turns it into `fused.log_softmax` when `axis` is the last.
    pub fn log_softmax(&mut self, x: Sym, axis: usize) -> BuildResult {
        let l = self.logsumexp(x, axis)?;
        self.sub(x, l)
    }

    /// `x * sigmoid(x)`, with the sigmoid as `1 / (1 + exp(-x))`.
    pub fn silu(&mut self, x: Sym) -> BuildResult {
        let n = self.neg(x)?;
        let e = self.exp(n)?;
        let d = self.add_scalar(e, 1.0)?;
        self.div(x, d)
    }

    /// The exact GELU: `x/2 * (1 + erf(x / sqrt 2))`.
    pub fn gelu(&mut self, x: Sym) -> BuildResult {
        let s = self.mul_scalar(x, std::f64::consts::FRAC_1_SQRT_2)?;
        let e = self.erf(s)?;
        let one = self.add_scalar(e, 1.0)?;
        let h = self.mul_scalar(x, 0.5)?;
        self.mul(h, one)
    }

    /// RMSNorm over the last axis with weight `<scope>.<name>.weight`, computed in f32 and
    /// cast back, as Qwen3 does: `w * cast(x * rsqrt(mean(x^2) + eps))`.
    pub fn rms_norm(&mut self, name: &str, x: Sym, eps: f64) -> BuildResult {
        let shape = self.shape(x);
        let d = shape.last().copied().unwrap_or(1);
        let dtype = self.dtype(x);
        let axis = shape.len().saturating_sub(1);
        self.scope(name, |b| {
            let w = b.param("weight", &[d], Init::Const(1.0))?;
            let xf = b.cast(x, DType::F32)?;
            let sq = b.mul(xf, xf)?;
            let ms = b.mean(sq, &[axis], true)?;
            let ms = b.add_scalar(ms, eps)?;
            let r = b.rsqrt(ms)?;
            let y = b.mul(xf, r)?;
            let y = b.cast(y, dtype)?;
            b.mul(w, y)
        })
    }

    /// LayerNorm over the last axis with `<scope>.<name>.weight` and `.bias`, computed in f32
    /// and cast back, as torch's LayerNorm does for half-precision inputs.
    pub fn layer_norm(&mut self, name: &str, x: Sym, eps: f64) -> BuildResult {
        let shape = self.shape(x);
        let d = shape.last().copied().unwrap_or(1);
        let dtype = self.dtype(x);
        let axis = shape.len().saturating_sub(1);
        self.scope(name, |b| {
            let w = b.param("weight", &[d], Init::Const(1.0))?;
            let bias = b.param("bias", &[d], Init::Const(0.0))?;
            let xf = b.cast(x, DType::F32)?;
            let mu = b.mean(xf, &[axis], true)?;
            let c = b.sub(xf, mu)?;
            let sq = b.mul(c, c)?;
            let var = b.mean(sq, &[axis], true)?;
            let var = b.add_scalar(var, eps)?;
            let r = b.rsqrt(var)?;
            let y = b.mul(c, r)?;
            let w = b.cast(w, DType::F32)?;
            let bias = b.cast(bias, DType::F32)?;
            let y = b.mul(y, w)?;
            let y = b.add(y, bias)?;
            b.cast(y, dtype)
        })
    }
}
