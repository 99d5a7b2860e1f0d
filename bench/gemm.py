#!/usr/bin/env python3
"""GEMM benchmark: mmc's library calls against torch.matmul on the model's shapes, and both
against the machine's FMA peak (issue 11, item 5).

  python3 bench/gemm.py --python /path/to/venv/bin/python [--config X.toml ...] [--threads 2]

For each config (default: the two benchmark configurations) it takes the step's GEMMs from
model_shape.gemm_shapes (dense [m, k] x [k, n], forward and backward forms) and the routed
experts as grouped matmuls (every expert with the balanced share of rows), then runs

  - mmc: `cargo bench -p mmc-codegen --bench gemm -- --json ...` (codegen/benches/gemm.rs), which
    times the library calls and measures the FMA peak: a loop of independent AVX-512 (or AVX2)
    FMAs on every thread at once;
  - PyTorch: torch.matmul on the same shapes in the interpreter given by --python (a grouped
    matmul as one torch.matmul per expert, its gradient as the two per expert, dy w^T and
    xs^T dy on transposed views, as eager PyTorch runs an MoE);

alternating the two `--rounds` times (default 2) and keeping each side's best, so that a
burst of load on a shared machine does not decide a ratio. Everything is f32 at `--threads`
threads on both sides. It prints one table: GFLOP/s of each side, mmc / torch, and each
side's fraction of the FMA peak. This script uses only the standard library.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import model_shape  # noqa: E402

CONFIGS = ["configs/bench/internvl35-vocab.toml", "configs/bench/internvl35-experts.toml"]


def shapes(config: str) -> tuple[list[tuple[str, int, int, int]], list[tuple[str, int, int, int, int]]]:
    """The dense GEMMs of a config and its grouped expert GEMMs (name, experts, rows per
    expert, inner, cols); names carry the config's file name."""
    s = model_shape.load(REPO / config if not Path(config).is_absolute() else config)
    tag = Path(config).stem.replace("internvl35-", "")
    dense = [(f"{tag}: {name}", m, k, n) for name, m, k, n in model_shape.gemm_shapes(s)]
    grouped = []
    if s.experts:
        per = max(1, s.micro_batch_size * s.seq_length * s.top_k // s.experts)
        I, H = s.expert_width, s.hidden
        grouped = [(f"{tag}: experts gate_up", s.experts, per, H, 2 * I),
                   (f"{tag}: experts down", s.experts, per, I, H)]
    return dense, grouped


def run_mmc(threads: int, dense, grouped) -> list[dict]:
    cmd = ["cargo", "bench", "-q", "-p", "mmc-codegen", "--bench", "gemm", "--", "--json",
           "--threads", str(threads)]
    for name, m, k, n in dense:
        cmd += ["--shape", f"{name}={m},{k},{n}"]
    for name, e, r, i, c in grouped:
        cmd += ["--grouped", f"{name}={e},{r},{i},{c}"]
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: the mmc GEMM bench failed (exit status {p.returncode})")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def run_torch(python: str, threads: int, dense, grouped) -> list[dict]:
    spec = json.dumps({"threads": threads, "dense": dense, "grouped": grouped})
    p = subprocess.run([python, str(Path(__file__).resolve()), "--torch-worker", spec],
                       stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: the torch GEMM worker failed (exit status {p.returncode})")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _best_seconds(f, rounds: int = 3, min_s: float = 0.2) -> float:
    """Seconds per f(): the best of `rounds` rounds, each at least min_s, after a warm-up (as
    codegen/benches/gemm.rs times)."""
    f()
    best = float("inf")
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            f()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = min(best, dt / n)
    return best


def torch_worker(spec: dict) -> None:
    """Runs inside the torch interpreter: one JSON line per shape, named as the mmc bench's."""
    import torch

    torch.set_num_threads(spec["threads"])
    g = torch.Generator().manual_seed(0)

    def emit(name, flops, secs):
        print(json.dumps({"gemm": name, "impl": "torch", "ms": round(secs * 1e3, 3),
                          "gflops": round(flops / secs / 1e9, 1)}), flush=True)

    for name, m, k, n in spec["dense"]:
        a, b = torch.randn((m, k), generator=g), torch.randn((k, n), generator=g)
        emit(name, 2 * m * k * n, _best_seconds(lambda: torch.matmul(a, b)))
    for name, e, r, i, c in spec["grouped"]:
        xs, w = torch.randn((e * r, i), generator=g), torch.randn((e, i, c), generator=g)
        dy = torch.randn((e * r, c), generator=g)

        def fwd():
            for x in range(e):
                torch.matmul(xs[x * r:(x + 1) * r], w[x])

        def bwd():
            for x in range(e):
                torch.matmul(dy[x * r:(x + 1) * r], w[x].t())
                torch.matmul(xs[x * r:(x + 1) * r].t(), dy[x * r:(x + 1) * r])

        emit(name, 2 * e * r * i * c, _best_seconds(fwd))
        emit(f"{name} grad", 4 * e * r * i * c, _best_seconds(bwd))


def best(records: list[dict]) -> dict[str, dict]:
    """The fastest record of each GEMM name."""
    out: dict[str, dict] = {}
    for r in records:
        if "gemm" in r and (r["gemm"] not in out or r["gflops"] > out[r["gemm"]]["gflops"]):
            out[r["gemm"]] = r
    return out


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(names: list[tuple[str, str]], mmc: dict, torch: dict, peak: float, isa: str, threads: int) -> str:
    rows = [["GEMM (f32)", "m x k x n", "mmc GFLOP/s", "torch GFLOP/s", "mmc / torch", "mmc of peak",
             "torch of peak"]]
    for name, dims in names:
        a, b = mmc.get(name, {}).get("gflops"), torch.get(name, {}).get("gflops")
        rows.append([name, dims, f"{a:.1f}" if a else "-", f"{b:.1f}" if b else "-",
                     f"{a / b:.2f}x" if a and b else "-", f"{a / peak:.0%}" if a and peak else "-",
                     f"{b / peak:.0%}" if b and peak else "-"])
    head = f"FMA peak ({isa}, f32, {threads} threads): {peak:.1f} GFLOP/s"
    return head + "\n\n" + table(rows)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--torch-worker":
        torch_worker(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", help=f"an mmc model TOML (repeatable; default {', '.join(CONFIGS)})")
    ap.add_argument("--python", required=True, help="a python with torch")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of mmc and torch; the best of each")
    ap.add_argument("--json", type=Path, help="also write every record as JSON to this file")
    args = ap.parse_args()
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be at least 1")
    dense, grouped = [], []
    for config in args.config or CONFIGS:
        d, g = shapes(config)
        dense += d
        grouped += g
    names = [(n, f"{m} x {k} x {nn}") for n, m, k, nn in dense]
    for n, e, r, i, c in grouped:
        names += [(n, f"{e} x [{r} x {i} x {c}]"), (f"{n} grad", f"{e} x [{r} x {i} x {c}]")]
    mmc_records, torch_records = [], []
    for _ in range(args.rounds):
        mmc_records += run_mmc(args.threads, dense, grouped)
        torch_records += run_torch(args.python, args.threads, dense, grouped)
    peaks = [r for r in mmc_records if "fma_peak_gflops" in r]
    peak = max(r["fma_peak_gflops"] for r in peaks)
    isa = peaks[0]["isa"]
    print(report(names, best(mmc_records), best(torch_records), peak, isa, args.threads), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "fma_peak_gflops": peak, "isa": isa,
                                         "mmc": mmc_records, "torch": torch_records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
