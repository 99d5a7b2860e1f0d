//! What the fusion tests of attention and the fused cross-entropy share: running the pass,
//! seeded bindings, the interpreter on both graphs, looking for fused nodes, and the
//! tiny-model forward graphs with a packed batch.

#![allow(dead_code)]

use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::plan::Init;
use mmc_ir::{verify, DType, FusedOp, Graph, Interpreter, Node, Op, Precision, Stage, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// The graph after the fusion pass with its default limits, checked by the verifier; every
/// saturation must reach its fixpoint (a node or time limit would hide missed fusions).
pub fn fused(g: &Graph) -> Graph {
    fused_report(g).0
}

/// [`fused`] with the pass's report (which rules fired, how often).
pub fn fused_report(g: &Graph) -> (Graph, mmc_passes::fuse::FuseReport) {
    let (out, report) = mmc_passes::fuse::fuse(g, &mmc_passes::fuse::FuseLimits::default())
        .expect("the fusion pass runs");
    verify(&out).expect("the fused graph verifies");
    assert_eq!(out.stage, Stage::Fused);
    assert!(report.saturated(), "a saturation stopped early:\n{report}");
    (out, report)
}

/// The fused graph, checked to have applied rule `rule`.
pub fn fused_by(g: &Graph, rule: &str) -> Graph {
    let (out, report) = fused_report(g);
    assert!(
        report.rule_applications.get(rule).is_some_and(|&n| n > 0),
        "rule `{rule}` did not fire:\n{report}"
    );
    out
}

/// The nodes of `g` whose op is the fused op named `name` (`fused.attention`).
pub fn fused_nodes<'g>(g: &'g Graph, name: &str) -> Vec<&'g Node> {
    g.nodes()
        .iter()
        .filter(|n| matches!(&n.op, Op::Fused(f) if f.name() == name))
        .collect()
}

/// The fused op of a node known to be fused.
pub fn fused_op(n: &Node) -> &FusedOp {
    match &n.op {
        Op::Fused(f) => f,
        other => panic!("`{}` is not a fused op", other.name()),
    }
}

/// How many nodes of `g` that an output needs are the op named `name` (dead nodes do not
/// count: whether a pass removes them is another matter).
pub fn count_live(g: &Graph, name: &str) -> usize {
    let mut live = vec![false; g.nodes().len()];
    let mut stack: Vec<mmc_ir::Value> = g.outputs().iter().map(|(_, v)| *v).collect();
    while let Some(v) = stack.pop() {
        let n = g.value_data(v).expect("a value of g").node;
        if !std::mem::replace(&mut live[n.0 as usize], true) {
            stack.extend(g.node(n).inputs.iter().copied());
        }
    }
    g.nodes()
        .iter()
        .zip(live)
        .filter(|(n, l)| *l && n.op.name() == name)
        .count()
}

/// How many nodes of `g` are the op named `name`.
pub fn count(g: &Graph, name: &str) -> usize {
    g.nodes().iter().filter(|n| n.op.name() == name).count()
}

/// The largest number of elements of any activation of `g`: every value but the parameters
/// and their compute-dtype casts (weights are not what fusion keeps small).
pub fn largest_activation(g: &Graph) -> usize {
    let is_param = |v: mmc_ir::Value| {
        let node = g.node(g.value_data(v).expect("a value of g").node);
        matches!(node.op, Op::Param { .. })
    };
    g.nodes()
        .iter()
        .filter(|n| match n.op {
            Op::Param { .. } => false,
            Op::Cast { .. } => !is_param(n.inputs[0]),
            _ => true,
        })
        .flat_map(|n| n.outputs.iter())
        .map(|&v| g.ty(v).numel())
        .max()
        .unwrap_or(0)
}

/// Random values (uniform in [-scale, scale]) for every float parameter and input of `g`
/// that `fixed` does not bind.
pub fn bind_floats(
    g: &Graph,
    seed: u64,
    scale: f64,
    mut fixed: HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let leaves: Vec<(String, mmc_ir::TensorType)> = g
        .params()
        .chain(g.inputs())
        .map(|(n, t, _)| (n.to_string(), t.clone()))
        .collect();
    for (name, ty) in leaves {
        if fixed.contains_key(&name) || !ty.dtype.is_float() {
            continue;
        }
        let vals: Vec<f64> = (0..ty.numel())
            .map(|_| rng.random_range(-scale..=scale))
            .collect();
        let t = Tensor::from_f64(ty.dtype, ty.shape.clone(), &vals).expect("sized to the type");
        fixed.insert(name, t);
    }
    fixed
}

/// The named output of one interpreter run of `g` (declared precision).
pub fn run(g: &Graph, bindings: &HashMap<String, Tensor>, output: &str) -> Tensor {
    let outs = Interpreter::new(g, Precision::Declared)
        .expect("the graph verifies")
        .run(bindings)
        .expect("the graph runs");
    outs.get(output)
        .unwrap_or_else(|| panic!("no output `{output}`"))
        .clone()
}

