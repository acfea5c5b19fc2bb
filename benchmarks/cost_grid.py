"""Measure the cost model's grid (attention/calibration_calls.py) on this GPU.

Every tunable kernel available here that can serve a call is timed on it, with SDPA a
second time in the same rounds (the noise floor), by attention.calibrate.time_call.
Kernels that cannot serve a call (head dim, mask, dtype) are skipped before any tensor
is made, so the masked calls cost only SDPA's family and comfy-kitchen.

How the time limit is met (240 s for the full grid on an H200): each measurement is ~10
ms of back-to-back calls (the steady state), 2 warm-up calls, and at most 5 interleaved
rounds, at least 3, fewer rounds on calls whose round would take more than 3 s (only the
75600-token call, ~200 ms for SDPA). 150 calls x ~12 kernels x ~8 measurements x ~10 ms is
~150 s; first-call compiles (FA4's CuTe DSL and Triton per head dim and dtype) take most
of the rest. If the budget runs out anyway, the calls at the end of the list (fp16
repeats of bf16 calls) are left out and listed in the JSON.

Usage:
  python benchmarks/cost_grid.py --out DIR [--budget-s 240] [--reduced]   (GPU)
  python benchmarks/cost_grid.py --out DIR --only window_                 (GPU: the calls whose key starts so)
  python benchmarks/cost_grid.py --out DIR --only tiles_                  (GPU: the probe pairs, not for fitting)
  python benchmarks/cost_grid.py --out DIR --smoke                        (CPU, tiny, sdpa only)
Writes DIR/cost_grid.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attention.bench.report import environment  # noqa: E402
from attention.calibrate import device_facts, kernel_names, measure_grid  # noqa: E402
from attention.calibration_calls import TILE_PROBE, grid  # noqa: E402

# --smoke: every 12th call, sequences shrunk 32x, fp32, SDPA only, one second in all.
SMOKE_SHRINK = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for cost_grid.json")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting calls after this many seconds")
    parser.add_argument("--reduced", action="store_true", help="calibrate's reduced grid")
    parser.add_argument("--only", help="comma-separated key prefixes: measure only those grid calls (an addition "
                                           "to a committed grid; fit_cost_model.py takes both files), or the "
                                           "probe calls that are never fitted (tiles_: calibration_calls.TILE_PROBE)")
    parser.add_argument("--kernels", help="comma-separated kernel names (default: every tunable one available)")
    parser.add_argument("--smoke", action="store_true", help="CPU proof run: tiny shapes, sdpa only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    calls = grid(reduced=args.reduced)
    if args.only:
        prefixes = tuple(p.strip() for p in args.only.split(",") if p.strip())
        calls = [c for c in calls + list(TILE_PROBE) if c.key.startswith(prefixes)]
        if not calls:
            parser.error(f"no grid or probe call's key starts with {args.only!r}")
    names = kernel_names(device)
    reps = 5
    if args.smoke:
        calls = [dataclasses.replace(c.shrunk(SMOKE_SHRINK), dtype="fp32") for c in calls[::12]]
        names, reps = ["sdpa"], 3
    elif device.type != "cuda":
        parser.error("no GPU here: run with --smoke for the CPU proof run")
    if args.kernels:
        names = [n.strip() for n in args.kernels.split(",") if n.strip()]
    gpu_class, gpu, sms, capability = device_facts(device)
    started = time.perf_counter()
    timings, left_out = measure_grid(calls, device, names, budget_s=args.budget_s, reps=reps)
    elapsed = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cost_grid.json")
    payload = {"environment": environment(), "gpu_class": gpu_class, "gpu": gpu, "sms": sms,
               "capability": None if capability is None else list(capability), "kernels": names,
               "elapsed_s": round(elapsed, 1), "budget_s": args.budget_s, "smoke": args.smoke,
               "left_out": left_out, "rows": [t.to_json() for t in timings]}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
    noise = [t.noise_floor for t in timings if t.noise_floor is not None]
    logging.info("%d calls in %.0f s (%d left out); noise floor median %.2f%%, max %.2f%%; wrote %s",
                 len(timings), elapsed, len(left_out), 100 * sorted(noise)[len(noise) // 2] if noise else 0,
                 100 * max(noise, default=0), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
