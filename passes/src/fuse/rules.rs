//! The fusion rules: each left side is the primitive form the frontend DSL emits
//! (`frontend/src/dsl.rs`, `frontend/src/models/*.rs`), each right side a fused op of
//! `ir/src/fused.rs`.
//!
//! One `rewrite!` per line, kebab-case names, named conditions (egg's `tests/math.rs`). Large
//! patterns are built from named pieces, each under the formula it matches (luminal's
//! `llama_rope.egg`). Conditions check what a pattern cannot say: that a reduction is over
//! the last axis, that a constant is `1/d`, that a weight is a `[d]` vector. Types the pattern
//! already forces (the two operands of a `mul` have one type) are not checked again; on top of
//! every rule the engine's type guard ([`super::guard`]) refuses a right side whose type
//! differs from the matched e-class, so no rule can change a type.
//!
//! In an f32 graph the DSL's casts to f32 are no-ops and vanish, so the norms have an f32 form
//! (no casts) and a low-precision form (`cast x f32` in, `cast .. dtype` out), where the fused
//! op computes in f32 semantics and rounds its result once.

pub mod attention;
pub mod cross_entropy;

use super::lang::{AttrValue, Fuse, FuseGraph, TensorAnalysis};
use egg::{rewrite, Id, Pattern, Rewrite, Subst, Var};
use mmc_ir::TensorType;
use std::f64::consts::FRAC_1_SQRT_2;

/// A fusion rule.
pub type FuseRewrite = Rewrite<Fuse, TensorAnalysis>;

/// Parses a pattern built with `format!`.
///
/// # Panics
/// On a malformed pattern: rules are code, and `rules()` is tested.
pub fn pat(s: &str) -> Pattern<Fuse> {
    s.parse()
        .unwrap_or_else(|e| panic!("bad fusion pattern `{s}`: {e}"))
}

