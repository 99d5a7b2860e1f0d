//! `mmc convert`: the round trip HF -> mmc -> HF is bit-exact in both InternVL layouts and for
//! the Qwen3-MoE LM, the experts are stacked as MindSpeed-MM stacks them, bad input gives one
//! error line and leaves nothing marked complete, and a checkpoint of more than 1 GB converts
//! with anonymous memory bounded by its largest stacked tensor.

mod common;

use common::{fails, fixture, mmc};
use mmc_ir::DType;
use mmc_runtime::checkpoint::manifest::Manifest;
use mmc_runtime::checkpoint::store::{write_shards, StoreError, TensorSpec};
use mmc_runtime::Checkpoint;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FIXTURES: [&str; 3] = [
    "internvl35_tiny/checkpoint_ogv",
    "internvl35_tiny/checkpoint_hf",
    "qwen3_moe_tiny/checkpoint",
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = mmc().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "mmc {args:?}: {err}");
    err
}

fn hf_to_mmc(hf: &Path, out: &Path) {
    ok(&[
        "convert",
        "hf-to-mmc",
        "--hf-dir",
        s(hf),
        "--save-dir",
        s(out),
    ]);
}

fn mmc_to_hf(hf: &Path, ckpt: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "convert",
        "mmc-to-hf",
        "--hf-dir",
        s(hf),
        "--ckpt-dir",
        s(ckpt),
        "--save-dir",
        s(out),
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

/// Both checkpoints hold the same tensor names, dtypes, shapes and bytes.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (ca, cb) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let na: Vec<&str> = ca.names().collect();
    let nb: Vec<&str> = cb.names().collect();
    assert_eq!(na, nb, "{} vs {}", a.display(), b.display());
    for n in na {
        let (x, y) = (ca.raw(n).unwrap(), cb.raw(n).unwrap());
        assert_eq!((x.dtype, x.shape), (y.dtype, y.shape), "{n}");
        assert!(x.bytes == y.bytes, "{n}: bytes differ");
    }
}

#[test]
fn the_round_trip_is_bit_exact_in_both_layouts_and_for_the_lm() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, rel) in FIXTURES.iter().enumerate() {
        let hf = fixture(rel);
        let saved = tmp.path().join(format!("mmc{i}"));
        hf_to_mmc(&hf, &saved);
        assert_eq!(
            std::fs::read_to_string(saved.join("latest_checkpointed_iteration.txt")).unwrap(),
            "release"
        );
        let release = saved.join("release");
        let m = Manifest::read(&release).unwrap();
        assert_eq!(m.iteration, None);
        m.verify(&release, |_| true).unwrap();
        let files: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(files, ["model.safetensors"]);
        // mmc's names, with each MoE layer's experts stacked.
        let ck = Checkpoint::open(&release).unwrap();
        assert_eq!(ck.len(), m.tensors.len());
        let lm = if rel.starts_with("qwen3") {
            ""
        } else {
            "language_model."
        };
        let stack = format!("{lm}model.layers.1.mlp.experts.gate_up_proj");
        assert_eq!(ck.shape(&stack), Some(&[8usize, 64, 64][..]), "{rel}");
        let down = format!("{lm}model.layers.1.mlp.experts.down_proj");
        assert_eq!(ck.shape(&down), Some(&[8usize, 32, 64][..]), "{rel}");
        assert!(!ck.names().any(|n| n.contains("experts.0.")), "{rel}");
        if !lm.is_empty() {
            assert!(
                ck.shape("vision_model.encoder.layers.0.attn.qkv.weight")
                    .is_some(),
                "{rel}: mmc names the OpenGVLab way"
            );
        }

        // Back, sharded, from the save folder and from release/ itself.
        let back = tmp.path().join(format!("hf{i}"));
        mmc_to_hf(&hf, &saved, &back, &["--max-shard-size", "300KB"]);
        assert_same_tensors(&hf, &back);
        assert!(back.join("model.safetensors.index.json").is_file());
        for f in std::fs::read_dir(&back).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                assert!(std::fs::metadata(&p).unwrap().len() <= 300_000 + 16_384);
            }
        }
        assert_eq!(
            std::fs::read(hf.join("config.json")).unwrap(),
            std::fs::read(back.join("config.json")).unwrap()
        );
        let single = tmp.path().join(format!("hf{i}_single"));
        mmc_to_hf(&hf, &release, &single, &[]);
        assert_same_tensors(&hf, &single);
        assert!(single.join("model.safetensors").is_file());
        assert!(!single.join("model.safetensors.index.json").exists());
    }
}

