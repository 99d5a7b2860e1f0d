//! Training checkpoints: exact resume after a kill at each stage of a save and at random
//! times (the tiny InternVL3.5 on the demo data), a checkpoint that does not fit the plan or is
//! damaged, a full disk during a save, pruning, and the signal handler (the tiny Qwen3-MoE on
//! tensor data, which takes milliseconds a step).

mod common;

use common::{compile, fails, fixture};
use rand::{Rng, SeedableRng};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LATEST: &str = "latest_checkpointed_iteration.txt";

fn bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("mmc")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `model` with `seq_length` (and anything else) replaced, compiled into `dir/plan.bin`.
fn compile_variant(model: &str, dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(model).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{model} has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    std::fs::create_dir_all(dir).unwrap();
    let toml = dir.join("model.toml");
    std::fs::write(&toml, text).unwrap();
    compile(s(&toml), dir)
}

/// Each step's loss from a metrics file; a line cut by a kill is ignored.
fn losses(path: &Path) -> Vec<(u64, u64)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

/// Asserts that every loss in `got` is the reference's loss of that step, bit for bit.
fn assert_same_losses(what: &str, got: &[(u64, u64)], want: &[(u64, u64)]) {
    for (step, bits) in got {
        let w = want.iter().find(|(s, _)| s == step).map(|(_, b)| *b);
        assert_eq!(
            w,
            Some(*bits),
            "{what}: step {step}: loss {} differs from the uninterrupted run's {:?}",
            f64::from_bits(*bits),
            w.map(f64::from_bits)
        );
    }
}

/// Asserts that two iteration folders hold the same tensors, byte for byte.
fn assert_same_checkpoint(what: &str, got: &Path, want: &Path) {
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (std::fs::read(got.join(f)), std::fs::read(want.join(f)));
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("{what}: {}: {e}", got.join(f).display())),
            b.unwrap(),
        );
        assert!(a == b, "{what}: {f} differs from the uninterrupted run's");
    }
}

fn latest(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(LATEST)).unwrap_or_default()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Exact resume on the tiny InternVL3.5 with the demo data (images, packing, shuffling).

struct Demo {
    plan: PathBuf,
    data: PathBuf,
}

