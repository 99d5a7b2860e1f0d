//! Fuzzes the training data's inputs: MindSpeed-MM's data.json (with an InternVL meta file
//! naming several datasets) and InternVL's chat JSONL. Valid files, damaged the way hand edits,
//! scripts and cut copies damage them (keys lost or repeated, values of the wrong type, sign or
//! size, lines cut or doubled, bytes flipped), must each give a config, a sample, or a one-line
//! error naming the file; never a panic or a hang. A line that parses can still break the
//! sample maker (templating, image tiling, video sampling), so parsed lines go through it too,
//! and data.json goes through `DataLoader::open` up to the first batch: a worker that panics
//! would stall training, not stop it.

mod common;
#[path = "../../tests/fuzz/mod.rs"]
mod fuzz;

use fuzz::{FileCase, FilesCase, Input, Rng};
use mmc_ir::plan::TrainSettings;
use mmc_runtime::data::chat::{read_annotations, AnnotationError};
use mmc_runtime::data::config::DataConfig;
use mmc_runtime::data::image::TilePipeline;
use mmc_runtime::data::sample::{Entry, SampleMaker};
use mmc_runtime::data::tokenizer::TextTokenizer;
use mmc_runtime::data::{DataLoader, DataPosition};
use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn root() -> PathBuf {
    fuzz::workspace(env!("CARGO_MANIFEST_DIR"))
}

/// The added tokens of the internvl2_5 template, after a byte-level alphabet of 256 tokens.
const SPECIAL: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
];

/// Writes a byte-level tokenizer with no merges (one token per byte) and the template's added
/// tokens: it loads in microseconds, where the real one takes a good part of a second, so
/// that every case can open a loader.
fn tiny_tokenizer(dir: &Path) {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: serde_json::Map<String, Json> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let added: Vec<Json> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": alphabet.len() + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                          "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": false,
                                             "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::create_dir_all(dir).expect("tokenizer folder");
    fuzz::write(
        &dir.join("tokenizer.json"),
        tokenizer.to_string().as_bytes(),
    );
}

/// What the tiny InternVL3.5 plan tells the loader, with the tiny tokenizer's `<IMG_CONTEXT>`
/// and room for the default system prompt at one token per byte.
fn plan_settings() -> TrainSettings {
    let mut s = common::settings(1, 1024, 7, 2);
    s.model.img_context_token_id = Some(256 + 4);
    s
}

/// The demo's data.json and a meta file naming the demo twice, with absolute paths (the cases
/// are written elsewhere) and the tiny tokenizer.
struct Seeds {
    data: Json,
    meta_data: Json,
    meta: Json,
    annotation: PathBuf,
}

fn seeds(tokenizer: &Path) -> Seeds {
    let demo = root().join("configs/demo");
    let mut data: Json =
        serde_json::from_slice(&fuzz::seed(&root(), "configs/demo/data.json")).expect("seed");
    let annotation = demo.join("demo.jsonl");
    let basic = &mut data["dataset_param"]["basic_parameters"];
    basic["data_path"] = json!(annotation);
    basic["data_folder"] = json!(demo);
    data["dataset_param"]["tokenizer_config"]["from_pretrained"] = json!(tokenizer);
    let mut meta_data = data.clone();
    meta_data["dataset_param"]["basic_parameters"]["data_path"] = json!("meta.json");
    let meta = json!({
        "demo": {"root": demo, "annotation": annotation, "repeat_time": 1, "length": 74},
        "demo_half": {"root": demo, "annotation": annotation, "repeat_time": 0.5,
                      "length": 74, "max_dynamic_patch": 2}
    });
    Seeds {
        data,
        meta_data,
        meta,
        annotation,
    }
}

/// A data.json case: the data.json, and with half the cases a meta file, either mutated.
fn data_case(rng: &mut Rng, seeds: &Seeds) -> FilesCase {
    let with_meta = rng.chance(0.4);
    let (data, meta) = if with_meta {
        (&seeds.meta_data, Some(&seeds.meta))
    } else {
        (&seeds.data, None)
    };
    let mutate_meta = meta.is_some() && rng.chance(0.5);
    let file = |name: &str, v: &Json, mutate: bool, rng: &mut Rng| {
        let (bytes, how) = if mutate {
            fuzz::mutated_json(rng, v)
        } else {
            (v.to_string().into_bytes(), Vec::new())
        };
        FileCase {
            name: name.into(),
            bytes,
            how,
        }
    };
    let mut files = vec![file("data.json", data, !mutate_meta, rng)];
    if let Some(m) = meta {
        files.push(file("meta.json", m, mutate_meta, rng));
    }
    FilesCase(files)
}

