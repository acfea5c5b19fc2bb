"""Fit the cost model (cost_model.py) to measured calls.

Per kernel: the five rates and costs of `KernelCost` (and the mask factor where masked
calls were measured) by least squares on the log of the time, so a 3% miss on a 30 µs
call weighs what a 3% miss on a 300 ms call does. The tiling is discrete: every
candidate tiling is fitted at once (a batch dimension), and the one with the smallest
error is kept. Runs on the CPU with torch's autograd in a few seconds per kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .cost_model import DEFAULT_MARGIN, CostModel, KernelCost, Tiling, Work

# Tile shapes of the FlashAttention-family kernels on Hopper and older (64 or 128 queries
# by 64 or 128 keys), and head-dim templates in steps of 8, 32 or 64 (FA2/FA3 run D=40 on
# their 64 template, D=80 on 96 or 128).
TILINGS: tuple[Tiling, ...] = tuple(Tiling(bq, bk, dq) for bq in (64, 128) for bk in (64, 128) for dq in (8, 32, 64))
_STEPS = 1500
_LEARNING_RATE = 0.05


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
        logs = [math.log(r["predicted_us"] / r["measured_us"]) for r in self.residuals]
        errors = sorted(abs(r["predicted_us"] / r["measured_us"] - 1) for r in self.residuals)
        return {"points": len(self.residuals),
                "rms_log_error": math.sqrt(sum(x * x for x in logs) / len(logs)),
                "median_abs_error": errors[len(errors) // 2],
                "p90_abs_error": errors[min(len(errors) - 1, int(0.9 * len(errors)))],
                "max_abs_error": errors[-1]}


def _features(samples: Sequence[Sample], tilings: Sequence[Tiling], sms: int) -> dict[str, torch.Tensor]:
    """Per tiling and sample: padded score elements, padded head dims; per sample: bytes,
    masked, measured time."""
    elements = [[t.padded_elements(s.work, sms) for s in samples] for t in tilings]
    dims = [[float(t.padded_dims(s.work)) for s in samples] for t in tilings]
    return {
        "elements": torch.tensor(elements, dtype=torch.float64),
        "dims": torch.tensor(dims, dtype=torch.float64),
        "bytes": torch.tensor([s.work.bytes_moved for s in samples], dtype=torch.float64),
        "masked": torch.tensor([s.work.masked for s in samples], dtype=torch.bool),
        "log_us": torch.tensor([math.log(s.us) for s in samples], dtype=torch.float64),
    }


def _predict_log_us(theta: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """log µs per (tiling, sample); theta is (tilings, 6): the logs of KernelCost's numbers."""
    host, launch, tflops, softmax, gbps, mask = theta.exp().unbind(-1)
    per_element_us = 2.0 * f["dims"] / (tflops[:, None] * 1e6) + 1.0 / (softmax[:, None] * 1e3)
    compute = f["elements"] * per_element_us * torch.where(f["masked"], mask[:, None], torch.ones_like(mask[:, None]))
    gpu = launch[:, None] + compute + f["bytes"] / (gbps[:, None] * 1e3)
    return torch.maximum(host[:, None].expand_as(gpu), gpu).log()


# Starts per tiling: the shortest call explained by the host path, by the GPU's launch
# floor, or by both. Under max(host, gpu) the smaller one gets no gradient, so a start
# on the wrong side can stall; one of these is on the right side.
_HOST_SHARES = (0.95, 0.5, 0.05)


def _initial(samples: Sequence[Sample]) -> torch.Tensor:
    """One start per host share (_HOST_SHARES): Hopper-like rates, no mask penalty."""
    shortest = min(s.us for s in samples)
    starts = [[share * shortest, (1 - share) * shortest, 300.0, 30_000.0, 2_000.0, 1.0] for share in _HOST_SHARES]
    return torch.tensor(starts, dtype=torch.float64).log()


def fit_kernel(samples: Sequence[Sample], sms: int, tilings: Sequence[Tiling] = TILINGS,
               steps: int = _STEPS) -> KernelFit:
    """The KernelCost that best predicts `samples` (least squares in log time)."""
    if not samples:
        raise ValueError("no measured calls to fit: measure the grid first (benchmarks/cost_grid.py)")
    starts = _initial(samples)
    # Every tiling from every start, fitted together: row i is tiling i // len(starts).
    tried = [t for t in tilings for _ in range(len(starts))]
    features = _features(samples, tried, sms)
    theta = starts.repeat(len(tilings), 1).requires_grad_(True)
    frozen = torch.zeros(6, dtype=torch.float64)
    if not bool(features["masked"].any()):
        frozen[5] = 1.0  # no masked call measured: the mask factor stays 1
    optimizer = torch.optim.Adam([theta], lr=_LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((_predict_log_us(theta, features) - features["log_us"]) ** 2).mean(dim=1)
        loss.sum().backward()
        theta.grad *= 1.0 - frozen
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        losses = ((_predict_log_us(theta, features) - features["log_us"]) ** 2).mean(dim=1)
        best = int(losses.argmin())
        values = theta[best].exp().tolist()
    cost = KernelCost(*values, tiling=tried[best])
    residuals = []
    for sample in samples:
        predicted = cost.predict_us(sample.work, sms)
        residuals.append({"key": sample.key, "measured_us": sample.us, "predicted_us": predicted,
                          "ratio": predicted / sample.us})
    return KernelFit(cost, residuals)


def fit_model(samples_by_kernel: Mapping[str, Sequence[Sample]], *, gpu_class: str, gpu: str, sms: int,
              margin: float = DEFAULT_MARGIN, source: str = "default", min_points: int = 8,
              steps: int = _STEPS) -> tuple[CostModel, dict[str, KernelFit]]:
    """Fit every kernel with at least `min_points` measured calls."""
    fits = {name: fit_kernel(samples, sms, steps=steps)
            for name, samples in samples_by_kernel.items() if len(samples) >= min_points}
    model = CostModel(gpu_class=gpu_class, gpu=gpu, sms=sms, kernels={n: f.cost for n, f in fits.items()},
                      margin=margin, source=source, fit={n: f.summary() for n, f in fits.items()})
    return model, fits


def residual_table(fits: Mapping[str, KernelFit], keys: Optional[Iterable[str]] = None) -> str:
    """Markdown: each kernel's fit summary, then predicted/measured per call."""
    lines = ["| kernel | points | rms log error | median abs error | p90 abs error | max abs error | tiling |",
             "|---|---|---|---|---|---|---|"]
    for name, fit in fits.items():
        s = fit.summary()
        t = fit.cost.tiling
        lines.append(f"| {name} | {s['points']} | {s['rms_log_error']:.3f} | {s['median_abs_error']:.1%} | "
                     f"{s['p90_abs_error']:.1%} | {s['max_abs_error']:.1%} | {t.block_q}x{t.block_k}, D step "
                     f"{t.dim_quantum} |")
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
