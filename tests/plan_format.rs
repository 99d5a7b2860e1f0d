//! The measurement behind the plan body's format (README, *The plan*): postcard against the
//! JSON of format 3, on the tiny InternVL3.5's plan: bytes, and the time to write and read the
//! body (reading includes parsing and verifying the programs' graph text, as a load does).
//! Run with `cargo test --release --test plan_format -- --ignored --nocapture`.

use mmc_frontend::Config;
use mmc_ir::plan::Plan;
use std::path::Path;
use std::time::{Duration, Instant};

/// The median time of `runs` calls of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

#[test]
#[ignore = "a measurement; run it by name"]
fn postcard_against_json_for_the_plan_body() {
    let toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/internvl35-tiny.toml");
    let cfg = Config::load(&toml).unwrap_or_else(|e| panic!("{e}"));
    let plan = mmc::driver::compile_plan(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let json = serde_json::to_vec(&plan).unwrap();
    let post = postcard::to_allocvec(&plan).unwrap();
    // The same plan back from both (graphs compared as text: a parsed graph has no memory of
    // how the one it was printed from was built).
    let same = |a: &Plan| {
        let graphs = |p: &Plan| -> Vec<String> {
            p.programs
                .iter()
                .map(|p| mmc_ir::text::print(&p.graph))
                .collect()
        };
        a.settings == plan.settings && a.state == plan.state && graphs(a) == graphs(&plan)
    };
    assert!(same(&serde_json::from_slice(&json).unwrap()));
    assert!(same(&postcard::from_bytes(&post).unwrap()));
    let runs = 7;
    let write_json = median(runs, || drop(serde_json::to_vec(&plan).unwrap()));
    let write_post = median(runs, || drop(postcard::to_allocvec(&plan).unwrap()));
    let read_json = median(runs, || {
        drop(serde_json::from_slice::<Plan>(&json).unwrap())
    });
    let read_post = median(runs, || drop(postcard::from_bytes::<Plan>(&post).unwrap()));
    let load = median(runs, || {
        drop(Plan::from_bytes(Path::new("plan.bin"), &plan.to_bytes()).unwrap())
    });
    println!(
        "plan body of internvl35-tiny: JSON {} bytes, postcard {} bytes ({:.3}x); \
         write JSON {write_json:?}, postcard {write_post:?}; \
         read JSON {read_json:?}, postcard {read_post:?}; \
         Plan::to_bytes + from_bytes (with the hashes and checks) {load:?}",
        json.len(),
        post.len(),
        post.len() as f64 / json.len() as f64
    );
    assert!(post.len() < json.len());
}
