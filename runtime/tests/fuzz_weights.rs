//! Fuzzes checkpoint reading: safetensors files (the 8-byte header length, the JSON header with
//! its dtypes, shapes and offsets, the tensor bytes) and `model.safetensors.index.json`. The
//! fixture checkpoints, damaged as cut downloads, bad disks and hand-edited headers damage them
//! (truncated, lengths and offsets off, dtypes and shapes changed, shards swapped or missing from
//! the index), must each open, check and load, or fail with a one-line error naming the file;
//! never a panic or a hang. Checkpoints come from outside, often from a download.

#[path = "../../tests/fuzz/mod.rs"]
mod fuzz;

use fuzz::{FileCase, Input, Rng};
use mmc_ir::{DType, TensorType, WeightSource};
use mmc_runtime::weights::ParamSpec;
use mmc_runtime::Checkpoint;
use serde_json::{json, Map, Value as Json};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    fuzz::workspace(env!("CARGO_MANIFEST_DIR"))
}

/// One fixture checkpoint copied to a scratch folder, with the parameters it satisfies.
struct Seed {
    dir: PathBuf,
    /// (file name, original bytes) of every file of the folder.
    files: Vec<(String, Vec<u8>)>,
    specs: Vec<ParamSpec>,
    /// Open the single file rather than its folder.
    by_file: bool,
}

/// The tensors of a valid checkpoint as parameters in f32; the gate projections of a layer's
/// experts are concatenated, as the model reads a stacked expert weight.
fn specs_of(dir: &Path) -> Vec<ParamSpec> {
    let ck = Checkpoint::open(dir).expect("the fixture opens");
    let mut specs = Vec::new();
    let mut experts: std::collections::BTreeMap<String, Vec<(String, Vec<usize>)>> =
        Default::default();
    for name in ck.names() {
        let shape = ck.shape(name).expect("a tensor").to_vec();
        if let Some((layer, rest)) = name.split_once(".mlp.experts.") {
            if rest.ends_with(".gate_proj.weight") {
                experts
                    .entry(layer.to_string())
                    .or_default()
                    .push((name.to_string(), shape));
                continue;
            }
        }
        specs.push(ParamSpec {
            name: name.to_string(),
            source: WeightSource::Tensor(name.to_string()),
            ty: TensorType::new(DType::F32, shape),
        });
    }
    for (layer, parts) in experts {
        let mut shape = parts[0].1.clone();
        shape[0] = parts.iter().map(|(_, s)| s[0]).sum();
        specs.push(ParamSpec {
            name: format!("{layer}.mlp.experts.gate_proj"),
            source: WeightSource::Concat {
                parts: parts.into_iter().map(|(n, _)| n).collect(),
                axis: 0,
            },
            ty: TensorType::new(DType::F32, shape),
        });
    }
    specs
}

fn seeds(scratch: &Path) -> Vec<Seed> {
    [
        ("tests/fixtures/qwen3_moe_tiny/checkpoint", false),
        ("tests/fixtures/internvl35_tiny/checkpoint_hf", true),
        ("tests/fixtures/internvl35_tiny/checkpoint_ogv", false),
    ]
    .iter()
    .enumerate()
    .map(|(i, (rel, by_file))| {
        let dir = scratch.join(format!("seed{i}"));
        std::fs::create_dir_all(&dir).expect("scratch");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(root().join(rel)).expect("fixture folder") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
                let bytes = fuzz::seed(&root(), &format!("{rel}/{name}"));
                fuzz::write(&dir.join(&name), &bytes);
                files.push((name, bytes));
            }
        }
        files.sort();
        let specs = specs_of(&dir);
        let loaded = Checkpoint::open(&dir)
            .and_then(|ck| ck.load(&specs))
            .expect("the fixture loads");
        assert_eq!(loaded.len(), specs.len());
        Seed {
            dir,
            files,
            specs,
            by_file: *by_file,
        }
    })
    .collect()
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "E8M0", "C64", "f32", "", "X",
];

