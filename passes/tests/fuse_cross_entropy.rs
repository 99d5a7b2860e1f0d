//! The fused linear cross-entropy rule: the LM head, logsumexp, gather at the targets and the
//! weighted sum of `causal_lm_from_embeds` + `shifted_cross_entropy` become one
//! `fused.linear_cross_entropy`, so no [tokens, vocab] tensor is left; not when the logits are
//! themselves an output, nor on near misses. Also the tiny Qwen3-MoE and InternVL3.5 forward
//! graphs: same loss before and after fusion, and no [tokens, vocab] tensor after.

mod fuse_common;

use fuse_common::*;
use mmc_frontend::{ModelBuilder, Sym};
use mmc_ir::plan::Init;
use mmc_ir::{CmpOp, DType, FusedOp, Graph, Tensor};
use mmc_passes::fuse::rules::cross_entropy::{chunk_rows, CHUNK_BYTES};
use std::collections::HashMap;

/// How the loss differs from `shifted_cross_entropy`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    /// As the frontend emits it.
    Shifted,
    /// `picked - lse`: the negated loss.
    Flipped,
    /// The picked logit comes from other logits than the logsumexp's.
    OtherLogits,
    /// Summed over the sequence only: one loss per sample, not a scalar.
    PerSample,
}

/// One LM head + loss graph.
#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    seq: usize,
    hidden: usize,
    vocab: usize,
    dtype: DType,
    loss: Loss,
    /// Also output the logits, as `ForwardOptions { logits: true }` does.
    logits_output: bool,
}

impl Case {
    fn base() -> Self {
        Case {
            batch: 2,
            seq: 8,
            hidden: 16,
            vocab: 64,
            dtype: DType::F32,
            loss: Loss::Shifted,
            logits_output: false,
        }
    }

    fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// `shifted_cross_entropy` of `frontend/src/models/qwen3_moe.rs`, with the case's variation.
fn loss(b: &mut ModelBuilder, c: &Case, logits: Sym, other: Sym, labels: Sym, wts: Sym) -> Sym {
    let (bs, s) = (c.batch, c.seq);
    let next = b.slice(labels, 1, 1, s).unwrap();
    let pad = b.full(-100.0, DType::I64, &[bs, 1]).unwrap();
    let target = b.concat(&[next, pad], 1).unwrap();
    let wnext = b.slice(wts, 1, 1, s).unwrap();
    let wpad = b.full(0.0, DType::F32, &[bs, 1]).unwrap();
    let w = b.concat(&[wnext, wpad], 1).unwrap();
    let valid = b.compare_scalar(CmpOp::Ge, target, 0.0).unwrap();
    let zero_id = b.full(0.0, DType::I64, &[bs, s]).unwrap();
    let safe = b.select(valid, target, zero_id).unwrap();
    let logits = b.cast(logits, DType::F32).unwrap();
    let lse = b.logsumexp(logits, 2).unwrap();
    let idx = b.reshape(safe, &[bs, s, 1]).unwrap();
    let source = if c.loss == Loss::OtherLogits {
        b.cast(other, DType::F32).unwrap()
    } else {
        logits
    };
    let picked = b.gather(source, idx, 2).unwrap();
    let ce = if c.loss == Loss::Flipped {
        b.sub(picked, lse).unwrap()
    } else {
        b.sub(lse, picked).unwrap()
    };
    let ce = b.reshape(ce, &[bs, s]).unwrap();
    let zero_w = b.full(0.0, DType::F32, &[bs, s]).unwrap();
    let w = b.select(valid, w, zero_w).unwrap();
    let wce = b.mul(ce, w).unwrap();
    if c.loss == Loss::PerSample {
        b.sum(wce, &[1], false).unwrap()
    } else {
        b.sum_all(wce).unwrap()
    }
}

/// The LM head `linear_with(hidden, lm_head.weight)` and the loss; outputs `loss` (and
/// `logits`).
fn build(c: &Case) -> Graph {
    let mut b = ModelBuilder::new(DType::F32, c.dtype);
    let (bs, s) = (c.batch, c.seq);
    let hidden = b.input("hidden", c.dtype, &[bs, s, c.hidden]).unwrap();
    let labels = b.input("labels", DType::I64, &[bs, s]).unwrap();
    let wts = b.input("loss_weights", DType::F32, &[bs, s]).unwrap();
    let (logits, other) = b
        .scope("lm_head", |b| {
            let w = b.param("weight", &[c.vocab, c.hidden], Init::Normal { std: 0.5 })?;
            let logits = b.linear_with(hidden, w)?;
            // Only the near miss reads other logits; elsewhere it would be the largest tensor.
            let other = if c.loss == Loss::OtherLogits {
                b.input("other_logits", c.dtype, &[bs, s, c.vocab])?
            } else {
                logits
            };
            Ok((logits, other))
        })
        .unwrap();
    let logits = b.cast(logits, DType::F32).unwrap();
    let l = loss(&mut b, c, logits, other, labels, wts);
    b.output("loss", l);
    if c.logits_output {
        b.output("logits", logits);
    }
    b.finish()
}

/// Seeded hidden states and head weight; labels with ignored (-100) positions; weights.
fn bindings(c: &Case, g: &Graph) -> HashMap<String, Tensor> {
    let n = c.rows();
    let labels: Vec<i64> = (0..n)
        .map(|i| {
            if i % 5 == 2 {
                -100
            } else {
                ((i * 37 + 11) % c.vocab) as i64
            }
        })
        .collect();
    let weights: Vec<f64> = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if l >= 0 {
                0.5 + (i % 3) as f64 * 0.25
            } else {
                0.0
            }
        })
        .collect();
    let mut fixed = HashMap::new();
    fixed.insert("labels".to_string(), ints(&[c.batch, c.seq], &labels));
    fixed.insert(
        "loss_weights".to_string(),
        Tensor::from_f64(DType::F32, vec![c.batch, c.seq], &weights).unwrap(),
    );
    bind_floats(g, 11, 1.0, fixed)
}

