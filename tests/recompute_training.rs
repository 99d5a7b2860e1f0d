//! Recompute through `mmc compile`: the tiny InternVL3.5 fixture trained with `recompute =
//! "full"`, `"selective"` and a memory budget takes bit for bit the steps it takes with
//! `"none"` (the same ops run, some twice), and the compile report says what was saved; a
//! budget no recompute can meet is refused, naming the key.

mod common;

use common::fixture;
use mmc::driver::{compile, compile_plan};
use mmc_frontend::config::Recompute;
use mmc_frontend::Config;
use mmc_runtime::Trainer;

fn config() -> Config {
    Config::load(&fixture("internvl35_tiny/model_ogv.toml")).expect("the tiny fixture")
}

/// The bits of each step's loss and grad norm, and every state tensor's bytes after them.
type Trained = (Vec<(u64, u64)>, Vec<(String, Vec<u8>)>);

/// Loss, grad norm and every state tensor after two steps.
fn train(cfg: &Config) -> Trained {
    let plan = compile_plan(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let mut t = Trainer::new(plan).unwrap();
    let batch = [common::internvl_image_batch()];
    let steps = (0..2)
        .map(|_| {
            let o = t.train_step(&batch, 1e-3).unwrap();
            (o.loss.to_bits(), o.grad_norm.to_bits())
        })
        .collect();
    let state = t
        .state_specs()
        .to_vec()
        .iter()
        .map(|s| (s.name.clone(), t.state(&s.name).unwrap().to_le_bytes()))
        .collect();
    (steps, state)
}

#[test]
fn every_recompute_mode_trains_bit_identically() {
    let base = config();
    let want = train(&base);
    for mode in [Recompute::Full, Recompute::Selective] {
        let mut cfg = base.clone();
        cfg.train.recompute = mode;
        let got = train(&cfg);
        assert_eq!(got.0, want.0, "{mode:?}: losses and grad norms");
        assert!(
            got.1 == want.1,
            "{mode:?}: the state differs after two steps"
        );
    }
    // A budget between full recompute's peak and none's.
    let mut cfg = base.clone();
    cfg.train.recompute_budget_gb = Some(0.0007);
    let got = train(&cfg);
    assert_eq!(got.0, want.0, "budget: losses and grad norms");
}

#[test]
fn the_report_says_what_recompute_saved() {
    let mut cfg = config();
    cfg.train.recompute = Recompute::Full;
    let report = compile(&cfg).unwrap().report.to_string();
    let line = report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("recompute"))
        .unwrap_or_else(|| panic!("no recompute line: {report}"));
    assert!(line.contains("recompute full: saves"), "{line}");
    assert!(
        !line.contains("saves 0.00 MB"),
        "full recompute saved nothing: {line}"
    );
}

#[test]
fn a_budget_no_recompute_meets_is_refused_naming_the_key() {
    let mut cfg = config();
    cfg.train.recompute_budget_gb = Some(1e-9);
    let e = format!(
        "{:#}",
        compile(&cfg).err().expect("the budget cannot be met")
    );
    assert!(e.contains("recompute_budget_gb"), "{e}");
}
