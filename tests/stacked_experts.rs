//! Stacked expert state (`Plan::stackings`): a plan whose programs read each MoE layer's
//! experts as `[E, H, 2I]` / `[E, I, H]` stacks starts from the per-expert checkpoint (or the
//! per-expert random init) exactly as the unstacked plan does, trains the same first step, and
//! saves and loads checkpoints with the logical per-expert names, interchangeably with the
//! unstacked plan.
//!
//! Two stacked plans of the tiny Qwen3-MoE fixture are checked against the plan `mmc compile`
//! builds today:
//! - *stacked dense*: the frontend graph with every per-expert weight read as a slice of its
//!   stack. Slicing moves no bits and its gradient adds only zeros, so with clipping off the
//!   step is the unstacked one bit for bit: the exact test of the runtime's stacking.
//! - *routed*: the graph of `fuse_moe` (grouped GEMMs over the stacks), the plan the fusion
//!   pipeline builds; it sums the experts in another order, so it matches within rounding.

mod common;

use common::fixture;
use mmc::driver::compile_plan;
use mmc_frontend::{forward_graph, Config, ForwardOptions};
use mmc_ir::plan::{expand_stackings, LossReduction, ParamStacking, Plan, StateSpec};
use mmc_ir::{Graph, Op, Tensor};
use mmc_passes::fuse::moe::fuse_moe;
use mmc_passes::optimizer::AdamW;
use mmc_passes::{train_step, TrainStepSpec};
use mmc_runtime::checkpoint::load::{load_into, locate, LoadOptions};
use mmc_runtime::checkpoint::save::{SaveOptions, Saver};
use mmc_runtime::checkpoint::state::{DataState, TrainingState};
use mmc_runtime::data::loader::assemble;
use mmc_runtime::data::pack::PackedMicroBatch;
use mmc_runtime::{MicroBatch, Trainer};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const SEQ: usize = 24;

/// The fixture's config (per-expert HF checkpoint, 8 experts, top-2) with clipping off, so
/// the global gradient norm (a sum in another order over a stack) does not scale the step.
fn config(from_checkpoint: bool) -> Config {
    let path = if from_checkpoint {
        fixture("qwen3_moe_tiny/model.toml")
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/qwen3-moe-tiny.toml")
    };
    let mut cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    cfg.train.clip_grad = 0.0;
    cfg.train.weight_decay = 0.01;
    cfg.train.micro_batch_size = 2;
    cfg.train.global_batch_size = 2;
    cfg.train.seq_length = SEQ;
    cfg
}

/// The forward graph exactly as `compile_plan` declares it.
fn forward(cfg: &Config) -> Graph {
    let accum = cfg.train.global_batch_size / (cfg.train.micro_batch_size * cfg.parallel.dp);
    forward_graph(
        cfg,
        ForwardOptions {
            logits: false,
            aux_loss_scale: Some(1.0 / (accum * cfg.parallel.dp) as f64),
        },
    )
    .unwrap()
    .graph
}

/// `g` with every parameter that is a part of `stackings` read out of its stack by slice,
/// reshape and transpose (primitives only).
fn read_from_stacks(g: &Graph, stackings: &[ParamStacking]) -> Graph {
    let mut part_of = HashMap::new();
    for (i, s) in stackings.iter().enumerate() {
        for (j, p) in s.parts.iter().enumerate() {
            part_of.insert(p.name.clone(), (i, j));
        }
    }
    let mut out = Graph::new(g.stage);
    let mut map = HashMap::new();
    let mut stacks: HashMap<usize, mmc_ir::Value> = HashMap::new();
    for n in g.nodes() {
        let scope = out.intern_scope(g.scope_name(n.scope));
        let add = |out: &mut Graph, op: Op, ins: &[mmc_ir::Value]| {
            let id = out.add_node(op, ins, scope).unwrap();
            out.result(id)
        };
        let part = match &n.op {
            Op::Param { name, .. } => part_of.get(name).copied(),
            _ => None,
        };
        let v = match part {
            Some((i, j)) => {
                let s = &stackings[i];
                let stack = *stacks.entry(i).or_insert_with(|| {
                    add(
                        &mut out,
                        Op::Param {
                            name: s.stacked.clone(),
                            ty: s.ty.clone(),
                        },
                        &[],
                    )
                });
                let p = &s.parts[j];
                let a = s.ty.shape[1];
                let sl = add(
                    &mut out,
                    Op::Slice {
                        start: vec![p.expert, 0, p.column],
                        end: vec![p.expert + 1, a, p.column + p.width],
                    },
                    &[stack],
                );
                let r = add(
                    &mut out,
                    Op::Reshape {
                        shape: vec![a, p.width],
                    },
                    &[sl],
                );
                if p.transposed {
                    add(&mut out, Op::Permute { perm: vec![1, 0] }, &[r])
                } else {
                    r
                }
            }
            None => {
                let ins: Vec<_> = n.inputs.iter().map(|v| map[v]).collect();
                let id = out.add_node(n.op.clone(), &ins, scope).unwrap();
                out.result(id)
            }
        };
        map.insert(n.outputs[0], v);
    }
    for (name, v) in g.outputs() {
        out.add_output(name.clone(), map[v]);
    }
    out
}

