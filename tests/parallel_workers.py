"""Processes for the Ulysses tests (a module of its own: spawned processes import it).

Every process builds the same global q, k, v from a seed, keeps its sequence shard, runs
Ulysses attention over gloo and compares its shard of the output with a float64
reference of the whole call. Each case runs on the whole world (4 processes) and on two
groups of 2 (ranks 0-1 and 2-3) at once. Results go to one JSON file per rank.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

from attention import Dispatcher
from attention.parallel.ulysses import UlyssesAttention
from library_support import reference_attention

B, D = 2, 8
TIMEOUT = datetime.timedelta(seconds=60)


def _shards(total: int, lens: list[int]) -> list[slice]:
    offsets = [sum(lens[:r]) for r in range(len(lens))]
    return [slice(o, o + n) for o, n in zip(offsets, lens)]


def _tensors(seed: int, heads: int, heads_kv: int, seq_q: int, seq_k: int, flat: bool):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, seq_q, D, generator=g)
    k = torch.randn(B, heads_kv, seq_k, D, generator=g)
    v = torch.randn(B, heads_kv, seq_k, D, generator=g)
    if flat:
        q, k, v = (t.transpose(1, 2).reshape(B, t.shape[2], -1) for t in (q, k, v))
    return q, k, v


def _seq(t: torch.Tensor, part: slice, flat: bool) -> torch.Tensor:
    return t[:, part] if flat else t[:, :, part]


def _mask(kind: str, heads: int, seq_q: int, seq_k: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    if kind == "key_padding":
        mask = torch.zeros(1, 1, 1, seq_k)
        mask[..., -3:] = -1e4
        return mask
    if kind == "per_head":
        return torch.randn(B, heads, seq_q, seq_k, generator=g)
    if kind == "bool_3d":
        keep = torch.rand(B, seq_q, seq_k, generator=g) > 0.3
        keep[..., 0] = True
        return keep
    raise ValueError(kind)


# name -> heads, key heads, per-rank query lengths (None: 5 each), layout in/out, mask, scale, explicit lengths
CASES = {
    "flat": dict(heads=4, heads_kv=4),
    "heads_first": dict(heads=4, heads_kv=4, skip_reshape=True, skip_output_reshape=True),
    "heads_first_in_flat_out": dict(heads=4, heads_kv=4, skip_reshape=True),
    "gqa": dict(heads=8, heads_kv=4, skip_reshape=True, skip_output_reshape=True),
    "uneven_heads_and_lengths": dict(heads=6, heads_kv=6, uneven=True),
    "key_padding_mask": dict(heads=4, heads_kv=4, mask="key_padding"),
    "per_head_mask": dict(heads=4, heads_kv=4, mask="per_head", skip_reshape=True),
    "bool_mask": dict(heads=6, heads_kv=6, mask="bool_3d"),
    "scale": dict(heads=4, heads_kv=4, scale=0.2),
}


def _run_case(name: str, spec: dict, group, world: int, rank: int) -> dict:
    heads, heads_kv = spec["heads"], spec["heads_kv"]
    flat = not spec.get("skip_reshape", False)
    lens = [3 + 2 * r for r in range(world)] if spec.get("uneven") else [5] * world
    total = sum(lens)
    seed = len(name) * 100 + world
    q, k, v = _tensors(seed, heads, heads_kv, total, total, flat)
    mask = _mask(spec.get("mask", "none"), heads, total, total, seed)
    form = dict(skip_reshape=spec.get("skip_reshape", False), skip_output_reshape=spec.get("skip_output_reshape", False))
    mine = _shards(total, lens)[rank]
    attention = UlyssesAttention(Dispatcher("sdpa", strict=True), group=group)
    extra = {"seq_lens_q": lens, "seq_lens_k": lens} if spec.get("uneven") else {}
    if "scale" in spec:
        extra["scale"] = spec["scale"]
    out = attention(_seq(q, mine, flat), _seq(k, mine, flat), _seq(v, mine, flat), heads, mask, **form, **extra)
    ref = reference_attention(q, k, v, heads, mask, scale=spec.get("scale"), **form)
    expected = ref[:, :, mine] if form["skip_output_reshape"] else ref[:, mine]
    return {"shape_ok": tuple(out.shape) == tuple(expected.shape),
            "max_error": float((out.double() - expected).abs().max()) if out.shape == expected.shape else None}


def _refusals(group, world: int, rank: int) -> dict:
    """Calls Ulysses must refuse before any exchange (so no process waits on another)."""
    found = {}
    attention = UlyssesAttention(Dispatcher("sdpa", strict=True), group=group)
    q, k, v = _tensors(1, 4, 4, 5, 5, True)
    try:
        attention(q, k, v, 4, torch.zeros(5, 5))  # a mask for the local shard only
    except ValueError as error:
        found["shard_mask"] = str(error)
    q1, k1, v1 = _tensors(1, 4, 1, 5, 5, True)
    try:
        attention(q1, k1, v1, 4)  # one key head cannot be shared
    except ValueError as error:
        found["too_few_key_heads"] = str(error)
    try:
        attention(q, k, v, 4, seq_lens_q=[5] * (world + 1))
    except ValueError as error:
        found["bad_lengths"] = str(error)
    return found


def _cross_attention(group, world: int, rank: int) -> dict:
    """Keys every process holds in full (text tokens): no exchange, local queries only."""
    q, _, _ = _tensors(7, 4, 4, 5 * world, 5 * world, True)
    _, k, v = _tensors(8, 4, 4, 7, 7, True)
    mine = _shards(5 * world, [5] * world)[rank]
    out = UlyssesAttention(Dispatcher("sdpa", strict=True), group=group)(q[:, mine], k, v, 4, kv_sharded=False)
    ref = reference_attention(q, k, v, 4)[:, mine]
    return {"shape_ok": out.shape == ref.shape, "max_error": float((out.double() - ref).abs().max())}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world, timeout=TIMEOUT)
    pairs = [dist.new_group([0, 1], timeout=TIMEOUT), dist.new_group([2, 3], timeout=TIMEOUT)]
    results: dict = {}
    try:
        for label, group, size, local_rank in (("world", None, world, rank), ("pair", pairs[rank // 2], 2, rank % 2)):
            for name, spec in CASES.items():
                results[f"{label}/{name}"] = _run_case(name, spec, group, size, local_rank)
            results[f"{label}/cross_attention"] = _cross_attention(group, size, local_rank)
            results[f"{label}/refusals"] = _refusals(group, size, local_rank)
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle)
        dist.destroy_process_group()
