//! The training step: the forward graph differentiated into a micro-step program (loss,
//! gradients added to the accumulators) plus the optimizer's apply program, and the state
//! they share.

use crate::autodiff::{autodiff, grad_output, AutodiffError};
use crate::emit::Emitter;
use crate::optimizer::{apply_program, grad_acc, new_value, AdamW, OptimizedParam};
use mmc_ir::plan::{Program, StateKind, StateUpdate, MICRO_STEP_PROGRAM};
use mmc_ir::{DType, Graph, Op, TensorType};

/// What to train and how.
pub struct TrainStepSpec<'a> {
    /// The output to minimise.
    pub loss: &'a str,
    /// Whether a parameter is trained (not frozen).
    pub trainable: &'a dyn Fn(&str) -> bool,
    /// Whether weight decay applies to a trainable parameter.
    pub decay: &'a dyn Fn(&str, &TensorType) -> bool,
    pub adamw: AdamW,
}

/// The programs of one optimizer step and the state they read and write.
pub struct TrainStep {
    /// Forward + backward of one micro-batch; adds its gradients to the accumulators.
    pub micro_step: Program,
    /// Clipping and AdamW; zeroes the accumulators.
    pub apply: Program,
    /// Every persistent tensor with its kind: parameters, then per trainable parameter its
    /// accumulator and moments.
    pub state: Vec<(String, TensorType, StateKind)>,
}

/// Builds the training step of `forward`: [`autodiff`], then [`assemble`].
pub fn train_step(forward: &Graph, spec: &TrainStepSpec) -> Result<TrainStep, AutodiffError> {
    let g = autodiff(forward, spec.loss, spec.trainable)?;
    assemble(g, spec)
}

/// Builds the training step from the graph [`autodiff`] returned (forward plus backward, with
/// `grad:<name>` outputs), which the pipeline may have simplified in between: the gradients
/// are added to their accumulators, the `grad:` outputs dropped, and the optimizer's apply
/// program and the state list built. The parameters are those of `g`, in its order.
pub fn assemble(mut g: Graph, spec: &TrainStepSpec) -> Result<TrainStep, AutodiffError> {
    let scope = g.intern_scope("grad_accumulate");
    let mut updates = Vec::new();
    let mut state = Vec::new();
    let mut optimized = Vec::new();
    let params: Vec<(String, TensorType)> = g
        .params()
        .map(|(n, t, _)| (n.to_string(), t.clone()))
        .collect();
    for (name, ty) in &params {
        let (name, ty) = (name.as_str(), ty);
        let trainable = (spec.trainable)(name);
        state.push((
            name.to_string(),
            ty.clone(),
            StateKind::Parameter { trainable },
        ));
        if !trainable {
            continue;
        }
        let acc_name = grad_acc(name);
        let f32_ty = TensorType::new(DType::F32, ty.shape.clone());
        let grad = g
            .output(&grad_output(name))
            .expect("autodiff outputs a gradient for every trainable parameter");
        let mut e = Emitter {
            graph: &mut g,
            scope,
            pass: "train_step",
        };
        let acc = e.op(
            Op::Input {
                name: acc_name.clone(),
                ty: f32_ty.clone(),
            },
            &[],
        )?;
        let grad = e.cast(grad, DType::F32)?;
        let sum = e.add(acc, grad)?;
        let out = new_value(&acc_name);
        g.add_output(out.clone(), sum);
        updates.push(StateUpdate {
            output: out,
            state: acc_name.clone(),
        });
        state.push((acc_name, f32_ty.clone(), StateKind::GradAccumulator));
        state.push((
            crate::optimizer::adam_m(name),
            f32_ty.clone(),
            StateKind::OptimizerMoment,
        ));
        state.push((
            crate::optimizer::adam_v(name),
            f32_ty,
            StateKind::OptimizerMoment,
        ));
        optimized.push(OptimizedParam {
            name: name.to_string(),
            ty: ty.clone(),
            decay: (spec.decay)(name, ty),
        });
    }
    g.retain_outputs(|n, _| !n.starts_with(crate::autodiff::GRAD_PREFIX));
    let apply = apply_program(&optimized, &spec.adamw).map_err(AutodiffError::Internal)?;
    Ok(TrainStep {
        micro_step: Program::new(MICRO_STEP_PROGRAM, g, updates),
        apply,
        state,
    })
}
