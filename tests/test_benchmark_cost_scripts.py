"""The cost model's scripts on CPU: the grid measured in part (`cost_grid.py --only`), a fit
of several grid files (`fit_cost_model.py`), which reproduces the shipped model from the
committed grids, and `heldout.py --previous-model` (the refit and the model it replaces in
the same rounds)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from attention import registry
from attention.calibration_calls import HELD_OUT, VIDEO_WINDOW
from attention.cost_model import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "results", "h200", "cost_model")
GRIDS = [os.path.join(RESULTS, "cost_grid.json"), os.path.join(RESULTS, "window", "cost_grid.json")]


def _script(name: str):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)  # heldout.py imports evaluate_cost_model beside it
    spec = importlib.util.spec_from_file_location(f"cost_script_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cost_grid_only_measures_the_calls_named(tmp_path):
    assert _script("cost_grid").main(["--out", str(tmp_path), "--smoke", "--only", "window_"]) == 0
    rows = json.loads((tmp_path / "cost_grid.json").read_text())["rows"]
    assert rows and all(r["call"]["key"].startswith("window_") for r in rows)
    with pytest.raises(SystemExit):
        _script("cost_grid").main(["--out", str(tmp_path), "--smoke", "--only", "no_such_call_"])


def test_several_grids_are_read_as_one_and_the_later_measurement_wins(tmp_path):
    first = json.loads(open(GRIDS[0], encoding="utf-8").read())
    later = dict(first, rows=[dict(first["rows"][0], times_us={"sdpa": 1.0})])
    path = tmp_path / "later.json"
    path.write_text(json.dumps(later))
    facts, timings = _script("fit_cost_model").read_grids([GRIDS[0], str(path)])
    assert facts["gpu_class"] == "sm90" and len(timings) == len(first["rows"])
    assert {t.call.key: t for t in timings}[first["rows"][0]["call"]["key"]].times_us == {"sdpa": 1.0}
    path.write_text(json.dumps(dict(later, gpu_class="sm80")))
    with pytest.raises(SystemExit, match="fit one GPU class at a time"):
        _script("fit_cost_model").read_grids([GRIDS[0], str(path)])


def test_the_shipped_model_is_the_fit_of_the_committed_grids(tmp_path):
    """Refitting the committed grid and its video window gives the shipped sm90 model (to
    the last bits of floating point, which differ between machines' math libraries)."""
    out = tmp_path / "sm90.json"
    assert _script("fit_cost_model").main([*GRIDS, "--out", str(out), "--residuals-dir", str(tmp_path)]) == 0
    refit = load(str(out), registry.names())
    shipped = load(os.path.join(ROOT, "attention", "cost_models", "sm90.json"), registry.names())
    assert set(refit.kernels) == set(shipped.kernels)
    for call in HELD_OUT + VIDEO_WINDOW:
        for name in shipped.kernels:
            a, b = refit.predict_us(name, call.signature()), shipped.predict_us(name, call.signature())
            assert (a is None) == (b is None) and (a is None or abs(a / b - 1) < 1e-6), (call.key, name)
    assert "window/cost_grid.json" in (tmp_path / "residuals.md").read_text().splitlines()[0]


def test_heldout_times_the_previous_model_beside_the_refit(tmp_path):
    model = os.path.join(ROOT, "attention", "cost_models", "sm90.json")
    previous = os.path.join(RESULTS, "before_window", "sm90.json")
    assert _script("heldout").main(["--out", str(tmp_path), "--smoke", "--model", model,
                                    "--previous-model", previous]) == 0
    written = json.loads((tmp_path / "heldout.json").read_text())
    assert written["previous_model"] == previous
    assert {"auto (model)", "auto (previous model)"} <= set(written["summary"])
    assert all("auto (previous model)" in row["autos"] for row in written["rows"])
