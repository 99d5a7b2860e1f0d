//! The compile pipeline shared by `mmc compile` and the end-to-end tests: configuration to
//! forward graph, checkpoint check, training step, plan.

use anyhow::{bail, Context, Result};
use mmc_codegen::{build_plan, PlanRequest, Weights};
use mmc_frontend::config::{Recompute, TargetKind};
use mmc_frontend::{forward_graph, CheckpointLayout, Config, ForwardOptions};
use mmc_ir::plan::{ModelFacts, Plan, TrainSettings};
use mmc_passes::optimizer::AdamW;
use mmc_runtime::weights::param_specs;
use mmc_runtime::Checkpoint;

/// Whether `name` is under one of the `freeze` prefixes (whole dotted segments).
pub fn frozen(freeze: &[String], name: &str) -> bool {
    freeze.iter().any(|p| {
        let p = p.trim_end_matches('.');
        name == p || name.starts_with(&format!("{p}."))
    })
}

/// The chat templates the data pipeline implements.
pub const TEMPLATES: &[&str] = &["internvl2_5"];

/// Refuses the settings that parse but that this version cannot act on yet, naming the key:
/// a setting mmc accepts must take effect.
pub fn check_buildable(cfg: &Config) -> Result<()> {
    let model = cfg.path.display();
    let t = &cfg.target;
    if t.kind == TargetKind::Ascend {
        bail!("{model}: [target] kind = \"ascend\": the Ascend target is not built yet; use kind = \"cpu\"");
    }
    if t.devices != 1 {
        bail!(
            "{model}: [target] devices = {}: running on more than one device is not built yet (it comes with data, tensor and expert parallelism); set devices = 1",
            t.devices
        );
    }
    if let Some(gb) = t.device_memory_gb {
        bail!(
            "{model}: [target] device_memory_gb = {gb}: fitting a plan to a device's memory is not built yet (it comes with the memory planner); remove the key"
        );
    }
    if cfg.train.recompute != Recompute::None {
        let mode = match cfg.train.recompute {
            Recompute::Full => "full",
            _ => "selective",
        };
        bail!(
            "{model}: [train] recompute = \"{mode}\": recomputation is not built yet (it comes with the compiler passes); use recompute = \"none\""
        );
    }
    if let Some(tpl) = &cfg.model.template {
        if !TEMPLATES.contains(&tpl.as_str()) {
            bail!(
                "{model}: [model] template = \"{tpl}\": mmc's data pipeline has only the {} template",
                TEMPLATES.join(", ")
            );
        }
    }
    let par = &cfg.parallel;
    if par.tp * par.dp * par.ep > 1 || par.zero != 0 {
        bail!(
            "{model}: tensor, data and expert parallelism ([parallel] tp={}, dp={}, ep={}, zero={}) are not built yet; set them to 1 (and zero = 0)",
            par.tp,
            par.dp,
            par.ep,
            par.zero
        );
    }
    Ok(())
}

/// Compiles a loaded model configuration into a training plan.
pub fn compile_plan(cfg: &Config) -> Result<Plan> {
    check_buildable(cfg)?;
    let model = &cfg.path;
    let par = &cfg.parallel;
    let train = &cfg.train;
    let accum = train.global_batch_size / (train.micro_batch_size * par.dp);
    let declared = forward_graph(
        cfg,
        ForwardOptions {
            logits: false,
            aux_loss_scale: Some(1.0 / (accum * par.dp) as f64),
        },
    )?;
    let forward = &declared.graph;

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
    let trainable = |name: &str| !frozen(&train.freeze, name);
    if !train.freeze.is_empty() && !forward.params().any(|(n, _, _)| trainable(n)) {
        bail!(
            "{}: [train] freeze = {:?} freezes every parameter, so there is nothing to train",
            model.display(),
            train.freeze
        );
    }
    let decay_1d = train.weight_decay_1d;
    let decay = |_: &str, ty: &mmc_ir::TensorType| decay_1d || ty.rank() > 1;

    let checkpoint = match &cfg.model.init_from_hf_path {
        Some(init) => {
            let dir = cfg.resolve_path(init, "init_from_hf_path")?;
            let ckpt = Checkpoint::open(&dir)?;
            let layout = CheckpointLayout::detect(ckpt.names());
            ckpt.check(&param_specs(forward, |n| layout.source(n)))?;
            let dir = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            Some((dir, layout))
        }
        None => None,
    };
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
    let plan = build_plan(PlanRequest {
        forward,
        weights,
        settings,
        trainable: &trainable,
        decay: &decay,
        adamw: AdamW {
            beta1: train.adam_beta1,
            beta2: train.adam_beta2,
            eps: train.adam_eps,
            weight_decay: train.weight_decay,
            clip_grad: train.clip_grad,
        },
    })?;
    Ok(plan)
}
