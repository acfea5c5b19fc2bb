"""Calibrate by rescaling the shipped model: two numbers per kernel instead of ten.

`calibrate` measures a reduced grid in a few minutes: 40-odd calls per kernel. Refitting
the model's ten numbers and its tiling to them (cost_fit.py) follows each machine's
noise: on the H200, the reduced grid of one machine, fitted afresh, sent SD1.5 and SDXL's
4096-token calls to FlashAttention-4, slower there than SDPA, and kept Qwen-Image-Edit on
SDPA where FA4 was faster, while the shipped model, fitted to 500-odd calls, chose right
on both (benchmarks/results/h200/cost_model/evaluation_calibrated/; the README's fourth
and fifth sessions).

What differs between two machines of one GPU class is mostly two levels per kernel: the
host path (the CPU, Python, the driver) and the GPU's speed (clocks, power limit, memory:
an H100 and an H200 are one class). Where a shipped model exists for the GPU
class, the calibration keeps its shape (rates, tiling, correction) and measures those
two levels:

    host scale: the median of measured / predicted over the calls the shipped model
                predicts clearly host-bound (host path at least CLEAR x the GPU time),
                moved towards 1 by twice its standard error
    GPU scale:  the same over the calls it predicts clearly GPU-bound, with at least
                GPU_LEVEL_FROM_US of GPU time beyond the launch floor

A kernel with fewer than MIN_POINTS such calls keeps scale 1 on that side. A kernel's
rescale is kept only if it explains the reduced grid (median |log error| of its long
GPU-bound calls at most MAX_MEDIAN_LOG_ERROR); a kernel it does not explain, or one the
shipped model lacks, is fitted afresh beside the rescaled ones, and when SDPA (which every
decision is made against) is not explained, every kernel is fitted afresh (another chip
sold under the same class).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Mapping, Optional, Sequence

from .cost_fit import Sample
from .cost_model import LONG_MARGIN_FROM_US, SAFEST, CostModel, KernelCost

# A call is counted for one side only when that side is this much longer than the other:
# near the crossing, which side a measurement shows is the noise's choice.
CLEAR = 1.25
MIN_POINTS = 3
# A level moves only by what its calls establish beyond their scatter: the median's
# standard error (1.2533 sigma / sqrt(n) for a normal sample, sigma from the median
# absolute deviation) times SIGNIFICANCE. Without it, one H200's scattered `sageattn`
# wrapper level (within its scatter of the prior's) moved Wan 2.2 5B from the fp8 kernel
# to the wrapper, measured slower (cost_model/grid_2026-12-02b/ reduced, judged on the
# held-out runs 3-5; the README's fifth session).
SIGNIFICANCE = 2.0
_SIGMA_PER_MAD = 1.4826
_MEDIAN_SE = 1.2533
# The GPU level is read from calls whose predicted GPU time beyond the launch floor is at
# least this long. Below it a call the model calls GPU-bound can still be paced by the host
# on a machine whose CPU differs from the grid's: the fit of SageAttention's `sageattn`
# wrapper put its host path into its launch floor (sm90.json), and on another H200 its
# short calls read far from their prediction while every call from 1 ms read within a
# few percent (cost_model/grid_2026-12-02b/). The decisions a small margin separates are
# made on the long calls (cost_model.LONG_MARGIN_FROM_US).
GPU_LEVEL_FROM_US = LONG_MARGIN_FROM_US
# About twice the shipped H200 model's own mean |log error| over its GPU-bound grid calls
# (leave-one-out: the `loo` of sm90.json's correction block). A rescaled kernel that misses
# this machine's long GPU-bound calls by a larger median is not this GPU's shape.
MAX_MEDIAN_LOG_ERROR = 0.15


@dataclasses.dataclass(frozen=True)
class Rescale:
    """One kernel's two levels on this machine against the shipped model."""

    host: float
    gpu: float
    host_points: int
    gpu_points: int
    median_log_error: Optional[float]  # of the rescaled prediction, over the GPU-bound calls

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scaled(cost: KernelCost, host: float, gpu: float) -> KernelCost:
    """`cost` with its host path multiplied by `host` and its GPU time by `gpu` (every
    GPU term is a time or a rate, so the form's shape is unchanged)."""
    return dataclasses.replace(cost, host_us=cost.host_us * host, launch_us=cost.launch_us * gpu,
                               tile_us=cost.tile_us * gpu, tflops=cost.tflops / gpu,
                               softmax_gelems=cost.softmax_gelems / gpu, gbps=cost.gbps / gpu)


