"""Sparse attention against SDPA and SageAttention 2 at video self-attention shapes:
time and error per call (issue 14).

Shapes (bf16, head dim 128, ComfyUI's (B, H, N, D) call form):
    wan_480p      Wan 2.1 14B 480p 81 frames   B=2 (CFG)  40 heads  21x30x52 latent tokens = 32760
    wan_720p      Wan 2.1 14B 720p 81 frames   B=1        40 heads  21x45x80 = 75600
    hunyuan_720p  HunyuanVideo 720p 129 frames B=1        24 heads  256 text + 33x45x80 = 119056

Inputs: `attention.bench.inputs.video_qkv`, a smooth random latent field over (frames,
rows, columns) projected per head plus independent noise, so that nearby tokens
correlate (its docstring has the model); HunyuanVideo's 256 text tokens come first and
are plain Gaussian. Random weights, no trained model behind them.

Rows per shape: SDPA (PyTorch's choice), SDPA timed again as a second row (the noise
floor: two timings of one kernel), SageAttention 2 `sage_qk_int8_pv_fp8_cuda_sm90`, `sol`
at several settings, `sparge` at several settings (SPARGE_ROWS) when SpargeAttention is
installed, and the quality monitor's check of one sampled call (exact attention on 256
query rows and one synchronisation: what a sampled call adds). Every kernel row is a
call through the pack's Dispatcher, as the node makes it. `blocks kept`: the fraction of
(query block, key block) pairs SpargeAttention computes on these inputs (its own count,
from a separate call; sol reports none). Time: steady-state cost per call in a stream of
calls, median of interleaved shuffled rounds (attention.measure). Error: against fp32
exact attention on 2048 query rows spread over the sequence (relative L1, cosine, max
abs difference).

What the numbers can say: how fast each kernel is at these shapes, and how far its
output is from exact attention on inputs with this structure. What they cannot say: how
a video looks. A trained model's attention is sharper or flatter than these inputs' in
ways no random field reproduces, errors compound over blocks and steps, and people judge
flicker and structure, not relative L1. The run report's sampled errors on your own
model, and your own eyes, are the evidence there.

Usage:
    python benchmarks/sparse.py --out DIR [--budget 150]   # GPU: within the budget on an H200
    python benchmarks/sparse.py --out DIR --smoke           # tiny shapes, runs on a CPU
Writes DIR/sparse.json (rows with the environment) and DIR/sparse.md (tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from attention import Dispatcher, registry  # noqa: E402
from attention.bench.inputs import (VIDEO_CHANNELS, VIDEO_CORRELATION, VIDEO_KEY_ALIGNMENT, VIDEO_NOISE,  # noqa: E402
                                    video_qkv)
from attention.bench.report import environment  # noqa: E402
from attention.call import describe_call  # noqa: E402
from attention.errors import describe_exception  # noqa: E402
from attention.measure import errors, interleaved_median_ms  # noqa: E402
from attention.quality import QualityPolicy, row_indices, sampled_error  # noqa: E402
from attention.sparsity import SolSettings, SpargeSettings  # noqa: E402

log = logging.getLogger("sparse_bench")

REFERENCE_ROWS = 2048
SAGE2 = "sage_qk_int8_pv_fp8_cuda_sm90"
CHECK_ROW = "quality check (256 rows, one sync)"


@dataclasses.dataclass(frozen=True)
class VideoShape:
    key: str
    label: str
    batch: int
    heads: int
    grid: tuple[int, int, int]
    text_tokens: int = 0
    head_dim: int = 128

    @property
    def tokens(self) -> int:
        frames, rows, columns = self.grid
        return self.text_tokens + frames * rows * columns


SHAPES = (
    VideoShape("wan_480p", "Wan 2.1 14B 480p 81f", 2, 40, (21, 30, 52)),
    VideoShape("wan_720p", "Wan 2.1 14B 720p 81f", 1, 40, (21, 45, 80)),
    VideoShape("hunyuan_720p", "HunyuanVideo 720p 129f", 1, 24, (33, 45, 80), text_tokens=256),
)
SMOKE_SHAPES = (
    VideoShape("wan_smoke", "Wan-like, tiny", 2, 2, (3, 6, 8)),
    VideoShape("hunyuan_smoke", "HunyuanVideo-like, tiny", 1, 2, (3, 6, 8), text_tokens=16),
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str
    backend: str
    settings: Any = None


def candidates(shape: VideoShape) -> list[Candidate]:
    """The rows of one shape: baselines, then sol and sparge settings from exact-ish to sparse."""
    text = {"text_tokens": shape.text_tokens} if shape.text_tokens else {}
    rows = [Candidate("sdpa", "sdpa"), Candidate("sdpa (timed again)", "sdpa"), Candidate("sage2 fp8 sm90", SAGE2)]
    sol = [("sol default (tau 0.5, extra 256)", SolSettings(**text)),
           ("sol tau 0.5, extra 0", SolSettings(extra_tokens=0, **text)),
           ("sol tau 1.0 (kitchen default)", SolSettings(tau=1.0, **text)),
           ("sol tau 1.3 (core node default)", SolSettings(tau=1.3, **text)),
           ("sol top-k 0.5 (sparge's default share)", SolSettings(topk_ratio=0.5, **text)),
           ("sol top-k 0.2", SolSettings(topk_ratio=0.2, **text))]
    if shape.text_tokens:
        sol.append(("sol default, text not kept exact", SolSettings()))
    rows += [Candidate(label, "sol", settings) for label, settings in sol]
    rows += [Candidate(label, "sparge", settings) for label, settings in SPARGE_ROWS]
    return rows


# SpargeAttention (`spas_sage2_attn_meansim_topk_cuda`) from every block kept (its INT8/FP8
# kernel's own cost and error, the floor under every sparse setting) to sparse.
SPARGE_ROWS = (
    ("sparge every block (top-k 1.0)", SpargeSettings(topk=1.0)),
    ("sparge default (top-k 0.5)", SpargeSettings()),
    ("sparge top-k 0.3", SpargeSettings(topk=0.3)),
    ("sparge top-k 0.2", SpargeSettings(topk=0.2)),
    ("sparge top-k 0.1", SpargeSettings(topk=0.1)),
    ("sparge cdf 0.98, simthreshd1 0.6 (its cdf API defaults)", SpargeSettings(cdfthreshd=0.98, simthreshd1=0.6)),
    ("sparge cdf 0.9", SpargeSettings(cdfthreshd=0.9)),
)


def sparge_kept(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, settings: SpargeSettings) -> Optional[float]:
    """The fraction of (query block, key block) pairs SpargeAttention computes for these
    inputs (its `return_sparsity`), or None where it cannot say."""
    try:
        from spas_sage_attn import spas_sage2_attn_meansim_topk_cuda
        _, sparsity = spas_sage2_attn_meansim_topk_cuda(q, k, v, is_causal=False, return_sparsity=True,
                                                        **settings.kernel_arguments(q.shape[2]))
        return 1.0 - float(sparsity)
    except Exception as error:  # an extra column, never a failed row
        log.warning("sparge block count: %s", describe_exception(error))
        return None


def use_kitchen_reference_on_cpu() -> None:
    """--smoke on a CPU: when comfy-kitchen is installed, its eager sol_attn reference (the
    algorithm at full precision, O(T^2) memory; the kernel needs CUDA) stands in for `sol`,
    so the smoke run takes the sparse rows through settings, dispatch and error too."""
    try:
        import comfy_kitchen
    except ImportError:
        return
    if not hasattr(comfy_kitchen, "sol_attn"):
        return
    sol = registry.get("sol")
    registry._BY_NAME["sol"] = dataclasses.replace(
        sol, description="comfy-kitchen's eager sol_attn reference on the CPU (--smoke only)", constraints=(),
        probe=None, package=None, _availability=None, _kernel=None)


def _reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 exact attention for the query rows `rows`, (B, H, len(rows), D)."""
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())


