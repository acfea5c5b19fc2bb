"""The kernel benchmark: every backend and `auto` on model-shaped calls.

Per shape and backend: median time, TFLOP/s, speed relative to SDPA default, extra
device memory beyond the output, error against an fp32 reference, and — for `auto` —
what it chose and how it compares with the fastest exact and fastest overall backend.
Times are taken on the dispatched call (what a ComfyUI model pays, minus ComfyUI's own
wrapper) and on the bare kernel with pre-made views, so dispatch overhead is visible.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Iterable, Optional

import torch

from .. import registry
from ..call import FLAT
from ..dispatch import Dispatcher
from ..errors import NoBackendError
from ..shapes import ModelShape
from .inputs import as_bhnd, make_qkv, reference
from ..measure import errors, interleaved_median_ms

log = logging.getLogger(__name__)

AUTO_ROW = "auto"
BASELINE = "sdpa"
REFERENCE_ROWS = 2048


@dataclasses.dataclass
class Row:
    shape: str
    backend: str
    status: str  # "ok", "unsupported", "failed"
    reasons: list[str] = dataclasses.field(default_factory=list)
    ms: Optional[float] = None
    direct_ms: Optional[float] = None
    tflops: Optional[float] = None
    speedup: Optional[float] = None  # SDPA default time / this time
    extra_mib: Optional[float] = None
    error: Optional[dict] = None
    chose: Optional[str] = None  # for the auto row
    exact: Optional[bool] = None


def _progress(items: list, label: str):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=label, file=sys.stderr)
    except ImportError:
        def iterate():
            for i, item in enumerate(items, 1):
                sys.stderr.write(f"\r{label}: {i}/{len(items)}")
                yield item
            sys.stderr.write("\n")
        return iterate()


def _call_args(shape: ModelShape) -> dict:
    heads_first = shape.layout != FLAT
    return {"skip_reshape": heads_first, "skip_output_reshape": heads_first}


def _extra_mib(fn, device: torch.device, out_bytes: int) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base - out_bytes) / 2**20


def bench_shape(shape: ModelShape, names: Iterable[str], device: torch.device, dtype: torch.dtype,
                reps: int, budget_s: float) -> list[Row]:
    """Check, warm up and measure every backend on one shape, then time them all
    together in interleaved rounds."""
    q, k, v = make_qkv(shape, device, dtype)
    ref = reference(q, k, v, shape, REFERENCE_ROWS)
    args = _call_args(shape)
    rows: list[Row] = []
    timed: dict[str, tuple] = {}
    for name in names:
        dispatcher = Dispatcher(name, strict=name != AUTO_ROW)
        row = Row(shape.key, name, "ok", exact=None if name == AUTO_ROW else registry.get(name).exact)
        try:
            out = dispatcher(q, k, v, shape.heads, **args)  # plans, compiles, warms up
            plan = dispatcher.plans()[-1]
            row.chose = plan.name if name == AUTO_ROW else None
            row.error = errors(as_bhnd(out, shape)[:, :, :REFERENCE_ROWS], ref)
            out_bytes = out.numel() * out.element_size()
            del out
            dispatched = lambda d=dispatcher: d(q, k, v, shape.heads, **args)  # noqa: E731
            row.extra_mib = _extra_mib(dispatched, device, out_bytes)
            # The plan's own function is the kernel with the views it needs and nothing else.
            direct = lambda p=plan: p.run(q, k, v, None, None)  # noqa: E731
            timed[name] = (dispatched, direct)
        except NoBackendError as error:
            row.status = "unsupported"
            row.reasons = [reason for r in error.rejected for reason in r.reasons]
        except Exception as error:  # a kernel that breaks on a shape is a result, not a crash
            row.status = "failed"
            row.reasons = [f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    fns = {name: pair[0] for name, pair in timed.items()}
    fns.update({f"{name} direct": pair[1] for name, pair in timed.items()})
    medians = interleaved_median_ms(fns, device, reps=reps, budget_s=budget_s)
    baseline = medians.get(BASELINE)
    for row in rows:
        if row.backend in timed:
            row.ms, row.direct_ms = medians[row.backend], medians[f"{row.backend} direct"]
            row.tflops = shape.flops / (row.ms * 1e-3) / 1e12
            row.speedup = baseline / row.ms if baseline else None
    return rows


def auto_verdicts(rows: list[Row]) -> dict:
    """Per shape: auto's choice and its time against the fastest exact and overall backend."""
    verdicts = {}
    for shape in sorted({r.shape for r in rows}):
        timed = [r for r in rows if r.shape == shape and r.ms and r.backend != AUTO_ROW]
        auto = next((r for r in rows if r.shape == shape and r.backend == AUTO_ROW and r.ms), None)
        if not timed or auto is None:
            continue
        fastest = min(timed, key=lambda r: r.ms)
        exact = [r for r in timed if r.exact]
        fastest_exact = min(exact, key=lambda r: r.ms) if exact else None
        verdicts[shape] = {
            "auto_chose": auto.chose,
            "auto_ms": auto.ms,
            "fastest": fastest.backend,
            "auto_vs_fastest": fastest.ms / auto.ms,
            "fastest_exact": fastest_exact.backend if fastest_exact else None,
            "auto_vs_fastest_exact": fastest_exact.ms / auto.ms if fastest_exact else None,
            "auto_vs_sdpa": auto.speedup,
        }
    return verdicts


def run(shapes: list[ModelShape], device: torch.device, dtype: torch.dtype, *,
        backends: Optional[list[str]] = None, reps: int = 20, budget_s: float = 10.0) -> list[Row]:
    """Benchmark `backends` (default: every backend available here) and auto on `shapes`."""
    if backends is None:
        backends = [b.name for b, a in registry.availability_table() if a.available]
    names = [BASELINE] + [b for b in backends if b != BASELINE] + [AUTO_ROW]
    rows: list[Row] = []
    for shape in _progress(shapes, "attention bench"):
        rows.extend(bench_shape(shape, names, device, dtype, reps, budget_s))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
