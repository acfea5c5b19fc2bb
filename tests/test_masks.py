"""Mask classification (attention.masks): every mask form ComfyUI passes, the masks that
must never be dropped, one device read per mask tensor, and the per-model-call cache."""

from __future__ import annotations

import threading

import pytest
import torch

from attention import masks
from attention.masks import GENERAL, KEY_PADDING, NOOP, MaskCache, MaskClass, classify
from mask_support import MAX, additive, hunyuan_joint_mask, hunyuan_refiner_mask, keep_mask

B, H = 2, 3


@pytest.fixture
def reads(monkeypatch):
    """Counts device reads (the one synchronisation a classification may cost)."""
    count = [0]
    original = masks._to_host

    def counted(flat):
        count[0] += 1
        return original(flat)

    monkeypatch.setattr(masks, "_to_host", counted)
    return count


# --- no-op masks ----------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [
    torch.zeros(1, 1, 40),                                  # HunyuanVideo, prompt not padded
    torch.zeros(B, 1, 40),                                  # Lumina2 0.3.64 image mask, equal images
    torch.zeros(40, 40),                                    # 2-D additive
    torch.zeros(B, H, 40, 40, dtype=torch.bfloat16),        # 4-D per head
    -torch.zeros(1, 1, 1, 40),                              # -0.0 is zero
    torch.ones(40, 40, dtype=torch.bool),                   # bool, all True
    torch.ones(B, 40, 40, dtype=torch.bool),
    torch.ones(1, 1, 1, 40, dtype=torch.long),              # integer, all nonzero
    torch.full((1, 1, 1, 40), 3, dtype=torch.int32),
    torch.zeros(B, 1, 40, 1),                               # broadcast over keys
])
def test_masks_that_change_nothing_are_noops(mask, reads):
    assert classify(mask, B, H, 40, 40) == MaskClass(NOOP)
    assert reads[0] == 1


# --- key padding ------------------------------------------------------------------------------

def test_hunyuan_video_joint_mask_text_first_keeps_two_runs():
    mask = hunyuan_joint_mask(keep_mask([5], 16), img_len=64, txt_first=True)
    result = classify(mask, 1, H, 80, 80)
    assert result.kind == KEY_PADDING
    assert result.keys == (((0, 5), (16, 80)),) and not result.has_dead_queries
    assert result.kept(0) == 69 and result.shared


def test_hunyuan_video_joint_mask_image_first_keeps_a_prefix():
    mask = hunyuan_joint_mask(keep_mask([5], 16), img_len=64, txt_first=False)
    result = classify(mask, 2, H, 80, 80)  # (1, 1, L): shared by both batch rows
    assert result.keys == (((0, 69),),) and result.prefix_only and result.shared


def test_hunyuan_video_token_refiner_mask_has_dead_query_rows():
    mask = hunyuan_refiner_mask(keep_mask([5, 9], 12))
    assert torch.isinf(mask).any()  # -max + -max overflows to -inf in padded-query rows
    result = classify(mask, 2, H, 12, 12)
    assert result.kind == KEY_PADDING and not result.shared
    assert result.keys == (((0, 5),), ((0, 9),))
    assert result.dead_queries == (((5, 12),), ((9, 12),))


def test_ltxv_cross_attention_mask_per_batch_row():
    keep = keep_mask([7, 11], 16)
    mask = additive(keep).reshape(2, 1, -1, 16)  # LTXV: (B, 1, 1, Nk)
    result = classify(mask, 2, H, 50, 16)
    assert result.keys == (((0, 7),), ((0, 11),)) and result.dead_queries == ((), ())
    assert result.max_kept == 11 and result.prefix_only
    same = additive(keep_mask([7, 7], 16)).reshape(2, 1, -1, 16)
    assert classify(same, 2, H, 50, 16).shared  # equal rows collapse to one