/// The training plan of a forward graph that reads `stackings`, laid out as plan emission
/// does it: the training step's state expanded to the logical tensors, which get the
/// unstacked plan's initialisers by name.
fn stacked_plan(cfg: &Config, unstacked: &Plan, forward: &Graph, params: &[ParamStacking]) -> Plan {
    let t = &cfg.train;
    let step = train_step(
        forward,
        &TrainStepSpec {
            loss: "loss",
            trainable: &|_| true,
            decay: &|_, ty| t.weight_decay_1d || ty.rank() > 1,
            adamw: AdamW {
                beta1: t.adam_beta1,
                beta2: t.adam_beta2,
                eps: t.adam_eps,
                weight_decay: t.weight_decay,
                clip_grad: t.clip_grad,
            },
        },
    )
    .unwrap();
    let (state, stackings) = expand_stackings(step.state, params).unwrap();
    let logical: HashMap<&str, &StateSpec> = unstacked
        .state
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let state: Vec<StateSpec> = state
        .into_iter()
        .map(|(name, ty, kind)| {
            let s = logical
                .get(name.as_str())
                .unwrap_or_else(|| panic!("`{name}` is not in the unstacked plan"));
            assert_eq!((&s.ty, s.kind), (&ty, kind), "{name}");
            (*s).clone()
        })
        .collect();
    assert_eq!(state.len(), unstacked.state.len());
    let plan = Plan {
        settings: unstacked.settings.clone(),
        checkpoint: unstacked.checkpoint.clone(),
        state,
        programs: vec![step.micro_step, step.apply],
        stackings,
    };
    // Through the plan file, so its load checks see the stackings.
    Plan::from_bytes(Path::new("stacked.plan"), &plan.to_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

struct Plans {
    unstacked: Plan,
    dense: Plan,
    routed: Plan,
}

fn plans(from_checkpoint: bool) -> Plans {
    let cfg = config(from_checkpoint);
    // `mmc compile`'s plan routes the MoE and fuses everything; its state is logical, so it
    // lends its initialisers to the unfused, unstacked plan built here from the frontend graph.
    let compiled = compile_plan(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        !compiled.stackings.is_empty(),
        "mmc compile stacks the experts"
    );
    let fwd = forward(&cfg);
    let unstacked = stacked_plan(&cfg, &compiled, &fwd, &[]);
    let (routed, report) = fuse_moe(&fwd).unwrap();
    assert_eq!(report.layers.len(), 2);
    // Each layer's stacks are mmc's checkpoint stacks: 8 experts, [E, H, 2I] and [E, I, H].
    assert_eq!(
        report.stackings[0].stacked,
        "model.layers.0.mlp.experts.gate_up_proj"
    );
    assert_eq!(report.stackings[0].ty.shape, [8, 64, 64]);
    assert_eq!(report.stackings[1].ty.shape, [8, 32, 64]);
    let dense = read_from_stacks(&fwd, &report.stackings);
    mmc_ir::verify(&dense).unwrap();
    Plans {
        dense: stacked_plan(&cfg, &unstacked, &dense, &report.stackings),
        routed: stacked_plan(&cfg, &unstacked, &routed, &report.stackings),
        unstacked,
    }
}

/// One micro-batch of two rows: a sample of 20 tokens and one of 24.
fn batch() -> Vec<MicroBatch> {
    let row = |len: usize, salt: i64| {
        let ids: Vec<i64> = (0..SEQ)
            .map(|i| {
                if i < len {
                    1 + (i as i64 * 37 + salt) % 1000
                } else {
                    0
                }
            })
            .collect();
        (
            ids.clone(),
            (0..SEQ)
                .map(|i| if i > 0 && i < len { ids[i] } else { -100 })
                .collect::<Vec<i64>>(),
            (0..SEQ)
                .map(|i| if i < len { i as i64 } else { 0 })
                .collect::<Vec<i64>>(),
            (0..SEQ).map(|i| (i < len) as i64).collect::<Vec<i64>>(),
        )
    };
    let (a, b) = (row(20, 0), row(24, 11));
    let packed = PackedMicroBatch {
        input_ids: [a.0, b.0].concat(),
        labels: [a.1, b.1].concat(),
        position_ids: [a.2, b.2].concat(),
        segment_ids: [a.3, b.3].concat(),
        pixel_values: Vec::new(),
        samples: 2,
        tiles_used: 0,
    };
    assemble(&[packed], 2, SEQ, 0, None, LossReduction::Token).0
}

/// Saves the trainer as iteration `steps` into `dir/<tag>`; returns the iteration folder.
fn save(trainer: &Trainer, dir: &Path, tag: &str) -> PathBuf {
    let saver = Saver::new(&dir.join(tag), SaveOptions::default()).unwrap();
    let state = TrainingState {
        iteration: trainer.steps_done(),
        data: DataState::Tensors { global_batch: 1 },
        rng: None,
        plan_sha256: None,
    };
    saver.save(trainer, &state).unwrap()
}

/// The tensors of an iteration folder's safetensors files, by name, as bytes.
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let ck = mmc_runtime::Checkpoint::open(&p).unwrap();
            let names: Vec<String> = ck.names().map(str::to_string).collect();
            for n in names {
                let raw = ck.raw(&n).unwrap();
                let shape = ck.shape(&n).unwrap().to_vec();
                out.insert(n, (format!("{:?}", raw.dtype), shape, raw.bytes.to_vec()));
            }
        }
    }
    out
}

