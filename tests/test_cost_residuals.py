"""The cost model's additions of the fourth session: the per-wave tile cost, the residual
correction (attention/cost_residuals.py), and the margins by call length and host path."""

from __future__ import annotations

import math
import random

import pytest
import torch

from attention import registry
from attention.call import HEADS_FIRST, MASK_NONE, CallSignature
from attention.cost_fit import Sample, fit_model
from attention.cost_model import (DEFAULT_LONG_MARGIN, DEFAULT_MARGIN, HOST_BOUND_MARGIN, CostModel, InvalidCostModel,
                                  KernelCost, Tiling, auto_order, parse, work_of)
from attention.cost_residuals import ResidualCorrection, leave_one_out, position, select

SMS = 132
SDPA = KernelCost(host_us=25.0, flat_host_factor=2.0, launch_us=6.0, tile_us=1.5, tflops=700.0, softmax_gelems=2_500.0,
                  overlap=0.2, gbps=4_000.0, mask_factor=1.0, ragged_factor=1.2, tiling=Tiling(128, 128, 32, True))
FA4 = KernelCost(host_us=150.0, flat_host_factor=1.1, launch_us=40.0, tile_us=0.9, tflops=750.0, softmax_gelems=2_500.0,
                 overlap=3.0, gbps=8_000.0, mask_factor=1.0, ragged_factor=1.0, tiling=Tiling(64, 128, 16))


def _signature(b=2, h=24, nq=4096, nk=4096, d=128) -> CallSignature:
    return CallSignature("cuda", (9, 0), torch.bfloat16, b, h, h, nq, nk, d, d, mask_kind=MASK_NONE,
                         layout_in=HEADS_FIRST, layout_out=HEADS_FIRST)