/// Fuses the case (checking that `rule` fired, when given) and checks the loss (and logits)
/// are unchanged.
fn fuse_and_compare(c: &Case, rule: Option<&str>) -> Graph {
    let g = build(c);
    let f = match rule {
        Some(r) => fused_by(&g, r),
        None => fused(&g),
    };
    let b = bindings(c, &g);
    let mut outs = vec!["loss"];
    if c.logits_output {
        outs.push("logits");
    }
    for out in outs {
        let (want, got) = (run(&g, &b, out), run(&f, &b, out));
        let diff = max_rel_diff(&got, &want);
        assert!(diff <= 1e-5, "{c:?}: `{out}` differs by {diff:e}");
    }
    f
}

#[test]
fn the_lm_head_and_loss_fuse_and_the_logits_never_exist() {
    let c = Case::base();
    let f = fuse_and_compare(&c, Some("linear-cross-entropy"));
    let nodes = fused_nodes(&f, "fused.linear_cross_entropy");
    assert_eq!(nodes.len(), 1);
    let n = nodes[0];
    assert_eq!(
        fused_op(n),
        &FusedOp::LinearCrossEntropy {
            chunk: chunk_rows(c.rows(), c.vocab)
        }
    );
    let (h, w, target, weight) = (
        f.ty(n.inputs[0]),
        f.ty(n.inputs[1]),
        f.ty(n.inputs[2]),
        f.ty(n.inputs[3]),
    );
    assert_eq!(h.shape, [c.rows(), c.hidden]);
    assert_eq!(
        w.shape,
        [c.vocab, c.hidden],
        "the head weight, not transposed"
    );
    assert_eq!(
        (target.dtype, &target.shape[..]),
        (DType::I64, &[c.rows()][..])
    );
    assert_eq!(
        (weight.dtype, &weight.shape[..]),
        (DType::F32, &[c.rows()][..])
    );
    let head = f
        .params()
        .find(|(n, _, _)| *n == "lm_head.weight")
        .unwrap()
        .2;
    assert_eq!(n.inputs[1], head);
    for op in ["matmul", "exp", "log", "gather", "reduce_max"] {
        assert_eq!(count(&f, op), 0, "`{op}` is left in the fused graph");
    }
    let biggest = largest_activation(&f);
    assert!(
        biggest < c.rows() * c.vocab,
        "a tensor of {biggest} elements is as large as the logits"
    );
}

#[test]
fn the_lm_head_and_loss_fuse_in_bf16() {
    let c = Case {
        dtype: DType::BF16,
        ..Case::base()
    };
    let g = build(&c);
    let f = fused_by(&g, "linear-cross-entropy-f32-logits");
    assert_eq!(fused_nodes(&f, "fused.linear_cross_entropy").len(), 1);
    assert_eq!(count(&f, "matmul"), 0);
    assert!(largest_activation(&f) < c.rows() * c.vocab);
    // The fused op does not round the logits to bf16 as the primitive head does.
    let b = bindings(&c, &g);
    let diff = max_rel_diff(&run(&f, &b, "loss"), &run(&g, &b, "loss"));
    assert!(diff <= 2e-2, "the bf16 loss differs by {diff:e}");
}

