//! Text tokenization for the data pipeline.
//!
//! InternVL3.5 uses Qwen3's byte-level BPE (151,643 ranks) plus added tokens (Qwen3's chat, vision
//! and tool tokens, then InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>`, ...). A checkpoint carries it
//! as a Hugging Face `tokenizer.json`, or only as the slow-tokenizer files `vocab.json` +
//! `merges.txt` (what transformers reads with `use_fast: false`, as in MindSpeed-MM's data.json).
//! [`TextTokenizer::from_dir`] reads either and gives the same ids, so training data does not depend
//! on which files a checkpoint happens to contain.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The fast-tokenizer file; preferred when present because it carries everything in one place.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// Slow-tokenizer vocabulary: byte-level token string → id.
pub const VOCAB_JSON: &str = "vocab.json";
/// Slow-tokenizer merge rules, one `left right` pair per line in priority order.
pub const MERGES_TXT: &str = "merges.txt";
/// Carries the added tokens (`added_tokens_decoder`) with their ids and flags.
pub const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
/// Older layout of the added tokens (`{content: id}`), used when `tokenizer_config.json` has none.
pub const ADDED_TOKENS_JSON: &str = "added_tokens.json";
/// Names the special tokens when only `added_tokens.json` (which has no flags) is available.
pub const SPECIAL_TOKENS_MAP_JSON: &str = "special_tokens_map.json";

/// The Qwen2 / Qwen2.5 / Qwen3 pre-tokenizer: like cl100k's but with single digits (`\p{N}`), so
/// numbers are split digit by digit. It must be exact: any change shifts token boundaries.
pub const QWEN2_PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Why a tokenizer could not be loaded or used. Loading errors name the file (or folder) involved,
/// because the user has to go and fix that file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: tokenizer folder does not exist", dir.display())]
    MissingDir { dir: PathBuf },
    #[error("{}: not a folder (expected a checkpoint or tokenizer folder)", path.display())]
    NotADir { path: PathBuf },
    #[error("{}: no tokenizer files: looked for {TOKENIZER_JSON}, or {VOCAB_JSON} + {MERGES_TXT}", dir.display())]
    NoTokenizerFiles { dir: PathBuf },
    #[error("{}: missing, but {present} is there (a BPE tokenizer without {TOKENIZER_JSON} needs both {VOCAB_JSON} and {MERGES_TXT})", missing.display())]
    IncompleteBpe {
        missing: PathBuf,
        present: &'static str,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: malformed JSON: {source}", path.display())]
    MalformedJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: the tokenizers crate cannot load this tokenizer: {message}", path.display())]
    Unsupported { path: PathBuf, message: String },
    #[error("{}: added token {content:?} is declared with id {declared}, but the vocabulary gives it id {assigned} (added tokens must follow the vocabulary without gaps)", path.display())]
    AddedTokenId {
        path: PathBuf,
        content: String,
        declared: u32,
        assigned: u32,
    },
    #[error("cannot encode text: {message}")]
    Encode { message: String },
    #[error("cannot decode: token id {id} is not in the vocabulary ({vocab_size} tokens)")]
    UnknownId { id: u32, vocab_size: usize },
    #[error("cannot decode: {message}")]
    Decode { message: String },
}

/// A text tokenizer: HF tokenizer.json, or a byte-level BPE from vocab.json + merges.txt.
///
/// Loaded once and shared by the data workers (it is `Send + Sync`; wrap it in an `Arc`).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The file the tokenizer was built from, for `Debug` output in error reports.
    source: PathBuf,
}

// Worker threads share one tokenizer through `Arc`; keep that possible.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TextTokenizer>();
};

