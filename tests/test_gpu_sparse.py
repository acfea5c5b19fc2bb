"""GPU suite for the sparse backends (marker `gpu`; skipped without CUDA or without the
kernel): against a float64 reference on the smallest shape they serve, with every key
block kept (the kernel's own precision) and at their default settings (the error the
quality monitor must see), on inputs with video-like locality.

Run on the device machine: `python -m pytest -m gpu tests/test_gpu_sparse.py -rA`.
"""

from __future__ import annotations

import pytest
import torch

from attention import Dispatcher, registry
from attention.backends.sparse import MIN_TOKENS
from attention.bench.inputs import video_qkv
from attention.quality import QualityMonitor, QualityPolicy, row_indices
from attention.sparsity import SolSettings, SpargeSettings

pytestmark = pytest.mark.gpu

GRID = (12, 32, 32)  # 12288 tokens: the shortest call a sparse backend serves
HEADS, DIM = 4, 128
# INT8 Q·K and FP8/INT8 P·V inside both kernels, as for the quantized dense kernels.
QUANTIZED_REL_L1 = 0.05
FORM = {"skip_reshape": True, "skip_output_reshape": True}


def _available(name: str) -> None:
    availability = registry.get(name).availability()
    if not availability.available:
        pytest.skip(f"{name} not available here: {'; '.join(availability.reasons)}")


def _float64_rows(q, k, v, rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, rows].double(), k.double(), v.double())


def _rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().sum() / ref.abs().sum()).item()


def _every_block(name: str, tokens: int):
    return SolSettings(text_tokens=tokens, extra_tokens=0) if name == "sol" else SpargeSettings(topk=1.0)


@pytest.mark.parametrize("name", ["sol", "sparge"])
def test_with_every_block_kept_a_sparse_kernel_is_as_close_as_a_quantized_one(name):
    _available(name)
    q, k, v = video_qkv(1, HEADS, DIM, GRID, torch.device("cuda"), torch.bfloat16, seed=1)
    assert q.shape[2] == MIN_TOKENS
    before = [t.clone() for t in (q, k, v)]
    out = Dispatcher([name], strict=True, settings={name: _every_block(name, q.shape[2])})(q, k, v, HEADS, **FORM)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v))), f"{name} modified its inputs"
    assert torch.isfinite(out).all()
    assert out.dtype == q.dtype and out.shape == q.shape
    rows = row_indices(q.shape[2], 1024, q.device)
    error = _rel_l1(out[:, :, rows], _float64_rows(q, k, v, rows))
    assert error < QUANTIZED_REL_L1, f"{name} with every block kept: relative L1 {error:.4g}"


def test_sparge_serves_head_dim_64_in_fp16_with_every_block_kept():
    _available("sparge")
    q, k, v = video_qkv(2, HEADS, 64, GRID, torch.device("cuda"), torch.float16, seed=3)
    out = Dispatcher(["sparge"], strict=True, settings={"sparge": SpargeSettings(topk=1.0)})(q, k, v, HEADS, **FORM)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    rows = row_indices(q.shape[2], 1024, q.device)
    error = _rel_l1(out[:, :, rows], _float64_rows(q, k, v, rows))
    assert error < QUANTIZED_REL_L1, f"sparge, head dim 64, fp16: relative L1 {error:.4g}"


@pytest.mark.parametrize("settings", [SpargeSettings(topk=0.5), SpargeSettings(topk=0.2),
                                      SpargeSettings(cdfthreshd=0.98, simthreshd1=0.6), SpargeSettings(cdfthreshd=0.9)],
                         ids=lambda settings: settings.describe())
def test_sparge_selections_stay_near_the_float64_reference(settings):
    # Both of SpargeAttention's selections (top-k and softmax mass) through the pack's
    # keyword arguments: the library asserts that exactly one of them is set.
    _available("sparge")
    q, k, v = video_qkv(1, HEADS, DIM, GRID, torch.device("cuda"), torch.bfloat16, seed=4)
    out = Dispatcher(["sparge"], strict=True, settings={"sparge": settings})(q, k, v, HEADS, **FORM)
    assert torch.isfinite(out).all()
    rows = row_indices(q.shape[2], 1024, q.device)
    error = _rel_l1(out[:, :, rows], _float64_rows(q, k, v, rows))
    print(f"sparge {settings.describe()}: relative L1 {error:.4f}")
    assert error < 1.0, f"sparge {settings.describe()} is not attention any more: relative L1 {error:.3f}"


@pytest.mark.parametrize("name", ["sol", "sparge"])
def test_the_monitor_measures_the_error_a_float64_reference_sees(name):
    _available(name)
    q, k, v = video_qkv(1, HEADS, DIM, GRID, torch.device("cuda"), torch.bfloat16, seed=2)
    monitor = QualityMonitor(QualityPolicy(budget_rel_l1=10.0))  # measure, never demote
    dispatcher = Dispatcher([name], strict=True, settings={name: registry.get(name).default_settings},
                            monitor=monitor)
    out = dispatcher(q, k, v, HEADS, **FORM)
    assert torch.isfinite(out).all()
    (row,) = monitor.summary()["signatures"]
    measured = row["checks"][0]["max_rel_l1"]  # the first call is sampled
    rows = row_indices(q.shape[2], monitor.policy.rows, q.device)
    own = _rel_l1(out[:, :, rows], _float64_rows(q, k, v, rows))
    print(f"{name} default settings ({row['settings']}): relative L1 {own:.4f}, monitor {measured:.4f}")
    # The monitor's reference is SDPA in bf16: within its rounding of the float64 one.
    assert abs(measured - own) < 0.005 + 0.02 * own
    assert own < 1.0, f"{name} at its defaults is not attention any more: relative L1 {own:.3f}"
