//! Training data: turning text (and, later, images and video) into model inputs.

pub mod tokenizer;
