"""What a compiled graph pays for an attention call through the pack's op, against the
same call traced as PyTorch's SDPA (issue 11: a contested call goes through the op until
this machine has measured it; nodes/compiled.py traces plain SDPA plans).

Per shape, two functions compiled with torch.compile, each a chain of CALLS attention
calls in ComfyUI's call form (each call's output is the next call's queries):
- `traced SDPA`: attention.compiled.traced_sdpa, what the ComfyUI side traces for a call
  whose plan is SDPA;
- `through the op`: a standalone `Dispatcher("sdpa")`, which under compile records each
  call as the op `attention_backends::attention`; when the graph runs the op comes back
  to the dispatcher (plan lookup, the same SDPA, counters). In ComfyUI the op's target
  first finds the active node: a little more Python than here.
Both run the same SDPA kernel, so the difference is the op's path. Timed back to back
in interleaved, shuffled rounds (attention.measure; each measurement ~10 ms, so a host
path slower than the GPU shows), `traced SDPA` twice for the noise floor. Back to back
is the worst case: in a model, the GPU work between attention calls can hide host time.

Usage: python benchmarks/compiled_op_cost.py --out DIR            (GPU)
       python benchmarks/compiled_op_cost.py --out DIR --smoke    (CPU, tiny, dynamo's eager backend)
Writes DIR/compiled_op_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attention import Dispatcher  # noqa: E402
from attention.bench.inputs import call_form, make_qkv  # noqa: E402
from attention.bench.report import environment  # noqa: E402
from attention.compiled import traced_sdpa  # noqa: E402
from attention.measure import interleaved_median_ms  # noqa: E402
from attention.shapes import ModelShape, by_key  # noqa: E402

CALLS = 10  # SDXL's level-1 self-attention calls per step
TRACED, OP, AGAIN = "traced SDPA", "through the op", "traced SDPA (again)"
SHAPES = "sdxl_l1,sdxl_l2,sdxl_cross,flux_1024"
SMOKE_SHAPE = ModelShape("smoke", "tiny self-attention", batch=1, heads=2, seq_q=64, seq_k=64, head_dim=16)


def chain(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """CALLS attention calls, each on the previous call's output as queries."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for _ in range(CALLS):
            q = attend(q, k, v)
        return q
    return run


def compiled_pair(shape: ModelShape, backend: str, dispatcher: Dispatcher) -> dict[str, Callable]:
    """The two chains for `shape`, compiled (each its own dynamo cache entry); the op's
    calls come back to `dispatcher`."""
    form = call_form(shape)

    def through_op(q, k, v):
        return dispatcher(q, k, v, shape.heads, **form)

    def traced(q, k, v):
        return traced_sdpa(q, k, v, shape.heads, scale=None, **form)

    return {TRACED: torch.compile(chain(traced), backend=backend, fullgraph=True),
            OP: torch.compile(chain(through_op), backend=backend, fullgraph=True)}


def measure(shape: ModelShape, device: torch.device, dtype: torch.dtype, backend: str, reps: int,
            budget_s: float) -> dict:
    q, k, v = make_qkv(shape, device, dtype)
    dispatcher = Dispatcher("sdpa")
    compiled = compiled_pair(shape, backend, dispatcher)
    outputs = {name: fn(q, k, v) for name, fn in compiled.items()}  # compiles; the same kernel both ways
    torch.testing.assert_close(outputs[OP], outputs[TRACED])
    # Only the op reaches the dispatcher: every call of the op chain, none of the traced one.
    if dispatcher.counters().served != {"sdpa": CALLS}:
        raise RuntimeError(f"the op chain's calls did not all come back through the op: {dispatcher.counters()}")
    fns = {name: (lambda fn=fn: fn(q, k, v)) for name, fn in compiled.items()}
    fns[AGAIN] = fns[TRACED]
    ms = interleaved_median_ms(fns, device, warmup=3, reps=reps, budget_s=budget_s)
    per_call_us = {name: value * 1e3 / CALLS for name, value in ms.items()}
    return {"shape": shape.key, "label": shape.label, "calls_per_chain": CALLS, "per_call_us": per_call_us,
            "op_over_traced": per_call_us[OP] / per_call_us[TRACED],
            "op_extra_us": per_call_us[OP] - per_call_us[TRACED],
            "noise_floor": abs(1.0 - per_call_us[AGAIN] / per_call_us[TRACED])}


def markdown(rows: list[dict], facts: dict) -> str:
    lines = ["# Compiled calls: through the pack's op against traced SDPA", "",
             f"{facts['environment'].get('gpu') or 'CPU'}, dynamo backend `{facts['backend']}`, {facts['dtype']}; "
             f"per call in a chain of {CALLS} back-to-back calls, median of interleaved rounds; noise floor: "
             "traced SDPA timed twice in the same rounds.", "",
             "| shape | traced SDPA µs | through the op µs | op / traced | extra µs a call | noise floor |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        us = r["per_call_us"]
        inside = " ~" if abs(1.0 - r["op_over_traced"]) <= r["noise_floor"] else ""
        lines.append(f"| {r['label']} | {us[TRACED]:.1f} | {us[OP]:.1f} | {r['op_over_traced']:.3f}{inside} | "
                     f"{r['op_extra_us']:.1f} | {r['noise_floor']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--budget-s", type=float, default=20.0, help="per shape")
    parser.add_argument("--smoke", action="store_true", help="CPU proof run: a tiny shape, dynamo's eager backend")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        device, dtype, backend, shapes, reps = torch.device("cpu"), torch.float32, "eager", [SMOKE_SHAPE], 3
    elif not torch.cuda.is_available():
        parser.error("no GPU here: run with --smoke for the CPU proof run")
    else:
        device, dtype, backend, reps = torch.device("cuda"), torch.float16, "inductor", args.reps
        shapes = [by_key(key) for key in args.shapes.split(",")]
    rows = [measure(shape, device, dtype, backend, reps, 1.0 if args.smoke else args.budget_s) for shape in shapes]
    facts = {"environment": environment(), "backend": backend, "dtype": str(dtype).replace("torch.", ""),
             "smoke": args.smoke}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compiled_op_cost.json"), "w", encoding="utf-8") as handle:
        json.dump({**facts, "rows": rows}, handle, indent=1)
    text = markdown(rows, facts)
    with open(os.path.join(args.out, "compiled_op_cost.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)  # noqa: T201  (command-line output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
