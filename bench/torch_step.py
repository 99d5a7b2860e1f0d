#!/usr/bin/env python3
"""PyTorch's training step on an mmc model TOML, for the side-by-side benchmark (bench/run.py).

The model is Hugging Face transformers' InternVLForConditionalGeneration (InternViT, pixel-shuffle
+ MLP projector, Qwen3-MoE text model) built from the TOML's keys as tests/fixtures/make_fixtures.py
builds its tiny InternVL3.5, randomly initialised with a fixed seed. A step is what `mmc run`
does per optimizer step: for each micro-batch, forward (LM loss + router_aux_loss_coef x the
load-balancing loss) and backward, then gradient clipping and AdamW, in f32 master weights.

The batch is synthetic and has mmc's static shapes: micro_batch_size rows of seq_length tokens,
all `max_tiles` tiles of the config's image size, their `<IMG_CONTEXT>` tokens at the start of
row 0 and random text tokens after them, labels on the text tokens (-100 on the image part).
`--write-batch FILE.safetensors` writes the same batch in mmc's tensor-data format, so that
`mmc run --data FILE.safetensors` trains on exactly these tokens and tiles.

Usage:
  torch_step.py --config X.toml --modes eager,compile,bf16 --steps 3 --threads 2
      one JSON line per mode, each measured in a fresh subprocess (its own peak RSS)
  torch_step.py --config X.toml --gemm --threads 2     GEMM GFLOP/s on the model's shapes
  torch_step.py --peak --threads 2                     measured matmul GFLOP/s (square f32)
  torch_step.py --config X.toml --write-batch b.safetensors
  torch_step.py --config X.toml --check-flops          the FLOPs formula against FlopCounterMode
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_shape  # noqa: E402

MODES = ("eager", "compile", "bf16")
IGNORE_INDEX = -100
# Vocabulary ids that are special in the real Qwen3/InternVL tokenizer start here; random text
# tokens stay below it (and below the image token id with a small vocabulary).
FIRST_SPECIAL_ID = 151643


def hf_config(s: model_shape.Shape, attn: str):
    """transformers' InternVLConfig (or Qwen3MoeConfig for a text-only TOML) of the mmc model."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen3MoeConfig

    t = s.text
    rope = t.get("rope_parameters", {}).get("rope_theta", t.get("rope_theta", 10000.0))
    text = Qwen3MoeConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=int(t.get("intermediate_size", s.expert_width)),
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        moe_intermediate_size=s.expert_width,
        norm_topk_prob=bool(t.get("norm_topk_prob", False)),
        rope_parameters={"rope_type": "default", "rope_theta": float(rope)},
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        router_aux_loss_coef=float(t.get("router_aux_loss_coef", 0.001)),
        output_router_logits=False,  # captured by hooks (InternVL's output has no router field)
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        max_position_embeddings=max(s.seq_length, 2048),
        attention_bias=bool(t.get("attention_bias", False)),
        initializer_range=float(t.get("initializer_range", 0.02)),
        hidden_act="silu",
        decoder_sparse_step=int(t.get("decoder_sparse_step", 1)),
        mlp_only_layers=list(t.get("mlp_only_layers", [])),
        use_sliding_window=False,
        dtype="float32",
    )
    text._attn_implementation = attn
    if s.vision is None:
        return text
    v = s.vision
    vision = InternVLVisionConfig(
        hidden_size=int(v["hidden_size"]),
        num_hidden_layers=int(v["num_hidden_layers"]),
        num_attention_heads=int(v["num_attention_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        num_channels=int(v.get("num_channels", 3)),
        attention_bias=bool(v.get("qkv_bias", v.get("attention_bias", True))),
        use_qk_norm=bool(v.get("use_qk_norm", v.get("qk_normalization", False))),
        norm_type=str(v.get("norm_type", "layer_norm")),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        hidden_act="gelu",
        use_mean_pooling=True,  # no final norm, as InternViT
        layer_scale_init_value=float(v.get("layer_scale_init_value", v.get("initializer_factor", 0.1))),
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        dtype="float32",
    )
    vision._attn_implementation = attn
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        downsample_ratio=s.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_token_id=s.img_context_token_id,
        image_seq_length=s.tokens_per_tile,
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        dtype="float32",
    )
    cfg._attn_implementation = attn
    return cfg


def build_model(s: model_shape.Shape, seed: int, attn: str):
    """The randomly initialised model (fixed seed), f32, in training mode."""
    import torch
    from transformers import InternVLForConditionalGeneration, Qwen3MoeForCausalLM

    cfg = hf_config(s, attn)
    torch.manual_seed(seed)
    cls = InternVLForConditionalGeneration if s.vision is not None else Qwen3MoeForCausalLM
    return cls(cfg).to(torch.float32).train()


def synthetic_batch(s: model_shape.Shape, seed: int) -> list[dict]:
    """One optimizer step's micro-batches with mmc's static shapes (see the module doc)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text_ids = min(s.vocab, FIRST_SPECIAL_ID)
    if s.vision is not None:
        text_ids = min(text_ids, s.img_context_token_id)
    n_img = s.tiles * s.tokens_per_tile
    if n_img >= s.seq_length:
        raise ValueError(f"{n_img} image tokens do not leave text in a row of {s.seq_length}")
    out = []
    for _ in range(s.micro_batches):
        ids = torch.randint(0, text_ids, (s.micro_batch_size, s.seq_length), generator=g, dtype=torch.int64)
        labels = ids.clone()
        mb = {"input_ids": ids, "labels": labels}
        if s.vision is not None:
            ids[0, :n_img] = s.img_context_token_id
            labels[0, :n_img] = IGNORE_INDEX
            side = int(s.vision["image_size"])
            mb["pixel_values"] = torch.randn((s.tiles, 3, side, side), generator=g, dtype=torch.float32)
        out.append(mb)
    return out


def write_batch(s: model_shape.Shape, seed: int, path: str) -> None:
    """The synthetic batch as mmc tensor data (`mmc run --data FILE.safetensors`)."""
    import torch
    from safetensors.torch import save_file

    mbs = synthetic_batch(s, seed)
    tensors = {
        "input_ids": torch.cat([m["input_ids"] for m in mbs]).contiguous(),
        "labels": torch.cat([m["labels"] for m in mbs]).contiguous(),
    }
    if s.vision is not None:
        tensors["pixel_values"] = torch.stack([m["pixel_values"] for m in mbs]).contiguous()
    save_file(tensors, path)


def _aux_loss(router_logits, s: model_shape.Shape):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    return load_balancing_loss_func(tuple(router_logits), s.experts, s.top_k, None)


def measure_mode(args, s: model_shape.Shape) -> dict:
    """Builds the model and times `args.steps` steps after `args.warmup` in this process."""
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(s, args.seed, args.attn)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = params - expert_params + (expert_params * s.top_k) // max(1, s.experts)
    lm = model.model.language_model if s.vision is not None else model.model
    router_logits: list = []
    for layer in lm.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda _m, _i, out: router_logits.append(out[0]))
    coef = float(s.text.get("router_aux_loss_coef", 0.001))
    opt = torch.optim.AdamW(
        model.parameters(), lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps,
        weight_decay=s.weight_decay, foreach=True,
    )
    fwd = model
    if args.mode == "compile":
        fwd = torch.compile(model)
    batch = synthetic_batch(s, args.seed + 1)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step() -> float:
        loss_sum = 0.0
        for mb in batch:
            router_logits.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mode == "bf16"):
                out = fwd(**mb, use_cache=False)
                loss = out.loss
                if coef > 0 and router_logits:
                    loss = loss + coef * _aux_loss(router_logits, s)
            (loss / len(batch)).backward()
            loss_sum += loss.item() / len(batch)
        if s.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum

    warm_ms, losses, step_ms = [], [], []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        losses.append(step())
        warm_ms.append((time.perf_counter() - t0) * 1e3)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        step_ms.append((time.perf_counter() - t0) * 1e3)
    flops = model_shape.step_flops(s)
    rec = {
        "mode": args.mode,
        "step_ms": [round(x, 1) for x in step_ms],
        "median_ms": round(statistics.median(step_ms), 1),
        "warmup_ms": [round(x, 1) for x in warm_ms],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_build_bytes": rss_built,
        "params": params,
        "params_active": active,
        "tokens_per_step": s.tokens_per_step,
        "tiles_per_micro_batch": s.tiles,
        "flops_per_step": flops["total"],
        "flops_by_part": flops,
        "losses": [round(x, 5) for x in losses],
        "threads": args.threads,
        "attn_implementation": args.attn,
        "experts_implementation": getattr(lm.config, "_experts_implementation", None),
        "torch": torch.__version__,
    }
    if args.mode == "compile":
        # The first call traces and compiles (forward and backward); the rest are steady steps.
        rec["compile_s"] = round(warm_ms[0] / 1e3, 2) if warm_ms else None
    return rec


def measure_all(args) -> int:
    """Runs each mode in a fresh subprocess, so that each has its own peak RSS; one JSON line each."""
    status = 0
    for mode in args.modes.split(","):
        if mode not in MODES:
            print(f"error: unknown mode {mode!r} (expected one of {', '.join(MODES)})", file=sys.stderr)
            return 2
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--mode", mode,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--seed", str(args.seed), "--attn", args.attn]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            print(json.dumps({"mode": mode, "error": f"exit status {p.returncode}"}), flush=True)
            status = 1
            continue
        print(p.stdout.strip().splitlines()[-1], flush=True)
    return status


def _time_matmul(a, b, reps: int, min_s: float = 0.2) -> float:
    """Seconds per a @ b: the best of `reps` rounds, each long enough to time."""
    import torch

    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = min(best, dt / n)
    return best


def gemm(args, s: model_shape.Shape) -> None:
    """torch.matmul GFLOP/s (f32) on the step's GEMM shapes; one JSON line per shape."""
    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    for name, m, k, n in model_shape.gemm_shapes(s):
        a = torch.randn((m, k), generator=g)
        b = torch.randn((k, n), generator=g)
        t = _time_matmul(a, b, reps=3)
        print(json.dumps({"gemm": name, "m": m, "k": k, "n": n, "dtype": "f32", "ms": round(t * 1e3, 3),
                          "gflops": round(2 * m * k * n / t / 1e9, 1), "threads": args.threads}), flush=True)


def peak(args) -> None:
    """The measured matmul GFLOP/s: the best of square f32 matmuls that fit the caches' reuse."""
    import torch

    torch.set_num_threads(args.threads)
    best = 0.0
    for size in (1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        t = _time_matmul(a, b, reps=5)
        best = max(best, 2 * size**3 / t / 1e9)
    print(json.dumps({"measured_matmul_gflops": round(best, 1), "dtype": "f32", "threads": args.threads}), flush=True)


def check_flops(args, s: model_shape.Shape) -> None:
    """The formula of model_shape.step_flops against torch's FlopCounterMode on one eager step.

    FlopCounterMode counts the matmuls, convolutions and SDPA that autograd runs, forward and
    backward; the formula also counts the patch embedding's input gradient, which autograd skips
    (the pixels need none), so the two differ by that one convolution (2 n (P-1) 3 p^2 Hv); and
    it has no formula for grouped_mm, so the routed experts are left out of the comparison when
    no grouped_mm was counted. The flash-attention backward recomputes the scores, so the
    counted attention core is 3.5 forwards where the formula has 3.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    model = build_model(s, args.seed, args.attn)
    counter = FlopCounterMode(display=False)
    with counter:
        for mb in synthetic_batch(s, args.seed + 1):
            model(**mb, use_cache=False).loss.backward()
    formula = model_shape.step_flops(s)
    patch_dx = 0
    if s.vision is not None:
        p = int(s.vision["patch_size"])
        patch_dx = s.micro_batches * 2 * s.tiles * s.patches_per_tile * 3 * p * p * int(s.vision["hidden_size"])
    counted = counter.get_total_flops()
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    expected = formula["total"] - patch_dx
    # FlopCounterMode has no formula for grouped_mm (transformers' routed experts): leave them out.
    experts_counted = any("grouped_mm" in k for k in by_op)
    if not experts_counted:
        expected -= formula["experts"]
    print(json.dumps({"counted_flops": counted, "formula_flops": formula["total"], "expected_counted": expected,
                      "experts_counted": experts_counted, "ratio": round(counted / expected, 6),
                      "by_op": by_op}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="an mmc model TOML")
    ap.add_argument("--mode", choices=MODES, help="measure one mode in this process")
    ap.add_argument("--modes", default=",".join(MODES), help="modes, each in a fresh subprocess")
    ap.add_argument("--steps", type=int, default=3, help="measured steps")
    ap.add_argument("--warmup", type=int, default=1, help="steps before measuring (compile happens here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention")
    ap.add_argument("--gemm", action="store_true", help="GEMM microbenchmark on the model's shapes")
    ap.add_argument("--peak", action="store_true", help="measured matmul GFLOP/s")
    ap.add_argument("--check-flops", action="store_true", help="the FLOPs formula against FlopCounterMode")
    ap.add_argument("--write-batch", metavar="FILE", help="write the synthetic batch for `mmc run --data`")
    args = ap.parse_args()
    if args.peak:
        peak(args)
        return 0
    if not args.config:
        ap.error("--config is required")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--steps and --threads must be at least 1, --warmup at least 0")
    try:
        s = model_shape.load(args.config)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.write_batch:
        write_batch(s, args.seed + 1, args.write_batch)
        return 0
    if args.check_flops:
        check_flops(args, s)
        return 0
    if args.gemm:
        gemm(args, s)
        return 0
    if args.mode:
        print(json.dumps(measure_mode(args, s)), flush=True)
        return 0
    return measure_all(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