def _level(logs: Sequence[float]) -> float:
    """exp of the median log ratio, moved towards 0 by SIGNIFICANCE standard errors (a soft
    threshold): a level the measurements cannot tell from the prior's stays the prior's."""
    if len(logs) < MIN_POINTS:
        return 1.0
    middle = statistics.median(logs)
    spread = statistics.median(abs(x - middle) for x in logs) * _SIGMA_PER_MAD
    error = _MEDIAN_SE * spread / math.sqrt(len(logs))
    return math.exp(math.copysign(max(0.0, abs(middle) - SIGNIFICANCE * error), middle))


def fit_rescale(prior: CostModel, name: str, samples: Sequence[Sample], sms: int) -> Rescale:
    """Kernel `name`'s host and GPU levels on `samples` against `prior`."""
    cost = prior.kernels[name]
    here = dataclasses.replace(prior, sms=sms)  # the shipped shape on this GPU's SM count
    host_logs, gpu_logs, bound = [], [], []
    for sample in samples:
        host, gpu = cost.host(sample.work), here.gpu_us(name, sample.work)
        if host >= CLEAR * gpu:
            host_logs.append(math.log(sample.us / host))
        elif gpu >= CLEAR * host and gpu - cost.launch_us >= GPU_LEVEL_FROM_US:
            gpu_logs.append(math.log(sample.us / gpu))
            bound.append((sample.us, gpu))
    host_scale, gpu_scale = _level(host_logs), _level(gpu_logs)
    errors = [abs(math.log(us / (gpu_scale * gpu))) for us, gpu in bound]
    return Rescale(host_scale, gpu_scale, len(host_logs), len(gpu_logs),
                   statistics.median(errors) if errors else None)


def rescale_model(prior: CostModel, samples_by_kernel: Mapping[str, Sequence[Sample]], *, gpu: str, sms: int,
                  source: str) -> tuple[Optional[CostModel], dict[str, Rescale], list[str]]:
    """The prior rescaled to this machine's measurements: (the model of the kernels whose
    rescaled shape fits them, every kernel's rescale, the measured kernels to fit afresh:
    those the prior lacks or misses by more than MAX_MEDIAN_LOG_ERROR). The model is None
    when SDPA, which every decision is made against, is among the latter. Kernels the prior
    has but nothing measured here are left out: they are not installed here."""
    measured = {name: rows for name, rows in samples_by_kernel.items() if rows}
    rescales = {name: fit_rescale(prior, name, rows, sms) for name, rows in measured.items() if name in prior.kernels}
    kept = {name: r for name, r in rescales.items()
            if r.median_log_error is None or r.median_log_error <= MAX_MEDIAN_LOG_ERROR}
    afresh = [name for name in measured if name not in kept]
    if SAFEST not in kept:
        return None, rescales, list(measured)
    kernels = {name: scaled(prior.kernels[name], r.host, r.gpu) for name, r in kept.items()}
    fit = {name: {"rescaled_from": prior.gpu, **r.to_json()} for name, r in kept.items()}
    correction = prior.correction
    if correction is not None:
        correction = dataclasses.replace(correction, points={n: p for n, p in correction.points.items()
                                                             if n in kernels})
    return CostModel(gpu_class=prior.gpu_class, gpu=gpu, sms=sms, kernels=kernels, margin=prior.margin,
                     source=source, fit=fit, long_margin=prior.long_margin, correction=correction), rescales, afresh


def with_kernels(model: CostModel, fitted: CostModel) -> CostModel:
    """`model` plus the kernels of `fitted` (kernels fitted afresh beside rescaled ones).
    They get no residual correction: theirs was chosen for another fit's widths, and a
    kernel whose shape differed from the prior's is predicted by its own form alone."""
    return dataclasses.replace(model, kernels={**model.kernels, **fitted.kernels}, fit={**model.fit, **fitted.fit})
