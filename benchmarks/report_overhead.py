"""What the run report costs per sampler run on SDXL's UNet structure (CPU, real ComfyUI).

The report's coverage (nodes/coverage.py) finds the model's attention layers at the start
and end of every run. On compiled SDXL that was the whole measured difference between a
run with the node and one without it. This times one run's share of it, BypassProbe at
the start and run_coverage at the end, in two ways in interleaved rounds:

- walk: the layers found afresh (the kept ones dropped first), as every run did before;
- kept: the layers kept from the last run and re-checked along their paths.

The model is ComfyUI's SDXL UNet class with SDXL's block structure (2,034 modules, 140
attention layers) at narrow widths, so building it takes seconds; the walk's cost depends
on the module count, not the widths. Times are host milliseconds, medians over the rounds.

Usage: COMFYUI_PATH=/path/to/ComfyUI python benchmarks/report_overhead.py --out DIR
Writes DIR/report_overhead.json and DIR/report_overhead.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import end_to_end  # noqa: E402


def one_run(coverage, unet: torch.nn.Module, drop_kept: bool) -> float:
    """Host ms of one run's coverage work: the probe before the run, the coverage after."""
    if drop_kept:
        coverage._found.pop(unet, None)
    started = time.perf_counter()
    probe = coverage.BypassProbe(unet, lambda: 0)
    probe.remove()
    coverage.run_coverage(probe, unet)
    return (time.perf_counter() - started) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI tree")
    end_to_end.setup_comfyui(Path(comfyui).resolve(), cpu=True)
    pack = end_to_end.load_pack()
    coverage = sys.modules[f"{pack.__name__}.nodes.coverage"]
    spec = end_to_end.sdxl_spec(False)
    config = dict(spec.config, model_channels=64, context_dim=64)
    spec = dataclasses.replace(spec, config=config, latent=(4, 16, 16), context=(8, 64))
    patcher, _ = end_to_end.build_model(spec, "fp32", 0, True)  # tiny=True: no detection of narrow widths
    unet = patcher.model.diffusion_model
    times: dict[str, list[float]] = {"walk": [], "kept": []}
    one_run(coverage, unet, drop_kept=True)  # imports, the per-class bytecode reading
    for _ in range(args.rounds):
        times["walk"].append(one_run(coverage, unet, drop_kept=True))
        times["kept"].append(one_run(coverage, unet, drop_kept=False))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"modules": sum(1 for _ in unet.modules()), "attention_layers": len(coverage.attention_layers(unet)),
              "rounds": args.rounds, "median_ms": medians, "times_ms": times,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report_overhead.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    text = (f"# The run report's coverage work per sampler run (SDXL UNet structure, CPU)\n\n"
            f"{result['modules']} modules, {result['attention_layers']} attention layers; "
            f"{result['machine']['platform']}, torch {torch.__version__}; "
            f"medians of {args.rounds} interleaved rounds.\n\n"
            f"| per run | host ms |\n|---|---|\n| layers found afresh (before) | {medians['walk']:.2f} |\n"
            f"| layers kept, re-checked along their paths (now) | {medians['kept']:.2f} |\n")
    (out / "report_overhead.md").write_text(text, encoding="utf-8")
    print(text)  # noqa: T201 - the CLI's table
    return 0


if __name__ == "__main__":
    sys.exit(main())
