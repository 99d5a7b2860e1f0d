//! What a new user runs into: settings mmc accepts must take effect or be refused with the key
//! named, output paths are checked before any work, a damaged plan is refused at load, a
//! closed pipe is not a crash, and errors say each thing once.

mod common;

use common::{compile, fails, fixture, mmc};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// `configs/qwen3-moe-tiny.toml` with `extra` (`[table]` headers and keys) merged in,
/// written into `dir`: keys of a table the file has go under its header.
fn tiny_with(dir: &Path, extra: &str) -> PathBuf {
    let mut text = std::fs::read_to_string("configs/qwen3-moe-tiny.toml").unwrap();
    let mut header = String::new();
    let mut tail = String::new();
    for line in extra.lines() {
        if line.starts_with('[') {
            header = format!("{line}\n");
            if !text.contains(&header) {
                tail.push_str(&header);
                header.clear();
            }
        } else if header.is_empty() {
            tail.push_str(&format!("{line}\n"));
        } else {
            text = text.replacen(&header, &format!("{header}{line}\n"), 1);
        }
    }
    let p = dir.join("model.toml");
    std::fs::write(&p, format!("{text}\n{tail}")).unwrap();
    p
}

fn compile_fails(toml: &Path, dir: &Path) -> String {
    fails(&[
        "compile",
        toml.to_str().unwrap(),
        "-o",
        dir.join("p.bin").to_str().unwrap(),
    ])
}

#[test]
fn settings_that_are_not_built_yet_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, want) in [
        (
            "[target]\nkind = \"ascend\"",
            "[target] kind = \"ascend\": the Ascend target is not built yet",
        ),
        (
            "[target]\ndevices = 16",
            "[target] devices = 16: running on more than one device is not built yet",
        ),
        (
            "[target]\ndevice_memory_gb = 64",
            "[target] device_memory_gb = 64: fitting a plan to a device's memory is not built yet",
        ),
        (
            "[train]\nrecompute = \"none\"\n[parallel]\nzero = 3",
            "parallelism",
        ),
    ] {
        let toml = tiny_with(dir.path(), extra);
        let e = compile_fails(&toml, dir.path());
        assert!(e.contains(want), "{extra}: {e}");
        assert!(
            !dir.path().join("p.bin").exists(),
            "{extra}: a plan was written"
        );
    }
    // `--target cpu` overrides the TOML's kind; `--target ascend` is refused.
    let toml = tiny_with(dir.path(), "[target]\nkind = \"ascend\"");
    let out = mmc()
        .args(["compile", toml.to_str().unwrap(), "--target", "cpu", "-o"])
        .arg(dir.path().join("p.bin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = fails(&[
        "compile",
        "configs/qwen3-moe-tiny.toml",
        "--target",
        "ascend",
    ]);
    assert!(
        e.contains("--target ascend") && e.contains("not built yet"),
        "{e}"
    );
}

#[test]
fn a_template_mmc_does_not_have_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string("configs/internvl35-tiny.toml").unwrap();
    let toml = dir.path().join("m.toml");
    std::fs::write(
        &toml,
        base.replace("template = \"internvl2_5\"", "template = \"chatml\""),
    )
    .unwrap();
    let e = compile_fails(&toml, dir.path());
    assert!(
        e.contains("[model] template = \"chatml\"") && e.contains("internvl2_5"),
        "{e}"
    );
}

#[test]
fn freezing_everything_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let toml = tiny_with(dir.path(), "[train]\nfreeze = [\"model\", \"lm_head\"]");
    let e = compile_fails(&toml, dir.path());
    assert!(e.contains("freezes every parameter"), "{e}");
}

#[test]
fn the_shipped_30b_configs_say_what_is_not_built() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.bin");
    let out = out.to_str().unwrap();
    for cfg in [
        "configs/internvl35-30b-a3b.toml",
        "configs/internvl35-30b-a3b-megatron.toml",
    ] {
        let e = fails(&["compile", cfg, "-o", out]);
        assert!(e.contains("not built yet"), "{cfg}: {e}");
    }
    // Past the target, the seed's recipe stops at its multi-device layout.
    let e = fails(&[
        "compile",
        "configs/internvl35-30b-a3b.toml",
        "--target",
        "cpu",
        "-o",
        out,
    ]);
    assert!(e.contains("devices = 16"), "{e}");
    let e = fails(&["compile", "configs/qwen3-moe-tiny.toml", "-o", "/dev/null"]);
    assert!(e.contains("not a regular file"), "{e}");
}

/// A compiled tiny Qwen3-MoE plan and its fixture data (2 rows of 24 tokens).
fn tiny_plan(dir: &Path) -> (PathBuf, PathBuf) {
    let plan = compile(fixture("qwen3_moe_tiny/model.toml").to_str().unwrap(), dir);
    (plan, fixture("qwen3_moe_tiny/inputs.safetensors"))
}

