//! Training data: turning dataset files into the tensors a compiled plan consumes.

pub mod image;
