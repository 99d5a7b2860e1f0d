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

shape by shape, each side in turn, `--rounds` times (default 2), keeping each side's best,
so that a burst of load on a shared machine does not decide a ratio (the FMA peak is the
better of one measurement before and one after). Everything is f32 at `--threads`
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


def build_bench() -> str:
    """Builds codegen/benches/gemm.rs (release) and returns its executable."""
    cmd = ["cargo", "bench", "-p", "mmc-codegen", "--bench", "gemm", "--no-run", "--message-format=json"]
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: building the mmc GEMM bench failed (exit status {p.returncode})")
    for line in p.stdout.splitlines():
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg["target"]["name"] == "gemm" and "bench" in msg["target"]["kind"]:
            return msg["executable"]
    raise SystemExit("error: cargo did not name the GEMM bench's executable")


def run_mmc(exe: str, threads: int, args: list[str]) -> list[dict]:
    p = subprocess.run([exe, "--json", "--threads", str(threads)] + args, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: the mmc GEMM bench failed (exit status {p.returncode})")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def mmc_args(item: tuple) -> list[str]:
    """The bench's arguments for one dense (4 fields) or grouped (5 fields) shape."""
    if len(item) == 4:
        name, m, k, n = item
        return ["--no-peak", "--shape", f"{name}={m},{k},{n}"]
    name, e, r, i, c = item
    return ["--no-peak", "--grouped", f"{name}={e},{r},{i},{c}"]


class TorchWorker:
    """This script in the torch interpreter, timing one shape per request (one import of torch
    for the whole run)."""

    def __init__(self, python: str, threads: int):
        self.p = subprocess.Popen([python, str(Path(__file__).resolve()), "--torch-worker", str(threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def time(self, item: tuple) -> list[dict]:
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write(json.dumps(list(item)) + "\n")
        self.p.stdin.flush()
        out = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise SystemExit(f"error: the torch GEMM worker stopped (exit status {self.p.wait()})")
            rec = json.loads(line)
            if rec.get("done"):
                return out
            out.append(rec)

    def close(self) -> None:
        assert self.p.stdin
        self.p.stdin.close()
        self.p.wait()


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


def torch_worker(threads: int) -> None:
    """Runs inside the torch interpreter: reads one shape per line from stdin (as
    [name, m, k, n] or [name, experts, rows per expert, inner, cols]) and answers with one JSON
    line per GEMM, named as the mmc bench's, then {"done": true}."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)

    def emit(name, flops, secs):
        print(json.dumps({"gemm": name, "impl": "torch", "ms": round(secs * 1e3, 3),
                          "gflops": round(flops / secs / 1e9, 1)}), flush=True)

    for line in sys.stdin:
        item = json.loads(line)
        if len(item) == 4:
            name, m, k, n = item
            a, b = torch.randn((m, k), generator=g), torch.randn((k, n), generator=g)
            emit(name, 2 * m * k * n, _best_seconds(lambda: torch.matmul(a, b)))
        else:
            name, e, r, i, c = item
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
        print(json.dumps({"done": True}), flush=True)


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
        torch_worker(int(sys.argv[2]))
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
    items: list[tuple] = []
    for config in args.config or CONFIGS:
        d, g = shapes(config)
        items += d + g
    names = []
    for item in items:
        if len(item) == 4:
            names.append((item[0], f"{item[1]} x {item[2]} x {item[3]}"))
        else:
            n, e, r, i, c = item
            names += [(n, f"{e} x [{r} x {i} x {c}]"), (f"{n} grad", f"{e} x [{r} x {i} x {c}]")]
    exe = build_bench()
    peaks = run_mmc(exe, args.threads, ["--peak-only"])
    torch = TorchWorker(args.python, args.threads)
    mmc_records, torch_records = [], []
    # Shape by shape, each side in turn, so that both see the same load.
    for _ in range(args.rounds):
        for item in items:
            mmc_records += run_mmc(exe, args.threads, mmc_args(item))
            torch_records += torch.time(item)
    torch.close()
    peaks += run_mmc(exe, args.threads, ["--peak-only"])
    peak = max(r["fma_peak_gflops"] for r in peaks)
    isa = peaks[0]["isa"]
    print(report(names, best(mmc_records), best(torch_records), peak, isa, args.threads), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "fma_peak_gflops": peak, "isa": isa,
                                         "mmc": mmc_records, "torch": torch_records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
