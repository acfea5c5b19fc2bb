"""Serving classified masks without the mask (attention.mask_serving), against a float64
reference with the mask: dropped no-op masks, trimmed keys (views for one run), per-row
calls, variable-length calls (emulated by per-row SDPA on the CPU), and the rows of
padded queries, which must equal what SDPA gives them with the mask."""

from __future__ import annotations

import pytest
import torch

from attention import dispatch, mask_serving
from attention.backend import BHND, BNHD, Backend
from attention.call import describe_call
from attention.constraints import NoMask
from attention.masks import KEY_PADDING, NOOP, classify
from mask_support import (EmulatedVarlen, additive, as_heads, hunyuan_joint_mask, hunyuan_refiner_mask, keep_mask,
                          make, reference)

H, D = 3, 16
FORMS = [(False, False), (False, True), (True, False), (True, True)]  # (skip_reshape, skip_output_reshape)


def maskless_backend(layout: str, seen: list) -> Backend:
    """A kernel that takes no mask (it would be wrong to hand it one), recording its inputs."""
    def kernel(q, k, v, mask, scale, kernel_layout):
        assert mask is None, "a mask reached a kernel that cannot honour it"
        seen.append((q, k, v))
        if kernel_layout == BNHD:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                               enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2) if kernel_layout == BNHD else out

    backend = Backend(f"maskless_{layout}", "test", "no masks", False, (layout,), (NoMask(),), lambda: kernel)
    assert backend.availability().available
    return backend


def sdpa_exact():
    backend = dispatch.registry.get("sdpa")
    assert backend.availability().available
    return backend.kernel()


def cases():
    """(name, batch, seq_q, seq_k, mask) for the masks ComfyUI's models build."""
    yield "hunyuan joint, text first", 1, 80, 80, hunyuan_joint_mask(keep_mask([5], 16), 64, txt_first=True)
    yield "hunyuan joint, image first, B=2", 2, 80, 80, hunyuan_joint_mask(keep_mask([5], 16), 64, txt_first=False)
    yield "ltxv cross, rows differ", 2, 40, 16, additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    yield "lumina2 long, B=1", 1, 12, 12, keep_mask([9], 12)
    yield "hunyuan refiner, dead rows", 2, 12, 12, hunyuan_refiner_mask(keep_mask([5, 9], 12))
    yield "bool, two runs per row", 2, 9, 20, torch.tensor([[True] * 4 + [False] * 6 + [True] * 10,
                                                            [False] * 3 + [True] * 17])[:, None, None]


def check(out, q, k, v, mask, mask_class, skip_reshape, skip_output_reshape):
    """Live query rows against float64 with the mask; dead rows against SDPA with the mask."""
    ref = reference(q, k, v, H, mask, skip_reshape, skip_output_reshape)
    token_dim = 2 if skip_output_reshape else 1
    live = torch.ones(out.shape[0], out.shape[token_dim], dtype=torch.bool)
    for row in range(out.shape[0]):
        for start, stop in mask_class.row_dead(row) if mask_class.kind == KEY_PADDING else ():
            live[row, start:stop] = False
    out_rows, ref_rows = (t.movedim(token_dim, 1) for t in (out, ref))
    torch.testing.assert_close(out_rows[live].double(), ref_rows[live], atol=2e-5, rtol=1e-4)
    if not live.all():
        m = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            *(as_heads(t, H, skip_reshape) for t in (q, k, v)), attn_mask=m)
        sdpa = sdpa if skip_output_reshape else sdpa.transpose(1, 2).reshape(out.shape)
        torch.testing.assert_close(out_rows[~live], sdpa.movedim(token_dim, 1)[~live], atol=1e-6, rtol=1e-5)


def build(service, mask_class, call, backend, varlen=None):
    inner = dispatch.Prepared(backend, mask_serving.served_signature(call, mask_class)).run
    if service == mask_serving.TRIMMED:
        run = mask_serving.trimmed(mask_class, call.layout_in, inner)
    elif service == mask_serving.PER_ROW:
        run = mask_serving.per_row(mask_class, call.layout_in, call.batch, inner)
    else:
        run = mask_serving.varlen(mask_class, call, varlen, torch.device("cpu"))
    return mask_serving.with_dead_queries(mask_class, call, run, sdpa_exact())


