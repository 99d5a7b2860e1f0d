//! The LM head fused with the weighted cross-entropy: `fused.linear_cross_entropy`, so the
//! [tokens, vocab] logits never exist (Liger's fused linear cross-entropy, Apple's Cut
//! Cross-Entropy).
//!
//! The form is `causal_lm_from_embeds` + `shifted_cross_entropy` of
//! `frontend/src/models/qwen3_moe.rs`: `logits = linear_with(hidden, lm_head.weight)` (hidden
//! reshaped to [b*s, h], times the transposed weight, reshaped back to [b, s, V]), cast to f32
//! (a no-op in f32 models), `logsumexp` over the vocabulary, the logit at the safe target
//! (`gather`), `lse - picked` times the masked weights, summed to a scalar. It becomes
//! `fused.linear_cross_entropy h [b*s, h], lm_head.weight, target [b*s], weight [b*s]`: the
//! target and weight computations (shift, -100 masking, select) stay primitive and reach the
//! fused op through a reshape to [b*s]. The safe targets are all >= 0, and ignored rows carry
//! weight 0, so the fused op's sum equals the primitive one.
//!
//! When the logits are themselves a graph output (`ForwardOptions { logits: true }`, the
//! parity tests) they must still be computed. A rule sees no graph outputs, so it fires there
//! too, and the extractor keeps both: the head's matmul for the `logits` output and the fused
//! loss beside it (one extra head product, only in that configuration). Training builds the
//! forward without the logits, where nothing of [tokens, vocab] is left.
//!
//! `chunk` ([`chunk_rows`]) is the number of rows the fused op (and its backward) processes at a
//! time: as many as keep one [chunk, vocab] f32 block of logits within 128 MiB.

use super::{attr_of, pat, tensor_of, var, Cond, FuseRewrite};
use crate::fuse::guard::union_if_typed;
use crate::fuse::lang::{AttrValue, Fuse, FuseGraph, Ints, TensorAnalysis};
use egg::{rewrite, Applier, Id, Pattern, PatternAst, Subst, Symbol};
use mmc_ir::{DType, TensorType};

/// The most bytes one chunk of f32 logits may take inside the fused op: 128 MiB. The chunk's
/// rows are the M of its GEMMs, so fewer rows cost GEMM speed and save memory: measured at 2
/// threads on the LM head of the real vocabulary (hidden 512), 110 rows (64 MiB) ran at 238
/// GFLOP/s, 441 rows (256 MiB) at 299, the whole 1,024 at 318. 220 rows (128 MiB) keep most of
/// the speed at half the scratch, which on the vocabulary benchmark is the largest buffer
/// after the state; PyTorch holds all [tokens, vocab] logits and their gradient.
pub const CHUNK_BYTES: usize = 128 << 20;

/// Rows per chunk of `fused.linear_cross_entropy` for `rows` tokens and a vocabulary of
/// `vocab`: as many as keep a [chunk, vocab] f32 block within [`CHUNK_BYTES`], at least 1 and
/// at most `rows`. The real 151,936-token vocabulary gives 220 rows (about 127.5 MiB).
pub fn chunk_rows(rows: usize, vocab: usize) -> usize {
    let fit = CHUNK_BYTES / (vocab.max(1) * 4);
    fit.min(rows).max(1)
}

/// The rules of this module: the f32 form and the form with the cast of the logits to f32.
#[rustfmt::skip]
pub fn rules() -> Vec<FuseRewrite> {
    vec![
        rewrite!("linear-cross-entropy"; {pattern(false)} => {FuseLinearCrossEntropy} if is_lm_head_loss()),
        rewrite!("linear-cross-entropy-f32-logits"; {pattern(true)} => {FuseLinearCrossEntropy} if is_lm_head_loss()),
    ]
}

