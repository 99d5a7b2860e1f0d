//! How a parameter is assembled from checkpoint tensors.
//!
//! The frontend names parameters after one checkpoint layout; other layouts store the same
//! values under other names or split differently (transformers' InternViT keeps q, k and v
//! apart where the OpenGVLab layout fuses them). A `WeightSource` says where a parameter's
//! value comes from, so one loader serves every layout; the fusion pass will add stacking
//! (per-expert tensors into one grouped-GEMM weight) the same way.

use std::fmt;

/// Where the value of one parameter comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightSource {
    /// One checkpoint tensor, by name.
    Tensor(String),
    /// Checkpoint tensors concatenated along `axis`.
    Concat { parts: Vec<String>, axis: usize },
}

impl WeightSource {
    /// The checkpoint tensors this source reads.
    pub fn tensors(&self) -> Vec<&str> {
        match self {
            WeightSource::Tensor(n) => vec![n.as_str()],
            WeightSource::Concat { parts, .. } => parts.iter().map(|s| s.as_str()).collect(),
        }
    }
}

impl fmt::Display for WeightSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightSource::Tensor(n) => write!(f, "`{n}`"),
            WeightSource::Concat { parts, axis } => {
                let names: Vec<String> = parts.iter().map(|p| format!("`{p}`")).collect();
                write!(f, "concat({}; axis {axis})", names.join(", "))
            }
        }
    }
}
