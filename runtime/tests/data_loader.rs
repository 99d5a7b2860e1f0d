//! The data loader's contract: order, packing, resumption, static shapes, and a clear error (or
//! a count, with skip_bad_samples) for every kind of bad input.

mod common;

use common::{repo, settings};
use mmc_runtime::data::tokenizer::TextTokenizer;
use mmc_runtime::data::{DataLoader, DataPosition};
use mmc_runtime::MicroBatch;
use std::path::{Path, PathBuf};

/// Writes a data.json and its JSONL into `dir`; `lines` are the JSONL lines.
fn dataset(dir: &Path, lines: &[&str], extra_dataset: &str, extra_loader: &str) -> PathBuf {
    std::fs::write(dir.join("data.jsonl"), lines.join("\n")).unwrap();
    let tokenizer = repo("configs/tokenizer/qwen3-internvl35");
    let images = repo("configs/demo");
    let json = format!(
        r#"{{"dataset_param": {{"dataset_type": "multimodal",
            "basic_parameters": {{"data_path": "data.jsonl", "data_folder": "{}", "repeat_time": 1}},
            "preprocess_parameters": {{"image_reader_type": "torchvision"}},
            "tokenizer_config": {{"from_pretrained": "{}", "use_fast": false, "hub_backend": "hf"}},
            "template_name": "internvl2_5", "patch_size": 14, "image_size": 56, "down_sample_ratio": 0.5,
            "dynamic_image_size": true, "use_thumbnail": true, "min_dynamic_patch": 1, "max_dynamic_patch": 6
            {extra_dataset}}},
          "dataloader_param": {{"shuffle": false, "collate_param": {{"pad_id": 151643}} {extra_loader}}}}}"#,
        images.display(),
        tokenizer.display()
    );
    let p = dir.join("data.json");
    std::fs::write(&p, json).unwrap();
    p
}

fn text(q: &str, a: &str) -> String {
    format!(
        r#"{{"conversations": [{{"from": "human", "value": "{q}"}}, {{"from": "gpt", "value": "{a}"}}]}}"#
    )
}

fn ids(b: &MicroBatch) -> Vec<i64> {
    b.0["input_ids"]
        .to_f64_vec()
        .iter()
        .map(|&x| x as i64)
        .collect()
}

fn open(p: &Path, micro: usize, seq: usize, accum: usize) -> Result<DataLoader, String> {
    DataLoader::open(
        p,
        &settings(micro, seq, 7, accum),
        DataPosition { sample: 0 },
    )
    .map_err(|e| e.to_string())
}

#[test]
fn file_order_packing_and_segments() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..6)
        .map(|i| text(&format!("q{i}"), &format!("a{i}")))
        .collect();
    let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
    let p = dataset(dir.path(), &refs, "", r#", "packing": true"#);
    let mut l = open(&p, 1, 256, 1).unwrap();
    let (mbs, tokens) = l.next_global_batch().unwrap();
    let seg: Vec<i64> = mbs[0].0["segment_ids"]
        .to_f64_vec()
        .iter()
        .map(|&x| x as i64)
        .collect();
    let pos: Vec<i64> = mbs[0].0["position_ids"]
        .to_f64_vec()
        .iter()
        .map(|&x| x as i64)
        .collect();
    let samples = *seg.iter().max().unwrap();
    assert!(samples >= 2, "packing put {samples} sample(s) in a row");
    assert_eq!(tokens, seg.iter().filter(|&&s| s != 0).count());
    // Each sample restarts its positions.
    for s in 1..=samples {
        let first = seg.iter().position(|&x| x == s).unwrap();
        assert_eq!(pos[first], 0);
    }
    // Without shuffle, segment s holds line s of the file (its question and answer).
    assert_eq!(l.counts().used as i64, samples);
    let tok = TextTokenizer::from_dir(&repo("configs/tokenizer/qwen3-internvl35")).unwrap();
    let all = ids(&mbs[0]);
    for s in 1..=samples {
        let segment: Vec<i64> = all
            .iter()
            .zip(&seg)
            .filter(|(_, &g)| g == s)
            .map(|(&t, _)| t)
            .collect();
        let text = tok
            .decode(&segment.iter().map(|&t| t as u32).collect::<Vec<_>>())
            .unwrap();
        let i = s - 1;
        assert!(
            text.contains(&format!("user\nq{i}<|im_end|>"))
                && text.contains(&format!("a{i}<|im_end|>")),
            "segment {s}: {text}"
        );
    }
}