def test_lumina2_masks_of_every_version():
    keep = keep_mask([9], 12)
    # 0.3.64: cap mask made additive with -finfo.max, passed 2-D (read as (Nq, Nk) = (1, Nk))
    assert classify(additive(keep), 1, H, 12, 12).keys == (((0, 9),),)
    # 0.8.0: the long mask itself
    assert classify(keep, 1, H, 12, 12).keys == (((0, 9),),)
    # 0.3.64 image mask: (B, 1, N) with -finfo.max past each image's tokens
    image = torch.zeros(2, 30)
    image[1, 20:] = -MAX
    result = classify(image.unsqueeze(1), 2, H, 30, 30)
    assert result.keys == (((0, 30),), ((0, 20),))


@pytest.mark.parametrize("removed", [float("-inf"), -MAX, -1e4, -1e9,
                                     -torch.finfo(torch.float16).max, -torch.finfo(torch.bfloat16).max])
def test_very_negative_values_remove_keys(removed):
    dtype = torch.float16 if removed == -torch.finfo(torch.float16).max else torch.float32
    mask = torch.zeros(1, 1, 1, 10, dtype=dtype)
    mask[..., 6:] = removed
    assert classify(mask, B, H, 4, 10).keys == (((0, 6),),)


@pytest.mark.parametrize("form", ["bool2d", "bool3d", "bool4d", "long2d", "long4d", "int3d"])
def test_bool_and_integer_padding_in_every_rank(form):
    keep = torch.ones(10, dtype=torch.bool)
    keep[7:] = False
    mask = {"bool2d": keep.expand(5, 10), "bool3d": keep.expand(B, 5, 10), "bool4d": keep.expand(B, H, 5, 10),
            "long2d": keep.long().expand(5, 10), "long4d": keep.long()[None, None, None],
            "int3d": keep.int().expand(1, 5, 10)}[form]
    result = classify(mask, B, H, 5, 10)
    assert result.kind == KEY_PADDING and result.keys == (((0, 7),),)


# --- masks that must never be dropped --------------------------------------------------------

def _general(mask, batch=B, seq_q=10, seq_k=10):
    result = classify(mask, batch, H, seq_q, seq_k)
    assert result.kind == GENERAL, result
    return result.reason


def test_bias_masks_are_general():
    redux = torch.zeros(1, 1, 10, 10)
    redux[..., 6:] = torch.tensor(0.3).log()  # Redux/style strength: a log-scale bias on image-prompt keys
    assert "bias" in _general(redux)
    assert "bias" in _general(torch.randn(10, 10))
    mild = torch.zeros(1, 1, 1, 10)
    mild[..., 8:] = -100.0  # finite, not far enough below the scores to remove them
    assert "bias" in _general(mild)


def test_nan_and_positive_infinity_are_general():
    for value in (float("nan"), float("inf")):
        mask = torch.zeros(1, 1, 1, 10)
        mask[..., 3] = value
        assert "bias" in _general(mask)


def test_per_query_and_causal_like_masks_are_general():
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    assert "differ between queries" in _general(causal)
    per_query = torch.zeros(B, 10, 10)
    per_query[:, :5, 8:] = float("-inf")  # only the first queries lose keys 8, 9
    assert "differ between queries" in _general(per_query)


def test_padding_that_differs_between_heads_is_general():
    mask = torch.zeros(1, H, 1, 10)
    mask[:, 0, :, 8:] = float("-inf")
    assert "heads" in _general(mask)
    dead_in_one_head = torch.zeros(1, H, 10, 10)
    dead_in_one_head[:, 1, 3] = float("-inf")
    assert "some heads only" in _general(dead_in_one_head)


def test_rows_that_attend_to_nothing_and_odd_shapes_are_general():
    nothing = torch.ones(B, 1, 10, dtype=torch.bool)
    nothing[1] = False
    assert "attends to nothing" in _general(nothing)
    assert "broadcast" in _general(torch.zeros(3, 1, 10))          # batch 3 vs 2
    assert "broadcast" in _general(keep_mask([3, 4], 10), batch=2)  # Lumina2's 2-D (B, N) read as (Nq, Nk)
    assert "1-D" in _general(torch.zeros(10))
    assert "5-D" in _general(torch.zeros(1, 1, 1, 1, 10))


