#!/usr/bin/env python3
"""Side-by-side benchmark: mmc's training step against PyTorch's (eager, torch.compile, bf16).

Same model (an mmc model TOML), same batch geometry, same thread count, in one run:

  python3 bench/run.py --config configs/bench/internvl35-vocab.toml --steps 3 --threads 2 --python /path/to/venv/bin/python
  python3 bench/run.py --config ... --install-torch          # makes a venv with torch + transformers first

It builds mmc (`cargo build --release`), runs `mmc compile` and `mmc run --train-iters W+N
--metrics m.jsonl` (its peak RSS from the kernel's rusage of that process), reads mmc's
per-step `step_ms` (with `--mmc-bf16`, also for the config with `dtype = "bf16"`, against
PyTorch's bf16 autocast mode), runs bench/torch_step.py once per PyTorch mode (each in a fresh process, so
that each has its own peak RSS), measures the machine's matmul GFLOP/s and torch.matmul on the
model's GEMM shapes, and prints one table. Both sides skip W warm-up steps (`--warmup`, 1) and
report the median of the N after them.

This script uses only the standard library; PyTorch runs in the interpreter given by
`--python` (or the venv that `--install-torch` makes). The batch is, by default, the synthetic
batch of torch_step.py written as mmc tensor data, so both sides train on the same tokens and
tiles; `--data data.json` gives mmc a MindSpeed-MM data.json instead (PyTorch keeps the
synthetic batch of the same shapes; mmc's shapes are static, so its step costs the same).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import model_shape  # noqa: E402

DEFAULT_VENV = Path.home() / ".cache" / "mmc-bench-venv"
MODES = ("eager", "compile", "bf16")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_checked(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    log(" ".join(str(c) for c in cmd))
    p = subprocess.run(cmd, **kw)
    if p.returncode != 0:
        tail = ""
        if kw.get("stderr") == subprocess.PIPE and p.stderr:
            tail = ": " + p.stderr.strip().splitlines()[-1]
        raise BenchError(f"{what} failed (exit status {p.returncode}){tail}")
    return p


def install_torch(venv: Path, torch_index: str | None) -> Path:
    """Creates `venv` (outside the repository) with torch and transformers; returns its python."""
    venv = venv.expanduser().resolve()
    if venv == REPO or REPO in venv.parents:
        raise BenchError(f"--venv {venv} is inside the repository; put it outside (default {DEFAULT_VENV})")
    py = venv / "bin" / "python"
    if not py.exists():
        run_checked([sys.executable, "-m", "venv", str(venv)], "creating the venv")
    run_checked([str(py), "-m", "pip", "install", "--upgrade", "pip"], "upgrading pip")
    torch_cmd = [str(py), "-m", "pip", "install", "torch"]
    if torch_index:
        torch_cmd += ["--index-url", torch_index]
    run_checked(torch_cmd, "installing torch")
    run_checked([str(py), "-m", "pip", "install", "transformers", "safetensors"], "installing transformers")
    return py


def check_python(py: str) -> str:
    p = subprocess.run([py, "-c", "import torch, transformers, safetensors; print(torch.__version__, transformers.__version__)"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise BenchError(f"{py} cannot import torch, transformers and safetensors; pass --install-torch "
                         f"or --python of a venv that has them")
    return p.stdout.strip()


def run_with_rss(cmd: list[str], env: dict | None = None) -> tuple[int, int, float]:
    """Runs `cmd` (its output to our stderr, keeping stdout for the table); returns (exit status,
    peak RSS in bytes of that process from the kernel's rusage, wall seconds)."""
    log(" ".join(str(c) for c in cmd))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


def bf16_config(config: str, work: Path) -> str:
    """A copy of the model TOML `config` in `work` with `dtype = "bf16"` (mmc's bf16 compute)."""
    text = Path(config).read_text()
    new, n = re.subn(r'(?m)^dtype\s*=\s*"f32"', 'dtype = "bf16"', text)
    if n != 1:
        raise BenchError(f'{config}: expected one `dtype = "f32"` line to turn into bf16, found {n}')
    out = work / "config-bf16.toml"
    out.write_text(new)
    return str(out)


def run_mmc(args, work: Path, data: str, config: str, mode: str = "mmc") -> dict:
    """`mmc compile` + `mmc run` of `config`; mmc's per-step times and peak RSS."""
    mmc = REPO / "target" / "release" / "mmc"
    if not args.skip_build:
        run_checked(["cargo", "build", "--release", "--bin", "mmc"], "cargo build", cwd=REPO)
    if not mmc.exists():
        raise BenchError(f"{mmc} does not exist (run without --skip-build)")
    plan, metrics = work / f"{mode}-plan.bin", work / f"{mode}-metrics.jsonl"
    status, compile_rss, compile_s = run_with_rss([str(mmc), "compile", config, "-o", str(plan)])
    if status != 0:
        raise BenchError(f"mmc compile failed (exit status {status})")
    env = dict(os.environ)
    # The compiled backend takes --threads; the interpreter runs on one thread (its matmuls
    # on matrixmultiply's threads, which read this variable).
    env["MATMUL_NUM_THREADS"] = str(args.threads)
    interpreted = any("interpreter" in a for a in args.mmc_run_arg)
    threads = [] if interpreted else ["--threads", str(args.threads)]
    cmd = [str(mmc), "run", str(plan), "--data", data, "--train-iters", str(args.warmup + args.steps),
           "--metrics", str(metrics)] + threads + args.mmc_run_arg
    status, rss, wall = run_with_rss(cmd, env)
    if status != 0:
        raise BenchError(f"mmc run failed (exit status {status})")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if len(rows) < args.warmup + args.steps:
        raise BenchError(f"{metrics} holds {len(rows)} steps, expected {args.warmup + args.steps}")
    step_ms = [float(r["step_ms"]) for r in rows]
    measured = step_ms[args.warmup:]
    return {
        "mode": mode,
        "step_ms": [round(x, 1) for x in measured],
        "warmup_ms": [round(x, 1) for x in step_ms[: args.warmup]],
        "median_ms": round(statistics.median(measured), 1),
        "peak_rss_bytes": rss,
        "compile_s": round(compile_s, 2),
        "compile_peak_rss_bytes": compile_rss,
        "losses": [round(float(r["loss"]), 5) for r in rows],
        "tokens_per_step": rows[-1].get("tokens"),
        "run_wall_s": round(wall, 2),
    }


def torch_json_lines(py: str, argv: list[str], what: str) -> list[dict]:
    p = run_checked([py, str(HERE / "torch_step.py")] + argv, what, stdout=subprocess.PIPE, text=True)
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def fmt_gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def fmt_ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(args, s, flops, results: dict, peak_gflops, gemms) -> str:
    cols = [c for c in ("mmc", "mmc-bf16") + MODES if c in results]
    eager = results.get("eager", {})
    autocast = results.get("bf16", {})
    out = [f"config: {args.config}  (tokens/step {s.tokens_per_step}, tiles/micro-batch {s.tiles}, "
           f"threads {args.threads}, {args.steps} measured steps after {args.warmup} warm-up)",
           f"step FLOPs (matmuls, fwd+bwd): {flops['total'] / 1e9:.1f} GFLOP "
           f"(LM head {flops['lm_head'] / 1e9:.1f}, experts {flops['experts'] / 1e9:.1f}, "
           f"attention {(flops['text_attention_proj'] + flops['text_attention_core']) / 1e9:.1f}, "
           f"vision+projector {(flops['vision'] + flops['projector']) / 1e9:.1f})",
           f"measured matmul GFLOP/s (best torch.matmul f32, square or the GEMMs below, {args.threads} threads): "
           + (f"{peak_gflops:.1f}" if peak_gflops else "-"),
           ""]
    rows = [["", *cols]]

    def row(name, f):
        rows.append([name] + [f(results[c]) for c in cols])

    row("median step", lambda r: f"{r['median_ms']:.0f} ms" if "median_ms" in r else r.get("error", "-"))
    row("step / eager", lambda r: fmt_ratio(r.get("median_ms"), eager.get("median_ms")))
    if autocast:
        row("step / bf16", lambda r: fmt_ratio(r.get("median_ms"), autocast.get("median_ms")))
    row("peak RSS", lambda r: fmt_gb(r.get("peak_rss_bytes")))
    row("RSS / eager", lambda r: fmt_ratio(r.get("peak_rss_bytes"), eager.get("peak_rss_bytes")))
    if autocast:
        row("RSS / bf16", lambda r: fmt_ratio(r.get("peak_rss_bytes"), autocast.get("peak_rss_bytes")))
    row("tokens/s", lambda r: f"{s.tokens_per_step / r['median_ms'] * 1e3:.0f}" if "median_ms" in r else "-")
    row("GFLOP/s", lambda r: f"{flops['total'] / r['median_ms'] / 1e6:.1f}" if "median_ms" in r else "-")
    row("of measured peak", lambda r: f"{flops['total'] / r['median_ms'] / 1e6 / peak_gflops:.1%}"
        if "median_ms" in r and peak_gflops else "-")
    row("compile", lambda r: f"{r['compile_s']:.1f} s" if r.get("compile_s") is not None else "-")
    out.append(table(rows))
    if gemms:
        out.append("")
        grow = [["GEMM (torch.matmul, f32)", "m x k x n", "ms", "GFLOP/s", "of peak"]]
        for g in gemms:
            grow.append([g["gemm"], f"{g['m']} x {g['k']} x {g['n']}", f"{g['ms']:.3f}", f"{g['gflops']:.1f}",
                         f"{g['gflops'] / peak_gflops:.0%}" if peak_gflops else "-"])
        out.append(table(grow))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="an mmc model TOML")
    ap.add_argument("--data", help="mmc's data: a data.json or .safetensors (default: the synthetic batch)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps on each side (not measured)")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides")
    ap.add_argument("--modes", default=",".join(MODES), help="PyTorch modes to run")
    ap.add_argument("--python", help="a python with torch, transformers and safetensors")
    ap.add_argument("--install-torch", action="store_true", help="create --venv with torch + transformers")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"venv for --install-torch (default {DEFAULT_VENV})")
    ap.add_argument("--torch-index", help="pip index URL for torch with --install-torch (default PyPI; e.g. "
                    "https://download.pytorch.org/whl/cpu for the CPU-only wheel without the CUDA libraries)")
    ap.add_argument("--torch-only", action="store_true", help="skip mmc (PyTorch, GEMMs and peak only)")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM microbenchmark")
    ap.add_argument("--skip-build", action="store_true", help="use target/release/mmc as it is")
    ap.add_argument("--mmc-bf16", action="store_true",
                    help='also run mmc with dtype = "bf16" (column mmc-bf16; compare with the bf16 autocast mode)')
    ap.add_argument("--mmc-bf16-only", action="store_true", help="run mmc with bf16 only (not the config's f32)")
    ap.add_argument("--mmc-run-arg", action="append", default=[], help="extra argument for `mmc run` (repeatable)")
    ap.add_argument("--work-dir", type=Path, help="where plan, metrics and batch go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write every result as JSON to this file")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--steps and --threads must be at least 1, --warmup at least 0")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (expected some of {', '.join(MODES)})")
    try:
        s = model_shape.load(args.config)
        if args.install_torch:
            py = str(install_torch(args.venv, args.torch_index))
        elif args.python:
            py = args.python
        else:
            raise BenchError("PyTorch is needed: pass --python PATH (a venv with torch and transformers) or --install-torch")
        log(f"torch, transformers: {check_python(py)}")
        tmp = None
        if args.work_dir:
            work = args.work_dir
            work.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="mmc-bench-")
            work = Path(tmp.name)
        results: dict = {}
        if not args.torch_only:
            data = args.data
            if data is None:
                data = str(work / "batch.safetensors")
                run_checked([py, str(HERE / "torch_step.py"), "--config", args.config, "--write-batch", data],
                            "writing the synthetic batch")
            if not args.mmc_bf16_only:
                results["mmc"] = run_mmc(args, work, data, args.config)
            if args.mmc_bf16 or args.mmc_bf16_only:
                results["mmc-bf16"] = run_mmc(args, work, data, bf16_config(args.config, work), "mmc-bf16")
        common = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--threads", str(args.threads)]
        if modes:
            for rec in torch_json_lines(py, common + ["--modes", ",".join(modes)], "torch_step.py"):
                results[rec["mode"]] = rec
        peak = torch_json_lines(py, ["--peak", "--threads", str(args.threads)], "the matmul peak")
        peak_gflops = peak[0]["measured_matmul_gflops"] if peak else None
        gemms = [] if args.no_gemm else torch_json_lines(
            py, ["--config", args.config, "--gemm", "--threads", str(args.threads)], "the GEMM microbenchmark")
        # Under load a square matmul can time below a model GEMM: the peak is the best of all.
        if peak_gflops is not None and gemms:
            peak_gflops = max([peak_gflops] + [g["gflops"] for g in gemms])
        flops = model_shape.step_flops(s)
        print(report(args, s, flops, results, peak_gflops, gemms), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"config": args.config, "threads": args.threads, "flops": flops,
                                             "measured_matmul_gflops": peak_gflops, "results": results,
                                             "gemm": gemms}, indent=1) + "\n")
        if tmp is not None:
            tmp.cleanup()
    except (BenchError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if shutil.which("cargo") is None and "--torch-only" not in sys.argv and "--skip-build" not in sys.argv:
        print("error: cargo is not on PATH (needed to build mmc; or pass --skip-build / --torch-only)", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
