"""Tests of the GEMM benchmark's shapes and report (stdlib only, no PyTorch, no cargo):

    python3 -m unittest discover -s bench -p 'test_*.py'
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gemm  # noqa: E402


class GemmBenchTest(unittest.TestCase):
    def test_expert_config_shapes(self):
        dense, grouped = gemm.shapes("configs/bench/internvl35-experts.toml")
        # 2,048 tokens x top-4 over 32 experts: 256 rows each; gate_up is [1024, 2 x 768].
        self.assertEqual(grouped, [("experts: experts gate_up", 32, 256, 1024, 1536),
                                   ("experts: experts down", 32, 256, 768, 1024)])
        self.assertIn(("experts: attn o fwd", 2048, 1024, 1024), dense)
        self.assertTrue(all(name.startswith("experts: ") for name, *_ in dense))

    def test_best_keeps_the_fastest_and_report_gives_ratios(self):
        recs = [{"gemm": "a", "gflops": 10.0}, {"gemm": "a", "gflops": 30.0}, {"fma_peak_gflops": 1.0}]
        mmc = gemm.best(recs)
        self.assertEqual(mmc["a"]["gflops"], 30.0)
        text = gemm.report([("a", "1 x 2 x 3"), ("b", "4 x 5 x 6")], mmc, {"a": {"gflops": 20.0}}, 60.0,
                           "avx512", 2)
        row_a = next(line for line in text.splitlines() if line.startswith("| a "))
        self.assertIn("1.50x", row_a)
        self.assertIn("50%", row_a)  # mmc's 30 of the 60 GFLOP/s peak
        row_b = next(line for line in text.splitlines() if line.startswith("| b "))
        self.assertIn("-", row_b)


if __name__ == "__main__":
    unittest.main()
