//! Fuzzes the model TOML and the Hugging Face `config.json` it can name: thousands of valid
//! files, damaged the way hand edits and cut copies damage them (lines lost or repeated, values
//! of the wrong type or out of range, keys repeated or misplaced, bytes flipped, truncation),
//! must each give a config or a one-line error naming the problem, never a panic or a hang.
//! `mmc compile` reads these files first, so any crash here is a crash on a user's typo.

#[path = "../../tests/fuzz/mod.rs"]
mod fuzz;

use fuzz::{FileCase, FilesCase, Input, Rng};
use mmc_frontend::Config;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    fuzz::workspace(env!("CARGO_MANIFEST_DIR"))
}

/// Every model TOML of the repository.
fn toml_seeds() -> Vec<(PathBuf, String)> {
    [
        "configs/qwen3-moe-tiny.toml",
        "configs/internvl35-tiny.toml",
        "configs/internvl35-30b-a3b.toml",
        "tests/fixtures/qwen3_moe_tiny/model.toml",
        "tests/fixtures/internvl35_tiny/model_hf.toml",
        "tests/fixtures/internvl35_tiny/model_ogv.toml",
    ]
    .iter()
    .map(|rel| {
        let path = root().join(rel);
        let text = String::from_utf8(fuzz::seed(&root(), rel)).expect("UTF-8 seed");
        (path, text)
    })
    .collect()
}

/// TOML values that each key should be tried with: wrong types, signs, magnitudes and
/// spellings.
const TOML_VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "1000000000",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "0.0",
    "-0.0",
    "0.5",
    "0.3",
    "1e-300",
    "1e300",
    "-1e300",
    "nan",
    "inf",
    "-inf",
    "true",
    "false",
    "\"\"",
    "\"nan\"",
    "\"-1\"",
    "\"line\\nbreak\"",
    "\"../..\"",
    "\"/\"",
    "\"f32\"",
    "\"bf16\"",
    "\"cosine\"",
    "\"silu\"",
    "\"gelu\"",
    "\"rms_norm\"",
    "[]",
    "[1, 2]",
    "[14, 14]",
    "[\"model\"]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
];

/// Keys of every table, to put where they do not belong.
const TOML_KEYS: &[&str] = &[
    "hf_config",
    "init_from_hf_path",
    "img_context_token_id",
    "force_image_size",
    "template",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "intermediate_size",
    "mlp_only_layers",
    "decoder_sparse_step",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "hidden_act",
    "image_size",
    "patch_size",
    "norm_type",
    "layer_norm_eps",
    "downsample_ratio",
    "ps_version",
    "micro_batch_size",
    "global_batch_size",
    "seq_length",
    "max_tiles",
    "dtype",
    "lr",
    "lr_warmup_fraction",
    "lr_decay_style",
    "freeze",
    "recompute",
    "recompute_budget_gb",
    "loss_reduction",
    "tp",
    "dp",
    "ep",
    "zero",
    "kind",
    "devices",
    "unknown_key",
    "\"quoted key\"",
    "\"line\\nbreak\"",
];

const TOML_TABLES: &[&str] = &[
    "[model]",
    "[model.text]",
    "[model.vision]",
    "[model.projector]",
    "[train]",
    "[parallel]",
    "[target]",
    "[other]",
    "[[model]]",
    "[model.text.extra]",
];

/// The `key = value` lines of a TOML text: (line index, key, value).
fn assignments(lines: &[String]) -> Vec<(usize, String, String)> {
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let (k, v) = l.split_once('=')?;
            let k = k.trim();
            (!k.starts_with('#') && !k.starts_with('[')).then(|| {
                let v = v.split('#').next().unwrap_or_default().trim();
                (i, k.to_string(), v.to_string())
            })
        })
        .collect()
}

