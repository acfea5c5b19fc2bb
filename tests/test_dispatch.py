"""The dispatcher on real tensors (CPU): every ComfyUI call form against a float64
reference, inputs left alone, cached decisions, fallback, strict errors, counters."""

from __future__ import annotations

import logging

import pytest
import torch

from attention import Backend, Dispatcher, NoBackendError, dispatch
from attention.backend import BHND, BNHD
from attention.call import MASK_ADDITIVE, MASK_BOOL, MASK_INTEGER
from attention.constraints import Exactness, NoMask
from library_support import reference_attention, sdpa_kernel

CPU_BACKENDS = ["sdpa", "sdpa_flash", "sdpa_math"]
B, H, NQ, NK, D = 2, 3, 33, 17, 16


def reference(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False):
    """ComfyUI's attention_pytorch semantics in float64 (library_support.reference_attention)."""
    return reference_attention(q, k, v, heads, mask, skip_reshape, skip_output_reshape)


def make(skip_reshape, heads_kv=H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if skip_reshape:
        q = torch.randn(B, H, NQ, D, generator=g, dtype=dtype)
        k = torch.randn(B, heads_kv, NK, D, generator=g, dtype=dtype)
        v = torch.randn(B, heads_kv, NK, D, generator=g, dtype=dtype)
    else:
        q = torch.randn(B, NQ, H * D, generator=g, dtype=dtype)
        k = torch.randn(B, NK, heads_kv * D, generator=g, dtype=dtype)
        v = torch.randn(B, NK, heads_kv * D, generator=g, dtype=dtype)
    return q, k, v


def masks():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(B, NQ, NK, generator=g) > 0.3
    keep[..., 0] = True  # every row attends somewhere
    yield None
    yield torch.randn(NQ, NK, generator=g)                       # 2-D additive
    yield torch.randn(B, NQ, NK, generator=g)                    # 3-D additive
    yield torch.randn(B, H, NQ, NK, generator=g)                 # 4-D additive, per head
    yield torch.randn(1, 1, 1, NK, generator=g)                  # key-padding style broadcast
    yield keep                                                   # 3-D bool
    yield keep[:1, None]                                         # 4-D bool, broadcast batch
    yield keep.long()                                            # integer padding mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_every_call_form_matches_float64(backend, skip_reshape, skip_output_reshape):
    dispatcher = Dispatcher(backend, strict=True)
    for i, mask in enumerate(masks()):
        q, k, v = make(skip_reshape, seed=i)
        out = dispatcher(q, k, v, H, mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
        ref = reference(q, k, v, H, mask, skip_reshape, skip_output_reshape)
        assert out.shape == ref.shape, (backend, i)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4, msg=f"{backend} mask #{i}")
    assert dispatcher.counters().served == {backend: 8}


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_grouped_query_attention(skip_reshape):
    q, k, v = make(skip_reshape, heads_kv=1)
    out = Dispatcher("auto")(q, k, v, H, skip_reshape=skip_reshape)
    torch.testing.assert_close(out.double(), reference(q, k, v, H, None, skip_reshape), atol=2e-5, rtol=1e-4)


def test_scale_and_float64_and_bf16():
    q, k, v = make(True, dtype=torch.float64)
    out = Dispatcher("sdpa_math", strict=True)(q, k, v, H, skip_reshape=True, scale=0.1)
    ref = ((q @ k.transpose(-1, -2)) * 0.1).softmax(-1) @ v
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B, NQ, -1))
    qb, kb, vb = (t.bfloat16() for t in make(False))
    out = Dispatcher("auto")(qb, kb, vb, H)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(qb, kb, vb, H), atol=2e-2, rtol=2e-2)


def test_inputs_are_never_modified():
    for skip_reshape in (False, True):
        for mask in masks():
            q, k, v = make(skip_reshape)
            before = [t.clone() for t in (q, k, v)] + ([mask.clone()] if mask is not None else [])
            Dispatcher("auto")(q, k, v, H, mask, skip_reshape=skip_reshape)
            after = [q, k, v] + ([mask] if mask is not None else [])
            for a, b in zip(before, after):
                assert torch.equal(a, b)


