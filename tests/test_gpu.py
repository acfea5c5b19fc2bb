"""GPU suite (marker `gpu`; skipped without CUDA): every backend that can run on this
machine, in every ComfyUI call form, against an fp32 reference; masks for the backends
that take them; inputs left unchanged (sageattention 1.x's in-place key smoothing is
guarded); no non-finite values on inputs with realistic K/V outliers.

Run on the device machine: `python -m pytest -m gpu tests/test_gpu.py -rA`.
"""

from __future__ import annotations

import pytest
import torch

from attention import Dispatcher, registry
from attention.call import HEADS_FIRST
from attention.constraints import Masks
from attention.shapes import ModelShape

pytestmark = pytest.mark.gpu

# Exact kernels in bf16 land near 1e-3 relative L1 (bf16 rounding of the output);
# INT8/FP8 kernels within a few 1e-3 on these inputs (reference measurements).
EXACT_REL_L1 = 0.01
QUANTIZED_REL_L1 = 0.05

SHAPES = [
    ModelShape("unet_self", "UNet self-attn", 2, 10, 1024, 1024, 64, "B,N,H*D"),
    ModelShape("unet_cross", "UNet cross-attn", 2, 10, 1024, 77, 64, "B,N,H*D"),
    ModelShape("dit", "DiT joint attn", 1, 8, 2304, 2304, 128),
    ModelShape("dit96", "Lumina-like D=96", 1, 8, 1024, 1024, 96),
]


def _backend_names() -> list[str]:
    return registry.names()


def _inputs(shape: ModelShape, layout_out_heads_first: bool, seed: int):
    from attention.bench.inputs import make_qkv
    q, k, v = make_qkv(shape, torch.device("cuda"), torch.bfloat16, seed=seed)
    return q, k, v, dict(skip_reshape=shape.layout == HEADS_FIRST, skip_output_reshape=layout_out_heads_first)


def _to_bhnd(out: torch.Tensor, shape: ModelShape, heads_first_out: bool) -> torch.Tensor:
    if heads_first_out:
        return out.float()
    return out.view(out.shape[0], out.shape[1], shape.heads, -1).transpose(1, 2).float()


def _reference(q, k, v, shape: ModelShape, mask=None) -> torch.Tensor:
    def bhnd(t):
        if shape.layout != HEADS_FIRST:
            t = t.view(t.shape[0], t.shape[1], shape.heads, -1).transpose(1, 2)
        return t.float()
    return torch.nn.functional.scaled_dot_product_attention(bhnd(q), bhnd(k), bhnd(v), attn_mask=mask)


def _rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().sum() / ref.abs().sum()).item()


@pytest.mark.parametrize("name", _backend_names())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.key for s in SHAPES])
@pytest.mark.parametrize("heads_first_out", [False, True], ids=["out_flat", "out_bhnd"])
def test_backend_matches_reference(name, shape, heads_first_out):
    backend = registry.get(name)
    availability = backend.availability()
    if not availability.available:
        pytest.skip(f"{name} not available here: {'; '.join(availability.reasons)}")
    q, k, v, form = _inputs(shape, heads_first_out, seed=hash((name, shape.key)) % 1000)
    dispatcher = Dispatcher(name, strict=True)
    call_reasons = backend.call_reasons(__import__("attention").describe_call(q, k, v, shape.heads, **form))
    if call_reasons:
        pytest.skip(f"{name} cannot serve {shape.label}: {'; '.join(call_reasons)}")
    before = [t.clone() for t in (q, k, v)]
    out = dispatcher(q, k, v, shape.heads, **form)
    torch.cuda.synchronize()
    for original, now in zip(before, (q, k, v)):
        assert torch.equal(original, now), f"{name} modified its inputs"
    assert torch.isfinite(out).all(), f"{name} produced non-finite values"
    got = _to_bhnd(out, shape, heads_first_out)
    error = _rel_l1(got, _reference(q, k, v, shape))
    budget = QUANTIZED_REL_L1 if backend.quantized else EXACT_REL_L1
    assert error < budget, f"{name} relative L1 {error:.4g} on {shape.label}"


MASKS = {
    "additive_2d": lambda b, h, nq, nk: torch.randn(nq, nk, device="cuda", dtype=torch.bfloat16),
    "additive_3d": lambda b, h, nq, nk: torch.randn(b, nq, nk, device="cuda", dtype=torch.bfloat16),
    "additive_4d_heads": lambda b, h, nq, nk: torch.randn(b, h, nq, nk, device="cuda", dtype=torch.bfloat16),
    "key_padding_bool": lambda b, h, nq, nk: torch.arange(nk, device="cuda").view(1, 1, 1, nk) < nk - 13,
    "bool_3d": lambda b, h, nq, nk: torch.rand(b, nq, nk, device="cuda") > 0.2,
}