#[test]
fn shuffle_follows_the_seed_and_resumption_repeats_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..9)
        .map(|i| text(&format!("question {i}"), &format!("answer {i}")))
        .collect();
    let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
    let plain = dataset(dir.path(), &refs, "", "");
    let a: Vec<Vec<i64>> = {
        let mut l = open(&plain, 1, 128, 1).unwrap();
        (0..9)
            .map(|_| ids(&l.next_global_batch().unwrap().0[0]))
            .collect()
    };
    let shuffled_dir = tempfile::tempdir().unwrap();
    let shuffled = dataset(
        shuffled_dir.path(),
        &refs,
        "",
        r#", "shuffle": true, "seed": 3"#,
    );
    let mut l = open(&shuffled, 1, 128, 1).unwrap();
    let b: Vec<Vec<i64>> = (0..9)
        .map(|_| ids(&l.next_global_batch().unwrap().0[0]))
        .collect();
    assert_ne!(a, b, "shuffle changed nothing");
    let mut sorted_a = a.clone();
    let mut sorted_b = b.clone();
    sorted_a.sort();
    sorted_b.sort();
    assert_eq!(sorted_a, sorted_b, "one epoch holds every sample once");
    // Same seed, same order.
    let mut again = open(&shuffled, 1, 128, 1).unwrap();
    let c: Vec<Vec<i64>> = (0..9)
        .map(|_| ids(&again.next_global_batch().unwrap().0[0]))
        .collect();
    assert_eq!(b, c);
    // Resume after 4 batches.
    let mut l = open(&shuffled, 1, 128, 1).unwrap();
    for _ in 0..4 {
        l.next_global_batch().unwrap();
    }
    let pos = l.position();
    let next = ids(&l.next_global_batch().unwrap().0[0]);
    let mut resumed = DataLoader::open(&shuffled, &settings(1, 128, 7, 1), pos).unwrap();
    assert_eq!(ids(&resumed.next_global_batch().unwrap().0[0]), next);
}

#[test]
fn samples_that_do_not_fit_are_skipped_or_truncated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(200);
    let lines = [
        text("short", "ok"),
        text(&long, "long"),
        r#"{"image": "images/shapes_08_140x100.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}"#.to_string(),
    ];
    let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
    // 64 tokens cannot hold the image sample (about 30 tokens of system prompt plus 7 tiles of
    // 4 tokens and the turns), and an image is never cut: it is skipped.
    let p = dataset(dir.path(), &refs, "", "");
    let mut l = open(&p, 1, 64, 1).unwrap();
    for _ in 0..3 {
        l.next_global_batch().unwrap();
    }
    let c = l.counts();
    assert_eq!(c.truncated, 1, "{c:?}");
    assert!(c.skipped_too_long >= 1, "{c:?}");
    let p = dataset(dir.path(), &refs, r#", "text_over_length": "skip""#, "");
    let mut l = open(&p, 1, 64, 1).unwrap();
    for _ in 0..2 {
        l.next_global_batch().unwrap();
    }
    assert_eq!(l.counts().truncated, 0);
    assert!(l.counts().skipped_too_long >= 2);
}

#[test]
fn bad_input_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = text("hi", "yo");
    let p = dataset(dir.path(), &[&good, "{not json"], "", "");
    let e = open(&p, 1, 128, 1).err().unwrap();
    assert!(
        e.contains("data.jsonl:2") && e.contains("not a valid chat sample"),
        "{e}"
    );

    let missing = r#"{"image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]}"#;
    let p = dataset(dir.path(), &[missing], "", "");
    let e = open(&p, 1, 256, 1)
        .unwrap()
        .next_global_batch()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("data.jsonl:1") && e.contains("nowhere.png"),
        "{e}"
    );

    let corrupt_path = dir.path().join("corrupt.png");
    std::fs::write(&corrupt_path, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let corrupt = format!(
        r#"{{"image": "{}", "conversations": [{{"from": "human", "value": "<image>\nx"}}, {{"from": "gpt", "value": "y"}}]}}"#,
        corrupt_path.display()
    );
    let p = dataset(dir.path(), &[&corrupt], "", "");
    let e = open(&p, 1, 256, 1)
        .unwrap()
        .next_global_batch()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("data.jsonl:1") && e.contains("corrupt.png"),
        "{e}"
    );

    let two = r#"{"image": ["images/shapes_00_56x56.png", "images/shapes_01_84x84.png"], "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]}"#;
    let p = dataset(dir.path(), &[two], "", "");
    let e = open(&p, 1, 512, 1)
        .unwrap()
        .next_global_batch()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("data.jsonl:1") && e.contains("2 image(s) but 1"),
        "{e}"
    );

    let p = dataset(dir.path(), &[&good], r#", "template_name": "chatml""#, "");
    let e = open(&p, 1, 128, 1).err().unwrap();
    assert!(
        e.contains("data.json") && e.contains("unknown template"),
        "{e}"
    );

    let p = dataset(dir.path(), &[], "", "");
    let e = open(&p, 1, 128, 1).err().unwrap();
    assert!(e.contains("empty"), "{e}");

    // With skip_bad_samples the same problems are counted instead.
    let p = dataset(
        dir.path(),
        &[missing, &good, &good],
        r#", "skip_bad_samples": true"#,
        "",
    );
    let mut l = open(&p, 1, 256, 1).unwrap();
    l.next_global_batch().unwrap();
    assert_eq!(l.counts().bad, 1);
    assert!(l.warnings[0].contains("nowhere.png"));
}

