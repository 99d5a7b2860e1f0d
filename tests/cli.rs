//! The `mmc` command line: what works prints what it should, and bad input gives one clear
//! error line and a non-zero exit.

mod common;

use common::{compile, fails, fixture, mmc};
use std::path::Path;

#[test]
fn dump_ir_prints_the_graph_and_its_summary() {
    let out = mmc()
        .args([
            "dump-ir",
            fixture("qwen3_moe_tiny/model.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("graph frontend {\n"));
    assert!(text.contains("param \"model.layers.1.mlp.experts.7.down_proj.weight\" : f32[64, 32]"));
    assert!(text.contains("; parameters: 255,360 in 69 tensors"));
    assert!(text.contains(";   f32               1,021,440"));
    assert!(text.contains(";   model.layers.*.mlp.experts.*.gate_proj"));
    assert!(text.contains("all 69 tensors present with matching shapes"));
    // The summary is a comment: the whole output still parses as a graph.
    let g = mmc_ir::text::parse(&text).unwrap();
    mmc_ir::verify(&g).unwrap();
}

#[test]
fn dump_ir_writes_graphviz() {
    let out = mmc()
        .args(["dump-ir", "configs/qwen3-moe-tiny.toml", "--format", "dot"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("digraph {"));
    assert!(text.contains("// parameters:"));
}

#[test]
fn stages_not_built_yet_are_an_error() {
    let e = fails(&[
        "dump-ir",
        "configs/qwen3-moe-tiny.toml",
        "--stage",
        "parallel",
    ]);
    assert!(
        e.contains("stage `parallel` is not built yet")
            && e.contains("the built stages are frontend, fused, autodiff, optimizer, scheduled"),
        "{e}"
    );
}

#[test]
fn dump_ir_prints_every_built_stage() {
    let run = |args: &[&str]| {
        let out = mmc()
            .args(["dump-ir", "configs/qwen3-moe-tiny.toml"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // One graph through the fused stage: it parses back and verifies.
    for (stage, header) in [("fused", "graph fused {"), ("autodiff", "graph autodiff {")] {
        let text = run(&["--stage", stage]);
        assert!(text.starts_with(header), "{stage}: {}", &text[..80]);
        assert!(text.contains(&format!("({stage} stage)")), "{stage}");
        mmc_ir::verify(&mmc_ir::text::parse(&text).unwrap()).unwrap();
    }
    let autodiff = run(&["--stage", "autodiff"]);
    assert!(autodiff.contains("output \"grad:model.norm.weight\""));
    // From the optimizer stage on, both programs, each headed by its name.
    let text = run(&["--stage", "optimizer"]);
    assert!(text.starts_with("; optimizer stage, program micro_step\ngraph optimizer {"));
    assert!(text.contains("; optimizer stage, program apply\ngraph optimizer {"));
    // The scheduled stage: every computed value's arena slot at the end of its line, and
    // the text still parses.
    let text = run(&["--stage", "scheduled"]);
    assert!(text.starts_with("; scheduled stage, program micro_step\ngraph scheduled {"));
    let micro = &text[..text.find("; scheduled stage, program apply").unwrap()];
    let slotted = micro.lines().filter(|l| l.contains("  ; @")).count();
    assert!(slotted > 100, "{slotted} slotted lines");
    assert!(micro.contains("; arena: "), "no arena size");
    let body: String = micro.lines().skip(1).collect::<Vec<_>>().join("\n");
    mmc_ir::verify(&mmc_ir::text::parse(&body).unwrap()).unwrap();
    // After a named pass: simplify runs twice (forward, then forward + backward).
    let text = run(&["--after", "simplify"]);
    assert!(
        text.starts_with("; after simplify\ngraph fused {"),
        "{}",
        &text[..80]
    );
    assert!(text.contains("; after simplify\ngraph autodiff {"));
    let e = fails(&[
        "dump-ir",
        "configs/qwen3-moe-tiny.toml",
        "--after",
        "nosuch",
    ]);
    assert!(
        e.contains("no pass named `nosuch`") && e.contains("fuse-moe, fuse, simplify"),
        "{e}"
    );
}

#[test]
fn commands_not_built_yet_say_so() {
    let e = fails(&[
        "compile",
        "configs/qwen3-moe-tiny.toml",
        "--target",
        "ascend",
    ]);
    assert!(e.contains("is not built yet"), "{e}");
}

#[test]
fn malformed_toml_is_one_line_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[model]\n[model.text\nvocab_size = 3\n").unwrap();
    let e = fails(&["dump-ir", p.to_str().unwrap()]);
    assert!(e.contains("bad.toml:2:"), "{e}");
}

#[test]
fn a_missing_key_is_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.toml");
    let text = std::fs::read_to_string("configs/qwen3-moe-tiny.toml").unwrap();
    std::fs::write(&p, text.replace("num_experts_per_tok = 2\n", "")).unwrap();
    let e = fails(&["dump-ir", p.to_str().unwrap()]);
    assert!(e.contains("missing key `num_experts_per_tok`"), "{e}");
}

/// Copies the tiny checkpoint into a single safetensors file, with one tensor given the wrong
/// shape (or dropped), and returns the model TOML that points at it.
fn broken_checkpoint(dir: &Path, break_it: &str, drop_it: bool) -> std::path::PathBuf {
    use mmc_runtime::Checkpoint;
    let src = Checkpoint::open(&fixture("qwen3_moe_tiny/checkpoint")).unwrap();
    let ck = dir.join("ckpt");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::copy(
        fixture("qwen3_moe_tiny/checkpoint/config.json"),
        ck.join("config.json"),
    )
    .unwrap();
    let mut tensors = Vec::new();
    for name in src.names() {
        if drop_it && name == break_it {
            continue;
        }
        let t = src.read(name, mmc_ir::DType::F32).unwrap();
        let mut shape = t.shape().to_vec();
        if name == break_it {
            shape.reverse();
        }
        tensors.push((name.to_string(), shape, t.to_le_bytes()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &ck.join("model.safetensors")).unwrap();
    let toml = dir.join("model.toml");
    std::fs::write(
        &toml,
        "[model]\nhf_config = \"ckpt/config.json\"\ninit_from_hf_path = \"ckpt\"\n[train]\nseq_length = 8\n",
    )
    .unwrap();
    toml
}

#[test]
fn a_misshapen_tensor_is_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let toml = broken_checkpoint(dir.path(), "model.layers.1.mlp.gate.weight", false);
    let e = fails(&["dump-ir", toml.to_str().unwrap()]);
    assert!(
        e.contains("`model.layers.1.mlp.gate.weight`")
            && e.contains("[64, 8]")
            && e.contains("[8, 64]"),
        "{e}"
    );
}

#[test]
fn a_missing_tensor_is_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let toml = broken_checkpoint(dir.path(), "model.norm.weight", true);
    let e = fails(&["dump-ir", toml.to_str().unwrap()]);
    assert!(e.contains("`model.norm.weight` is missing"), "{e}");
}

#[test]
fn dump_ir_prints_the_internvl_models() {
    let out = mmc()
        .args(["dump-ir", "configs/internvl35-tiny.toml"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("input \"pixel_values\" : f32[7, 3, 56, 56]"));
    assert!(text.contains("param \"vision_model.encoder.layers.1.attn.qkv.weight\" : f32[96, 32]"));
    assert!(text.contains("param \"mlp1.1.weight\" : f32[32, 128]"));

    let out = mmc()
        .args(["dump-ir", "configs/internvl35-30b-a3b.toml"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("; parameters: 30,848,730,112 in 19,213 tensors"),
        "{}",
        &text[text.len().saturating_sub(3000)..]
    );
}

#[test]
fn dump_ir_checks_both_internvl_checkpoint_layouts() {
    for (toml, layout) in [
        ("model_ogv.toml", "the model's own layout"),
        ("model_hf.toml", "the transformers-native InternVL layout"),
    ] {
        let path = fixture(&format!("internvl35_tiny/{toml}"));
        let out = mmc()
            .args(["dump-ir", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(layout), "{toml}");
    }
}

/// Writes the tiny InternVL fixture's sample as a tensor data file for `mmc run`.
fn internvl_data(dir: &Path) -> std::path::PathBuf {
    use safetensors::tensor::TensorView;
    let inputs = fixture("internvl35_tiny/inputs.safetensors");
    let ck = mmc_runtime::Checkpoint::open(&inputs).unwrap();
    let ids = ck.read("input_ids", mmc_ir::DType::I64).unwrap();
    let labels = ck.read("labels", mmc_ir::DType::I64).unwrap();
    let px = ck.read("pixel_values", mmc_ir::DType::F32).unwrap();
    let mut tiles = px.to_le_bytes();
    tiles.resize(4 * 3 * 56 * 56 * 4, 0);
    let tensors = [
        (
            "input_ids",
            safetensors::Dtype::I64,
            vec![1, 48],
            ids.to_le_bytes(),
        ),
        (
            "labels",
            safetensors::Dtype::I64,
            vec![1, 48],
            labels.to_le_bytes(),
        ),
        (
            "pixel_values",
            safetensors::Dtype::F32,
            vec![1, 4, 3, 56, 56],
            tiles,
        ),
    ];
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join("data.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn compile_and_run_train_the_tiny_internvl_for_five_steps() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.bin");
    let emit = dir.path().join("ir");
    let toml = fixture("internvl35_tiny/model_ogv.toml");
    let out = mmc()
        .args([
            "compile",
            toml.to_str().unwrap(),
            "-o",
            plan.to_str().unwrap(),
        ])
        .args(["--emit-dir", emit.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(
        said.contains("micro_step") && said.contains("304,672 parameters"),
        "{said}"
    );
    // The pass pipeline's report: a line per pass with its node counts, and the total time.
    for pass in [
        "frontend",
        "fuse-moe",
        "fuse",
        "simplify",
        "autodiff",
        "optimizer",
        "recompute",
        "schedule",
        "memory",
    ] {
        assert!(
            said.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(pass)),
            "{pass}: {said}"
        );
    }
    assert!(
        said.contains("nodes before -> after") && said.contains("pipeline: "),
        "{said}"
    );
    // The memory plan: the state by kind and each program's arena.
    assert!(
        said.contains("memory plan (one CPU device): weights ")
            && said.contains("micro_step arena")
            && said.contains("apply arena"),
        "{said}"
    );
    assert!(emit.join("micro_step.mmcir").is_file() && emit.join("apply.mmcir").is_file());

    let data = internvl_data(dir.path());
    let metrics = dir.path().join("metrics.jsonl");
    let out = mmc()
        .args([
            "run",
            plan.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--train-iters", "5", "--metrics", metrics.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.starts_with("step ")).count(),
        5,
        "{log}"
    );
    assert!(log.contains("step 1/5 | loss 7.4900"), "{log}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for key in [
        "step",
        "loss",
        "grad_norm",
        "lr",
        "tokens",
        "tokens_per_s",
        "step_ms",
        "peak_memory_bytes",
    ] {
        assert!(lines[4].get(key).is_some(), "metrics lack {key}");
    }
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[4]["loss"].as_f64().unwrap();
    assert!((first - 7.49004793).abs() < 1e-5, "{first}");
    assert!(last < first, "the loss did not fall: {first} -> {last}");

    // The fixture file itself: one micro-batch whose 3 tiles are padded to the 4 slots.
    let out = mmc()
        .args(["run", plan.to_str().unwrap(), "--data"])
        .arg(fixture("internvl35_tiny/inputs.safetensors"))
        .args(["--train-iters", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("step 1/1 | loss 7.4900"));
    // --profile: the time per op of the steps after the first, on the compiled backend only.
    let out = mmc()
        .args(["run", plan.to_str().unwrap(), "--data"])
        .arg(fixture("internvl35_tiny/inputs.safetensors"))
        .args(["--train-iters", "3", "--profile", "--threads", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(
        said.contains("mean over 2 run(s) after the first step")
            && said.contains("by op (program, op")
            && said.contains("fused.linear_cross_entropy_with_grad")
            && said.contains("slowest steps"),
        "{said}"
    );
    let out = mmc()
        .args(["run", plan.to_str().unwrap(), "--data"])
        .arg(fixture("internvl35_tiny/inputs.safetensors"))
        .args(["--profile", "--backend", "interpreter"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--profile times the compiled backend"));
}

#[test]
fn bad_plans_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plan.bin");
    std::fs::write(&p, "mmc-plan 999\n{}").unwrap();
    let e = fails(&["run", p.to_str().unwrap(), "--data", "x.safetensors"]);
    assert!(
        e.contains("plan format 999") && e.contains("recompile"),
        "{e}"
    );
    std::fs::write(&p, "hello").unwrap();
    let e = fails(&["run", p.to_str().unwrap(), "--data", "x.safetensors"]);
    assert!(e.contains("not an mmc plan"), "{e}");
    // The text format of mmc before format 4.
    std::fs::write(&p, "mmc-plan 3 sha256:00\n{\"settings\": ").unwrap();
    let e = fails(&["run", p.to_str().unwrap(), "--data", "x.safetensors"]);
    assert!(
        e.contains("plan format 3") && e.contains("recompile"),
        "{e}"
    );
    // A binary plan cut short in its header.
    let mut cut = mmc_ir::plan_file::MAGIC.to_vec();
    cut.extend(mmc_ir::plan::PLAN_FORMAT_VERSION.to_le_bytes());
    cut.extend(b"\x0b\x00interp");
    std::fs::write(&p, &cut).unwrap();
    let e = fails(&["run", p.to_str().unwrap(), "--data", "x.safetensors"]);
    assert!(
        e.contains("damaged") && e.contains("cut short in its header (target)"),
        "{e}"
    );
}

#[test]
fn run_rejects_data_that_does_not_fit_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = compile("configs/qwen3-moe-tiny.toml", dir.path());
    // seq_length is 64 there; the fixture's rows have 24 tokens.
    let data = fixture("qwen3_moe_tiny/inputs.safetensors");
    let e = fails(&[
        "run",
        plan.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        e.contains("`input_ids` has shape [2, 24]") && e.contains("seq_length"),
        "{e}"
    );
}

#[test]
fn compile_rejects_what_it_cannot_build() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("m.toml");
    let base = std::fs::read_to_string("configs/qwen3-moe-tiny.toml").unwrap();
    std::fs::write(&toml, format!("{base}freeze = [\"visionmodel\"]\n")).unwrap();
    let e = fails(&[
        "compile",
        toml.to_str().unwrap(),
        "-o",
        dir.path().join("p").to_str().unwrap(),
    ]);
    assert!(e.contains("`visionmodel` matches no parameter"), "{e}");
    std::fs::write(&toml, format!("{}\n[parallel]\ntp = 2\n", base)).unwrap();
    let e = fails(&[
        "compile",
        toml.to_str().unwrap(),
        "-o",
        dir.path().join("p").to_str().unwrap(),
    ]);
    assert!(e.contains("not built yet"), "{e}");
}

#[test]
fn run_trains_from_a_data_json_and_plots_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let plan = compile("configs/internvl35-tiny.toml", dir.path());
    let svg = dir.path().join("loss.svg");
    let metrics = dir.path().join("metrics.jsonl");
    let out = mmc()
        .args([
            "run",
            plan.to_str().unwrap(),
            "--data",
            "configs/demo/data.json",
        ])
        .args(["--train-iters", "2", "--plot", svg.to_str().unwrap()])
        .args(["--metrics", metrics.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let log = String::from_utf8(out.stdout).unwrap();
    assert!(log.contains("step 2/2 | loss"), "{log}");
    // Not a terminal: plain lines, no progress bar (no cursor movement).
    assert!(!err.contains('\x1b') && !log.contains('\x1b'), "{err}");
    // Each step's line ends with the worst MoE layer's max/mean expert load.
    let steps: Vec<&str> = log.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 2, "{log}");
    for l in &steps {
        assert!(
            l.contains(" | expert load max/mean ") && l.ends_with(')'),
            "{l}"
        );
    }
    // The end-of-run throughput summary, without the warm-up step.
    let summary = log
        .lines()
        .find(|l| l.starts_with("throughput: "))
        .unwrap_or_else(|| panic!("no summary: {log}"));
    for part in [
        "ms per iteration (mean of step 2; the run's first step, 1, is warm-up and left out)",
        "samples/s",
        "tokens/s (non-padding)",
        "| total ",
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }
    // The metrics: per step, tokens per expert of both MoE layers (4 experts, top-2), summing
    // to the step's non-padding tokens x 2, and each layer's max/mean.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for m in &lines {
        let tokens = m["tokens"].as_u64().unwrap();
        let load = m["expert_load"].as_object().expect("expert_load");
        let keys: Vec<&str> = load.keys().map(String::as_str).collect();
        assert_eq!(keys, ["0", "1"], "{m}");
        for (layer, counts) in load {
            let c: Vec<u64> = counts
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert_eq!(c.len(), 4, "{m}");
            assert_eq!(c.iter().sum::<u64>(), tokens * 2, "layer {layer}: {m}");
            let want = *c.iter().max().unwrap() as f64 * 4.0 / (tokens * 2) as f64;
            let got = m["expert_imbalance"][layer].as_f64().unwrap();
            assert!((got - want).abs() < 1e-12, "layer {layer}: {got} vs {want}");
        }
    }
    assert!(
        log.contains("data: ") && log.contains("sample(s) trained on"),
        "{log}"
    );
    // MindSpeed-MM keys mmc does not use are listed once.
    assert_eq!(err.matches("keys mmc does not use").count(), 1, "{err}");
    assert!(err.contains("dataloader_param.pin_memory"), "{err}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("training loss"));
}

#[test]
fn a_bad_data_json_is_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let plan = compile("configs/internvl35-tiny.toml", dir.path());
    let data = dir.path().join("data.json");
    std::fs::write(&data, "{\"dataset_param\": {\n  \"basic_parameters\": }").unwrap();
    let e = fails(&[
        "run",
        plan.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        e.contains("data.json:2:") && e.contains("not valid JSON"),
        "{e}"
    );
}