/// Every logical state tensor of two trainers, bit for bit.
fn assert_same_state(what: &str, a: &Trainer, b: &Trainer) {
    let names: Vec<&str> = a.state_specs().iter().map(|s| s.name.as_str()).collect();
    let mut other: Vec<&str> = b.state_specs().iter().map(|s| s.name.as_str()).collect();
    let mut mine = names.clone();
    mine.sort_unstable();
    other.sort_unstable();
    assert_eq!(mine, other, "{what}: the logical state differs");
    for n in names {
        let (x, y): (Tensor, Tensor) = (
            a.state(n).unwrap().into_owned(),
            b.state(n).unwrap().into_owned(),
        );
        assert!(x.to_le_bytes() == y.to_le_bytes(), "{what}: `{n}` differs");
    }
}

#[test]
fn stacked_experts_start_from_the_per_expert_checkpoint_and_train_the_same_step() {
    let p = plans(true);
    assert!(p.unstacked.stackings.is_empty());
    // gate_up, down, their accumulators and both moments, per layer.
    assert_eq!(p.dense.stackings.len(), 2 * 2 * 4);
    let data = batch();
    let mut unstacked = Trainer::new(p.unstacked.clone()).unwrap();
    let mut dense = Trainer::new(p.dense.clone()).unwrap();
    let mut routed = Trainer::new(p.routed.clone()).unwrap();
    // The stacks hold the checkpoint's per-expert tensors.
    assert_same_state("loaded", &dense, &unstacked);
    assert_same_state("loaded", &routed, &unstacked);
    assert_eq!(dense.state_bytes(), unstacked.state_bytes());
    let want = unstacked.train_step(&data, 1e-3).unwrap();
    let got = dense.train_step(&data, 1e-3).unwrap();
    let fused = routed.train_step(&data, 1e-3).unwrap();
    eprintln!(
        "first-step loss: unstacked {}, stacked dense {}, routed {}",
        want.loss, got.loss, fused.loss
    );
    assert_eq!(got.loss.to_bits(), want.loss.to_bits());
    assert_eq!(got.aux_loss.to_bits(), want.aux_loss.to_bits());
    assert!(
        ((fused.loss - want.loss) / want.loss).abs() < 1e-5,
        "routed loss {} vs {}",
        fused.loss,
        want.loss
    );
    assert!(
        ((fused.grad_norm - want.grad_norm) / want.grad_norm).abs() < 1e-4,
        "routed grad norm {} vs {}",
        fused.grad_norm,
        want.grad_norm
    );

    // After the step: the same checkpoint, file for file.
    let tmp = tempfile::tempdir().unwrap();
    let a = save(&unstacked, tmp.path(), "unstacked");
    let b = save(&dense, tmp.path(), "dense");
    let c = save(&routed, tmp.path(), "routed");
    let (ta, tb, tc) = (tensors(&a), tensors(&b), tensors(&c));
    assert!(ta.contains_key("model.layers.1.mlp.experts.gate_up_proj"));
    assert!(ta.contains_key("adam_v:model.layers.1.mlp.experts.down_proj"));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (n, x) in &ta {
        assert!(*x == tb[n], "stacked dense: `{n}` differs after one step");
    }
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    // The routed plan's checkpoint has the same tensors, within rounding.
    assert_eq!(ta.keys().collect::<Vec<_>>(), tc.keys().collect::<Vec<_>>());
    let mut worst = 0.0f64;
    for (n, (dtype, shape, bytes)) in &tc {
        assert_eq!((dtype, shape), (&ta[n].0, &ta[n].1), "{n}");
        let f = |b: &[u8]| -> Vec<f64> {
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect()
        };
        let (x, y) = (f(bytes), f(&ta[n].2));
        let num: f64 = x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = y.iter().map(|b| b * b).sum();
        let err = (num / den.max(1e-300)).sqrt();
        worst = worst.max(err);
        assert!(err <= 1e-5, "routed: `{n}` relative error {err:.2e}");
    }
    eprintln!("routed checkpoint: worst relative error {worst:.2e}");
}

