"""Serving no-op and key-padding masks (masks.py) on kernels that take no mask.

Each builder runs once per plan and returns the per-call function, `run(q, k, v, mask,
scale)` in ComfyUI's call form like the dispatcher's own; a call then pays for views,
the copies named below, and the kernel. How a masked call is served:

- DROPPED: a no-op mask is left out.
- TRIMMED: every batch row keeps the same keys, so k and v are cut to them: views when
  the kept keys are one run, one copy of the kept keys when they are several.
- VARLEN: rows keep different keys and the kernel has a variable-length entry. With
  per-row key counts (FA4's seqused_k) and every row keeping a prefix, nothing is
  copied; otherwise rows are packed (cu_seqlens): one copy of the kept keys, and of q
  when its rows do not merge into one dimension as a view.
- PER_ROW: rows keep different keys and the kernel has no variable-length entry: one
  trimmed call per batch row, outputs joined along the batch (one copy of the output).
- KEPT: the mask stays and a kernel that honours masks serves the call.

Query rows whose every key is removed (dead rows) are then written with what SDPA
gives them with the mask, computed by SDPA on those rows alone. That output depends on
the removal values and on rounding (zeros for -inf or False rows on current PyTorch;
for finite values such as -finfo.max the scores drown in the mask and the weights turn
uniform over the least-removed keys), so it is computed, never guessed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from . import registry
from .backend import BHND, BNHD, Backend, Kernel, Varlen
from .call import FLAT, HEADS_FIRST, MASK_NONE, CallSignature
from .layout import input_view, mask_adapter, output_view
from .masks import NOOP, MaskClass, Runs

DROPPED = "dropped"
TRIMMED = "keys_trimmed"
VARLEN = "varlen"
PER_ROW = "per_row"
KEPT = "kept"
SERVICES = (DROPPED, TRIMMED, VARLEN, PER_ROW, KEPT)

Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[float]], torch.Tensor]


def _token_dim(layout_in: str) -> int:
    return 1 if layout_in == FLAT else 2


def select_keys(runs: Runs, layout_in: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Function cutting k or v (call form) to the kept key runs: a view for one run."""
    dim = _token_dim(layout_in)
    if len(runs) == 1:
        start, stop = runs[0]
        return lambda t: t.narrow(dim, start, stop - start)
    return lambda t: torch.cat([t.narrow(dim, start, stop - start) for start, stop in runs], dim)


def served_signature(call: CallSignature, mask_class: MaskClass) -> CallSignature:
    """The mask-less call a kernel is chosen for: the kept keys (the longest row's count
    when rows differ)."""
    seq_k = call.seq_k if mask_class.kind == NOOP else mask_class.max_kept
    return dataclasses.replace(call, mask_kind=MASK_NONE, mask_shape=None, seq_k=seq_k)


def row_signatures(call: CallSignature, mask_class: MaskClass) -> list[CallSignature]:
    """The call of each batch row on its own, as PER_ROW makes them."""
    return [dataclasses.replace(call, mask_kind=MASK_NONE, mask_shape=None, batch=1, seq_k=mask_class.kept(row))
            for row in range(call.batch)]


