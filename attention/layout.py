"""Views between ComfyUI's call forms and the kernels' native layouts, and mask forms.

Everything here is chosen once per call signature (`input_view`, `output_view`,
`mask_adapter` return small functions) so a call pays only for the views themselves.
Views never copy; a copy happens only where a kernel declares it needs contiguous
inputs, or where the output form needs a different memory order.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .backend import BHND, BNHD
from .call import FLAT, HEADS_FIRST, MASK_BOOL, MASK_INTEGER, MASK_NONE

View = Callable[[torch.Tensor], torch.Tensor]


def _flat_to_bnhd(heads: int) -> View:
    def view(t: torch.Tensor) -> torch.Tensor:
        b, n, width = t.shape
        return t.view(b, n, heads, width // heads)
    return view


def _flat_to_bhnd(heads: int) -> View:
    def view(t: torch.Tensor) -> torch.Tensor:
        b, n, width = t.shape
        return t.view(b, n, heads, width // heads).transpose(1, 2)
    return view


def _swap_heads_and_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def native_layout(layout_in: str, accepted: tuple[str, ...]) -> str:
    """The kernel layout that costs nothing to reach from the call's form, if accepted."""
    free = BNHD if layout_in == FLAT else BHND
    return free if free in accepted else accepted[0]


def input_view(layout_in: str, layout: str, heads: int, contiguous: bool) -> View:
    """Function taking one of q/k/v in the call's form to `layout`.

    `heads` is the tensor's own head count (key heads for k and v under GQA).
    """
    if layout_in == FLAT:
        view = _flat_to_bnhd(heads) if layout == BNHD else _flat_to_bhnd(heads)
    else:
        view = _identity if layout == BHND else _swap_heads_and_tokens
    if not contiguous:
        return view
    return lambda t: view(t).contiguous()


def output_view(layout: str, layout_out: str) -> View:
    """Function taking a kernel's output in `layout` to the form the caller asked for."""
    if layout_out == HEADS_FIRST:
        return _identity if layout == BHND else _swap_heads_and_tokens
    if layout == BNHD:
        return lambda o: o.reshape(o.shape[0], o.shape[1], o.shape[2] * o.shape[3])
    # BHND -> (B, N, H*D): free when the kernel wrote token-major memory (SDPA does for
    # token-major inputs), one copy otherwise, exactly as ComfyUI's attention_pytorch.
    return lambda o: o.transpose(1, 2).reshape(o.shape[0], o.shape[2], o.shape[1] * o.shape[3])


def mask_adapter(kind: str, ndim: int, dtype: torch.dtype) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Function taking the call's mask to a 4-D mask broadcastable to (B, H, Nq, Nk):
    bool (True = attend) or additive in the query dtype. None for mask-less calls.

    Shapes follow ComfyUI's attention_pytorch: 2-D is (Nq, Nk), 3-D is (B, Nq, Nk).
    An integer mask (Lumina2 padding) becomes bool: nonzero attends.
    """
    if kind == MASK_NONE:
        return None

    def unsqueeze(m: torch.Tensor) -> torch.Tensor:
        if ndim == 2:
            return m[None, None]
        if ndim == 3:
            return m.unsqueeze(1)
        return m

    if kind == MASK_BOOL:
        return unsqueeze
    if kind == MASK_INTEGER:
        return lambda m: unsqueeze(m != 0)
    return lambda m: unsqueeze(m if m.dtype == dtype else m.to(dtype))
