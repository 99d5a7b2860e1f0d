//! Tests of the whole pass on the model graphs: the tiny InternVL3.5 computes the same loss
//! fused and unfused, holds the fused ops, and never hits the node limit.

use super::{fuse, FuseLimits};
use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::{verify, DType, Graph, Interpreter, Precision, Stage, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// A config of the repository's `configs/` folder.
pub(crate) fn config(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name);
    Config::load(&path).expect("the repository's configs load")
}

/// The tiny InternVL3.5 forward graph with `seq` tokens.
fn tiny_graph(seq: usize) -> (Config, Graph) {
    let mut cfg = config("internvl35-tiny.toml");
    cfg.train.seq_length = seq;
    let g = forward_graph(&cfg, ForwardOptions::default())
        .expect("the tiny model declares")
        .graph;
    (cfg, g)
}

/// Seeded bindings for every parameter and input of the tiny model: small weights, token
/// ids with a few `<IMG_CONTEXT>` tokens, positions, two packed samples.
fn bindings(cfg: &Config, g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let seq = cfg.train.seq_length;
    let vocab = cfg.model.text.vocab_size as i64;
    let img = cfg.model.img_context_token_id;
    let mut out = HashMap::new();
    for (name, ty, _) in g.params().chain(g.inputs()) {
        let n = ty.numel();
        let vals: Vec<f64> = match name {
            "input_ids" => (0..n)
                .map(|i| {
                    if (2..6).contains(&i) {
                        img as f64
                    } else {
                        rng.random_range(0..vocab) as f64
                    }
                })
                .collect(),
            "labels" => (0..n)
                .map(|i| {
                    if i % 5 == 0 {
                        -100.0
                    } else {
                        rng.random_range(0..vocab) as f64
                    }
                })
                .collect(),
            "position_ids" => (0..n).map(|i| (i % (seq / 2).max(1)) as f64).collect(),
            "segment_ids" => (0..n)
                .map(|i| if i < seq / 2 { 1.0 } else { 2.0 })
                .collect(),
            "loss_weights" => vec![1.0 / n as f64; n],
            _ => (0..n).map(|_| rng.random_range(-0.5..0.5)).collect(),
        };
        let t = Tensor::from_f64(ty.dtype, ty.shape.clone(), &vals).expect("sized to the type");
        out.insert(name.to_string(), t);
    }
    out
}

fn loss(g: &Graph, b: &HashMap<String, Tensor>) -> f64 {
    let outs = Interpreter::new(g, Precision::Declared)
        .expect("the graph verifies")
        .run(b)
        .expect("the graph runs");
    outs.get("loss").expect("a loss output").to_f64_vec()[0]
}

fn count(g: &Graph, name: &str) -> usize {
    g.nodes().iter().filter(|n| n.op.name() == name).count()
}

#[test]
fn tiny_internvl_fuses_and_keeps_its_loss() {
    let (cfg, g) = tiny_graph(16);
    let (f, report) = fuse(&g, &FuseLimits::default()).expect("the pass runs");
    eprintln!("{report}");
    assert!(
        report.node_limit_hit().is_none(),
        "a saturation hit the node limit:\n{report}"
    );
    verify(&f).expect("the fused graph verifies");
    assert_eq!(f.stage, Stage::Fused);
    for op in [
        "fused.rms_norm",
        "fused.layer_norm",
        "fused.swiglu",
        "fused.rope",
    ] {
        assert!(count(&f, op) > 0, "no {op} in the fused graph:\n{report}");
    }
    assert!(f.nodes().len() < g.nodes().len());
    // Parameter names and order, inputs and outputs are those of the frontend graph.
    let names = |g: &Graph| -> Vec<String> { g.params().map(|(n, _, _)| n.to_string()).collect() };
    assert_eq!(names(&f), names(&g));
    let outs = |g: &Graph| -> Vec<String> { g.outputs().iter().map(|(n, _)| n.clone()).collect() };
    assert_eq!(outs(&f), outs(&g));
    let b = bindings(&cfg, &g, 7);
    let (want, got) = (loss(&g, &b), loss(&f, &b));
    assert!(want.is_finite());
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
        "loss {got} after fusion, {want} before"
    );
}

