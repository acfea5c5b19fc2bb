"""The cost model's scripts on CPU: the grid measured in part (`cost_grid.py --only`), a fit
of several grid files (`fit_cost_model.py`), which reproduces the shipped model from the
committed grids, and `heldout.py --previous-model` (the refit and the model it replaces in
the same rounds)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys

import pytest

from attention import registry
from attention.calibration_calls import HELD_OUT, VIDEO_WINDOW, Call
from attention.cost_model import load, work_of
from attention.cost_residuals import ResidualCorrection, position

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


def test_the_residuals_say_how_close_a_decision_the_fit_can_make():
    """The leave-one-out error of a quantized/exact time ratio, per grid call: the pairs are
    the calls where both kernels have a residual, the error the gap of their two errors."""
    model = load(os.path.join(ROOT, "attention", "cost_models", "sm90.json"), registry.names())
    where = [position(work_of(call.signature())) for call in (Call("a", 1, 24, 16384, 16384, 128),
                                                               Call("b", 1, 8, 1024, 1024, 64))]
    points = {"sage": (where[0] + (0.05,), where[1] + (0.0,)), "flash4": (where[0] + (-0.05,),),
              "sdpa": (where[1] + (0.2,),)}
    text = _script("fit_cost_model").resolution_text(
        dataclasses.replace(model, correction=ResidualCorrection(0.5, 1.0, 0.5, points)), {"sage"})
    # Far apart, each residual is its own leave-one-out error: |0.05 - -0.05| and |0 - 0.2|.
    assert f"2 pairs, median {math.exp(0.2) - 1:.1%}" in text
    assert f"trade places) 1 pair, median {math.exp(0.1) - 1:.1%}" in text
    assert "| sage | flash4 | 24 | 16384 | 16384 | 128 | 10.5% |" in text and "| sage | sdpa |" not in text
    committed = open(os.path.join(RESULTS, "residuals.md"), encoding="utf-8").read()
    assert _script("fit_cost_model").resolution_text(model, {n for n in model.kernels
                                                              if registry.get(n).quantized}) in committed
