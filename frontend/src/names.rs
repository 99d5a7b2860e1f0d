//! Checkpoint layouts: where each parameter's value lives in the HF checkpoints mmc reads.
//!
//! mmc names parameters after the OpenGVLab InternVL layout (and the `Qwen3MoeForCausalLM`
//! layout for a text-only model). transformers' native InternVL stores the vision tower and the
//! projector under other names and keeps q, k and v apart; the rules below map each of our names
//! to its tensors there. The language model's keys are the same in both layouts as written on
//! disk (`language_model.model.*`); the in-memory spelling (`model.language_model.*` with a
//! top-level `lm_head.weight`) is read too.

use mmc_ir::WeightSource;

/// Renames inside one InternViT layer: ours, then transformers' (after `encoder.layer.N.`).
const VIT_LAYER_RULES: &[(&str, &str)] = &[
    ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."),
    ("ls1", "lambda_1"),
    ("ls2", "lambda_2"),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.", "mlp."),
];

/// Renames of the ViT embeddings (after `embeddings.`).
const VIT_EMBEDDING_RULES: &[(&str, &str)] = &[
    ("class_embedding", "cls_token"),
    ("patch_embedding.", "patch_embeddings.projection."),
    ("position_embedding", "position_embeddings"),
];

/// Renames of the projector: `mlp1.<i>.` to `multi_modal_projector.<name>.`.
const PROJECTOR_RULES: &[(&str, &str)] = &[
    ("mlp1.0.", "layer_norm."),
    ("mlp1.1.", "linear_1."),
    ("mlp1.3.", "linear_2."),
];

/// How a checkpoint names its tensors, detected from the names it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// The model's own names (OpenGVLab InternVL, or Qwen3MoeForCausalLM).
    Native,
    /// transformers' InternVL: `<prefix>vision_tower.*`, `<prefix>multi_modal_projector.*`,
    /// and the language model under `language_model.model.*` or `model.language_model.*`.
    Transformers {
        /// `""` as written by `save_pretrained`, `"model."` for in-memory state dicts.
        prefix: String,
        /// Whether the language model is spelled `model.language_model.*` + `lm_head.weight`.
        lm_in_memory_names: bool,
    },
}

