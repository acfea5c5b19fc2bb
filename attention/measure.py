"""Timing and error measurements, shared by the benchmark and the tuner (`auto_tuned`).

Both ask the same questions of a kernel on a call: how long does it take on the GPU
(interleaved with its rivals, so drift falls on all of them), and how far is its
output from a reference."""

from __future__ import annotations

import functools
import random
import statistics
import time
from typing import Callable

import torch

# Orders in which one round of interleaved timing visits the functions.
FIXED = "fixed"
SHUFFLED = "shuffled"


# How long one measurement of a function lasts when its calls per measurement are
# sized automatically (interleaved_median_ms).
MEASUREMENT_MS = 10.0

# How long the GPU is kept busy per call timed when `prefill` is on: longer than any
# kernel's host-side launch path (FlashAttention-4's CuTe DSL call: 72-75 µs a call on
# the H200's short calls, benchmarks/results/h200/kernels.json).
_PREFILL_PER_CALL_MS = 0.2
_PREFILL_MIN_MS = 1.0


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms(device_index: int) -> float:
    """`torch.cuda._sleep` counts clock cycles: calibrate them against CUDA events once."""
    cycles = 1_000_000
    torch.cuda._sleep(cycles)  # the first call may include module loading
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def time_ms(fn: Callable[[], object], device: torch.device, inner: int = 1, prefill: bool = False) -> float:
    """Milliseconds per call of `fn`, called `inner` times back to back: device time
    between two CUDA events on a GPU, wall time on a CPU.

    prefill: keep the GPU busy (a sleep kernel) while the host enqueues the timed calls,
    so the events time the GPU work alone and no host launch path. Without it, the
    first call's launch path lands inside the interval (by arithmetic, a 75 µs path on a
    410 µs kernel timed two calls at a time adds 9%), and when the host path is longer
    than the kernel, every call's does. The benchmark times without prefill and with enough
    calls per measurement to amortise the first (see interleaved_median_ms);
    benchmarks/timing_bias.py shows both.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if prefill:
            busy_ms = max(_PREFILL_MIN_MS, inner * _PREFILL_PER_CALL_MS)
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda._sleep(int(busy_ms * _sleep_cycles_per_ms(index)))
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - begin) * 1e3 / inner


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                          reps: int = 20, budget_s: float = 10.0, inner: int | None = None,
                          order: str = SHUFFLED, seed: int = 0, prefill: bool = False,
                          min_reps: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds.

    Round-robin timing puts clock and thermal drift on every candidate equally, so the
    ratios between them hold even when absolute times move. The order inside a round
    is shuffled (seeded) so that whatever one kernel leaves behind (L2 contents, clocks)
    falls on a different neighbour each round. On the H200 a fixed order proved as
    neutral as a shuffled one for identical calls (benchmarks/results/h200/
    diagnostics/timing_bias.json): the shuffle is a guard, not a correction.

    inner: calls per measurement. None sizes it per function so that one measurement
    lasts about MEASUREMENT_MS: the time per call is then the steady-state cost of a
    stream of calls, the larger of the GPU's time and the host's launch path, which is
    what a model pays. (FlashAttention-4 at SDXL's 1024-token self-attention: 30 µs of
    GPU work, 75 µs per call in a stream, and the SDXL sampler step on it was 0.81-0.88x
    of SDPA's in the H200 end-to-end runs.) With one or two calls per measurement the first call's
    launch path would land inside the interval and bias short kernels arbitrarily.
    prefill: see `time_ms` (GPU time alone; for diagnostics).
    min_reps: rounds run even when `budget_s` allows fewer.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _synchronize(device)
    per_call = {name: time_ms(fn, device) for name, fn in fns.items()}
    if inner is None:
        inners = {name: max(1, round(MEASUREMENT_MS / max(ms, 1e-6))) for name, ms in per_call.items()}
    else:
        inners = dict.fromkeys(fns, inner)
    one_round_s = sum(per_call[name] * inners[name] for name in fns) * 1e-3
    reps = max(min_reps, min(reps, int(budget_s / max(one_round_s, 1e-6))))
    names = list(fns)
    shuffle = random.Random(seed).shuffle if order == SHUFFLED else None
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        if shuffle is not None:
            shuffle(names)
        for name in names:
            times[name].append(time_ms(fns[name], device, inners[name], prefill))
    return {name: statistics.median(values) for name, values in times.items()}


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Error of `out` against a reference of the same shape (computed in float64):
    cosine similarity, relative L1, max abs difference, count of non-finite values."""
    out, ref = out.double(), ref.double()
    nonfinite = int((~torch.isfinite(out)).sum().item())
    clean = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    diff = (clean - ref).abs()
    cosine = torch.nn.functional.cosine_similarity(clean.flatten(), ref.flatten(), dim=0).item()
    return {
        "cosine": cosine,
        "rel_l1": (diff.sum() / ref.abs().sum()).item(),
        "max_abs": diff.max().item(),
        "nonfinite": nonfinite,
    }
