"""Ulysses (sequence-parallel) attention over gloo with 4 processes: every case on the
whole world and on two groups of 2 processes at once, against a float64 reference of
the whole call (tests/parallel_workers.py); masks handled as the local kernel handles
them, shard-only masks and impossible head splits refused before any exchange.

One spawn for the module (a few seconds); a hang is bounded by the process group's
timeout and by the join deadline here, after which the processes are ended."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel_workers

WORLD = 4
JOIN_DEADLINE_S = 240
TOLERANCE = 1e-5  # float32 inputs against float64

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    where = tmp_path_factory.mktemp("ulysses")
    context = mp.start_processes(parallel_workers.worker, args=(WORLD, str(where / "init"), str(where)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    waited = 0
    while not context.join(timeout=1):
        waited += 1
        if waited > JOIN_DEADLINE_S:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"the {WORLD} processes did not finish within {JOIN_DEADLINE_S}s of joining")
    found = {}
    for rank in range(WORLD):
        with open(os.path.join(where, f"rank{rank}.json"), encoding="utf-8") as handle:
            found[rank] = json.load(handle)
        assert "crash" not in found[rank], found[rank]["crash"]
    return found


CASES = [f"{group}/{name}" for group in ("world", "pair") for name in [*parallel_workers.CASES, "cross_attention"]]


@pytest.mark.parametrize("case", CASES)
def test_every_shard_matches_float64(results, case):
    for rank in range(WORLD):
        row = results[rank][case]
        assert row["shape_ok"], (rank, case)
        assert row["max_error"] < TOLERANCE, (rank, case, row["max_error"])


@pytest.mark.parametrize("group", ["world", "pair"])
def test_impossible_calls_are_refused_with_what_to_do(results, group):
    for rank in range(WORLD):
        refused = results[rank][f"{group}/refusals"]
        assert "Pass the model's unsharded mask" in refused["shard_mask"]
        assert "use at most 1 processes" in refused["too_few_key_heads"]
        assert "must list every process's sequence length" in refused["bad_lengths"]


def test_needs_an_initialised_process_group():
    from attention.parallel.ulysses import UlyssesAttention
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        UlyssesAttention()


def test_one_process_is_the_local_kernel(tmp_path):
    """A world of one: no exchange, the local kernel's output unchanged."""
    from attention import Dispatcher
    from attention.parallel.ulysses import UlyssesAttention
    from library_support import reference_attention
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    dist.init_process_group("gloo", init_method="file://" + str(tmp_path / "init"), rank=0, world_size=1)
    try:
        q, k, v = (torch.randn(2, 9, 32) for _ in range(3))
        out = UlyssesAttention(Dispatcher("sdpa", strict=True))(q, k, v, 4)
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, 4), atol=TOLERANCE, rtol=1e-5)
    finally:
        dist.destroy_process_group()