fn dtype_bits(d: &str) -> Option<usize> {
    Some(match d {
        "F64" | "I64" | "U64" | "C64" => 64,
        "F32" | "I32" | "U32" => 32,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "E8M0" => 8,
        _ => return None,
    })
}

/// The header and body of a safetensors file, if it has that structure.
fn split(bytes: &[u8]) -> Option<(Map<String, Json>, &[u8])> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((header, &bytes[8 + n..]))
}

fn join(rng: &mut Rng, header: &Json, body: &[u8], keep_length: Option<u64>) -> Vec<u8> {
    let (text, _) = fuzz::json_text(rng, header, false);
    let mut text = text.into_bytes();
    // safetensors pads the header with spaces to 8 bytes; do it most of the time.
    if rng.chance(0.7) {
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
    }
    let n = keep_length.unwrap_or(text.len() as u64);
    let mut out = n.to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(body);
    out
}

/// A tensor of the header re-typed or re-shaped with every offset and the body made
/// consistent again, so that the file passes safetensors' own checks and reaches mmc's.
fn retyped(
    rng: &mut Rng,
    header: &Map<String, Json>,
    body: &[u8],
) -> Option<(Json, Vec<u8>, String)> {
    let mut tensors: Vec<(String, Json)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if tensors.is_empty() {
        return None;
    }
    tensors.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap_or(0));
    let i = rng.below(tensors.len());
    let name = tensors[i].0.clone();
    let t = &mut tensors[i].1;
    let mut shape: Vec<u64> = t["shape"]
        .as_array()?
        .iter()
        .filter_map(Json::as_u64)
        .collect();
    let how = match rng.below(6) {
        0 => {
            let d = *rng.pick(&DTYPES[..16]);
            t["dtype"] = json!(d);
            format!("`{name}` is {d}")
        }
        1 => {
            shape.reverse();
            format!("`{name}` transposed")
        }
        2 => {
            shape.push(1);
            format!("`{name}` gets a dimension of 1")
        }
        3 => {
            shape.pop();
            format!("`{name}` loses a dimension")
        }
        4 => {
            if let Some(d) = shape.first_mut() {
                *d = 0;
            }
            format!("`{name}` is empty")
        }
        _ => {
            if let Some(d) = shape.first_mut() {
                *d = *d / 2 + 1;
            }
            format!("`{name}` cut in rows")
        }
    };
    t["shape"] = json!(shape);
    let mut new_body = Vec::new();
    for (_, t) in &mut tensors {
        let (s, e) = (
            t["data_offsets"][0].as_u64()? as usize,
            t["data_offsets"][1].as_u64()? as usize,
        );
        let numel: u64 = t["shape"]
            .as_array()?
            .iter()
            .filter_map(Json::as_u64)
            .product();
        let bits = dtype_bits(t["dtype"].as_str()?)?;
        let size = (numel as usize).checked_mul(bits)? / 8;
        let old = body.get(s..e.min(body.len()))?;
        let start = new_body.len();
        new_body.extend(old.iter().copied().chain(std::iter::repeat(0)).take(size));
        t["data_offsets"] = json!([start, new_body.len()]);
    }
    let mut out: Map<String, Json> = tensors.into_iter().collect();
    if let Some(m) = header.get("__metadata__") {
        out.insert("__metadata__".into(), m.clone());
    }
    Some((Json::Object(out), new_body, how))
}