#[test]
fn stacks_hold_each_experts_gate_up_and_down_transposed() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = fixture("qwen3_moe_tiny/checkpoint");
    hf_to_mmc(&hf, tmp.path());
    let ck = Checkpoint::open(&tmp.path().join("release")).unwrap();
    let orig = Checkpoint::open(&hf).unwrap();
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
            .collect()
    };
    let gu = f32s(
        ck.raw("model.layers.0.mlp.experts.gate_up_proj")
            .unwrap()
            .bytes,
    );
    let dn = f32s(
        ck.raw("model.layers.0.mlp.experts.down_proj")
            .unwrap()
            .bytes,
    );
    let (h, i) = (64, 32);
    for e in [0, 5] {
        let p = |proj: &str| {
            f32s(
                orig.raw(&format!("model.layers.0.mlp.experts.{e}.{proj}.weight"))
                    .unwrap()
                    .bytes,
            )
        };
        let (gate, up, down) = (p("gate_proj"), p("up_proj"), p("down_proj"));
        // gate_up[e, x, j] = cat(gate, up)[j, x]; down[e, j, x] = down_e[x, j].
        assert_eq!(gu[(e * h + 3) * 2 * i + 1], gate[h + 3]);
        assert_eq!(gu[(e * h + 3) * 2 * i + i + 2], up[2 * h + 3]);
        assert_eq!(dn[(e * i + 7) * h + 9], down[9 * i + 7]);
    }
}

#[test]
fn a_training_iteration_exports_and_only_its_model_files_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = fixture("internvl35_tiny/checkpoint_hf");
    let saved = tmp.path().join("saved");
    hf_to_mmc(&hf, &saved);
    // An iteration folder as `mmc run --save` writes it: the same shards, optimizer state
    // beside them, the iteration in the manifest and in the latest file.
    let iter = saved.join("iter_0000050");
    std::fs::create_dir(&iter).unwrap();
    let release = saved.join("release");
    std::fs::copy(
        release.join("model.safetensors"),
        iter.join("model.safetensors"),
    )
    .unwrap();
    let opt = mmc_runtime::checkpoint::store::write_file(
        &iter.join("optimizer.safetensors"),
        b"not read by an export",
    )
    .unwrap();
    let mut m = Manifest::read(&release).unwrap();
    m.iteration = Some(50);
    m.files.push(opt);
    m.write(&iter).unwrap();
    std::fs::write(saved.join("latest_checkpointed_iteration.txt"), "50").unwrap();
    // Damage to the optimizer's file does not matter to an export.
    std::fs::write(iter.join("optimizer.safetensors"), b"damaged").unwrap();
    std::fs::write(iter.join("training_state.json"), b"{}").unwrap();
    for (n, ckpt) in [&saved, &iter].iter().enumerate() {
        let out = tmp.path().join(format!("out{n}"));
        mmc_to_hf(&hf, ckpt, &out, &[]);
        assert_same_tensors(&hf, &out);
    }
}

#[test]
fn a_cast_export_rounds_each_value_to_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = fixture("internvl35_tiny/checkpoint_ogv");
    let saved = tmp.path().join("saved");
    hf_to_mmc(&hf, &saved);
    let out = tmp.path().join("bf16");
    mmc_to_hf(&hf, &saved, &out, &["--dtype", "bf16"]);
    let (a, b) = (
        Checkpoint::open(&hf).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for n in a.names() {
        let (x, y) = (a.raw(n).unwrap(), b.raw(n).unwrap());
        assert_eq!((x.dtype, y.dtype), (DType::F32, DType::BF16), "{n}");
        assert_eq!(x.shape, y.shape);
        let want: Vec<u8> = x
            .bytes
            .chunks_exact(4)
            .flat_map(|c| {
                half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
            })
            .collect();
        assert!(want == y.bytes, "{n}");
    }
    // And back to f32: the bf16 values widen exactly.
    let saved16 = tmp.path().join("saved16");
    hf_to_mmc(&out, &saved16);
    let m = Manifest::read(&saved16.join("release")).unwrap();
    assert!(
        m.tensors.iter().all(|t| t.dtype == "BF16"),
        "bf16 stays bf16"
    );
    let out32 = tmp.path().join("f32");
    mmc_to_hf(&out, &saved16, &out32, &["--dtype", "f32"]);
    let c = Checkpoint::open(&out32).unwrap();
    let n = "vision_tower.embeddings.cls_token";
    let n = if c.shape(n).is_some() {
        n
    } else {
        "vision_model.embeddings.class_embedding"
    };
    let (y, z) = (b.read(n, DType::F32).unwrap(), c.raw(n).unwrap());
    assert_eq!(z.dtype, DType::F32);
    assert_eq!(
        y.to_f64_vec()[0] as f32,
        f32::from_le_bytes(z.bytes[..4].try_into().unwrap())
    );
}