/// The primitive LM head and loss, from named pieces; `cast`: the logits are cast to f32
/// (bf16 models). Binds `?x` [n, h], `?w` [V, h], `?logits` shape, `?target` [b, s] (safe,
/// i64), `?tshape`, `?ce` shape, `?weight` [b, s] (f32) and the root's shape `?scalar`.
pub fn pattern(cast: bool) -> Pattern<Fuse> {
    // logits = reshape(x @ w^T) to [b, s, V]
    let logits = "(reshape (matmul ?x (permute ?w [1,0])) ?lshape)";
    let logits = if cast {
        format!("(cast {logits} f32)")
    } else {
        logits.to_string()
    };
    // lse = log(sum(exp(logits - max))) + max over the vocabulary (axis 2)
    let max = format!("(reduce_max {logits} [2])");
    let lse =
        format!("(add (log (reduce_sum (exp (sub {logits} (broadcast {max} ?bmax))) [2])) {max})");
    // picked = the logit at the target: gather along the vocabulary at target [b, s, 1]
    let picked = format!("(gather {logits} (reshape ?target ?tshape) 2)");
    // loss = sum over batch and sequence of reshape(lse - picked) * weight, as a scalar
    let loss = format!(
        "(reshape (reduce_sum (mul (reshape (sub {lse} {picked}) ?ce) ?weight) [0,1]) ?scalar)"
    );
    pat(&loss)
}

/// The tensor type bound to `v`.
fn tensor<'a>(eg: &'a FuseGraph, s: &Subst, v: &str) -> Option<&'a TensorType> {
    tensor_of(eg, s, var(v))
}

/// The integer list bound to `v`.
fn ints<'a>(eg: &'a FuseGraph, s: &Subst, v: &str) -> Option<&'a [usize]> {
    match attr_of(eg, s, var(v))? {
        AttrValue::Ints(x) => Some(x),
        _ => None,
    }
}

/// The shapes line up: hidden rows [n, h] with n = b*s, head weight [V, h], logits
/// [b, s, V], targets i64 [b, s] gathered as [b, s, 1], weights f32 [b, s], a scalar loss.
fn is_lm_head_loss() -> impl Cond {
    |eg, root, subst| {
        let (Some(x), Some(w), Some(t), Some(wt)) = (
            tensor(eg, subst, "?x"),
            tensor(eg, subst, "?w"),
            tensor(eg, subst, "?target"),
            tensor(eg, subst, "?weight"),
        ) else {
            return false;
        };
        let (Some(lshape), Some(tshape), Some(ce)) = (
            ints(eg, subst, "?lshape"),
            ints(eg, subst, "?tshape"),
            ints(eg, subst, "?ce"),
        ) else {
            return false;
        };
        if x.rank() != 2 || w.rank() != 2 || t.rank() != 2 || lshape.len() != 3 {
            return false;
        }
        let (n, h, v) = (x.shape[0], x.shape[1], w.shape[0]);
        let (b, s) = (t.shape[0], t.shape[1]);
        let scalar = eg[root]
            .data
            .tensor()
            .is_some_and(|r| r.shape.is_empty() && r.dtype == DType::F32);
        w.shape[1] == h
            && lshape == [b, s, v]
            && b * s == n
            && t.dtype == DType::I64
            && tshape == [b, s, 1]
            && ce == [b, s]
            && wt.dtype == DType::F32
            && wt.shape == [b, s]
            && scalar
    }
}

/// Adds `fused.linear_cross_entropy x, w, reshape(target, [n]), reshape(weight, [n])` with
/// [`chunk_rows`] rows per chunk to the loss's e-class.
#[derive(Clone, Debug)]
pub struct FuseLinearCrossEntropy;

impl Applier<Fuse, TensorAnalysis> for FuseLinearCrossEntropy {
    fn apply_one(
        &self,
        eg: &mut FuseGraph,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<Fuse>>,
        _rule_name: Symbol,
    ) -> Vec<Id> {
        let (x, w) = (subst[var("?x")], subst[var("?w")]);
        let (Some(xt), Some(wt)) = (eg[x].data.tensor(), eg[w].data.tensor()) else {
            return vec![];
        };
        let (n, vocab) = (xt.shape[0], wt.shape[0]);
        let flat = eg.add(Fuse::Ints(Ints(vec![n])));
        let target = eg.add(Fuse::Reshape([subst[var("?target")], flat]));
        let weight = eg.add(Fuse::Reshape([subst[var("?weight")], flat]));
        let chunk = eg.add(Fuse::Num(chunk_rows(n, vocab)));
        let node = Fuse::LinearCrossEntropy([x, w, target, weight, chunk]);
        union_if_typed(eg, eclass, node)
    }
}
