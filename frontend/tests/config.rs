//! Loading model TOMLs and HF config.json files: both key spellings, overrides, and the error
//! for each kind of bad input.

use mmc_frontend::config::{Config, ConfigError, LossReduction};
use std::path::Path;

const TEXT: &str = r#"
[model.text]
vocab_size = 100
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
num_experts = 4
num_experts_per_tok = 2
moe_intermediate_size = 16
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("model.toml"), text)
}

fn err(text: &str) -> String {
    let e = parse(text)
        .expect_err("the config must be rejected")
        .to_string();
    assert!(!e.contains('\n'), "error is not one line: {e}");
    e
}

#[test]
fn tables_give_the_architecture_and_defaults_fill_the_rest() {
    let cfg = parse(&format!("[model]\n{TEXT}")).unwrap();
    let t = &cfg.model.text;
    assert_eq!((t.hidden_size, t.head_dim(), t.num_experts), (32, 8, 4));
    assert_eq!(t.rope_theta, 10000.0);
    assert!(!t.norm_topk_prob && !t.tie_word_embeddings);
    assert_eq!(cfg.model.img_context_token_id, 151671);
    assert_eq!(cfg.train.seq_length, 4096);
    assert_eq!(cfg.train.loss_reduction, LossReduction::Token);
    assert_eq!(cfg.parallel.tp, 1);
}

#[test]
fn both_spellings_of_renamed_hf_keys_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let old = r#"{"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
        "num_experts_per_tok": 1, "moe_intermediate_size": 8, "rope_theta": 1000000.0,
        "model_type": "qwen3_moe", "unused_key": [1, 2]}"#;
    let new = r#"{"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 4,
        "num_experts_per_tok": 1, "moe_intermediate_size": 8,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}"#;
    std::fs::write(dir.path().join("old.json"), old).unwrap();
    std::fs::write(dir.path().join("new.json"), new).unwrap();
    let toml = dir.path().join("m.toml");
    let load = |json: &str| {
        std::fs::write(&toml, format!("[model]\nhf_config = \"{json}\"\n")).unwrap();
        Config::load(&toml).unwrap().model.text
    };
    let (a, b) = (load("old.json"), load("new.json"));
    assert_eq!(a, b);
    assert_eq!((a.num_experts, a.rope_theta), (4, 1e6));
}

#[test]
fn a_table_overrides_single_keys_of_hf_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"llm_config": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 4,
            "num_experts_per_tok": 1, "moe_intermediate_size": 8}}"#,
    )
    .unwrap();
    let toml = dir.path().join("m.toml");
    std::fs::write(
        &toml,
        "[model]\nhf_config = \"config.json\"\n[model.text]\nnum_hidden_layers = 1\nnum_experts = 2\n",
    )
    .unwrap();
    let t = Config::load(&toml).unwrap().model.text;
    assert_eq!(
        (t.num_hidden_layers, t.num_experts, t.hidden_size),
        (1, 2, 32)
    );
}

#[test]
fn malformed_toml_names_the_line() {
    let e = err("[model]\nhf_config = \"x\n");
    assert!(e.starts_with("model.toml:2:"), "{e}");
}

