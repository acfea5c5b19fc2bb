"""benchmarks/multi_gpu.py in its --smoke mode (CPU "devices", tiny shapes, no Ulysses
processes here: tests/test_parallel_ulysses.py covers those): it runs, writes its files,
and its split outputs equal the one-device output."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from library_support import ROOT


@pytest.fixture(autouse=True)
def _environment_restored():
    """Loading the script sets the multicast variables in this process: undo that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _script():
    spec = importlib.util.spec_from_file_location("multi_gpu_benchmark", os.path.join(ROOT, "benchmarks", "multi_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_rows_topology_and_multicast_settings(tmp_path):
    script = _script()
    assert script.main(["--out", str(tmp_path), "--smoke", "--no-ulysses", "--counts", "1,2", "--reps", "2"]) == 0
    results = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert results["environment"]["multicast_off"] == {
        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert all(os.environ[name] == value for name, value in results["environment"]["multicast_off"].items())
    variants = [(row["shape"], row["variant"]) for row in results["rows"]]
    assert variants == [(shape, variant) for shape in ("smoke_flat", "smoke_heads_first")
                        for variant in ("1 GPU", "2 GPUs even", "2 GPUs cost model")]
    for row in results["rows"]:
        assert row["rel_l1_vs_1gpu"] == 0.0 and row["ms"] > 0
    even = [row for row in results["rows"] if row["variant"] == "2 GPUs even"]
    assert all(row["split"] and [d["heads"] for d in row["per_device"]] for row in even)
    assert "| smoke (B,N,H*D) | 2 GPUs even |" in (tmp_path / "multi_gpu.md").read_text()
    assert (tmp_path / "topology.txt").read_text().strip()
