"""The Python the node's override adds to one attention call, with the kernel stubbed out.

On the GPU, `benchmarks/overhead.py` times the override against the kernel called
directly; at SDXL's 1024-token calls the difference is a few microseconds of host work on
a call of 33-59 µs, which is what this script isolates on the CPU: the installed override
called as ComfyUI's `wrap_attn` calls it (q, k, v, heads + keywords), with the chosen
plan's function replaced by one that returns q, so only the path around the kernel is
timed. Minimum over repeats of many calls (the CPU's noise is one-sided).

Usage: python benchmarks/override_path.py [--root TREE ...] [--out DIR] [--device cuda]
(--root, repeated: checkouts of the pack to compare, timed alternately in one process;
--device: where the tensors live, so a GPU machine's host can be timed on the same path.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import timeit
from typing import Callable

import torch

from overhead import load_pack

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS, REPEATS = 20_000, 25


def installed_path(root: str, name: str, device: str) -> Callable[[], object]:
    """The override of the checkout at `root` (imported as package `name`), called as
    ComfyUI calls it, its chosen plan's kernel replaced by one that returns q."""
    load_pack(root, name)
    dispatcher = importlib.import_module(f"{name}.attention").Dispatcher
    build_override = importlib.import_module(f"{name}.nodes.override").build_override
    patch_state = importlib.import_module(f"{name}.nodes.state").PatchState
    q, k, v = (torch.randn(1, 4, 16, device=device) for _ in range(3))
    state = patch_state(node_id="bench", node_type="AttentionBackend", selection="auto", strict=False,
                        main=dispatcher("auto"))
    override = build_override(state)
    options = {"transformer_options": {"block_index": 0}, "_inside_attn_wrapper": True}

    def comfy(*a, **kw):
        raise AssertionError("auto serves this call")

    override(comfy, q, k, v, 2, **options)
    state.main.plans()[-1].run = lambda q, k, v, mask, scale: q
    return lambda: override(comfy, q, k, v, 2, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", action="append", help="a checkout of the pack (repeat to compare several)")
    parser.add_argument("--out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    roots = [os.path.abspath(r) for r in (args.root or [os.path.dirname(HERE)])]
    paths = {root: installed_path(root, f"override_path_pack{i}", args.device) for i, root in enumerate(roots)}
    best = dict.fromkeys(roots, float("inf"))
    for _ in range(REPEATS):  # the checkouts alternate: a busy moment of the CPU hits all of them
        for root, path in paths.items():
            best[root] = min(best[root], timeit.timeit(path, number=CALLS) / CALLS * 1e6)
    for root, us in best.items():
        logging.info("override path: %.2f µs per call (min of %d x %d calls), %s, tensors on %s", us, REPEATS,
                     CALLS, root, args.device)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "override_path.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"root": os.path.basename(root), "us_per_call": us,
                                         "torch": torch.__version__, "device": args.device}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
