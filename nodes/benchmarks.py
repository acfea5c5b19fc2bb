"""Committed benchmark results (`benchmarks/results/<name>/`) for the sidebar: which runs
the pack ships, and the chart of one (served by nodes/routes.py, docs/api.md).

No ComfyUI import and no relative import: the CPU tests load this file on its own.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
CHART_ROUTE = "/attention_backends/benchmarks/{name}/chart.png"
# Names are folder names that also travel in URLs: nothing that could mean a path, and
# short (file systems refuse components over 255 bytes; no run needs more than this).
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[a-z0-9_-]+")


def _plain_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None and len(name) <= MAX_NAME_LENGTH


def shown_name(name: str) -> str:
    """A requested name as an error message quotes it: cut short, whatever was sent."""
    return repr(name if len(name) <= MAX_NAME_LENGTH else name[:MAX_NAME_LENGTH] + "...")


def _file_inside(path: Path, root: Path) -> Optional[Path]:
    """`path` with every symlink followed, when that is a file under `root`; else None
    (also when the system refuses to look the path up: too long, a loop of links)."""
    try:
        resolved = path.resolve()
        return resolved if resolved.is_relative_to(root.resolve()) and resolved.is_file() else None
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return None


def _title(kernels: Path, name: str) -> str:
    """The run's title from the environment it recorded: "NVIDIA H200 · torch 2.11.0 · CUDA 13.0"."""
    try:
        data = json.loads(kernels.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("benchmark %s: cannot read %s (%s); titled by its folder name", name, kernels, error)
        return name
    environment = data.get("environment") if isinstance(data, dict) else None
    if not isinstance(environment, dict):
        return name
    packages = environment.get("packages")
    torch = packages.get("torch") if isinstance(packages, dict) else None
    parts = [environment.get("gpu") or name]
    if torch:
        parts.append(f"torch {torch}")
    if environment.get("torch_cuda"):
        parts.append(f"CUDA {environment['torch_cuda']}")
    # `attention bench` writes no date itself; a top-level one (`to_json(extra=...)`) is shown.
    if data.get("date"):
        parts.append(str(data["date"]))
    return " · ".join(str(part) for part in parts)


def chart_path(name: str, root: Path = RESULTS_DIR) -> Optional[Path]:
    """The chart of run `name` (a file inside `root`), or None when there is no such run
    (a folder with a kernels.json, as `list_benchmarks` lists; never one of more than
    MAX_NAME_LENGTH characters) or it has no chart.

    Raises ValueError for a name that is not a plain folder name (`..`, `a/b`, capitals).
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"{shown_name(name)} is not a benchmark name (lowercase letters, digits, '-' and '_')")
    if len(name) > MAX_NAME_LENGTH or _file_inside(root / name / "kernels.json", root) is None:
        return None
    return _file_inside(root / name / "chart.png", root)


def list_benchmarks(root: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every run folder under `root` that holds a kernels.json, by name: `[{"name": "h200",
    "title": "NVIDIA H200 · torch 2.11.0 · CUDA 13.0", "chart": "/attention_backends/..." or None}]`.
    """
    if not root.is_dir():
        return []
    runs = []
    for folder in sorted(root.iterdir()):
        if not _plain_name(folder.name):
            continue
        kernels = _file_inside(folder / "kernels.json", root)
        if kernels is None:
            continue
        chart = _file_inside(folder / "chart.png", root)
        runs.append({"name": folder.name, "title": _title(kernels, folder.name),
                     "chart": CHART_ROUTE.format(name=folder.name) if chart else None})
    return runs
