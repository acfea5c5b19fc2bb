"""benchmarks/end_to_end.py on the CPU with tiny configurations: the same code path as the
H200 run (ComfyUI's model classes, the node's patch, the instrumented attention time)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys


def test_end_to_end_benchmark_runs_tiny(comfyui_path, pack_root, tmp_path):
    result = subprocess.run(
        [sys.executable, str(pack_root / "benchmarks" / "end_to_end.py"), "--tiny", "--models", "flux,sdxl",
         "--backends", "sdpa,auto_tuned", "--sparse", "sol", "--repeats", "2", "--steps", "2", "--out", str(tmp_path)],
        env={**os.environ, "COMFYUI_PATH": str(comfyui_path)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "end_to_end.json").read_text())
    for model in ("flux", "sdxl"):
        variants = {v["name"]: v for v in data["models"][model]["variants"]}
        assert {"default", "sdpa", "auto", "auto_tuned"} <= set(variants), variants.keys()
        assert variants["default"]["speedup"] == 1.0
        # The default timed again in the same rounds: the eager noise floor, no attention
        # timing of its own (the default's is measured).
        again = variants.pop("default (timed again)")
        assert again["finite"] and again["step_ms"] > 0 and math.isfinite(again["speedup"])
        assert "attention_ms_per_step" not in again and "served" not in again
        for variant in variants.values():
            assert variant["finite"] and variant["step_ms"] > 0
            # Bounds that hold on a loaded machine: the attention time comes from a sample of
            # its own, so next to the timed samples' median it can exceed a step when the
            # machine is busy (share > 1, prediction of any sign). The arithmetic itself is
            # checked with injected times in tests/test_end_to_end_numbers.py.
            assert variant["attention_ms_per_step"] > 0 and math.isfinite(variant["attention_share"])
            assert variant["attention_share"] > 0 and math.isfinite(variant["predicted_speedup"])
            assert variant["attention_by_shape"]
            if variant["name"] != "default":
                assert variant["served"] and variant["plans"]
    assert (tmp_path / "end_to_end.md").read_text().startswith("# End-to-end")
    # sol needs CUDA: listed with its reason, not run.
    assert [row["backend"] for row in data["skipped_backends"]] == ["sol"]