#[test]
fn a_missing_key_is_named() {
    let e = err(&format!(
        "[model]\n{}",
        TEXT.replace("hidden_size = 32\n", "")
    ));
    assert!(
        e.contains("[model.text]") && e.contains("`hidden_size`"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_rejected() {
    let e = err(&format!("[model]\n{TEXT}hiden_size = 3\n"));
    assert!(e.contains("unknown key `hiden_size`"), "{e}");
    let e = err(&format!("[model]\n{TEXT}[train]\nmicro_batch = 2\n"));
    assert!(e.contains("micro_batch"), "{e}");
}

#[test]
fn inconsistent_values_are_explained() {
    let e = err(&format!(
        "[model]\n{}",
        TEXT.replace("num_key_value_heads = 2", "num_key_value_heads = 3")
    ));
    assert!(e.contains("multiple of `num_key_value_heads`"), "{e}");
    let e = err(&format!(
        "[model]\n{TEXT}[train]\nglobal_batch_size = 3\nmicro_batch_size = 2\n"
    ));
    assert!(e.contains("global_batch_size"), "{e}");
    let e = err(&format!(
        "[model]\n{TEXT}[train]\nloss_reduction = \"mean\"\n"
    ));
    assert!(e.contains("mean"), "{e}");
}

#[test]
fn a_missing_hf_config_names_both_places_looked() {
    let e = err("[model]\nhf_config = \"nowhere/config.json\"\n");
    assert!(
        e.contains("nowhere/config.json") && e.contains(" and "),
        "{e}"
    );
}

#[test]
fn malformed_hf_json_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{\n  \"vocab_size\": ,\n}").unwrap();
    let toml = dir.path().join("m.toml");
    std::fs::write(&toml, "[model]\nhf_config = \"config.json\"\n").unwrap();
    let e = Config::load(&toml).unwrap_err().to_string();
    assert!(e.contains("config.json:2:"), "{e}");
}

const VISION: &str = r#"
[model.vision]
hidden_size = 16
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 32
image_size = 28
patch_size = 14
"#;

#[test]
fn vision_tables_make_an_internvl_model() {
    let cfg = parse(&format!(
        "[model]\nimg_context_token_id = 99\n{TEXT}{VISION}[train]\nmax_tiles = 2\n"
    ))
    .unwrap();
    let vl = cfg.model.vision_language.expect("a vision model");
    assert_eq!(
        (vl.tile_size, vl.patches_per_side(), vl.tokens_per_tile()),
        (28, 2, 1)
    );
    assert!(vl.vision.qkv_bias && !vl.vision.use_qk_norm);
    assert_eq!(vl.projector.downsample_ratio, 0.5);
}

#[test]
fn both_internvl_config_forms_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let llm = r#"{"vocab_size": 151936, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
        "num_experts_per_tok": 1, "moe_intermediate_size": 8, "rope_theta": 1000000.0}"#;
    let ogv = format!(
        r#"{{"llm_config": {llm}, "force_image_size": 56, "downsample_ratio": 0.5,
        "ps_version": "v2", "template": "internvl2_5", "select_layer": -1,
        "vision_config": {{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "image_size": 28, "patch_size": 14, "qkv_bias": false,
        "qk_normalization": true, "initializer_factor": 0.5}}}}"#
    );
    let native = format!(
        r#"{{"text_config": {llm}, "downsample_ratio": 0.5, "image_token_id": 99,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "vision_config": {{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "image_size": [28, 28], "patch_size": [14, 14],
        "attention_bias": false, "use_qk_norm": true, "layer_scale_init_value": 0.5,
        "use_mean_pooling": true}}}}"#
    );
    std::fs::write(dir.path().join("ogv.json"), ogv).unwrap();
    std::fs::write(dir.path().join("native.json"), native).unwrap();
    let toml = dir.path().join("m.toml");
    let load = |json: &str, extra: &str| {
        std::fs::write(&toml, format!("[model]\nhf_config = \"{json}\"\n{extra}")).unwrap();
        Config::load(&toml)
    };
    let a = load("ogv.json", "").unwrap().model;
    let b = load("native.json", "").unwrap().model;
    let (va, vb) = (a.vision_language.unwrap(), b.vision_language.unwrap());
    assert_eq!(va.vision, vb.vision);
    assert_eq!((va.tile_size, vb.tile_size), (56, 28));
    assert_eq!(a.template.as_deref(), Some("internvl2_5"));
    assert_eq!(
        (a.img_context_token_id, b.img_context_token_id),
        (151671, 99)
    );
    // The TOML wins over the file.
    let c = load(
        "native.json",
        "img_context_token_id = 98\n[model.vision]\nnum_hidden_layers = 3\n",
    )
    .unwrap();
    assert_eq!(c.model.img_context_token_id, 98);
    assert_eq!(c.model.vision_language.unwrap().vision.num_hidden_layers, 3);
}

#[test]
fn unsupported_internvl_variants_are_named() {
    let e = err(&format!(
        "[model]\nimg_context_token_id = 99\n{TEXT}{VISION}[model.projector]\nps_version = \"v1\"\n"
    ));
    assert!(e.contains("[model.projector]") && e.contains("v1"), "{e}");
    let e = err(&format!(
        "[model]\nimg_context_token_id = 99\n{TEXT}{}",
        VISION.replace("image_size = 28", "image_size = 30")
    ));
    assert!(e.contains("multiple of `patch_size`"), "{e}");
    let e = err(&format!(
        "[model]\nimg_context_token_id = 500\n{TEXT}{VISION}"
    ));
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = err(&format!(
        "[model]\n{TEXT}[model.projector]\ndownsample_ratio = 0.5\n"
    ));
    assert!(e.contains("need a vision model"), "{e}");
    let e = err(&format!(
        "[model]\nimg_context_token_id = 99\n{TEXT}{VISION}[train]\nmax_tiles = 0\n"
    ));
    assert!(e.contains("max_tiles"), "{e}");
}

