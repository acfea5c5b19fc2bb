"""Timing and error metrics for the benchmark."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20,
              budget_s: float = 2.0) -> float:
    """Median milliseconds of `fn` over `reps` runs after `warmup` runs.

    CUDA work is timed with events around each run; the repetition count shrinks to
    fit `budget_s` for long kernels (at least 5 timed runs).
    """
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    probe_start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    one = time.perf_counter() - probe_start
    reps = max(5, min(reps, int(budget_s / max(one, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Error of `out` against a float32 reference of the same shape."""
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
