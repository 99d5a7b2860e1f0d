//! The Qwen3 / InternVL3.5 tokenizer against tiktoken's reference ids, through both checkpoint
//! layouts (tokenizer.json; vocab.json + merges.txt), plus added tokens and loading errors.
//!
//! Fixtures: configs/tokenizer/qwen3-internvl35/ and tests/fixtures/tokenizer/reference.jsonl,
//! written by tests/fixtures/make_tokenizer.py.

use mmc_runtime::data::tokenizer::{TextTokenizer, TokenizerError};
use serde::Deserialize;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("runtime/ has a parent")
        .to_path_buf()
}

fn tokenizer_dir() -> PathBuf {
    repo_root().join("configs/tokenizer/qwen3-internvl35")
}

#[derive(Deserialize)]
struct Reference {
    category: String,
    text: String,
    ids: Vec<u32>,
    /// The text after NFC (between added tokens), present only where NFC changes it.
    nfc: Option<String>,
}

fn references() -> &'static [Reference] {
    static REFS: OnceLock<Vec<Reference>> = OnceLock::new();
    REFS.get_or_init(|| {
        let path = repo_root().join("tests/fixtures/tokenizer/reference.jsonl");
        let text = fs::read_to_string(&path).expect("read reference.jsonl");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("reference line"))
            .collect()
    })
}

fn fast() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| TextTokenizer::from_dir(&tokenizer_dir()).expect("load tokenizer.json"))
}

/// A folder holding only some of the tokenizer files.
fn subset(files: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for f in files {
        fs::copy(tokenizer_dir().join(f), tmp.path().join(f)).expect("copy tokenizer file");
    }
    tmp
}

