//! The plan every test of the plan file and its load checks starts from.

use mmc_ir::plan::{
    Init, LossReduction, LrDecayStyle, LrSchedule, ModelFacts, Plan, Program, StateKind, StateSpec,
    StateUpdate, TrainSettings,
};
use mmc_ir::text::parse;
use mmc_ir::{DType, TensorType};

/// A constant learning rate of 1e-3, no warm-up.
pub fn schedule() -> LrSchedule {
    LrSchedule {
        lr: 1e-3,
        min_lr: 0.0,
        warmup_iters: 0,
        warmup_fraction: None,
        decay_style: LrDecayStyle::Constant,
    }
}

/// A plan whose programs are tiny but well formed: `micro_step` reads the parameter and
/// writes an accumulator, `apply` updates the parameter.
pub fn plan() -> Plan {
    let ty = TensorType::new(DType::F32, vec![2]);
    let state = |name: &str, kind| StateSpec {
        name: name.into(),
        ty: ty.clone(),
        init: Init::Const(0.0),
        kind,
    };
    let micro = parse(
        "graph autodiff {
  %0 = param \"w\" : f32[2]
  %1 = param \"acc\" : f32[2]
  %2 = add %0, %1 : f32[2]
  output \"acc_new\" = %2
}",
    )
    .unwrap();
    let apply = parse(
        "graph optimizer {
  %0 = param \"w\" : f32[2]
  %1 = param \"acc\" : f32[2]
  %2 = sub %0, %1 : f32[2]
  output \"w_new\" = %2
}",
    )
    .unwrap();
    Plan {
        settings: TrainSettings {
            micro_batch_size: 1,
            seq_length: 8,
            max_tiles: 0,
            grad_accum_steps: 1,
            data_parallel: 1,
            schedule: schedule(),
            loss_reduction: LossReduction::Token,
            seed: 1,
            model: ModelFacts {
                vocab_size: 16,
                img_context_token_id: None,
                tile_size: None,
                tokens_per_tile: None,
                template: None,
            },
        },
        checkpoint: None,
        state: vec![
            state("w", StateKind::Parameter { trainable: true }),
            state("acc", StateKind::GradAccumulator),
        ],
        programs: vec![
            Program::new(
                "micro_step",
                micro,
                vec![StateUpdate {
                    output: "acc_new".into(),
                    state: "acc".into(),
                }],
            ),
            Program::new(
                "apply",
                apply,
                vec![StateUpdate {
                    output: "w_new".into(),
                    state: "w".into(),
                }],
            ),
        ],
        stackings: vec![],
    }
}