def bench_shape(shape: VideoShape, device: torch.device, dtype: torch.dtype, reps: int,
                budget_s: float) -> list[dict]:
    q, k, v = video_qkv(shape.batch, shape.heads, shape.head_dim, shape.grid, device, dtype,
                        text_tokens=shape.text_tokens)
    form = {"skip_reshape": True, "skip_output_reshape": True}
    rows = row_indices(shape.tokens, REFERENCE_ROWS, device)
    reference = _reference_rows(q, k, v, rows)
    results: list[dict] = []
    timed: dict[str, Callable[[], object]] = {}
    for candidate in candidates(shape):
        row = {"shape": shape.key, "label": candidate.label, "backend": candidate.backend,
               "settings": None if candidate.settings is None else dataclasses.asdict(candidate.settings),
               "status": "ok", "reasons": []}
        results.append(row)
        backend = registry.get(candidate.backend)
        availability = backend.availability()
        call = describe_call(q, k, v, shape.heads, **form)
        reasons = list(availability.reasons) + backend.call_reasons(call)
        if reasons:
            row.update(status="unavailable" if availability.reasons else "unsupported", reasons=reasons)
            continue
        settings = {} if candidate.settings is None else {candidate.backend: candidate.settings}
        dispatcher = Dispatcher([candidate.backend], strict=True, settings=settings)
        try:
            out = dispatcher(q, k, v, shape.heads, **form)  # plans, loads, warms up
            row["error"] = errors(out[:, :, rows], reference)
            del out
            if candidate.backend == "sparge":
                row["kept"] = sparge_kept(q, k, v, candidate.settings)
        except Exception as error:  # a kernel that breaks on a shape is a result, not a crash
            row.update(status="failed", reasons=[describe_exception(error)])
            continue
        timed[candidate.label] = lambda d=dispatcher: d(q, k, v, shape.heads, **form)
    if timed:
        # What the quality monitor adds to a sampled call, the kernel's own time aside (q
        # stands in for the kernel's output: same shape, and the values do not change the cost).
        sample_rows = row_indices(shape.tokens, QualityPolicy().rows, device)
        call = describe_call(q, k, v, shape.heads, **form)
        timed[CHECK_ROW] = lambda: sampled_error(call, q, k, v, None, q, sample_rows)
        results.append({"shape": shape.key, "label": CHECK_ROW, "backend": None, "settings": None, "status": "ok",
                        "reasons": []})
    medians = interleaved_median_ms(timed, device, warmup=1, reps=reps, budget_s=budget_s, min_reps=3) if timed else {}
    baseline = medians.get("sdpa")
    for row in results:
        ms = medians.get(row["label"])
        if ms is not None:
            row["ms"] = ms
            if row["label"] != CHECK_ROW:
                row["speedup"] = baseline / ms if baseline else None
    return results


