"""Fit the cost model (cost_model.py) to measured calls.

Per kernel: the rates and costs of `KernelCost` by a robust least squares on the log of
the time, so a 3% miss on a 30 µs call weighs what a 3% miss on a 300 ms call does, and a
short call's host path doubled by a busy CPU in one timing weighs little more than a 10%
miss. A factor that
no measured call exercises (the mask factor without masked calls, the flat-form host
factor without flat calls, the ragged factor without ragged calls) gets no gradient and
stays 1. The tiling is discrete: every candidate tiling is fitted at once (a batch
dimension), and the one with the smallest error is kept. Runs on the CPU with torch's
autograd in seconds per kernel.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .cost_model import DEFAULT_MARGIN, CostModel, KernelCost, Tiling, Work
from .cost_residuals import select

log = logging.getLogger(__name__)

# Tile shapes of the FlashAttention-family kernels on Hopper and older (64 or 128 queries
# by 64 or 128 keys); head-dim templates in steps of 8, 16, 32 or 64 (FA2/FA3 run D=40 on
# their 64 template, D=80 on 96 or 128), or powers of two from 32 (kernels compiled for
# 64, 128 and 256 only, which run D=96 at the cost of 128 and D=160 at the cost of 256).
# Larger tiles first: where the grid cannot tell two tilings apart (every grid call a
# whole number of both), the first stays, and Hopper's kernels use 128-wide tiles.
TILINGS: tuple[Tiling, ...] = tuple(
    Tiling(bq, bk, dq, pow2) for bq in (128, 64) for bk in (128, 64)
    for dq, pow2 in ((8, False), (16, False), (32, False), (64, False), (32, True)))
_STEPS = 1500
_LEARNING_RATE = 0.05
# The screening descent takes 1/_SCREEN_SHARE of the steps; the best _KEEP_ROWS rows
# (tiling and start) of each kernel go on to the full descent.
_SCREEN_SHARE = 5
# Calls at least this long are GPU-bound for every kernel fitted so far (no host path
# comes near it): residuals.md reports their errors apart.
LONG_CALL_US = 1000.0
_KEEP_ROWS = 6


@dataclasses.dataclass(frozen=True)
class Sample:
    """One measured call of one kernel."""

    key: str
    work: Work
    us: float


@dataclasses.dataclass(frozen=True)
class KernelFit:
    cost: KernelCost
    residuals: list[dict[str, Any]]  # per sample: key, measured, predicted, ratio

    def summary(self) -> dict[str, Any]:
        """Errors over every call, and the median and p90 over the calls of at least
        LONG_CALL_US (GPU-bound for every kernel: where the decisions between fast kernels
        are made)."""
        logs = [math.log(r["predicted_us"] / r["measured_us"]) for r in self.residuals]
        errors = sorted(abs(r["ratio"] - 1) for r in self.residuals)
        long = sorted(abs(r["ratio"] - 1) for r in self.residuals if r["measured_us"] >= LONG_CALL_US)
        return {"points": len(self.residuals),
                "rms_log_error": math.sqrt(sum(x * x for x in logs) / len(logs)),
                "median_abs_error": _quantile(errors, 0.5),
                "p90_abs_error": _quantile(errors, 0.9),
                "max_abs_error": errors[-1],
                "long_points": len(long),
                "long_median_abs_error": _quantile(long, 0.5),
                "long_p90_abs_error": _quantile(long, 0.9)}


def _quantile(ordered: Sequence[float], q: float) -> Optional[float]:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _features(samples: Sequence[Sample], tilings: Sequence[Tiling], sms: int, width: int) -> dict[str, torch.Tensor]:
    """One kernel's rows, one per tiling, each `width` samples long (the tail padding, with
    weight 0): padded score elements, padded head dims, ragged, bytes, masked, flat form,
    measured time."""
    pad = width - len(samples)

    def rows(value) -> torch.Tensor:
        return torch.tensor([[value(t, s.work) for s in samples] + [0.0] * pad for t in tilings], dtype=torch.float64)

    return {
        "elements": rows(lambda t, w: t.padded_elements(w, sms)),
        "waves": rows(lambda t, w: float(t.waves(w, sms))),
        "dims": rows(lambda t, w: float(t.padded_dims(w))),
        "ragged": rows(lambda t, w: float(t.ragged(w))).bool(),
        "bytes": rows(lambda t, w: w.bytes_moved),
        "masked": rows(lambda t, w: float(w.masked)).bool(),
        "flat": rows(lambda t, w: float(w.flat)).bool(),
        "log_us": torch.tensor([[math.log(s.us) for s in samples] + [0.0] * pad] * len(tilings), dtype=torch.float64),
        "weight": torch.tensor([[1.0 / len(samples)] * len(samples) + [0.0] * pad] * len(tilings),
                               dtype=torch.float64),
    }


def _where(condition: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`factor` (per row) where `condition` (per row and sample), else 1."""
    factor = factor[:, None].expand_as(condition)
    return torch.where(condition, factor, torch.ones_like(factor))


