"""The Python the node's override adds to one attention call, with the kernel stubbed out.

On the GPU, `benchmarks/overhead.py` times the override against the kernel called
directly; at SDXL's 1024-token calls the difference is a few microseconds of host work on
a call of 33-59 µs, which is what this script isolates on the CPU: the installed override
called as ComfyUI's `wrap_attn` calls it (q, k, v, heads + keywords), with the chosen
plan's function replaced by one that returns q, so only the path around the kernel is
timed. Minimum over repeats of many calls (the CPU's noise is one-sided).

Usage: python benchmarks/override_path.py [--root TREE] [--out DIR] [--device cuda]
(--root: another checkout of the pack, to compare two versions on one machine; --device:
where the tensors live, so the GPU machine's host can be timed on the same path.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import timeit

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS, REPEATS = 20_000, 15


def load_pack(root: str):
    spec = importlib.util.spec_from_file_location("override_path_pack", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["override_path_pack"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.dirname(HERE))
    parser.add_argument("--out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_pack(os.path.abspath(args.root))
    from override_path_pack.attention import Dispatcher
    from override_path_pack.nodes.override import build_override
    from override_path_pack.nodes.state import PatchState

    q, k, v = (torch.randn(1, 4, 16, device=args.device) for _ in range(3))
    state = PatchState(node_id="bench", node_type="AttentionBackend", selection="auto", strict=False,
                       main=Dispatcher("auto"))
    override = build_override(state)
    options = {"transformer_options": {"block_index": 0}, "_inside_attn_wrapper": True}

    def comfy(*a, **kw):
        raise AssertionError("auto serves this call")

    override(comfy, q, k, v, 2, **options)
    state.main.plans()[-1].run = lambda q, k, v, mask, scale: q
    times = timeit.repeat(lambda: override(comfy, q, k, v, 2, **options), number=CALLS, repeat=REPEATS)
    us = min(times) / CALLS * 1e6
    logging.info("override path: %.2f µs per call (min of %d x %d calls), %s, tensors on %s", us, REPEATS, CALLS,
                 args.root, args.device)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "override_path.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"root": os.path.basename(os.path.abspath(args.root)), "us_per_call": us,
                                     "torch": torch.__version__, "device": args.device}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
