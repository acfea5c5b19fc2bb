"""Masked calls through the dispatcher: no-op and key-padding masks served by kernels that
take no mask (dropped, keys trimmed, varlen, per row), every other mask kept on a kernel
that honours it, plans keyed by the mask's class, one device read per mask tensor per
model call, and the counters that say how each masked call was served."""

from __future__ import annotations

import pytest
import torch

from attention import Backend, Dispatcher, NoBackendError, dispatch, masks
from attention.backend import BHND, Varlen
from attention.constraints import NoMask
from mask_support import (EmulatedVarlen, additive, hunyuan_joint_mask, hunyuan_refiner_mask, keep_mask, make,
                          reference)

H, D = 3, 16


def maskless_kernel(seen: list):
    def kernel(q, k, v, mask, scale, layout):
        assert mask is None, "a mask reached a kernel that cannot honour it"
        seen.append(k.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                               enable_gqa=q.shape[1] != k.shape[1])
    return kernel


@pytest.fixture
def maskless(extra_backend):
    """A kernel without mask support (FA4-like), recording the key shapes it was handed."""
    seen: list = []
    extra_backend(Backend("maskless", "test", "no masks", False, (BHND,), (NoMask(),), lambda: maskless_kernel(seen)))
    return seen


@pytest.fixture
def maskless_varlen(extra_backend):
    emulated = EmulatedVarlen(key_lengths=True)
    extra_backend(Backend("maskless_varlen", "test", "no masks, varlen", False, (BHND,), (NoMask(),),
                          lambda: maskless_kernel([]), load_varlen=lambda: emulated.varlen))
    return emulated


def close(out, q, k, v, mask, **form):
    torch.testing.assert_close(out.double(), reference(q, k, v, H, mask, **form), atol=2e-5, rtol=1e-4)


def test_a_noop_mask_is_dropped_and_counted(maskless):
    dispatcher = Dispatcher(["maskless", "sdpa"])
    q, k, v = make(2, H, 20, 20, D, False)
    mask = torch.zeros(1, 1, 20)  # HunyuanVideo with an unpadded prompt
    for _ in range(3):
        close(dispatcher(q, k, v, H, mask), q, k, v, mask)
    counters = dispatcher.counters()
    assert counters.served == {"maskless": 3} and counters.masked == {"maskless": {"dropped": 3}}
    assert counters.fallbacks == ()  # serving without the mask is no fallback
    assert counters.to_json()["masked"] == {"maskless": {"dropped": 3}}


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_shared_key_padding_is_trimmed(maskless, skip_reshape):
    dispatcher = Dispatcher(["maskless", "sdpa"], strict=True)
    for txt_first in (True, False):
        q, k, v = make(2, H, 80, 80, D, skip_reshape)
        mask = hunyuan_joint_mask(keep_mask([5], 16), 64, txt_first)
        out = dispatcher(q, k, v, H, mask, skip_reshape=skip_reshape, skip_output_reshape=skip_reshape)
        close(out, q, k, v, mask, skip_reshape=skip_reshape, skip_output_reshape=skip_reshape)
        assert maskless[-1][2] == 69  # the kernel saw only the kept keys
    assert dispatcher.counters().masked == {"maskless": {"keys_trimmed": 2}}


def test_rows_that_differ_go_per_row_without_a_varlen_entry(maskless):
    dispatcher = Dispatcher(["maskless", "sdpa"])
    q, k, v = make(2, H, 40, 16, D, False)
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)  # LTXV cross-attention
    close(dispatcher(q, k, v, H, mask), q, k, v, mask)
    assert [shape[2] for shape in maskless] == [7, 11]
    assert dispatcher.counters().masked == {"maskless": {"per_row": 1}}


def test_rows_that_differ_use_the_varlen_entry(maskless_varlen):
    dispatcher = Dispatcher(["maskless_varlen", "sdpa"])
    q, k, v = make(2, H, 40, 16, D, False)
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    close(dispatcher(q, k, v, H, mask), q, k, v, mask)
    assert [c["kind"] for c in maskless_varlen.calls] == ["key_lengths"]
    assert dispatcher.counters().masked == {"maskless_varlen": {"varlen": 1}}