#[test]
fn the_data_must_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let good = text("hi", "yo");
    let p = dataset(dir.path(), &[&good], "", "");
    let mut s = settings(1, 128, 7, 1);
    s.model.tile_size = Some(448);
    let e = DataLoader::open(&p, &s, DataPosition { sample: 0 })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("image_size") && e.contains("448"), "{e}");
    let mut s = settings(1, 128, 7, 1);
    s.model.img_context_token_id = Some(5);
    let e = DataLoader::open(&p, &s, DataPosition { sample: 0 })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("<IMG_CONTEXT>") && e.contains("151671"), "{e}");
}

/// Lines of `n` text samples whose answers grow with their index, so that the number of
/// tokens of a row says which sample it holds.
fn growing(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| text(&format!("q{i}"), &"word ".repeat(i + 1)))
        .collect()
}

/// Tokens of each row of a micro-batch.
fn row_lengths(b: &MicroBatch, seq: usize) -> Vec<usize> {
    let seg = b.0["segment_ids"].to_f64_vec();
    seg.chunks(seq)
        .map(|r| r.iter().filter(|&&s| s != 0.0).count())
        .collect()
}

#[test]
fn drop_last_drops_or_pads_the_incomplete_micro_batch_of_an_epoch() {
    let lines = growing(5);
    let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
    // The length of sample i, alone in a row.
    let dir = tempfile::tempdir().unwrap();
    let p = dataset(dir.path(), &refs, "", "");
    let alone: Vec<usize> = {
        let mut l = open(&p, 1, 128, 1).unwrap();
        (0..5)
            .map(|_| row_lengths(&l.next_global_batch().unwrap().0[0], 128)[0])
            .collect()
    };
    // Micro-batches of 2 rows: [0, 1], [2, 3], then sample 4 alone at the end of the epoch.
    let batches = |extra: &str| -> (Vec<Vec<usize>>, u64) {
        let p = dataset(dir.path(), &refs, "", extra);
        let mut l = open(&p, 2, 128, 1).unwrap();
        let b = (0..4)
            .map(|_| row_lengths(&l.next_global_batch().unwrap().0[0], 128))
            .collect();
        (b, l.counts().dropped_last)
    };
    let (dropped, n) = batches(r#", "drop_last": true"#);
    assert_eq!(
        dropped,
        vec![
            vec![alone[0], alone[1]],
            vec![alone[2], alone[3]],
            vec![alone[0], alone[1]],
            vec![alone[2], alone[3]],
        ]
    );
    assert_eq!(n, 1);
    let (padded, n) = batches(r#", "drop_last": false"#);
    assert_eq!(
        padded[2],
        vec![alone[4], 0],
        "the epoch's last micro-batch is padded"
    );
    assert_eq!(padded[3], vec![alone[0], alone[1]]);
    assert_eq!(n, 0);

    // An epoch that cannot fill one micro-batch would drop everything: an error.
    let p = dataset(dir.path(), &refs[..1], "", r#", "drop_last": true"#);
    let e = open(&p, 2, 128, 1)
        .unwrap()
        .next_global_batch()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("does not fill a micro-batch") && e.contains("drop_last"),
        "{e}"
    );
}

#[test]
fn group_by_length_sorts_each_global_batch_and_balances_its_micro_batches() {
    let lines = growing(4);
    let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plain = dataset(a.path(), &refs, "", "");
    let grouped = dataset(b.path(), &refs, r#", "group_by_length": true"#, "");
    let rows_of = |p: &Path| -> Vec<Vec<usize>> {
        let mut l = open(p, 2, 128, 2).unwrap();
        let (mbs, _) = l.next_global_batch().unwrap();
        mbs.iter().map(|m| row_lengths(m, 128)).collect()
    };
    let plain_rows = rows_of(&plain);
    let l: Vec<usize> = plain_rows.concat();
    assert!(l.windows(2).all(|w| w[0] < w[1]), "{l:?}");
    // Longest first, each to the lighter micro-batch: 3 and 0 together, 2 and 1 together.
    assert_eq!(rows_of(&grouped), vec![vec![l[3], l[0]], vec![l[2], l[1]]]);
    // The key is used, not listed as ignored.
    let cfg = mmc_runtime::data::config::DataConfig::load(&grouped).unwrap();
    assert!(cfg.group_by_length);
    assert!(!cfg
        .ignored_keys
        .iter()
        .any(|k| k.contains("group_by_length")));
}

#[test]
fn length_grouping_deals_longest_first_to_the_lightest_micro_batch() {
    use mmc_runtime::data::loader::length_grouped;
    let lengths = [5, 1, 9, 3, 7, 2];
    // One global batch of 6 over 3 micro-batches of 2.
    assert_eq!(
        length_grouped(&[0, 1, 2, 3, 4, 5], &lengths, 6, 3),
        vec![2, 1, 4, 5, 0, 3]
    );
    // Groups are sorted on their own; a short last group is dealt round-robin.
    assert_eq!(
        length_grouped(&[0, 1, 2, 3, 4], &lengths, 4, 2),
        vec![2, 1, 0, 3, 4]
    );
}

#[test]
fn pad_id_and_template_must_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let good = text("hi", "yo");
    let p = dataset(dir.path(), &[&good], "", "");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"pad_id\": 151643", "\"pad_id\": 160000");
    std::fs::write(&p, text).unwrap();
    let e = open(&p, 1, 128, 1).err().unwrap();
    assert!(
        e.contains(
            "`dataloader_param.collate_param.pad_id` 160000 is outside the model's vocabulary"
        ),
        "{e}"
    );
    let p = dataset(dir.path(), &[&good], "", "");
    let mut s = settings(1, 128, 7, 1);
    s.model.template = Some("chatml".into());
    let e = DataLoader::open(&p, &s, DataPosition { sample: 0 })
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`dataset_param.template_name` is \"internvl2_5\", but the model's template is \"chatml\""),
        "{e}"
    );
}

