//! Fault injection for the crash tests: `MMC_FAULT=<point>[:<iteration>]` kills the process
//! with SIGKILL (no destructor, no flush: what a power cut or the OOM killer does) when a save
//! reaches `<point>`, at the save of `<iteration>` or, without one, at the first save. The
//! points are [`POINTS`]. Without the variable nothing happens.

use std::sync::OnceLock;

/// The environment variable.
pub const FAULT_VAR: &str = "MMC_FAULT";

/// The named points of a save, in the order a save passes them: before the first tensor is
/// written, between the model and the next file, with every file written but the folder not
/// yet renamed, and after the rename but before the latest file names it.
pub const POINTS: [&str; 4] = [
    "before-weights",
    "between-files",
    "before-rename",
    "after-rename",
];

fn configured() -> &'static Option<(String, Option<u64>)> {
    static FAULT: OnceLock<Option<(String, Option<u64>)>> = OnceLock::new();
    FAULT.get_or_init(|| {
        let v = std::env::var(FAULT_VAR).ok()?;
        let (point, iter) = match v.split_once(':') {
            Some((p, i)) => (p.to_string(), Some(i.trim().parse().ok()?)),
            None => (v, None),
        };
        Some((point.trim().to_string(), iter))
    })
}

/// Called by a save at `point` while saving `iteration`: kills the process if the
/// environment asks for it here.
pub fn point(point: &str, iteration: u64) {
    if let Some((p, at)) = configured() {
        if p == point && at.is_none_or(|a| a == iteration) {
            // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so this does not return.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