def test_flat_input_reaches_kernel_as_views_without_copies(extra_backend):
    seen = {}

    def spy(q, k, v, mask, scale, layout):
        seen["layout"], seen["q_base"], seen["contig"] = layout, q.untyped_storage().data_ptr(), q.is_contiguous()
        return sdpa_kernel(q, k, v, mask, scale, layout)

    extra_backend(Backend("spy_bhnd", "test", "spy", False, (BHND,), (), lambda: spy))
    q, k, v = make(False)
    Dispatcher("spy_bhnd", strict=True)(q, k, v, H)
    assert seen["layout"] == BHND and seen["q_base"] == q.untyped_storage().data_ptr()
    assert not seen["contig"]  # a strided view, not a copy

    def spy_bnhd(q, k, v, mask, scale, layout):
        seen["layout"], seen["q_base"] = layout, q.untyped_storage().data_ptr()
        return sdpa_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale, BHND).transpose(1, 2)

    extra_backend(Backend("spy_bnhd", "test", "spy", False, (BNHD,), (), lambda: spy_bnhd))
    out = Dispatcher("spy_bnhd", strict=True)(q, k, v, H)
    assert seen["layout"] == BNHD and seen["q_base"] == q.untyped_storage().data_ptr()
    torch.testing.assert_close(out.double(), reference(q, k, v, H), atol=2e-5, rtol=1e-4)


def test_masked_calls_never_reach_a_mask_less_backend(extra_backend):
    def refuse_masks(q, k, v, mask, scale, layout):
        assert mask is None, "a mask reached a backend that cannot honour it"
        return sdpa_kernel(q, k, v, None, scale, layout)

    extra_backend(Backend("maskless", "test", "no masks", False, (BHND,), (NoMask(),), lambda: refuse_masks))
    dispatcher = Dispatcher(["maskless", "sdpa"])
    for i, mask in enumerate(masks()):
        q, k, v = make(False, seed=i)
        out = dispatcher(q, k, v, H, mask)
        torch.testing.assert_close(out.double(), reference(q, k, v, H, mask), atol=2e-5, rtol=1e-4)
    counters = dispatcher.counters()
    assert counters.served == {"sdpa": 7, "maskless": 1}
    assert {f.wanted for f in counters.fallbacks} == {"maskless"}
    assert all("takes no mask" in f.reason for f in counters.fallbacks)


def test_decisions_are_cached_per_signature(monkeypatch):
    dispatcher = Dispatcher("auto")
    planned = []
    original = dispatcher.plan_for
    monkeypatch.setattr(dispatcher, "plan_for", lambda call, tensors=None: planned.append(call) or original(
        call, tensors))
    q, k, v = make(False)
    for _ in range(5):
        dispatcher(q, k, v, H)
    q2, k2, v2 = make(False, seed=3)  # new tensors, same signature
    dispatcher(q2, k2, v2, H)
    assert len(planned) == 1
    dispatcher(q2, k2[:, :5], v2[:, :5], H)  # another key length: another signature
    assert len(planned) == 2
    assert dispatcher.counters().total_calls == 7


def raising_backend(name="boom", exc=RuntimeError("kernel exploded")):
    def kernel(q, k, v, mask, scale, layout):
        raise exc
    return Backend(name, "test", "always raises", False, (BHND,), (), lambda: kernel)


def test_a_raising_backend_falls_back_once_and_is_remembered(extra_backend, caplog):
    extra_backend(raising_backend())
    dispatcher = Dispatcher(["boom", "sdpa"])
    q, k, v = make(False)
    with caplog.at_level(logging.WARNING, logger="attention.dispatch"):
        for _ in range(3):
            out = dispatcher(q, k, v, H)
    torch.testing.assert_close(out.double(), reference(q, k, v, H), atol=2e-5, rtol=1e-4)
    warnings = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(warnings) == 1 and "kernel exploded" in warnings[0].getMessage()
    counters = dispatcher.counters()
    assert counters.served == {"sdpa": 3}
    assert counters.fallbacks[0].wanted == "boom" and "kernel exploded" in counters.fallbacks[0].reason
    # another dispatcher learns from the remembered failure without calling the kernel again
    other = Dispatcher(["boom", "sdpa"])
    other(q, k, v, H)
    assert other.counters().served == {"sdpa": 1}
    assert any(key[0] == "boom" for key in dispatch.remembered_failures())


