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