def served_tensors(call: CallSignature, mask_class: MaskClass, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors shaped like `served_signature` (for runtime checks and tuning): the kept keys
    when rows agree, otherwise the first `max_kept` keys (the shape, not a row's keys)."""
    if mask_class.kind == NOOP:
        return q, k, v
    if mask_class.shared:
        select = select_keys(mask_class.row_keys(0), call.layout_in)
    else:
        select = select_keys(((0, mask_class.max_kept),), call.layout_in)
    return q, select(k), select(v)


def dropped(inner: Run) -> Run:
    def run(q, k, v, mask, scale):
        return inner(q, k, v, None, scale)
    return run


def trimmed(mask_class: MaskClass, layout_in: str, inner: Run) -> Run:
    select = select_keys(mask_class.row_keys(0), layout_in)

    def run(q, k, v, mask, scale):
        return inner(q, select(k), select(v), None, scale)
    return run


def per_row(mask_class: MaskClass, layout_in: str, batch: int, inner: Run) -> Run:
    selects = [select_keys(mask_class.row_keys(row), layout_in) for row in range(batch)]

    def run(q, k, v, mask, scale):
        return torch.cat([inner(q[row:row + 1], select(k[row:row + 1]), select(v[row:row + 1]), None, scale)
                          for row, select in enumerate(selects)])
    return run


def varlen(mask_class: MaskClass, call: CallSignature, kernel: Varlen, device: torch.device) -> Run:
    """One variable-length launch for rows that keep different keys. The small int32
    tensors it needs are made here, once per plan."""
    view_q = input_view(call.layout_in, BNHD, call.heads_q, False)
    view_kv = input_view(call.layout_in, BNHD, call.heads_kv, False)
    view_out = output_view(BNHD, call.layout_out)
    batch, seq_q = call.batch, call.seq_q
    lengths = [mask_class.kept(row) for row in range(batch)]

    if kernel.key_lengths is not None and mask_class.prefix_only:
        used_k = torch.tensor(lengths, dtype=torch.int32, device=device)
        key_lengths = kernel.key_lengths

        def run_key_lengths(q, k, v, mask, scale):
            return view_out(key_lengths(view_q(q), view_kv(k), view_kv(v), used_k, scale))
        return run_key_lengths

    cu_seqlens_q = torch.arange(0, (batch + 1) * seq_q, seq_q, dtype=torch.int32, device=device)
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    cu_seqlens_k = torch.tensor(starts, dtype=torch.int32, device=device)
    max_k = max(lengths)
    pieces = [(row, start, stop - start) for row in range(batch) for start, stop in mask_class.row_keys(row)]
    packed = kernel.packed

    def run_packed(q, k, v, mask, scale):
        qn, kn, vn = view_q(q), view_kv(k), view_kv(v)
        packed_k = torch.cat([kn[row].narrow(0, start, length) for row, start, length in pieces])
        packed_v = torch.cat([vn[row].narrow(0, start, length) for row, start, length in pieces])
        out = packed(qn.reshape(batch * seq_q, qn.shape[2], qn.shape[3]), packed_k, packed_v, cu_seqlens_q,
                     cu_seqlens_k, seq_q, max_k, scale)
        return view_out(out.view(batch, seq_q, out.shape[-2], out.shape[-1]))
    return run_packed


def with_dead_queries(mask_class: MaskClass, call: CallSignature, run: Run, exact: Kernel) -> Run:
    """`run`, then each dead query row written with `exact` (SDPA, BHND) on those rows and
    their mask rows: the output SDPA gives them with the mask."""
    if not mask_class.has_dead_queries:
        return run
    adapt = mask_adapter(call.mask_kind, len(call.mask_shape or ()), call.dtype)
    view_q = input_view(call.layout_in, BHND, call.heads_q, False)
    view_kv = input_view(call.layout_in, BHND, call.heads_kv, False)
    rows = [(row, start, stop) for row in range(call.batch) for start, stop in mask_class.row_dead(row)]
    heads_first = call.layout_out == HEADS_FIRST

    def fixed(q, k, v, mask, scale):
        out = run(q, k, v, mask, scale)
        m = adapt(mask)
        qh, kh, vh = view_q(q), view_kv(k), view_kv(v)
        for row, start, stop in rows:
            mask_row = row if m.shape[0] > 1 else 0
            rows_out = exact(qh[row:row + 1, :, start:stop], kh[row:row + 1], vh[row:row + 1],
                             m[mask_row:mask_row + 1, :, start:stop], scale, BHND)
            if heads_first:
                out[row:row + 1, :, start:stop] = rows_out
            else:
                out[row:row + 1, start:stop] = rows_out.transpose(1, 2).reshape(1, stop - start, -1)
        return out
    return fixed


def serving_run(mask_class: MaskClass, call: CallSignature, backend: Backend, inner: Run,
                device: torch.device) -> Optional[tuple[str, Run]]:
    """(how, run) for `backend`, chosen for `served_signature`, to serve the masked `call`;
    None where the mask had better stay: rows that keep different keys on a kernel that
    honours masks itself (one launch with the mask rather than one per row), or a row
    the kernel cannot take on its own.

    `inner` is the backend's mask-less run for calls shaped like the served signature
    (it takes any batch and key count).
    """
    if mask_class.kind == NOOP:
        service, run = DROPPED, dropped(inner)
    elif mask_class.shared:
        service, run = TRIMMED, trimmed(mask_class, call.layout_in, inner)
    else:
        entry = backend.varlen()
        if entry is not None:
            service, run = VARLEN, varlen(mask_class, call, entry, device)
        elif not backend.call_reasons(call):
            return None
        elif any(backend.call_reasons(row) for row in row_signatures(call, mask_class)):
            return None
        else:
            service, run = PER_ROW, per_row(mask_class, call.layout_in, call.batch, inner)
    return service, with_dead_queries(mask_class, call, run, _sdpa_kernel())


def _sdpa_kernel() -> Kernel:
    """PyTorch's SDPA (available wherever torch is): what dead query rows are computed with."""
    sdpa = registry.get("sdpa")
    sdpa.availability()
    return sdpa.kernel()
