//! The compile pipeline shared by `mmc compile`, `mmc dump-ir` and the end-to-end tests:
//! configuration to forward graph, checkpoint check, the pass pipeline
//! (`mmc_passes::pipeline`), plan.

use anyhow::{bail, Context, Result};
use mmc_codegen::{build_plan, PlanRequest, Weights};
use mmc_frontend::config::{Recompute, TargetKind};
use mmc_frontend::{forward_graph, CheckpointLayout, Config, ForwardOptions, Model};
use mmc_ir::arena::ArenaLayout;
use mmc_ir::plan::{ModelFacts, ParamStacking, Plan, TrainSettings};
use mmc_ir::summary::{grouped, GraphSummary};
use mmc_ir::{Graph, Stage};
use mmc_passes::optimizer::AdamW;
use mmc_passes::pipeline::{self, Artifact, DumpAt, Pipeline, Settings, StepSpec};
use mmc_passes::{PipelineReport, RecomputeMode};
use mmc_runtime::weights::param_specs;
use mmc_runtime::Checkpoint;
use std::sync::{Arc, Mutex};

/// Whether `name` is under one of the `freeze` prefixes (whole dotted segments).
pub fn frozen(freeze: &[String], name: &str) -> bool {
    freeze.iter().any(|p| {
        let p = p.trim_end_matches('.');
        name == p || name.starts_with(&format!("{p}."))
    })
}

/// The chat templates the data pipeline implements.
pub const TEMPLATES: &[&str] = &["internvl2_5"];

/// The settings that parse but that this version cannot act on yet, as an error naming the
/// key (a setting mmc accepts must take effect); `None` when everything is built. The
/// pipeline still runs for such a configuration (as one CPU device), so `mmc compile` can
/// print the memory plan before it refuses to write the plan.
pub fn unbuilt(cfg: &Config) -> Option<String> {
    let model = cfg.path.display();
    let t = &cfg.target;
    if t.kind == TargetKind::Ascend {
        return Some(format!("{model}: [target] kind = \"ascend\": the Ascend target is not built yet; use kind = \"cpu\" (or --target cpu)"));
    }
    if t.devices != 1 {
        return Some(format!(
            "{model}: [target] devices = {}: running on more than one device is not built yet (it comes with data, tensor and expert parallelism); set devices = 1",
            t.devices
        ));
    }
    if let Some(gb) = t.device_memory_gb {
        return Some(format!(
            "{model}: [target] device_memory_gb = {gb}: fitting a plan to a device's memory is not built yet (use [train] recompute_budget_gb to bound the activations); remove the key"
        ));
    }
    let par = &cfg.parallel;
    if par.tp * par.dp * par.ep > 1 || par.zero != 0 {
        return Some(format!(
            "{model}: tensor, data and expert parallelism ([parallel] tp={}, dp={}, ep={}, zero={}) are not built yet; set them to 1 (and zero = 0)",
            par.tp, par.dp, par.ep, par.zero
        ));
    }
    None
}

/// Refuses what no compilation can go on with: a chat template the data pipeline lacks.
pub fn check_buildable(cfg: &Config) -> Result<()> {
    let model = cfg.path.display();
    if let Some(tpl) = &cfg.model.template {
        if !TEMPLATES.contains(&tpl.as_str()) {
            bail!(
                "{model}: [model] template = \"{tpl}\": mmc's data pipeline has only the {} template",
                TEMPLATES.join(", ")
            );
        }
    }
    Ok(())
}

/// The forward graph that training compiles: the `loss` output with the load-balancing term
/// scaled for gradient accumulation, no logits output.
pub fn training_forward(cfg: &Config) -> Result<Model> {
    let par = &cfg.parallel;
    let train = &cfg.train;
    let accum = train.global_batch_size / (train.micro_batch_size * par.dp);
    Ok(forward_graph(
        cfg,
        ForwardOptions {
            logits: false,
            aux_loss_scale: Some(1.0 / (accum * par.dp) as f64),
        },
    )?)
}

