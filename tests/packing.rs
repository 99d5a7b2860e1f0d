//! Packing at the model level, and the load-balancing loss under gradient accumulation.
//!
//! The data pipeline packs several samples into one row (`runtime/src/data/pack.rs`): each keeps
//! its RoPE positions from 0 and its own segment id, the model's mask lets a token attend only to
//! earlier tokens of its own segment, and a label counts only when the token before it is in the
//! same segment. Packing is only correct if a packed sample trains exactly as it would alone, so
//! these tests run the real model graphs (tiny Qwen3-MoE and tiny InternVL3.5 from the committed
//! fixtures) on the reference interpreter, in `Precision::F64` (and, for packed = alone, also
//! in the declared f32 the trainer uses), and check:
//!
//! - **Packed = alone.** Samples A and B packed into one row (A then B, positions restarting at
//!   0, segment ids 1 and 2, padding 0) give, per sample, the same summed cross-entropy (loss
//!   weights 1 on that sample's labels only), the same logits, and the same gradient of every
//!   parameter as each sample run alone in its own padded row. The router aux loss pools over all
//!   tokens of a micro-batch, so it is not per sample: these comparisons set
//!   `router_aux_loss_coef = 0` (the gradient is that of `lm_loss` alone). On InternVL an image
//!   sample is packed next to a text sample (either order) and next to a second image, with the
//!   tiles in slot order.
//! - **No cross attention.** Changing A's tokens (or A's image) in the packed row leaves B's
//!   loss and logits bit-identical, while the same change with one segment id for both samples
//!   changes them; swapping the two images' tile slots changes both samples' losses.
//! - **Positions.** RoPE is relative and the mask keeps B to itself, so B's positions continuing
//!   from A's (not restarted) change B's logits by rounding only (checked: not bit-identical,
//!   under 1e-12), so a constant shift is invisible by design; a restart one token late changes
//!   B's loss. The label of B's first token is not
//!   trained on (it would be predicted from A's last token): weighting it changes B's loss.
//! - **Aux loss with gradient accumulation.** With 2 micro-batches per step, the reported
//!   `aux_loss` is the mean of the micro-batches' load-balancing losses, each computed here in
//!   plain Rust from the router logits (transformers' `load_balancing_loss_func`, pooled over
//!   layers, padding excluded); `loss = lm_loss + coef · mean`; the accumulated gradients are
//!   `Σ_m (∇lm_m + coef/2 · ∇aux_m)`, and a finite difference of the plain-Rust definition
//!   confirms the aux part. The pooled loss of one bigger micro-batch and a loss that counts
//!   padding tokens are different numbers with different gradients, and both checks see it;
//!   for the language-model loss alone, accumulation does equal one bigger micro-batch.

mod common;

use common::{fixture, read};
use mmc::driver::compile_plan;
use mmc_frontend::{forward_graph, CheckpointLayout, Config, ForwardOptions};
use mmc_ir::plan::{LossReduction, Plan};
use mmc_ir::{DType, Graph, Interpreter, Outputs, Precision, Tensor, TensorData};
use mmc_runtime::loss::{loss_weights, Row as LossRow};
use mmc_runtime::weights::param_specs;
use mmc_runtime::{Checkpoint, MicroBatch, Trainer};
use std::collections::BTreeMap;

/// Packed against alone: the worst relative error allowed in f32 (`Precision::Declared`, each
/// op rounded as the trainer runs it) and in F64. The measured errors are printed; both are 0
/// on these fixtures (the same values, summed in the same order, plus exact zeros).
const TOL: f64 = 1e-6;
const F64_TOL: f64 = 1e-12;
/// Checks of f32 results (the trainer runs in the declared f32).
const F32_TOL: f64 = 1e-5;
/// A change that must be visible: at least this relative difference.
const VISIBLE: f64 = 1e-4;

const TILE_LEN: usize = 3 * 56 * 56;

// ---------------------------------------------------------------------------------------------
// Samples, rows and micro-batches

/// One sample: token ids, labels aligned with them (-100 = not trained) and its image tiles
/// (CHW floats, one tile after another; empty for text).
#[derive(Clone, Debug)]
struct Sample {
    ids: Vec<i64>,
    labels: Vec<i64>,
    tiles: Vec<f32>,
}

impl Sample {
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// One row of a micro-batch, laid out as the loader does (`MicroBatchBuilder`): pad id 0,
/// labels -100, positions 0 and segment 0 after the samples.
#[derive(Clone, Debug)]
struct Row {
    ids: Vec<i64>,
    labels: Vec<i64>,
    positions: Vec<i64>,
    segments: Vec<i64>,
    /// (start, length) of each sample in the row.
    spans: Vec<(usize, usize)>,
    /// Tiles of the samples, in row order.
    tiles: Vec<f32>,
}

/// How a sample is placed: its segment id and its position ids.
#[derive(Clone, Copy)]
enum Pos {
    /// From 0 (the loader's rule).
    Restart,
    /// Continuing from the previous sample's last position (not restarted).
    Continue,
    /// The restart one token late: the first token continues, the rest count from 0.
    LateRestart,
}

fn pack(seq: usize, parts: &[(&Sample, i64, Pos)]) -> Row {
    let mut r = Row {
        ids: vec![0; seq],
        labels: vec![-100; seq],
        positions: vec![0; seq],
        segments: vec![0; seq],
        spans: Vec::new(),
        tiles: Vec::new(),
    };
    let mut at = 0;
    for &(s, seg, pos) in parts {
        let n = s.len();
        assert!(at + n <= seq, "the samples do not fit the row");
        for i in 0..n {
            r.ids[at + i] = s.ids[i];
            r.labels[at + i] = s.labels[i];
            r.segments[at + i] = seg;
            r.positions[at + i] = match pos {
                Pos::Restart => i as i64,
                Pos::Continue => (at + i) as i64,
                Pos::LateRestart if i == 0 => at as i64,
                Pos::LateRestart => i as i64 - 1,
            };
        }
        r.spans.push((at, n));
        r.tiles.extend_from_slice(&s.tiles);
        at += n;
    }
    r
}

fn alone(seq: usize, s: &Sample) -> Row {
    pack(seq, &[(s, 1, Pos::Restart)])
}

/// Loss weights 1 on the trained labels of sample `k` of the row and 0 elsewhere: its labels
/// except the first token's (which would be predicted from the token before the sample). With
/// them the graph's `lm_loss` is that sample's summed cross-entropy.
fn select(row: &Row, k: usize) -> Vec<f32> {
    let (start, n) = row.spans[k];
    let mut w = vec![0.0; row.ids.len()];
    for (t, wt) in w.iter_mut().enumerate().take(start + n).skip(start + 1) {
        if row.labels[t] >= 0 {
            *wt = 1.0;
        }
    }
    w
}

/// Like [`select`] but also weighting the label of the sample's first token.
fn select_with_boundary(row: &Row, k: usize) -> Vec<f32> {
    let mut w = select(row, k);
    let (start, _) = row.spans[k];
    assert!(row.labels[start] >= 0, "the sample has no first label");
    w[start] = 1.0;
    w
}

fn tensor_i64(shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I64(v)).unwrap()
}