@pytest.mark.parametrize("skip_reshape,skip_output_reshape", FORMS)
@pytest.mark.parametrize("service", [mask_serving.TRIMMED, mask_serving.PER_ROW, "packed", "key_lengths"])
@pytest.mark.parametrize("layout", [BHND, BNHD])
def test_every_service_matches_float64_with_the_mask(service, layout, skip_reshape, skip_output_reshape):
    for i, (name, batch, seq_q, seq_k, mask) in enumerate(cases()):
        mask_class = classify(mask, batch, H, seq_q, seq_k)
        assert mask_class.kind == KEY_PADDING, name
        if service == mask_serving.TRIMMED and not mask_class.shared:
            continue  # rows that keep different keys cannot share one cut
        q, k, v = make(batch, H, seq_q, seq_k, D, skip_reshape, seed=i)
        call = describe_call(q, k, v, H, mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
        varlen = EmulatedVarlen(key_lengths=service == "key_lengths")
        run = build(service, mask_class, call, maskless_backend(layout, []), varlen.varlen)
        out = run(q, k, v, mask, None)
        assert out.shape == reference(q, k, v, H, mask, skip_reshape, skip_output_reshape).shape
        check(out, q, k, v, mask, mask_class, skip_reshape, skip_output_reshape)


def test_a_dropped_noop_mask_gives_the_masked_result():
    q, k, v = make(2, H, 10, 10, D, False)
    mask = torch.zeros(1, 1, 10)
    call = describe_call(q, k, v, H, mask)
    mask_class = classify(mask, 2, H, 10, 10)
    assert mask_class.kind == NOOP
    seen = []
    run = mask_serving.dropped(dispatch.Prepared(maskless_backend(BHND, seen), mask_serving.served_signature(
        call, mask_class)).run)
    check(run(q, k, v, mask, None), q, k, v, mask, mask_class, False, False)


def test_one_run_of_kept_keys_reaches_the_kernel_as_a_view():
    mask = hunyuan_joint_mask(keep_mask([5], 16), 64, txt_first=False)  # keys 0..68 kept
    q, k, v = make(1, H, 80, 80, D, False)
    call = describe_call(q, k, v, H, mask)
    mask_class = classify(mask, 1, H, 80, 80)
    seen = []
    build(mask_serving.TRIMMED, mask_class, call, maskless_backend(BNHD, seen))(q, k, v, mask, None)
    kernel_k = seen[0][1]
    assert kernel_k.shape[1] == 69
    assert kernel_k.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # no copy


def test_several_runs_are_copied_once_into_the_kept_keys():
    mask = hunyuan_joint_mask(keep_mask([5], 16), 64, txt_first=True)  # keys 0..4 and 16..79
    q, k, v = make(1, H, 80, 80, D, False)
    mask_class = classify(mask, 1, H, 80, 80)
    select = mask_serving.select_keys(mask_class.row_keys(0), describe_call(q, k, v, H, mask).layout_in)
    torch.testing.assert_close(select(k), torch.cat([k[:, :5], k[:, 16:]], dim=1))


def test_key_lengths_hand_the_kernel_the_padded_keys_without_copies():
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    q, k, v = make(2, H, 40, 16, D, False)
    call = describe_call(q, k, v, H, mask)
    varlen = EmulatedVarlen(key_lengths=True)
    mask_serving.varlen(classify(mask, 2, H, 40, 16), call, varlen.varlen, torch.device("cpu"))(q, k, v, mask, None)
    (record,) = varlen.calls
    assert record["kind"] == "key_lengths" and record["used_k"].dtype == torch.int32
    assert record["used_k"].tolist() == [7, 11]
    assert record["k"].untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert record["q"].untyped_storage().data_ptr() == q.untyped_storage().data_ptr()


def test_packed_rows_carry_int32_offsets_and_only_the_kept_keys():
    mask = torch.tensor([[True] * 4 + [False] * 6 + [True] * 10, [False] * 3 + [True] * 17])[:, None, None]
    q, k, v = make(2, H, 9, 20, D, False)
    call = describe_call(q, k, v, H, mask)
    varlen = EmulatedVarlen(key_lengths=True)  # rows are not prefixes: packed it must be
    mask_serving.varlen(classify(mask, 2, H, 9, 20), call, varlen.varlen, torch.device("cpu"))(q, k, v, mask, None)
    (record,) = varlen.calls
    assert record["kind"] == "packed"
    assert record["cu_q"].tolist() == [0, 9, 18] and record["cu_k"].tolist() == [0, 14, 31]
    assert record["cu_k"].dtype == record["cu_q"].dtype == torch.int32
    assert record["max_q"] == 9 and record["max_k"] == 17 and record["k"].shape == (31, H, D)
    assert record["q"].untyped_storage().data_ptr() == q.untyped_storage().data_ptr()  # flat q packs as a view


@pytest.mark.parametrize("service", [mask_serving.PER_ROW, "packed", "key_lengths"])
def test_grouped_query_attention_with_rows_that_differ(service):
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    q, k, v = make(2, H, 40, 16, D, False, heads_kv=1)
    call = describe_call(q, k, v, H, mask)
    mask_class = classify(mask, 2, H, 40, 16)
    run = build(service, mask_class, call, maskless_backend(BHND, []),
                EmulatedVarlen(key_lengths=service == "key_lengths").varlen)
    check(run(q, k, v, mask, None), q, k, v, mask, mask_class, False, False)


def test_a_custom_scale_reaches_every_service():
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    q, k, v = make(2, H, 40, 16, D, True)
    call = describe_call(q, k, v, H, mask, skip_reshape=True, skip_output_reshape=True, custom_scale=True)
    mask_class = classify(mask, 2, H, 40, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.05)
    for service in (mask_serving.PER_ROW, "packed", "key_lengths"):
        run = build(service, mask_class, call, maskless_backend(BNHD, []),
                    EmulatedVarlen(key_lengths=service == "key_lengths").varlen)
        torch.testing.assert_close(run(q, k, v, mask, 0.05), expected, atol=1e-5, rtol=1e-4)


def test_padded_query_rows_equal_sdpa_for_every_removal_value():
    """-inf rows (SDPA: zeros), -finfo.max rows (uniform), -1e4 rows (the scores survive):
    whatever SDPA makes of a row that removes every key, the served call gives it too."""
    keep = keep_mask([5, 9], 12)
    for removed in (float("-inf"), -torch.finfo(torch.float32).max, -1e4):
        txt = (1 - keep).float() * removed
        txt = torch.where(keep.bool(), torch.zeros(()), txt)
        m = txt.view(2, 1, 1, 12).repeat(1, 1, 12, 1)
        mask = torch.minimum(m, m.transpose(2, 3)) if removed == -1e4 else m + m.transpose(2, 3)
        mask_class = classify(mask, 2, H, 12, 12)
        assert mask_class.has_dead_queries, removed
        q, k, v = make(2, H, 12, 12, D, True)
        call = describe_call(q, k, v, H, mask, skip_reshape=True, skip_output_reshape=True)
        out = build(mask_serving.PER_ROW, mask_class, call, maskless_backend(BHND, []))(q, k, v, mask, None)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_served_signature_and_tensors_describe_the_mask_less_call():
    mask = additive(keep_mask([7, 11], 16)).reshape(2, 1, 1, 16)
    q, k, v = make(2, H, 40, 16, D, False)
    call = describe_call(q, k, v, H, mask)
    mask_class = classify(mask, 2, H, 40, 16)
    served = mask_serving.served_signature(call, mask_class)
    assert served.mask_kind == "none" and served.seq_k == 11 and served.batch == 2
    assert [r.seq_k for r in mask_serving.row_signatures(call, mask_class)] == [7, 11]
    _, k_served, _ = mask_serving.served_tensors(call, mask_class, q, k, v)
    assert k_served.shape == (2, 11, H * D)