/// The pass pipeline of the configured target for `forward`, with the training settings of
/// `cfg`; refuses freeze prefixes that match nothing or everything.
pub fn pipeline_for(
    cfg: &Config,
    forward: &Graph,
    stackings: Arc<Mutex<Vec<ParamStacking>>>,
) -> Result<Pipeline> {
    let model = &cfg.path;
    let train = &cfg.train;
    for prefix in &train.freeze {
        if !forward
            .params()
            .any(|(n, _, _)| frozen(std::slice::from_ref(prefix), n))
        {
            bail!(
                "{}: [train] freeze prefix `{prefix}` matches no parameter of the model",
                model.display()
            );
        }
    }
    let freeze = train.freeze.clone();
    let trainable: pipeline::Trainable = Arc::new(move |name: &str| !frozen(&freeze, name));
    if !train.freeze.is_empty() && !forward.params().any(|(n, _, _)| trainable(n)) {
        bail!(
            "{}: [train] freeze = {:?} freezes every parameter, so there is nothing to train",
            model.display(),
            train.freeze
        );
    }
    // The routed MoE trains each layer's experts as one stacked tensor, so a freeze prefix
    // must take all of a layer's experts or none of them.
    for prefix in &train.freeze {
        for (name, _, _) in forward.params() {
            let Some(at) = name.find(".mlp.experts.") else {
                continue;
            };
            let experts = &name[..at + ".mlp.experts".len()];
            let whole = format!("{experts}.gate_up_proj");
            if frozen(std::slice::from_ref(prefix), name)
                && !frozen(std::slice::from_ref(prefix), &whole)
            {
                bail!(
                    "{}: [train] freeze prefix `{prefix}` freezes some experts of `{experts}` but not all: the experts of a layer train as one stacked tensor, so freeze `{experts}` (or a prefix above it) or none of them",
                    model.display()
                );
            }
        }
    }
    let decay_1d = train.weight_decay_1d;
    let step = StepSpec {
        trainable,
        decay: Arc::new(move |_: &str, ty: &mmc_ir::TensorType| decay_1d || ty.rank() > 1),
        adamw: AdamW {
            beta1: train.adam_beta1,
            beta2: train.adam_beta2,
            eps: train.adam_eps,
            weight_decay: train.weight_decay,
            clip_grad: train.clip_grad,
        },
    };
    // Only the CPU target is built (`check_buildable`); `pipeline::ascend` joins with it.
    Ok(pipeline::cpu(Settings {
        loss: "loss".into(),
        step,
        recompute: recompute_mode(train),
        stackings,
    }))
}

/// The recompute mode `[train]` asks for: a memory budget decides on its own; otherwise the
/// named mode.
pub fn recompute_mode(train: &mmc_frontend::config::TrainConfig) -> RecomputeMode {
    match (train.recompute_budget_gb, train.recompute) {
        (Some(gb), _) => RecomputeMode::budget_gb(gb),
        (None, Recompute::None) => RecomputeMode::None,
        (None, Recompute::Selective) => RecomputeMode::Selective,
        (None, Recompute::Full) => RecomputeMode::Full,
    }
}

/// A compiled plan and what the pass pipeline did to get it.
pub struct Compiled {
    pub plan: Plan,
    pub report: PipelineReport,
    /// Why the plan must not be written or run (a setting not built yet), if so: the plan is
    /// still the single-CPU-device one, for its memory plan.
    pub unbuilt: Option<String>,
}

/// Compiles a loaded model configuration into a training plan; refuses settings that are
/// not built yet.
pub fn compile_plan(cfg: &Config) -> Result<Plan> {
    let compiled = compile(cfg)?;
    if let Some(why) = compiled.unbuilt {
        bail!(why);
    }
    Ok(compiled.plan)
}

/// Compiles a loaded model configuration: checks, forward graph, checkpoint check, the pass
/// pipeline, plan.
pub fn compile(cfg: &Config) -> Result<Compiled> {
    check_buildable(cfg)?;
    let model = &cfg.path;
    let par = &cfg.parallel;
    let train = &cfg.train;
    let accum = train.global_batch_size / (train.micro_batch_size * par.dp);
    let declared = training_forward(cfg)?;
    let stackings = Arc::new(Mutex::new(Vec::new()));
    let pipeline = pipeline_for(cfg, &declared.graph, stackings.clone())?;
    let checkpoint = match &cfg.model.init_from_hf_path {
        Some(init) => {
            let dir = cfg.resolve_path(init, "init_from_hf_path")?;
            let ckpt = Checkpoint::open(&dir)?;
            let layout = CheckpointLayout::detect(ckpt.names());
            ckpt.check(&param_specs(&declared.graph, |n| layout.source(n)))?;
            // Kept as found (beside the TOML, or from the working directory), not made
            // absolute: the plan names no folder of the compiling machine that the user did
            // not write, and `mmc run` opens a relative one from its working directory.
            if dir.to_str().is_none() {
                bail!(
                    "{}: init_from_hf_path {} is not UTF-8, which a plan cannot record",
                    model.display(),
                    dir.display()
                );
            }
            Some((dir, layout))
        }
        None => None,
    };
    let (step, report) = pipeline
        .run(declared.graph)
        .with_context(|| format!("{}: internal error in the compiler", model.display()))?;

    let source;
    let weights = match &checkpoint {
        Some((dir, layout)) => {
            source = move |n: &str| layout.source(n);
            Weights::Checkpoint {
                dir: dir.clone(),
                source: &source,
            }
        }
        None => Weights::Random(&declared.inits),
    };

    let vl = cfg.model.vision_language.as_ref();
    let settings = TrainSettings {
        micro_batch_size: train.micro_batch_size,
        seq_length: train.seq_length,
        max_tiles: if vl.is_some() { train.max_tiles } else { 0 },
        grad_accum_steps: accum,
        data_parallel: par.dp,
        schedule: train.schedule(),
        loss_reduction: train.loss_reduction,
        seed: train.seed,
        model: ModelFacts {
            vocab_size: cfg.model.text.vocab_size,
            img_context_token_id: vl.map(|_| cfg.model.img_context_token_id),
            tile_size: vl.map(|v| v.tile_size),
            tokens_per_tile: vl.map(|v| v.tokens_per_tile()),
            template: cfg.model.template.clone(),
        },
    };
    let stackings = std::mem::take(
        &mut *stackings
            .lock()
            .map_err(|_| anyhow::anyhow!("internal error: the stacking record was poisoned"))?,
    );
    let plan = build_plan(PlanRequest {
        step,
        weights,
        settings,
        stackings,
    })?;
    Ok(Compiled {
        plan,
        report,
        unbuilt: unbuilt(cfg),
    })
}

