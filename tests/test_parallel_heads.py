"""Head-parallel attention's split and gather logic with CPU "devices": every ComfyUI
call form, GQA, masks and scales against a float64 reference; the priority after
`head_parallel` serving each share; precision requests reaching the shares; small calls
kept local by the cost model; a failing device dropping out once; a busy group; the run
summary's per-device shares."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from attention import Backend, Dispatcher, registry
from attention.backend import BHND
from attention.constraints import Exactness
from attention.parallel import heads
from attention.parallel.cost import CostModel, EvenSplit
from attention.priority import AUTO_TABLE
from library_support import reference_attention, sdpa_kernel

B, NQ, NK, D = 2, 19, 11, 8


@pytest.fixture(autouse=True)
def _fresh_group():
    yield
    heads.configure()  # the group the environment gives


def make(skip_reshape: bool, heads_q: int, heads_kv: int, seed: int = 0, dim_v: int = D):
    g = torch.Generator().manual_seed(seed)
    if skip_reshape:
        return (torch.randn(B, heads_q, NQ, D, generator=g), torch.randn(B, heads_kv, NK, D, generator=g),
                torch.randn(B, heads_kv, NK, dim_v, generator=g))
    return (torch.randn(B, NQ, heads_q * D, generator=g), torch.randn(B, NK, heads_kv * D, generator=g),
            torch.randn(B, NK, heads_kv * dim_v, generator=g))


def cpu_group(count: int, policy=None) -> heads.HeadGroup:
    return heads.configure(",".join(["cpu"] * count), policy=policy or EvenSplit())


@pytest.mark.parametrize("devices", [2, 3, 4])
@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
@pytest.mark.parametrize("heads_q,heads_kv", [(5, 5), (6, 3), (8, 2)])
def test_split_matches_float64(devices, skip_reshape, skip_output_reshape, heads_q, heads_kv):
    group = cpu_group(devices)
    q, k, v = make(skip_reshape, heads_q, heads_kv, seed=devices)
    form = dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    dispatcher = Dispatcher("head_parallel > sdpa_math", strict=True)  # the group counts live dispatchers' calls
    out = dispatcher(q, k, v, heads_q, **form)
    ref = reference_attention(q, k, v, heads_q, **form)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    summary = group.run_summary()
    assert summary["split_calls"] == 1
    used = min(devices, heads_kv)  # a key head and its query heads travel together
    assert len(summary["per_device"]) == used
    assert sum(d["heads"] for d in summary["per_device"]) == heads_q


def test_flat_output_is_a_free_view_of_the_gathered_tensor():
    cpu_group(2)
    q, k, v = make(False, 4, 4)
    out = Dispatcher("head_parallel > sdpa", strict=True)(q, k, v, 4)
    assert out.is_contiguous() and out.shape == (B, NQ, 4 * D)


def test_head_dim_of_v_may_differ():
    cpu_group(3)
    q, k, v = make(True, 6, 6, dim_v=5)
    out = Dispatcher("head_parallel > sdpa", strict=True)(q, k, v, 6, skip_reshape=True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 6, skip_reshape=True), atol=2e-6, rtol=1e-5)


def _masks(heads_q: int):
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(B, NQ, NK, generator=g) > 0.3
    keep[..., 0] = True
    return {
        "additive_2d": torch.randn(NQ, NK, generator=g),
        "additive_3d": torch.randn(B, NQ, NK, generator=g),
        "additive_per_head": torch.randn(B, heads_q, NQ, NK, generator=g),
        "key_padding": torch.randn(1, 1, 1, NK, generator=g),
        "bool_3d": keep,
        "bool_per_head": keep[:, None].expand(B, heads_q, NQ, NK).clone(),
        "integer": keep.long(),
    }


@pytest.mark.parametrize("name", list(_masks(6)))
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_masks_follow_their_heads(name, skip_reshape):
    cpu_group(3)
    mask = _masks(6)[name]
    q, k, v = make(skip_reshape, 6, 3, seed=5)
    out = Dispatcher("head_parallel > sdpa", strict=True)(q, k, v, 6, mask, skip_reshape=skip_reshape)
    ref = reference_attention(q, k, v, 6, mask, skip_reshape=skip_reshape)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


def test_custom_scale_reaches_every_share():
    cpu_group(2)
    q, k, v = make(True, 4, 4)
    out = Dispatcher("head_parallel > sdpa", strict=True)(q, k, v, 4, skip_reshape=True, scale=0.3)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 4, skip_reshape=True, scale=0.3),
                               atol=2e-6, rtol=1e-5)


def test_each_share_is_served_by_the_priority_after_head_parallel():
    group = cpu_group(2)
    q, k, v = make(True, 4, 4)
    dispatcher = Dispatcher("head_parallel > sdpa_math > sdpa", strict=True)
    dispatcher(q, k, v, 4, skip_reshape=True)
    assert group.run_summary()["served"] == {"cpu": {"sdpa_math": 2}}


def test_without_names_after_it_each_share_uses_auto():
    group = cpu_group(2)
    q, k, v = make(True, 4, 4)
    dispatcher = Dispatcher("head_parallel", strict=True)
    dispatcher(q, k, v, 4, skip_reshape=True)
    assert group.run_summary()["served"] == {"cpu": {"sdpa": 2}}


def test_precision_requests_reach_the_shares(extra_backend):
    """A quantized backend after head_parallel must not serve shares of a call that asked
    for low_precision_attention=False."""
    extra_backend(Backend(name="fake_int8", family="test", description="", quantized=True, layouts=(BHND,),
                          constraints=(Exactness(True),), load=lambda: sdpa_kernel))
    group = cpu_group(2)
    q, k, v = make(True, 4, 4)
    dispatcher = Dispatcher("head_parallel > fake_int8 > sdpa_math")
    dispatcher(q, k, v, 4, skip_reshape=True, low_precision=False)
    assert group.run_summary()["served"] == {"cpu": {"sdpa_math": 2}}
    dispatcher(q, k, v, 4, skip_reshape=True)
    assert group.run_summary()["served"]["cpu"]["fake_int8"] == 2


def test_cost_model_keeps_calls_on_one_processor_local():
    """CPU "devices" share one processor: no split can gain, so the call stays local."""
    group = heads.configure("cpu,cpu", policy=CostModel())
    q, k, v = make(True, 4, 4)
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)
    out = dispatcher(q, k, v, 4, skip_reshape=True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 4, skip_reshape=True), atol=2e-6, rtol=1e-5)
    summary = group.run_summary()
    assert summary["split_calls"] == 0 and summary["local_calls"] == 1
    assert summary["signatures"][0]["decision"].startswith("too small to gain")
    assert summary["served"] == {"cpu": {"sdpa": 1}}


def test_a_failing_device_drops_out_once_and_the_call_is_served(extra_backend, caplog):
    """Shares of one head fail on `cpu:0`; it drops out (one warning), the call is
    decided again without it and served whole on the home device."""
    def picky(q, k, v, mask, scale, layout):
        if q.shape[1] == 1:
            raise RuntimeError("cannot serve a single head")
        return sdpa_kernel(q, k, v, mask, scale, layout)
    extra_backend(Backend(name="picky", family="test", description="", quantized=False, layouts=(BHND,),
                          constraints=(), load=lambda: picky))
    group = heads.configure(["cpu", "cpu:0"], policy=EvenSplit())
    q, k, v = make(True, 3, 3)
    dispatcher = Dispatcher("head_parallel > picky", strict=True)
    with caplog.at_level(logging.WARNING, logger="attention.parallel.heads"):
        first = dispatcher(q, k, v, 3, skip_reshape=True)
        second = dispatcher(q, k, v, 3, skip_reshape=True)
    ref = reference_attention(q, k, v, 3, skip_reshape=True)
    torch.testing.assert_close(first.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(second.double(), ref, atol=2e-6, rtol=1e-5)
    dropped = [r for r in caplog.records if "dropped out of head_parallel" in r.getMessage()]
    assert len(dropped) == 1 and "cpu:0" in dropped[0].getMessage()
    assert list(group.dropped()) == ["cpu:0"] and "single head" in group.dropped()["cpu:0"]
    assert group.run_summary()["local_calls"] == 2
    group.readmit()
    assert group.dropped() == {}


def test_a_call_finding_the_group_busy_runs_on_its_own_device():
    group = cpu_group(2)
    q, k, v = make(True, 4, 4)
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)
    with group.lock:  # another thread's split in flight
        out = dispatcher(q, k, v, 4, skip_reshape=True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 4, skip_reshape=True), atol=2e-6, rtol=1e-5)
    summary = group.run_summary()
    assert summary["busy_calls"] == 1 and summary["split_calls"] == 0


def test_threads_share_a_group_safely():
    group = cpu_group(2)
    q, k, v = make(True, 4, 4)
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)
    ref = reference_attention(q, k, v, 4, skip_reshape=True)
    errors = []

    def worker():
        for _ in range(20):
            out = dispatcher(q, k, v, 4, skip_reshape=True)
            if not torch.allclose(out.double(), ref, atol=2e-6, rtol=1e-5):
                errors.append("wrong output")
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    summary = group.run_summary()
    assert summary["split_calls"] + summary["busy_calls"] == 60


def test_run_summary_shares_and_reset():
    group = cpu_group(3)
    q, k, v = make(True, 5, 5)
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)
    for _ in range(2):
        dispatcher(q, k, v, 5, skip_reshape=True)
    summary = group.run_summary()
    assert [(d["device"], d["calls"], d["heads"], d["work_share"]) for d in summary["per_device"]] == [
        ("cpu", 2, 4, 0.4), ("cpu#2", 2, 4, 0.4), ("cpu#3", 2, 2, 0.2)]
    row = summary["signatures"][0]
    assert row["split"] and row["calls"] == 2 and row["prediction"]["heads"] == [2, 2, 1]
    group.begin_run()
    assert group.run_summary()["split_calls"] == 0 and group.run_summary()["served"] == {}
    assert group.end_run()["signatures"] == []


@pytest.mark.parametrize("spec,expected", [
    ("0,1", ["cuda:0", "cuda:1"]), ("cuda:0, cuda:2", ["cuda:0", "cuda:2"]), ("cpu,cpu", ["cpu", "cpu"]),
    ([0, "cuda:1"], ["cuda:0", "cuda:1"]), ("cuda", ["cuda:0"]), ("", [])])
def test_device_lists(spec, expected):
    assert [str(d) for d in heads.parse_devices(spec)] == expected


def test_device_list_problems_are_reasons():
    assert "is not a device" in heads.HeadGroup("gpu1").problems()[0]
    assert "needs two or more" in heads.HeadGroup("cpu").problems()[0]
    empty = heads.HeadGroup("").problems()[0]
    assert ("the device list is empty" if torch.cuda.is_available() else "no CUDA GPU is visible") in empty
    assert any("mixes device types" in p for p in heads.HeadGroup("cpu,cuda:0").problems())
    if not torch.cuda.is_available():
        assert any("cuda:1 is not visible" in p for p in heads.HeadGroup("0,1").problems())


def test_environment_names_the_devices_and_the_policy(monkeypatch):
    monkeypatch.setenv(heads.ENV_DEVICES, "cpu,cpu,cpu")
    monkeypatch.setenv(heads.ENV_SPLIT, "even")
    group = heads.configure()
    assert [str(d) for d in group.devices] == ["cpu"] * 3 and isinstance(group.policy, EvenSplit)
    assert registry.get("head_parallel").availability().available
    monkeypatch.setenv(heads.ENV_SPLIT, "fastest")
    with pytest.raises(ValueError, match="choose one of cost, even"):
        heads.configure()


def test_unavailable_without_a_group_and_never_chosen_by_auto():
    heads.configure("")
    backend = registry.get("head_parallel")
    assert not backend.availability().available
    assert not backend.tunable
    assert all(entry.backend != "head_parallel" for entries in AUTO_TABLE.values() for entry in entries)
    q, k, v = make(True, 4, 4)
    dispatcher = Dispatcher("head_parallel > sdpa")
    dispatcher(q, k, v, 4, skip_reshape=True)
    assert dispatcher.plans()[0].name == "sdpa"


def test_status_lists_gpus_links_the_group_and_the_process_group():
    from attention.parallel.status import parallel_status, render
    heads.configure("cpu,cpu")
    status = parallel_status()
    assert status["head_parallel"]["devices"] == ["cpu", "cpu"] and status["head_parallel"]["problems"] == []
    assert status["process_group"] == {"initialised": False}
    if not torch.cuda.is_available():
        assert status["gpus"] == [] and status["links"] == [] and status["nvidia_smi_topology"] is None
    assert "  head_parallel group: cpu, cpu (ready)" in render(status)


def test_inside_torch_compile_the_split_runs_when_the_graph_runs():
    """Under compile a call is one opaque op (attention/compiled.py): the split happens
    when the graph runs, with no graph break, and every call is split."""
    import torch._dynamo
    import torch._dynamo.utils
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    group = cpu_group(2)
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)

    def block(q, k, v):
        return dispatcher(q, k, v, 4, skip_reshape=True, skip_output_reshape=True) * 2

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    try:
        for seed in range(3):
            q, k, v = make(True, 4, 4, seed=seed)
            torch.testing.assert_close(compiled(q, k, v).double(), 2 * reference_attention(q, k, v, 4, skip_reshape=True,
                                       skip_output_reshape=True), atol=4e-6, rtol=1e-5)
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
        assert group.run_summary()["split_calls"] == 3
    finally:
        torch._dynamo.reset()