/// Every fusion rule.
#[rustfmt::skip]
pub fn rules() -> Vec<FuseRewrite> {
    // ---- RMSNorm: w * (x * rsqrt(mean(x^2, last) + eps)) (dsl.rs `rms_norm`) ----
    // f32 compute: the casts to and from f32 are no-ops.
    let rms_norm_f32 = pat(&rms_norm("?x", None));
    // low-precision compute: x is cast to f32, the normalised row cast back before `* w`.
    let rms_norm_cast = pat(&rms_norm("(cast ?x f32)", Some("?dt")));

    // ---- LayerNorm: (x - mu) * rsqrt(var + eps) * w + b (dsl.rs `layer_norm`) ----
    let layer_norm_f32 = pat(&layer_norm("?x", "?w", "?b", None));
    let layer_norm_cast = pat(&layer_norm("(cast ?x f32)", "(cast ?w f32)", "(cast ?b f32)", Some("?dt")));

    // ---- softmax(x) = exp(x - max x) / sum(exp(x - max x)) (dsl.rs `softmax`) ----
    // z = x - max(x, axis), the row maximum broadcast back
    let z = "(sub ?x (broadcast (reduce_max ?x ?axes) ?shape))";
    let e = format!("(exp {z})");
    let softmax = pat(&format!("(div {e} (broadcast (reduce_sum {e} ?axes) ?shape))"));

    // ---- log_softmax(x) = x - logsumexp(x) (dsl.rs `log_softmax`) ----
    // lse = log(sum(exp(x - max x))) + max x, kept [.., 1] and broadcast back (dsl.rs `logsumexp`)
    let lse = format!("(add (log (reduce_sum {e} ?axes)) (reduce_max ?x ?axes))");
    let log_softmax = pat(&format!("(sub ?x (broadcast {lse} ?shape))"));

    // ---- SwiGLU: silu(gate) * up, silu(g) = g / (1 + exp(-g)) (dsl.rs `silu`) ----
    let silu = "(div ?g (add (exp (neg ?g)) (const 1.0 ?t)))";
    let swiglu = pat(&format!("(mul {silu} ?u)"));

    // ---- GELU: x/2 * (1 + erf(x / sqrt 2)) (dsl.rs `gelu`) ----
    let half_x = "(mul ?x (const 0.5 ?t))";
    let one_plus_erf = "(add (erf (mul ?x (const ?c ?t))) (const 1.0 ?t))";
    let gelu = pat(&format!("(mul {half_x} {one_plus_erf})"));

    // ---- RoPE: x * cos + rotate_half(x) * sin (qwen3_moe.rs `apply_rope`) ----
    // rotate_half(x) = cat(-x[.., d/2:], x[.., :d/2]) on the last axis
    let rotated = "(concat ?axis (neg (slice ?x ?hi_start ?hi_end)) (slice ?x ?lo_start ?lo_end))";
    // the tables [b, 1, s, d] broadcast over the heads by the multiplications
    let rope = pat(&format!("(add (mul ?x (broadcast ?cos ?shape)) (mul {rotated} (broadcast ?sin ?shape)))"));
    // tables of x's full shape (a single head: nothing to broadcast)
    let rope_full = pat(&format!("(add (mul ?x ?cos) (mul {rotated} ?sin))"));

    vec![
        rewrite!("rms-norm"; rms_norm_f32 => "(fused.rms_norm ?x ?w ?eps)" if is_last_axis("?axes", "?x") if is_inv_len("?inv_n", "?x") if is_row_vector("?w", "?row", "?x") if is_non_negative("?eps")),
        rewrite!("rms-norm-cast"; rms_norm_cast => "(fused.rms_norm ?x ?w ?eps)" if is_last_axis("?axes", "?x") if is_inv_len("?inv_n", "?x") if is_row_vector("?w", "?row", "?x") if is_non_negative("?eps")),
        rewrite!("layer-norm"; layer_norm_f32 => "(fused.layer_norm ?x ?w ?b ?eps)" if is_last_axis("?axes", "?x") if is_inv_len("?inv_n", "?x") if is_row_vector("?w", "?row", "?x") if is_row_vector("?b", "?row", "?x") if is_non_negative("?eps")),
        rewrite!("layer-norm-cast"; layer_norm_cast => "(fused.layer_norm ?x ?w ?b ?eps)" if is_last_axis("?axes", "?x") if is_inv_len("?inv_n", "?x") if is_row_vector("?w", "?row", "?x") if is_row_vector("?b", "?row", "?x") if is_non_negative("?eps")),
        rewrite!("softmax"; softmax => "(fused.softmax ?x)" if is_last_axis("?axes", "?x")),
        rewrite!("log-softmax"; log_softmax => "(fused.log_softmax ?x)" if is_last_axis("?axes", "?x")),
        rewrite!("swiglu"; swiglu => "(fused.swiglu ?g ?u)"),
        rewrite!("gelu"; gelu => "(fused.gelu ?x)" if is_value("?c", FRAC_1_SQRT_2)),
        rewrite!("rope"; rope => "(fused.rope ?x ?cos ?sin)" if is_last_axis("?axis", "?x") if is_low_half("?lo_start", "?lo_end", "?x") if is_high_half("?hi_start", "?hi_end", "?x") if tables_fit("?cos", "?sin", "?x")),
        rewrite!("rope-full-tables"; rope_full => "(fused.rope ?x ?cos ?sin)" if is_last_axis("?axis", "?x") if is_low_half("?lo_start", "?lo_end", "?x") if is_high_half("?hi_start", "?hi_end", "?x") if tables_fit("?cos", "?sin", "?x")),
    ]
    .into_iter()
    .chain(attention::rules())
    .chain(cross_entropy::rules())
    .collect()
}