/// The graph's text with each computed value's arena slot as a comment at the end of its line
/// (`; @offset +bytes`): a memory-planned program as the runtime lays it out. The comments
/// keep the text parseable.
fn with_arena_slots(g: &Graph, layout: &ArenaLayout) -> String {
    let text = mmc_ir::text::print(g);
    let mut nodes = g.nodes().iter();
    let mut out = String::with_capacity(text.len() * 5 / 4);
    for line in text.lines() {
        out.push_str(line);
        if line.trim_start().starts_with('%') {
            if let Some(node) = nodes.next() {
                let slots: Vec<String> = node
                    .outputs
                    .iter()
                    .filter_map(|v| layout.slots.get(v.0 as usize).copied().flatten())
                    .map(|s| format!("@{} +{}", s.offset, s.bytes))
                    .collect();
                if !slots.is_empty() {
                    out.push_str("  ; ");
                    out.push_str(&slots.join(", "));
                }
            }
        }
        out.push('\n');
    }
    out
}

/// How `mmc dump-ir` writes a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpFormat {
    /// The IR's own text format, with the summary as `;` comments.
    Text,
    /// Graphviz dot, with the summary as `//` comments.
    Dot,
}

/// What `mmc dump-ir` prints: where to stop the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DumpPoint {
    /// The graph(s) when the pipeline reaches this stage.
    Stage(Stage),
    /// The graph(s) right after every run of the pass of this name.
    After(String),
    /// The kernel IR of the scheduled programs: each node's generated kernel, or a line
    /// saying it has none yet.
    Kernels,
}

/// The kernel IR of every node of `g` that has a generated kernel, in program order (library
/// calls as comment lines, so the kernels' text stays whole), and a comment line for each
/// node that has none yet; then the coverage.
fn kernels_text(g: &Graph, comment: &str) -> String {
    use mmc_codegen::kernel::KernelError;
    let mut out = String::new();
    let (mut generated, mut computed) = (0, 0);
    for (id, node) in g.iter_nodes() {
        if matches!(node.op, mmc_ir::Op::Param { .. } | mmc_ir::Op::Input { .. }) {
            continue;
        }
        computed += 1;
        match mmc_codegen::ops::lower_node(g, node, &format!("k{}", id.0)) {
            Ok(lowered) => {
                generated += 1;
                for launch in &lowered.launches {
                    if let mmc_codegen::ops::Work::Library(_) = launch.work {
                        out.push_str(&format!("{comment} node {}: ", id.0));
                    }
                    out.push_str(&launch.work.to_string());
                    out.push('\n');
                }
            }
            Err(KernelError::Unsupported { op } | KernelError::Dtype { op, .. }) => {
                out.push_str(&format!(
                    "{comment} node {} `{op}`: no generated kernel yet\n",
                    id.0
                ));
            }
            Err(e @ (KernelError::Invalid(_) | KernelError::Library(_))) => {
                out.push_str(&format!("{comment} node {}: {e}\n", id.0));
            }
        }
    }
    out.push_str(&format!(
        "{comment} {generated} of {computed} computing nodes have generated kernels\n"
    ));
    out
}