#[test]
fn run_options_are_checked_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = tiny_plan(dir.path());
    let (plan, data) = (plan.to_str().unwrap(), data.to_str().unwrap());
    let e = fails(&["run", plan, "--data", data, "--log-interval", "0"]);
    assert!(e.contains("--log-interval must be at least 1"), "{e}");
    let e = fails(&["run", plan, "--data", data, "--plot", "loss.png"]);
    assert!(
        e.contains("--plot loss.png") && e.contains("SVG only"),
        "{e}"
    );
    for flag in ["--plot", "--metrics"] {
        let file = if flag == "--plot" {
            "nowhere/loss.svg"
        } else {
            "nowhere/m.jsonl"
        };
        let out = mmc()
            .args([
                "run",
                plan,
                "--data",
                data,
                "--train-iters",
                "3",
                flag,
                file,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let log = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !log.contains("step "),
            "{flag}: trained before checking: {log}"
        );
        assert!(
            err.contains(flag) && err.contains("does not exist"),
            "{err}"
        );
    }
    let e = fails(&["run", plan, "--data", "configs/demo/demo.jsonl"]);
    assert!(e.contains("pass a MindSpeed-MM data.json"), "{e}");
    // A --load that does not exist is refused before any step.
    let e = fails(&["run", plan, "--data", data, "--load", "nowhere/ckpt"]);
    assert!(
        e.contains("--load nowhere/ckpt") && e.matches("No such file").count() == 1,
        "{e}"
    );
}

#[test]
fn a_closed_stdout_stops_the_printing_not_the_training() {
    // `mmc run ... | head -1`: the reader goes away after one line.
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = tiny_plan(dir.path());
    let metrics = dir.path().join("m.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mmc"))
        .args([
            "run",
            plan.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--train-iters", "6", "--metrics", metrics.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("step 1/6"), "{first}");
    // The read end is closed here.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(steps, 6, "training stopped with the pipe");
}

#[test]
fn a_damaged_or_hand_edited_plan_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = tiny_plan(dir.path());
    let data = data.to_str().unwrap();
    // A plan whose settings are out of range but whose checksum is right.
    let mut p = mmc_ir::plan::Plan::read(&plan).unwrap();
    p.settings.micro_batch_size = 0;
    let edited = dir.path().join("edited.bin");
    p.write(&edited).unwrap();
    let e = fails(&["run", edited.to_str().unwrap(), "--data", data]);
    assert!(
        e.contains("damaged") && e.contains("`micro_batch_size` is 0"),
        "{e}"
    );
    // One byte of a section changed: that section's checksum does not match, and the
    // message names it (the body, the kernels, the compiled steps).
    let bytes = std::fs::read(&plan).unwrap();
    let raw = mmc_ir::plan_file::RawPlanFile::parse(&plan, &bytes).unwrap();
    let sections: Vec<(String, usize, usize)> = raw
        .sections
        .iter()
        .map(|(kind, b)| {
            let start = b.as_ptr() as usize - bytes.as_ptr() as usize;
            (kind.name().to_string(), start, b.len())
        })
        .collect();
    assert_eq!(sections.len(), 3, "a compiled plan: body, library, steps");
    for (name, start, len) in &sections {
        let mut flipped_bytes = bytes.clone();
        flipped_bytes[start + len / 2] ^= 0x04;
        let flipped = dir.path().join("flipped.bin");
        std::fs::write(&flipped, &flipped_bytes).unwrap();
        let e = fails(&["run", flipped.to_str().unwrap(), "--data", data]);
        assert!(
            e.contains("damaged")
                && e.contains(&format!("{name} does not match its SHA-256 checksum")),
            "{name}: {e}"
        );
    }
    // Cut short, or with bytes after its end (a copy that went wrong).
    let (last, _, _) = sections.last().unwrap();
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = fails(&["run", cut.to_str().unwrap(), "--data", data]);
    assert!(
        e.contains(&format!(
            "cut short in its {last} section, 100 bytes are missing"
        )),
        "{e}"
    );
    let long = dir.path().join("long.bin");
    std::fs::write(&long, [&bytes[..], b"\n"].concat()).unwrap();
    let e = fails(&["run", long.to_str().unwrap(), "--data", data]);
    assert!(e.contains("1 bytes follow its last section"), "{e}");
}

