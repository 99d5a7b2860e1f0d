//! The optimizer step as a graph: global gradient-norm clipping and AdamW with bias correction
//! and decoupled weight decay, following `torch.optim.AdamW` and
//! `torch.nn.utils.clip_grad_norm_` operation by operation.
//!
//! The step count and the learning rate are per-step scalar inputs (`step`, `lr`), so one
//! compiled program serves every step of any schedule. Optimizer state is f32.

use crate::emit::{EmitResult, Emitter, PassError};
use mmc_ir::plan::{Program, StateUpdate, APPLY_PROGRAM, GRAD_NORM_OUTPUT, LR_INPUT, STEP_INPUT};
use mmc_ir::{BinaryOp, DType, FusedOp, Graph, Op, Stage, TensorType, UnaryOp, Value};

/// State names of the optimizer, derived from a parameter's name.
pub fn grad_acc(param: &str) -> String {
    format!("grad_acc:{param}")
}
pub fn adam_m(param: &str) -> String {
    format!("adam_m:{param}")
}
pub fn adam_v(param: &str) -> String {
    format!("adam_v:{param}")
}

/// The output of a program that becomes the new value of state `state`.
pub fn new_value(state: &str) -> String {
    format!("new:{state}")
}

/// AdamW and clipping settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub clip_grad: f64,
}

/// A parameter the optimizer updates.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizedParam {
    pub name: String,
    pub ty: TensorType,
    /// Whether weight decay applies to it.
    pub decay: bool,
}

fn scalar_to(e: &mut Emitter, s: Value, shape: &[usize]) -> EmitResult {
    let ones = vec![1; shape.len()];
    let r = e.reshape(s, &ones)?;
    e.broadcast(r, shape)
}

fn scalar(e: &mut Emitter, v: f64) -> EmitResult {
    e.full(v, TensorType::scalar(DType::F32))
}

/// The apply program: reads the accumulated gradients, clips them, updates every parameter
/// and both moments, and zeroes the accumulators for the next step.
pub fn apply_program(params: &[OptimizedParam], opt: &AdamW) -> Result<Program, PassError> {
    let mut g = Graph::new(Stage::Optimizer);
    let scope = g.intern_scope("optimizer");
    let mut e = Emitter {
        graph: &mut g,
        scope,
        pass: "optimizer",
    };
    let f32s = TensorType::scalar(DType::F32);
    let step = e.op(
        Op::Input {
            name: STEP_INPUT.into(),
            ty: f32s.clone(),
        },
        &[],
    )?;
    let lr = e.op(
        Op::Input {
            name: LR_INPUT.into(),
            ty: f32s,
        },
        &[],
    )?;

    struct Slot {
        p: Value,
        grad: Value,
        m: Value,
        v: Value,
    }
    let mut slots = Vec::with_capacity(params.len());
    for p in params {
        let ty = TensorType::new(DType::F32, p.ty.shape.clone());
        let input = |e: &mut Emitter, name: String| {
            e.op(
                Op::Input {
                    name,
                    ty: ty.clone(),
                },
                &[],
            )
        };
        let pv = e.op(
            Op::Param {
                name: p.name.clone(),
                ty: ty.clone(),
            },
            &[],
        )?;
        slots.push(Slot {
            p: pv,
            grad: input(&mut e, grad_acc(&p.name))?,
            m: input(&mut e, adam_m(&p.name))?,
            v: input(&mut e, adam_v(&p.name))?,
        });
    }

    // Global L2 norm of all gradients, before clipping.
    let mut total = scalar(&mut e, 0.0)?;
    for s in &slots {
        let part = e.op(Op::Fused(FusedOp::SumSquares), &[s.grad])?;
        total = e.add(total, part)?;
    }
    let norm = e.unary(UnaryOp::Sqrt, total)?;
    e.graph.add_output(GRAD_NORM_OUTPUT, norm);
    let clip = if opt.clip_grad > 0.0 {
        // clip_coef = min(max_norm / (norm + 1e-6), 1), as clip_grad_norm_ does.
        let tiny = scalar(&mut e, 1e-6)?;
        let d = e.add(norm, tiny)?;
        let max = scalar(&mut e, opt.clip_grad)?;
        let c = e.div(max, d)?;
        let one = scalar(&mut e, 1.0)?;
        Some(e.binary(BinaryOp::Min, c, one)?)
    } else {
        None
    };

    // Bias corrections and step size (per-step scalars).
    let b1 = scalar(&mut e, opt.beta1)?;
    let b2 = scalar(&mut e, opt.beta2)?;
    let one = scalar(&mut e, 1.0)?;
    let b1t = e.binary(BinaryOp::Pow, b1, step)?;
    let b2t = e.binary(BinaryOp::Pow, b2, step)?;
    let bc1 = e.sub(one, b1t)?;
    let bc2 = e.sub(one, b2t)?;
    let step_size = e.div(lr, bc1)?;
    let bc2_sqrt = e.unary(UnaryOp::Sqrt, bc2)?;
    let decay = if opt.weight_decay != 0.0 {
        let wd = e.scale(lr, opt.weight_decay)?;
        Some(e.sub(one, wd)?)
    } else {
        None
    };

    let mut updates = Vec::new();
    for (p, s) in params.iter().zip(&slots) {
        let shape = &p.ty.shape;
        // The clipped gradient, emitted once per reader (the two moments) rather than shared,
        // so that elementwise fusion puts it inside each moment's kernel instead of storing a
        // clipped copy of the gradient (a parameter-sized temporary).
        let clipped = |e: &mut Emitter| match clip {
            Some(c) => {
                let cb = scalar_to(e, c, shape)?;
                e.mul(s.grad, cb)
            }
            None => Ok(s.grad),
        };
        let mut param = s.p;
        if let (true, Some(d)) = (p.decay, decay) {
            let db = scalar_to(&mut e, d, shape)?;
            param = e.mul(param, db)?;
        }
        // exp_avg.lerp_(grad, 1 - beta1)
        let grad = clipped(&mut e)?;
        let diff = e.sub(grad, s.m)?;
        let step_m = e.scale(diff, 1.0 - opt.beta1)?;
        let m = e.add(s.m, step_m)?;
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let v_decayed = e.scale(s.v, opt.beta2)?;
        let grad = clipped(&mut e)?;
        let g2 = e.mul(grad, grad)?;
        let g2 = e.scale(g2, 1.0 - opt.beta2)?;
        let v = e.add(v_decayed, g2)?;
        // denom = sqrt(v) / sqrt(bias_correction2) + eps
        let sv = e.unary(UnaryOp::Sqrt, v)?;
        let bcs = scalar_to(&mut e, bc2_sqrt, shape)?;
        let denom = e.div(sv, bcs)?;
        let eps = e.konst(opt.eps, denom)?;
        let denom = e.add(denom, eps)?;
        // param.addcdiv_(exp_avg, denom, value=-step_size)
        let ratio = e.div(m, denom)?;
        let ss = scalar_to(&mut e, step_size, shape)?;
        let delta = e.mul(ratio, ss)?;
        let new_p = e.sub(param, delta)?;
        let zeros = e.konst(0.0, s.grad)?;
        for (state, value) in [
            (p.name.clone(), new_p),
            (adam_m(&p.name), m),
            (adam_v(&p.name), v),
            (grad_acc(&p.name), zeros),
        ] {
            let out = new_value(&state);
            e.graph.add_output(out.clone(), value);
            updates.push(StateUpdate { output: out, state });
        }
    }
    Ok(Program::new(APPLY_PROGRAM, g, updates))
}