/// The largest elementwise difference relative to the largest magnitude of `want`, and
/// whether both have the same NaN positions.
pub fn max_rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
    assert_eq!(a.len(), b.len(), "the results have different sizes");
    let norm = b
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                (x - y).abs() / norm
            }
        })
        .fold(0.0, f64::max)
}

/// An i64 tensor.
pub fn ints(shape: &[usize], vals: &[i64]) -> Tensor {
    let f: Vec<f64> = vals.iter().map(|&v| v as f64).collect();
    Tensor::from_f64(DType::I64, shape.to_vec(), &f).expect("sized to the shape")
}

/// Segment ids of two packed samples and padding for one row of `seq` tokens: sample 1 on
/// the first ~40%, sample 2 up to ~85%, padding (0) after.
pub fn packed_segments(seq: usize) -> Vec<i64> {
    let a = (seq * 2 / 5).max(1);
    let b = (seq * 17 / 20).max(a + 1).min(seq);
    (0..seq)
        .map(|i| {
            if i < a {
                1
            } else if i < b {
                2
            } else {
                0
            }
        })
        .collect()
}

/// A tiny model config from `configs/`, with a short sequence and few tiles.
pub fn tiny_config(file: &str, seq: usize, tiles: usize) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("configs")
        .join(file);
    let mut cfg = Config::load(&path).expect("the tiny config loads");
    cfg.train.seq_length = seq;
    cfg.train.max_tiles = tiles;
    cfg
}

/// The forward graph of `cfg` with seeded weights (normal inits become uniform with the
/// init's variance, widened to at least 0.1 so attention is not flat; constant inits get a
/// small perturbation) and a batch of two packed samples plus padding.
pub fn model_case(cfg: &Config, logits: bool, seed: u64) -> (Graph, HashMap<String, Tensor>) {
    let model = forward_graph(
        cfg,
        ForwardOptions {
            logits,
            ..Default::default()
        },
    )
    .expect("the tiny model declares");
    let g = model.graph;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut b: HashMap<String, Tensor> = HashMap::new();
    for (name, ty, _) in g.params() {
        let init = model.inits.get(name).cloned().unwrap_or(Init::Const(0.0));
        let vals: Vec<f64> = (0..ty.numel())
            .map(|_| match init {
                Init::Normal { std } => {
                    let a = 3f64.sqrt() * std.max(0.1);
                    rng.random_range(-a..=a)
                }
                Init::Const(c) => c + rng.random_range(-0.1..=0.1),
                _ => rng.random_range(-0.1..=0.1),
            })
            .collect();
        b.insert(
            name.to_string(),
            Tensor::from_f64(ty.dtype, ty.shape.clone(), &vals).expect("sized"),
        );
    }
    let (bs, seq) = (cfg.train.micro_batch_size, cfg.train.seq_length);
    let vocab = cfg.model.text.vocab_size as i64;
    let seg_row = packed_segments(seq);
    let (mut ids, mut pos, mut seg, mut labels, mut weights) =
        (vec![], vec![], vec![], vec![], vec![]);
    let img_rows = cfg
        .model
        .vision_language
        .as_ref()
        .map_or(0, |vl| vl.tokens_per_tile() * cfg.train.max_tiles);
    for _ in 0..bs {
        let mut p = 0;
        for i in 0..seq {
            let s = seg_row[i];
            if i > 0 && s != seg_row[i - 1] {
                p = 0;
            }
            // The first sample starts with the image tokens (InternVL only).
            let id = if i >= 1 && i <= img_rows {
                cfg.model.img_context_token_id
            } else {
                rng.random_range(0..vocab.min(151_000))
            };
            ids.push(if s == 0 { 0 } else { id });
            pos.push(if s == 0 { 0 } else { p });
            p += 1;
            seg.push(s);
            let ignored = s == 0 || id == cfg.model.img_context_token_id || i % 7 == 3;
            labels.push(if ignored { -100 } else { id });
        }
    }
    let valid = labels.iter().filter(|&&l| l >= 0).count().max(1);
    for &l in &labels {
        weights.push(if l >= 0 { 1.0 / valid as f64 } else { 0.0 });
    }
    let shape = [bs, seq];
    b.insert("input_ids".into(), ints(&shape, &ids));
    b.insert("position_ids".into(), ints(&shape, &pos));
    b.insert("segment_ids".into(), ints(&shape, &seg));
    b.insert("labels".into(), ints(&shape, &labels));
    b.insert(
        "loss_weights".into(),
        Tensor::from_f64(DType::F32, shape.to_vec(), &weights).expect("sized"),
    );
    if let Some((_, ty, _)) = g.inputs().find(|(n, _, _)| *n == "pixel_values") {
        let vals: Vec<f64> = (0..ty.numel())
            .map(|_| rng.random_range(-1.0..=1.0))
            .collect();
        b.insert(
            "pixel_values".into(),
            Tensor::from_f64(ty.dtype, ty.shape.clone(), &vals).expect("sized"),
        );
    }
    (g, b)
}

