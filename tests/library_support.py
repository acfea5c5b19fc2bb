"""Helpers shared by the library tests (a module of its own: `conftest` names clash
between test folders)."""

from __future__ import annotations

import os

import torch

from attention.backend import BHND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sdpa_kernel(q, k, v, mask, scale, layout):
    assert layout == BHND
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def reference_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, scale=None):
    """ComfyUI's attention_pytorch semantics in float64, GQA and every mask form included."""
    def heads_first(t, heads_of_t):
        t = t.double()
        return t if skip_reshape else t.view(t.shape[0], t.shape[1], heads_of_t, -1).transpose(1, 2)
    heads_kv = k.shape[1] if skip_reshape else k.shape[-1] // (q.shape[-1] // heads)
    q64, k64, v64 = heads_first(q, heads), heads_first(k, heads_kv), heads_first(v, heads_kv)
    if k64.shape[1] != q64.shape[1]:
        repeat = q64.shape[1] // k64.shape[1]
        k64, v64 = k64.repeat_interleave(repeat, 1), v64.repeat_interleave(repeat, 1)
    scores = q64 @ k64.transpose(-1, -2) * (scale if scale is not None else q64.shape[-1] ** -0.5)
    if mask is not None:
        m = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        elif not m.dtype.is_floating_point:
            scores = scores.masked_fill(m == 0, float("-inf"))
        else:
            scores = scores + m.double()
    out = scores.softmax(-1) @ v64
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