def markdown(results: list[dict], shapes: tuple[VideoShape, ...], wall_s: float, smoke: bool) -> str:
    lines = ["# Sparse attention: time and error per call", "",
             f"{'Smoke run (tiny shapes)' if smoke else 'Video self-attention shapes'}; inputs with video-like "
             f"locality (attention.bench.inputs.video_qkv: {VIDEO_CHANNELS}-channel smooth field, correlation "
             f"cells {VIDEO_CORRELATION}, noise {VIDEO_NOISE}, key alignment {VIDEO_KEY_ALIGNMENT}); error against "
             f"fp32 exact attention on {REFERENCE_ROWS} query rows. Speed: SDPA's time / the row's (above 1 is "
             f"faster). Whole run: {wall_s:.0f} s.", ""]
    for shape in shapes:
        rows = [r for r in results if r["shape"] == shape.key]
        lines += [f"## {shape.label} (B={shape.batch}, H={shape.heads}, N={shape.tokens})", "",
                  "| row | ms | × SDPA | rel. L1 | cosine | max abs | blocks kept |", "|---|---|---|---|---|---|---|"]
        for row in rows:
            if row["status"] != "ok":
                lines.append(f"| {row['label']} | – | – | – | – | – | {row['status']}: "
                             f"{'; '.join(row['reasons'])[:120]} |")
                continue
            error = row.get("error") or {}
            lines.append("| {} | {} | {} | {} | {} | {} | {} |".format(
                row["label"], _fmt(row.get("ms"), 3), _fmt(row.get("speedup"), 2), _fmt(error.get("rel_l1"), 4),
                _fmt(error.get("cosine"), 5), _fmt(error.get("max_abs"), 3), _fmt(row.get("kept"), 3)))
        again = next((r for r in rows if r["label"] == "sdpa (timed again)" and r.get("speedup")), None)
        if again:
            lines += ["", f"Noise floor: SDPA timed twice reads {again['speedup']:.3f}×."]
        sdpa = next((r for r in rows if r["label"] == "sdpa" and r.get("ms")), None)
        check = next((r for r in rows if r["label"] == CHECK_ROW and r.get("ms")), None)
        if sdpa and check:
            lines.append(f"A call the quality monitor samples costs {check['ms']:.3f} ms more "
                         f"({check['ms'] / sdpa['ms']:.1%} of an SDPA call).")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: Optional[float], digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for sparse.json and sparse.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in fp32: the same code on a CPU")
    parser.add_argument("--shapes", default=None, help="comma-separated shape keys (default: all)")
    parser.add_argument("--reps", type=int, default=10, help="interleaved timing rounds per shape at most")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 150; 10 with --smoke); each shape times its rows "
                             "for at most half of its share, the rest is for inputs, warm-up and errors")
    args = parser.parse_args(argv)
    budget = args.budget if args.budget is not None else (10.0 if args.smoke else 150.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.smoke and device.type == "cpu":
        use_kitchen_reference_on_cpu()
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = tuple(s for s in shapes if s.key in wanted)
    results: list[dict] = []
    deadline = started + budget
    for index, shape in enumerate(shapes):
        shape_started = time.perf_counter()
        timing_s = max(1.0, (deadline - shape_started) / (len(shapes) - index) / 2)
        results.extend(bench_shape(shape, device, dtype, args.reps, timing_s))
        log.info("%s: %.1f s", shape.key, time.perf_counter() - shape_started)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    wall_s = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    document = {"environment": environment(), "command": sys.argv, "smoke": args.smoke, "budget_s": budget,
                "wall_s": round(wall_s, 1),
                "dtype": str(dtype).replace("torch.", ""), "reference_rows": REFERENCE_ROWS,
                "shapes": [dataclasses.asdict(shape) | {"tokens": shape.tokens} for shape in shapes],
                "input_model": {"channels": VIDEO_CHANNELS, "correlation_cells": VIDEO_CORRELATION,
                                "noise": VIDEO_NOISE, "key_alignment": VIDEO_KEY_ALIGNMENT,
                                "text": "first, plain Gaussian"},
                "rows": results}
    with open(os.path.join(args.out, "sparse.json"), "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1)
    with open(os.path.join(args.out, "sparse.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(results, shapes, wall_s, args.smoke))
    log.info("wrote %s in %.0f s", args.out, wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
