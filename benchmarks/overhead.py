"""Dispatch overhead: the node's installed override, called the way ComfyUI's
`wrap_attn` calls it, against a direct call of the kernel it chose on the same tensors
(with the views the kernel needs and nothing else, as ComfyUI's attention_pytorch).

Two timings per shape, both medians of CUDA-event intervals after warm-up, the two
paths interleaved in shuffled rounds (attention.measure):
- per call: one call between two events, the way `triton.testing.do_bench` times;
- back to back: 50 calls between two events, divided by 50. Python work per call that
  is not hidden behind the GPU shows up here.
The direct call is timed a second time in the same rounds: the noise floor of each ratio
(`noise`, `noise_loop`: |1 - direct again / direct|).

Targets (issue 11): override / direct <= 1.02 at N >= 4096 and <= 1.10 at SDXL's
1024-token calls, back to back (what a sampler's stream of calls pays).

Usage (GPU): python benchmarks/overhead.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACK = "attention_backends_pack"


def load_pack(root: str = ROOT, name: str = PACK):
    """Import the checkout at `root` as package `name`, the way ComfyUI imports a custom
    node pack (relative imports inside)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="sdxl_l2,sdxl_cross,sdxl_l1,flux_1024,qwen_1328,wan_480p")
    args = parser.parse_args()
    load_pack()
    from attention_backends_pack.attention import Dispatcher
    from attention_backends_pack.attention.bench.inputs import call_form, make_qkv
    from attention_backends_pack.attention.bench.report import write_result
    from attention_backends_pack.attention.measure import interleaved_median_ms
    from attention_backends_pack.attention.shapes import by_key
    from attention_backends_pack.nodes.override import build_override
    from attention_backends_pack.nodes.state import PatchState

    device = torch.device("cuda")
    rows = []
    for key in args.shapes.split(","):
        shape = by_key(key)
        q, k, v = make_qkv(shape, device, torch.bfloat16)
        state = PatchState(node_id="bench", node_type="AttentionBackend", selection="auto", strict=False,
                           main=Dispatcher("auto"))
        override = build_override(state)
        options = {"transformer_options": {"block_index": 0}, "_inside_attn_wrapper": True, **call_form(shape)}

        def comfy_func(*a, **kw):
            raise AssertionError("auto always serves these calls")

        def through_override():
            return override(comfy_func, q, k, v, shape.heads, **options)

        through_override()
        chosen = state.main.plans()[-1]

        def direct():
            # the chosen kernel with exactly the views it needs: ComfyUI's own
            # attention_pytorch does the same views around SDPA
            return chosen.run(q, k, v, None, None)

        long_call = shape.flops > 5e12
        repeat, inner = (10, 3) if long_call else (200, 50)
        paths = {"override": through_override, "direct": direct, "direct again": direct}
        per_call = interleaved_median_ms(paths, device, warmup=5, reps=repeat, budget_s=20.0, inner=1,
                                        prefill=False)
        loop = interleaved_median_ms(paths, device, warmup=0, reps=max(5, repeat // 20), budget_s=20.0,
                                     inner=inner, prefill=False)
        row = {"shape": key, "backend": chosen.name,
               "override_ms": per_call["override"], "direct_ms": per_call["direct"],
               "override_loop_ms": loop["override"], "direct_loop_ms": loop["direct"]}
        row["ratio"] = row["override_ms"] / row["direct_ms"]
        row["ratio_loop"] = row["override_loop_ms"] / row["direct_loop_ms"]
        row["noise"] = abs(1.0 - per_call["direct again"] / per_call["direct"])
        row["noise_loop"] = abs(1.0 - loop["direct again"] / loop["direct"])
        rows.append(row)
        print(f"{key:12s} {chosen.name:10s} per-call {row['ratio']:.3f} (noise {row['noise']:.3f})  "
              f"back-to-back {row['ratio_loop']:.3f} (noise {row['noise_loop']:.3f})  "
              f"({row['direct_ms']*1e3:.1f} us direct)")  # noqa: T201
    write_result(args.out, "overhead.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