/// Every reference string gives exactly tiktoken's ids, and decoding gives the text back (NFC).
fn check_all(tok: &TextTokenizer, label: &str) {
    let refs = references();
    assert!(refs.len() >= 3000, "only {} reference strings", refs.len());
    let mut bad = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let ids = tok.encode(&r.text).expect("encode");
        if ids != r.ids {
            bad.push(format!(
                "#{i} [{}] {:?}\n  got {ids:?}\n  ref {:?}",
                r.category, r.text, r.ids
            ));
            continue;
        }
        let decoded = tok.decode(&ids).expect("decode");
        let expected = r.nfc.as_deref().unwrap_or(&r.text);
        if decoded != expected {
            bad.push(format!(
                "#{i} [{}] {:?} decodes to {decoded:?}",
                r.category, r.text
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{label}: {} of {} strings differ from tiktoken:\n{}",
        bad.len(),
        refs.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn tokenizer_json_matches_tiktoken() {
    check_all(fast(), "tokenizer.json");
}

#[test]
fn vocab_and_merges_match_tiktoken() {
    let dir = subset(&["vocab.json", "merges.txt", "tokenizer_config.json"]);
    let slow = TextTokenizer::from_dir(dir.path()).expect("load vocab.json + merges.txt");
    assert_eq!(slow.vocab_size(), 151_678);
    check_all(&slow, "vocab.json + merges.txt");
}

#[test]
fn added_tokens_json_gives_the_same_ids() {
    // No tokenizer.json and no tokenizer_config.json: added tokens from added_tokens.json.
    let dir = subset(&["vocab.json", "merges.txt", "added_tokens.json"]);
    let tok = TextTokenizer::from_dir(dir.path()).expect("load with added_tokens.json");
    assert_eq!(tok.vocab_size(), 151_678);
    for (content, id) in ADDED {
        assert_eq!(tok.token_to_id(content), Some(*id), "{content}");
    }
    check_all(&tok, "vocab.json + merges.txt + added_tokens.json");
}

#[test]
fn vocab_and_merges_without_added_tokens() {
    let dir = subset(&["vocab.json", "merges.txt"]);
    let tok = TextTokenizer::from_dir(dir.path()).expect("load bare vocab.json + merges.txt");
    assert_eq!(tok.vocab_size(), 151_643);
    assert_eq!(tok.token_to_id("<|im_start|>"), None);
    assert_eq!(
        tok.encode("Hello, world!").expect("encode"),
        [9707, 11, 1879, 0]
    );
}

const ADDED: &[(&str, u32)] = &[
    ("<|endoftext|>", 151643),
    ("<|im_start|>", 151644),
    ("<|im_end|>", 151645),
    ("<|object_ref_start|>", 151646),
    ("<|object_ref_end|>", 151647),
    ("<|box_start|>", 151648),
    ("<|box_end|>", 151649),
    ("<|quad_start|>", 151650),
    ("<|quad_end|>", 151651),
    ("<|vision_start|>", 151652),
    ("<|vision_end|>", 151653),
    ("<|vision_pad|>", 151654),
    ("<|image_pad|>", 151655),
    ("<|video_pad|>", 151656),
    ("<tool_call>", 151657),
    ("</tool_call>", 151658),
    ("<|fim_prefix|>", 151659),
    ("<|fim_middle|>", 151660),
    ("<|fim_suffix|>", 151661),
    ("<|fim_pad|>", 151662),
    ("<|repo_name|>", 151663),
    ("<|file_sep|>", 151664),
    ("<tool_response>", 151665),
    ("</tool_response>", 151666),
    ("<think>", 151667),
    ("</think>", 151668),
    ("<img>", 151669),
    ("</img>", 151670),
    ("<IMG_CONTEXT>", 151671),
    ("<quad>", 151672),
    ("</quad>", 151673),
    ("<ref>", 151674),
    ("</ref>", 151675),
    ("<box>", 151676),
    ("</box>", 151677),
];

#[test]
fn special_tokens() {
    let tok = fast();
    assert_eq!(tok.vocab_size(), 151_678);
    for (content, id) in ADDED {
        assert_eq!(tok.token_to_id(content), Some(*id), "{content}");
        assert_eq!(tok.id_to_token(*id).as_deref(), Some(*content));
        assert_eq!(tok.encode(content).expect("encode"), [*id], "{content}");
        assert_eq!(tok.decode(&[*id]).expect("decode"), *content);
    }
    assert_eq!(
        tok.encode("<|im_start|>assistant\n").expect("encode"),
        [151644, 77091, 198]
    );
    assert_eq!(tok.id_to_token(77091).as_deref(), Some("assistant"));
    assert_eq!(tok.token_to_id("Ġthe"), Some(279));
    assert_eq!(tok.id_to_token(151_678), None);
    assert_eq!(
        tok.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img>")
            .expect("encode"),
        [151669, 151671, 151671, 151670]
    );
    // Digits are split one by one (Qwen's \p{N}).
    assert_eq!(tok.encode("2024").expect("encode").len(), 4);
    assert_eq!(tok.encode("").expect("encode"), Vec::<u32>::new());
}

#[test]
fn decode_rejects_unknown_ids_and_replaces_split_characters() {
    let tok = fast();
    let err = tok.decode(&[9707, 151_678]).unwrap_err();
    assert!(
        matches!(err, TokenizerError::UnknownId { id: 151_678, .. }),
        "{err}"
    );
    // U+20000 is not a single token: its 4 UTF-8 bytes span 3 tokens, so a prefix cuts it.
    let ids = tok.encode("\u{20000}").expect("encode");
    assert_eq!(ids, [172, 63219, 222]);
    assert!(tok.decode(&ids[..1]).expect("decode").contains('\u{fffd}'));
}

#[test]
fn shared_across_threads() {
    let tok = Arc::new(fast().clone());
    let refs = references();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let tok = Arc::clone(&tok);
            std::thread::spawn(move || {
                refs.iter()
                    .skip(t)
                    .step_by(4)
                    .all(|r| tok.encode(&r.text).expect("encode") == r.ids)
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().expect("thread"));
    }
}

fn load_err(dir: &Path) -> String {
    match TextTokenizer::from_dir(dir) {
        Ok(t) => panic!("{} loaded: {t:?}", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("no-such-checkpoint");
    let err = TextTokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingDir { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("no-such-checkpoint"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn not_a_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("tokenizer.json");
    fs::write(&file, "{}").expect("write");
    let msg = load_err(&file);
    assert!(msg.contains("not a folder"), "{msg}");
}

#[test]
fn empty_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = TextTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NoTokenizerFiles { .. }),
        "{err}"
    );
    let msg = err.to_string();
    for name in ["tokenizer.json", "vocab.json", "merges.txt"] {
        assert!(msg.contains(name), "{msg}");
    }
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}

#[test]
fn malformed_tokenizer_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::write(
        tmp.path().join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": ",
    )
    .expect("write");
    // Present but broken: an error, not a fallback to the slow files.
    for f in ["vocab.json", "merges.txt"] {
        fs::copy(tokenizer_dir().join(f), tmp.path().join(f)).expect("copy");
    }
    let err = TextTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::MalformedJson { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
    assert!(msg.contains("malformed JSON"), "{msg}");
}

#[test]
fn tokenizer_json_the_crate_cannot_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::write(
        tmp.path().join("tokenizer.json"),
        r#"{"version": "1.0", "model": {"type": "NoSuchModel"}}"#,
    )
    .expect("write");
    let err = TextTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn slow_files_errors() {
    // vocab.json without merges.txt.
    let dir = subset(&["vocab.json"]);
    let msg = load_err(dir.path());
    assert!(
        msg.contains("merges.txt") && msg.contains("missing"),
        "{msg}"
    );

    // Malformed vocab.json.
    let dir = subset(&["merges.txt"]);
    fs::write(dir.path().join("vocab.json"), "{\"a\": 1,").expect("write");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("vocab.json") && msg.contains("malformed JSON"),
        "{msg}"
    );

    // vocab.json of the wrong shape.
    fs::write(dir.path().join("vocab.json"), "[1, 2, 3]").expect("write");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("vocab.json") && msg.contains("expected"),
        "{msg}"
    );

    // A merges line that is not two tokens.
    let dir = subset(&["vocab.json"]);
    fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\nĠ Ġ\nin g x\n",
    )
    .expect("write");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("merges.txt") && msg.contains("line 3"),
        "{msg}"
    );

    // A merge whose pieces are not in vocab.json.
    fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\nĠ Ġ\nzzz qqq\n",
    )
    .expect("write");
    let msg = load_err(dir.path());
    assert!(msg.contains("merges.txt"), "{msg}");

    // Malformed tokenizer_config.json.
    let dir = subset(&["vocab.json", "merges.txt"]);
    fs::write(
        dir.path().join("tokenizer_config.json"),
        "{\"added_tokens_decoder\": {",
    )
    .expect("write");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("malformed JSON"),
        "{msg}"
    );

    // An added token whose declared id leaves a gap after the vocabulary.
    fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"added_tokens_decoder": {"151700": {"content": "<|im_start|>", "special": true}}}"#,
    )
    .expect("write");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("tokenizer_config.json")
            && msg.contains("151700")
            && msg.contains("<|im_start|>"),
        "{msg}"
    );
}
