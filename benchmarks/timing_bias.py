"""Is interleaved timing neutral? Times one SDPA call under several names.

Every name below runs the same kernel on the same tensors, so every ratio should read
1.00. Each shape is timed visiting the names in a fixed order each round (as the
kernel table did until 2026-11-21) and in a seeded shuffled order, both without and
with a prefilled GPU queue (`attention.measure.time_ms`). A second table times
FlashAttention-4 (when installed) against SDPA without and with prefill: its host
launch path (72-75 µs a call) is what the prefill keeps out of the interval.

Usage (GPU): python benchmarks/timing_bias.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention import Dispatcher, registry  # noqa: E402
from attention.bench.inputs import call_form, make_qkv  # noqa: E402
from attention.bench.report import write_result  # noqa: E402
from attention.measure import FIXED, SHUFFLED, interleaved_median_ms  # noqa: E402
from attention.shapes import by_key  # noqa: E402

NAMES = ("first", "second", "third", "fourth")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="sdxl_l2,sdxl_cross,sd15_l1,flux_1024,wan_480p")
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for key in args.shapes.split(","):
        shape = by_key(key)
        q, k, v = make_qkv(shape, device, torch.bfloat16)
        form = call_form(shape)
        # A dispatcher per name, as the kernel table has one per backend row.
        fns = {}
        for name in NAMES:
            dispatcher = Dispatcher("sdpa", strict=True)
            fns[name] = (lambda d=dispatcher: d(q, k, v, shape.heads, **form))
        for order, prefill in ((FIXED, False), (SHUFFLED, False), (SHUFFLED, True)):
            medians = interleaved_median_ms(fns, device, reps=args.reps, budget_s=20.0, order=order,
                                            prefill=prefill)
            ratios = {name: medians[name] / medians[NAMES[0]] for name in NAMES}
            rows.append({"shape": key, "order": order, "prefill": prefill, "ms": medians,
                         "ratio_to_first": ratios})
            print(f"{key:12s} {order:9s} prefill={prefill!s:5s} "  # noqa: T201
                  + "  ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
        if registry.get("flash4").availability().available and shape.head_dim in (64, 128):
            pair = {"sdpa": fns[NAMES[0]]}
            flash4 = Dispatcher("flash4", strict=True)
            pair["flash4"] = (lambda d=flash4: d(q, k, v, shape.heads, **form))
            for prefill in (False, True):
                medians = interleaved_median_ms(pair, device, reps=args.reps, budget_s=20.0, prefill=prefill)
                rows.append({"shape": key, "order": SHUFFLED, "prefill": prefill, "ms": medians,
                             "flash4_speedup": medians["sdpa"] / medians["flash4"]})
                print(f"{key:12s} flash4 vs sdpa prefill={prefill!s:5s} "  # noqa: T201
                      f"{medians['sdpa'] / medians['flash4']:.3f}")
    write_result(args.out, "timing_bias.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