/// A compiled plan from another CPU (here: this plan with its target rewritten, its sections
/// and checksums intact) is refused by `mmc run` before any native code loads, naming what
/// differs; the same plan still runs on the interpreter, which needs no native code.
#[test]
fn a_plan_compiled_for_another_cpu_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = tiny_plan(dir.path());
    let data = data.to_str().unwrap();
    let mut file = mmc_ir::plan_file::PlanFile::read(&plan).unwrap();
    assert!(file.native.is_some(), "a compiled plan");
    let host = file.target.clone();
    for (target, says) in [
        (
            mmc_ir::plan_file::cpu_target("x86_64", "znver4", "+avx2,+fma"),
            "built for CPU `znver4`",
        ),
        (
            mmc_ir::plan_file::cpu_target("aarch64", "neoverse-v2", "+neon"),
            "built for aarch64",
        ),
    ] {
        file.target = target.clone();
        let other = dir.path().join("other.bin");
        file.write(&other).unwrap();
        let e = fails(&["run", other.to_str().unwrap(), "--data", data]);
        assert!(
            e.contains(&format!("compiled for `{target}`"))
                && e.contains(&format!("this machine runs `{host}`"))
                && e.contains(says)
                && e.contains("recompile it on this machine"),
            "{e}"
        );
        let out = mmc()
            .args(["run", other.to_str().unwrap(), "--data", data])
            .args(["--backend", "interpreter", "--train-iters", "1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A plan records the checkpoint folder as `mmc compile` found it, relative when the paths it
/// was given were, and nothing else of the compiling machine's folders: a copy in another
/// folder runs, and the relative folder is opened from the working directory of `mmc run`.
#[test]
fn a_plan_names_no_folder_of_the_machine_and_runs_from_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(model.join("checkpoint")).unwrap();
    let src = fixture("qwen3_moe_tiny");
    std::fs::copy(src.join("model.toml"), model.join("model.toml")).unwrap();
    for f in std::fs::read_dir(src.join("checkpoint")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join("checkpoint").join(f.file_name())).unwrap();
    }
    let data = src.join("inputs.safetensors");
    let run = |cwd: &Path, plan: &str| {
        mmc()
            .current_dir(cwd)
            .args(["run", plan, "--train-iters", "1", "--data"])
            .arg(&data)
            .output()
            .unwrap()
    };
    let out = mmc()
        .current_dir(dir.path())
        .args(["compile", "model/model.toml", "-o", "plan.bin"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = dir.path().join("plan.bin");
    let p = mmc_ir::plan::Plan::read(&plan).unwrap();
    assert_eq!(p.checkpoint, Some(PathBuf::from("model/checkpoint")));
    let bytes = std::fs::read(&plan).unwrap();
    let folder = dir.path().to_str().unwrap().as_bytes();
    assert!(!bytes.windows(folder.len()).any(|w| w == folder));
    // A copy in another folder, run from the folder it was compiled in.
    std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
    std::fs::copy(&plan, dir.path().join("elsewhere/plan.bin")).unwrap();
    let out = run(dir.path(), "elsewhere/plan.bin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("step 1/1"));
    // From another working directory, the relative checkpoint folder is not there.
    let out = run(&dir.path().join("elsewhere"), "plan.bin");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model/checkpoint") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn bad_token_ids_are_named_by_input_row_and_position() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let (plan, _) = tiny_plan(dir.path());
    // The tiny model's vocabulary has 1024 tokens.
    let mut ids: Vec<i64> = (0..48).collect();
    ids[30] = 5000;
    let labels: Vec<i64> = (0..48).collect();
    let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ib, lb) = (bytes(&ids), bytes(&labels));
    let views = vec![
        (
            "input_ids",
            TensorView::new(safetensors::Dtype::I64, vec![2, 24], &ib).unwrap(),
        ),
        (
            "labels",
            TensorView::new(safetensors::Dtype::I64, vec![2, 24], &lb).unwrap(),
        ),
    ];
    let data = dir.path().join("bad.safetensors");
    safetensors::serialize_to_file(views, None, &data).unwrap();
    let e = fails(&[
        "run",
        plan.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        e.contains(
            "`input_ids` row 1, position 6: token id 5000 is outside the vocabulary (0..1024)"
        ),
        "{e}"
    );
    assert!(!e.contains("node "), "{e}");
}

#[test]
fn errors_say_each_thing_once_and_help_says_what_is_true() {
    let e = fails(&["run", "no-such-plan.bin", "--data", "x.safetensors"]);
    assert_eq!(e.matches("No such file").count(), 1, "{e}");
    let e = fails(&["compile", "no-such-model.toml"]);
    assert_eq!(e.matches("No such file").count(), 1, "{e}");
    let e = fails(&[
        "convert",
        "mmc-to-hf",
        "--hf-dir",
        "a",
        "--ckpt-dir",
        "b",
        "--save-dir",
        "c",
    ]);
    assert!(
        e.starts_with("error: a: ") && e.matches("No such file").count() == 1,
        "{e}"
    );
    assert!(!e.contains("can only run"), "{e}");

    let help = |args: &[&str]| {
        let out = mmc().args(args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    // Every option of `run` is built: none is offered with a "not built yet".
    let run = help(&["run", "--help"]);
    assert!(
        run.contains("--save <SAVE>") && !run.contains("not built yet"),
        "{run}"
    );
    let compile = help(&["compile", "--help"]);
    assert!(
        compile.contains("IR text") && !compile.contains("kernel sources into"),
        "{compile}"
    );
}