impl fmt::Debug for TextTokenizer {
    // The derived form would print the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl TextTokenizer {
    /// Loads from a checkpoint/tokenizer folder: tokenizer.json if present, else vocab.json + merges.txt
    /// (+ added tokens from tokenizer_config.json's added_tokens_decoder or added_tokens.json), building the
    /// Qwen2 byte-level BPE (the regex above, ByteLevel without prefix space, NFC).
    ///
    /// A `tokenizer.json` that exists but cannot be loaded is an error, not a reason to fall back
    /// to the slow files: silently tokenizing differently from the checkpoint is worse than failing.
    /// Truncation and padding settings in `tokenizer.json` are dropped; the data pipeline packs and
    /// truncates sequences itself.
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer, TokenizerError> {
        match fs::metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(TokenizerError::MissingDir {
                    dir: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(io_error(dir, e)),
            Ok(m) if !m.is_dir() => {
                return Err(TokenizerError::NotADir {
                    path: dir.to_path_buf(),
                })
            }
            Ok(_) => {}
        }
        let tokenizer_json = dir.join(TOKENIZER_JSON);
        if tokenizer_json.exists() {
            return Self::from_tokenizer_json(&tokenizer_json);
        }
        let vocab = dir.join(VOCAB_JSON);
        let merges = dir.join(MERGES_TXT);
        match (vocab.exists(), merges.exists()) {
            (true, true) => Self::from_vocab_merges(dir, &vocab, &merges),
            (false, false) => Err(TokenizerError::NoTokenizerFiles {
                dir: dir.to_path_buf(),
            }),
            (true, false) => Err(TokenizerError::IncompleteBpe {
                missing: merges,
                present: VOCAB_JSON,
            }),
            (false, true) => Err(TokenizerError::IncompleteBpe {
                missing: vocab,
                present: MERGES_TXT,
            }),
        }
    }

    fn from_tokenizer_json(path: &Path) -> Result<TextTokenizer, TokenizerError> {
        let bytes = fs::read(path).map_err(|e| io_error(path, e))?;
        let mut inner = Tokenizer::from_bytes(&bytes).map_err(|e| {
            // The crate boxes serde_json's error: tell a broken file from a valid file of a shape
            // the crate does not support.
            match e.downcast::<serde_json::Error>() {
                Ok(je) if !je.is_data() => TokenizerError::MalformedJson {
                    path: path.to_path_buf(),
                    source: *je,
                },
                Ok(je) => TokenizerError::Unsupported {
                    path: path.to_path_buf(),
                    message: je.to_string(),
                },
                Err(e) => TokenizerError::Unsupported {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                },
            }
        })?;
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Unsupported {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        inner.with_padding(None);
        Ok(TextTokenizer {
            inner,
            source: path.to_path_buf(),
        })
    }

    /// Builds what `Qwen2TokenizerFast` builds from the slow files, so both layouts of a
    /// checkpoint give identical ids.
    fn from_vocab_merges(
        dir: &Path,
        vocab_path: &Path,
        merges_path: &Path,
    ) -> Result<TextTokenizer, TokenizerError> {
        let vocab: HashMap<String, u32> = read_json(vocab_path, "an object of token → id")?;
        let merges = read_merges(merges_path)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .build()
            .map_err(|e| TokenizerError::Invalid {
                path: merges_path.to_path_buf(),
                message: format!("does not fit {VOCAB_JSON}: {e}"),
            })?;

        let split = Split::new(
            SplitPattern::Regex(QWEN2_PRETOKENIZE_REGEX.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Unsupported {
            path: merges_path.to_path_buf(),
            message: format!("pre-tokenizer regex: {e}"),
        })?;
        let byte_level = ByteLevel::new(false, false, false);
        let mut inner = Tokenizer::new(bpe);
        inner
            .with_normalizer(Some(NFC))
            .with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level));

        if let Some((added_from, added)) = read_added_tokens(dir)? {
            let tokens: Vec<AddedToken> = added.values().map(|t| t.to_added_token()).collect();
            inner.add_tokens(&tokens);
            for (&declared, token) in &added {
                match inner.token_to_id(&token.content) {
                    Some(assigned) if assigned == declared => {}
                    assigned => {
                        return Err(TokenizerError::AddedTokenId {
                            path: added_from,
                            content: token.content.clone(),
                            declared,
                            assigned: assigned.unwrap_or(u32::MAX),
                        })
                    }
                }
            }
        }
        Ok(TextTokenizer {
            inner,
            source: merges_path.to_path_buf(),
        })
    }

    /// Token ids of `text`; special/added tokens written in the text are recognised; nothing is prepended or appended.
    ///
    /// Added tokens are matched in the raw text before NFC, as Hugging Face does for tokens with
    /// `normalized: false` (all of Qwen's and InternVL's), so a chat template rendered as text
    /// turns `<|im_start|>` and `<IMG_CONTEXT>` into their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode {
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The id of a token given in its vocabulary form: byte-level strings for BPE pieces (`Ġthe`
    /// for " the"), the literal text for added tokens (`<IMG_CONTEXT>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary form of an id (see [`TextTokenizer::token_to_id`]); `None` outside the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of distinct tokens, including added tokens (151,678 for InternVL3.5). The model's
    /// embedding table is usually padded beyond this (151,936 for Qwen3).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Text of `ids`, added tokens included verbatim. Byte sequences that are not valid UTF-8 (an id
    /// slice that cuts a character) decode to U+FFFD, as Qwen's `errors="replace"`. Unlike the
    /// `tokenizers` crate, an id outside the vocabulary is an error rather than silently dropped,
    /// since it means the ids came from a different tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size(),
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Decode {
                message: e.to_string(),
            })
    }
}

