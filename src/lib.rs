//! The wiring of mmc's crates into the jobs the command line runs, shared with the end-to-end
//! tests: each crate stays a plain library, and the driver is the one place that knows the order
//! in which they are called.

pub mod backend;
pub mod convert;
pub mod driver;
