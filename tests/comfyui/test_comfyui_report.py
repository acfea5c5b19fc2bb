"""What the run report says about calls that went elsewhere: passed on to a previous
override, refused in stop mode, bypassed by a pack that replaced forwards, or never
made because the model has no attention. And, in stop mode, that a pack's own cleanup
still runs (ComfyUI-NAG style forward swaps)."""

from __future__ import annotations

import pytest
import torch

KEY = "optimized_attention_override"


@pytest.fixture(scope="module")
def swap(comfyui_path):
    import forward_swap
    return forward_swap


def _carrying(model, override):
    carried = model.clone()
    carried.model_options["transformer_options"][KEY] = override
    return carried


def test_calls_passed_on_to_a_previous_override_are_reported_under_its_name(pack, tiny, flux, patch):
    def attention_sage(func, *args, **kwargs):  # the name KJNodes' patch gives its override
        return func(*args, **kwargs)

    # sdpa_efficient runs on CUDA only: on this CPU every call is passed on.
    patched, state = patch(_carrying(flux, attention_sage), "sdpa_efficient")
    tiny.sample(patched)
    report = state.last_report
    name = "test_calls_passed_on_to_a_previous_override_are_reported_under_its_name.attention_sage " \
           "(test_comfyui_report)"
    assert report["served"] == {name: 4} and "comfyui" not in report["served"]
    assert report["passed_on_to"] == name
    assert [(f["wanted"], f["served_by"]) for f in report["fallbacks"]] == [("sdpa_efficient", name)]
    assert name in pack.nodes.report.summary(report)


def test_calls_without_a_previous_override_are_comfyuis(pack, tiny, flux, patch):
    patched, state = patch(flux, "sdpa_efficient")
    tiny.sample(patched)
    assert state.last_report["served"] == {"comfyui": 4} and state.last_report["passed_on_to"] is None


def test_a_refused_call_is_counted_as_refused_not_served(pack, tiny, flux, patch):
    priority, strict = pack.nodes.patch.resolve_priority(["sdpa_efficient"], "stop")
    patched, state = patch(flux, priority, strict=strict)
    with pytest.raises(pack.attention.NoBackendError):
        tiny.sample(patched)
    report = state.last_report
    assert report["served"] == {} and report["total_calls"] == 0
    assert report["refused_calls"] == 1 and report["model_attention_calls"] == 1
    assert any("refused" in w and "sdpa_efficient" in w for w in report["warnings"]), report["warnings"]
    assert not any("never invoked" in w for w in report["warnings"])


def test_an_earlier_override_that_never_ran_is_said_to_be_shadowed(pack, tiny, flux, patch):
    def earlier_override(func, *args, **kwargs):
        return func(*args, **kwargs)

    patched, state = patch(_carrying(flux, earlier_override), "auto")
    tiny.sample(patched)
    report = state.last_report
    assert report["served"] == {"sdpa": 4}
    shadowed = [w for w in report["warnings"] if "shadowed" in w]
    assert len(shadowed) == 1 and "earlier_override" in shadowed[0], report["warnings"]


def test_a_model_without_attention_is_not_said_to_bypass_the_override(pack, tiny, patch):
    patched, state = patch(tiny.tiny_unet_without_attention(), "sdpa")
    tiny.sample(patched)
    report = state.last_report
    assert report["model_attention_calls"] == 0 and report["attention_layers"] == 0
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "No layer of this model calls ComfyUI's attention functions" in report["warnings"][0]
    assert "bypass" not in report["warnings"][0] and "never invoked" not in report["warnings"][0]


def test_cross_attention_replaced_by_a_pack_is_reported_as_a_partial_bypass(pack, tiny, sd15, patch, swap):
    patched, state = patch(sd15, "sdpa")
    swap.sample_swapped(patched, swap.cross_attention_layers, swap.cross_attention_without_options)
    report = state.last_report
    # 7 self-attention layers x 2 steps reached the override; the 7 replaced cross-attention layers did not.
    assert report["served"] == {"sdpa": 14} and report["attention_layers"] == 14
    assert report["bypassed"] == [{"replacement": "cross_attention_without_options", "origin": "forward_swap",
                                   "layers": 7, "example": report["bypassed"][0]["example"], "calls": 14,
                                   "bypassed": 14}]
    assert report["bypassed"][0]["example"].endswith("attn2")
    [warning] = report["warnings"]
    assert "14 calls of 7 of the model's 14 attention layers" in warning
    assert "cross_attention_without_options" in warning and "forward_swap" in warning


def test_a_pack_replacing_every_attention_layer_is_named_when_nothing_arrives(pack, tiny, flux, patch, swap):
    patched, state = patch(flux, "sdpa")
    swap.sample_swapped(patched, swap.flux_blocks, swap.forward_without_options)
    report = state.last_report
    assert report["model_attention_calls"] == 0
    [warning] = report["warnings"]
    assert "never invoked" in warning and "2 of the model's 2 attention layers" in warning
    assert "forward_without_options" in warning


def test_a_replaced_forward_that_passes_the_options_on_is_no_bypass(pack, tiny, flux, patch, swap):
    def forward_with_options(self, *args, **kwargs):
        return type(self).forward(self, *args, **kwargs)

    patched, state = patch(flux, "sdpa")
    swap.sample_swapped(patched, swap.flux_blocks, forward_with_options)
    report = state.last_report
    assert report["served"] == {"sdpa": 4} and report["warnings"] == []
    assert report["bypassed"] == []


def test_stop_mode_leaves_a_packs_forward_swap_cleaned_up_and_later_runs_unchanged(pack, tiny, sd15, patch, swap):
    plain = tiny.sample(sd15)
    layers = swap.cross_attention_layers(sd15.model.diffusion_model)
    priority, strict = pack.nodes.patch.resolve_priority(["sdpa_efficient"], "stop")
    patched, state = patch(sd15, priority, strict=strict)
    with pytest.raises(pack.attention.NoBackendError):
        swap.sample_swapped(patched, swap.cross_attention_layers, swap.cross_attention_without_options)
    # The pack's finally ran: its forwards are gone, our run-time hooks too.
    assert all("forward" not in module.__dict__ for module in layers)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in layers)
    assert state.last_report["refused_calls"] == 1
    # A later plain run, and a later run of the swapping pack without our node, are as before.
    assert torch.equal(tiny.sample(sd15), plain)
    swapped_before = swap.sample_swapped(sd15.clone(), swap.cross_attention_layers,
                                         swap.cross_attention_without_options)
    assert torch.equal(swap.sample_swapped(sd15, swap.cross_attention_layers, swap.cross_attention_without_options),
                       swapped_before)
    assert KEY not in sd15.model_options["transformer_options"]