#[test]
fn identical_layers_share_one_template() {
    let (_, g) = tiny_graph(8);
    let (_, report) = fuse(&g, &FuseLimits::default()).expect("the pass runs");
    // Two ViT layers, two decoder layers, and the global region.
    assert_eq!(report.regions, 5, "{report}");
    assert_eq!(report.templates.len(), 3, "{report}");
    assert!(report.saturated(), "{report}");
    let layer = |prefix: &str| {
        report
            .templates
            .iter()
            .find(|t| t.region.starts_with(prefix))
            .map(|t| t.instances)
    };
    assert_eq!(layer("vision_model.encoder.layers."), Some(2));
    assert_eq!(layer("language_model.model.layers."), Some(2));
}

#[test]
fn bf16_tiny_internvl_fuses_its_norms() {
    let mut cfg = config("internvl35-tiny.toml");
    cfg.train.seq_length = 8;
    cfg.train.dtype = mmc_frontend::config::ComputeDType::Bf16;
    let g = forward_graph(&cfg, ForwardOptions::default())
        .expect("the tiny model declares")
        .graph;
    let (f, report) = fuse(&g, &FuseLimits::default()).expect("the pass runs");
    verify(&f).expect("the fused graph verifies");
    // 2 x 2 ViT norms + the projector's LayerNorm; 2 x 4 decoder norms + the final norm.
    assert_eq!(count(&f, "fused.layer_norm"), 5, "{report}");
    assert_eq!(count(&f, "fused.rms_norm"), 9, "{report}");
    let bf16_norms = f
        .nodes()
        .iter()
        .filter(|n| n.op.name() == "fused.rms_norm")
        .all(|n| f.ty(n.outputs[0]).dtype == DType::BF16);
    assert!(bf16_norms);
    let b = bindings(&cfg, &g, 3);
    let (want, got) = (loss(&g, &b), loss(&f, &b));
    assert!(
        (got - want).abs() <= 2e-2 * want.abs().max(1.0),
        "bf16 loss {got} after fusion, {want} before"
    );
}

/// The fusion of the 30B forward graph (147k nodes), timed. Run with
/// `cargo test --release -p mmc-passes --lib thirty_b -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: builds the 30B graph (a few seconds)"]
fn thirty_b_forward_is_fused_quickly() {
    let cfg = config("internvl35-30b-a3b.toml");
    let t0 = std::time::Instant::now();
    let g = forward_graph(&cfg, ForwardOptions::default())
        .expect("the 30B model declares")
        .graph;
    let declared = t0.elapsed();
    let (f, report) = fuse(&g, &FuseLimits::default()).expect("the pass runs");
    eprintln!(
        "declared {} nodes in {:.2} s\n{report}",
        g.nodes().len(),
        declared.as_secs_f64()
    );
    assert!(report.node_limit_hit().is_none(), "{report}");
    let t1 = std::time::Instant::now();
    verify(&f).expect("the fused graph verifies");
    eprintln!("verified in {:.2} s", t1.elapsed().as_secs_f64());
}

#[test]
fn layers_see_through_the_tables_the_decoder_builds_once() {
    // A rule that only matches when the rotary table (an argument of every decoder layer) is
    // seen as the `cos` that computes it in the global region. Its right side commutes the
    // product, so the graph computes the same.
    let sees_cos: super::rules::FuseRewrite = egg::rewrite!("sees-cos";
        "(mul ?x (broadcast (reshape (cos ?e) ?s1) ?s2))" => "(mul (broadcast (reshape (cos ?e) ?s1) ?s2) ?x)");
    for layers in [1, 2] {
        let mut cfg = config("internvl35-tiny.toml");
        cfg.train.seq_length = 8;
        cfg.model.text.num_hidden_layers = layers;
        let g = forward_graph(&cfg, ForwardOptions::default())
            .expect("the tiny model declares")
            .graph;
        let (f, report) = super::fuse_with(&g, &FuseLimits::default(), vec![sees_cos.clone()])
            .expect("the pass runs");
        // q and k in each layer.
        let applied = report.rule_applications.get("sees-cos").copied();
        assert_eq!(applied, Some(2 * layers), "{report}");
        // The context is read-only: the tables are still computed once, outside the layers.
        assert_eq!(count(&f, "cos"), 1);
        assert_eq!(count(&f, "sin"), 1);
        let b = bindings(&cfg, &g, 5);
        assert_eq!(loss(&g, &b), loss(&f, &b));
    }
}