def test_strict_mode_raises_naming_every_candidate(extra_backend):
    extra_backend(raising_backend())
    extra_backend(Backend("quantized_only", "test", "q", True, (BHND,), (Exactness(True),),
                          lambda: sdpa_kernel))
    q, k, v = make(False)
    with pytest.raises(NoBackendError) as caught:
        Dispatcher(["quantized_only", "boom"], strict=True)(q, k, v, H, low_precision=False)
    message = str(caught.value)
    assert "`quantized_only` was not used (unsupported)" in message
    assert "low_precision_attention=False" in message
    assert "`boom` was not used (failed)" in message and "kernel exploded" in message
    assert "Strict mode is on" in message


def test_strict_mode_refuses_unservable_calls_even_with_a_fallback():
    q, k, v = make(False)
    mask = torch.zeros(NQ, NK)
    with pytest.raises(NoBackendError, match="flash4"):
        Dispatcher("flash4", strict=True)(q, k, v, H, mask, fallback=lambda: q)


def test_unservable_calls_go_to_the_callers_fallback():
    q, k, v = make(False)
    sentinel = torch.full((B, NQ, H * D), 7.0)
    dispatcher = Dispatcher("flash4")
    out = dispatcher(q, k, v, H, fallback=lambda: sentinel)
    assert out is sentinel
    assert dispatcher.counters().served == {"comfyui": 1}
    with pytest.raises(NoBackendError):
        dispatcher(q, k, v, H)  # without a fallback nothing can serve it


def test_the_hot_path_hands_an_unservable_call_back_to_its_caller():
    q, k, v = make(False)
    dispatcher = Dispatcher("flash4")
    assert dispatcher.serve(q, k, v, H, None, False, False, None, None, True, True) is None
    assert dispatcher.counters().served == {"comfyui": 1}
    with pytest.raises(NoBackendError, match="flash4"):
        dispatcher.serve(q, k, v, H, None, False, False, None, None, True, False)


def test_counters_reset():
    dispatcher = Dispatcher("auto")
    q, k, v = make(True)
    dispatcher(q, k, v, H, skip_reshape=True)
    dispatcher.reset_counters()
    assert dispatcher.counters().total_calls == 0
    dispatcher(q, k, v, H, skip_reshape=True)
    assert dispatcher.counters().served == {"sdpa": 1}
    assert dispatcher.counters().share("sdpa") == 1.0


def test_mask_kind_classification():
    from attention.call import mask_kind
    assert mask_kind(torch.zeros(2, 2, dtype=torch.bool)) == MASK_BOOL
    assert mask_kind(torch.zeros(2, 2)) == MASK_ADDITIVE
    assert mask_kind(torch.zeros(2, 2, dtype=torch.long)) == MASK_INTEGER


def test_additive_mask_in_another_dtype_is_cast_for_the_kernel():
    q, k, v = (t.bfloat16() for t in make(False))
    mask = torch.randn(NQ, NK, dtype=torch.float32)
    out = Dispatcher("sdpa", strict=True)(q, k, v, H, mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, H, mask), atol=3e-2, rtol=3e-2)



def test_refused_calls_are_counted_as_refused_not_served():
    q, k, v = make(False)
    dispatcher = Dispatcher("flash4", strict=True)
    for _ in range(2):
        with pytest.raises(NoBackendError):
            dispatcher(q, k, v, H, fallback=lambda: q)
    counters = dispatcher.counters()
    assert counters.served == {} and counters.total_calls == 0
    assert counters.refused == 2
    dispatcher.reset_counters()
    assert dispatcher.counters().refused == 0


def test_a_kernel_that_raises_in_strict_mode_is_a_refused_call(extra_backend):
    extra_backend(raising_backend())
    q, k, v = make(False)
    dispatcher = Dispatcher(["boom"], strict=True)
    with pytest.raises(NoBackendError):
        dispatcher(q, k, v, H)
    assert dispatcher.counters().served == {} and dispatcher.counters().refused == 1


def test_calls_passed_on_count_under_the_name_given_for_the_fallback():
    q, k, v = make(False)
    dispatcher = Dispatcher("flash4", passthrough="KJNodes.attention_sage")
    dispatcher(q, k, v, H, fallback=lambda: q)
    counters = dispatcher.counters()
    assert counters.served == {"KJNodes.attention_sage": 1}
    assert [(f.wanted, f.served_by) for f in counters.fallbacks] == [("flash4", "KJNodes.attention_sage")]