def _mask_capable() -> list[str]:
    return [b.name for b in registry.all_backends() if any(isinstance(c, Masks) for c in b.constraints)]


@pytest.mark.parametrize("name", _mask_capable())
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_masked_calls(name, mask_name):
    backend = registry.get(name)
    availability = backend.availability()
    if not availability.available:
        pytest.skip(f"{name} not available here: {'; '.join(availability.reasons)}")
    shape = SHAPES[1] if "padding" in mask_name else SHAPES[0]
    q, k, v, form = _inputs(shape, False, seed=7)
    mask = MASKS[mask_name](shape.batch, shape.heads, shape.seq_q, shape.seq_k)
    if mask.dtype == torch.bool:
        mask[..., 0] = True
    out = Dispatcher(name, strict=True)(q, k, v, shape.heads, mask, **form)
    canonical = mask if mask.ndim == 4 else (mask[None, None] if mask.ndim == 2 else mask[:, None])
    ref = _reference(q, k, v, shape, canonical if canonical.dtype == torch.bool else canonical.float())
    error = _rel_l1(_to_bhnd(out, shape, False), ref)
    budget = QUANTIZED_REL_L1 if backend.quantized else EXACT_REL_L1
    assert torch.isfinite(out).all()
    assert error < budget, f"{name} relative L1 {error:.4g} with {mask_name}"


def test_auto_serves_every_shape_and_never_drops_a_mask():
    dispatcher = Dispatcher("auto")
    shape = SHAPES[2]
    q, k, v, form = _inputs(shape, False, seed=3)
    mask = torch.zeros(1, 1, 1, shape.seq_k, device="cuda", dtype=torch.bfloat16)
    mask[..., -100:] = float("-inf")
    out = dispatcher(q, k, v, shape.heads, mask, **form)
    ref = _reference(q, k, v, shape, mask.float())
    assert _rel_l1(_to_bhnd(out, shape, False), ref) < EXACT_REL_L1
    served = dispatcher.counters().served
    assert set(served) <= {b.name for b in registry.all_backends() if not b.quantized} | {
        b.name for b in registry.all_backends() if any(isinstance(c, Masks) for c in b.constraints)}


def test_auto_tuned_chooses_inside_the_budget_and_reuses_it(tmp_path):
    """On the GPU: every eligible kernel measured on real tensors, the choice within the
    error budget against the fp32 reference, saved, and reused by a new tuner."""
    from attention.tuning import DEFAULT_BUDGET, MEASURED, SAVED, Tuner
    from attention.tuning_store import forget_loaded_stores

    path = str(tmp_path / "tuning.json")
    for shape in SHAPES[:3]:
        q, k, v, args = _inputs(shape, True, seed=3)
        dispatcher = Dispatcher("auto_tuned", tuner=Tuner(path))
        out = dispatcher(q, k, v, shape.heads, **args)
        decision = dispatcher.plans()[-1].tuning
        assert decision is not None and decision.source == MEASURED, shape.key
        assert decision.candidates[decision.backend]["verdict"] == "chosen"
        assert _rel_l1(out.float(), _reference(q, k, v, shape)) <= DEFAULT_BUDGET.rel_l1, shape.key
        assert torch.isfinite(out).all()
        dispatcher.tuner.flush()  # the end of a run: the decision is written
    forget_loaded_stores()
    again = Dispatcher("auto_tuned", tuner=Tuner(path))
    q, k, v, args = _inputs(SHAPES[2], True, seed=3)
    again(q, k, v, SHAPES[2].heads, **args)
    assert again.plans()[-1].tuning.source == SAVED


@pytest.mark.parametrize("name", [n for n in _backend_names() if n not in ("flex", "sdpa_math")])
def test_backend_inside_torch_compile(name):
    """Each kernel under torch.compile (inductor): one opaque op, no graph break, the
    eager output, every call counted."""
    import torch._dynamo
    import torch._dynamo.utils

    backend = registry.get(name)
    if not backend.availability().available:
        pytest.skip(f"{name} not available here: {'; '.join(backend.availability().reasons)}")
    shape = SHAPES[2]
    q, k, v, form = _inputs(shape, False, seed=11)
    if backend.call_reasons(__import__("attention").describe_call(q, k, v, shape.heads, **form)):
        pytest.skip(f"{name} cannot serve {shape.label}")
    dispatcher = Dispatcher(name, strict=True)

    def block(q, k, v):
        # Tensor work on both sides of the call, for inductor to fuse around the op.
        return torch.nn.functional.silu(dispatcher(q * 0.5, k, v, shape.heads, **form)) + 1.0

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        eager = block(q, k, v)
        outs = [compiled(q, k, v) for _ in range(3)]
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for out in outs:
        assert _rel_l1(out.float(), eager.float()) < 1e-3, name
    assert dispatcher.counters().served == {name: 4}
