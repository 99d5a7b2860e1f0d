//! Fusion: rewrites of primitive subgraphs into fused ops.

pub mod moe;