/// The inputs of one micro-batch of `rows` (all of length seq) with per-row loss weights, and
/// for InternVL `max_tiles` tile slots filled in row order.
fn micro_batch(
    rows: &[&Row],
    weights: &[Vec<f32>],
    max_tiles: Option<usize>,
) -> BTreeMap<String, Tensor> {
    let (b, s) = (rows.len(), rows[0].ids.len());
    let cat = |f: &dyn Fn(&Row) -> &Vec<i64>| rows.iter().flat_map(|r| f(r).clone()).collect();
    let mut m = BTreeMap::new();
    m.insert("input_ids".into(), tensor_i64(&[b, s], cat(&|r| &r.ids)));
    m.insert("labels".into(), tensor_i64(&[b, s], cat(&|r| &r.labels)));
    m.insert(
        "position_ids".into(),
        tensor_i64(&[b, s], cat(&|r| &r.positions)),
    );
    m.insert(
        "segment_ids".into(),
        tensor_i64(&[b, s], cat(&|r| &r.segments)),
    );
    m.insert(
        "loss_weights".into(),
        Tensor::new(vec![b, s], TensorData::F32(weights.concat())).unwrap(),
    );
    if let Some(slots) = max_tiles {
        let mut px: Vec<f32> = rows.iter().flat_map(|r| r.tiles.clone()).collect();
        assert!(px.len() <= slots * TILE_LEN, "more tiles than slots");
        px.resize(slots * TILE_LEN, 0.0);
        m.insert(
            "pixel_values".into(),
            Tensor::new(vec![slots, 3, 56, 56], TensorData::F32(px)).unwrap(),
        );
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Models

/// A model graph with its weights: the forward graph (logits and each MoE layer's router logits
/// as extra outputs) and its reverse-mode gradient of one output.
struct Model {
    cfg: Config,
    forward: Graph,
    weights: BTreeMap<String, Tensor>,
    precision: Precision,
}

/// Adds `router_logits.<layer>` outputs: the router logits [tokens, experts] of each MoE layer
/// (the result of the `mlp.gate` linear).
fn expose_router_logits(g: &mut Graph, layers: usize, experts: usize) {
    for layer in 0..layers {
        let suffix = format!("layers.{layer}.mlp.gate");
        let last = g
            .iter_nodes()
            .filter(|(_, n)| g.scope_name(n.scope).ends_with(&suffix))
            .map(|(id, _)| id)
            .last()
            .unwrap_or_else(|| panic!("no node in scope ...{suffix}"));
        let v = g.result(last);
        assert_eq!(
            g.ty(v).shape.last(),
            Some(&experts),
            "{suffix}: not the router logits"
        );
        g.add_output(format!("router_logits.{layer}"), v);
    }
}

impl Model {
    fn new(cfg: Config, checkpoint: &str) -> Model {
        let mut forward = forward_graph(
            &cfg,
            ForwardOptions {
                logits: true,
                ..Default::default()
            },
        )
        .unwrap()
        .graph;
        let t = &cfg.model.text;
        expose_router_logits(&mut forward, t.num_hidden_layers, t.num_experts);
        let ckpt = Checkpoint::open(&fixture(checkpoint)).unwrap();
        let layout = CheckpointLayout::detect(ckpt.names());
        let weights = ckpt
            .load(&param_specs(&forward, |n| layout.source(n)))
            .unwrap();
        Model {
            cfg,
            forward,
            weights,
            precision: Precision::F64,
        }
    }

    /// The same model run with each op rounded to its declared dtype (f32), as the trainer
    /// runs it.
    fn declared(mut self) -> Model {
        self.precision = Precision::Declared;
        self
    }

    fn max_tiles(&self) -> Option<usize> {
        self.cfg
            .model
            .vision_language
            .as_ref()
            .map(|_| self.cfg.train.max_tiles)
    }

    fn batch(&self, rows: &[&Row], weights: &[Vec<f32>]) -> BTreeMap<String, Tensor> {
        micro_batch(rows, weights, self.max_tiles())
    }

    fn run_on(&self, g: &Graph, data: &BTreeMap<String, Tensor>) -> Outputs {
        let interp = Interpreter::new(g, self.precision).unwrap();
        let weights = &self.weights;
        let b: [&dyn mmc_ir::interp::Bindings; 2] = [weights, data];
        interp.run(&b[..]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The forward outputs.
    fn forward(&self, data: &BTreeMap<String, Tensor>) -> Outputs {
        self.run_on(&self.forward, data)
    }

    /// The forward outputs and `grad:<param>` of output `loss` for every parameter.
    fn gradients(&self, loss: &str, data: &BTreeMap<String, Tensor>) -> Outputs {
        let g = mmc_passes::autodiff(&self.forward, loss, |_| true).unwrap();
        self.run_on(&g, data)
    }
}

/// The tiny Qwen3-MoE of the parity fixtures with one row of `seq` tokens per micro-batch.
fn qwen_config(seq: usize, coef: Option<f64>) -> Config {
    let mut cfg = Config::load(&fixture("qwen3_moe_tiny/model.toml")).unwrap();
    cfg.train.micro_batch_size = 1;
    cfg.train.global_batch_size = 1;
    cfg.train.seq_length = seq;
    if let Some(c) = coef {
        cfg.model.text.router_aux_loss_coef = c;
    }
    cfg
}

fn qwen(seq: usize) -> Model {
    Model::new(qwen_config(seq, Some(0.0)), "qwen3_moe_tiny/checkpoint")
}

fn internvl(seq: usize, max_tiles: usize) -> Model {
    let mut cfg = Config::load(&fixture("internvl35_tiny/model_ogv.toml")).unwrap();
    cfg.train.seq_length = seq;
    cfg.train.max_tiles = max_tiles;
    cfg.model.text.router_aux_loss_coef = 0.0;
    Model::new(cfg, "internvl35_tiny/checkpoint_ogv")
}

/// Rows of the Qwen fixture's inputs as samples, cut to `len` tokens.
fn qwen_sample(row: usize, len: usize) -> Sample {
    let f = fixture("qwen3_moe_tiny/inputs.safetensors");
    let s = 24;
    let ids = read(&f, "input_ids", DType::I64).to_f64_vec();
    let labels = read(&f, "labels", DType::I64).to_f64_vec();
    let take = |v: &[f64]| {
        v[row * s..row * s + len]
            .iter()
            .map(|&x| x as i64)
            .collect()
    };
    Sample {
        ids: take(&ids),
        labels: take(&labels),
        tiles: Vec::new(),
    }
}

/// Sample A (24 tokens, 2 labelled spans) and sample B (20 tokens; its first token carries a
/// label, which only the boundary rule keeps from being trained on when B follows A).
fn qwen_samples() -> (Sample, Sample) {
    let a = qwen_sample(0, 24);
    let mut b = qwen_sample(1, 20);
    b.labels[0] = b.ids[0];
    (a, b)
}

/// The image sample of the InternVL fixture (48 tokens, 3 tiles) and its text-only sample.
fn internvl_samples() -> (Sample, Sample) {
    let i = fixture("internvl35_tiny/inputs.safetensors");
    let t = fixture("internvl35_train/zero_grad.safetensors");
    let ints = |f: &std::path::Path, n: &str| {
        read(f, n, DType::I64)
            .to_f64_vec()
            .iter()
            .map(|&x| x as i64)
            .collect()
    };
    let tiles = read(&i, "pixel_values", DType::F32)
        .to_f64_vec()
        .iter()
        .map(|&x| x as f32)
        .collect();
    let image = Sample {
        ids: ints(&i, "input_ids"),
        labels: ints(&i, "labels"),
        tiles,
    };
    let text = Sample {
        ids: ints(&t, "text_input_ids"),
        labels: ints(&t, "text_labels"),
        tiles: Vec::new(),
    };
    (image, text)
}

// ---------------------------------------------------------------------------------------------
// Independent computations

fn scalar(o: &Outputs, name: &str) -> f64 {
    o.get(name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .to_f64_vec()[0]
}

fn rel(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        a.abs()
    } else {
        (a - b).abs() / b.abs()
    }
}

/// Logits of positions `start..start + n` of row `row`, from a [batch, seq, vocab] output.
fn logits_span(o: &Outputs, row: usize, start: usize, n: usize) -> Vec<f64> {
    let l = o.get("logits").unwrap();
    let (s, v) = (l.shape()[1], l.shape()[2]);
    let all = l.to_f64_vec();
    let off = (row * s + start) * v;
    all[off..off + n * v].to_vec()
}

/// `Σ_t w[t+1] · CE(logits[t], labels[t+1])` of one row, in plain Rust from the logits.
fn weighted_ce(o: &Outputs, row: usize, labels: &[i64], w: &[f32]) -> f64 {
    let s = labels.len();
    let logits = logits_span(o, row, 0, s);
    let v = logits.len() / s;
    let mut total = 0.0;
    for t in 0..s - 1 {
        let (wt, y) = (w[t + 1] as f64, labels[t + 1]);
        if wt == 0.0 || y < 0 {
            continue;
        }
        let z = &logits[t * v..(t + 1) * v];
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        total += wt * (lse - z[y as usize]);
    }
    total
}

/// transformers' `load_balancing_loss_func` over the tokens where `keep` holds, pooled over
/// every MoE layer: `E · Σ_e f_e · P_e`, f_e = the share of (token, layer) pairs whose top-k
/// contains e, P_e = the mean router probability of e. `router_logits[layer]` is row-major
/// [tokens, experts] (of one micro-batch, or several micro-batches appended).
fn load_balancing(router_logits: &[Vec<f64>], keep: &[bool], experts: usize, k: usize) -> f64 {
    let (mut f, mut p, mut n) = (vec![0.0; experts], vec![0.0; experts], 0.0);
    for layer in router_logits {
        assert_eq!(layer.len(), keep.len() * experts);
        for (t, z) in layer.chunks(experts).enumerate() {
            if !keep[t] {
                continue;
            }
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            let probs: Vec<f64> = e.iter().map(|x| x / sum).collect();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            for &i in &order[..k] {
                f[i] += 1.0;
            }
            for (pi, q) in p.iter_mut().zip(&probs) {
                *pi += q;
            }
            n += 1.0;
        }
    }
    experts as f64
        * f.iter()
            .zip(&p)
            .map(|(a, b)| (a / n) * (b / n))
            .sum::<f64>()
}

fn router_logits(o: &Outputs, layers: usize) -> Vec<Vec<f64>> {
    (0..layers)
        .map(|l| o.get(&format!("router_logits.{l}")).unwrap().to_f64_vec())
        .collect()
}

fn grads(o: &Outputs) -> BTreeMap<String, Vec<f64>> {
    o.0.iter()
        .filter_map(|(n, t)| {
            n.strip_prefix("grad:")
                .map(|p| (p.to_string(), t.to_f64_vec()))
        })
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖a − b‖ / ‖b‖ per tensor (‖a − b‖ where b is zero); asserts each is within `tol` and
/// returns the worst with its tensor's name.
fn compare_grads(
    what: &str,
    got: &BTreeMap<String, Vec<f64>>,
    want: &BTreeMap<String, Vec<f64>>,
    tol: f64,
) -> (f64, String) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let mut worst = (0.0f64, String::new());
    for (name, w) in want {
        let g = &got[name];
        let d: Vec<f64> = g.iter().zip(w).map(|(a, b)| a - b).collect();
        let n = norm(w);
        let err = if n == 0.0 { norm(&d) } else { norm(&d) / n };
        assert!(
            err <= tol,
            "{what}: gradient of {name}: relative error {err:.3e} > {tol:e}"
        );
        if err > worst.0 || worst.1.is_empty() {
            worst = (err, name.clone());
        }
    }
    eprintln!(
        "{what}: {} gradients, worst relative error {:.3e} ({})",
        want.len(),
        worst.0,
        worst.1
    );
    worst
}

fn vec_rel(a: &[f64], b: &[f64]) -> f64 {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(b)
}

// ---------------------------------------------------------------------------------------------
// Packed against alone

/// Packs `samples` into one row of `model` (in order, positions from 0, segments 1, 2, ...) and
/// checks each sample's loss, logits and gradients against the sample alone. Returns the worst
/// (loss, gradient) relative errors.
fn check_packed_equals_alone(what: &str, model: &Model, samples: &[&Sample]) -> (f64, f64) {
    let seq = model.cfg.train.seq_length;
    let parts: Vec<(&Sample, i64, Pos)> = samples
        .iter()
        .enumerate()
        .map(|(k, s)| (*s, k as i64 + 1, Pos::Restart))
        .collect();
    let packed = pack(seq, &parts);
    let (tol, ce_tol) = match model.precision {
        Precision::F64 => (F64_TOL, F64_TOL),
        Precision::Declared => (TOL, F32_TOL),
    };
    let what = &format!("{what} ({:?})", model.precision);
    let (mut worst_loss, mut worst_grad) = (0.0f64, 0.0f64);
    let mut per_sample_ce = Vec::new();
    for (k, s) in samples.iter().enumerate() {
        let single = alone(seq, s);
        let wp = select(&packed, k);
        let ws = select(&single, 0);
        assert_eq!(
            wp.iter().sum::<f32>(),
            ws.iter().sum::<f32>(),
            "{what}: sample {k} has a different number of trained labels"
        );
        let op = model.gradients("loss", &model.batch(&[&packed], std::slice::from_ref(&wp)));
        let os = model.gradients("loss", &model.batch(&[&single], std::slice::from_ref(&ws)));
        // The loss: the graph's lm_loss and the CE from its logits, both ways.
        let (lp, ls) = (scalar(&op, "lm_loss"), scalar(&os, "lm_loss"));
        let ce_p = weighted_ce(&op, 0, &packed.labels, &wp);
        let ce_s = weighted_ce(&os, 0, &single.labels, &ws);
        assert!(rel(lp, ce_p) <= ce_tol, "{what}: lm_loss {lp} vs CE {ce_p}");
        assert!(rel(ls, ce_s) <= ce_tol, "{what}: lm_loss {ls} vs CE {ce_s}");
        let e = rel(lp, ls).max(rel(ce_p, ce_s));
        assert!(
            e <= tol,
            "{what}: sample {k}: packed loss {lp} vs alone {ls} ({e:.3e})"
        );
        worst_loss = worst_loss.max(e);
        per_sample_ce.push((ls, ws.iter().sum::<f32>() as f64));
        // The logits of the sample's positions.
        let (start, n) = packed.spans[k];
        let le = vec_rel(&logits_span(&op, 0, start, n), &logits_span(&os, 0, 0, n));
        assert!(le <= tol, "{what}: sample {k}: logits differ ({le:.3e})");
        worst_loss = worst_loss.max(le);
        let (g, _) = compare_grads(
            &format!("{what}, sample {k} packed vs alone"),
            &grads(&op),
            &grads(&os),
            tol,
        );
        worst_grad = worst_grad.max(g);
        eprintln!("{what}: sample {k}: loss {ls:.6} (relative error {e:.3e}), logits {le:.3e}");
    }
    // The library's weights for the packed row (token and sample reductions) combine the
    // per-sample losses as the reduction says.
    let rows = [LossRow {
        labels: &packed.labels,
        segment_ids: &packed.segments,
    }];
    let n_total: f64 = per_sample_ce.iter().map(|(_, n)| n).sum();
    for (reduction, want) in [
        (
            LossReduction::Token,
            per_sample_ce.iter().map(|(l, _)| l).sum::<f64>() / n_total,
        ),
        (
            LossReduction::Sample,
            per_sample_ce.iter().map(|(l, n)| l / n).sum::<f64>() / samples.len() as f64,
        ),
    ] {
        let w = loss_weights(reduction, &rows);
        let got = scalar(&model.forward(&model.batch(&[&packed], &w)), "lm_loss");
        // The weights are f32, so this agrees to f32 rounding.
        let e = rel(got, want);
        assert!(
            e <= F32_TOL,
            "{what}: {reduction:?} loss of the packed row {got} vs {want}"
        );
        eprintln!("{what}: {reduction:?}-reduced packed loss vs the samples alone: {e:.3e}");
    }
    (worst_loss, worst_grad)
}

#[test]
fn qwen3_moe_packed_samples_train_as_alone() {
    let (a, b) = qwen_samples();
    for model in [qwen(48), qwen(48).declared()] {
        for (what, s) in [("qwen3-moe A+B", [&a, &b]), ("qwen3-moe B+A", [&b, &a])] {
            let (l, g) = check_packed_equals_alone(what, &model, &s);
            eprintln!(
                "{what} ({:?}): worst loss/logits error {l:.3e}, worst gradient error {g:.3e}",
                model.precision
            );
        }
    }
}

#[test]
fn qwen3_moe_packed_samples_do_not_attend_to_each_other() {
    let seq = 48;
    let model = qwen(seq);
    let (a, b) = qwen_samples();
    let mut a2 = a.clone();
    for (i, id) in a2.ids.iter_mut().enumerate() {
        *id = (*id + 37 * (i as i64 + 1)) % 1000;
    }
    // B's loss (weights on B only) and B's logits, for a row.
    let b_of = |row: &Row| {
        let o = model.forward(&model.batch(&[row], &[select(row, 1)]));
        let (start, n) = row.spans[1];
        (scalar(&o, "lm_loss"), logits_span(&o, 0, start, n))
    };
    let parts =
        |a: &Sample, seg_b: i64| pack(seq, &[(a, 1, Pos::Restart), (&b, seg_b, Pos::Restart)]);
    let (l1, z1) = b_of(&parts(&a, 2));
    let (l2, z2) = b_of(&parts(&a2, 2));
    assert_eq!(l1, l2, "changing A changed B's loss");
    assert!(z1 == z2, "changing A changed B's logits");
    let r = alone(seq, &b);
    let l_alone = scalar(
        &model.forward(&model.batch(&[&r], &[select(&r, 0)])),
        "lm_loss",
    );
    assert_eq!(l1, l_alone);
    eprintln!("B's loss packed {l1} / after changing A {l2} / alone {l_alone}: identical");
    // One segment for both: B sees A, so the same change moves B's loss and logits.
    let (m1, y1) = b_of(&parts(&a, 1));
    let (m2, y2) = b_of(&parts(&a2, 1));
    let (dl, dz) = (rel(m2, m1), vec_rel(&y2, &y1));
    assert!(
        dl > VISIBLE && dz > VISIBLE,
        "without segment separation A does not reach B (loss {dl:.2e}, logits {dz:.2e})"
    );
    eprintln!("one segment for A and B: changing A moves B's loss by {dl:.3e}, logits {dz:.3e}");
    // The gradient comparison sees it too: with one segment, B's gradients are not B's alone.
    let merged = parts(&a, 1);
    let single = alone(seq, &b);
    let gm = grads(&model.gradients("loss", &model.batch(&[&merged], &[select(&merged, 1)])));
    let gs = grads(&model.gradients("loss", &model.batch(&[&single], &[select(&single, 0)])));
    let mut worst = (0.0f64, "");
    for (n, w) in gs.iter().filter(|(_, w)| norm(w) > 0.0) {
        let e = vec_rel(&gm[n], w);
        if e > worst.0 {
            worst = (e, n.as_str());
        }
    }
    let (worst, name) = worst;
    assert!(
        worst > VISIBLE,
        "one segment: B's gradients match B alone ({worst:.2e})"
    );
    eprintln!(
        "one segment for A and B: B's gradients differ from B alone by up to {worst:.3e} ({name})"
    );
}

#[test]
fn qwen3_moe_positions_and_the_boundary_label() {
    let seq = 48;
    let model = qwen(seq);
    let (a, b) = qwen_samples();
    // B's loss (weights `w`) and the logits of B's positions.
    let b_of = |row: &Row, w: Vec<f32>| {
        let o = model.forward(&model.batch(&[row], &[w]));
        let (start, n) = *row.spans.last().unwrap();
        (scalar(&o, "lm_loss"), logits_span(&o, 0, start, n))
    };
    let b_loss = |row: &Row, w: Vec<f32>| b_of(row, w).0;
    let single = alone(seq, &b);
    let (want, want_logits) = b_of(&single, select(&single, 0));
    let row = |pos: Pos| pack(seq, &[(&a, 1, Pos::Restart), (&b, 2, pos)]);
    let restarted = row(Pos::Restart);
    let (l, z) = b_of(&restarted, select(&restarted, 1));
    assert!(l == want && z == want_logits, "B packed is not B alone");
    // Not restarted: RoPE depends only on position differences inside B, so B's logits are the
    // same up to rounding of the larger angles, but not bit-identical (the positions are used).
    let cont = row(Pos::Continue);
    assert_eq!(cont.positions[a.len()], a.len() as i64);
    let (l, z) = b_of(&cont, select(&cont, 1));
    let (el, ez) = (rel(l, want), vec_rel(&z, &want_logits));
    assert!(
        ez > 0.0 && ez < 1e-12 && el < 1e-12,
        "positions continuing from A: B's loss moved by {el:.3e}, its logits by {ez:.3e}"
    );
    eprintln!(
        "B's positions continuing from A (RoPE is relative): loss moves by {el:.3e}, logits by {ez:.3e}"
    );
    // Restarted one token late: the distances inside B change, and so does its loss.
    let late = row(Pos::LateRestart);
    let e = rel(b_loss(&late, select(&late, 1)), want);
    assert!(e > VISIBLE, "a late restart left B's loss at {e:.3e}");
    eprintln!("B's positions restarted one token late: loss moves by {e:.3e}");
    // B's first label would be predicted from A's last token: the library's weights leave it
    // out, and weighting it changes B's loss.
    let w = loss_weights(
        LossReduction::Token,
        &[LossRow {
            labels: &restarted.labels,
            segment_ids: &restarted.segments,
        }],
    );
    assert_eq!(w[0][a.len()], 0.0, "the boundary label is weighted");
    let e = rel(
        b_loss(&restarted, select_with_boundary(&restarted, 1)),
        want,
    );
    assert!(
        e > VISIBLE,
        "weighting the boundary label moved B's loss by only {e:.3e}"
    );
    eprintln!("weighting B's first label (predicted from A): loss moves by {e:.3e}");
}

#[test]
fn internvl_packed_image_and_text_samples_train_as_alone() {
    let (image, text) = internvl_samples();
    for model in [internvl(100, 4), internvl(100, 4).declared()] {
        for (what, s) in [
            ("internvl image+text", [&image, &text]),
            ("internvl text+image", [&text, &image]),
        ] {
            let (l, g) = check_packed_equals_alone(what, &model, &s);
            eprintln!(
                "{what} ({:?}): worst loss/logits error {l:.3e}, worst gradient error {g:.3e}",
                model.precision
            );
        }
    }
}

#[test]
fn internvl_two_packed_images_keep_their_tiles() {
    let (image, _) = internvl_samples();
    // A second image sample: the same chat with its tiles in reverse order.
    let mut other = image.clone();
    other.tiles = image
        .tiles
        .chunks(TILE_LEN)
        .rev()
        .flat_map(|t| t.to_vec())
        .collect();
    let what = "internvl image+image";
    for model in [internvl(100, 6).declared(), internvl(100, 6)] {
        let (l, g) = check_packed_equals_alone(what, &model, &[&image, &other]);
        eprintln!(
            "{what} ({:?}): worst loss/logits error {l:.3e}, worst gradient error {g:.3e}",
            model.precision
        );
    }
    let model = internvl(100, 6);
    // Each sample's loss depends on which tiles it gets: with the slots of the two samples
    // swapped both losses change; with A's image changed, B's loss is bit-identical.
    let packed = pack(100, &[(&image, 1, Pos::Restart), (&other, 2, Pos::Restart)]);
    let losses = |row: &Row| -> Vec<f64> {
        (0..2)
            .map(|k| {
                scalar(
                    &model.forward(&model.batch(&[row], &[select(row, k)])),
                    "lm_loss",
                )
            })
            .collect()
    };
    let base = losses(&packed);
    let mut swapped = packed.clone();
    swapped.tiles = [&packed.tiles[3 * TILE_LEN..], &packed.tiles[..3 * TILE_LEN]].concat();
    let sw = losses(&swapped);
    for k in 0..2 {
        let e = rel(sw[k], base[k]);
        assert!(
            e > VISIBLE,
            "sample {k}: swapped tile slots moved its loss by only {e:.3e}"
        );
        eprintln!("sample {k}: tile slots swapped: loss moves by {e:.3e}");
    }
    let mut changed = packed.clone();
    for x in &mut changed.tiles[..3 * TILE_LEN] {
        *x = -*x;
    }
    let ch = losses(&changed);
    assert_eq!(ch[1], base[1], "changing A's image changed B's loss");
    assert!(rel(ch[0], base[0]) > VISIBLE);
    // One segment for both: B sees A's image through attention.
    let mut merged = packed.clone();
    merged
        .segments
        .iter_mut()
        .for_each(|s| *s = (*s != 0) as i64);
    let mut merged_changed = changed.clone();
    merged_changed.segments = merged.segments.clone();
    let e = rel(losses(&merged_changed)[1], losses(&merged)[1]);
    assert!(
        e > VISIBLE,
        "one segment: A's image moved B's loss by only {e:.3e}"
    );
    eprintln!("A's image negated: B's loss identical; with one segment it moves by {e:.3e}");
}

// ---------------------------------------------------------------------------------------------
// The load-balancing loss under gradient accumulation

/// Runs the plan's micro-step program over `micro_batches` in F64, starting from zero
/// accumulators, as the trainer does; returns the accumulated gradients and each micro-batch's
/// outputs.
fn accumulate(
    plan: &Plan,
    params: &BTreeMap<String, Tensor>,
    micro_batches: &[BTreeMap<String, Tensor>],
) -> (BTreeMap<String, Vec<f64>>, Vec<Outputs>) {
    let program = plan.program("micro_step").unwrap();
    // The program reads each MoE layer's experts as stacks (`plan.stackings`): the parameters
    // are stacked for it, and its stacked accumulators are read back per expert at the end.
    let mut params = params.clone();
    for st in &plan.stackings {
        let parts: Option<Vec<&Tensor>> = st.parts.iter().map(|p| params.get(&p.name)).collect();
        if let Some(parts) = parts {
            let stacked = st.stack(&parts).unwrap();
            params.insert(st.stacked.clone(), stacked);
        }
    }
    let mut acc: BTreeMap<String, Tensor> = program
        .graph
        .inputs()
        .filter(|(n, _, _)| n.starts_with("grad_acc:"))
        .map(|(n, ty, _)| {
            (
                n.to_string(),
                Tensor::from_f64(DType::F64, ty.shape.clone(), &vec![0.0; ty.numel()]).unwrap(),
            )
        })
        .collect();
    let interp = Interpreter::new(&program.graph, Precision::F64).unwrap();
    let mut outs = Vec::new();
    for mb in micro_batches {
        let b: [&dyn mmc_ir::interp::Bindings; 3] = [&params, &acc, mb];
        let out = interp.run(&b[..]).unwrap_or_else(|e| panic!("{e}"));
        for u in &program.updates {
            acc.insert(u.state.clone(), out.get(&u.output).unwrap().clone());
        }
        outs.push(out);
    }
    for st in &plan.stackings {
        if let Some(stacked) = acc.remove(&st.stacked) {
            // The program ran in f64, so its accumulators are f64 stacks.
            let mut st = st.clone();
            st.ty = st.ty.with_dtype(DType::F64);
            for (i, p) in st.parts.iter().enumerate() {
                acc.insert(p.name.clone(), st.read_part(&stacked, i).unwrap());
            }
        }
    }
    let g = acc
        .into_iter()
        .map(|(n, t)| {
            (
                n.strip_prefix("grad_acc:").unwrap().to_string(),
                t.to_f64_vec(),
            )
        })
        .collect();
    (g, outs)
}

fn add_scaled(acc: &mut BTreeMap<String, Vec<f64>>, g: &BTreeMap<String, Vec<f64>>, s: f64) {
    for (n, v) in g {
        let a = acc.entry(n.clone()).or_insert_with(|| vec![0.0; v.len()]);
        a.iter_mut().zip(v).for_each(|(x, y)| *x += s * y);
    }
}

fn dot(a: &BTreeMap<String, Vec<f64>>, b: &BTreeMap<String, Vec<f64>>) -> f64 {
    a.iter()
        .map(|(n, v)| v.iter().zip(&b[n]).map(|(x, y)| x * y).sum::<f64>())
        .sum()
}

#[test]
fn aux_loss_under_gradient_accumulation() {
    let seq = 48;
    // Two micro-batches of one row per step: grad_accum_steps 2, dp 1, the checkpoint's
    // router_aux_loss_coef (0.05).
    let mut cfg = qwen_config(seq, None);
    cfg.train.global_batch_size = 2;
    cfg.train.clip_grad = 0.0;
    let coef = cfg.model.text.router_aux_loss_coef;
    assert_eq!(coef, 0.05);
    let plan = compile_plan(&cfg).unwrap();
    assert_eq!(plan.settings.grad_accum_steps, 2);
    let accum = 2.0;
    let t = &cfg.model.text;
    let (layers, experts, topk) = (t.num_hidden_layers, t.num_experts, t.num_experts_per_tok);
    let model = Model::new(cfg.clone(), "qwen3_moe_tiny/checkpoint");

    // Micro-batch 1 packs A and B (4 padding tokens); micro-batch 2 holds C (24 padding tokens).
    let (a, b) = qwen_samples();
    let c = qwen_sample(1, 24);
    let r1 = pack(seq, &[(&a, 1, Pos::Restart), (&b, 2, Pos::Restart)]);
    let r2 = alone(seq, &c);
    let rows = [&r1, &r2];
    let w = loss_weights(
        LossReduction::Token,
        &rows
            .iter()
            .map(|r| LossRow {
                labels: &r.labels,
                segment_ids: &r.segments,
            })
            .collect::<Vec<_>>(),
    );
    let mbs: Vec<_> = (0..2)
        .map(|m| model.batch(&[rows[m]], &[w[m].clone()]))
        .collect();

    // The definition, per micro-batch, from the router logits and logits of the forward graph.
    let keep = |r: &Row| -> Vec<bool> { r.segments.iter().map(|&s| s != 0).collect() };
    let mut aux = Vec::new();
    let mut aux_with_padding = Vec::new();
    let mut lm = Vec::new();
    let mut all_logits = vec![Vec::new(); layers];
    let mut all_keep = Vec::new();
    for (m, mb) in mbs.iter().enumerate() {
        let o = model.forward(mb);
        let z = router_logits(&o, layers);
        let x = load_balancing(&z, &keep(rows[m]), experts, topk);
        let e = rel(scalar(&o, "aux_loss"), x);
        assert!(
            e <= 1e-12,
            "micro-batch {m}: graph aux_loss vs definition {e:.3e}"
        );
        aux_with_padding.push(load_balancing(&z, &vec![true; seq], experts, topk));
        aux.push(x);
        lm.push(weighted_ce(&o, 0, &rows[m].labels, &w[m]));
        for (l, zl) in z.into_iter().enumerate() {
            all_logits[l].extend(zl);
        }
        all_keep.extend(keep(rows[m]));
    }
    let aux_mean = aux.iter().sum::<f64>() / accum;
    let aux_pooled = load_balancing(&all_logits, &all_keep, experts, topk);
    let aux_pad_mean = aux_with_padding.iter().sum::<f64>() / accum;
    let lm_sum: f64 = lm.iter().sum();
    eprintln!(
        "aux per micro-batch {:.6} {:.6}, mean {aux_mean:.6}; pooled {aux_pooled:.6}; counting padding {aux_pad_mean:.6}",
        aux[0], aux[1]
    );
    assert!(rel(aux_pooled, aux_mean) > VISIBLE);
    assert!(rel(aux_pad_mean, aux_mean) > VISIBLE);

    // What the trainer reports (f32 programs).
    let mut trainer = Trainer::new(plan.clone()).unwrap();
    let params = trainer.parameters();
    let mbs_rt: Vec<MicroBatch> = mbs.iter().map(|m| MicroBatch(m.clone())).collect();
    let out = trainer.train_step(&mbs_rt, 1e-3).unwrap();
    let want_loss = lm_sum + coef * aux_mean;
    for (what, got, want) in [
        ("aux_loss", out.aux_loss, aux_mean),
        ("lm_loss", out.lm_loss, lm_sum),
        ("loss", out.loss, want_loss),
    ] {
        let e = rel(got, want);
        assert!(e <= F32_TOL, "reported {what} {got} vs {want} ({e:.3e})");
        eprintln!("reported {what} {got:.8} vs the definition {want:.8}: {e:.3e}");
    }
    let e = rel(out.aux_loss, aux_pooled);
    assert!(
        e > 10.0 * F32_TOL,
        "the reported aux loss is the pooled one"
    );
    let e = rel(out.aux_loss, aux_pad_mean);
    assert!(e > 10.0 * F32_TOL, "the reported aux loss counts padding");

    // The accumulated gradients, against Σ_m (∇lm_m + coef / accum · ∇aux_m) from the forward
    // graph's two outputs.
    let (acc, outs) = accumulate(&plan, &params, &mbs);
    for (m, o) in outs.iter().enumerate() {
        assert!(rel(scalar(o, "aux_loss"), aux[m]) <= 1e-12);
        assert!(rel(scalar(o, "loss"), lm[m] + coef / accum * aux[m]) <= 1e-12);
    }
    let mut want = BTreeMap::new();
    let mut lm_only = BTreeMap::new();
    for mb in &mbs {
        let gl = grads(&model.gradients("lm_loss", mb));
        let ga = grads(&model.gradients("aux_loss", mb));
        add_scaled(&mut want, &gl, 1.0);
        add_scaled(&mut want, &ga, coef / accum);
        add_scaled(&mut lm_only, &gl, 1.0);
    }
    compare_grads("accumulated gradients", &acc, &want, 1e-10);
    let total: f64 = want
        .values()
        .map(|v| v.iter().map(|x| x * x).sum::<f64>())
        .sum();
    let e = rel(out.grad_norm, total.sqrt());
    assert!(
        e <= F32_TOL,
        "grad_norm {} vs {}",
        out.grad_norm,
        total.sqrt()
    );
    eprintln!("reported grad_norm vs the definition: {e:.3e}");

    // One micro-batch of both rows: the same lm gradients (a plain sum), but its aux loss pools
    // the tokens of both, so it is another number with another gradient.
    let mut big_cfg = cfg.clone();
    big_cfg.train.micro_batch_size = 2;
    let big = Model::new(big_cfg, "qwen3_moe_tiny/checkpoint");
    let big_mb = big.batch(&rows, &w);
    let go = big.gradients("lm_loss", &big_mb);
    compare_grads(
        "lm gradients, one bigger micro-batch",
        &grads(&go),
        &lm_only,
        1e-10,
    );
    let e = rel(scalar(&go, "aux_loss"), aux_pooled);
    assert!(
        e <= 1e-12,
        "pooled aux loss of the bigger micro-batch: {e:.3e}"
    );
    let ga_big = grads(&big.gradients("aux_loss", &big_mb));
    let mut aux_acc = BTreeMap::new();
    for mb in &mbs {
        add_scaled(
            &mut aux_acc,
            &grads(&model.gradients("aux_loss", mb)),
            1.0 / accum,
        );
    }
    let gate = "model.layers.1.mlp.gate.weight";
    let e = vec_rel(&ga_big[gate], &aux_acc[gate]);
    assert!(
        e > VISIBLE,
        "{gate}: pooled and accumulated aux gradients agree ({e:.2e})"
    );
    eprintln!("{gate}: aux gradient of one bigger micro-batch vs accumulated: {e:.3e} apart");

    // A finite difference of the plain-Rust definition confirms the aux part of the
    // accumulated gradient: with zero loss weights the micro-steps accumulate coef / accum ·
    // Σ_m ∇aux_m only; compare its directional derivative along a fixed direction over every
    // parameter with a central difference of the definition, and of the two wrong ones.
    let zero_w: Vec<_> = (0..2)
        .map(|m| model.batch(&[rows[m]], &[vec![0.0; seq]]))
        .collect();
    let (g_aux, _) = accumulate(&plan, &params, &zero_w);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let dir: BTreeMap<String, Vec<f64>> = params
        .iter()
        .map(|(n, t)| {
            let v = (0..t.numel())
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
                })
                .collect();
            (n.clone(), v)
        })
        .collect();
    let h = 1e-6;
    // (definition, pooled, counting padding) at parameters + s·h·dir.
    let objectives = |s: f64| -> [f64; 3] {
        let mut m = Model {
            cfg: model.cfg.clone(),
            forward: model.forward.clone(),
            weights: BTreeMap::new(),
            precision: Precision::F64,
        };
        for (n, t) in &params {
            let v: Vec<f64> = t
                .to_f64_vec()
                .iter()
                .zip(&dir[n])
                .map(|(x, d)| x + s * h * d)
                .collect();
            m.weights.insert(
                n.clone(),
                Tensor::from_f64(DType::F64, t.shape().to_vec(), &v).unwrap(),
            );
        }
        let (mut def, mut pad) = (0.0, 0.0);
        let mut pooled = vec![Vec::new(); layers];
        for (k, mb) in zero_w.iter().enumerate() {
            let z = router_logits(&m.forward(mb), layers);
            def += load_balancing(&z, &keep(rows[k]), experts, topk);
            pad += load_balancing(&z, &vec![true; seq], experts, topk);
            for (l, zl) in z.into_iter().enumerate() {
                pooled[l].extend(zl);
            }
        }
        let pooled = load_balancing(&pooled, &all_keep, experts, topk);
        [coef / accum * def, coef * pooled, coef / accum * pad]
    };
    let (plus, minus) = (objectives(1.0), objectives(-1.0));
    let fd: Vec<f64> = (0..3).map(|i| (plus[i] - minus[i]) / (2.0 * h)).collect();
    let analytic = dot(&g_aux, &dir);
    let e = rel(analytic, fd[0]);
    eprintln!(
        "aux directional derivative: accumulated {analytic:.10e}, definition (FD) {:.10e} ({e:.3e}); pooled {:.6e}, counting padding {:.6e}",
        fd[0], fd[1], fd[2]
    );
    assert!(
        e <= 1e-6,
        "accumulated aux gradient vs FD of the definition: {e:.3e}"
    );
    assert!(
        rel(analytic, fd[1]) > VISIBLE,
        "matches the pooled definition too"
    );
    assert!(
        rel(analytic, fd[2]) > VISIBLE,
        "matches the padding-counting definition too"
    );
}
