#!/usr/bin/env python3
"""Generate mmc's demo dataset: small shape images, one video, a chat JSONL and a data.json.

Everything is deterministic: the images come from a seeded legacy NumPy RandomState and are drawn
with PIL, the video is encoded by the ffmpeg CLI in bit-exact mode, and every text file is written
with sorted, fixed formatting. Running the script twice gives byte-identical files.

Run from anywhere (it writes next to itself unless --out is given):

    python configs/demo/make_demo.py

Outputs (all paths inside the demo folder are relative to it):

    images/*.png, images/*.jpg   37 images of 1-3 simple shapes (circle, square, triangle, star,
                                 cross) in named colours on plain or gradient backgrounds
    video/moving_square.mp4      112x56, 20 frames at 8 fps, MPEG-4 part 2 (ffmpeg's mpeg4)
    demo.jsonl                   InternVL chat-format samples (captions, Q&A, multi-turn, system
                                 turns, grounding, multi-image, pure text, video)
    data.json                    MindSpeed-MM's InternVL3.5 data.json layout, adapted to the demo
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SEED = 20250101

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 180),
    "orange": (240, 140, 30),
}
# name in captions -> (top colour, bottom colour); plain backgrounds have both equal.
BACKGROUNDS = {
    "white": ((255, 255, 255), (255, 255, 255)),
    "black": ((0, 0, 0), (0, 0, 0)),
    "gray": ((150, 150, 150), (150, 150, 150)),
    "light blue gradient": ((200, 220, 255), (255, 255, 255)),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]
# (width, height); each size is used four times. The demo tiles are 56 pixels.
SIZES = [(56, 56), (84, 84), (112, 56), (56, 112), (168, 56), (120, 90), (90, 120), (200, 50), (140, 100)]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

IMAGE_SIZE = 56  # tile size of the demo model
MAX_DYNAMIC_PATCH = 6
MAX_TILES = MAX_DYNAMIC_PATCH + 1  # + thumbnail

VIDEO_W, VIDEO_H, VIDEO_FRAMES, VIDEO_FPS = 112, 56, 20, 8
VIDEO_SQUARE = 16

SYSTEM_PROMPTS = [
    "You are a helpful assistant that describes simple pictures of shapes.",
    "Answer briefly and precisely.",
]


# --------------------------------------------------------------------------- drawing


def _background(w: int, h: int, name: str) -> Image.Image:
    top, bottom = BACKGROUNDS[name]
    t = np.linspace(0.0, 1.0, h, dtype=np.float64)[:, None, None]
    rows = (1.0 - t) * np.array(top, dtype=np.float64) + t * np.array(bottom, dtype=np.float64)
    arr = np.broadcast_to(np.round(rows).astype(np.uint8), (h, w, 3)).copy()
    return Image.fromarray(arr, "RGB")


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        d.polygon(_star_points((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2), fill=fill)
    elif shape == "cross":
        t = max(2, (x1 - x0 + 1) // 3)
        cx0 = x0 + ((x1 - x0 + 1) - t) // 2
        cy0 = y0 + ((y1 - y0 + 1) - t) // 2
        d.rectangle((cx0, y0, cx0 + t - 1, y1), fill=fill)
        d.rectangle((x0, cy0, x1, cy0 + t - 1), fill=fill)
    else:
        raise ValueError(shape)


def _image_spec(rng: np.random.RandomState, idx: int, w: int, h: int) -> dict:
    horizontal = w >= h
    long_side, short_side = (w, h) if horizontal else (h, w)
    max_shapes = 1 if long_side < 2 * short_side and long_side <= 56 else 3
    if long_side // 3 < 14:
        max_shapes = min(max_shapes, 2)
    n = int(rng.randint(1, max_shapes + 1))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    bg = list(BACKGROUNDS)[int(rng.randint(len(BACKGROUNDS)))]
    colour_names = [c for c in COLOURS if not (bg == "light blue gradient" and c == "blue")]
    colours = [colour_names[i] for i in rng.permutation(len(colour_names))[:n]]
    slot = long_side / n
    items = []
    for k in range(n):
        size = int(min(slot, short_side) * rng.uniform(0.55, 0.8))
        size = max(size, 8)
        lo = int(k * slot)
        hi = int((k + 1) * slot)
        a0 = lo + int(rng.randint(0, max(1, hi - lo - size)))
        b0 = int(rng.randint(0, max(1, short_side - size)))
        x0, y0 = (a0, b0) if horizontal else (b0, a0)
        items.append({"shape": shapes[k], "colour": colours[k], "box": [x0, y0, x0 + size - 1, y0 + size - 1]})
    ext = "jpg" if idx % 4 == 2 else "png"  # one JPEG (quality 92) of each size
    return {"file": f"images/shapes_{idx:02d}_{w}x{h}.{ext}", "size": [w, h], "background": bg,
            "horizontal": horizontal, "items": items}


def _render(spec: dict) -> Image.Image:
    w, h = spec["size"]
    img = _background(w, h, spec["background"])
    d = ImageDraw.Draw(img)
    for it in spec["items"]:
        _draw_shape(d, it["shape"], tuple(it["box"]), COLOURS[it["colour"]])
    return img


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        img.save(path, format="JPEG", quality=92)
    else:
        img.save(path, format="PNG")


# --------------------------------------------------------------------------- tiles (InternVL's rule)


def _grid(w: int, h: int, max_num: int) -> tuple[int, int]:
    """InternVL's dynamic_preprocess grid choice (min_num 1), for the tile budget checks."""
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    aspect = w / h
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and w * h > 0.5 * IMAGE_SIZE * IMAGE_SIZE * r[0] * r[1]:
            best = r
    return best


