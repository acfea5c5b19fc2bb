"""nodes/benchmarks.py without ComfyUI: which committed runs the sidebar lists, and
which chart paths the route may serve (never one outside benchmarks/results)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from library_support import ROOT

# Loaded by path rather than as `nodes.benchmarks`: a pytest run with COMFYUI_PATH set also
# imports ComfyUI's top-level `nodes` module, which the pack's `nodes` package would shadow.
_spec = importlib.util.spec_from_file_location("attention_backends_benchmarks",
                                               os.path.join(ROOT, "nodes", "benchmarks.py"))
benchmarks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmarks)

PNG = b"\x89PNG\r\n\x1a\n"
ENVIRONMENT = {"packages": {"torch": "2.11.0"}, "torch_cuda": "13.0", "gpu": "NVIDIA H200"}


def _run(root: Path, name: str, kernels: object = None, chart: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if kernels is not None:
        (folder / "kernels.json").write_text(kernels if isinstance(kernels, str) else json.dumps(kernels))
    if chart:
        (folder / "chart.png").write_bytes(PNG)
    return folder


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder inside tmp_path, with room next to it for things outside."""
    root = tmp_path / "results"
    root.mkdir()
    return root


def test_the_committed_h200_run_is_listed_with_its_chart():
    [h200] = [run for run in benchmarks.list_benchmarks() if run["name"] == "h200"]
    assert h200 == {"name": "h200", "title": "NVIDIA H200 · torch 2.11.0 · CUDA 13.0",
                    "chart": "/attention_backends/benchmarks/h200/chart.png"}
    path = benchmarks.chart_path("h200")
    assert path == (Path(ROOT) / "benchmarks" / "results" / "h200" / "chart.png").resolve()
    assert path.read_bytes().startswith(PNG)


def test_listing_needs_kernels_json_and_a_plain_name(results: Path):
    _run(results, "gpu-b", {"environment": ENVIRONMENT, "date": "2026-11-21"}, chart=False)
    _run(results, "gpu_a", {"environment": ENVIRONMENT})
    _run(results, "charts-only")  # no kernels.json
    _run(results, "H200", {"environment": ENVIRONMENT})
    _run(results, "with.dot", {"environment": ENVIRONMENT})
    (results / "notes.txt").write_text("a file, not a run")
    assert benchmarks.list_benchmarks(results) == [
        {"name": "gpu-b", "title": "NVIDIA H200 · torch 2.11.0 · CUDA 13.0 · 2026-11-21", "chart": None},
        {"name": "gpu_a", "title": "NVIDIA H200 · torch 2.11.0 · CUDA 13.0",
         "chart": "/attention_backends/benchmarks/gpu_a/chart.png"},
    ]


@pytest.mark.parametrize("kernels, title", [
    ({"environment": {"packages": {}}}, "cpu"),  # no GPU recorded: the folder name
    ({"environment": {"gpu": "NVIDIA L4"}}, "NVIDIA L4"),
    ({"rows": []}, "cpu"),
    ([1, 2], "cpu"),
    ("{not json", "cpu"),
])
def test_titles_fall_back_to_the_folder_name(results: Path, kernels: object, title: str):
    _run(results, "cpu", kernels)
    assert [run["title"] for run in benchmarks.list_benchmarks(results)] == [title]


def test_no_results_folder_lists_nothing(tmp_path: Path):
    assert benchmarks.list_benchmarks(tmp_path / "absent") == []


@pytest.mark.parametrize("name", ["..", ".", "", "H200", "a/b", "../h200", "%2e%2e", "h200\n", "h200/../h200"])
def test_chart_path_refuses_names_that_are_not_plain(results: Path, name: str):
    _run(results, "h200", {"environment": ENVIRONMENT})
    with pytest.raises(ValueError, match="not a benchmark name"):
        benchmarks.chart_path(name, results)


def test_chart_path_is_none_without_a_listed_run_or_its_chart(results: Path):
    _run(results, "nochart", {"environment": ENVIRONMENT}, chart=False)
    assert benchmarks.chart_path("nochart", results) is None
    assert benchmarks.chart_path("absent", results) is None
    _run(results, "charts-only")  # a chart without kernels.json is no listed run: not served either
    assert benchmarks.chart_path("charts-only", results) is None
    (_run(results, "dir-chart", {"environment": ENVIRONMENT}, chart=False) / "chart.png").mkdir()
    assert benchmarks.chart_path("dir-chart", results) is None  # a folder named like the chart is no chart


def test_symlinks_out_of_the_results_folder_are_neither_listed_nor_served(results: Path):
    outside = _run(results.parent, "outside", {"environment": ENVIRONMENT})
    (results / "linked-run").symlink_to(outside, target_is_directory=True)
    run = _run(results, "linked-chart", {"environment": ENVIRONMENT}, chart=False)
    (run / "chart.png").symlink_to(outside / "chart.png")
    assert benchmarks.chart_path("linked-run", results) is None
    assert benchmarks.chart_path("linked-chart", results) is None
    assert benchmarks.list_benchmarks(results) == [
        {"name": "linked-chart", "title": "NVIDIA H200 · torch 2.11.0 · CUDA 13.0", "chart": None}]


def test_symlinks_inside_the_results_folder_are_followed(tmp_path: Path):
    # The pack itself is often a symlink in custom_nodes/, and so may the results folder be.
    real = tmp_path / "real-results"
    real.mkdir()
    target = _run(real, "h200", {"environment": ENVIRONMENT})
    (real / "latest").symlink_to(target, target_is_directory=True)
    linked = tmp_path / "linked-results"
    linked.symlink_to(real, target_is_directory=True)
    assert benchmarks.chart_path("latest", linked) == (target / "chart.png").resolve()
    assert [run["name"] for run in benchmarks.list_benchmarks(linked)] == ["h200", "latest"]


@pytest.mark.parametrize("length", [65, 255, 256, 300, 5000])
def test_chart_path_of_a_long_plain_name_is_no_chart_not_an_error(results: Path, length: int):
    # A 256-character name made Path.is_file() raise ENAMETOOLONG: the route answered 500.
    assert benchmarks.chart_path("a" * length, results) is None
    assert benchmarks.chart_path("a" * (length - 1) + "-", results) is None


def test_chart_path_serves_names_up_to_the_bound(results: Path):
    name = "r" * benchmarks.MAX_NAME_LENGTH
    _run(results, name, {"environment": ENVIRONMENT})
    assert benchmarks.chart_path(name, results) == (results / name / "chart.png").resolve()
    assert [run["name"] for run in benchmarks.list_benchmarks(results)] == [name]


def test_a_chart_path_the_system_refuses_is_no_chart(results: Path, monkeypatch: pytest.MonkeyPatch):
    def refuse(self):
        raise OSError(36, "File name too long")

    monkeypatch.setattr(Path, "resolve", refuse)
    assert benchmarks.chart_path("h200", results) is None