def test_rows_that_differ_keep_the_mask_on_a_kernel_that_honours_it():
    dispatcher = Dispatcher("sdpa", strict=True)
    q, k, v = make(2, H, 40, 16, D, False)
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    close(dispatcher(q, k, v, H, mask), q, k, v, mask)
    shared = additive(keep_mask([7, 7], 16)).reshape(2, 1, 1, 16)
    close(dispatcher(q, k, v, H, shared), q, k, v, shared)
    assert dispatcher.counters().masked == {"sdpa": {"kept": 1, "keys_trimmed": 1}}


def never_dropped():
    redux = torch.zeros(1, 1, 20, 20)
    redux[..., 14:] = torch.tensor(0.3).log()
    per_query = torch.zeros(2, 20, 20)
    per_query[:, :5, 17:] = float("-inf")
    per_head = torch.zeros(1, H, 1, 20)
    per_head[:, 0, :, 15:] = float("-inf")
    yield "bias", redux
    yield "per-query", per_query
    yield "causal-like", torch.ones(20, 20, dtype=torch.bool).tril()
    yield "head-varying padding", per_head


@pytest.mark.parametrize("name,mask", list(never_dropped()))
def test_masks_that_change_the_result_are_never_dropped(maskless, name, mask):
    dispatcher = Dispatcher(["maskless", "sdpa"])
    q, k, v = make(2, H, 20, 20, D, False)
    close(dispatcher(q, k, v, H, mask), q, k, v, mask)
    assert maskless == []
    counters = dispatcher.counters()
    assert counters.masked == {"sdpa": {"kept": 1}}, name
    assert any("takes no mask" in f.reason for f in counters.fallbacks)
    with pytest.raises(NoBackendError, match="takes no mask"):
        Dispatcher("maskless", strict=True)(q, k, v, H, mask)


def test_different_paddings_of_one_shape_get_their_own_plans(maskless):
    dispatcher = Dispatcher(["maskless", "sdpa"])
    q, k, v = make(1, H, 24, 24, D, True)
    for kept in (20, 9, 20, 24, 9):
        mask = additive(keep_mask([kept], 24))[:, None, None]
        close(dispatcher(q, k, v, H, mask, skip_reshape=True, skip_output_reshape=True), q, k, v, mask,
              skip_reshape=True, skip_output_reshape=True)
    assert [shape[2] for shape in maskless] == [20, 9, 20, 24, 9]
    assert len(dispatcher.plans()) == 3  # kept 20, kept 9, no-op
    assert dispatcher.counters().masked == {"maskless": {"keys_trimmed": 4, "dropped": 1}}


def test_one_read_per_mask_tensor_per_model_call(maskless, monkeypatch):
    reads = []
    original = masks._to_host
    monkeypatch.setattr(masks, "_to_host", lambda flat: reads.append(1) or original(flat))
    dispatcher = Dispatcher(["maskless", "sdpa"])
    q, k, v = make(1, H, 80, 80, D, True)
    joint = hunyuan_joint_mask(keep_mask([5], 16), 64, txt_first=True)
    for model_call in range(2):
        with dispatcher.masks.model_call():
            for _block in range(10):  # double blocks, then single blocks: one tensor for all
                dispatcher(q, k, v, H, joint, skip_reshape=True, skip_output_reshape=True)
                dispatcher(q, k, v, H, skip_reshape=True, skip_output_reshape=True)  # unmasked calls read nothing
        assert len(reads) == dispatcher.masks.classifications == model_call + 1
    assert dispatcher.counters().masked == {"maskless": {"keys_trimmed": 20}}
    assert dispatcher.counters().served == {"maskless": 40}


def test_a_shared_cache_reads_once_for_every_dispatcher():
    cache = masks.MaskCache()
    main, exact = Dispatcher("auto", mask_cache=cache), Dispatcher("sdpa", mask_cache=cache)
    q, k, v = make(1, H, 20, 20, D, False)
    mask = torch.zeros(1, 1, 20)
    with cache.model_call():
        main(q, k, v, H, mask)
        exact(q, k, v, H, mask)
    assert cache.classifications == 1