/// The RMSNorm pattern over the row `x` (`?x`, or `(cast ?x f32)`), with the normalised row
/// cast to `?dt` before the weight when `cast_back` names that variable.
fn rms_norm(x: &str, cast_back: Option<&str>) -> String {
    // mean(x^2) over the last axis = sum(x * x) * (1/d)
    let mean_sq = format!("(mul (reduce_sum (mul {x} {x}) ?axes) (const ?inv_n ?tr))");
    // r = rsqrt(mean(x^2) + eps), broadcast back over the row
    let r = format!("(broadcast (rsqrt (add {mean_sq} (const ?eps ?tr))) ?shape)");
    // x * r, in the compute dtype, then cast back
    let normed = match cast_back {
        Some(dt) => format!("(cast (mul {x} {r}) {dt})"),
        None => format!("(mul {x} {r})"),
    };
    // w, reshaped to [1, .., 1, d] and broadcast over the rows, times the normalised row
    format!("(mul (broadcast (reshape ?w ?row) ?shape) {normed})")
}

/// The LayerNorm pattern over `x` with weight `w` and bias `b` (each a variable or its cast
/// to f32), the result cast to `?dt` when `cast_back` names that variable.
fn layer_norm(x: &str, w: &str, b: &str, cast_back: Option<&str>) -> String {
    // mean(v) over the last axis = sum(v) * (1/d)
    let mean = |v: &str| format!("(mul (reduce_sum {v} ?axes) (const ?inv_n ?tr))");
    // c = x - mean(x), the mean broadcast back over the row
    let c = format!("(sub {x} (broadcast {} ?shape))", mean(x));
    // var = mean(c^2), the biased variance
    let var = mean(&format!("(mul {c} {c})"));
    // y = c * rsqrt(var + eps)
    let y = format!("(mul {c} (broadcast (rsqrt (add {var} (const ?eps ?tr))) ?shape))");
    // y * w + b, both [d] vectors reshaped to [1, .., 1, d] and broadcast
    let out = format!("(add (mul {y} (broadcast (reshape {w} ?row) ?shape)) (broadcast (reshape {b} ?row) ?shape))");
    match cast_back {
        Some(dt) => format!("(cast {out} {dt})"),
        None => out,
    }
}

// ---------------------------------------------------------------------------------------------
// Conditions
// ---------------------------------------------------------------------------------------------

/// A condition of a rewrite, as egg's `ConditionalApplier` takes it.
pub trait Cond: Fn(&mut FuseGraph, Id, &Subst) -> bool + Send + Sync + 'static {}
impl<F: Fn(&mut FuseGraph, Id, &Subst) -> bool + Send + Sync + 'static> Cond for F {}

/// Parses a pattern variable.
///
/// # Panics
/// On a malformed name such as `x` (it must start with `?`): a bug in a rule.
pub fn var(name: &str) -> Var {
    name.parse()
        .unwrap_or_else(|e| panic!("bad pattern variable `{name}`: {e}"))
}

/// The type of the tensor bound to `v`.
pub fn tensor_of<'a>(eg: &'a FuseGraph, s: &Subst, v: Var) -> Option<&'a TensorType> {
    s.get(v).and_then(|&id| eg[id].data.tensor())
}

/// The value of the attribute bound to `v`.
pub fn attr_of<'a>(eg: &'a FuseGraph, s: &Subst, v: Var) -> Option<&'a AttrValue> {
    s.get(v).and_then(|&id| eg[id].data.attr())
}

/// The float attribute bound to `v`.
pub fn float_of(eg: &FuseGraph, s: &Subst, v: Var) -> Option<f64> {
    match attr_of(eg, s, v) {
        Some(AttrValue::Float(x)) => Some(x.get()),
        _ => None,
    }
}

/// Whether `a` and `b` agree to 12 significant digits (constants read back from text).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(f64::MIN_POSITIVE)
}

/// `axes` (a reduction's `[axes]` or a concat's `axis`) is exactly the last axis of `x`.
pub fn is_last_axis(axes: &str, x: &str) -> impl Cond {
    let (axes, x) = (var(axes), var(x));
    move |eg, _, s| {
        let Some(rank) = tensor_of(eg, s, x).map(|t| t.rank()) else {
            return false;
        };
        match attr_of(eg, s, axes) {
            Some(AttrValue::Ints(v)) => rank > 0 && v.as_slice() == [rank - 1],
            Some(AttrValue::Num(a)) => rank > 0 && *a == rank - 1,
            _ => false,
        }
    }
}

