"""Real masks through comfy.sample.sample: tiny HunyuanVideo and Lumina2 with text-padding
masks, served by a kernel that takes no mask (as FA4 or SageAttention would), against the
unpatched run; the report says how every masked call was served."""

from __future__ import annotations

import pytest
import torch

KEY = "optimized_attention_override"
MASKLESS = "maskless_test"


@pytest.fixture
def maskless(pack, monkeypatch):
    """A mask-less test backend (SDPA underneath, refusing any mask it is handed), recording
    the key counts it saw."""
    attention = pack.attention
    seen: list[int] = []

    def kernel(q, k, v, mask, scale, layout):
        assert mask is None, "a mask reached a kernel that cannot honour it"
        seen.append(k.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    backend = attention.Backend(name=MASKLESS, family="test", description="test: no masks", quantized=False,
                                layouts=(attention.backend.BHND,), constraints=(attention.constraints.NoMask(),),
                                load=lambda: kernel)
    monkeypatch.setitem(attention.registry._BY_NAME, MASKLESS, backend)
    return seen


def unpatched(tiny, model, masks, cfg: float = 2.0) -> tuple[torch.Tensor, list]:
    """The unpatched result, and the mask of every attention call (recorded by an override
    that only passes each call on to ComfyUI's own function)."""
    seen = []

    def recording(func, *args, **kwargs):
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        seen.append(None if mask is None else mask.dtype)
        return func(*args, **kwargs)

    clone = model.clone()
    clone.model_options["transformer_options"][KEY] = recording
    return tiny.sample(clone, masks=masks, cfg=cfg), seen


def check_masked_calls(report: dict, seen: list) -> dict:
    """Every masked call the model made was served without its mask, none was kept."""
    masked = sum(dtype is not None for dtype in seen)
    assert report["total_calls"] == len(seen)
    assert report["served"] == {MASKLESS: len(seen)}
    if masked:
        assert set(report["masked"]) == {MASKLESS}
        assert sum(report["masked"][MASKLESS].values()) == masked
        assert "kept" not in report["masked"][MASKLESS]
    else:
        assert report["masked"] == {}
    return report["masked"].get(MASKLESS, {})


def test_hunyuan_video_padded_prompt_is_served_without_the_mask(pack, tiny, patch, maskless):
    model = tiny.tiny_hunyuan_video()
    masks = (tiny.text_mask([5], 16), None)  # the negative prompt is not padded: no mask
    plain, seen = unpatched(tiny, model, masks)
    patched, state = patch(model, [MASKLESS, "sdpa"], strict=True)
    out = tiny.sample(patched, masks=masks)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)

    report = state.last_report
    services = check_masked_calls(report, seen)
    # per positive model call: the token refiner's 2 blocks (padded text queries too) and the
    # joint mask of the double and the single block; 2 steps
    assert services == {"keys_trimmed": 8}
    # one device read per mask tensor per model call: the refiner's mask and the joint mask
    assert report["masks_read"] == 4
    assert 5 in maskless and 5 + 32 in maskless  # the refiner kept 5 text keys; the blocks 5 + 32 image keys
    rows = [row for row in report["plans"] if row["mask"] == "keys_trimmed"]
    assert rows and all("mask" not in row["signature"] for row in rows)
    assert all("mask=additive" in row["masked_call"] for row in rows)
    assert "masked calls: maskless_test 8 keys trimmed (4 masks read)" in pack.nodes.report.summary(report)


def test_hunyuan_video_unpadded_mask_is_dropped(pack, tiny, patch, maskless):
    # HunyuanVideo is guidance-distilled and sampled at cfg 1: one cond, B=1. (Two masked
    # conds batched together fail inside ComfyUI itself: its joint mask has batch 1.)
    model = tiny.tiny_hunyuan_video()
    masks = (tiny.text_mask([16], 16), None)  # a mask that removes nothing
    plain, seen = unpatched(tiny, model, masks, cfg=1.0)
    patched, state = patch(model, [MASKLESS, "sdpa"], strict=True)
    torch.testing.assert_close(tiny.sample(patched, masks=masks, cfg=1.0), plain, rtol=1e-5, atol=1e-5)
    assert check_masked_calls(state.last_report, seen) == {"dropped": 8}  # 4 calls x 2 steps
    assert state.last_report["masks_read"] == 4


def test_lumina2_text_padding(pack, tiny, patch, maskless):
    model = tiny.tiny_lumina2()
    masks = (tiny.text_mask([9], 12), tiny.text_mask([12], 12))
    plain, seen = unpatched(tiny, model, masks)
    if any(dtype is not None and not dtype.is_floating_point for dtype in seen):
        # 0.8.0 hands attention the text encoder's long mask. ComfyUI's CPU attention adds it
        # as a bias (padding ignored) and SDPA refuses it; the pack reads it as a padding mask
        # (nonzero attends). The reference is ComfyUI's attention given that padding additively.
        additive = ((masks[0] - 1).float() * torch.finfo(torch.float32).max, masks[1])
        plain, _ = unpatched(tiny, model, additive)
    patched, state = patch(model, [MASKLESS, "sdpa"], strict=True)
    torch.testing.assert_close(tiny.sample(patched, masks=masks), plain, rtol=1e-5, atol=1e-5)

    services = check_masked_calls(state.last_report, seen)
    version = pack.nodes.compat.comfyui_version()
    if version in ("0.19.3", "0.28.0"):
        assert services == {}  # Lumina2 stopped passing its text mask (patchify_and_embed drops it)
    else:
        assert services.get("keys_trimmed") == 2  # the context refiner, 2 steps
        assert 9 in maskless