#[test]
fn train_values_out_of_range_name_the_key_and_the_range() {
    for (line, want) in [
        ("lr = nan", "`lr` must be a finite number >= 0, not NaN"),
        ("lr = -1e-5", "`lr` must be a finite number >= 0"),
        ("min_lr = inf", "`min_lr` must be a finite number >= 0"),
        ("min_lr = 1.0", "`min_lr` (1) is above `lr`"),
        ("adam_beta1 = 1.0", "`adam_beta1` must be in [0, 1)"),
        ("adam_beta2 = -0.5", "`adam_beta2` must be in [0, 1)"),
        ("adam_eps = 0.0", "`adam_eps` must be a finite number > 0"),
        (
            "weight_decay = -0.1",
            "`weight_decay` must be a finite number >= 0",
        ),
        (
            "clip_grad = -1.0",
            "`clip_grad` must be a finite number >= 0",
        ),
        (
            "lr_warmup_fraction = 1.5",
            "`lr_warmup_fraction` must be between 0 and 1",
        ),
        (
            "lr_warmup_fraction = -0.1",
            "`lr_warmup_fraction` must be between 0 and 1",
        ),
        (
            "lr_warmup_fraction = 0.1\nlr_warmup_iters = 5",
            "give `lr_warmup_iters` (5) or `lr_warmup_fraction` (0.1), not both",
        ),
        (
            "freeze = [\"\"]",
            "`freeze` entry \"\" is not a parameter-name prefix",
        ),
    ] {
        let e = err(&format!("[model]\n{TEXT}[train]\n{line}\n"));
        assert!(e.contains("[train]") && e.contains(want), "{line}: {e}");
    }
    // The edges of each range are fine.
    parse(&format!(
        "[model]\n{TEXT}[train]\nlr = 0.0\nadam_beta1 = 0.0\nclip_grad = 0.0\nlr_warmup_fraction = 1.0\n"
    ))
    .unwrap();
}

#[test]
fn negative_and_mistyped_numbers_name_the_key() {
    let e = err(&format!("[model]\n{TEXT}[train]\nmicro_batch_size = -1\n"));
    assert!(
        e.contains("[train] micro_batch_size") && e.contains("expected a whole number >= 0"),
        "{e}"
    );
    assert!(!e.contains("usize"), "{e}");
    let e = err(&format!("[model]\n{TEXT}[train]\nlr = \"fast\"\n"));
    assert!(
        e.contains("[train] lr") && e.contains("expected a number"),
        "{e}"
    );
    let e = err(&format!(
        "[model]\n{}",
        TEXT.replace("vocab_size = 100", "vocab_size = -100")
    ));
    assert!(
        e.contains("[model.text]") && e.contains("`vocab_size`") && !e.contains("usize"),
        "{e}"
    );
    let e = err(&format!("[model]\n{TEXT}[target]\ndevices = -2\n"));
    assert!(e.contains("[target] devices"), "{e}");
    let e = err(&format!("[model]\n{TEXT}[target]\ndevices = 0\n"));
    assert!(e.contains("`devices` must be at least 1"), "{e}");
    let e = err(&format!(
        "[model]\n{TEXT}[target]\ndevice_memory_gb = -4.0\n"
    ));
    assert!(e.contains("`device_memory_gb`"), "{e}");
}

#[test]
fn a_key_missing_from_hf_config_is_blamed_on_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let hf = r#"{"text_config": {"vocab_size": 100, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 4,
        "num_experts_per_tok": 1, "moe_intermediate_size": 8, "hidden_size": -3},
        "vision_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "patch_size": 14}}"#;
    std::fs::write(dir.path().join("config.json"), hf).unwrap();
    let toml = dir.path().join("m.toml");
    let load = |extra: &str| {
        std::fs::write(
            &toml,
            format!("[model]\nhf_config = \"config.json\"\n{extra}"),
        )
        .unwrap();
        let e = Config::load(&toml).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    };
    // A bad value from the file names the file and the section that holds it.
    let e = load("");
    assert!(
        e.contains("config.json: `text_config`: `hidden_size`") && !e.contains("m.toml:"),
        "{e}"
    );
    // Overridden in the TOML, the text part is fine; the vision part lacks `image_size`,
    // which neither the file nor the TOML gives.
    let e = load("[model.text]\nhidden_size = 32\n");
    assert!(
        e.contains("config.json: `vision_config`: missing key `image_size`")
            && e.contains("nor given in [model.vision]"),
        "{e}"
    );
    // A bad value the TOML gives is blamed on the TOML.
    let e = load("[model.text]\nhidden_size = 32\n[model.vision]\nimage_size = -28\n");
    assert!(e.contains("m.toml: [model.vision]: `image_size`"), "{e}");
}