# --- one read per mask tensor per model call -------------------------------------------------

def test_the_cache_reads_each_mask_once_per_model_call(reads):
    cache = MaskCache()
    mask = hunyuan_joint_mask(keep_mask([5], 16), img_len=64, txt_first=True)
    other = torch.zeros(1, 1, 80)
    for model_call in range(3):
        with cache.model_call():
            for _block in range(20):  # every block hands attention the same tensor
                assert cache.classify(mask, 1, H, 80, 80).kind == KEY_PADDING
                assert cache.classify(other, 1, H, 80, 80).kind == NOOP
        assert cache.classifications == reads[0] == 2 * (model_call + 1)


def test_an_in_place_write_reclassifies(reads):
    cache = MaskCache()
    mask = torch.zeros(1, 1, 10)
    assert cache.classify(mask, 1, H, 10, 10).kind == NOOP
    mask[..., 7:] = float("-inf")
    assert cache.classify(mask, 1, H, 10, 10).keys == (((0, 7),),)
    assert reads[0] == 2


def test_inference_tensors_are_trusted_within_the_model_call():
    cache = MaskCache()
    with torch.inference_mode():
        mask = torch.zeros(1, 1, 10)
        with cache.model_call():
            assert cache.classify(mask, 1, H, 10, 10).kind == NOOP
            assert cache.classify(mask, 1, H, 10, 10).kind == NOOP
        assert cache.classifications == 1
        mask[..., 7:] = float("-inf")  # between model calls: the next call reads it again
        with cache.model_call():
            assert cache.classify(mask, 1, H, 10, 10).kind == KEY_PADDING


def test_views_of_the_same_memory_share_an_entry_and_shapes_do_not():
    cache = MaskCache()
    mask = torch.zeros(1, 1, 10)
    cache.classify(mask, 1, H, 10, 10)
    cache.classify(mask.view(1, 1, 10), 1, H, 10, 10)  # another object, same memory and layout
    assert cache.classifications == 1
    cache.classify(mask, 1, H, 5, 10)  # another call shape
    cache.classify(mask[..., :5], 1, H, 10, 5)  # another view
    assert cache.classifications == 3


def test_an_entry_keeps_its_mask_alive_so_its_address_is_not_reused():
    cache = MaskCache()
    mask = torch.zeros(1, 1, 64)
    address = mask.data_ptr()
    cache.classify(mask, 1, H, 64, 64)
    del mask
    fresh = torch.full((1, 1, 64), float("-inf"))
    fresh[..., :10] = 0
    assert fresh.data_ptr() != address
    assert cache.classify(fresh, 1, H, 64, 64).kind == KEY_PADDING


def test_model_calls_on_other_threads_keep_their_own_entries():
    cache = MaskCache()
    mask = torch.zeros(1, 1, 10)
    cache.classify(mask, 1, H, 10, 10)

    def other_thread():
        cache.begin_model_call()
        cache.classify(mask, 1, H, 10, 10)
        cache.end_model_call()

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    cache.classify(mask, 1, H, 10, 10)  # this thread's entry survived the other's boundary
    assert cache.classifications == 2


def test_without_boundaries_the_cache_stays_bounded():
    cache = MaskCache()
    held = [torch.zeros(1, 1, 8) for _ in range(masks.MAX_ENTRIES + 5)]
    for mask in held:
        cache.classify(mask, 1, H, 8, 8)
    assert len(cache._entries()) <= masks.MAX_ENTRIES


def test_describe_says_what_was_kept():
    result = classify(hunyuan_refiner_mask(keep_mask([5, 9], 12)), 2, H, 12, 12)
    assert result.describe(12) == "key padding (keeps 5/12, 9/12 keys per row; 10 fully masked query rows)"
    assert classify(torch.zeros(4, 4), 1, 1, 4, 4).describe() == "no-op mask"
    assert "bias" in classify(torch.randn(4, 4), 1, 1, 4, 4).describe()