#[test]
fn an_annotation_file_given_as_data_json_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train.json");
    std::fs::write(&p, format!("{}\n{}\n", text("a", "b"), text("c", "d"))).unwrap();
    let e = mmc_runtime::data::config::DataConfig::load(&p)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("chat annotation file") && e.contains("data.json"),
        "{e}"
    );
}

#[test]
fn the_shipped_30b_data_json_is_mindspeed_mms_with_only_paths_to_fill_in() {
    let text = std::fs::read_to_string(repo("configs/internvl35-30b-a3b.data.json")).unwrap();
    for placeholder in [
        "\"/path/json_path\"",
        "\"/path/root_path\"",
        "\"./ckpt/hf_path/InternVL3_5-30B-A3B-Instruct\"",
    ] {
        assert!(text.contains(placeholder), "{placeholder}");
    }
    // Filled in with the demo's files, it loads as MindSpeed-MM's recipe.
    let filled = text
        .replace(
            "/path/json_path",
            &repo("configs/demo/demo.jsonl").display().to_string(),
        )
        .replace(
            "/path/root_path",
            &repo("configs/demo").display().to_string(),
        )
        .replace(
            "./ckpt/hf_path/InternVL3_5-30B-A3B-Instruct",
            &repo("configs/tokenizer/qwen3-internvl35")
                .display()
                .to_string(),
        );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data.json");
    std::fs::write(&p, filled).unwrap();
    let c = mmc_runtime::data::config::DataConfig::load(&p).unwrap();
    assert!(c.group_by_length && c.shuffle && c.drop_last && c.use_thumbnail);
    assert_eq!(c.pad_id, 2);
    assert_eq!((c.min_dynamic_patch, c.max_dynamic_patch), (1, 12));
    assert_eq!((c.min_num_frame, c.max_num_frame), (8, 32));
    assert_eq!(
        (c.image_size, c.patch_size, c.tokens_per_tile()),
        (448, 14, 256)
    );
    assert_eq!(c.template_name.as_deref(), Some("internvl2_5"));
    // What is left unused only concerns how PyTorch loads data.
    let mut ignored = c.ignored_keys.clone();
    ignored.sort();
    assert_eq!(
        ignored,
        [
            "dataloader_param.collate_param.model_name",
            "dataloader_param.dataloader_mode",
            "dataloader_param.pin_memory",
            "dataloader_param.sampler_type",
            "dataset_param.dataset_type",
            "dataset_param.tokenizer_config.autotokenizer_name",
            "dataset_param.tokenizer_config.hub_backend",
            "dataset_param.use_text_processer",
        ]
    );
}
