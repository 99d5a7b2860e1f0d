//! `[train] recompute_budget_gb`: read as a number of GB, in range, and never together with a
//! fixed `recompute` mode, each error naming the key.

use mmc_frontend::config::{Config, ConfigError, Recompute};
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

fn parse(train: &str) -> Result<Config, ConfigError> {
    Config::parse(
        Path::new("model.toml"),
        &format!("[model]\n{TEXT}[train]\n{train}\n"),
    )
}

#[test]
fn a_budget_is_read_in_gb_and_defaults_to_none() {
    let cfg = parse("recompute_budget_gb = 40.5").unwrap();
    assert_eq!(cfg.train.recompute_budget_gb, Some(40.5));
    assert_eq!(cfg.train.recompute, Recompute::None);
    let cfg = parse("recompute_budget_gb = 12").unwrap();
    assert_eq!(cfg.train.recompute_budget_gb, Some(12.0));
    assert_eq!(parse("").unwrap().train.recompute_budget_gb, None);
    // An explicit "none" is the default mode: the budget decides.
    let cfg = parse("recompute = \"none\"\nrecompute_budget_gb = 1.0").unwrap();
    assert_eq!(cfg.train.recompute_budget_gb, Some(1.0));
}

#[test]
fn a_budget_out_of_range_names_the_key() {
    for line in [
        "recompute_budget_gb = 0.0",
        "recompute_budget_gb = -3.0",
        "recompute_budget_gb = nan",
        "recompute_budget_gb = inf",
    ] {
        let e = parse(line).expect_err(line).to_string();
        assert!(
            e.contains("[train]")
                && e.contains("`recompute_budget_gb` must be a finite number of GB > 0"),
            "{line}: {e}"
        );
    }
    let e = parse("recompute_budget_gb = \"big\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("recompute_budget_gb"), "{e}");
}

#[test]
fn a_budget_with_a_fixed_mode_is_an_error() {
    for mode in ["selective", "full"] {
        let line = format!("recompute = \"{mode}\"\nrecompute_budget_gb = 20.0");
        let e = parse(&line).expect_err(&line).to_string();
        assert!(
            e.contains("`recompute_budget_gb` (20)")
                && e.contains(&format!("`recompute = \"{mode}\"`"))
                && e.contains("give one"),
            "{mode}: {e}"
        );
    }
}
