"""Timing and error metrics for the benchmark."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_median_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                          reps: int = 20, budget_s: float = 10.0) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds.

    Round-robin timing puts clock and thermal drift on every candidate equally, so the
    ratios between them hold even when absolute times move. Each measurement runs a
    function back to back enough times to last about a millisecond: a lone call of a
    30 µs kernel would mostly measure the launch path, not the kernel.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    probe_start = time.perf_counter()
    for fn in fns.values():
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    one_round = time.perf_counter() - probe_start
    inner = max(1, int(1e-3 * len(fns) / max(one_round, 1e-9)))
    reps = max(5, min(reps, int(budget_s / max(one_round * inner, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / inner)
            else:
                begin = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - begin) * 1e3 / inner)
    return {name: statistics.median(values) for name, values in times.items()}


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