/// With the logits an output they must still be computed: the head's matmul stays, and the
/// outputs are unchanged (whether the loss then reads them or a fused op recomputes the head
/// is the extractor's choice: "fuse nothing or keep both").
fn assert_logits_kept(f: &Graph, rows: usize, vocab: usize) {
    let logits = f.output("logits").expect("the logits stay an output");
    assert_eq!(f.ty(logits).numel(), rows * vocab);
    let head_products = f
        .nodes()
        .iter()
        .filter(|n| n.op.name() == "matmul" && f.ty(n.outputs[0]).numel() == rows * vocab)
        .count();
    assert_eq!(head_products, 1, "the logits are computed once");
}

#[test]
fn with_the_logits_as_an_output_the_logits_are_still_computed() {
    let c = Case {
        logits_output: true,
        ..Case::base()
    };
    let f = fuse_and_compare(&c, None);
    assert_logits_kept(&f, c.rows(), c.vocab);
}

#[test]
fn near_misses_of_the_loss_do_not_fuse() {
    for loss in [Loss::Flipped, Loss::OtherLogits, Loss::PerSample] {
        let c = Case {
            loss,
            ..Case::base()
        };
        let f = fuse_and_compare(&c, None);
        assert!(
            fused_nodes(&f, "fused.linear_cross_entropy").is_empty(),
            "{loss:?} must not fuse"
        );
    }
}

#[test]
fn a_chunk_of_logits_stays_within_256_mib() {
    // f32 logits: chunk * vocab * 4 bytes <= 256 MiB, at least one row, at most all rows.
    let vocab = 151_936;
    let chunk = chunk_rows(4096, vocab);
    assert_eq!(chunk, 220);
    assert!(chunk * vocab * 4 <= CHUNK_BYTES && (chunk + 1) * vocab * 4 > CHUNK_BYTES);
    assert_eq!(CHUNK_BYTES, 128 << 20);
    assert_eq!(chunk_rows(64, 1024), 64);
    assert_eq!(chunk_rows(4096, 1 << 30), 1);
    assert_eq!(chunk_rows(0, 1024), 1);
}

/// Fuses a tiny model's forward graph; checks the losses match within 1e-5 and that no
/// tensor is as large as the logits. Returns the fused graph.
fn check_model(file: &str, seq: usize, tiles: usize) -> Graph {
    let cfg = tiny_config(file, seq, tiles);
    let (g, b) = model_case(&cfg, false, 3);
    let f = fused(&g);
    for out in ["loss", "lm_loss", "aux_loss"] {
        let (want, got) = (run(&g, &b, out), run(&f, &b, out));
        let diff = max_rel_diff(&got, &want);
        assert!(diff <= 1e-5, "{file}: `{out}` differs by {diff:e}");
    }
    let tokens = cfg.train.micro_batch_size * cfg.train.seq_length;
    let logits = tokens * cfg.model.text.vocab_size;
    assert_eq!(fused_nodes(&f, "fused.linear_cross_entropy").len(), 1);
    assert_eq!(
        fused_nodes(&f, "fused.attention").len(),
        cfg.model.text.num_hidden_layers
            + cfg
                .model
                .vision_language
                .as_ref()
                .map_or(0, |vl| vl.vision.num_hidden_layers),
        "{file}: one fused attention per layer"
    );
    let biggest = largest_activation(&f);
    assert!(
        biggest < logits,
        "{file}: a tensor of {biggest} elements is as large as the [tokens, vocab] logits"
    );
    f
}

#[test]
fn the_tiny_qwen3_moe_loss_is_unchanged_by_fusion() {
    check_model("qwen3-moe-tiny.toml", 16, 1);
}

#[test]
fn the_tiny_internvl_loss_is_unchanged_by_fusion() {
    check_model("internvl35-tiny.toml", 16, 1);
}

#[test]
fn with_logits_requested_the_tiny_model_still_computes_them() {
    let cfg = tiny_config("qwen3-moe-tiny.toml", 16, 1);
    let (g, b) = model_case(&cfg, true, 5);
    let f = fused(&g);
    for out in ["loss", "logits"] {
        let (want, got) = (run(&g, &b, out), run(&f, &b, out));
        let diff = max_rel_diff(&got, &want);
        assert!(diff <= 1e-5, "`{out}` differs by {diff:e}");
    }
    assert_logits_kept(&f, 16, cfg.model.text.vocab_size);
}

#[test]
fn file_test_cross_entropy() {
    run_file_test("fuse/cross_entropy.mmcir");
}