def test_padded_query_rows_through_the_dispatcher_equal_sdpa(maskless):
    """HunyuanVideo's token refiner: padded text tokens are queries that attend to nothing."""
    dispatcher = Dispatcher(["maskless", "sdpa"])
    q, k, v = make(2, H, 12, 12, D, True)
    mask = hunyuan_refiner_mask(keep_mask([5, 9], 12))
    out = dispatcher(q, k, v, H, mask, skip_reshape=True, skip_output_reshape=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert dispatcher.counters().masked == {"maskless": {"per_row": 1}}


def test_an_integer_padding_mask_is_trimmed(maskless):
    dispatcher = Dispatcher(["maskless", "sdpa"], strict=True)
    q, k, v = make(1, H, 12, 12, D, True)
    mask = keep_mask([9], 12)  # Lumina2 (0.8.0) passes the text encoder's long mask
    close(dispatcher(q, k, v, H, mask, skip_reshape=True, skip_output_reshape=True), q, k, v, mask,
          skip_reshape=True, skip_output_reshape=True)
    assert dispatcher.counters().masked == {"maskless": {"keys_trimmed": 1}}


def test_a_varlen_entry_that_raises_falls_back_and_is_remembered(extra_backend):
    def broken():
        def packed(*args):
            raise RuntimeError("varlen exploded")
        return Varlen(packed)

    extra_backend(Backend("broken_varlen", "test", "varlen raises", False, (BHND,), (NoMask(),),
                          lambda: maskless_kernel([]), load_varlen=broken))
    dispatcher = Dispatcher(["broken_varlen", "sdpa"])
    q, k, v = make(2, H, 40, 16, D, False)
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    for _ in range(2):
        close(dispatcher(q, k, v, H, mask), q, k, v, mask)
    counters = dispatcher.counters()
    assert counters.served == {"sdpa": 2} and counters.masked == {"sdpa": {"kept": 2}}
    assert any(name == "broken_varlen" and "varlen exploded" in failure.reason
               for (name, _), failure in dispatch.remembered_failures().items())


def test_a_general_mask_is_classified_once_and_then_costs_a_lookup(monkeypatch):
    dispatcher = Dispatcher("auto")
    planned = []
    original = dispatcher.plan_for
    monkeypatch.setattr(dispatcher, "plan_for", lambda call, tensors=None: planned.append(call) or original(
        call, tensors))
    q, k, v = make(2, H, 20, 20, D, False)
    bias = torch.randn(20, 20)
    with dispatcher.masks.model_call():
        for _ in range(5):
            close(dispatcher(q, k, v, H, bias), q, k, v, bias)
    assert len(planned) == 1 and dispatcher.masks.classifications == 1


def test_masked_calls_under_torch_compile_are_classified_when_the_graph_runs(maskless):
    """The model builds its padding mask inside the compiled region (as HunyuanVideo does):
    no graph break, the mask read once per model call at run time, served without it."""
    import torch._dynamo
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dispatcher = Dispatcher(["maskless", "sdpa"])

    def model(q, k, v, keep):
        mask = (keep - 1).to(q.dtype).view(1, 1, -1) * torch.finfo(q.dtype).max
        out = q
        for _block in range(3):
            out = out + dispatcher(q, k, v, H, mask, skip_reshape=True, skip_output_reshape=True)
        return out

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    q, k, v = make(1, H, 24, 24, D, True)
    try:
        for kept in (20, 9):
            keep = keep_mask([kept], 24)
            with dispatcher.masks.model_call():
                out = compiled(q, k, v, keep)
            mask = additive(keep).view(1, 1, -1)
            expected = q.double() + 3 * reference(q, k, v, H, mask, skip_reshape=True, skip_output_reshape=True)
            torch.testing.assert_close(out.double(), expected, atol=5e-5, rtol=1e-4)
        assert not torch._dynamo.utils.counters["graph_break"]
        assert dispatcher.masks.classifications == 2  # once per model call, not per block
        assert dispatcher.counters().masked == {"maskless": {"keys_trimmed": 6}}
        assert [shape[2] for shape in maskless] == [20] * 3 + [9] * 3
    finally:
        torch._dynamo.reset()
