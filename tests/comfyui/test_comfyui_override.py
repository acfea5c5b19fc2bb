"""The Attention Backend node's override on real ComfyUI models sampled on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

KEY = "optimized_attention_override"


def _snapshot(model) -> dict:
    options = model.model_options.get("transformer_options", {})
    # deepcopy keeps functions by identity, so equality compares the very same hooks.
    return {"options": sorted(options), "wrappers": copy.deepcopy(model.wrappers),
            "callbacks": copy.deepcopy(model.callbacks)}


def test_override_engages_and_exact_backend_matches_unpatched(pack, tiny, flux, patch):
    before = _snapshot(flux)
    plain = tiny.sample(flux)
    patched, state = patch(flux, "sdpa")
    out = tiny.sample(patched)

    report = state.last_report
    assert report["served"] == {"sdpa": report["total_calls"]} and report["total_calls"] > 0
    assert report["model"] == "Flux" and report["warnings"] == [] and report["fallbacks"] == []
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
    # The original MODEL is untouched and still samples as before.
    assert KEY not in flux.model_options["transformer_options"]
    assert _snapshot(flux) == before
    assert torch.equal(tiny.sample(flux), plain)


def test_sd_unet_calls_are_served_and_counted_per_run(pack, tiny, sd15, patch):
    plain = tiny.sample(sd15)
    patched, state = patch(sd15, "sdpa_math")
    out = tiny.sample(patched)
    first = state.last_report
    tiny.sample(patched)
    # Counters start again at every run: the second report counts the same calls, not twice as many.
    assert state.last_report["total_calls"] == first["total_calls"] == 28  # 7 blocks x (self + cross) x 2 steps
    assert first["served"] == {"sdpa_math": 28}
    assert {plan["backend"] for plan in first["plans"]} == {"sdpa_math"}
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)


def test_two_clones_of_one_model_each_get_their_backend(pack, tiny, flux, patch):
    first, first_state = patch(flux, "sdpa")
    second, second_state = patch(flux, "sdpa_math")
    tiny.sample(first)
    tiny.sample(second)
    assert set(first_state.last_report["served"]) == {"sdpa"}
    assert set(second_state.last_report["served"]) == {"sdpa_math"}


def test_two_models_in_one_process_keep_their_own_reports(pack, tiny, flux, sd15, patch):
    flux_patched, flux_state = patch(flux, "sdpa", node_id="flux-node")
    sd_patched, sd_state = patch(sd15, "sdpa_math", node_id="sd-node")
    tiny.sample(flux_patched)
    tiny.sample(sd_patched)
    reports = pack.nodes.report.last_reports()
    assert reports["flux-node"]["served"] == {"sdpa": 4}
    assert reports["sd-node"]["served"] == {"sdpa_math": 28}


def test_previous_override_is_chained_for_calls_passed_on(pack, tiny, flux, patch):
    seen = []

    def recording(func, *args, **kwargs):
        seen.append(kwargs.get("_inside_attn_wrapper"))
        return func(*args, **kwargs)

    carried = flux.clone()
    carried.model_options["transformer_options"][KEY] = recording
    # sdpa_efficient runs on CUDA only: on this CPU every call is passed on.
    patched, state = patch(carried, "sdpa_efficient")
    tiny.sample(patched)
    report = state.last_report
    name = "test_previous_override_is_chained_for_calls_passed_on.recording (test_comfyui_override)"
    assert len(seen) == report["total_calls"] == report["served"][name] > 0
    assert all(seen)  # the wrapper's flag travels with the call, so nothing re-enters an override
    assert report["fallbacks"][0]["wanted"] == "sdpa_efficient"
    assert carried.model_options["transformer_options"][KEY] is recording


def test_passed_on_call_into_a_registered_function_does_not_reenter(pack, tiny, flux, patch):
    import comfy.ldm.modules.attention as attention_module

    # Core's ModelAttentionBackend installs an override that calls a *decorated*
    # attention function; that must not come back into our override.
    def core_style(func, *args, **kwargs):
        return attention_module.attention_basic(*args, **kwargs)

    carried = flux.clone()
    carried.model_options["transformer_options"][KEY] = core_style
    patched, state = patch(carried, "sdpa_efficient")
    out = tiny.sample(patched)
    assert torch.isfinite(out).all()
    assert state.last_report["served"] == {
        "test_passed_on_call_into_a_registered_function_does_not_reenter.core_style (test_comfyui_override)": 4}


def test_low_precision_false_and_fp32_requests_stay_exact(pack, register_backend, patch, flux):
    quantized_calls = []

    def fake_int8(q, k, v, mask, scale, layout):
        quantized_calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    register_backend("test_int8", fake_int8, quantized=True)
    _, state = patch(flux, ["test_int8", "sdpa"])
    q = torch.randn(1, 2, 16, 64)
    options = {"transformer_options": {}, "_inside_attn_wrapper": True, "skip_reshape": True}

    def comfy_function(*args, **kwargs):
        raise AssertionError("no call should reach ComfyUI's function here")

    state.override(comfy_function, q, q, q, 2, **options)
    state.override(comfy_function, q, q, q, 2, low_precision_attention=False, **options)
    state.override(comfy_function, q, q, q, 2, attn_precision=torch.float32, **options)
    served = state.main.counters().served
    assert served == {"test_int8": 1, "sdpa": 2} and len(quantized_calls) == 1
    reasons = [r for plan in state.main.plans() for rejection in plan.rejected for r in rejection.reasons]
    assert any("low_precision_attention=False" in r for r in reasons)
    assert any("attn_precision=float32" in r for r in reasons)


def test_call_forms_heads_keyword_positional_mask_and_unknown(pack, flux, patch):
    _, state = patch(flux, "sdpa")
    q = torch.randn(2, 10, 64)
    mask = torch.zeros(10, 10)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.view(2, 10, 2, 32).transpose(1, 2), q.view(2, 10, 2, 32).transpose(1, 2),
        q.view(2, 10, 2, 32).transpose(1, 2)).transpose(1, 2).reshape(2, 10, 64)
    passed_on = []

    def comfy_function(*args, **kwargs):
        passed_on.append((args, kwargs))
        return "comfy"

    common = {"transformer_options": {}, "_inside_attn_wrapper": True}
    torch.testing.assert_close(state.override(comfy_function, q, q, q, heads=2, **common), reference)
    torch.testing.assert_close(state.override(comfy_function, q, q, q, 2, mask, **common), reference)
    # A form that is not ComfyUI's goes to ComfyUI's function untouched, with its keywords.
    assert state.override(comfy_function, q, q, **common, unknown_keyword=1) == "comfy"
    assert passed_on[0][1]["unknown_keyword"] == 1
    assert state.count("unknown_form") == 1
    assert state.main.counters().served == {"sdpa": 2}


def test_backend_that_raises_falls_back_and_the_report_says_why(pack, tiny, flux, register_backend, patch):
    def broken(q, k, v, mask, scale, layout):
        raise RuntimeError("kernel exploded")

    register_backend("test_broken", broken)
    plain = tiny.sample(flux)
    priority, strict = pack.nodes.patch.resolve_priority(["test_broken"], "fall back")
    patched, state = patch(flux, priority, strict=strict)
    out = tiny.sample(patched)
    report = state.last_report
    assert report["served"] == {"sdpa": 4}
    assert report["fallbacks"] and all(f["wanted"] == "test_broken" for f in report["fallbacks"])
    assert "raised RuntimeError: kernel exploded" in report["fallbacks"][0]["reason"]
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)


def test_stop_raises_naming_every_candidate(pack, tiny, flux, patch):
    priority, strict = pack.nodes.patch.resolve_priority(["sdpa_efficient"], "stop")
    patched, state = patch(flux, priority, strict=strict)
    with pytest.raises(pack.attention.NoBackendError, match="sdpa_efficient"):
        tiny.sample(patched)
    assert state.last_report is not None  # the run boundary still reported


def test_report_warns_when_a_later_node_replaced_the_override(pack, tiny, flux, patch):
    patched, state = patch(flux, "sdpa")
    later = patched.clone()
    later.model_options["transformer_options"][KEY] = lambda func, *args, **kwargs: func(*args, **kwargs)
    tiny.sample(later)
    warnings = state.last_report["warnings"]
    assert len(warnings) == 1 and "never invoked" in warnings[0] and "replaced" in warnings[0]


def test_report_warns_when_the_model_bypasses_the_override(pack, tiny, flux, patch, monkeypatch):
    import comfy.ldm.flux.math as flux_math

    # As models that call attention without the decorator (DESIGN §3 coverage).
    monkeypatch.setattr(flux_math, "optimized_attention", flux_math.optimized_attention.__wrapped__)
    patched, state = patch(flux, "sdpa")
    tiny.sample(patched)
    warnings = state.last_report["warnings"]
    assert len(warnings) == 1 and "never invoked" in warnings[0] and "does not go through" in warnings[0]


def test_old_comfyui_is_refused_naming_the_minimum_version(pack, flux, patch, monkeypatch):
    import comfy.ldm.modules.attention as attention_module

    monkeypatch.delattr(attention_module, "wrap_attn")
    with pytest.raises(pack.nodes.compat.UnsupportedComfyUIError, match="0.3.60"):
        patch(flux, "sdpa")