def _tiles(w: int, h: int, max_num: int) -> int:
    c, r = _grid(w, h, max_num)
    return c * r + (1 if c * r > 1 else 0)


# --------------------------------------------------------------------------- text


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(it: dict) -> str:
    return f"{_a(it['colour'])} {it['colour']} {it['shape']}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(spec: dict) -> str:
    text = _join([_phrase(it) for it in spec["items"]])
    return f"{text[0].upper()}{text[1:]} on {_a(spec['background'])} {spec['background']} background."


def _count_answer(n: int) -> str:
    return "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."


def _qa_pairs(spec: dict) -> list[tuple[str, str]]:
    """Every question this image can answer unambiguously."""
    items = spec["items"]
    out = [("How many shapes are in the image?", _count_answer(len(items))),
           ("What colour is the background?", f"The background is {spec['background']}.")]
    for it in items:
        out.append((f"What colour is the {it['shape']}?", f"The {it['shape']} is {it['colour']}."))
        out.append((f"What shape is {it['colour']}?", f"The {it['colour']} shape is {_a(it['shape'])} {it['shape']}."))
    if len(items) >= 2:
        first, last = items[0], items[-1]
        if spec["horizontal"]:
            out.append(("Which shape is on the left?", f"The {first['colour']} {first['shape']} is on the left."))
            out.append(("Which shape is on the right?", f"The {last['colour']} {last['shape']} is on the right."))
        else:
            out.append(("Which shape is at the top?", f"The {first['colour']} {first['shape']} is at the top."))
            out.append(("Which shape is at the bottom?", f"The {last['colour']} {last['shape']} is at the bottom."))
    return out


CAPTION_PROMPTS = ["Describe the image.", "What is in the image?", "Describe this picture briefly."]