/// The exports that tests/fixtures/make_export_fixture.py showed transformers to load (and to
/// reproduce the reference logits with) are the ones this mmc writes: same tensors, dtypes,
/// shapes and SHA-256 of the bytes.
#[test]
fn the_export_is_the_one_transformers_was_shown_to_load() {
    use sha2::{Digest, Sha256};
    let text = std::fs::read_to_string(fixture("export/transformers_load.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exports = json["exports"].as_object().unwrap();
    assert_eq!(exports.len(), 4);
    let tmp = tempfile::tempdir().unwrap();
    for (name, e) in exports {
        let hf = fixture(e["checkpoint"].as_str().unwrap());
        let saved = tmp.path().join(format!("{name}.mmc"));
        hf_to_mmc(&hf, &saved);
        let out = tmp.path().join(name);
        let flags: Vec<&str> = e["mmc_to_hf_flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        mmc_to_hf(&hf, &saved, &out, &flags);
        let ck = Checkpoint::open(&out).unwrap();
        let want = e["tensors"].as_array().unwrap();
        assert_eq!(ck.len(), want.len(), "{name}");
        for t in want {
            let n = t["name"].as_str().unwrap();
            let raw = ck.raw(n).unwrap();
            let dtype = mmc_runtime::checkpoint::store::safetensors_dtype(raw.dtype);
            assert_eq!(dtype, t["dtype"].as_str().unwrap(), "{name}: {n}");
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(raw.shape, shape.as_slice(), "{name}: {n}");
            let hash: String = Sha256::digest(raw.bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hash, t["sha256"].as_str().unwrap(), "{name}: {n}");
        }
        assert!(!e["checks"].as_array().unwrap().is_empty());
    }
}

#[test]
fn an_export_is_a_complete_model_folder_without_stale_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    copy_dir(&fixture("internvl35_tiny/checkpoint_hf"), &hf);
    for (f, text) in [
        ("tokenizer.json", "{}"),
        ("tokenizer_config.json", "{}"),
        ("modeling_internvl_chat.py", "# code"),
        ("generation_config.json", "{}"),
        ("pytorch_model.bin", "stale weights"),
        ("old.safetensors.index.json", "{}"),
    ] {
        std::fs::write(hf.join(f), text).unwrap();
    }
    std::fs::create_dir(hf.join("extra")).unwrap();
    std::fs::write(hf.join("extra/notes.txt"), "kept").unwrap();
    let saved = tmp.path().join("saved");
    hf_to_mmc(&hf, &saved);
    let out = tmp.path().join("out");
    mmc_to_hf(&hf, &saved, &out, &[]);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "extra",
            "generation_config.json",
            "model.safetensors",
            "modeling_internvl_chat.py",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(out.join("extra/notes.txt")).unwrap(),
        "kept"
    );
    assert_same_tensors(&fixture("internvl35_tiny/checkpoint_hf"), &out);
    // No partial folder is left beside it.
    assert!(!tmp.path().join(".out.partial").exists());
}

/// A copy of a fixture folder in `dir`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_input_is_one_line_and_nothing_is_marked_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p);
    let hf = fixture("qwen3_moe_tiny/checkpoint");

    // A missing HF folder; an HF folder without config.json.
    let e = fails(&[
        "convert",
        "hf-to-mmc",
        "--hf-dir",
        s(&t("none")),
        "--save-dir",
        s(&t("o1")),
    ]);
    assert!(e.contains("none") && e.contains("No such file"), "{e}");
    assert!(!t("o1").exists());
    copy_dir(&hf, &t("noconfig"));
    std::fs::remove_file(t("noconfig/config.json")).unwrap();
    let e = fails(&[
        "convert",
        "hf-to-mmc",
        "--hf-dir",
        s(&t("noconfig")),
        "--save-dir",
        s(&t("o1")),
    ]);
    assert!(e.contains("config.json"), "{e}");
    assert!(!t("o1").exists());

    // A checkpoint that does not fit its config.json.
    copy_dir(&hf, &t("bigger"));
    let cfg = std::fs::read_to_string(t("bigger/config.json")).unwrap();
    std::fs::write(
        t("bigger/config.json"),
        cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let e = fails(&[
        "convert",
        "hf-to-mmc",
        "--hf-dir",
        s(&t("bigger")),
        "--save-dir",
        s(&t("o1")),
    ]);
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );
    assert!(!t("o1").exists());

    // A save folder that holds a checkpoint, or cannot be created.
    hf_to_mmc(&hf, &t("saved"));
    let e = fails(&[
        "convert",
        "hf-to-mmc",
        "--hf-dir",
        s(&hf),
        "--save-dir",
        s(&t("saved")),
    ]);
    assert!(e.contains("already holds a checkpoint"), "{e}");
    std::fs::write(t("file"), b"x").unwrap();
    let e = fails(&[
        "convert",
        "hf-to-mmc",
        "--hf-dir",
        s(&hf),
        "--save-dir",
        s(&t("file/sub")),
    ]);
    assert!(e.contains("file/sub: Not a directory"), "{e}");
    let e = fails(&[
        "convert",
        "mmc-to-hf",
        "--hf-dir",
        s(&hf),
        "--ckpt-dir",
        s(&t("saved")),
        "--save-dir",
        s(&t("saved")),
    ]);
    assert!(e.contains("not empty"), "{e}");
    let e = fails(&[
        "convert",
        "mmc-to-hf",
        "--hf-dir",
        s(&hf),
        "--ckpt-dir",
        s(&t("saved")),
        "--save-dir",
        s(&t("file/sub")),
    ]);
    assert!(e.contains("file/sub: cannot be written"), "{e}");

    // A checkpoint of another model.
    let e = fails(&[
        "convert",
        "mmc-to-hf",
        "--hf-dir",
        s(&fixture("internvl35_tiny/checkpoint_hf")),
        "--ckpt-dir",
        s(&t("saved")),
        "--save-dir",
        s(&t("o2")),
    ]);
    assert!(e.contains("missing") && e.contains("saved/release"), "{e}");
    assert!(!t("o2").exists());

    // Not a checkpoint; a bad latest file.
    let e = fails(&[
        "convert",
        "mmc-to-hf",
        "--hf-dir",
        s(&hf),
        "--ckpt-dir",
        s(&hf),
        "--save-dir",
        s(&t("o2")),
    ]);
    assert!(e.contains("not an mmc checkpoint"), "{e}");

    // A corrupted and a truncated shard are named, and no export is left behind.
    copy_dir(&t("saved/release"), &t("bad/release"));
    std::fs::write(t("bad/latest_checkpointed_iteration.txt"), "release").unwrap();
    let shard = t("bad/release/model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let args = |out: &Path| {
        [
            "convert",
            "mmc-to-hf",
            "--hf-dir",
            s(&hf),
            "--ckpt-dir",
            s(&t("bad")),
            "--save-dir",
        ]
        .iter()
        .map(|x| x.to_string())
        .chain([s(out).to_string()])
        .collect::<Vec<_>>()
    };
    let a = args(&t("o3"));
    let e = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("model.safetensors") && e.contains("corrupted"),
        "{e}"
    );
    std::fs::write(&shard, &bytes[..mid]).unwrap();
    let e = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    assert!(!t("o3").exists());
    std::fs::write(t("bad/latest_checkpointed_iteration.txt"), "soon").unwrap();
    let e = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("latest_checkpointed_iteration.txt") && e.contains("soon"),
        "{e}"
    );

    // Bad flag values (clap's usage errors exit with 2).
    let out = mmc()
        .args([
            "convert",
            "mmc-to-hf",
            "--hf-dir",
            s(&hf),
            "--ckpt-dir",
            s(&t("saved")),
            "--save-dir",
            s(&t("o4")),
            "--max-shard-size",
            "4XB",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--max-shard-size") && e.contains("unknown unit"),
        "{e}"
    );
    assert!(!t("o4").exists());
}