#[test]
fn damaged_data_jsons_give_a_config_or_a_clear_error() {
    let scratch = fuzz::Scratch::new("data_json");
    let tokenizer = scratch.path().join("tokenizer");
    tiny_tokenizer(&tokenizer);
    let seeds = seeds(&tokenizer);
    fuzz::run(
        "data_json",
        fuzz::case_count(5000),
        |rng| data_case(rng, &seeds),
        |case| {
            case.save(scratch.path());
            DataConfig::load(&scratch.path().join("data.json"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    );
}

#[test]
fn damaged_data_jsons_open_a_loader_or_give_a_clear_error() {
    let scratch = fuzz::Scratch::new("data_loader");
    let tokenizer = scratch.path().join("tokenizer");
    tiny_tokenizer(&tokenizer);
    let seeds = seeds(&tokenizer);
    let settings = plan_settings();
    // The seed itself must make batches, or every case would stop at the same error.
    for data in [&seeds.data, &seeds.meta_data] {
        fuzz::write(
            &scratch.path().join("data.json"),
            data.to_string().as_bytes(),
        );
        fuzz::write(
            &scratch.path().join("meta.json"),
            seeds.meta.to_string().as_bytes(),
        );
        let mut l = DataLoader::open(
            &scratch.path().join("data.json"),
            &settings,
            DataPosition { sample: 0 },
        )
        .unwrap_or_else(|e| panic!("the seed opens: {e}"));
        l.next_global_batch()
            .unwrap_or_else(|e| panic!("the seed makes a batch: {e}"));
    }
    fuzz::run(
        "data_loader",
        fuzz::case_count(3000),
        |rng| data_case(rng, &seeds),
        |case| {
            case.save(scratch.path());
            let mut messages = Vec::new();
            match DataLoader::open(
                &scratch.path().join("data.json"),
                &settings,
                DataPosition { sample: 0 },
            ) {
                Err(e) => messages.push(e.to_string()),
                Ok(mut l) => {
                    for i in 0..(l.samples_per_epoch() as usize).min(2) {
                        if let Err(e) = l.prepare(i) {
                            messages.push(e.to_string());
                        }
                    }
                    if let Err(e) = l.next_global_batch() {
                        messages.push(e.to_string());
                    }
                }
            }
            fuzz::all_clear(messages)
        },
    );
}

/// A sample maker for the demo data with the tiny tokenizer, as `DataLoader::open` builds it.
fn sample_maker(data_json: &Path, tokenizer: &Path) -> SampleMaker {
    let config = DataConfig::load(data_json).expect("the seed data.json loads");
    let settings = plan_settings();
    SampleMaker {
        tokenizer: Arc::new(TextTokenizer::from_dir(tokenizer).expect("tiny tokenizer")),
        pipeline: TilePipeline::from_json(config.train_pipeline.as_ref().expect("a pipeline"))
            .expect("the demo pipeline"),
        sampling: config.sampling_method.parse().expect("a sampling method"),
        config: Arc::new(config),
        tokens_per_tile: 4,
        seq_length: settings.seq_length,
        max_tiles: settings.max_tiles,
        seed: 7,
    }
}

/// One JSONL-aware mutation: a line's JSON changed, a line of another kind pasted in, a line
/// cut or doubled, bytes flipped.
fn mutated_jsonl(rng: &mut Rng, lines: &[String], parsed: &[Json]) -> (Vec<u8>, Vec<String>) {
    let mut lines = lines.to_vec();
    let mut how = Vec::new();
    for _ in 0..rng.range(1, 3) {
        match rng.below(10) {
            0..=5 => {
                let i = rng.below(lines.len());
                let (bytes, h) = fuzz::mutated_json(rng, &parsed[i % parsed.len()]);
                // A JSONL line cannot hold a raw line break; a mutation that adds one splits
                // the line, as it would in the file.
                lines[i] = String::from_utf8_lossy(&bytes).into_owned();
                how.push(format!("line {}: {}", i + 1, h.join(", ")));
            }
            6..=8 => {
                let (text, h) = fuzz::mutate_lines(rng, &lines.join("\n"));
                lines = text.lines().map(String::from).collect();
                how.push(h);
            }
            _ => {
                let mut bytes = lines.join("\n").into_bytes();
                how.push(fuzz::mutate_bytes(rng, &mut bytes));
                return (bytes, how);
            }
        }
        if lines.is_empty() {
            break;
        }
    }
    (lines.join("\n").into_bytes(), how)
}

#[test]
fn damaged_chat_jsonl_lines_give_samples_or_clear_errors() {
    let scratch = fuzz::Scratch::new("chat_jsonl");
    let tokenizer = scratch.path().join("tokenizer");
    tiny_tokenizer(&tokenizer);
    let seeds = seeds(&tokenizer);
    fuzz::write(
        &scratch.path().join("data.json"),
        seeds.data.to_string().as_bytes(),
    );
    let maker = sample_maker(&scratch.path().join("data.json"), &tokenizer);
    let text = std::fs::read_to_string(&seeds.annotation).expect("demo.jsonl");
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let parsed: Vec<Json> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let seed_lines: std::collections::HashSet<&str> = lines.iter().map(String::as_str).collect();
    let file = scratch.path().join("demo.jsonl");
    fuzz::run(
        "chat_jsonl",
        fuzz::case_count(5000),
        |rng| {
            let (bytes, how) = mutated_jsonl(rng, &lines, &parsed);
            FileCase {
                name: "demo.jsonl".into(),
                bytes,
                how,
            }
        },
        |case| {
            case.save(scratch.path());
            let read = read_annotations(&file).map_err(|e| e.to_string())?;
            let mut messages = Vec::new();
            for (k, (origin, sample)) in read.into_iter().enumerate() {
                // Lines of the seed (wherever they moved) were tried by the seed; make only the
                // changed ones.
                let unchanged = case
                    .bytes
                    .split(|&b| b == b'\n')
                    .nth(origin.line - 1)
                    .is_some_and(|m| std::str::from_utf8(m).is_ok_and(|m| seed_lines.contains(m)));
                if let Err(m) = &sample {
                    // As the loader reports it.
                    messages.push(
                        AnnotationError::Line {
                            origin: origin.clone(),
                            message: m.clone(),
                        }
                        .to_string(),
                    );
                }
                if sample.is_err() || unchanged {
                    continue;
                }
                let entry = Entry {
                    origin,
                    source: 0,
                    sample,
                };
                if let Err(e) = maker.make(&entry, k as u64) {
                    messages.push(e.to_string());
                }
            }
            fuzz::all_clear(messages)
        },
    );
}

// Inputs the fuzzer found, kept as plain tests.

/// The demo's data.json (or its meta variant) with `edit` applied, written to `dir`.
fn edited(dir: &Path, meta: bool, edit: impl FnOnce(&mut Json, &mut Json)) -> PathBuf {
    let tokenizer = dir.join("tokenizer");
    tiny_tokenizer(&tokenizer);
    let s = seeds(&tokenizer);
    let (mut data, mut m) = (if meta { s.meta_data } else { s.data }, s.meta);
    edit(&mut data, &mut m);
    fuzz::write(&dir.join("meta.json"), m.to_string().as_bytes());
    let path = dir.join("data.json");
    fuzz::write(&path, data.to_string().as_bytes());
    path
}

fn load_err(path: &Path) -> String {
    DataConfig::load(path).unwrap_err().to_string()
}

#[test]
fn values_that_size_the_loader_are_bounded() {
    // Found as `num_workers` = 2^41 (the loader's thread list could not be allocated: abort),
    // `repeat_time` = 1e300 and `max_dynamic_patch` = 2^40 (copies of the dataset and candidate
    // tile grids without end: hang).
    let dir = fuzz::Scratch::new("bounded");
    let p = edited(dir.path(), false, |d, _| {
        d["dataloader_param"]["num_workers"] = json!(1u64 << 41)
    });
    assert!(load_err(&p).contains("num_workers"), "{}", load_err(&p));
    let p = edited(dir.path(), false, |d, _| {
        d["dataset_param"]["basic_parameters"]["repeat_time"] = json!(1e300)
    });
    assert!(load_err(&p).contains("repeat_time"), "{}", load_err(&p));
    let p = edited(dir.path(), true, |_, m| {
        m["demo"]["repeat_time"] = json!(1e15)
    });
    assert!(
        load_err(&p).contains("demo.repeat_time"),
        "{}",
        load_err(&p)
    );
    let p = edited(dir.path(), false, |d, _| {
        d["dataset_param"]["max_dynamic_patch"] = json!(1u64 << 40)
    });
    assert!(
        load_err(&p).contains("max_dynamic_patch"),
        "{}",
        load_err(&p)
    );
    let p = edited(dir.path(), true, |_, m| {
        m["demo_half"]["max_dynamic_patch"] = json!(1u64 << 40)
    });
    assert!(
        load_err(&p).contains("demo_half.max_dynamic_patch"),
        "{}",
        load_err(&p)
    );
    // Large but sane values still load.
    let p = edited(dir.path(), false, |d, _| {
        d["dataloader_param"]["num_workers"] = json!(64);
        d["dataset_param"]["basic_parameters"]["repeat_time"] = json!(100);
        d["dataset_param"]["max_dynamic_patch"] = json!(40);
    });
    DataConfig::load(&p).unwrap();
}

#[test]
fn a_resize_to_a_huge_size_is_an_error() {
    // Found as `train_pipeline.image[1].param.size` = [4294967295, 56]: each tile allocated
    // tens of gigabytes (abort).
    let e = TilePipeline::from_json(&json!([
        {"trans_type": "Resize", "param": {"size": [4294967295u64, 56], "interpolation": "BICUBIC"}}
    ]))
    .unwrap_err();
    assert!(e.contains("4096"), "{e}");
}

fn open(path: &Path) -> Result<DataLoader, String> {
    DataLoader::open(path, &plan_settings(), DataPosition { sample: 0 }).map_err(|e| e.to_string())
}

#[test]
fn tiles_that_do_not_fit_their_slot_are_an_error() {
    // Found as a Resize to [56, 57] (the check looked at the height only) and, with
    // `dynamic_image_size` false, a pipeline without Resize (whole images as tiles): both
    // panicked copying the tile into the batch.
    let dir = fuzz::Scratch::new("tiles");
    let p = edited(dir.path(), false, |d, _| {
        d["dataset_param"]["preprocess_parameters"]["train_pipeline"]["image"][1]["param"]["size"] =
            json!([56, 57])
    });
    let e = open(&p).err().expect("an error");
    assert!(e.contains("57x56"), "{e}");
    let p = edited(dir.path(), false, |d, _| {
        d["dataset_param"]["dynamic_image_size"] = json!(false);
        let image = &mut d["dataset_param"]["preprocess_parameters"]["train_pipeline"]["image"];
        image.as_array_mut().unwrap().remove(1);
    });
    let Err(e) = open(&p).unwrap().next_global_batch() else {
        panic!("whole images as tiles made a batch");
    };
    assert!(e.to_string().contains("must resize tiles"), "{e}");
}

#[test]
fn quoted_line_breaks_stay_on_the_error_line() {
    // Found as a turn's `from` = "line\nbreak", an image path swapped with a turn's text, and
    // `image_reader_type` = "line\nbreak": the messages quoted them with their line breaks.
    let dir = fuzz::Scratch::new("line_breaks");
    let p = edited(dir.path(), false, |d, _| {
        d["dataset_param"]["preprocess_parameters"]["image_reader_type"] = json!("a\nb")
    });
    assert!(!load_err(&p).contains('\n') && load_err(&p).contains("a\\nb"));
    let lines = [
        r#"{"conversations": [{"from": "a\nb", "value": "x"}]}"#,
        r#"{"image": "<image>\nDescribe.", "conversations": [{"from": "human", "value": "x"}]}"#,
    ];
    let file = dir.path().join("lines.jsonl");
    fuzz::write(&file, lines.join("\n").as_bytes());
    let p = edited(dir.path(), false, |d, _| {
        d["dataset_param"]["basic_parameters"]["data_path"] = json!(file);
        d["dataset_param"]["skip_bad_samples"] = json!(true);
    });
    let mut loader = open(&p).unwrap();
    let parse = match read_annotations(&file).unwrap().remove(0) {
        (origin, Err(message)) => AnnotationError::Line { origin, message }.to_string(),
        other => panic!("{other:?}"),
    };
    let sample = loader.prepare(1).unwrap_err().to_string();
    for e in [parse, sample] {
        assert!(!e.contains('\n') && e.contains("\\n"), "{e}");
    }
    // Without images that load, the loader gives up with a message, not a panic.
    assert!(loader.next_global_batch().is_err());
}