/// The text `mmc dump-ir` prints: each graph at the chosen point, followed by its summary as
/// comments (so that a single graph's text still parses), and the checkpoint check's result.
/// From the `optimizer` stage on there are two programs, each headed by a comment naming it.
pub fn dump_ir(cfg: &Config, at: &DumpPoint, format: DumpFormat) -> Result<String> {
    let model = &cfg.path;
    let declared = training_forward(cfg)?;
    let graph = declared.graph;
    mmc_ir::verify(&graph).context("internal error: the model graph does not verify")?;

    let mut notes = Vec::new();
    if let Some(init) = &cfg.model.init_from_hf_path {
        let dir = cfg.resolve_path(init, "init_from_hf_path")?;
        let ckpt = Checkpoint::open(&dir)?;
        let layout = CheckpointLayout::detect(ckpt.names());
        ckpt.check(&param_specs(&graph, |n| layout.source(n)))?;
        let layout_name = match layout {
            CheckpointLayout::Native => "the model's own layout",
            CheckpointLayout::Transformers { .. } => "the transformers-native InternVL layout",
        };
        notes.push(format!(
            "checkpoint {} ({layout_name}): all {} tensors present with matching shapes",
            dir.display(),
            ckpt.len()
        ));
    }

    let mut pipeline = pipeline_for(cfg, &graph, Arc::new(Mutex::new(Vec::new())))?;
    if *at == DumpPoint::Kernels {
        if format != DumpFormat::Text {
            bail!("the kernel IR prints as text only; drop --format dot");
        }
        let internal = || format!("{}: internal error in the compiler", model.display());
        let (artifact, _) = pipeline
            .run_to(graph, Stage::Scheduled)
            .with_context(internal)?;
        let Artifact::Step(step) = artifact else {
            bail!("internal error: the scheduled stage is not a training step");
        };
        let mut out = String::new();
        for p in [&step.micro_step, &step.apply] {
            out.push_str(&format!("; kernels of program {}\n", p.name));
            out.push_str(&kernels_text(&p.graph, ";"));
        }
        for n in &notes {
            out.push_str(&format!("; {n}\n"));
        }
        return Ok(out);
    }
    if let DumpPoint::Stage(stage) = at {
        if !pipeline.builds(*stage) {
            let built: Vec<&str> = Stage::ALL
                .into_iter()
                .filter(|s| pipeline.builds(*s))
                .map(|s| s.name())
                .collect();
            bail!(
                "stage `{stage}` is not built yet: no pass of the pipeline produces it (the built stages are {})",
                built.join(", ")
            );
        }
    }
    let internal = || format!("{}: internal error in the compiler", model.display());
    // (label, graph, its arena layout once memory-planned) to print.
    let shown: Vec<(String, Graph, Option<ArenaLayout>)> = match at {
        DumpPoint::Stage(stage) => {
            let (artifact, _) = pipeline.run_to(graph, *stage).with_context(internal)?;
            match artifact {
                Artifact::Graph(g) => vec![(format!("{stage} stage"), g, None)],
                Artifact::Step(step) => {
                    let step = *step;
                    [step.micro_step, step.apply]
                        .into_iter()
                        .map(|p| {
                            let label = format!("{stage} stage, program {}", p.name);
                            (label, p.graph, p.memory)
                        })
                        .collect()
                }
            }
        }
        DumpPoint::Kernels => unreachable!("printed above"),
        DumpPoint::After(pass) => {
            pipeline.options.dump = Some(DumpAt::Pass(pass.clone()));
            let (_, report) = pipeline.run(graph).with_context(internal)?;
            if report.dumps.is_empty() {
                let mut names: Vec<&str> = report.records.iter().map(|r| r.pass).collect();
                names.dedup();
                bail!(
                    "no pass named `{pass}` runs in this pipeline; its passes are: {}",
                    names.join(", ")
                );
            }
            report
                .dumps
                .into_iter()
                .map(|d| (d.label, d.graph, None))
                .collect()
        }
    };

    let comment = match format {
        DumpFormat::Text => ";",
        DumpFormat::Dot => "//",
    };
    let mut out = String::new();
    let several = shown.len() > 1;
    for (label, g, memory) in &shown {
        if several {
            out.push_str(&format!("{comment} {label}\n"));
        }
        out.push_str(&match (format, memory) {
            (DumpFormat::Text, Some(layout)) => with_arena_slots(g, layout),
            (DumpFormat::Text, None) => mmc_ir::text::print(g),
            (DumpFormat::Dot, _) => mmc_ir::dot::to_dot(g),
        });
        if let Some(layout) = memory {
            out.push_str(&format!(
                "{comment} arena: {} bytes{}\n",
                grouped(layout.size),
                if layout.elem_bytes.is_words() {
                    " (8 bytes per element, as the interpreter stores values)"
                } else {
                    ""
                }
            ));
        }
        out.push_str(&format!(
            "{comment} summary of {} ({label})\n",
            model.display()
        ));
        for line in GraphSummary::of(g).to_string().lines() {
            out.push_str(&format!("{comment} {line}\n"));
        }
    }
    for line in &notes {
        out.push_str(&format!("{comment} {line}\n"));
    }
    Ok(out)
}
