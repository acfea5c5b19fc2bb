"""Sequence-parallel (Ulysses) attention over a torch.distributed process group.

In a sequence-parallel model (raylight, xDiT's USP, DeepSpeed-Ulysses), every process
holds the whole model and one shard of the token sequence. Attention needs every token,
so around the local kernel:
1. one all-to-all turns "all heads, my tokens" into "my heads, all tokens" (q, k and v
   travel in one exchange);
2. the local kernel (a Dispatcher: any backend of ours, `auto` by default) attends over
   the whole sequence for this process's heads;
3. one all-to-all turns the output back into "all heads, my tokens".

Heads are divided by key heads (a GQA group travels whole), as evenly as they go: 40
heads over 3 processes is 14, 13, 13. Shards are assumed equal unless the call names
every process's length (`seq_lens_q` / `seq_lens_k`), as with a sequence that does not
divide by the world size; xDiT and raylight pad to equal shards instead.

Calls take ComfyUI's attention-function form, (q, k, v, heads, mask, attn_precision,
skip_reshape, skip_output_reshape, **kwargs) with `scale` and `low_precision_attention`
read from the keywords, so an instance can stand where a sequence-parallel forward calls
`optimized_attention` (docs/parallel.md). Masks are the model's whole-sequence masks,
broadcast against (B, H, N, N): each process keeps its heads' part and hands it to the
local kernel, which honours it or falls back as it would on one GPU. A mask that covers
only the local shard cannot be right for whole-sequence attention and is refused.
Cross-attention whose keys every process holds in full (text tokens) needs no exchange:
pass `kv_sharded=False`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..dispatch import Dispatcher
from ..registry import AUTO
from .cost import apportion


class UlyssesAttention:
    """Sequence-parallel attention over `group` (default: the whole world) with `attend`
    (a Dispatcher or a callable with its signature) as the local kernel."""

    def __init__(self, attend: Optional[Callable[..., torch.Tensor]] = None,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Ulysses attention needs torch.distributed initialised "
                               "(torch.distributed.init_process_group) before it is built")
        self.attend = attend if attend is not None else Dispatcher(AUTO)
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 mask: Optional[torch.Tensor] = None, attn_precision: Optional[torch.dtype] = None,
                 skip_reshape: bool = False, skip_output_reshape: bool = False, *, kv_sharded: bool = True,
                 seq_lens_q: Optional[Sequence[int]] = None, seq_lens_k: Optional[Sequence[int]] = None,
                 **kwargs: Any) -> torch.Tensor:
        local = dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, scale=kwargs.get("scale"),
                     attn_precision=attn_precision, low_precision=kwargs.get("low_precision_attention", True))
        if self.world == 1 or not kv_sharded:
            return self.attend(q, k, v, heads, mask, **local)
        if not q.dtype == k.dtype == v.dtype:
            raise ValueError(f"Ulysses attention sends q, k and v in one buffer: they must share a dtype "
                             f"(got {q.dtype}, {k.dtype}, {v.dtype})")
        q4, k4, v4 = _heads_first(q, k, v, heads, skip_reshape)
        batch, heads_q, seq_q, dim = q4.shape
        heads_kv, seq_k, dim_v = k4.shape[1], k4.shape[2], v4.shape[-1]
        lens_q = self._lengths(seq_lens_q, seq_q, "seq_lens_q")
        lens_k = self._lengths(seq_lens_k, seq_k, "seq_lens_k")
        group_size = heads_q // heads_kv
        kv_counts = self._key_heads(heads_kv)
        kv_starts = [sum(kv_counts[:r]) for r in range(self.world)]
        my_kv = slice(kv_starts[self.rank], kv_starts[self.rank] + kv_counts[self.rank])
        my_q = slice(my_kv.start * group_size, my_kv.stop * group_size)
        local_mask = self._mask(mask, heads_q, sum(lens_q), sum(lens_k), my_q)

        # 1. all heads of my tokens -> my heads of all tokens (q, k and v in one exchange).
        kv_of = [slice(kv_starts[r], kv_starts[r] + kv_counts[r]) for r in range(self.world)]
        sends = [[q4[:, kv.start * group_size:kv.stop * group_size], k4[:, kv], v4[:, kv]] for kv in kv_of]
        received_shapes = [[(batch, my_q.stop - my_q.start, lens_q[r], dim),
                            (batch, kv_counts[self.rank], lens_k[r], dim),
                            (batch, kv_counts[self.rank], lens_k[r], dim_v)] for r in range(self.world)]
        pieces = self._exchange(sends, received_shapes, q4)
        gathered = [torch.cat([pieces[r][i] for r in range(self.world)], dim=2) for i in range(3)]

        # 2. the local kernel over the whole sequence, for my heads.
        out = self.attend(gathered[0], gathered[1], gathered[2], my_q.stop - my_q.start, local_mask,
                          **{**local, "skip_reshape": True, "skip_output_reshape": True})

        # 3. my heads of all tokens -> all heads of my tokens.
        offsets = [sum(lens_q[:r]) for r in range(self.world)]
        back = [[out[:, :, offsets[r]:offsets[r] + lens_q[r]]] for r in range(self.world)]
        back_shapes = [[(batch, kv_counts[r] * group_size, seq_q, dim_v)] for r in range(self.world)]
        outputs = [p[0] for p in self._exchange(back, back_shapes, out)]
        return _caller_form(outputs, batch, heads_q, seq_q, dim_v, skip_output_reshape)

    def _lengths(self, given: Optional[Sequence[int]], local: int, name: str) -> list[int]:
        if given is None:
            return [local] * self.world
        lengths = [int(n) for n in given]
        if len(lengths) != self.world or lengths[self.rank] != local:
            raise ValueError(f"{name} must list every process's sequence length ({self.world} values) with "
                             f"this process's ({local}) at its rank ({self.rank}); got {lengths}")
        return lengths

    def _key_heads(self, heads_kv: int) -> list[int]:
        if heads_kv < self.world:
            raise ValueError(f"Ulysses attention gives each process whole key heads: {heads_kv} key heads cannot be "
                             f"shared by {self.world} processes; use at most {heads_kv} processes for this model")
        return apportion(heads_kv, [1.0] * self.world)

    def _mask(self, mask: Optional[torch.Tensor], heads: int, seq_q: int, seq_k: int,
              mine: slice) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        full = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
        if full.ndim != 4 or full.shape[-1] != seq_k or full.shape[-2] not in (1, seq_q):
            raise ValueError(
                f"Ulysses attention attends over the whole sequence ({seq_q} queries, {seq_k} keys), so a mask must "
                f"broadcast against (B, H, {seq_q}, {seq_k}); got {list(mask.shape)}. Pass the model's unsharded "
                f"mask (a mask built for this process's shard only cannot be right here).")
        return full[:, mine] if full.shape[1] == heads and heads > 1 else full

    def _exchange(self, sends: list[list[torch.Tensor]], received: list[list[tuple[int, ...]]],
                  like: torch.Tensor) -> list[list[torch.Tensor]]:
        """One all_to_all_single: sends[r] holds the views for rank r, packed in order
        (one copy each); returns, per source rank, its pieces in the shapes `received` gives."""
        send_sizes = [sum(view.numel() for view in views) for views in sends]
        send = torch.empty(sum(send_sizes), dtype=like.dtype, device=like.device)
        offset = 0
        for views in sends:
            for view in views:
                send[offset:offset + view.numel()].view(view.shape).copy_(view)
                offset += view.numel()
        receive_sizes = [sum(_numel(shape) for shape in shapes) for shapes in received]
        buffer = torch.empty(sum(receive_sizes), dtype=like.dtype, device=like.device)
        dist.all_to_all_single(buffer, send, receive_sizes, send_sizes, group=self.group)
        pieces, offset = [], 0
        for shapes in received:
            mine = []
            for shape in shapes:
                mine.append(buffer[offset:offset + _numel(shape)].view(shape))
                offset += _numel(shape)
            pieces.append(mine)
        return pieces


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 skip_reshape: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, N, D) views of ComfyUI's call forms."""
    if skip_reshape:
        return q, k, v
    dim = q.shape[-1] // heads
    heads_kv = k.shape[-1] // dim
    return (q.view(q.shape[0], q.shape[1], heads, dim).transpose(1, 2),
            k.view(k.shape[0], k.shape[1], heads_kv, dim).transpose(1, 2),
            v.view(v.shape[0], v.shape[1], heads_kv, v.shape[-1] // heads_kv).transpose(1, 2))


def _caller_form(pieces: list[torch.Tensor], batch: int, heads: int, seq: int, dim_v: int,
                 skip_output_reshape: bool) -> torch.Tensor:
    """The heads every process sent back, side by side, in the form the caller asked for."""
    if skip_output_reshape:
        return torch.cat(pieces, dim=1)
    out = torch.empty(batch, seq, heads, dim_v, dtype=pieces[0].dtype, device=pieces[0].device)
    start = 0
    for piece in pieces:
        out[:, :, start:start + piece.shape[1]].copy_(piece.transpose(1, 2))
        start += piece.shape[1]
    return out.view(batch, seq, heads * dim_v)
