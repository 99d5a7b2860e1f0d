"""The shapes of an mmc model TOML and the matmul FLOPs of one training step (stdlib only).

Both bench/run.py (no PyTorch) and bench/torch_step.py read the model through this module, so
mmc and PyTorch are always timed on the same batch geometry and credited with the same FLOPs.

FLOPs of one training step (micro-batches x one micro-step; forward + backward), counting the
matrix products only (2 FLOPs per multiply-add); norms, softmax, activations, RoPE, routing and
AdamW are elementwise and left out. Backward costs twice the forward (input and weight
gradients), so a step is 3 x the forward:

  text, per row of S tokens (T = S x micro_batch_size tokens in all):
    attention projections  2 T H (nh hd + 2 nkv hd) + 2 T (nh hd) H
    attention core         4 B nh S^2 hd        (QK^T and PV over the whole S x S square,
                                                  as Megatron's and PaLM's MFU formulas count it)
    router                 2 T H E
    routed experts         6 T k H I            (gate and up [H, 2I], down [I, H], k experts/token)
    LM head                2 T H V              (the term that dominates with the real vocabulary)
  vision, per tile of P = (image/patch)^2 patches + CLS, n tiles per micro-batch:
    patch embedding        2 n (P-1) (3 p^2) Hv
    per layer              2 n P (4 Hv^2 + 2 Hv Iv) + 4 n P^2 Hv
  projector (pixel shuffle by r: 1/r^2 x Hv inputs per image token, t tokens per tile)
                           2 n t (Hv/r^2 H + H H)

6 x params x tokens is not enough here: with a 151,936-token vocabulary the LM head is most
of the step, and its embedding twin (a gather) costs nothing, so the head is counted on its own.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Shape:
    """The keys of an mmc model TOML that size the step, with mmc's defaults."""

    # [model]
    img_context_token_id: int
    # [model.vision] (None for a text-only model)
    vision: dict | None
    downsample_ratio: float
    # [model.text]
    text: dict
    # [train]
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    max_tiles: int
    dtype: str
    lr: float
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    seed: int

    @property
    def hidden(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def heads(self) -> int:
        return int(self.text["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.text["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.text.get("head_dim", self.hidden // self.heads))

    @property
    def vocab(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def experts(self) -> int:
        return int(self.text.get("num_experts", self.text.get("num_local_experts", 0)))

    @property
    def top_k(self) -> int:
        return int(self.text["num_experts_per_tok"])

    @property
    def expert_width(self) -> int:
        return int(self.text["moe_intermediate_size"])

    @property
    def micro_batches(self) -> int:
        """Micro-steps per optimizer step (data parallelism is 1 in the benchmark)."""
        return self.global_batch_size // self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def patches_per_tile(self) -> int:
        assert self.vision is not None, "a text-only model has no tiles"
        side = int(self.vision["image_size"]) // int(self.vision["patch_size"])
        return side * side

    @property
    def tokens_per_tile(self) -> int:
        """`<IMG_CONTEXT>` tokens per tile: patches after the pixel shuffle."""
        return round(self.patches_per_tile * self.downsample_ratio**2)

    @property
    def tiles(self) -> int:
        """Tiles per micro-batch (every slot filled in the benchmark batch)."""
        return self.max_tiles if self.vision is not None else 0


def _scalar(v):
    # `image_size = [a, a]` is accepted by mmc; the benchmark needs square tiles.
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise ValueError(f"non-square size {v} is not supported by the benchmark")
        return v[0]
    return v


def load(path: str | Path) -> Shape:
    """Reads the TOML's `[model]`, `[model.vision]`, `[model.projector]`, `[model.text]`, `[train]`."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    model = doc.get("model", {})
    if "hf_config" in model:
        raise ValueError(f"{path}: the benchmark needs the architecture in the TOML, not `hf_config`")
    text = dict(model.get("text", {}))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "num_experts_per_tok", "moe_intermediate_size"):
        if key not in text:
            raise ValueError(f"{path}: [model.text] {key} is required")
    vision = model.get("vision")
    if vision is not None:
        vision = {k: _scalar(v) for k, v in vision.items()}
    train = doc.get("train", {})
    micro = int(train.get("micro_batch_size", 1))
    return Shape(
        img_context_token_id=int(model.get("img_context_token_id", 151671)),
        vision=vision,
        downsample_ratio=float(model.get("projector", {}).get("downsample_ratio", 0.5)),
        text=text,
        micro_batch_size=micro,
        global_batch_size=int(train.get("global_batch_size", micro)),
        seq_length=int(train.get("seq_length", 4096)),
        max_tiles=int(train.get("max_tiles", 12)),
        dtype=str(train.get("dtype", "bf16")),
        lr=float(train.get("lr", 1e-5)),
        weight_decay=float(train.get("weight_decay", 0.0)),
        clip_grad=float(train.get("clip_grad", 1.0)),
        adam_beta1=float(train.get("adam_beta1", 0.9)),
        adam_beta2=float(train.get("adam_beta2", 0.999)),
        adam_eps=float(train.get("adam_eps", 1e-8)),
        seed=int(train.get("seed", 1234)),
    )


def step_flops(s: Shape) -> dict[str, int]:
    """Matmul FLOPs of one optimizer step by part (see the module doc), forward x 3."""
    B, S, H = s.micro_batch_size, s.seq_length, s.hidden
    T = B * S
    nh, nkv, hd = s.heads, s.kv_heads, s.head_dim
    per_layer_proj = 2 * T * H * (nh * hd + 2 * nkv * hd) + 2 * T * (nh * hd) * H
    per_layer_core = 4 * B * nh * S * S * hd
    per_layer_router = 2 * T * H * s.experts
    per_layer_experts = 6 * T * s.top_k * H * s.expert_width
    fwd = {
        "text_attention_proj": s.layers * per_layer_proj,
        "text_attention_core": s.layers * per_layer_core,
        "router": s.layers * per_layer_router,
        "experts": s.layers * per_layer_experts,
        "lm_head": 2 * T * H * s.vocab,
        "vision": 0,
        "projector": 0,
    }
    if s.vision is not None:
        v = s.vision
        n, hv, iv = s.tiles, int(v["hidden_size"]), int(v["intermediate_size"])
        p = int(v["patch_size"])
        P = s.patches_per_tile + 1
        fwd["vision"] = 2 * n * (P - 1) * 3 * p * p * hv + int(v["num_hidden_layers"]) * (
            2 * n * P * (4 * hv * hv + 2 * hv * iv) + 4 * n * P * P * hv
        )
        t = s.tokens_per_tile
        shuffled = round(hv / s.downsample_ratio**2)
        fwd["projector"] = 2 * n * t * (shuffled * H + H * H)
    out = {k: 3 * s.micro_batches * val for k, val in fwd.items()}
    out["total"] = sum(out.values())
    return out


def gemm_shapes(s: Shape) -> list[tuple[str, int, int, int]]:
    """The step's main GEMMs as (name, m, k, n) for [m, k] x [k, n], forward and backward."""
    T, H, V = s.micro_batch_size * s.seq_length, s.hidden, s.vocab
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    # Routed tokens per expert when the router balances the load.
    per_expert = max(1, T * s.top_k // max(1, s.experts))
    I = s.expert_width
    return [
        ("lm_head fwd  X W", T, H, V),
        ("lm_head dX = dY W^T", T, V, H),
        ("lm_head dW = X^T dY", H, T, V),
        ("attn qkv fwd", T, H, qkv),
        ("attn o fwd", T, s.heads * s.head_dim, H),
        ("expert gate_up fwd (1 expert)", per_expert, H, 2 * I),
        ("expert down fwd (1 expert)", per_expert, I, H),
        ("expert dW gate_up (1 expert)", H, per_expert, 2 * I),
    ]