/// The `; check:` / `; not:` directives of a file test, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Directive {
    /// The text must occur after the previous match.
    Check(String),
    /// The text must not occur anywhere in the output.
    Not(String),
}

/// The cases of a `.mmcir` file test: each `graph` block with the directives after it.
pub fn file_cases(text: &str) -> Vec<(String, Vec<Directive>)> {
    let mut cases: Vec<(String, Vec<Directive>)> = Vec::new();
    let mut graph: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("graph ") {
            graph = Some(String::new());
        }
        if let Some(gtext) = graph.as_mut() {
            gtext.push_str(line);
            gtext.push('\n');
            if t == "}" {
                cases.push((graph.take().expect("in a graph"), Vec::new()));
            }
            continue;
        }
        let directive = if let Some(rest) = t.strip_prefix("; check:") {
            Directive::Check(rest.trim().to_string())
        } else if let Some(rest) = t.strip_prefix("; not:") {
            Directive::Not(rest.trim().to_string())
        } else {
            continue;
        };
        if let Some(last) = cases.last_mut() {
            last.1.push(directive);
        }
    }
    cases
}

/// Checks the directives against `out`; the error names the first that fails.
pub fn check_directives(out: &str, directives: &[Directive]) -> Result<(), String> {
    let mut at = 0;
    for d in directives {
        match d {
            Directive::Check(s) => match out[at..].find(s.as_str()) {
                Some(i) => at += i + s.len(),
                None => return Err(format!("`; check: {s}` not found after offset {at}")),
            },
            Directive::Not(s) => {
                if out.contains(s.as_str()) {
                    return Err(format!("`; not: {s}` occurs in the output"));
                }
            }
        }
    }
    Ok(())
}

/// Seeded values for every parameter and input of a file-test graph: segment ids (any i64
/// input whose name ends in `_ids`) as two packed samples and padding per row, other integers
/// in 0..5 (valid indices for the small vocabularies of the file tests), bools alternating,
/// floats uniform in [-2, 2].
pub fn file_bindings(g: &Graph) -> HashMap<String, Tensor> {
    let mut fixed = HashMap::new();
    for (name, ty, _) in g.params().chain(g.inputs()) {
        let n = ty.numel();
        let t = match ty.dtype {
            DType::I64 if name.ends_with("_ids") && ty.rank() == 2 => {
                let row = packed_segments(ty.shape[1]);
                let mut v: Vec<i64> = (0..ty.shape[0]).flat_map(|_| row.clone()).collect();
                if name != "segment_ids" {
                    v.iter_mut().for_each(|x| *x = (*x + 1) % 3);
                }
                ints(&ty.shape, &v)
            }
            DType::I64 => ints(
                &ty.shape,
                &(0..n as i64).map(|i| (i * 7 + 3) % 5).collect::<Vec<_>>(),
            ),
            DType::Bool => {
                let v: Vec<f64> = (0..n).map(|i| f64::from(u8::from(i % 3 != 1))).collect();
                Tensor::from_f64(DType::Bool, ty.shape.clone(), &v).expect("sized")
            }
            _ => continue,
        };
        fixed.insert(name.to_string(), t);
    }
    bind_floats(g, 5, 2.0, fixed)
}

/// Runs the `; test fuse` file `path` (relative to `passes/tests/filetests/`): each graph is
/// parsed, fused and printed; the printed text must satisfy the case's directives, and every
/// output must match the unfused graph's within 1e-5 (1e-2 in bf16) on seeded inputs.
pub fn run_file_test(path: &str) {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/filetests")
        .join(path);
    let text = std::fs::read_to_string(&full).expect("the file test exists");
    assert!(
        text.starts_with("; test fuse"),
        "{path}: the first line names the subtest"
    );
    let cases = file_cases(&text);
    assert!(!cases.is_empty(), "{path}: no graph");
    for (i, (src, directives)) in cases.iter().enumerate() {
        let g = mmc_ir::text::parse(src).unwrap_or_else(|e| panic!("{path} case {i}: {e}"));
        verify(&g).unwrap_or_else(|e| panic!("{path} case {i}: {e}"));
        let f = fused(&g);
        let out = mmc_ir::text::print(&f);
        if let Err(e) = check_directives(&out, directives) {
            panic!("{path} case {i}: {e}\n--- output ---\n{out}");
        }
        let b = file_bindings(&g);
        for (name, _) in g.outputs() {
            let (want, got) = (run(&g, &b, name), run(&f, &b, name));
            let tol = if want.dtype() == DType::BF16 {
                1e-2
            } else {
                1e-5
            };
            let diff = max_rel_diff(&got, &want);
            assert!(diff <= tol, "{path} case {i}: `{name}` differs by {diff:e}");
        }
    }
}
