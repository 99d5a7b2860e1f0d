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