impl Demo {
    /// `mmc run` for 8 steps saving every 2 into `save`, resuming from it.
    fn cmd(&self, save: &Path, metrics: &Path) -> Command {
        let mut c = Command::new(bin());
        c.args(["run", s(&self.plan), "--data", s(&self.data)])
            .args(["--train-iters", "8", "--save-interval", "2"])
            .args([
                "--save",
                s(save),
                "--load",
                s(save),
                "--metrics",
                s(metrics),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }
}

#[test]
fn resume_after_a_kill_reproduces_the_uninterrupted_run_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // seq_length 160 keeps a step near two seconds on two cores; rows still pack two samples
    // at times (12 samples in 8 steps).
    let demo = Demo {
        plan: compile_variant(
            "configs/internvl35-tiny.toml",
            &t.join("plan"),
            &[("seq_length = 256", "seq_length = 160")],
        ),
        data: PathBuf::from("configs/demo/data.json"),
    };
    let reference = t.join("ref");
    let started = Instant::now();
    let out = run_ok(
        demo.cmd(&reference, &t.join("ref.jsonl"))
            .stdout(Stdio::piped()),
    );
    let so = String::from_utf8_lossy(&out.stdout);
    let samples: u64 = so
        .split("data: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no data line: {so}"));
    assert!(samples > 8, "no row packed two samples: {so}");
    let want = losses(&t.join("ref.jsonl"));
    assert_eq!(want.len(), 8);
    assert_eq!(latest(&reference), "8");
    let want_final = reference.join("iter_0000008");
    eprintln!(
        "uninterrupted: 8 steps in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // A kill at each stage of one save; each run starts from the reference's checkpoint before
    // that save (a copy), so that it trains two steps before the kill.
    for (point, at) in [
        ("before-weights", 4),
        ("between-files", 6),
        ("before-rename", 8),
        ("after-rename", 6),
    ] {
        let dir = t.join(point);
        let prev = format!("iter_{:07}", at - 2);
        copy_dir(&reference.join(&prev), &dir.join(&prev));
        std::fs::write(dir.join(LATEST), (at - 2).to_string()).unwrap();
        let m1 = t.join(format!("{point}-1.jsonl"));
        let out = demo
            .cmd(&dir, &m1)
            .env("MMC_FAULT", format!("{point}:{at}"))
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "{point}: not killed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The latest file still names the previous complete iteration.
        assert_eq!(latest(&dir), (at - 2).to_string(), "{point}");
        let m2 = t.join(format!("{point}-2.jsonl"));
        run_ok(&mut demo.cmd(&dir, &m2));
        let (l1, l2) = (losses(&m1), losses(&m2));
        assert_eq!(l1.len(), 2, "{point}: the killed run's steps");
        assert_eq!(
            l2.first().map(|l| l.0),
            Some(at - 1),
            "{point}: resumed at the wrong step"
        );
        assert_same_losses(point, &[l1, l2].concat(), &want);
        assert_same_checkpoint(point, &dir.join("iter_0000008"), &want_final);
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial") || n.ends_with(".replaced"))
            .collect();
        assert!(left.is_empty(), "{point}: left behind: {left:?}");
        eprintln!("{point}:{at}: resumed bit for bit");
    }

    // Kills at random times (seeded), from scratch, each run resuming from what the last left:
    // a random step after the run's first (so that the machine's speed does not decide where
    // it lands), then a random delay of up to 1.5 s, which lands in a step or in the save
    // after an even one.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let dir = t.join("random");
    let mut got = Vec::new();
    let mut kills = 0;
    for run in 0.. {
        let metrics = t.join(format!("random-{run}.jsonl"));
        let resumed: u64 = latest(&dir).parse().unwrap_or(0);
        let mut child = demo.cmd(&dir, &metrics).spawn().unwrap();
        let status = if run < 2 {
            let after_step = rng.random_range(resumed + 1..8);
            let delay = Duration::from_millis(rng.random_range(0..1500));
            let mut reached: Option<Instant> = None;
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break Some(st);
                }
                if reached.is_none() && losses(&metrics).iter().any(|l| l.0 >= after_step) {
                    reached = Some(Instant::now());
                }
                if reached.is_some_and(|r| r.elapsed() >= delay) {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    kills += 1;
                    eprintln!(
                        "random kill {kills}: {} ms after step {after_step} (resumed from {resumed}); latest iteration then {:?}",
                        delay.as_millis(),
                        latest(&dir)
                    );
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            Some(child.wait().unwrap())
        };
        got.extend(losses(&metrics));
        if let Some(st) = status {
            assert!(st.success(), "random run {run} failed");
            break;
        }
    }
    assert_same_losses("random kills", &got, &want);
    assert_same_checkpoint("random kills", &dir.join("iter_0000008"), &want_final);
    eprintln!(
        "{kills} random kill(s): resumed bit for bit; {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// The tiny Qwen3-MoE on tensor data (two rows of 24 tokens).

fn qwen(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut all = vec![("seq_length = 64", "seq_length = 24")];
    all.extend_from_slice(edits);
    compile_variant("configs/qwen3-moe-tiny.toml", dir, &all)
}

fn tokens() -> PathBuf {
    fixture("qwen3_moe_tiny/inputs.safetensors")
}

fn qrun(plan: &Path, iters: u64, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["run", s(plan), "--data", s(&tokens())])
        .args(["--train-iters", &iters.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn resume_on_tensor_data_continues_the_schedule_and_keep_last_prunes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // A warm-up and decay, so that a resume at the wrong step shows in the rates.
    let sched = "lr = 1e-3\nlr_warmup_iters = 2\nlr_decay_style = \"cosine\"\nmin_lr = 1e-4";
    let plan = qwen(&t.join("p"), &[("lr = 1e-3", sched)]);
    let full = t.join("full");
    let m = t.join("full.jsonl");
    run_ok(
        qrun(
            &plan,
            6,
            &[
                "--save",
                s(&full),
                "--save-interval",
                "2",
                "--keep-last",
                "2",
            ],
        )
        .args(["--metrics", s(&m)]),
    );
    let names: Vec<String> = std::fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["iter_0000004", "iter_0000006", LATEST]);

    // Resuming from iteration 4 with a recompiled plan (same model and schedule).
    let plan2 = qwen(&t.join("p2"), &[("lr = 1e-3", sched)]);
    let part = t.join("part");
    let m2 = t.join("part.jsonl");
    let out = run_ok(
        qrun(
            &plan2,
            6,
            &["--load", s(&full.join("iter_0000004")), "--save", s(&part)],
        )
        .args(["--metrics", s(&m2)]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("iteration 4, with the optimizer state"),
        "{err}"
    );
    let (want, got) = (losses(&m), losses(&m2));
    assert_eq!(got.iter().map(|l| l.0).collect::<Vec<_>>(), [5, 6]);
    assert_same_losses("resumed", &got, &want);
    let lr = |p: &Path| -> Vec<f64> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(lr(&m2), lr(&m)[4..]);
    assert_same_checkpoint(
        "resumed",
        &part.join("iter_0000006"),
        &full.join("iter_0000006"),
    );

    // A changed schedule still loads (the tensors fit), and --finetune starts at step 1 with
    // the weights only.
    let plan3 = qwen(&t.join("p3"), &[("lr = 1e-3", "lr = 5e-4")]);
    let out = run_ok(&mut qrun(&plan3, 2, &["--load", s(&full), "--finetune"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("weights only, iteration 0"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("step 2/2"));
    // --no-load-optim keeps the iteration; a resume past --train-iters has nothing to do.
    let out = run_ok(&mut qrun(
        &plan3,
        7,
        &["--load", s(&full), "--no-load-optim"],
    ));
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(so.contains("step 7/7") && !so.contains("step 6/7"), "{so}");
    let out = run_ok(&mut qrun(&plan3, 6, &["--load", s(&full)]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to train"));

    // Saved without optimizer and RNG state: loading them is refused with the flag to pass.
    let lean = t.join("lean");
    run_ok(&mut qrun(
        &plan,
        2,
        &["--save", s(&lean), "--no-save-optim", "--no-save-rng"],
    ));
    let e = fails(&[
        "run",
        s(&plan),
        "--data",
        s(&tokens()),
        "--train-iters",
        "3",
        "--load",
        s(&lean),
    ]);
    assert!(e.contains("--no-load-rng"), "{e}");
    let e = fails(&[
        "run",
        s(&plan),
        "--data",
        s(&tokens()),
        "--train-iters",
        "3",
        "--load",
        s(&lean),
        "--no-load-rng",
    ]);
    assert!(
        e.contains("no optimizer state") && e.contains("--no-load-optim"),
        "{e}"
    );
    run_ok(&mut qrun(
        &plan,
        3,
        &["--load", s(&lean), "--no-load-rng", "--no-load-optim"],
    ));
}

#[test]
fn a_checkpoint_that_does_not_fit_the_plan_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let plan = qwen(&t.join("p"), &[]);
    let ck = t.join("ck");
    run_ok(&mut qrun(&plan, 1, &["--save", s(&ck)]));
    let load = |plan: &Path, dir: &Path| {
        fails(&[
            "run",
            s(plan),
            "--data",
            s(&tokens()),
            "--train-iters",
            "2",
            "--load",
            s(dir),
        ])
    };
    // Wider experts: the stacked tensor's shape.
    let wide = qwen(
        &t.join("wide"),
        &[("moe_intermediate_size = 32", "moe_intermediate_size = 48")],
    );
    let e = load(&wide, &ck);
    assert!(
        e.contains("`model.layers.0.mlp.experts.gate_up_proj`: shape [8, 64, 64] in the checkpoint, the plan needs [8, 64, 96]"),
        "{e}"
    );
    assert!(e.contains("more problem"), "{e}");
    // A third layer: missing tensors.
    let deep = qwen(
        &t.join("deep"),
        &[("num_hidden_layers = 2", "num_hidden_layers = 3")],
    );
    let e = load(&deep, &ck);
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );
    // One layer: tensors the plan does not have.
    let shallow = qwen(
        &t.join("shallow"),
        &[("num_hidden_layers = 2", "num_hidden_layers = 1")],
    );
    let e = load(&shallow, &ck);
    assert!(
        e.contains("model.layers.1.") && e.contains("not in the plan"),
        "{e}"
    );
    // A dtype the plan cannot take (the manifest edited: it is not itself checksummed).
    let iter = ck.join("iter_0000001");
    let mpath = iter.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["tensors"][0]["dtype"] = "I64".into();
    let name = m["tensors"][0]["name"].as_str().unwrap().to_string();
    std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    let e = load(&plan, &ck);
    assert!(
        e.contains(&format!(
            "`{name}`: dtype I64 in the checkpoint, the plan needs F32"
        )),
        "{e}"
    );
    std::fs::write(&mpath, text).unwrap();

    // Damage: a corrupted and a truncated file are named.
    let opt = iter.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x40;
    std::fs::write(&opt, &bytes).unwrap();
    let e = load(&plan, &ck);
    assert!(
        e.contains("optimizer.safetensors") && e.contains("corrupted"),
        "{e}"
    );
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&plan, &ck);
    assert!(
        e.contains("optimizer.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A latest file naming a folder that is gone.
    std::fs::remove_dir_all(&iter).unwrap();
    let e = load(&plan, &ck);
    assert!(e.contains(LATEST) && e.contains("iter_0000001"), "{e}");
    // Flags that need --save.
    let e = fails(&[
        "run",
        s(&plan),
        "--data",
        s(&tokens()),
        "--save-interval",
        "2",
    ]);
    assert!(e.contains("--save-interval needs --save"), "{e}");
}

/// `mmc run` with files limited to `limit` bytes (a full disk for the checkpoint's first
/// shard); SIGXFSZ is ignored so that the write fails with EFBIG rather than killing it.
fn limited(mut c: Command, limit: u64) -> Output {
    unsafe {
        c.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

#[test]
fn a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let plan = qwen(&t.join("p"), &[]);
    let ck = t.join("ck");
    let m = t.join("ref.jsonl");
    run_ok(qrun(&plan, 4, &["--save", s(&ck), "--save-interval", "2"]).args(["--metrics", s(&m)]));
    let want = losses(&m);
    std::fs::remove_dir_all(ck.join("iter_0000004")).unwrap();
    std::fs::write(ck.join(LATEST), "2").unwrap();

    // The model shard is about 1 MB: 200 kB files fill the "disk".
    let args = ["--load", s(&ck), "--save", s(&ck), "--save-interval", "2"];
    let out = limited(qrun(&plan, 4, &args), 200_000);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("error: saving iteration 4 into")
            && last.contains("the latest complete checkpoint is still iteration 2")
            && last.contains("model.safetensors")
            && last.contains("File too large"),
        "{err}"
    );
    assert_eq!(err.matches("error: ").count(), 1, "{err}");
    assert_eq!(latest(&ck), "2");
    let left: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "the partial folder is removed: {left:?}");

    // --on-save-error continue trains on; the save after the last step still fails the run.
    let m2 = t.join("continue.jsonl");
    let out = limited(
        qrun(
            &plan,
            6,
            &[
                &args[..],
                &["--on-save-error", "continue", "--metrics", s(&m2)],
            ]
            .concat(),
        ),
        200_000,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: saving iteration 4") && err.contains("training goes on"),
        "{err}"
    );
    assert!(
        err.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("error: saving iteration 6"),
        "{err}"
    );
    assert_eq!(losses(&m2).len(), 4);
    assert_eq!(latest(&ck), "2");

    // The previous checkpoint is intact and resumes exactly.
    let m3 = t.join("resumed.jsonl");
    run_ok(qrun(&plan, 4, &args).args(["--metrics", s(&m3)]));
    assert_same_losses("after a full disk", &losses(&m3), &want);
    assert_eq!(losses(&m3).len(), 2);
    assert_eq!(latest(&ck), "4");
}

#[test]
fn the_signal_handler_finishes_the_step_saves_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let plan = qwen(&t.join("p"), &[]);
    let ck = t.join("ck");
    let m = t.join("m.jsonl");
    let child = qrun(&plan, 100_000, &["--save", s(&ck), "--exit-signal-handler"])
        .args(["--metrics", s(&m)])
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while losses(&m).len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(so.contains("termination signal"), "{so}");
    let steps = losses(&m).len();
    assert_eq!(latest(&ck), steps.to_string());
    // It resumes.
    run_ok(&mut qrun(&plan, steps as u64 + 1, &["--load", s(&ck)]));
    // Without --save it is refused.
    let e = fails(&[
        "run",
        s(&plan),
        "--data",
        s(&tokens()),
        "--exit-signal-handler",
    ]);
    assert!(e.contains("needs --save"), "{e}");
}