/// `c` is `1/d` for the last dimension `d` of `x`: the scale that turns a sum into a mean.
pub fn is_inv_len(c: &str, x: &str) -> impl Cond {
    let (c, x) = (var(c), var(x));
    move |eg, _, s| match (float_of(eg, s, c), tensor_of(eg, s, x)) {
        (Some(v), Some(t)) => match t.shape.last() {
            Some(&d) if d > 0 => close(v, 1.0 / d as f64),
            _ => false,
        },
        _ => false,
    }
}

/// The constant bound to `c` is `value`.
pub fn is_value(c: &str, value: f64) -> impl Cond {
    let c = var(c);
    move |eg, _, s| float_of(eg, s, c).is_some_and(|v| close(v, value))
}

/// The float bound to `c` is `>= 0` (an eps).
pub fn is_non_negative(c: &str) -> impl Cond {
    let c = var(c);
    move |eg, _, s| float_of(eg, s, c).is_some_and(|v| v >= 0.0)
}

/// `w` is a `[d]` vector of x's dtype over the last axis of `x`, and `row` (the shape it is
/// reshaped to before its broadcast) is `[1, .., 1, d]`, so it scales the last axis.
pub fn is_row_vector(w: &str, row: &str, x: &str) -> impl Cond {
    let (w, row, x) = (var(w), var(row), var(x));
    move |eg, _, s| {
        let (Some(wt), Some(xt)) = (tensor_of(eg, s, w), tensor_of(eg, s, x)) else {
            return false;
        };
        let Some(&d) = xt.shape.last() else {
            return false;
        };
        let mut want = vec![1; xt.rank()];
        want[xt.rank() - 1] = d;
        wt.dtype == xt.dtype
            && wt.shape == [d]
            && matches!(attr_of(eg, s, row), Some(AttrValue::Ints(r)) if *r == want)
    }
}

/// `start..end` is the box `x[.., :d/2]`.
pub fn is_low_half(start: &str, end: &str, x: &str) -> impl Cond {
    half(start, end, x, false)
}

/// `start..end` is the box `x[.., d/2:]`.
pub fn is_high_half(start: &str, end: &str, x: &str) -> impl Cond {
    half(start, end, x, true)
}

fn half(start: &str, end: &str, x: &str, high: bool) -> impl Cond {
    let (start, end, x) = (var(start), var(end), var(x));
    move |eg, _, s| {
        let Some(t) = tensor_of(eg, s, x) else {
            return false;
        };
        let Some(&d) = t.shape.last() else {
            return false;
        };
        if d % 2 != 0 {
            return false;
        }
        let r = t.rank();
        let mut want_start = vec![0; r];
        let mut want_end = t.shape.clone();
        if high {
            want_start[r - 1] = d / 2;
        } else {
            want_end[r - 1] = d / 2;
        }
        matches!(attr_of(eg, s, start), Some(AttrValue::Ints(v)) if *v == want_start)
            && matches!(attr_of(eg, s, end), Some(AttrValue::Ints(v)) if *v == want_end)
    }
}

/// `cos` and `sin` are rotary tables for `x`: x's dtype and rank, x's last dimension, and on
/// every other axis x's size or 1 (the fused op broadcasts them).
pub fn tables_fit(cos: &str, sin: &str, x: &str) -> impl Cond {
    let (cos, sin, x) = (var(cos), var(sin), var(x));
    move |eg, _, s| {
        let Some(xt) = tensor_of(eg, s, x) else {
            return false;
        };
        [cos, sin].into_iter().all(|v| {
            tensor_of(eg, s, v).is_some_and(|t| {
                t.dtype == xt.dtype
                    && t.rank() == xt.rank()
                    && t.shape.last() == xt.shape.last()
                    && t.shape
                        .iter()
                        .zip(&xt.shape)
                        .all(|(&a, &b)| a == b || a == 1)
            })
        })
    }
}