impl CheckpointLayout {
    /// Recognises the layout from the tensor names of a checkpoint.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> CheckpointLayout {
        let mut layout = CheckpointLayout::Native;
        let mut lm_in_memory = false;
        for n in names {
            if n.starts_with("model.language_model.") {
                lm_in_memory = true;
            }
            for prefix in ["", "model."] {
                if n.starts_with(&format!("{prefix}vision_tower.")) {
                    layout = CheckpointLayout::Transformers {
                        prefix: prefix.to_string(),
                        lm_in_memory_names: false,
                    };
                }
            }
        }
        if let CheckpointLayout::Transformers {
            lm_in_memory_names, ..
        } = &mut layout
        {
            *lm_in_memory_names = lm_in_memory;
        }
        layout
    }

    /// Where the parameter `name` (mmc's naming) is stored in a checkpoint of this layout.
    pub fn source(&self, name: &str) -> WeightSource {
        let CheckpointLayout::Transformers {
            prefix,
            lm_in_memory_names,
        } = self
        else {
            return WeightSource::Tensor(name.to_string());
        };
        let one = |s: String| WeightSource::Tensor(s);
        if let Some(rest) = name.strip_prefix("language_model.") {
            if !lm_in_memory_names {
                return one(name.to_string());
            }
            return match rest.strip_prefix("model.") {
                Some(inner) => one(format!("model.language_model.{inner}")),
                None => one(rest.to_string()),
            };
        }
        for (ours, theirs) in PROJECTOR_RULES {
            if let Some(rest) = name.strip_prefix(ours) {
                return one(format!("{prefix}multi_modal_projector.{theirs}{rest}"));
            }
        }
        let Some(vit) = name.strip_prefix("vision_model.") else {
            return one(name.to_string());
        };
        let tower = format!("{prefix}vision_tower.");
        if let Some(rest) = vit.strip_prefix("embeddings.") {
            for (ours, theirs) in VIT_EMBEDDING_RULES {
                if let Some(tail) = rest.strip_prefix(ours) {
                    return one(format!("{tower}embeddings.{theirs}{tail}"));
                }
            }
        }
        if let Some(rest) = vit.strip_prefix("encoder.layers.") {
            if let Some((layer, inner)) = rest.split_once('.') {
                let base = format!("{tower}encoder.layer.{layer}.");
                if let Some(kind) = inner.strip_prefix("attn.qkv.") {
                    return WeightSource::Concat {
                        parts: ["q", "k", "v"]
                            .iter()
                            .map(|p| format!("{base}attention.{p}_proj.{kind}"))
                            .collect(),
                        axis: 0,
                    };
                }
                for (ours, theirs) in VIT_LAYER_RULES {
                    if let Some(tail) = inner.strip_prefix(ours) {
                        return one(format!("{base}{theirs}{tail}"));
                    }
                }
            }
        }
        one(format!("{tower}{vit}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> WeightSource {
        WeightSource::Tensor(s.into())
    }

    #[test]
    fn layouts_are_recognised() {
        assert_eq!(
            CheckpointLayout::detect(["language_model.model.norm.weight", "vision_model.x"]),
            CheckpointLayout::Native
        );
        assert_eq!(
            CheckpointLayout::detect(["vision_tower.embeddings.cls_token"]),
            CheckpointLayout::Transformers {
                prefix: String::new(),
                lm_in_memory_names: false
            }
        );
        assert_eq!(
            CheckpointLayout::detect([
                "model.vision_tower.embeddings.cls_token",
                "model.language_model.norm.weight"
            ]),
            CheckpointLayout::Transformers {
                prefix: "model.".into(),
                lm_in_memory_names: true
            }
        );
    }

    #[test]
    fn transformers_names() {
        let l = CheckpointLayout::Transformers {
            prefix: String::new(),
            lm_in_memory_names: false,
        };
        assert_eq!(
            l.source("vision_model.embeddings.class_embedding"),
            t("vision_tower.embeddings.cls_token")
        );
        assert_eq!(
            l.source("vision_model.embeddings.patch_embedding.bias"),
            t("vision_tower.embeddings.patch_embeddings.projection.bias")
        );
        assert_eq!(
            l.source("vision_model.encoder.layers.3.ls2"),
            t("vision_tower.encoder.layer.3.lambda_2")
        );
        assert_eq!(
            l.source("vision_model.encoder.layers.0.norm1.bias"),
            t("vision_tower.encoder.layer.0.layernorm_before.bias")
        );
        assert_eq!(
            l.source("vision_model.encoder.layers.1.attn.qkv.weight"),
            WeightSource::Concat {
                parts: vec![
                    "vision_tower.encoder.layer.1.attention.q_proj.weight".into(),
                    "vision_tower.encoder.layer.1.attention.k_proj.weight".into(),
                    "vision_tower.encoder.layer.1.attention.v_proj.weight".into(),
                ],
                axis: 0
            }
        );
        assert_eq!(
            l.source("mlp1.3.weight"),
            t("multi_modal_projector.linear_2.weight")
        );
        assert_eq!(
            l.source("language_model.model.layers.0.mlp.experts.5.up_proj.weight"),
            t("language_model.model.layers.0.mlp.experts.5.up_proj.weight")
        );
        let m = CheckpointLayout::Transformers {
            prefix: "model.".into(),
            lm_in_memory_names: true,
        };
        assert_eq!(
            m.source("language_model.lm_head.weight"),
            t("lm_head.weight")
        );
        assert_eq!(
            m.source("language_model.model.embed_tokens.weight"),
            t("model.language_model.embed_tokens.weight")
        );
        assert_eq!(
            m.source("mlp1.0.bias"),
            t("model.multi_modal_projector.layer_norm.bias")
        );
    }
}