#[test]
fn a_vision_model_must_fit_one_tile_in_its_sequence() {
    // 28-pixel tiles of 14-pixel patches, merged 2 x 2: 1 context token, 3 with <img> and
    // </img>; 4 tokens leave room for one more.
    let base =
        format!("[model]\nimg_context_token_id = 99\n{TEXT}{VISION}[train]\nmax_tiles = 2\n");
    let e = err(&format!("{base}seq_length = 3\n"));
    assert!(e.contains("cannot hold even one single-tile image"), "{e}");
    parse(&format!("{base}seq_length = 4\n")).unwrap();
}

#[test]
fn a_downsample_ratio_that_does_not_divide_the_patch_grid_is_refused() {
    // 28 / 14 = 2 patches a side; a ratio of 1/3 merges 3 x 3.
    let e = err(&format!(
        "[model]\nimg_context_token_id = 99\n{TEXT}{VISION}[model.projector]\ndownsample_ratio = 0.3333333333333333\n"
    ));
    assert!(
        e.contains("do not split") && e.contains("downsample_ratio"),
        "{e}"
    );
    let e = err(&format!(
        "[model]\nimg_context_token_id = 99\n{TEXT}{VISION}[model.projector]\ndownsample_ratio = 0.3\n"
    ));
    assert!(e.contains("`downsample_ratio` must be 1/n"), "{e}");
}

#[test]
fn the_shipped_30b_config_is_mindspeed_mms_recipe() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cfg = Config::load(&root.join("configs/internvl35-30b-a3b.toml")).unwrap();
    let t = &cfg.train;
    assert_eq!(
        (
            t.micro_batch_size,
            t.global_batch_size,
            t.seq_length,
            t.max_tiles
        ),
        (1, 16, 4096, 13)
    );
    assert_eq!(
        (t.lr, t.min_lr, t.lr_warmup_fraction, t.lr_warmup_iters),
        (1e-5, 0.0, Some(0.1), 0)
    );
    assert_eq!(t.lr_decay_style, mmc_frontend::config::LrDecayStyle::Cosine);
    assert_eq!(
        (t.weight_decay, t.clip_grad, t.adam_beta1, t.adam_beta2),
        (0.0, 0.0, 0.9, 0.999)
    );
    assert_eq!((t.loss_reduction, t.seed), (LossReduction::Sample, 42));
    assert_eq!(t.dtype, mmc_frontend::config::ComputeDType::Bf16);
    assert_eq!(t.recompute, mmc_frontend::config::Recompute::Full);
    let p = &cfg.parallel;
    assert_eq!((p.tp, p.dp, p.ep, p.zero), (1, 16, 1, 3));
    assert_eq!(cfg.target.kind, mmc_frontend::config::TargetKind::Ascend);
    assert_eq!(cfg.target.devices, 16);
    assert_eq!(cfg.model.template.as_deref(), Some("internvl2_5"));
    assert_eq!(cfg.model.img_context_token_id, 151671);

    // The Megatron-style layout keeps its own name and recipe.
    let m = Config::load(&root.join("configs/internvl35-30b-a3b-megatron.toml")).unwrap();
    assert_eq!(
        (m.parallel.tp, m.parallel.dp, m.parallel.ep, m.parallel.zero),
        (2, 8, 8, 1)
    );
    assert_eq!(m.train.global_batch_size, 64);
    assert_eq!(m.train.loss_reduction, LossReduction::Square);
    assert_eq!(m.model, cfg.model, "the two differ only in how they train");
}

#[test]
fn a_checkpoint_folder_alone_gives_the_model_config() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let ogv = Config::from_hf_dir(&fixtures.join("internvl35_tiny/checkpoint_ogv")).unwrap();
    let hf = Config::from_hf_dir(&fixtures.join("internvl35_tiny/checkpoint_hf")).unwrap();
    assert!(ogv.model.vision_language.is_some() && hf.model.vision_language.is_some());
    assert_eq!(ogv.model.text.vocab_size, 1024);
    // OpenGVLab's config.json leaves the image token to the tokenizer; transformers' names it.
    assert_eq!(ogv.model.img_context_token_id, 0);
    assert_eq!(hf.model.img_context_token_id, 1021);
    let lm = Config::from_hf_dir(&fixtures.join("qwen3_moe_tiny/checkpoint")).unwrap();
    assert!(lm.model.vision_language.is_none());
    let e = Config::from_hf_dir(&fixtures.join("no-such-folder"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-folder/config.json"), "{e}");
}
