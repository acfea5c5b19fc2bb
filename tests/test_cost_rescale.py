"""Calibration by rescaling the shipped model (attention/cost_rescale.py): the two levels
it measures, the soft threshold that keeps noise from moving them, and the fallback to a
fresh fit where the shipped shape does not fit."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from attention import registry
from attention.calibrate import fit_calibration
from attention.calibration_calls import grid
from attention.cost_fit import Sample
from attention.cost_model import CostModel, KernelCost, Tiling, parse, work_of
from attention.cost_rescale import MAX_MEDIAN_LOG_ERROR, fit_rescale, rescale_model, scaled
from attention.cost_residuals import ResidualCorrection, position

SMS = 132
SDPA = KernelCost(host_us=25.0, flat_host_factor=2.0, launch_us=6.0, tile_us=1.5, tflops=700.0, softmax_gelems=2_500.0,
                  overlap=0.2, gbps=4_000.0, mask_factor=1.0, ragged_factor=1.2, tiling=Tiling(128, 128, 32, True))
FA4 = KernelCost(host_us=150.0, flat_host_factor=1.1, launch_us=40.0, tile_us=0.9, tflops=750.0, softmax_gelems=2_500.0,
                 overlap=3.0, gbps=8_000.0, mask_factor=1.0, ragged_factor=1.0, tiling=Tiling(64, 128, 16))
PRIOR = CostModel("sm90", "NVIDIA H200", SMS, {"sdpa": SDPA, "flash4": FA4})


def _measured(truth: KernelCost, noise: float = 0.01, seed: int = 0) -> list[Sample]:
    """`truth` timed on the reduced grid, with multiplicative noise of `noise`."""
    rng = random.Random(seed)
    rows = []
    for call in grid(reduced=True):
        work = work_of(call.signature("cuda", (9, 0)))
        rows.append(Sample(call.key, work, truth.predict_us(work, SMS) * math.exp(rng.gauss(0.0, noise))))
    return rows


def test_scaled_multiplies_the_host_path_and_the_gpu_time_and_nothing_else():
    work = work_of(grid()[-1].signature("cuda", (9, 0)))
    faster = scaled(FA4, 0.5, 1.2)
    assert faster.host(work) == pytest.approx(0.5 * FA4.host(work))
    assert faster.gpu_us(work, SMS) == pytest.approx(1.2 * FA4.gpu_us(work, SMS))
    assert faster.tiling == FA4.tiling and faster.overlap == FA4.overlap


def test_a_machine_with_a_slower_host_and_a_faster_gpu_gets_both_levels():
    rescale = fit_rescale(PRIOR, "flash4", _measured(scaled(FA4, 1.3, 0.9)), SMS)
    assert rescale.host == pytest.approx(1.3, rel=0.01) and rescale.gpu == pytest.approx(0.9, rel=0.01)
    assert rescale.host_points >= 3 and rescale.gpu_points >= 3 and rescale.median_log_error < 0.02


def test_a_level_inside_the_measurements_scatter_stays_the_shipped_one():
    # 0.8% apart from the prior, with 8% scatter per call: not established, not moved.
    rescale = fit_rescale(PRIOR, "sdpa", _measured(scaled(SDPA, 1.0, 1.008), noise=0.08, seed=3), SMS)
    assert rescale.gpu == 1.0
    # The same offset measured with 0.2% scatter is.
    precise = fit_rescale(PRIOR, "sdpa", _measured(scaled(SDPA, 1.0, 1.008), noise=0.002, seed=3), SMS)
    assert precise.gpu == pytest.approx(1.008, abs=0.002) and precise.gpu != 1.0


def test_the_rescaled_model_keeps_the_shipped_shape_and_its_correction_for_kept_kernels():
    work = work_of(grid()[-1].signature("cuda", (9, 0)))
    point = position(work) + (0.05,)
    prior = dataclasses.replace(PRIOR, correction=ResidualCorrection(0.5, 1.0, 0.5, {"sdpa": (point,),
                                                                                      "flash4": (point,)}))
    measured = {"sdpa": _measured(scaled(SDPA, 0.8, 1.0)), "flash4": _measured(scaled(FA4, 1.0, 1.1))}
    model, rescales, afresh = rescale_model(prior, measured, gpu="NVIDIA H100", sms=SMS, source="calibrated")
    assert afresh == [] and model.gpu == "NVIDIA H100" and model.source == "calibrated"
    assert model.kernels["flash4"].tiling == FA4.tiling
    assert model.kernels["sdpa"].host_us == pytest.approx(0.8 * SDPA.host_us, rel=0.02)
    assert model.correction is prior.correction or model.correction.points == prior.correction.points
    assert model.fit["flash4"]["rescaled_from"] == "NVIDIA H200"
    # What a calibration file holds reads back.
    assert parse(model.to_json(), registry.names()).kernels == model.kernels


def test_a_kernel_whose_shape_differs_or_that_the_prior_lacks_is_fitted_afresh():
    other_shape = dataclasses.replace(FA4, launch_us=600.0, tflops=3000.0, softmax_gelems=10_000.0)
    measured = {"sdpa": _measured(SDPA), "flash4": _measured(other_shape), "kitchen_int8": _measured(other_shape)}
    model, rescales, afresh = rescale_model(PRIOR, measured, gpu="x", sms=SMS, source="calibrated")
    assert rescales["flash4"].median_log_error > MAX_MEDIAN_LOG_ERROR
    assert set(afresh) == {"flash4", "kitchen_int8"} and set(model.kernels) == {"sdpa"}
    # Without SDPA's shape there is nothing to rescale against: everything afresh.
    measured["sdpa"] = _measured(dataclasses.replace(SDPA, launch_us=600.0, tflops=3000.0, softmax_gelems=10_000.0))
    model, _, afresh = rescale_model(PRIOR, measured, gpu="x", sms=SMS, source="calibrated")
    assert model is None and set(afresh) == set(measured)


def test_fit_calibration_rescales_what_fits_and_fits_the_rest(monkeypatch):
    from attention.calibrate import CallTiming

    other_shape = dataclasses.replace(FA4, launch_us=600.0, tflops=3000.0, softmax_gelems=10_000.0)
    timings = []
    for call in grid(reduced=True):
        work = work_of(call.signature("cuda", (9, 0)))
        timings.append(CallTiming(call, {"sdpa": scaled(SDPA, 0.9, 1.0).predict_us(work, SMS),
                                         "flash4": other_shape.predict_us(work, SMS)}))
    model = fit_calibration(timings, gpu_class="sm90", gpu="x", sms=SMS, capability=(9, 0), device_type="cuda",
                            prior=PRIOR, steps=30)
    assert set(model.kernels) == {"sdpa", "flash4"}
    assert model.fit["sdpa"]["rescaled_from"] == "NVIDIA H200" and "rescaled_from" not in model.fit["flash4"]
    assert model.kernels["sdpa"].host_us == pytest.approx(0.9 * SDPA.host_us, rel=0.02)
    assert torch.get_num_threads() >= 1  # the fit gives the threads back