/// A fast deterministic byte stream (splitmix64) for the generated checkpoint.
struct Bytes(u64);

impl Bytes {
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            c.copy_from_slice(&z.to_le_bytes()[..c.len()]);
        }
    }
}

/// A bf16 Qwen3-MoE checkpoint of `layers` x `experts` experts of [512, 256] with random bytes,
/// in HF shards of 500 MB; returns its tensor bytes and the bytes of one stacked gate_up.
fn generate(dir: &Path, layers: usize, experts: usize) -> (u64, u64) {
    let (h, i, vocab) = (512usize, 256usize, 1024usize);
    let config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": h,
        "intermediate_size": 1024,
        "moe_intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "norm_topk_prob": true,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "router_aux_loss_coef": 0.001,
        "max_position_embeddings": 512,
        "initializer_range": 0.02
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut specs = Vec::new();
    let mut t = |name: String, shape: Vec<usize>| {
        specs.push(TensorSpec {
            name,
            dtype: DType::BF16,
            shape,
        })
    };
    t("model.embed_tokens.weight".into(), vec![vocab, h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t(format!("{p}.input_layernorm.weight"), vec![h]);
        t(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        t(format!("{p}.self_attn.q_proj.weight"), vec![256, h]);
        t(format!("{p}.self_attn.k_proj.weight"), vec![128, h]);
        t(format!("{p}.self_attn.v_proj.weight"), vec![128, h]);
        t(format!("{p}.self_attn.o_proj.weight"), vec![h, 256]);
        t(format!("{p}.self_attn.q_norm.weight"), vec![64]);
        t(format!("{p}.self_attn.k_norm.weight"), vec![64]);
        t(format!("{p}.mlp.gate.weight"), vec![experts, h]);
        for e in 0..experts {
            t(format!("{p}.mlp.experts.{e}.gate_proj.weight"), vec![i, h]);
            t(format!("{p}.mlp.experts.{e}.up_proj.weight"), vec![i, h]);
            t(format!("{p}.mlp.experts.{e}.down_proj.weight"), vec![h, i]);
        }
    }
    t("model.norm.weight".into(), vec![h]);
    t("lm_head.weight".into(), vec![vocab, h]);
    let mut rng = Bytes(7);
    let mut produce = |s: &TensorSpec, w: &mut dyn Write| -> Result<(), StoreError> {
        let mut buf = vec![0u8; s.bytes() as usize];
        rng.fill(&mut buf);
        w.write_all(&buf).map_err(|error| StoreError::Io {
            path: PathBuf::from(&s.name),
            error,
        })
    };
    write_shards(dir, "model", &specs, 500_000_000, &mut produce).unwrap();
    let total = specs.iter().map(TensorSpec::bytes).sum();
    (total, (experts * h * 2 * i * 2) as u64)
}

fn rss_anon_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs mmc with `args`, sampling its RssAnon every millisecond from the moment it runs mmc's
/// code (after exec); returns the growth over the first sample, in bytes, and the wall time.
/// `succeeds` says whether mmc should exit with success.
fn run_measured(args: &[&str], succeeds: bool) -> (u64, Duration) {
    let bin = env!("CARGO_BIN_EXE_mmc");
    let start = Instant::now();
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (mut first, mut peak) = (None, 0u64);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            assert_eq!(status.success(), succeeds, "mmc {args:?}: {err}");
            break;
        }
        let execed = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("convert"));
        if execed {
            if let Some(kib) = rss_anon_kib(pid) {
                first.get_or_insert(kib);
                peak = peak.max(kib);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let first = first.expect("sampled at least once");
    ((peak.saturating_sub(first)) * 1024, start.elapsed())
}

#[test]
fn a_checkpoint_over_1gb_streams_with_memory_bounded_by_its_largest_stack() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let (total, group) = generate(&hf, 10, 128);
    assert!(total >= 1_000_000_000, "{total}");
    let saved = tmp.path().join("saved");
    let args = [
        "convert",
        "hf-to-mmc",
        "--hf-dir",
        s(&hf),
        "--save-dir",
        s(&saved),
    ];
    let (grow, took) = run_measured(&args, true);
    let gbs = total as f64 / 1e9 / took.as_secs_f64();
    eprintln!(
        "hf-to-mmc: {:.3} GB in {:.2} s = {gbs:.2} GB/s; RssAnon grew {:.1} MB, largest stacked tensor {:.1} MB",
        total as f64 / 1e9,
        took.as_secs_f64(),
        grow as f64 / 1e6,
        group as f64 / 1e6
    );
    assert!(
        grow < group + group / 10,
        "RssAnon grew {grow} bytes, the largest stack is {group}"
    );
    // The same up to the first write: building the model from config.json and checking the
    // checkpoint; the save folder now holds a checkpoint, so it stops there.
    let (model, _) = run_measured(&args, false);
    eprintln!(
        "hf-to-mmc without the writing (model and checks only): RssAnon grew {:.1} MB",
        model as f64 / 1e6
    );
    let out = tmp.path().join("out");
    let (grow, took) = run_measured(
        &[
            "convert",
            "mmc-to-hf",
            "--hf-dir",
            s(&hf),
            "--ckpt-dir",
            s(&saved),
            "--save-dir",
            s(&out),
            "--max-shard-size",
            "400MB",
        ],
        true,
    );
    eprintln!(
        "mmc-to-hf: {:.2} s = {:.2} GB/s (manifest check included); RssAnon grew {:.1} MB",
        took.as_secs_f64(),
        total as f64 / 1e9 / took.as_secs_f64(),
        grow as f64 / 1e6
    );
    assert!(
        grow < group + group / 10,
        "RssAnon grew {grow} bytes, the largest stack is {group}"
    );
    assert_same_tensors(&hf, &out);
}

/// The whole workflow: train the tiny InternVL3.5 (transformers-native layout) for 5
/// steps with a save, export the iteration back to HF, and find in the export the trained
/// weights under HF's names, beside HF's other files; mmc reads the export as a checkpoint
/// of the same model.
#[test]
fn a_trained_iteration_exports_to_the_hf_layout_with_the_trained_weights() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.bin");
    let model = fixture("internvl35_tiny/model_hf.toml");
    ok(&["compile", s(&model), "-o", s(&plan)]);
    let ckpt = dir.path().join("ckpt");
    let data = fixture("internvl35_tiny/inputs.safetensors");
    ok(&[
        "run",
        s(&plan),
        "--data",
        s(&data),
        "--train-iters",
        "5",
        "--save",
        s(&ckpt),
        "--save-interval",
        "5",
    ]);
    let hf = fixture("internvl35_tiny/checkpoint_hf");
    let out = dir.path().join("export");
    mmc_to_hf(&hf, &ckpt.join("iter_0000005"), &out, &[]);
    assert!(out.join("config.json").is_file());
    let (orig, export) = (
        Checkpoint::open(&hf).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let names: Vec<&str> = orig.names().collect();
    assert_eq!(names, export.names().collect::<Vec<_>>());
    // Trained: every tensor keeps its name and shape, and the weights moved.
    let mut moved = 0;
    for n in &names {
        let (a, b) = (orig.raw(n).unwrap(), export.raw(n).unwrap());
        assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{n}");
        moved += (a.bytes != b.bytes) as usize;
    }
    assert!(moved > names.len() / 2, "only {moved} tensors changed");
    // The language model's first expert equals the trained parameter, unstacked.
    let trained = Checkpoint::open(&ckpt.join("iter_0000005/model.safetensors")).unwrap();
    let stacked = trained
        .read(
            "language_model.model.layers.0.mlp.experts.down_proj",
            DType::F32,
        )
        .unwrap();
    let down = export
        .read(
            "language_model.model.layers.0.mlp.experts.0.down_proj.weight",
            DType::F32,
        )
        .unwrap();
    let (h, i) = (down.shape()[0], down.shape()[1]);
    let s0 = stacked.to_f64_vec();
    let d = down.to_f64_vec();
    for r in 0..h {
        for c in 0..i {
            assert_eq!(d[r * i + c], s0[c * h + r]);
        }
    }
    // The export is a checkpoint of the same model for mmc too.
    let toml = dir.path().join("m.toml");
    std::fs::write(
        &toml,
        format!(
            "[model]\nhf_config = \"{}\"\ninit_from_hf_path = \"{}\"\n",
            s(&out.join("config.json")),
            s(&out)
        ),
    )
    .unwrap();
    let dump = mmc().args(["dump-ir", s(&toml)]).output().unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(String::from_utf8_lossy(&dump.stdout).contains("tensors present with matching shapes"));
}
