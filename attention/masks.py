"""Which masks change an attention call: each mask tensor classified once per model call.

Many masks that reach attention remove nothing, or only remove keys (DESIGN §3, Masks):
HunyuanVideo's text-padding mask is all zeros for an unpadded prompt, LTXV's and
Lumina2's remove the padded text tokens. A kernel without mask support serves such a
call exactly once someone has read the values, and reading them costs a device
synchronisation. So a mask tensor is read once, through one transfer of a few small
reductions, and the answer is kept by a `MaskCache` for the rest of the model call
(a model passes the same mask tensor to every block).

The classes, against the call's (B, H, Nq, Nk) and ComfyUI's broadcasting rules
(2-D is (Nq, Nk), 3-D is (B, Nq, Nk)):
- NOOP: removes nothing and adds nothing (additive all zeros, bool all True, integer
  all nonzero). The mask can be dropped.
- KEY_PADDING: in each batch row the removed keys are the same for every query and
  every head; kept keys carry exactly 0 (additive). Query rows that remove *every* key
  (padded queries of self-attention over padded text, HunyuanVideo's token refiner)
  are allowed when every head agrees, and recorded as dead rows: what SDPA gives for
  them depends on the removal values, so they are computed the way SDPA computes them.
- GENERAL: anything else: biases (Redux), per-query patterns (causal-like), padding
  that differs between heads, masks that do not broadcast. Served with the mask.

"Removed" means False (bool), 0 (integer: nonzero attends, as in layout.mask_adapter),
or additive at or below REMOVED_AT_OR_BELOW, which -inf and -finfo(dtype).max of every
float type are. Such a key gets a softmax weight of exactly zero next to a kept key
unless the scores of the row spread over more than ~9,900: exp(-1e4 + 104) underflows
float32 (and bfloat16, same exponent range), and kernels accumulate softmax in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from typing import Iterator, Optional

import torch

from .counters import count_value

NOOP = "noop"
KEY_PADDING = "key_padding"
GENERAL = "general"

# Additive values at or below this remove the key (see the module docstring).
REMOVED_AT_OR_BELOW = -1.0e4

# A cache used without model-call boundaries (the library alone) forgets everything past
# this many entries: it holds each classified mask alive, so it must not grow unbounded.
MAX_ENTRIES = 64

# Kept key runs (or dead query runs) of one batch row: sorted, disjoint [start, stop).
Runs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class MaskClass:
    """What a mask does to one call shape.

    keys: for KEY_PADDING, the kept key runs of each batch row; one entry when every
        row keeps the same keys (a mask broadcast over the batch, or equal rows).
    dead_queries: for KEY_PADDING, the query runs of each batch row (same indexing as
        `keys`) whose every key is removed; empty runs where there are none.
    reason: for GENERAL, why the mask must stay (logs and reports only: two GENERAL
        classes compare equal, so they share a plan).
    """

    kind: str
    keys: tuple[Runs, ...] = ()
    dead_queries: tuple[Runs, ...] = ()
    reason: str = dataclasses.field(default="", compare=False)

    @property
    def shared(self) -> bool:
        """Every batch row keeps the same keys and has the same dead query rows."""
        return len(self.keys) <= 1

    def row_keys(self, row: int) -> Runs:
        return self.keys[0 if self.shared else row]

    def row_dead(self, row: int) -> Runs:
        return self.dead_queries[0 if self.shared else row]

    def kept(self, row: int) -> int:
        """How many keys batch row `row` keeps."""
        return sum(stop - start for start, stop in self.row_keys(row))

    @property
    def max_kept(self) -> int:
        return max(sum(stop - start for start, stop in runs) for runs in self.keys)

    @property
    def has_dead_queries(self) -> bool:
        return any(self.dead_queries)

    @property
    def prefix_only(self) -> bool:
        """Each row keeps one run of keys that starts at key 0 (a kernel's seqused_k form)."""
        return all(len(runs) == 1 and runs[0][0] == 0 for runs in self.keys)

    def describe(self, seq_k: Optional[int] = None) -> str:
        if self.kind == NOOP:
            return "no-op mask"
        if self.kind == GENERAL:
            return f"general mask ({self.reason})" if self.reason else "general mask"
        of = f"/{seq_k}" if seq_k is not None else ""
        kept = ", ".join(str(sum(b - a for a, b in runs)) + of for runs in self.keys)
        dead = sum(b - a for runs in self.dead_queries for a, b in runs)
        text = f"key padding (keeps {kept} keys" + (" per row" if not self.shared else "")
        return text + (f"; {dead} fully masked query rows)" if dead else ")")


def general(reason: str) -> MaskClass:
    return MaskClass(GENERAL, reason=reason)


def _to_host(flat: torch.Tensor) -> torch.Tensor:
    """The one device synchronisation of a classification."""
    return flat.cpu()


def _canonical(mask: torch.Tensor) -> torch.Tensor:
    """The 4-D view ComfyUI's attention_pytorch broadcasts: 2-D (Nq, Nk), 3-D (B, Nq, Nk)."""
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask.unsqueeze(1)
    return mask


def _removed_and_biased(mask: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(where a key is removed, where a kept key gets a nonzero bias, or None if it cannot)."""
    if mask.dtype == torch.bool:
        return ~mask, None
    if not mask.dtype.is_floating_point:
        return mask == 0, None
    removed = mask <= REMOVED_AT_OR_BELOW  # NaN compares False: it lands in `biased`
    return removed, ~removed & (mask != 0)


def _runs(flags: torch.Tensor) -> Runs:
    """Runs of True in a 1-D host bool tensor, as [start, stop) pairs."""
    edges = torch.diff(torch.nn.functional.pad(flags.to(torch.int8), (1, 1))).nonzero().flatten().tolist()
    return tuple(zip(edges[0::2], edges[1::2]))


def classify(mask: torch.Tensor, batch: int, heads: int, seq_q: int, seq_k: int) -> MaskClass:
    """Classify `mask` for a call of (batch, heads, seq_q, seq_k); one device synchronisation."""
    if mask.ndim not in (2, 3, 4):
        return general(f"a {mask.ndim}-D mask")
    m = _canonical(mask)
    target = (batch, heads, seq_q, seq_k)
    if any(have not in (1, want) for have, want in zip(m.shape, target)):
        return general(f"shape {list(mask.shape)} does not broadcast to {list(target)}")
    rows, mask_heads, mask_q, mask_k = m.shape
    removed, biased = _removed_and_biased(m)
    # Per batch row and key, how many (head, query) rows remove it. A dead row removes
    # every key, so "every live row removes it" is "every row does", and "some live row
    # does" is "more rows than the dead ones do": counts, no mask-sized temporaries.
    dead = removed.all(dim=-1)                                               # (Bm, Hm, Qm)
    removing = removed.flatten(1, 2).sum(dim=1)                              # (Bm, Km)
    some = removing > dead.flatten(1).sum(dim=1, keepdim=True)               # in some live row
    every = removing == mask_heads * mask_q                                  # in every live row
    parts = (torch.zeros(1, dtype=torch.bool, device=m.device) if biased is None else biased.any().view(1),
             some.flatten(), every.flatten(), dead.any(dim=1).flatten(), dead.all(dim=1).flatten())
    host = _to_host(torch.cat(parts))
    biased_h, some_h, every_h, dead_some, dead_every = host.split(
        [1, rows * mask_k, rows * mask_k, rows * mask_q, rows * mask_q])
    dead_rows = dead_every.view(rows, mask_q)
    if biased_h.item():
        return general("it adds a bias to keys it keeps")
    if dead_rows.all(dim=1).any():
        return general("every query of a batch row attends to nothing")
    if not torch.equal(dead_some, dead_every):
        return general("it removes every key of some query rows in some heads only")
    if not torch.equal(some_h, every_h):
        return general("the keys it removes differ between queries or heads")

    kept = (~every_h).view(rows, mask_k).expand(rows, seq_k)
    keys = tuple(_runs(kept[row]) for row in range(rows))
    dead_queries = tuple(_runs(dead_rows[row]) if mask_q == seq_q else () for row in range(rows))
    if all(runs == ((0, seq_k),) for runs in keys) and not any(dead_queries):
        return MaskClass(NOOP)
    if all(runs == keys[0] for runs in keys) and all(runs == dead_queries[0] for runs in dead_queries):
        keys, dead_queries = keys[:1], dead_queries[:1]
    return MaskClass(KEY_PADDING, keys, dead_queries)


def _version(mask: torch.Tensor) -> Optional[int]:
    # Inference tensors (ComfyUI samples under inference_mode) keep no version counter;
    # for them the model-call boundary alone bounds how long a classification is trusted.
    return None if mask.is_inference() else mask._version


class MaskCache:
    """Classifications of the mask tensors met in the current model call.

    Keyed by what the data is (storage address, shape, strides, dtype, device) and the
    call shape; an entry holds its mask alive, so that address cannot be reused by
    another tensor while the entry stands, and is valid while the tensor's version
    counter is unchanged (an in-place write reclassifies). Different tensor objects
    viewing the same memory the same way (what torch.compile may pass) share an entry.

    The node clears it at every model call (`model_call()`, or `begin_model_call()`
    and `end_model_call()` from an APPLY_MODEL wrapper), which is the boundary after
    which a model builds its masks again. Entries are per thread: ComfyUI 0.28 runs
    each GPU's model calls on its own thread with the same options.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        # Masks read from the device since the last reset (reports, tests); an
        # itertools.count, exact when threads classify at once (dispatch.py).
        self._reads = itertools.count()

    @property
    def classifications(self) -> int:
        return count_value(self._reads)

    def reset_count(self) -> None:
        self._reads = itertools.count()

    def _entries(self) -> dict:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = {}
        return entries

    def classify(self, mask: torch.Tensor, batch: int, heads: int, seq_q: int, seq_k: int) -> MaskClass:
        """The class of `mask` for this call shape, read from the device at most once per model call."""
        entries = self._entries()
        key = (mask.data_ptr(), mask.shape, mask.stride(), mask.dtype, mask.device, batch, heads, seq_q, seq_k)
        entry = entries.get(key)
        version = _version(mask)
        if entry is not None and entry[1] == version:
            return entry[2]
        result = classify(mask, batch, heads, seq_q, seq_k)
        next(self._reads)
        if len(entries) >= MAX_ENTRIES:
            entries.clear()
        entries[key] = (mask, version, result)
        return result

    def begin_model_call(self) -> None:
        """Forget this thread's classifications: a new model call builds its masks again."""
        self._entries().clear()

    def end_model_call(self) -> None:
        """Forget this thread's classifications and release the masks they hold."""
        self._entries().clear()

    @contextlib.contextmanager
    def model_call(self) -> Iterator[None]:
        self.begin_model_call()
        try:
            yield
        finally:
            self.end_model_call()
