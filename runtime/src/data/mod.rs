//! The data pipeline: MindSpeed-MM's data.json and InternVL chat JSONL in, the plan's static
//! micro-batches out.

pub mod chat;
pub mod config;
pub mod image;
pub mod loader;
pub mod pack;
pub mod sample;
pub mod template;
pub mod tokenizer;
pub mod video;

pub use loader::{DataCounts, DataError, DataLoader, DataPosition};

/// `s` with its line breaks escaped, as they are written in JSON strings: messages that quote a
/// value from the data (a path, a turn's role) stay on one line.
pub(crate) fn one_line(s: &str) -> String {
    s.replace('\n', "\\n").replace('\r', "\\r")
}
