//! The pass pipeline keeps the model's meaning: on the tiny InternVL3.5 fixture (its checkpoint
//! and its image batch), the loss and every gradient of the pipeline's autodiff-stage graph
//! (simplified forward, autodiff, simplified forward + backward) equal those of plain
//! autodiff on the declared forward graph, within 1e-5 per tensor in the interpreter.

mod common;

use common::{fixture, internvl_image_batch};
use mmc_frontend::{CheckpointLayout, Config};
use mmc_ir::interp::Bindings;
use mmc_ir::{relative_error, Interpreter, Precision, Stage};
use mmc_passes::pipeline::Artifact;
use mmc_runtime::weights::param_specs;
use mmc_runtime::Checkpoint;

#[test]
fn loss_and_gradients_are_unchanged_by_the_pipeline() {
    let cfg = Config::load(&fixture("internvl35_tiny/model_ogv.toml")).expect("config loads");
    let forward = mmc::driver::training_forward(&cfg)
        .expect("model builds")
        .graph;
    let stackings: std::sync::Arc<std::sync::Mutex<Vec<mmc_ir::plan::ParamStacking>>> =
        Default::default();
    let pipeline = mmc::driver::pipeline_for(&cfg, &forward, stackings.clone()).expect("pipeline");
    let (Artifact::Graph(piped), report) = pipeline
        .run_to(forward.clone(), Stage::Autodiff)
        .expect("the pipeline runs")
    else {
        panic!("the autodiff stage is a graph")
    };
    let plain = mmc_passes::autodiff(&forward, "loss", |_| true).expect("autodiff");
    assert!(
        piped.nodes().len() < plain.nodes().len(),
        "the pipeline simplified nothing:\n{report}"
    );

    let dir = cfg
        .resolve_path(cfg.model.init_from_hf_path.as_deref().unwrap(), "init")
        .unwrap();
    let ckpt = Checkpoint::open(&dir).expect("checkpoint opens");
    let layout = CheckpointLayout::detect(ckpt.names());
    let mut weights = ckpt
        .load(&param_specs(&forward, |n| layout.source(n)))
        .unwrap_or_else(|e| panic!("{e}"));
    // The routed MoE reads each layer's experts as stacks; the gradients of a stack are
    // compared per expert.
    let stackings = stackings.lock().unwrap().clone();
    assert!(!stackings.is_empty(), "the pipeline routes the MoE");
    for st in &stackings {
        let parts: Vec<&mmc_ir::Tensor> = st.parts.iter().map(|p| &weights[&p.name]).collect();
        let stacked = st.stack(&parts).unwrap();
        weights.insert(st.stacked.clone(), stacked);
    }
    let batch = internvl_image_batch();
    let bindings: [&dyn Bindings; 2] = [&weights, &batch.0];
    let run = |g| {
        Interpreter::new(g, Precision::Declared)
            .expect("verifies")
            .run(&bindings[..])
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (want, mut got) = (run(&plain), run(&piped));
    for st in &stackings {
        let name = mmc_passes::grad_output(&st.stacked);
        let at = got
            .0
            .iter()
            .position(|(n, _)| *n == name)
            .expect("a stack's gradient");
        let (_, stacked) = got.0.remove(at);
        for (i, p) in st.parts.iter().enumerate() {
            got.0.push((
                mmc_passes::grad_output(&p.name),
                st.read_part(&stacked, i).unwrap(),
            ));
        }
    }
    assert_eq!(want.0.len(), got.0.len());
    let mut worst = 0.0f64;
    for (name, w) in &want.0 {
        let g = got
            .get(name)
            .unwrap_or_else(|| panic!("output {name} is missing"));
        let err = relative_error(g, w);
        assert!(err <= 1e-5, "{name}: relative error {err:.3e}");
        worst = worst.max(err);
    }
    eprintln!("{} outputs, worst relative error {worst:.3e}", want.0.len());
}
