"""GPU suite for head_parallel (marker `gpu`; skipped without CUDA): the CUDA paths the
CPU tests cannot reach. With one GPU, the GPU listed twice runs a lane on its own
streams (same memory) and, with staging "always", through pinned host memory; with two
or more GPUs, peer and staged lanes between GPUs 0 and 1.

Checked: the split output against a single-GPU run of the same backend (per-head
attention is the same computation, so within bf16 rounding at most), the caller's
stream (a call issued on a side stream is complete once that stream is), no host
synchronisation per call (CUDA sync debug mode raises on one), inputs unchanged,
lane timings in the summary, memory on the other GPU released, and a failing GPU
dropping out.

Run on the device machine: `python -m pytest -m gpu tests/test_gpu_parallel.py -rA`.
"""

from __future__ import annotations

import pytest
import torch

from attention import Backend, Dispatcher
from attention.backend import BHND
from attention.measure import errors
from attention.parallel import heads
from attention.parallel.cost import EvenSplit

pytestmark = pytest.mark.gpu

# Per-head attention computed on one GPU or on several: the same kernel on the same
# head, so equal, or within the last bf16 bit where a kernel picks its tiling by size.
SAME_RESULT_REL_L1 = 1e-3


def _groups() -> list:
    groups = [pytest.param(("cuda:0", "cuda:0"), "auto", id="one-gpu-twice"),
              pytest.param(("cuda:0", "cuda:0"), "always", id="one-gpu-twice-staged")]
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        groups += [pytest.param(("cuda:0", "cuda:1"), "auto", id="two-gpus"),
                   pytest.param(("cuda:0", "cuda:1"), "always", id="two-gpus-staged")]
    return groups


@pytest.fixture(autouse=True)
def _fresh_group():
    yield
    heads.configure()  # the group the environment gives


def _inputs(flat: bool, heads_q: int = 8, heads_kv: int = 8, seq: int = 2048, batch: int = 2, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, heads_q, seq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, heads_kv, seq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, heads_kv, seq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    if flat:
        return tuple(t.transpose(1, 2).reshape(batch, seq, -1) for t in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("devices,staging", _groups())
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "heads_first"])
@pytest.mark.parametrize("heads_kv", [8, 2], ids=["mha", "gqa"])
def test_split_matches_one_gpu(devices, staging, flat, heads_kv):
    group = heads.configure(devices, policy=EvenSplit(), staging=staging)
    q, k, v = _inputs(flat, heads_kv=heads_kv)
    form = dict(skip_reshape=not flat, skip_output_reshape=not flat)
    single = Dispatcher("sdpa", strict=True)(q, k, v, 8, **form)
    before = [t.clone() for t in (q, k, v)]
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)
    out = dispatcher(q, k, v, 8, **form)
    torch.cuda.synchronize()
    assert out.shape == single.shape and out.dtype == single.dtype
    assert errors(out, single)["rel_l1"] < SAME_RESULT_REL_L1
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))
    summary = group.run_summary()
    assert summary["split_calls"] == 1
    remote = [d for d in summary["per_device"] if d["mib_in"] > 0 or d["device"].endswith("#2")]
    assert remote and remote[0]["transfer_ms_per_call"] is not None


@pytest.mark.parametrize("devices,staging", _groups())
def test_per_head_mask_travels_with_its_heads(devices, staging):
    heads.configure(devices, policy=EvenSplit(), staging=staging)
    q, k, v = _inputs(False, seq=512)
    mask = torch.randn(2, 8, 512, 512, device="cuda", dtype=torch.bfloat16)
    single = Dispatcher("sdpa", strict=True)(q, k, v, 8, mask, skip_reshape=True, skip_output_reshape=True)
    out = Dispatcher("head_parallel > sdpa", strict=True)(q, k, v, 8, mask, skip_reshape=True,
                                                          skip_output_reshape=True)
    assert errors(out, single)["rel_l1"] < SAME_RESULT_REL_L1


@pytest.mark.parametrize("devices,staging", _groups())
def test_no_host_sync_per_call_and_the_callers_stream_is_honoured(devices, staging):
    heads.configure(devices, policy=EvenSplit(), staging=staging)
    q, k, v = _inputs(False)
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)
    single = Dispatcher("sdpa", strict=True)(q, k, v, 8, skip_reshape=True, skip_output_reshape=True)
    dispatcher(q, k, v, 8, skip_reshape=True, skip_output_reshape=True)  # plans, measures the link (syncs)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            outs = [dispatcher(q, k, v, 8, skip_reshape=True, skip_output_reshape=True) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side.synchronize()  # only the caller's stream: the lanes must be inside it
    for out in outs:
        assert errors(out, single)["rel_l1"] < SAME_RESULT_REL_L1


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_memory_on_the_other_gpu_is_bounded_and_released():
    group = heads.configure(("cuda:0", "cuda:1"), policy=EvenSplit())
    q, k, v = _inputs(False, seq=8192)
    dispatcher = Dispatcher("head_parallel > sdpa", strict=True)
    dispatcher(q, k, v, 8, skip_reshape=True, skip_output_reshape=True)
    torch.cuda.synchronize()
    other = torch.device("cuda", 1)
    allocated = torch.cuda.memory_allocated(other)
    torch.cuda.reset_peak_memory_stats(other)
    for _ in range(5):
        dispatcher(q, k, v, 8, skip_reshape=True, skip_output_reshape=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(other) == allocated  # nothing held between calls
    # One call's share at a time: its q, k, v and output (4 heads of 8), plus the kernel's workspace.
    share_bytes = 4 * q[:, 4:].numel() * q.element_size()
    assert torch.cuda.max_memory_allocated(other) - allocated <= 1.5 * share_bytes
    group.end_run()
    assert torch.cuda.memory_reserved(other) <= torch.cuda.memory_allocated(other) + (64 << 20)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_failing_gpu_drops_out(extra_backend):
    def only_on_gpu0(q, k, v, mask, scale, layout):
        if q.device.index != 0:
            raise RuntimeError("this kernel is broken on cuda:1")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    extra_backend(Backend(name="gpu0_only", family="test", description="", quantized=False, layouts=(BHND,),
                          constraints=(), load=lambda: only_on_gpu0))
    group = heads.configure(("cuda:0", "cuda:1"), policy=EvenSplit())
    q, k, v = _inputs(False)
    single = Dispatcher("sdpa", strict=True)(q, k, v, 8, skip_reshape=True, skip_output_reshape=True)
    out = Dispatcher("head_parallel > gpu0_only", strict=True)(q, k, v, 8, skip_reshape=True, skip_output_reshape=True)
    assert errors(out, single)["rel_l1"] < SAME_RESULT_REL_L1
    assert "cuda:1" in group.dropped() and "broken on cuda:1" in group.dropped()["cuda:1"]