def test_each_wave_of_query_tiles_pays_the_tile_cost_whatever_the_key_count():
    few_keys, no_tile_cost = work_of(_signature(nq=32768, nk=256)), KernelCost(**{**FA4.__dict__, "tile_us": 0.0})
    waves = FA4.tiling.waves(few_keys, SMS)
    assert waves == -(-(2 * 24 * 32768 // 64) // SMS)
    assert FA4.gpu_us(few_keys, SMS) - no_tile_cost.gpu_us(few_keys, SMS) == pytest.approx(waves * FA4.tile_us)


def test_a_version_2_file_without_tile_costs_still_reads():
    data = CostModel("sm90", "test", SMS, {"sdpa": SDPA}).to_json()
    data["version"] = 2
    del data["long_margin"]
    for entry in data["kernels"].values():
        del entry["tile_us"]
    model = parse(data, registry.names())
    assert model.kernels["sdpa"].tile_us == 0.0
    assert model.long_margin == model.margin  # version 2 had one margin for every call
    data["version"] = 3
    with pytest.raises(InvalidCostModel, match="tile_us of sdpa"):
        parse(data, registry.names())


def _grid_samples(truth: KernelCost, bias, seed=0) -> list[Sample]:
    """A kernel measured on self-attention calls, its times off the physical form by
    `bias(d, n)` (what one set of rates per kernel cannot follow) and 0.5% noise."""
    rng = random.Random(seed)
    samples = []
    for d in (64, 128):
        for n in (1024, 2048, 4096, 8192, 16384):
            for b, h in ((1, 24), (2, 24), (2, 12)):
                work = work_of(_signature(b, h, n, n, d))
                us = truth.predict_us(work, SMS) * bias(d, n) * math.exp(rng.gauss(0.0, 0.005))
                samples.append(Sample(f"d{d}_n{n}_b{b}h{h}", work, us))
    return samples


def test_the_correction_learns_a_head_dims_bias_and_predicts_calls_between_the_grid():
    bias = lambda d, n: 1.06 if d == 128 and n >= 4096 else 1.0  # noqa: E731
    model, _ = fit_model({"sdpa": _grid_samples(SDPA, bias)}, gpu_class="sm90", gpu="test", sms=SMS, steps=600)
    assert model.correction is not None
    loo = model.correction.loo
    assert loo["leave_one_out"] < loo["mean_abs_log_error"]
    # A call between grid points, at the biased head dim, is predicted with the bias ...
    between = _signature(2, 20, 6144, 6144, 128)
    truth = SDPA.predict_us(work_of(between), SMS) * 1.06
    corrected = model.predict_us("sdpa", between)
    form = model.kernels["sdpa"].predict_us(work_of(between), SMS)
    assert abs(corrected / truth - 1) < abs(form / truth - 1)
    assert corrected == pytest.approx(truth, rel=0.02)


def test_far_from_the_grid_or_on_the_host_path_the_correction_is_silent():
    points = {"sdpa": tuple(position(work_of(_signature(2, 24, n, n, 128))) + (0.2,) for n in (4096, 8192))}
    correction = ResidualCorrection(0.5, 1.0, 0.5, points)
    assert correction.factor("sdpa", work_of(_signature(2, 24, 8192, 8192, 64))) == 1.0  # another head dim
    assert correction.factor("sdpa", work_of(_signature(2, 24, 8192, 8192, 128))) > 1.1
    assert correction.factor("flash4", work_of(_signature())) == 1.0  # a kernel without points
    far = correction.factor("sdpa", work_of(_signature(1, 8, 256, 256, 128)))
    assert 1.0 <= far < 1.001
    model = CostModel("sm90", "test", SMS, {"sdpa": SDPA}, correction=correction)
    short = _signature(1, 8, 256, 77, 128)
    assert model.predict_us("sdpa", short) == SDPA.host_us  # host-bound: the form's host path


def test_leave_one_out_predicts_each_grid_call_from_the_others_only():
    near, far = (_signature(2, 24, n, n, 128) for n in (8192, 9216)), _signature(1, 8, 256, 256, 64)
    where = [position(work_of(s)) for s in (*near, far)]
    points = {"sdpa": (where[0] + (0.10,), where[1] + (0.12,), where[2] + (-0.3,)), "flash4": (where[0] + (0.0,),)}
    correction = ResidualCorrection(0.5, 1.0, 0.5, points)
    errors = leave_one_out(correction)
    assert set(errors) == set(where) and set(errors[where[0]]) == {"sdpa", "flash4"}
    # Alone on its head dim, a call keeps its whole residual; a kernel's only call too.
    assert errors[where[2]]["sdpa"] == -0.3 and errors[where[0]]["flash4"] == 0.0
    # Two close calls of one kernel: each is predicted from the other, shrunk.
    w = math.exp(-0.5 * ((where[0][1] - where[1][1]) ** 2 + (where[0][2] - where[1][2]) ** 2) / 0.5 ** 2)
    assert errors[where[0]]["sdpa"] == pytest.approx(0.10 - w * 0.12 / (0.5 + w))
    assert errors[where[1]]["sdpa"] == pytest.approx(0.12 - w * 0.10 / (0.5 + w))


def test_select_returns_none_without_gpu_bound_points_and_the_correction_round_trips():
    assert select({}) is None and select({"sdpa": []}) is None
    rows = [(work_of(_signature(2, 24, n, n, 128)), 0.01 * i) for i, n in enumerate((2048, 4096, 8192))]
    correction = select({"sdpa": rows})
    model = CostModel("sm90", "test", SMS, {"sdpa": SDPA}, correction=correction)
    again = parse(model.to_json(), registry.names())
    assert again.correction == correction
    call = _signature(2, 24, 6000, 6000, 128)
    assert again.predict_us("sdpa", call) == model.predict_us("sdpa", call)


@pytest.mark.parametrize("damage, problem", [
    (lambda c: c.update(shrink=0), "shrink"),
    (lambda c: c["points"].update(nope=[]), "nope"),
    (lambda c: c["points"]["sdpa"].append([1.0, 2.0]), "7 numbers"),
    (lambda c: c["points"]["sdpa"].append([1.0, 2.0, 3.0, 128, False, False, 5.0]), "over e"),
    (lambda c: c["points"]["sdpa"].append([1.0, 2.0, 3.0, "128", False, False, 0.1]), "head dim"),
])
def test_a_damaged_correction_is_refused_with_the_reason(damage, problem):
    rows = [(work_of(_signature(2, 24, n, n, 128)), 0.02) for n in (2048, 4096)]
    data = CostModel("sm90", "test", SMS, {"sdpa": SDPA}, correction=select({"sdpa": rows})).to_json()
    damage(data["correction"])
    with pytest.raises(InvalidCostModel, match=problem):
        parse(data, registry.names())


def test_margins_by_call_length_and_host_path():
    model = CostModel("sm90", "test", SMS, {"sdpa": SDPA, "flash4": FA4})
    assert model.margin_for(100.0) == DEFAULT_MARGIN and model.margin_for(5000.0) == DEFAULT_LONG_MARGIN
    assert model.margin_for(5000.0, host_bound=True) == HOST_BOUND_MARGIN
    # FA4's host path decides a 1024-token call: it needs HOST_BOUND_MARGIN however fast it is predicted.
    short = _signature(2, 10, 1024, 1024, 64)
    assert model.host_bound("flash4", short) and not model.host_bound("flash4", _signature(2, 24, 16384, 16384))
    predicted = {"sdpa": 200.0, "flash4": 180.0}
    margins = model.margins(short, predicted)
    assert margins["flash4"] == HOST_BOUND_MARGIN
    assert auto_order(predicted, margins) == ["sdpa"]
    # A long GPU-bound call moves off SDPA for a 2% predicted gain (over the 1% long margin) ...
    long = _signature(2, 24, 16384, 16384)
    predicted = {"sdpa": 5000.0, "flash4": 4900.0}
    assert auto_order(predicted, model.margins(long, predicted)) == ["flash4", "sdpa"]
    # ... a short one does not (the 3% margin).
    assert auto_order({"sdpa": 200.0, "flash4": 196.0}, DEFAULT_MARGIN) == ["sdpa"]
