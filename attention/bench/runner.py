"""The kernel benchmark: every backend and `auto` on model-shaped calls.

Per shape and backend: median time, TFLOP/s, speed relative to SDPA default, extra
device memory beyond the output, error against an fp32 reference, and — for `auto`
and `auto_tuned` — what they chose and how that compares with the fastest exact,
the fastest eligible and the fastest overall backend. `auto_tuned` is measured cold
(its tuning time on the shape is recorded) and then timed warm like every row.
Times are taken on the dispatched call (what a ComfyUI model pays, minus ComfyUI's own
wrapper) and on the bare kernel with pre-made views, so dispatch overhead is visible.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Iterable, Optional

import torch

from .. import registry
from ..dispatch import Dispatcher
from ..errors import NoBackendError, describe_exception
from ..shapes import ModelShape
from ..tuning import DEFAULT_BUDGET, Tuner
from .inputs import as_bhnd, call_form, make_qkv, reference
from ..measure import errors, interleaved_median_ms
from ..progress import progress

log = logging.getLogger(__name__)

AUTO_ROW = "auto"
TUNED_ROW = registry.AUTO_TUNED
AUTO_ROWS = (AUTO_ROW, TUNED_ROW)
BASELINE = "sdpa"
# SDPA timed a second time in the same rounds: the noise floor of the shape's ratios.
REPEAT = "sdpa (repeat)"
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
    chose: Optional[str] = None  # for the auto rows
    exact: Optional[bool] = None
    tuning_ms: Optional[float] = None  # auto_tuned: what measuring this shape cost, cold
    # |1 - ratio| of SDPA's two timings in the same rounds (same for every row of a shape):
    # ratios closer to 1 than this are noise.
    noise_floor: Optional[float] = None


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
                reps: int, budget_s: float, tuner: Optional[Tuner] = None) -> list[Row]:
    """Check, warm up and measure every backend on one shape, then time them all
    together in interleaved rounds."""
    q, k, v = make_qkv(shape, device, dtype)
    ref = reference(q, k, v, shape, REFERENCE_ROWS)
    args = call_form(shape)
    rows: list[Row] = []
    timed: dict[str, tuple] = {}
    for name in names:
        dispatcher = Dispatcher(name, strict=name not in AUTO_ROWS, tuner=tuner if name == TUNED_ROW else None)
        row = Row(shape.key, name, "ok", exact=None if name in AUTO_ROWS else registry.get(name).exact)
        try:
            out = dispatcher(q, k, v, shape.heads, **args)  # plans (auto_tuned: measures), compiles, warms up
            plan = dispatcher.plans()[-1]
            row.chose = plan.name if name in AUTO_ROWS else None
            row.tuning_ms = plan.tuning.tuning_ms if plan.tuning is not None else None
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
            row.reasons = [describe_exception(error)]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    fns = {name: pair[0] for name, pair in timed.items()}
    fns.update({f"{name} direct": pair[1] for name, pair in timed.items()})
    if BASELINE in timed:
        repeat = Dispatcher(BASELINE, strict=True)
        fns[REPEAT] = lambda: repeat(q, k, v, shape.heads, **args)  # noqa: E731
    medians = interleaved_median_ms(fns, device, reps=reps, budget_s=budget_s)
    baseline = medians.get(BASELINE)
    noise = abs(1.0 - medians[REPEAT] / baseline) if baseline and REPEAT in medians else None
    for row in rows:
        row.noise_floor = noise
        if row.backend in timed:
            row.ms, row.direct_ms = medians[row.backend], medians[f"{row.backend} direct"]
            row.tflops = shape.flops / (row.ms * 1e-3) / 1e12
            row.speedup = baseline / row.ms if baseline else None
    return rows


def _eligible(row: Row) -> bool:
    """What auto_tuned may choose: a tunable backend whose error is inside the default budget."""
    return (registry.get(row.backend).tunable and row.error is not None
            and DEFAULT_BUDGET.problem(row.error) is None)


def auto_verdicts(rows: list[Row]) -> dict:
    """Per shape: what auto and auto_tuned chose, and their time against the fastest
    exact, fastest eligible (for auto_tuned) and fastest overall backend."""
    verdicts = {}
    for shape in sorted({r.shape for r in rows}):
        timed = [r for r in rows if r.shape == shape and r.ms and r.backend not in AUTO_ROWS]
        if not timed:
            continue
        fastest = min(timed, key=lambda r: r.ms)
        exact = [r for r in timed if r.exact]
        fastest_exact = min(exact, key=lambda r: r.ms) if exact else None
        eligible = [r for r in timed if _eligible(r)]
        fastest_eligible = min(eligible, key=lambda r: r.ms) if eligible else None
        verdict = {"fastest": fastest.backend,
                   "fastest_exact": fastest_exact.backend if fastest_exact else None,
                   "fastest_eligible": fastest_eligible.backend if fastest_eligible else None}
        for row_name in AUTO_ROWS:
            auto = next((r for r in rows if r.shape == shape and r.backend == row_name and r.ms), None)
            if auto is None:
                continue
            # The chosen backend's own row, timed in the same rounds: whether the choice
            # was right, apart from the noise between two timings of one kernel.
            chosen_row = next((r for r in timed if r.backend == auto.chose), None)
            verdict[row_name] = {
                "chose": auto.chose, "ms": auto.ms, "vs_fastest": fastest.ms / auto.ms,
                "choice_vs_fastest": fastest.ms / chosen_row.ms if chosen_row else None,
                "vs_fastest_exact": fastest_exact.ms / auto.ms if fastest_exact else None,
                "vs_fastest_eligible": fastest_eligible.ms / auto.ms if fastest_eligible else None,
                "vs_sdpa": auto.speedup, "tuning_ms": auto.tuning_ms,
                "error_within_budget": auto.error is not None and DEFAULT_BUDGET.problem(auto.error) is None}
        verdicts[shape] = verdict
    return verdicts


def run(shapes: list[ModelShape], device: torch.device, dtype: torch.dtype, *,
        backends: Optional[list[str]] = None, reps: int = 20, budget_s: float = 10.0,
        tuning_file: Optional[str] = None) -> list[Row]:
    """Benchmark `backends` (default: every dense backend available here; the sparse ones
    have their own benchmark, benchmarks/sparse.py), auto and auto_tuned
    on `shapes`. auto_tuned measures every shape afresh and saves to `tuning_file`
    (default: a temporary file), which then holds the tuned table with its evidence."""
    if backends is None:
        backends = [b.name for b, a in registry.availability_table() if a.available and not b.sparse]
    names = [BASELINE] + [b for b in backends if b != BASELINE] + list(AUTO_ROWS)
    if tuning_file is None:
        tuning_file = os.path.join(tempfile.mkdtemp(prefix="attention-bench-"), "tuning.json")
    tuner = Tuner(tuning_file, retune=True)
    rows: list[Row] = []
    for shape in progress(shapes, "attention bench"):
        rows.extend(bench_shape(shape, names, device, dtype, reps, budget_s, tuner))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tuner.flush()  # the tuned table, written once the timing is over
    return rows