/// One TOML-aware mutation: a value replaced, two values swapped, a key renamed, repeated or
/// moved to another table, a table header changed.
fn mutate_toml(rng: &mut Rng, text: &str) -> (String, String) {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let assigns = assignments(&lines);
    if assigns.is_empty() {
        return fuzz::mutate_lines(rng, text);
    }
    let (i, key, value) = rng.pick(&assigns).clone();
    let how = match rng.below(8) {
        0..=2 => {
            let v = rng.pick(TOML_VALUES);
            lines[i] = format!("{key} = {v}");
            format!("{key} = {v}")
        }
        3 => {
            let (j, other, other_value) = rng.pick(&assigns).clone();
            lines[i] = format!("{key} = {other_value}");
            lines[j] = format!("{other} = {value}");
            format!("values of {key} and {other} swapped")
        }
        4 => {
            let k = rng.pick(TOML_KEYS);
            lines[i] = format!("{k} = {value}");
            format!("{key} renamed {k}")
        }
        5 => {
            let v = if rng.chance(0.5) {
                value.clone()
            } else {
                rng.pick(TOML_VALUES).to_string()
            };
            let at = rng.range(i + 1, lines.len());
            lines.insert(at, format!("{key} = {v}"));
            format!("{key} repeated (= {v}) at line {}", at + 1)
        }
        6 => {
            let k = rng.pick(TOML_KEYS);
            let v = rng.pick(TOML_VALUES);
            let at = rng.below(lines.len() + 1);
            lines.insert(at, format!("{k} = {v}"));
            format!("{k} = {v} inserted at line {}", at + 1)
        }
        _ => {
            let headers: Vec<usize> = (0..lines.len())
                .filter(|&j| lines[j].trim_start().starts_with('['))
                .collect();
            let t = rng.pick(TOML_TABLES);
            if headers.is_empty() || rng.chance(0.3) {
                let at = rng.below(lines.len() + 1);
                lines.insert(at, t.to_string());
                format!("{t} inserted at line {}", at + 1)
            } else {
                let h = *rng.pick(&headers);
                let old = std::mem::replace(&mut lines[h], t.to_string());
                format!("{old} becomes {t}")
            }
        }
    };
    (lines.join("\n") + "\n", how)
}

/// A damaged TOML text: 1-3 mutations, TOML-aware, line-level or byte-level.
fn mutated_toml(rng: &mut Rng, seed: &str) -> (Vec<u8>, Vec<String>) {
    let mut text = seed.to_string();
    let mut how = Vec::new();
    let mut bytes = None;
    for _ in 0..rng.range(1, 3) {
        match rng.below(10) {
            0..=5 => {
                let (t, h) = mutate_toml(rng, &text);
                text = t;
                how.push(h);
            }
            6 | 7 => {
                let (t, h) = fuzz::mutate_lines(rng, &text);
                text = t;
                how.push(h);
            }
            _ => {
                let mut b = text.clone().into_bytes();
                how.push(fuzz::mutate_bytes(rng, &mut b));
                text = String::from_utf8_lossy(&b).into_owned();
                bytes = Some(b);
            }
        }
    }
    // Keep the raw bytes of a final byte-level mutation (they may not be UTF-8).
    let bytes = match bytes {
        Some(b) if String::from_utf8_lossy(&b) == text => b,
        _ => text.into_bytes(),
    };
    (bytes, how)
}

