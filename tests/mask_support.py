"""Helpers for the mask tests: the masks ComfyUI's models build, a float64 reference,
and a CPU stand-in for the kernels' variable-length entries (per-row SDPA)."""

from __future__ import annotations

import torch

from attention.backend import Varlen
from library_support import reference_attention

MAX = torch.finfo(torch.float32).max


def as_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, H, N, D) from either call form."""
    if skip_reshape:
        return t
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def reference(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False):
    """ComfyUI's attention_pytorch semantics in float64 (library_support.reference_attention)."""
    return reference_attention(q, k, v, heads, mask, skip_reshape, skip_output_reshape)


def make(batch, heads, seq_q, seq_k, dim, skip_reshape, heads_kv=None, dtype=torch.float32, seed=0):
    heads_kv = heads if heads_kv is None else heads_kv
    g = torch.Generator().manual_seed(seed)
    if skip_reshape:
        shapes = [(batch, heads, seq_q, dim), (batch, heads_kv, seq_k, dim), (batch, heads_kv, seq_k, dim)]
    else:
        shapes = [(batch, seq_q, heads * dim), (batch, seq_k, heads_kv * dim), (batch, seq_k, heads_kv * dim)]
    return tuple(torch.randn(s, generator=g, dtype=dtype) for s in shapes)


def keep_mask(lengths: list[int], seq: int) -> torch.Tensor:
    """A text encoder's long attention mask: 1 for the first `length` tokens of each row."""
    keep = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        keep[row, :length] = 1
    return keep


def additive(keep: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """How HunyuanVideo, LTXV and Lumina2 (0.3.64) turn a long mask into an additive one."""
    return (keep - 1).to(dtype) * torch.finfo(dtype).max


def hunyuan_refiner_mask(keep: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """HunyuanVideo's IndividualTokenRefiner mask: (B, 1, N, N) = mask[key] + mask[query]."""
    txt = additive(keep, dtype)
    m = txt.view(txt.shape[0], 1, 1, txt.shape[1]).repeat(1, 1, txt.shape[1], 1)
    return m + m.transpose(2, 3)


def hunyuan_joint_mask(keep: torch.Tensor, img_len: int, txt_first: bool, dtype=torch.float32) -> torch.Tensor:
    """HunyuanVideo's (1, 1, L) joint mask: text first from ComfyUI 0.19, image first before."""
    txt = additive(keep, dtype)
    mask = torch.zeros((1, 1, img_len + txt.shape[1]), dtype=dtype)
    if txt_first:
        mask[:, 0, :txt.shape[1]] = txt
    else:
        mask[:, 0, img_len:] = txt
    return mask


class EmulatedVarlen:
    """The kernels' variable-length entries, served by per-row SDPA on the CPU, recording
    what they were handed."""

    def __init__(self, key_lengths: bool) -> None:
        self.calls: list[dict] = []
        self.varlen = Varlen(self.packed, self.key_lengths if key_lengths else None)

    def packed(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
        self.calls.append(dict(kind="packed", q=q, k=k, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k,
                               max_q=max_seqlen_q, max_k=max_seqlen_k))
        out = torch.empty_like(q)
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for row in range(len(bounds_q) - 1):
            qs, qe, ks, ke = bounds_q[row], bounds_q[row + 1], bounds_k[row], bounds_k[row + 1]
            out[qs:qe] = _sdpa_nhd(q[qs:qe], k[ks:ke], v[ks:ke], scale)
        return out

    def key_lengths(self, q, k, v, used_k, scale):
        self.calls.append(dict(kind="key_lengths", q=q, k=k, used_k=used_k))
        return torch.stack([_sdpa_nhd(q[row], k[row, :n], v[row, :n], scale)
                            for row, n in enumerate(used_k.tolist())])


def _sdpa_nhd(q, k, v, scale):
    """(N, H, D) tensors through SDPA."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)
