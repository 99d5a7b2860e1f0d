"""Tests of the benchmark's shapes and FLOPs count (stdlib only, no PyTorch):

    python3 -m unittest discover -s bench -p 'test_*.py'
"""

from __future__ import annotations

import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import model_shape  # noqa: E402
import run  # noqa: E402

CONFIGS = HERE.parent / "configs" / "bench"


class ShapeTest(unittest.TestCase):
    def test_tiny_geometry(self):
        s = model_shape.load(CONFIGS / "internvl35-tiny-s128.toml")
        self.assertEqual((s.hidden, s.vocab, s.layers, s.experts, s.top_k), (32, 151936, 2, 4, 2))
        self.assertEqual(s.patches_per_tile, 16)
        self.assertEqual(s.tokens_per_tile, 4)
        self.assertEqual((s.tiles, s.tokens_per_step, s.micro_batches), (3, 128, 1))

    def test_tiny_flops_by_hand(self):
        s = model_shape.load(CONFIGS / "internvl35-tiny-s128.toml")
        f = model_shape.step_flops(s)
        T = 128
        # forward x 3 (backward = 2 forwards), 2 FLOPs per multiply-add
        self.assertEqual(f["lm_head"], 3 * 2 * T * 32 * 151936)
        # q: 32 -> 4*8, k and v: 32 -> 2*8, o: 32 -> 32; two layers
        self.assertEqual(f["text_attention_proj"], 3 * 2 * (2 * T * 32 * (32 + 16 + 16) + 2 * T * 32 * 32))
        self.assertEqual(f["text_attention_core"], 3 * 2 * 4 * 4 * T * T * 8)
        self.assertEqual(f["router"], 3 * 2 * 2 * T * 32 * 4)
        # top-2 of experts [32 -> 2*32] and [32 -> 32]
        self.assertEqual(f["experts"], 3 * 2 * T * 2 * (2 * 32 * 64 + 2 * 32 * 32))
        # 3 tiles of 16 patches + CLS; patch embedding 3*14*14 -> 32
        n, P = 3, 17
        vision = 2 * n * 16 * 588 * 32 + 2 * (2 * n * P * (4 * 32 * 32 + 2 * 32 * 64) + 4 * n * P * P * 32)
        self.assertEqual(f["vision"], 3 * vision)
        # pixel shuffle 0.5: 4 x 32 = 128 inputs -> 32 -> 32, 4 tokens per tile
        self.assertEqual(f["projector"], 3 * 2 * n * 4 * (128 * 32 + 32 * 32))
        self.assertEqual(f["total"], sum(v for k, v in f.items() if k != "total"))

    def test_vocab_config_is_head_dominated(self):
        s = model_shape.load(CONFIGS / "internvl35-vocab.toml")
        self.assertEqual((s.vocab, s.hidden, s.seq_length, s.tiles), (151936, 512, 1024, 5))
        f = model_shape.step_flops(s)
        self.assertGreater(f["lm_head"], f["total"] / 2)
        # about 550 GFLOP a step, as issue 11 estimates
        self.assertTrue(450e9 < f["total"] < 650e9, f["total"])

    def test_experts_config_is_expert_dominated(self):
        s = model_shape.load(CONFIGS / "internvl35-experts.toml")
        self.assertEqual((s.hidden, s.layers, s.experts, s.top_k, s.seq_length, s.vocab),
                         (1024, 4, 32, 4, 2048, 8192))
        f = model_shape.step_flops(s)
        self.assertEqual(max((v, k) for k, v in f.items() if k != "total")[1], "experts")
        self.assertLess(s.img_context_token_id, s.vocab)

    def test_gemm_shapes(self):
        s = model_shape.load(CONFIGS / "internvl35-vocab.toml")
        shapes = {name: (m, k, n) for name, m, k, n in model_shape.gemm_shapes(s)}
        self.assertEqual(shapes["lm_head fwd  X W"], (1024, 512, 151936))
        # 1024 tokens x top-2 over 8 experts
        self.assertEqual(shapes["expert gate_up fwd (1 expert)"], (256, 512, 1024))

    def test_hf_config_is_refused(self):
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write('[model]\nhf_config = "config.json"\n')
            f.flush()
            with self.assertRaisesRegex(ValueError, "hf_config"):
                model_shape.load(f.name)

    def test_missing_text_key(self):
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write("[model.text]\nvocab_size = 10\n")
            f.flush()
            with self.assertRaisesRegex(ValueError, "hidden_size is required"):
                model_shape.load(f.name)


class ReportTest(unittest.TestCase):
    def test_ratios_and_fraction_of_peak(self):
        s = model_shape.load(CONFIGS / "internvl35-tiny-s128.toml")
        flops = model_shape.step_flops(s)
        results = {
            "mmc": {"median_ms": 100.0, "peak_rss_bytes": 3e8},
            "eager": {"median_ms": 200.0, "peak_rss_bytes": 1e9},
        }

        class Args:
            config, threads, steps, warmup = "x.toml", 2, 2, 1

        text = run.report(Args, s, flops, results, 100.0, [])
        mmc_col = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines() if line.startswith("|")}
        self.assertEqual(mmc_col["step / eager"], "0.50x")
        self.assertEqual(mmc_col["RSS / eager"], "0.30x")
        self.assertEqual(mmc_col["tokens/s"], "1280")
        achieved = flops["total"] / 0.1 / 1e9
        self.assertEqual(mmc_col["GFLOP/s"], f"{achieved:.1f}")
        self.assertEqual(mmc_col["of measured peak"], f"{achieved / 100:.1%}")


if __name__ == "__main__":
    unittest.main()
