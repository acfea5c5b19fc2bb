"""The Advanced node's routing rules and non-finite guard on real ComfyUI models."""

from __future__ import annotations

import torch


def _version(pack) -> tuple[int, ...]:
    return tuple(int(part) for part in pack.nodes.compat.comfyui_version().split(".")[:3])


def _rules(pack, **settings):
    return pack.nodes.routing.RoutingRules(**settings)


def test_step_window_keeps_first_and_last_steps_exact(pack, tiny, flux, patch):
    patched, state = patch(flux, "sdpa_math", rules=_rules(pack, step_start=0.25, step_end=0.75))
    tiny.sample(patched, steps=4)
    report = state.last_report
    # 4 steps, 2 attention calls per model call: steps 0 and 3 (positions 0 and 0.75) are outside.
    assert report["served"] == {"sdpa": 4, "sdpa_math": 4}
    assert report["routing"] == {"exact_by_step_window": 4, "exact_by_block_filter": 0, "exact_by_cross_rule": 0}
    assert report["warnings"] == []


def test_step_window_follows_the_schedule_of_a_shortened_run(pack, tiny, sd15, patch):
    patched, state = patch(sd15, "sdpa_math", rules=_rules(pack, step_end=0.5))
    tiny.sample(patched, steps=2)
    assert state.last_report["served"] == {"sdpa_math": 14, "sdpa": 14}


def test_block_filters_on_the_sd_unet(pack, tiny, sd15, patch):
    # The tiny UNet has 7 attention blocks (input 1 and 3, middle, output 0-3), each with
    # self- and cross-attention: the first and the last block are 2 calls per model call each.
    patched, state = patch(sd15, "sdpa_math", rules=_rules(pack, first_blocks=1, last_blocks=1))
    tiny.sample(patched, steps=2)
    report = state.last_report
    assert report["routing"]["exact_by_block_filter"] == 8
    assert report["served"] == {"sdpa_math": 20, "sdpa": 8}


def test_block_filters_on_flux(pack, tiny, flux, patch):
    patched, state = patch(flux, "sdpa_math", rules=_rules(pack, last_blocks=1))
    tiny.sample(patched, steps=2)
    report = state.last_report
    if _version(pack) >= (0, 8, 0):
        # One double block, then one single block: "last 1" is the single block.
        assert report["routing"]["exact_by_block_filter"] == 2
        assert report["served"] == {"sdpa_math": 2, "sdpa": 2}
        assert report["warnings"] == []
    else:
        # Flux on older ComfyUI does not say which block a call belongs to.
        assert report["routing"]["exact_by_block_filter"] == 0
        assert any("block filter could not apply to 4 calls" in w for w in report["warnings"])


def test_first_blocks_on_flux_are_the_double_stack(pack, tiny, flux, patch):
    patched, state = patch(flux, "sdpa_math", rules=_rules(pack, first_blocks=1))
    tiny.sample(patched, steps=2)
    expected = 2 if _version(pack) >= (0, 8, 0) else 0
    assert state.last_report["routing"]["exact_by_block_filter"] == expected


def test_short_key_cross_attention_rule(pack, tiny, sd15, patch):
    patched, state = patch(sd15, "sdpa_math", rules=_rules(pack, cross_max_keys=77))
    tiny.sample(patched, steps=2)
    report = state.last_report
    # Every cross-attention call (8 text tokens) goes exact; self-attention stays.
    assert report["routing"]["exact_by_cross_rule"] == 14
    assert report["served"] == {"sdpa_math": 14, "sdpa": 14}


def test_guard_reruns_a_nonfinite_model_call_with_exact_attention(pack, tiny, flux, register_backend, patch):
    def nan_kernel(q, k, v, mask, scale, layout):
        return torch.full_like(q, float("nan"))

    register_backend("test_nan", nan_kernel)
    plain = tiny.sample(flux)
    patched, state = patch(flux, "test_nan", guard=True)
    out = tiny.sample(patched, steps=2)
    report = state.last_report
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
    assert report["guard"] == {"nonfinite_model_calls": 1, "reruns": 1, "pinned_exact": True}
    # The first model call's 2 calls hit the NaN kernel; its re-run and step 2 were exact.
    assert report["served"] == {"sdpa": 4, "test_nan": 2}
    assert report["warnings"] == []


def test_guard_reports_nonfinite_output_that_exact_attention_cannot_fix(pack, tiny, flux, patch):
    patched, state = patch(flux, "sdpa", guard=True)
    latent = torch.full((1, 16, 8, 8), float("nan"))
    tiny.sample(patched, latent=latent)
    report = state.last_report
    assert report["guard"]["reruns"] == 1 and report["guard"]["nonfinite_model_calls"] == 2
    assert any("not finite even with exact attention" in w for w in report["warnings"])


def test_guard_costs_nothing_when_outputs_are_finite(pack, tiny, sd15, patch):
    patched, state = patch(sd15, "sdpa_math", guard=True)
    tiny.sample(patched)
    assert state.last_report["guard"] == {"nonfinite_model_calls": 0, "reruns": 0, "pinned_exact": False}
    assert state.last_report["served"] == {"sdpa_math": 28}
