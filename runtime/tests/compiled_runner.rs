//! The compiled runner against the interpreter on a small optimizer-like program: state read
//! and updated (in place when nothing reads the state afterwards, copied at the end when
//! something does), a data input, a reduction output, replayed over several steps.

#[path = "common/runner.rs"]
mod common_runner;

use common_runner::{compiled, program, tensor};
use mmc_ir::{DType, Interpreter, Precision, Tensor};
use mmc_runtime::compiled::CompiledError;
use std::collections::{BTreeMap, HashMap};

#[test]
fn the_compiled_program_replays_the_interpreters_steps() {
    let p = program();
    let dir = tempfile::tempdir().expect("a folder");
    for threads in [1, 2] {
        let mut runner = compiled(&p, dir.path(), threads);
        let mut state: HashMap<String, Tensor> =
            [("w", tensor(1)), ("m", tensor(2)), ("v", tensor(3))]
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect();
        let mut want = state.clone();
        for step in 0..3 {
            let data: BTreeMap<String, Tensor> = [("x".to_string(), tensor(10 + step))].into();
            let out = runner.run("apply", &mut state, &data).expect("runs");
            assert_eq!(
                out.keys().collect::<Vec<_>>(),
                vec!["loss"],
                "updates are not returned"
            );
            let mut bind: HashMap<String, Tensor> = want.clone();
            bind.extend(data.clone());
            let r = Interpreter::new(&p.graph, Precision::Declared)
                .expect("verifies")
                .run(&bind)
                .expect("runs");
            for u in &p.updates {
                want.insert(
                    u.state.clone(),
                    r.get(&u.output).expect("an update").clone(),
                );
            }
            let (a, b) = (
                out["loss"].to_f64_vec()[0],
                r.get("loss").expect("loss").to_f64_vec()[0],
            );
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "step {step}: loss {a} vs {b}"
            );
            for name in ["w", "m", "v"] {
                assert_eq!(
                    state[name], want[name],
                    "step {step}, {name} on {threads} threads"
                );
            }
        }
    }
}

#[test]
fn a_missing_or_mistyped_binding_is_an_error() {
    let p = program();
    let dir = tempfile::tempdir().expect("a folder");
    let mut runner = compiled(&p, dir.path(), 1);
    let mut state: HashMap<String, Tensor> = [("w", tensor(1)), ("m", tensor(2)), ("v", tensor(3))]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let e = runner
        .run("apply", &mut state, &BTreeMap::new())
        .expect_err("x is missing");
    assert!(
        matches!(&e, CompiledError::Unbound { name, .. } if name == "x"),
        "{e}"
    );
    let bad = Tensor::from_f64(DType::F32, vec![3, 1036], &vec![0.0; 3 * 1036]).expect("sizes");
    let e = runner
        .run("apply", &mut state, &[("x".to_string(), bad)].into())
        .expect_err("x is mistyped");
    assert!(
        e.to_string().contains("`x`") && e.to_string().contains("1036"),
        "{e}"
    );
    let e = runner
        .run("micro_step", &mut state, &BTreeMap::new())
        .expect_err("no such program");
    assert!(e.to_string().contains("micro_step"), "{e}");
}