def _predict_log_us(theta: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """log µs per (row, sample); theta is (rows, 10): the logs of KernelCost's numbers in
    cost_model._PARAMS order."""
    host, flat_host, launch, tile, tflops, softmax, overlap, gbps, mask, ragged = theta.exp().unbind(-1)
    p = 1.0 + overlap[:, None]
    matmul_ps = 2.0 * f["dims"] / tflops[:, None]
    softmax_ps = (1e3 / softmax)[:, None]
    slower = torch.maximum(matmul_ps, softmax_ps.expand_as(matmul_ps))
    per_element_us = slower * ((matmul_ps / slower) ** p + (softmax_ps / slower) ** p) ** (1.0 / p) * 1e-6
    compute = f["elements"] * per_element_us * _where(f["masked"], mask) * _where(f["ragged"], ragged)
    gpu = launch[:, None] + f["waves"] * tile[:, None] + compute + f["bytes"] / (gbps[:, None] * 1e3)
    return torch.maximum(host[:, None] * _where(f["flat"], flat_host), gpu).log()


# Log errors up to about this size count squared, larger ones about linearly (a
# pseudo-Huber loss): a short call whose host path a busy CPU doubled in one timing must
# not pull the rates that decide the long calls.
_ROBUST_LOG_ERROR = 0.1


def _losses(theta: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean robust loss of the log errors per row (padding excluded)."""
    scaled = (_predict_log_us(theta, f) - f["log_us"]) / _ROBUST_LOG_ERROR
    return (((1.0 + scaled ** 2).sqrt() - 1.0) * f["weight"]).sum(dim=1)


# Starts per tiling: the shortest call explained by the host path, by the GPU's launch
# floor, or by both. Under max(host, gpu) the smaller one gets no gradient, so a start
# on the wrong side can stall; one of these is on the right side.
_HOST_SHARES = (0.95, 0.5, 0.05)
# A wave's fixed cost starts at a tenth of a microsecond: below what a Q-tile load and an
# O-tile store take on any GPU, so the descent grows it where the calls ask for it.
_TILE_START_US = 0.1


def _initial(samples: Sequence[Sample]) -> list[list[float]]:
    """One start per host share (_HOST_SHARES): Hopper-like rates, every factor 1, and a
    per-wave tile cost of _TILE_START_US (a log-space parameter cannot start at 0)."""
    shortest = min(s.us for s in samples)
    return [[share * shortest, 1.0, (1 - share) * shortest, _TILE_START_US, 300.0, 30_000.0, 0.5, 2_000.0, 1.0, 1.0]
            for share in _HOST_SHARES]


def _descend(theta: torch.Tensor, features: dict[str, torch.Tensor], steps: int,
             deadline: Optional[float] = None) -> torch.Tensor:
    """Adam on every row at once, with a cosine schedule; returns the fitted rows. Stops
    early (with a warning) at `deadline` (time.monotonic())."""
    theta = theta.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=_LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        if deadline is not None and time.monotonic() >= deadline:
            log.warning("attention backends: the cost-model fit ran out of time after %d of %d steps", step, steps)
            break
        optimizer.zero_grad()
        _losses(theta, features).sum().backward()
        optimizer.step()
        schedule.step()
    return theta.detach()


def fit_kernels(samples_by_kernel: Mapping[str, Sequence[Sample]], sms: int, tilings: Sequence[Tiling] = TILINGS,
                steps: int = _STEPS, time_limit_s: Optional[float] = None) -> dict[str, KernelFit]:
    """The KernelCost that best predicts each kernel's samples (least squares in log time).

    Every kernel, tiling and start is a row of one batch: the rows share nothing but the
    optimizer's loop (Adam's steps are per parameter), so one loop fits them all in the
    time of one kernel's. A short screening descent over all rows picks each kernel's
    _KEEP_ROWS best, which alone get the full descent. With `time_limit_s`, both descents
    stop when it is spent and the best rows so far are kept.
    """
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    if not samples_by_kernel or not all(samples_by_kernel.values()):
        raise ValueError("no measured calls to fit: measure the grid first (benchmarks/cost_grid.py)")
    width = max(len(s) for s in samples_by_kernel.values())
    names, tried, starts, parts = [], [], [], []
    for name, samples in samples_by_kernel.items():
        rows = [(t, start) for t in tilings for start in _initial(samples)]
        names += [name] * len(rows)
        tried += [t for t, _ in rows]
        starts += [start for _, start in rows]
        parts.append(_features(samples, [t for t, _ in rows], sms, width))
    features = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    theta = _descend(torch.tensor(starts, dtype=torch.float64).log(), features, max(1, steps // _SCREEN_SHARE),
                     deadline)
    # Only each kernel's most promising rows go on: the rest of the steps cost a fraction.
    with torch.no_grad():
        losses = _losses(theta, features).tolist()
    keep = []
    for name in samples_by_kernel:
        rows = sorted((i for i, n in enumerate(names) if n == name), key=lambda i: losses[i])
        keep += rows[:_KEEP_ROWS]
    features = {key: value[keep] for key, value in features.items()}
    names, tried = [names[i] for i in keep], [tried[i] for i in keep]
    theta = _descend(theta[keep], features, steps, deadline)
    with torch.no_grad():
        losses = _losses(theta, features).tolist()
        values = theta.exp().tolist()
    fits = {}
    for name, samples in samples_by_kernel.items():
        best = min((i for i, n in enumerate(names) if n == name), key=lambda i: losses[i])
        fits[name] = _with_residuals(KernelCost(*values[best], tiling=tried[best]), samples, sms)
    return fits


def _with_residuals(cost: KernelCost, samples: Sequence[Sample], sms: int) -> KernelFit:
    return KernelFit(cost, [{"key": s.key, "measured_us": s.us, "predicted_us": cost.predict_us(s.work, sms),
                             "ratio": cost.predict_us(s.work, sms) / s.us} for s in samples])


def fit_kernel(samples: Sequence[Sample], sms: int, tilings: Sequence[Tiling] = TILINGS,
               steps: int = _STEPS) -> KernelFit:
    """One kernel's fit (fit_kernels)."""
    return fit_kernels({"kernel": samples}, sms, tilings, steps)["kernel"]


def fit_model(samples_by_kernel: Mapping[str, Sequence[Sample]], *, gpu_class: str, gpu: str, sms: int,
              margin: float = DEFAULT_MARGIN, source: str = "default", min_points: int = 8,
              steps: int = _STEPS, time_limit_s: Optional[float] = None) -> tuple[CostModel, dict[str, KernelFit]]:
    """Fit every kernel with at least `min_points` measured calls (within `time_limit_s`)."""
    kept = {name: samples for name, samples in samples_by_kernel.items() if len(samples) >= min_points}
    fits = fit_kernels(kept, sms, steps=steps, time_limit_s=time_limit_s)
    model = CostModel(gpu_class=gpu_class, gpu=gpu, sms=sms, kernels={n: f.cost for n, f in fits.items()},
                      margin=margin, source=source, fit={n: f.summary() for n, f in fits.items()},
                      correction=select({name: gpu_bound_residuals(fits[name].cost, kept[name], sms) for name in fits}))
    return model, fits


def gpu_bound_residuals(cost: KernelCost, samples: Sequence[Sample], sms: int) -> list[tuple[Work, float]]:
    """(work, log(measured / predicted)) of the samples the fit predicts GPU-bound: what the
    correction (cost_residuals.py) learns from."""
    return [(s.work, math.log(s.us / cost.gpu_us(s.work, sms))) for s in samples
            if cost.gpu_us(s.work, sms) > cost.host(s.work)]


def residual_table(fits: Mapping[str, KernelFit], keys: Optional[Iterable[str]] = None) -> str:
    """Markdown: each kernel's fit summary, then predicted/measured per call."""
    lines = ["| kernel | points | rms log error | median abs error | p90 abs error | max abs error | "
             f"calls >= {LONG_CALL_US / 1000:g} ms | their median | their p90 | tiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, fit in fits.items():
        s = fit.summary()
        t = fit.cost.tiling
        dims = f"D powers of two from {t.dim_quantum}" if t.dim_pow2 else f"D step {t.dim_quantum}"
        long = (f"{s['long_median_abs_error']:.1%} | {s['long_p90_abs_error']:.1%}" if s["long_points"]
                else "– | –")
        lines.append(f"| {name} | {s['points']} | {s['rms_log_error']:.3f} | {s['median_abs_error']:.1%} | "
                     f"{s['p90_abs_error']:.1%} | {s['max_abs_error']:.1%} | {s['long_points']} | {long} | "
                     f"{t.block_q}x{t.block_k}, {dims} |")
    names = list(fits)
    order = list(keys) if keys is not None else list(dict.fromkeys(r["key"] for f in fits.values()
                                                                   for r in f.residuals))
    cells = {(n, r["key"]): r for n, f in fits.items() for r in f.residuals}
    lines += ["", "predicted / measured per call (measured µs in brackets):", "",
              "| call | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in order:
        parts = []
        for name in names:
            r = cells.get((name, key))
            parts.append("–" if r is None else f"{r['ratio']:.2f} ({r['measured_us']:.0f})")
        lines.append(f"| {key} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"