/// One damaged safetensors file.
fn mutated_safetensors(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, Vec<String>) {
    let Some((header, body)) = split(bytes) else {
        let mut b = bytes.to_vec();
        let how = fuzz::mutate_bytes(rng, &mut b);
        return (b, vec![how]);
    };
    let old_n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let header_end = 8 + old_n as usize;
    match rng.below(10) {
        0..=2 => {
            // The header's JSON: keys and values of the tensor entries.
            let mut h = Json::Object(header);
            let mut how = Vec::new();
            for _ in 0..rng.range(1, 2) {
                how.push(format!("header: {}", mutate_header_entry(rng, &mut h)));
            }
            let keep = rng.chance(0.2).then_some(old_n);
            if keep.is_some() {
                how.push("old header length kept".into());
            }
            (join(rng, &h, body, keep), how)
        }
        3 | 4 => match retyped(rng, &header, body) {
            Some((h, b, how)) => (join(rng, &h, &b, None), vec![how]),
            None => (bytes.to_vec(), vec!["unchanged".into()]),
        },
        5 => {
            let mut b = bytes.to_vec();
            let v: u64 = match rng.below(6) {
                0 => 0,
                1 => old_n + 1,
                2 => old_n - 1,
                3 => b.len() as u64,
                4 => u64::MAX,
                _ => 100_000_001,
            };
            b[..8].copy_from_slice(&v.to_le_bytes());
            (b, vec![format!("header length {v}")])
        }
        6 | 7 => {
            // The tensor bytes: cut, extended, flipped.
            let mut b = bytes.to_vec();
            let how = match rng.below(3) {
                0 => {
                    let at = rng.range(header_end, b.len());
                    b.truncate(at);
                    format!("truncated to {at}")
                }
                1 => {
                    b.extend(std::iter::repeat_n(0, rng.range(1, 64)));
                    "bytes appended".into()
                }
                _ => fuzz::mutate_bytes_in(rng, &mut b, header_end),
            };
            (b, vec![how])
        }
        _ => {
            let mut b = bytes.to_vec();
            let how = fuzz::mutate_bytes_in(rng, &mut b, 0);
            (b, vec![how])
        }
    }
}

/// A mutation aimed at a tensor entry of the header (its dtype, shape or offsets), or anywhere
/// in the header.
fn mutate_header_entry(rng: &mut Rng, h: &mut Json) -> String {
    // Entries an earlier mutation left as something else than an object are not tensors.
    let names: Vec<String> = h
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, v)| *k != "__metadata__" && v.is_object())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() || rng.chance(0.3) {
        return fuzz::mutate_json(rng, h);
    }
    let name = rng.pick(&names).clone();
    let t = &mut h[&name];
    match rng.below(4) {
        0 => {
            let d = *rng.pick(DTYPES);
            t["dtype"] = json!(d);
            format!("`{name}` dtype {d}")
        }
        1 => {
            let dims = [0u64, 1, 3, 1 << 20, 1 << 40, u64::MAX];
            let shape: Vec<Json> = (0..rng.below(4)).map(|_| json!(*rng.pick(&dims))).collect();
            let desc = Json::Array(shape.clone()).to_string();
            t["shape"] = Json::Array(shape);
            format!("`{name}` shape {desc}")
        }
        2 => {
            let k = rng.below(2);
            let old = t["data_offsets"][k].as_u64().unwrap_or(0);
            let v = match rng.below(5) {
                0 => old + 4,
                1 => old.saturating_sub(4),
                2 => u64::MAX,
                3 => 0,
                _ => old * 2,
            };
            t["data_offsets"][k] = json!(v);
            format!("`{name}` offset {k} = {v}")
        }
        _ => {
            let (other, how) = (rng.pick(&names).clone(), rng.below(2));
            let v = h[&other].clone();
            if how == 0 {
                h[&name] = v;
                format!("`{name}` = the entry of `{other}`")
            } else {
                let obj = h.as_object_mut().expect("an object");
                let entry = obj.remove(&name).expect("present");
                obj.insert(format!("{name}.renamed"), entry);
                format!("`{name}` renamed")
            }
        }
    }
}

const SHARD_NAMES: &[&str] = &[
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "missing.safetensors",
    "",
    ".",
    "..",
    "/",
    "model.safetensors.index.json",
    "../seed1/model.safetensors",
];

