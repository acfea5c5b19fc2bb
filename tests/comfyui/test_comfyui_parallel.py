"""head_parallel on real ComfyUI models with CPU "devices": every call of the run is
split across the group and the sampled output equals a single-device run; the run
report carries the group's summary; with the cost model the CPU devices keep every call
local (one processor cannot gain)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def parallel(pack):
    heads = pack.attention.parallel.heads
    yield heads, pack.attention.parallel.cost
    heads.configure()  # the group the environment gives


@pytest.mark.parametrize("model", ["flux", "sd15"])
def test_split_calls_match_a_single_device_run(pack, tiny, patch, parallel, model, request):
    heads, cost = parallel
    patcher = request.getfixturevalue(model)
    group = heads.configure("cpu,cpu", policy=cost.EvenSplit())
    single, _ = patch(patcher, "sdpa")
    reference = tiny.sample(single)
    patched, state = patch(patcher, ["head_parallel", "sdpa"])
    out = tiny.sample(patched)

    report = state.last_report
    calls = report["total_calls"]
    assert calls > 0 and report["served"] == {"head_parallel": calls} and report["fallbacks"] == []
    split = report["head_parallel"]
    assert split["split_calls"] == calls and split["local_calls"] == 0 and split["dropped"] == {}
    # Two heads per call on both tiny models: one on each "device".
    assert [(d["device"], d["calls"], d["work_share"]) for d in split["per_device"]] == [
        ("cpu", calls, 0.5), ("cpu#2", calls, 0.5)]
    assert split["served"] == {"cpu": {"sdpa": 2 * calls}}
    assert "head_parallel: " in pack.nodes.report.summary(report)
    # Each head's attention is the same computation on one device or two.
    assert torch.equal(out, reference)
    assert group is heads.default_group()


def test_cost_model_keeps_cpu_calls_local(pack, tiny, flux, patch, parallel):
    heads, cost = parallel
    heads.configure("cpu,cpu", policy=cost.CostModel())
    reference = tiny.sample(flux)
    patched, state = patch(flux, ["head_parallel", "sdpa"])
    out = tiny.sample(patched)
    split = state.last_report["head_parallel"]
    assert split["split_calls"] == 0 and split["local_calls"] == state.last_report["total_calls"]
    assert all(row["decision"].startswith("too small to gain") for row in split["signatures"])
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_without_a_group_head_parallel_falls_back_with_its_reason(pack, tiny, flux, patch, parallel):
    heads, _ = parallel
    heads.configure("")
    patched, state = patch(flux, ["head_parallel", "auto"])  # what "fall back" makes of it
    tiny.sample(patched)
    report = state.last_report
    assert report["served"] == {"sdpa": report["total_calls"]}
    assert any(f["wanted"] == "head_parallel" and "no CUDA GPU is visible" in f["reason"] for f in report["fallbacks"])