#[test]
fn checkpoints_move_between_stacked_and_unstacked_plans_bit_for_bit() {
    let p = plans(true);
    let data = batch();
    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions { optimizer: true };
    // Saved by the stacked plan, loaded into the unstacked one, and the other way.
    for (from, into) in [(&p.dense, &p.unstacked), (&p.unstacked, &p.routed)] {
        let mut a = Trainer::new(from.clone()).unwrap();
        a.train_step(&data, 1e-3).unwrap();
        let tag = format!("from{}", from.stackings.len());
        let dir = save(&a, tmp.path(), &tag);
        let mut b = Trainer::new(into.clone()).unwrap();
        let located = locate(&dir).unwrap().unwrap();
        load_into(&located, &mut b, opts).unwrap();
        assert_same_state("moved", &b, &a);
    }
}

#[test]
fn a_stacked_plan_resumes_exactly() {
    let p = plans(true);
    let data = batch();
    let mut straight = Trainer::new(p.dense.clone()).unwrap();
    straight.train_step(&data, 1e-3).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = save(&straight, tmp.path(), "resume");
    let second = straight.train_step(&data, 1e-3).unwrap();
    let mut resumed = Trainer::new(p.dense).unwrap();
    load_into(
        &locate(&dir).unwrap().unwrap(),
        &mut resumed,
        LoadOptions { optimizer: true },
    )
    .unwrap();
    resumed.set_steps_done(1);
    let again = resumed.train_step(&data, 1e-3).unwrap();
    assert_eq!(again.loss.to_bits(), second.loss.to_bits());
    assert_same_state("resumed", &resumed, &straight);
}

#[test]
fn random_init_fills_the_stacks_as_the_per_expert_initialisers_would() {
    let p = plans(false);
    assert!(p.unstacked.checkpoint.is_none());
    let unstacked = Trainer::new(p.unstacked).unwrap();
    let routed = Trainer::new(p.routed).unwrap();
    assert_same_state("random init", &routed, &unstacked);
    assert_eq!(routed.parameters(), unstacked.parameters());
    // The logical view names the per-expert tensors; the stacks are internal.
    assert!(routed
        .state("model.layers.0.mlp.experts.7.down_proj.weight")
        .is_some());
    assert!(routed
        .state("model.layers.0.mlp.experts.down_proj")
        .is_some());
    assert!(unstacked
        .state("model.layers.0.mlp.experts.down_proj")
        .is_none());
}
