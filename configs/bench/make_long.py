#!/usr/bin/env python3
"""Writes configs/bench/long.jsonl: demo samples long enough to fill a 1,024-token row.

The demo's samples are 30 to 100 tokens and a benchmark row has 5 tile slots, so packing fills
only about 200 of 1,024 tokens (the tiles run out first). Each sample here is one single-image
demo sample followed by question/answer turns borrowed, in order, from the demo's other
image-free turns, until it reaches about TARGET tokens (Qwen3 tokenizer, with the internvl2_5
template's per-turn tokens and the default system prompt). configs/bench/data_long.json reads it.

Needs the `tokenizers` package (any venv with transformers has it):
    python configs/bench/make_long.py
The output is byte-identical on reruns.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo" / "demo.jsonl"
TOKENIZER = HERE.parent / "tokenizer" / "qwen3-internvl35" / "tokenizer.json"
OUT = HERE / "long.jsonl"
SAMPLES = 16
# Row of 1,024 minus the image (at most 3 tiles x 4 tokens + <img></img>) and the system turn.
TARGET = 1024 - 14 - 60
TURN_OVERHEAD = 5  # <|im_start|> role \n ... <|im_end|> \n


def main() -> None:
    tok = Tokenizer.from_file(str(TOKENIZER))
    rows = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()]

    def n_tokens(turn: dict) -> int:
        return len(tok.encode(turn["value"], add_special_tokens=False).ids) + TURN_OVERHEAD

    # Image-free (human, gpt) pairs of every sample, in file order.
    pairs = []
    for r in rows:
        conv = r["conversations"]
        for h, g in zip(conv[0::2], conv[1::2]):
            if h["from"] == "human" and g["from"] == "gpt" and "<image>" not in h["value"] and "<video>" not in h["value"]:
                pairs.append((h, g))
    single = [r for r in rows if isinstance(r.get("image"), str)]
    out, k = [], 0
    for i, r in enumerate(single[:SAMPLES]):
        conv = list(r["conversations"])
        total = sum(n_tokens(t) for t in conv)
        while True:
            h, g = pairs[k % len(pairs)]
            cost = n_tokens(h) + n_tokens(g)
            if total + cost > TARGET:
                break
            conv += [h, g]
            total += cost
            k += 1
        out.append({"id": f"long_{i:02d}", "image": r["image"], "conversations": conv})
    OUT.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    print(f"wrote {OUT.name}: {len(out)} samples")


if __name__ == "__main__":
    main()
