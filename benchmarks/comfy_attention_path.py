"""What the node adds to ComfyUI's own attention call, on the host: ComfyUI's
`attention_pytorch` as ComfyUI calls it, without the node and with the node's override in
`transformer_options`, the SDPA call stubbed out in both (it returns its query), so only
the Python around the kernel is timed.

`benchmarks/overhead.py` compares the override with the bare kernel and its views; in a
real sampler the override replaces ComfyUI's `attention_pytorch`, whose own Python (the
wrapper, the precision lookup, the views and reshapes) no longer runs. This script
measures that trade on the CPU with a real ComfyUI tree. Minimum over repeats of many
calls; the two paths alternate.

Usage: COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_attention_path.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import timeit

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
CALLS, REPEATS, ROUNDS = 20_000, 5, 4


def _comfyui_version(comfy_path: str) -> str:
    path = os.path.join(comfy_path, "comfyui_version.py")
    if not os.path.exists(path):
        return "unknown"
    with open(path, encoding="utf-8") as handle:
        return handle.read().split('"')[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        parser.error("set COMFYUI_PATH to a ComfyUI tree")
    sys.path.insert(0, comfy_path)
    sys.argv = sys.argv[:1]  # ComfyUI parses its own command line on import
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # before any other comfy module reads it
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    from overhead import load_pack

    load_pack()
    from attention_backends_pack.attention import Dispatcher
    from attention_backends_pack.nodes.override import build_override
    from attention_backends_pack.nodes.state import PatchState

    def stub(q, k, v, *args, **kwargs):
        return q

    torch.nn.functional.scaled_dot_product_attention = stub
    if hasattr(comfy.ops, "scaled_dot_product_attention"):
        comfy.ops.scaled_dot_product_attention = stub
    # SDXL's call form, (B, N, H·D) with 10 heads, at 16 tokens: the output's reshape
    # copies in both paths, and a small tensor keeps that copy out of the comparison.
    heads, q = 10, torch.randn(2, 16, 640)
    k, v = torch.randn(2, 16, 640), torch.randn(2, 16, 640)
    state = PatchState(node_id="bench", node_type="AttentionBackend", selection="sdpa", strict=False,
                       main=Dispatcher("sdpa"))
    patched = {"block_index": 0, "optimized_attention_override": build_override(state)}
    plain = {"block_index": 0}
    comfy_attention = attention.attention_pytorch
    assert comfy_attention(q, k, v, heads, transformer_options=patched).shape == q.shape
    assert state.main.plans()[-1].name == "sdpa"
    paths = {"ComfyUI's attention_pytorch": lambda: comfy_attention(q, k, v, heads, transformer_options=plain),
             "through the node's override": lambda: comfy_attention(q, k, v, heads, transformer_options=patched)}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in paths.items():
            best[name] = min(best[name], min(timeit.repeat(fn, number=CALLS, repeat=REPEATS)) / CALLS * 1e6)
    for name, us in best.items():
        logging.info("%-30s %.2f µs per call", name, us)
    added = best["through the node's override"] - best["ComfyUI's attention_pytorch"]
    logging.info("the node adds %.2f µs per call on this host (torch %s)", added, torch.__version__)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        version = _comfyui_version(comfy_path)
        with open(os.path.join(args.out, "comfy_attention_path.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"comfyui": version, "torch": torch.__version__, "us_per_call": best,
                                     "added_us": added}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
