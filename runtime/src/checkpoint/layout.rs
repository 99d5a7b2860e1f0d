//! Which tensors a checkpoint stores for a plan's state: the parameters (`model*` files) and
//! the AdamW moments (`optimizer*` files), each MoE layer's per-expert tensors replaced by the
//! two stacks of [`super::experts`]. Save and load derive it from the same state, so a plan
//! recompiled from the same model (or with another schedule) fits the same checkpoint.

use super::experts::{expert_stacks, ExpertStack};
use super::store::TensorSpec;
use mmc_ir::plan::{StateKind, StateSpec};
use mmc_ir::DType;
use std::collections::HashMap;

/// Which file family a stored tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Parameters: `model*.safetensors`.
    Model,
    /// Optimizer moments: `optimizer*.safetensors`.
    Optimizer,
}

impl Family {
    /// The file stem.
    pub fn stem(self) -> &'static str {
        match self {
            Family::Model => "model",
            Family::Optimizer => "optimizer",
        }
    }
}

/// Where a stored tensor's values live in the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// One state tensor of the same name.
    Plain,
    /// The per-expert state tensors of a stack.
    Stack(ExpertStack),
}

/// One stored tensor and its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub spec: TensorSpec,
    pub family: Family,
    pub source: Source,
}

/// The stored tensors of `state` (in state order; a stack where its first expert tensor is).
/// Gradient accumulators are not stored: they are zero between steps.
pub fn stored_tensors(state: &[StateSpec]) -> Vec<Stored> {
    let mut out = Vec::new();
    for family in [Family::Model, Family::Optimizer] {
        let members: Vec<&StateSpec> = state
            .iter()
            .filter(|s| match family {
                Family::Model => matches!(s.kind, StateKind::Parameter { .. }),
                Family::Optimizer => matches!(s.kind, StateKind::OptimizerMoment),
            })
            .collect();
        let dtype: HashMap<&str, DType> = members
            .iter()
            .map(|s| (s.name.as_str(), s.ty.dtype))
            .collect();
        let stacks: Vec<ExpertStack> = expert_stacks(
            members
                .iter()
                .map(|s| (s.name.as_str(), s.ty.shape.as_slice())),
        )
        .into_iter()
        // A stack's experts must share one dtype to be stored as one tensor.
        .filter(|st| {
            let first = dtype.get(st.experts[0][0].as_str());
            st.experts
                .iter()
                .flatten()
                .all(|n| dtype.get(n.as_str()) == first)
        })
        .collect();
        let mut member_of: HashMap<&str, usize> = HashMap::new();
        for (i, st) in stacks.iter().enumerate() {
            for n in st.experts.iter().flatten() {
                member_of.insert(n.as_str(), i);
            }
        }
        let mut emitted = vec![false; stacks.len()];
        for s in members {
            match member_of.get(s.name.as_str()) {
                Some(&i) => {
                    if !emitted[i] {
                        emitted[i] = true;
                        out.push(Stored {
                            spec: TensorSpec {
                                name: stacks[i].name.clone(),
                                dtype: s.ty.dtype,
                                shape: stacks[i].shape(),
                            },
                            family,
                            source: Source::Stack(stacks[i].clone()),
                        });
                    }
                }
                None => out.push(Stored {
                    spec: TensorSpec {
                        name: s.name.clone(),
                        dtype: s.ty.dtype,
                        shape: s.ty.shape.clone(),
                    },
                    family,
                    source: Source::Plain,
                }),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmc_ir::plan::Init;
    use mmc_ir::TensorType;

    fn spec(name: &str, shape: &[usize], kind: StateKind) -> StateSpec {
        StateSpec {
            name: name.into(),
            ty: TensorType::new(DType::F32, shape.to_vec()),
            init: Init::Const(0.0),
            kind,
        }
    }

    #[test]
    fn experts_are_stacked_in_place_and_accumulators_are_left_out() {
        let p = StateKind::Parameter { trainable: true };
        let mut state = vec![spec("m.embed.weight", &[10, 4], p)];
        for e in 0..2 {
            for (proj, shape) in [
                ("gate_proj", [3, 4]),
                ("up_proj", [3, 4]),
                ("down_proj", [4, 3]),
            ] {
                let name = format!("m.layers.0.mlp.experts.{e}.{proj}.weight");
                state.push(spec(&name, &shape, p));
                state.push(spec(
                    &format!("adam_m:{name}"),
                    &shape,
                    StateKind::OptimizerMoment,
                ));
                state.push(spec(
                    &format!("grad_acc:{name}"),
                    &shape,
                    StateKind::GradAccumulator,
                ));
            }
        }
        state.push(spec("m.norm.weight", &[4], p));
        let stored = stored_tensors(&state);
        let names: Vec<(&str, Family, &[usize])> = stored
            .iter()
            .map(|s| (s.spec.name.as_str(), s.family, s.spec.shape.as_slice()))
            .collect();
        assert_eq!(
            names,
            [
                ("m.embed.weight", Family::Model, &[10, 4][..]),
                (
                    "m.layers.0.mlp.experts.gate_up_proj",
                    Family::Model,
                    &[2, 4, 6][..]
                ),
                (
                    "m.layers.0.mlp.experts.down_proj",
                    Family::Model,
                    &[2, 3, 4][..]
                ),
                ("m.norm.weight", Family::Model, &[4][..]),
                (
                    "adam_m:m.layers.0.mlp.experts.gate_up_proj",
                    Family::Optimizer,
                    &[2, 4, 6][..]
                ),
                (
                    "adam_m:m.layers.0.mlp.experts.down_proj",
                    Family::Optimizer,
                    &[2, 3, 4][..]
                ),
            ]
        );
    }
}