fn load(path: &Path) -> Result<(), String> {
    Config::load(path).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn damaged_model_tomls_give_a_config_or_a_clear_error() {
    let seeds = toml_seeds();
    let scratch = fuzz::Scratch::new("model_toml");
    // Seeds parsed at their own path resolve their `hf_config` beside themselves; a copy in the
    // scratch folder (read from disk, bytes as they are) names it by its absolute path.
    let absolute: Vec<String> = seeds
        .iter()
        .map(|(path, text)| {
            let dir = path.parent().expect("a folder");
            text.lines()
                .map(|l| match l.split_once('=') {
                    Some((k, v)) if k.trim() == "hf_config" || k.trim() == "init_from_hf_path" => {
                        let rel = v.trim().trim_matches('"');
                        format!("{} = {:?}", k.trim(), dir.join(rel).display().to_string())
                    }
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    fuzz::run(
        "model_toml",
        fuzz::case_count(5000),
        |rng| {
            let s = rng.below(seeds.len());
            let from_disk = rng.chance(0.2);
            let seed = if from_disk { &absolute[s] } else { &seeds[s].1 };
            let (bytes, mut how) = mutated_toml(rng, seed);
            how.insert(0, format!("seed {}", seeds[s].0.display()));
            if from_disk {
                how.insert(1, "read from disk".into());
            }
            (
                s,
                from_disk,
                FileCase {
                    name: "model.toml".into(),
                    bytes,
                    how,
                },
            )
        },
        |(s, from_disk, case)| {
            if *from_disk {
                let path = scratch.path().join(&case.name);
                fuzz::write(&path, &case.bytes);
                load(&path)
            } else {
                let text = String::from_utf8_lossy(&case.bytes);
                Config::parse(&seeds[*s].0, &text)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    );
}

#[test]
fn damaged_hf_config_jsons_give_a_config_or_a_clear_error() {
    // Each config.json with the model TOML that names it, rewritten to find it beside itself.
    let seeds: Vec<(serde_json::Value, String)> = [
        (
            "tests/fixtures/qwen3_moe_tiny/checkpoint/config.json",
            "tests/fixtures/qwen3_moe_tiny/model.toml",
        ),
        (
            "tests/fixtures/internvl35_tiny/checkpoint_hf/config.json",
            "tests/fixtures/internvl35_tiny/model_hf.toml",
        ),
        (
            "tests/fixtures/internvl35_tiny/checkpoint_ogv/config.json",
            "tests/fixtures/internvl35_tiny/model_ogv.toml",
        ),
    ]
    .iter()
    .map(|(json, toml)| {
        let json = serde_json::from_slice(&fuzz::seed(&root(), json)).expect("seed JSON");
        let toml = String::from_utf8(fuzz::seed(&root(), toml)).expect("UTF-8 seed");
        let toml = toml
            .lines()
            .map(|l| {
                if l.starts_with("hf_config") {
                    "hf_config = \"config.json\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        (json, toml)
    })
    .collect();
    for (json, toml) in &seeds {
        // The unmutated pair must load, or every case would test only the first error.
        let dir = fuzz::Scratch::new("hf_config_seed");
        std::fs::write(dir.path().join("config.json"), json.to_string()).expect("write");
        std::fs::write(dir.path().join("model.toml"), toml).expect("write");
        load(&dir.path().join("model.toml")).expect("the seed loads");
    }
    let scratch = fuzz::Scratch::new("hf_config_json");
    fuzz::run(
        "hf_config_json",
        fuzz::case_count(5000),
        |rng| {
            let s = rng.below(seeds.len());
            let (bytes, how) = fuzz::mutated_json(rng, &seeds[s].0);
            FilesCase(vec![
                FileCase {
                    name: "config.json".into(),
                    bytes,
                    how,
                },
                FileCase {
                    name: "model.toml".into(),
                    bytes: seeds[s].1.clone().into_bytes(),
                    how: Vec::new(),
                },
            ])
        },
        |case| {
            case.save(scratch.path());
            load(&scratch.path().join("model.toml"))
        },
    );
}

// Inputs the fuzzer found, kept as plain tests.

/// The smallest `[model.text]` that parses, with `extra` appended to the table.
fn text_only(extra: &str) -> String {
    format!(
        "[model.text]\nvocab_size = 16\nhidden_size = 8\nnum_hidden_layers = 1\n\
         num_attention_heads = 2\nnum_key_value_heads = 1\nnum_experts = 2\n\
         num_experts_per_tok = 1\nmoe_intermediate_size = 4\n{extra}"
    )
}

#[test]
fn a_huge_layer_count_is_checked_without_visiting_every_layer() {
    // Found as `text_config.num_hidden_layers = 4294967295` in a config.json: the check for
    // dense layers visited every layer.
    let text = text_only("num_hidden_layers = 9223372036854775807\n")
        .replace("num_hidden_layers = 1\n", "");
    let parsed = fuzz::within("Config::parse", move || {
        Config::parse(Path::new("model.toml"), &text).map(|c| c.model.text.num_hidden_layers)
    });
    assert_eq!(parsed.unwrap(), 9223372036854775807);
    // The rule itself is unchanged: a dense layer needs `intermediate_size`.
    for extra in ["decoder_sparse_step = 2\n", "mlp_only_layers = [0]\n"] {
        let e = Config::parse(Path::new("model.toml"), &text_only(extra)).unwrap_err();
        assert!(e.to_string().contains("intermediate_size"), "{extra}: {e}");
    }
    assert!(Config::parse(
        Path::new("model.toml"),
        &text_only("mlp_only_layers = [5]\n")
    )
    .is_ok());
}

#[test]
fn a_batch_too_large_to_count_is_an_error() {
    // Found as `micro_batch_size = 9223372036854775807` with `dp = 3`: micro_batch_size x dp
    // overflowed (a panic in debug builds, a wrong check in release ones).
    let text = text_only("[train]\nmicro_batch_size = 9223372036854775807\n[parallel]\ndp = 3\n");
    let e = Config::parse(Path::new("model.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(e.contains("9223372036854775807 x 3"), "{e}");
}

#[test]
fn line_breaks_in_quoted_values_and_keys_stay_on_the_error_line() {
    // Found as `rope_theta` renamed `"line\nbreak"` and `hidden_act = "line\nbreak"`: the
    // message echoed the value with its line break.
    for (extra, shown) in [
        ("hidden_act = \"si\\nlu\"\n", "\"si\\nlu\""),
        ("\"a\\nb\" = 1\n", "`a\\nb`"),
        ("[model.vision]\nnorm_type = \"x\\ny\"\n", "`x\\ny`"),
    ] {
        let e = Config::parse(Path::new("model.toml"), &text_only(extra))
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && e.contains(shown), "{extra}: {e}");
    }
    let e = Config::parse(Path::new("model.toml"), "[model]\nhf_config = \"a\\nb\"\n")
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n') && e.contains("`a\\nb`"), "{e}");
}
