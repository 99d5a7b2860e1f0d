//! InternVL's chat-format annotation files: one JSON object per line with `conversations`
//! (`from` = human, gpt or system) and optionally `image` (a path or a list of paths) or
//! `video` (a path, with an optional `clip` of [start, end] seconds).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Who speaks a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    Human,
    Gpt,
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub role: Role,
    pub value: String,
}

/// The visual content of a sample.
#[derive(Clone, Debug, PartialEq)]
pub enum Media {
    Text,
    Image(String),
    Images(Vec<String>),
    Video {
        path: String,
        clip: Option<(f64, f64)>,
    },
}

/// One annotation line.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatSample {
    pub conversations: Vec<Turn>,
    pub media: Media,
    /// The line's `length` (InternVL's precomputed token length), used by length-grouped
    /// sampling instead of tokenising the conversation.
    pub length: Option<usize>,
}

#[derive(Deserialize)]
struct RawTurn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawImage {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawSample {
    conversations: Vec<RawTurn>,
    #[serde(default)]
    image: Option<RawImage>,
    #[serde(default)]
    video: Option<String>,
    #[serde(default)]
    clip: Option<(f64, f64)>,
    #[serde(default)]
    length: Option<usize>,
}

impl ChatSample {
    /// Parses one JSONL line; the error says what is wrong with it (the caller adds file:line).
    pub fn parse(line: &str) -> Result<ChatSample, String> {
        let raw: RawSample = serde_json::from_str(line).map_err(|e| {
            format!(
                "not a valid chat sample: {}",
                e.to_string().split(" at line").next().unwrap_or_default()
            )
        })?;
        if raw.conversations.is_empty() {
            return Err("`conversations` is empty".into());
        }
        let mut conversations = Vec::with_capacity(raw.conversations.len());
        for (i, t) in raw.conversations.into_iter().enumerate() {
            let role = match t.from.as_str() {
                "human" | "user" => Role::Human,
                "gpt" | "assistant" => Role::Gpt,
                "system" if i == 0 => Role::System,
                "system" => return Err("a `system` turn must come first".into()),
                other => {
                    return Err(format!(
                        "turn {} is from \"{other}\"; expected human, gpt or system",
                        i + 1
                    ))
                }
            };
            conversations.push(Turn {
                role,
                value: t.value,
            });
        }
        let media = match (raw.image, raw.video) {
            (Some(_), Some(_)) => {
                return Err("a sample cannot have both `image` and `video`".into())
            }
            (Some(RawImage::One(p)), None) if !p.is_empty() => Media::Image(p),
            (Some(RawImage::Many(v)), None) if !v.is_empty() => Media::Images(v),
            (Some(_), None) => Media::Text,
            (None, Some(p)) => Media::Video {
                path: p,
                clip: raw.clip,
            },
            (None, None) => Media::Text,
        };
        Ok(ChatSample {
            conversations,
            media,
            length: raw.length,
        })
    }
}

/// Where a sample comes from, for messages: `file:line`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A line that could not be read. The message quotes the line's values, so its line breaks are
/// shown escaped to keep it on one line.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {}", super::one_line(message))]
    Line { origin: Origin, message: String },
}

/// A line of an annotation file: the sample, or why it is bad, with its origin.
pub type AnnotationLine = (Origin, Result<ChatSample, String>);

/// The lines of one annotation file: parsed samples (or why a line is bad) with their origin.
pub fn read_annotations(file: &Path) -> Result<Vec<AnnotationLine>, AnnotationError> {
    let text = std::fs::read_to_string(file).map_err(|source| AnnotationError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            (
                Origin {
                    file: file.to_path_buf(),
                    line: i + 1,
                },
                ChatSample::parse(l),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_sample_parses() {
        let text = ChatSample::parse(r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}"#).unwrap();
        assert_eq!(text.media, Media::Text);
        let one = ChatSample::parse(
            r#"{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat"}]}"#,
        )
        .unwrap();
        assert_eq!(one.media, Media::Image("a.jpg".into()));
        let many = ChatSample::parse(
            r#"{"image": ["a.jpg", "b.png"], "conversations": [{"from": "human", "value": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(
            many.media,
            Media::Images(vec!["a.jpg".into(), "b.png".into()])
        );
        let video = ChatSample::parse(r#"{"video": "v.mp4", "clip": [1.0, 2.5], "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "x"}]}"#).unwrap();
        assert_eq!(
            video.media,
            Media::Video {
                path: "v.mp4".into(),
                clip: Some((1.0, 2.5))
            }
        );
        assert_eq!(video.conversations[0].role, Role::System);
    }

    #[test]
    fn bad_lines_say_why() {
        assert!(ChatSample::parse("{not json")
            .unwrap_err()
            .contains("not a valid chat sample"));
        assert!(ChatSample::parse(r#"{"conversations": []}"#)
            .unwrap_err()
            .contains("empty"));
        assert!(
            ChatSample::parse(r#"{"conversations": [{"from": "bot", "value": "x"}]}"#)
                .unwrap_err()
                .contains("\"bot\"")
        );
        assert!(ChatSample::parse(r#"{"conversations": [{"from": "human", "value": "x"}, {"from": "system", "value": "x"}]}"#).unwrap_err().contains("first"));
    }
}