fn io_error(path: &Path, source: io::Error) -> TokenizerError {
    TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a JSON file, telling a syntax error (malformed file) from valid JSON of the wrong shape.
fn read_json<T: DeserializeOwned>(path: &Path, expected: &str) -> Result<T, TokenizerError> {
    let bytes = fs::read(path).map_err(|e| io_error(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        if e.is_data() {
            TokenizerError::Invalid {
                path: path.to_path_buf(),
                message: format!("expected {expected}: {e}"),
            }
        } else {
            TokenizerError::MalformedJson {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// Parses merges.txt as transformers' slow tokenizer does: an optional `#version` first line, blank
/// lines skipped, otherwise exactly two space-separated pieces per line.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>, TokenizerError> {
    let text = fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if (i == 0 && line.starts_with("#version")) || line.trim_matches(' ').is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {}: expected two space-separated tokens, found {line:?}",
                        i + 1
                    ),
                })
            }
        }
    }
    Ok(merges)
}

/// One entry of `added_tokens_decoder`, with transformers' defaults for missing flags.
#[derive(Debug, Deserialize)]
struct AddedTokenDecl {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    normalized: Option<bool>,
    #[serde(default)]
    special: bool,
}

impl AddedTokenDecl {
    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized.unwrap_or(!self.special))
    }
}

/// Added tokens by id.
type AddedTokens = BTreeMap<u32, AddedTokenDecl>;

/// The file the added tokens come from and the tokens by id (`None` when there are none).
///
/// `tokenizer_config.json`'s `added_tokens_decoder` is preferred because it carries the flags; an
/// `added_tokens.json` has only ids, so its tokens are special when a config names them as special
/// tokens, and are never normalised (all of Qwen's and InternVL's are `normalized: false`).
fn read_added_tokens(dir: &Path) -> Result<Option<(PathBuf, AddedTokens)>, TokenizerError> {
    let config_path = dir.join(TOKENIZER_CONFIG_JSON);
    let config: Option<serde_json::Map<String, Value>> = if config_path.exists() {
        Some(read_json(&config_path, "a JSON object")?)
    } else {
        None
    };
    if let Some(decoder) = config.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
        let decoder: BTreeMap<String, AddedTokenDecl> = serde_json::from_value(decoder.clone())
            .map_err(|e| TokenizerError::Invalid {
                path: config_path.clone(),
                message: format!("added_tokens_decoder: {e}"),
            })?;
        let mut added = BTreeMap::new();
        for (key, token) in decoder {
            let id = key.parse::<u32>().map_err(|_| TokenizerError::Invalid {
                path: config_path.clone(),
                message: format!("added_tokens_decoder: key {key:?} is not a token id"),
            })?;
            added.insert(id, token);
        }
        if !added.is_empty() {
            return Ok(Some((config_path, added)));
        }
    }

    let added_path = dir.join(ADDED_TOKENS_JSON);
    if !added_path.exists() {
        return Ok(None);
    }
    let by_content: BTreeMap<String, u32> = read_json(&added_path, "an object of token → id")?;
    let mut special = BTreeSet::new();
    if let Some(config) = &config {
        collect_special_names(config, &mut special);
    }
    let map_path = dir.join(SPECIAL_TOKENS_MAP_JSON);
    if map_path.exists() {
        let map: serde_json::Map<String, Value> = read_json(&map_path, "a JSON object")?;
        collect_special_names(&map, &mut special);
    }
    let mut added = BTreeMap::new();
    for (content, id) in by_content {
        if let Some(previous) = added.get(&id).map(|t: &AddedTokenDecl| t.content.clone()) {
            return Err(TokenizerError::Invalid {
                path: added_path,
                message: format!("id {id} is given to both {previous:?} and {content:?}"),
            });
        }
        let is_special = special.contains(&content);
        added.insert(
            id,
            AddedTokenDecl {
                content,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: Some(false),
                special: is_special,
            },
        );
    }
    Ok(Some((added_path, added)))
}

/// Token strings a tokenizer config names as special (`bos_token`, ..., `additional_special_tokens`),
/// written either as strings or as `{"content": ...}` objects.
fn collect_special_names(config: &serde_json::Map<String, Value>, out: &mut BTreeSet<String>) {
    fn content(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    }
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(s) = config.get(key).and_then(content) {
            out.insert(s);
        }
    }
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(Value::Array(list)) = config.get(key) {
            out.extend(list.iter().filter_map(content));
        }
    }
}