/// One damaged index: JSON-level changes, or a tensor moved to another (or no) shard.
fn mutated_index(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, Vec<String>) {
    let mut v: Json = serde_json::from_slice(bytes).expect("the seed index is JSON");
    if rng.chance(0.5) {
        return fuzz::mutated_json(rng, &v);
    }
    let names: Vec<String> = v["weight_map"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut how = Vec::new();
    for _ in 0..rng.range(1, 3) {
        let name = rng.pick(&names).clone();
        let file = *rng.pick(SHARD_NAMES);
        v["weight_map"][&name] = json!(file);
        how.push(format!("`{name}` in {file:?}"));
    }
    (v.to_string().into_bytes(), how)
}

#[test]
fn damaged_checkpoints_load_or_give_a_clear_error() {
    let scratch = fuzz::Scratch::new("safetensors");
    let seeds = seeds(scratch.path());
    fuzz::run(
        "safetensors",
        fuzz::case_count(5000),
        |rng| {
            let s = rng.below(seeds.len());
            let f = rng.below(seeds[s].files.len());
            let (name, bytes) = &seeds[s].files[f];
            let (bytes, how) = if name.ends_with(".json") {
                mutated_index(rng, bytes)
            } else {
                mutated_safetensors(rng, bytes)
            };
            (
                s,
                f,
                FileCase {
                    name: name.clone(),
                    bytes,
                    how,
                },
            )
        },
        |(s, f, case)| {
            let seed = &seeds[*s];
            case.save(&seed.dir);
            let target = if seed.by_file {
                seed.dir.join(&seed.files[0].0)
            } else {
                seed.dir.clone()
            };
            let mut messages = Vec::new();
            match Checkpoint::open(&target) {
                Err(e) => messages.push(e.to_string()),
                Ok(ck) => {
                    if let Err(e) = ck.load(&seed.specs) {
                        messages.push(e.to_string());
                    }
                    for name in ck.names() {
                        if let Err(e) = ck.read(name, DType::BF16) {
                            messages.push(e.to_string());
                        }
                    }
                }
            }
            // Put the seed file back for the next case.
            fuzz::write(&seed.dir.join(&seed.files[*f].0), &seed.files[*f].1);
            fuzz::all_clear(messages)
        },
    );
}

// Inputs the fuzzer found, kept as plain tests.

#[test]
fn names_with_line_breaks_stay_on_the_error_line() {
    // Found as an index putting a tensor in "line\nbreak", and a header dtype "line\nbreak":
    // the messages quoted them with their line breaks.
    let scratch = fuzz::Scratch::new("weights_line_breaks");
    let seeds = seeds(scratch.path());
    let seed = &seeds[0];
    let (index, bytes) = seed
        .files
        .iter()
        .find(|(n, _)| n.ends_with(".json"))
        .expect("an index");
    let mut v: Json = serde_json::from_slice(bytes).unwrap();
    v["weight_map"]["lm_head.weight"] = json!("a\nb");
    fuzz::write(&seed.dir.join(index), v.to_string().as_bytes());
    let e = Checkpoint::open(&seed.dir).unwrap_err().to_string();
    assert!(!e.contains('\n') && e.contains("a\\nb"), "{e}");
    fuzz::write(&seed.dir.join(index), bytes);

    let (file, bytes) = &seeds[1].files[0];
    let (mut header, body) = split(bytes).expect("a safetensors file");
    let name = header
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    header[&name]["dtype"] = json!("a\nb");
    let mut rng = Rng::new(1);
    fuzz::write(
        &seeds[1].dir.join(file),
        &join(&mut rng, &Json::Object(header), body, None),
    );
    let e = Checkpoint::open(&seeds[1].dir).unwrap_err().to_string();
    assert!(!e.contains('\n') && e.contains("a\\nb"), "{e}");
}