def _human(text: str) -> dict:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def _samples(specs: list[dict], rng: np.random.RandomState) -> list[dict]:
    samples: list[dict] = []
    # One caption per image (36 demo images; the tiny one is kept for the parity fixtures).
    for i, spec in enumerate(specs):
        if spec.get("tiny"):
            continue
        prompt = CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]
        conv = []
        if i % 9 == 4 and i % 7 != 3:  # never a system turn with a missing <image> (InternVL would fail)
            conv.append({"from": "system", "value": SYSTEM_PROMPTS[i % 2]})
        if i % 7 == 3:
            conv.append(_human(prompt))  # no <image>: the loader prepends "<image>\n"
        else:
            conv.append(_human(f"<image>\n{prompt}"))
        conv.append(_gpt(_caption(spec)))
        samples.append({"id": f"caption_{i:02d}", "image": spec["file"], "conversations": conv})

    # Q&A: single-turn and multi-turn questions about some of the images.
    for k, i in enumerate(range(0, 36, 2)):
        spec = specs[i]
        qa = _qa_pairs(spec)
        order = rng.permutation(len(qa))
        conv = []
        if k % 6 == 5 and k % 4 != 3:
            conv.append({"from": "system", "value": SYSTEM_PROMPTS[k % 2]})
        turns = 2 if k % 3 == 1 else 1
        for t in range(turns):
            q, a = qa[int(order[t])]
            conv.append(_human(f"<image>\n{q}" if t == 0 and k % 4 != 3 else q))
            conv.append(_gpt(a))
        if k % 5 == 2:  # a caption as a third exchange
            conv.append(_human("Now describe the whole image."))
            conv.append(_gpt(_caption(spec)))
        samples.append({"id": f"qa_{k:02d}", "image": spec["file"], "conversations": conv})

    # Grounding: the first shape of two horizontal images, boxes normalised to [0, 1000).
    for k, i in enumerate((4, 13)):
        spec = specs[i]
        it = spec["items"][0]
        w, h = spec["size"]
        x0, y0, x1, y1 = it["box"]
        box = [int(x0 / w * 1000), int(y0 / h * 1000), int((x1 + 1) / w * 1000), int((y1 + 1) / h * 1000)]
        ref = f"the {it['colour']} {it['shape']}"
        samples.append({"id": f"grounding_{k}", "image": spec["file"], "conversations": [
            _human(f"<image>\nPlease provide the bounding box coordinate of the region this sentence describes: <ref>{ref}</ref>"),
            _gpt(f"<ref>{ref}</ref><box>[{box}]</box>"),
        ]})

    # Multi-image: two images each, within the 7-tile budget (max(1, 6 // 2) = 3 tiles + thumbnail each).
    pairs = [(0, 2), (4, 9), (1, 18), (11, 20), (5, 3)]
    for k, (a, b) in enumerate(pairs):
        sa, sb = specs[a], specs[b]
        tiles = sum(_tiles(*s["size"], max(1, MAX_DYNAMIC_PATCH // 2)) for s in (sa, sb))
        assert tiles <= MAX_TILES, (a, b, tiles)
        if k % 2 == 0:
            q = "Describe the two images."
            ans = f"Image-1: {_caption(sa)} Image-2: {_caption(sb)}"
        else:
            q = "How many shapes are there in total?"
            ans = f"There are {NUMBER_WORDS[len(sa['items']) + len(sb['items'])]} shapes in total."
        samples.append({"id": f"multi_image_{k}", "image": [sa["file"], sb["file"]], "conversations": [
            _human(f"Image-1: <image>\nImage-2: <image>\n{q}"), _gpt(ans)]})

    # Pure text: arithmetic and spelling.
    text_qa = [
        ("What is 3 + 4?", "3 + 4 = 7."),
        ("What is 9 - 5?", "9 - 5 = 4."),
        ("What is 6 + 2?", "6 + 2 = 8."),
        ("What is 2 * 3?", "2 * 3 = 6."),
        ("What is 8 - 8?", "8 - 8 = 0."),
        ('Spell the word "cat".', "C-A-T."),
        ('Spell the word "dog".', "D-O-G."),
        ('Spell the word "red".', "R-E-D."),
        ('Spell the word "star".', "S-T-A-R."),
    ]
    for k, (q, a) in enumerate(text_qa):
        samples.append({"id": f"text_{k}", "conversations": [_human(q), _gpt(a)]})
    samples.append({"id": "text_multi_turn", "conversations": [
        _human("What is 1 + 1?"), _gpt("1 + 1 = 2."), _human('Spell the word "two".'), _gpt("T-W-O.")]})

    # Video: the one moving-square clip.
    samples.append({"id": "video_0", "video": "video/moving_square.mp4", "conversations": [
        _human("<video>\nWhat moves in the video?"), _gpt("A blue square moving from left to right.")]})
    samples.append({"id": "video_1", "video": "video/moving_square.mp4", "conversations": [
        _human("<video>\nWhat colour is the moving square?"), _gpt("The moving square is blue.")]})
    samples.append({"id": "video_2", "video": "video/moving_square.mp4", "clip": [0.5, 2.0], "conversations": [
        _human("In which direction does the square move?"), _gpt("It moves from left to right.")]})
    return samples


# --------------------------------------------------------------------------- video


def _video_frames() -> np.ndarray:
    frames = np.full((VIDEO_FRAMES, VIDEO_H, VIDEO_W, 3), 255, dtype=np.uint8)
    y0 = (VIDEO_H - VIDEO_SQUARE) // 2
    travel = VIDEO_W - VIDEO_SQUARE
    for t in range(VIDEO_FRAMES):
        x0 = 2 * round(t * travel / 2 / (VIDEO_FRAMES - 1))  # even, so chroma blocks stay whole
        frames[t, y0:y0 + VIDEO_SQUARE, x0:x0 + VIDEO_SQUARE] = COLOURS["blue"]
    return frames


def _write_video(path: Path) -> None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        sys.exit("make_demo.py: the ffmpeg CLI is needed to encode the demo video")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{VIDEO_W}x{VIDEO_H}", "-r", str(VIDEO_FPS), "-i", "-",
           "-an", "-c:v", "mpeg4", "-q:v", "2", "-bf", "0", "-g", "8", "-pix_fmt", "yuv420p", "-color_range", "tv", "-colorspace", "smpte170m",
           "-color_primaries", "smpte170m", "-color_trc", "smpte170m", "-threads", "1",
           "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1", str(path)]
    subprocess.run(cmd, input=_video_frames().tobytes(), check=True)


# --------------------------------------------------------------------------- data.json


def _data_json() -> dict:
    return {
        "dataset_param": {
            "dataset_type": "multimodal",
            "basic_parameters": {"data_path": "demo.jsonl", "data_folder": ".", "repeat_time": 1},
            "preprocess_parameters": {
                "image_reader_type": "torchvision",
                "train_pipeline": {"image": [
                    {"trans_type": "Pad2Square", "param": {"mean": [0.485, 0.456, 0.406]}},
                    {"trans_type": "Resize", "param": {"size": [IMAGE_SIZE, IMAGE_SIZE], "interpolation": "BICUBIC", "antialias": None}},
                    {"trans_type": "ToTensor"},
                    {"trans_type": "norm_fun", "param": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
                ]},
            },
            "tokenizer_config": {
                "hub_backend": "hf",
                "autotokenizer_name": "AutoTokenizer",
                "from_pretrained": "../tokenizer/qwen3-internvl35",
                "add_eos_token": False,
                "use_fast": False,
            },
            "use_text_processer": True,
            "template_name": "internvl2_5",
            "patch_size": 14,
            "image_size": IMAGE_SIZE,
            "down_sample_ratio": 0.5,
            "group_by_length": True,
            "dynamic_image_size": True,
            "use_thumbnail": True,
            "min_dynamic_patch": 1,
            "max_dynamic_patch": MAX_DYNAMIC_PATCH,
            "min_num_frame": 4,
            "max_num_frame": 6,
            "sampling_method": "rand",
        },
        "dataloader_param": {
            "dataloader_mode": "sampler",
            "shuffle": True,
            "seed": 42,
            "drop_last": True,
            "pin_memory": True,
            "sampler_type": "BaseRandomBatchSampler",
            "packing": True,
            "num_workers": 2,
            "collate_param": {"model_name": "internvl", "pad_id": 151643},
        },
    }


def _json_text(obj, indent: int = 0) -> str:
    """JSON laid out like MindSpeed-MM's data.json: objects one key a line, scalar lists and list items inline."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        inner = [f"{pad}    {json.dumps(k)}: {_json_text(v, indent + 4)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(inner) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        inner = [f"{pad}    {json.dumps(x, separators=(', ', ': '))}" for x in obj]
        return "[\n" + ",\n".join(inner) + "\n" + pad + "]"
    return json.dumps(obj, separators=(", ", ": "))


def _write_text(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    args = ap.parse_args(argv)
    out: Path = args.out

    rng = np.random.RandomState(SEED)
    specs = []
    for idx in range(36):
        w, h = SIZES[idx % len(SIZES)]
        specs.append(_image_spec(rng, idx, w, h))
    tiny = _image_spec(rng, 36, 40, 32)
    tiny["tiny"] = True
    specs.append(tiny)

    for sub in ("images", "video"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    for spec in specs:
        _save(_render(spec), out / spec["file"])
    _write_video(out / "video" / "moving_square.mp4")

    samples = _samples(specs, rng)
    lines = [json.dumps(s, ensure_ascii=False, separators=(", ", ": ")) for s in samples]
    _write_text(out / "demo.jsonl", "\n".join(lines) + "\n")
    _write_text(out / "data.json", _json_text(_data_json()) + "\n")

    kinds: dict[str, int] = {}
    for s in samples:
        kind = ("images" if isinstance(s.get("image"), list) else "image") if "image" in s else (
            "video" if "video" in s else "text")
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"make_demo: {len(specs)} images, 1 video, {len(samples)} samples {kinds} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
