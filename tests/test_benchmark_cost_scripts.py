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
from attention.calibration_calls import HELD_OUT, TILE_PROBE, VIDEO_WINDOW, Call, grid
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


def test_the_tile_probe_is_measured_on_request_and_never_fitted(tmp_path):
    assert _script("cost_grid").main(["--out", str(tmp_path), "--smoke", "--only", "tiles_"]) == 0
    rows = json.loads((tmp_path / "cost_grid.json").read_text())["rows"]
    assert rows and all(r["call"]["key"].startswith("tiles_") for r in rows)
    probe = {c.key for c in TILE_PROBE}
    assert len(probe) == 6 and not probe & {c.key for c in grid() + grid(reduced=True)}
    # Beside the held-out counts, never on them: a probe is not a held-out call measured early.
    assert not {(c.seq_q, c.batch * c.heads) for c in TILE_PROBE} & {(c.seq_q, c.batch * c.heads) for c in HELD_OUT}
    for fitted in GRIDS:
        keys = {r["call"]["key"] for r in json.loads(open(fitted, encoding="utf-8").read())["rows"]}
        assert not keys & probe


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


def test_contested_policy_is_judged_pessimistically_and_only_on_long_close_calls():
    contested = _script("contested")
    from attention.call import MASK_NONE
    from evaluate_cost_model import EvalCall

    model = load(os.path.join(ROOT, "attention", "cost_models", "sm90.json"), registry.names())
    kernels = frozenset(model.kernels)
    video = Call("v", 2, 40, 20280, 20280, 128).signature()
    times = {"sdpa": 33000.0, "flash4": 26000.0, "sage_qk_int8_pv_fp8_cuda_sm90": 27700.0, "sage": 27000.0}
    call = EvalCall("v", "v", "test", video, times, 0.03, kernels)
    names = contested.contested(call, model, 0.091, 5000.0)
    assert {"flash4", "sage_qk_int8_pv_fp8_cuda_sm90"} <= set(names) and "sdpa" not in names
    assert contested.contested(call, model, 0.0, 5000.0) == []  # one leader: nothing to measure
    assert contested.contested(call, model, 0.091, 1e9) == []  # too short to be worth measuring
    # flash4 is fastest; sage is 3.8% and the sm90 kernel 6.5% slower: outside a 3% floor, so a
    # measurement finds flash4; inside a 5% floor sage could have been kept instead.
    assert contested.pessimistic_pick(call, ["flash4", "sage"]) == "flash4"
    wide = dataclasses.replace(call, noise_floor=0.05)
    assert contested.pessimistic_pick(wide, ["flash4", "sage", "sage_qk_int8_pv_fp8_cuda_sm90"]) == "sage"
    assert contested.pessimistic_pick(call, ["flash4", "kitchen_int8"]) is None  # not timed in the run
    assert video.mask_kind == MASK_NONE


def test_contested_report_on_the_committed_runs(tmp_path):
    assert _script("contested").main(["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "contested.json").read_text())
    run9 = report["runs"]["run9/heldout.json"]["held-out"]
    alone = next(s for s in run9 if s["within"] == 0.0)
    assert alone["measured_calls"] == 0 and alone["cost_s"] == 0.0 and alone["calls"] == len(HELD_OUT)
    # With nothing contested the policy is the model's own choice, call by call.
    evaluate = sys.modules["evaluate_cost_model"]
    model = load(os.path.join(ROOT, "attention", "cost_models", "sm90.json"), registry.names())
    calls = {c.key: c for c in evaluate.heldout_calls(os.path.join(ROOT, "benchmarks", "results", "h200", "heldout",
                                                                  "run9", "heldout.json"))}
    assert all(row["pick"] == evaluate.decide(calls[row["call"]], model) for row in alone["rows"])
    at_grid = [s for s in run9 if s["within"] == report["grid_p90"]]
    assert at_grid and all(s["measured_calls"] >= 1 and s["cost_s"] > 0 for s in at_grid)
    assert (tmp_path / "contested.md").read_text() == open(os.path.join(RESULTS, "contested.md"),
                                                          encoding="utf-8").read()
    # The shipped policy (CONTESTED_WITHIN from CONTESTED_FROM_US) meets both lists' targets on
    # every committed run, judged pessimistically; from 5 ms (run10's policy) the table missed
    # in eight of the eleven (SD1.5's level 1 and Flux 1024², which the host's speed decides;
    # seven of the ten that chose 100 µs, and run13, timed after the choice).
    from attention.cost_model import CONTESTED_FROM_US
    shipped = [s for run in report["runs"].values() for section in run.values() for s in section
               if s["within"] == report["grid_p90"] and s["from_us"] == CONTESTED_FROM_US]
    assert len(shipped) == 2 * len(report["runs"]) and all(s["targets_met"] for s in shipped)
    from_5ms = [run["table"] for run in report["runs"].values() if "table" in run]
    assert sum(not s["targets_met"] for section in from_5ms for s in section
               if s["within"] == report["grid_p90"] and s["from_us"] == 5000.0) == 8


def test_autos_contested_margin_is_the_fits_own_resolution():
    """CONTESTED_WITHIN is the shipped fit's p90 ratio error on long grid calls
    (residuals.md): a refit that changes it must change the constant with it."""
    from attention.cost_model import CONTESTED_WITHIN
    model = load(os.path.join(ROOT, "attention", "cost_models", "sm90.json"), registry.names())
    assert _script("contested").grid_resolution(model) == pytest.approx(CONTESTED_WITHIN, abs=0.0005)


def test_heldout_smoke_with_the_contested_row(tmp_path):
    model = os.path.join(ROOT, "attention", "cost_models", "sm90.json")
    assert _script("heldout").main(["--out", str(tmp_path), "--smoke", "--model", model, "--contested"]) == 0
    written = json.loads((tmp_path / "heldout.json").read_text())
    # CPU: nothing the sm90 model contests, so the row measured nothing.
    assert written["contested_tuning_ms"] == {"auto (model, contested measured)": {}}
    assert all("auto (model, contested measured)" in row["autos"] for row in written["rows"])
    with pytest.raises(SystemExit):
        _script("heldout").main(["--out", str(tmp_path), "--smoke", "--contested"])


def _probe_row(keep: str, measured: list[dict], long_us: dict[str, float]) -> dict:
    """A contest_probe row: the model's choice, measurements (times in ms, SDPA's second
    timing as `repeat_ms`), the long rounds' two timings of each kernel."""
    error = {"rel_l1": 0.001, "cosine": 0.999999, "max_abs": 0.01, "nonfinite": 0}
    return {"key": "wan13b_480p_cfg", "label": "Wan", "names": ["flash4", "sage"], "keep": keep,
            "long_reps": 40,
            "long_us": {**long_us, **{n + " (repeat)": us for n, us in long_us.items()}},
            "measurements": [{"reps": 7, "seed": i, "elapsed_s": 0.5, "repeat_ms": m["sdpa"] * (1 + m.pop("floor")),
                              "ms": m, "errors": dict.fromkeys(m, error)} for i, m in enumerate(measured)]}


def test_contest_probe_judges_each_rule_against_the_long_rounds(tmp_path):
    probe = _script("contest_probe")
    # Long rounds: sage 2.6% faster than FA4. One measurement read FA4 2% ahead with a 3% floor
    # (fastest-wins picks FA4, keep-within-the-floor keeps sage); one read FA4 5% ahead
    # with a 1% floor (both rules pick FA4).
    row = _probe_row("sage", [{"sdpa": 21.0, "flash4": 17.6, "sage": 17.95, "floor": 0.03},
                              {"sdpa": 21.0, "flash4": 17.0, "sage": 17.85, "floor": 0.01}],
                     {"sdpa": 21600.0, "flash4": 18160.0, "sage": 17700.0})
    judged = probe.judge([row])
    fastest = judged["fastest wins @ 7 rounds"]["wan13b_480p_cfg"]
    kept = judged["keep within the floor @ 7 rounds"]["wan13b_480p_cfg"]
    assert fastest["picks"] == ["flash4", "flash4"] and kept["picks"] == ["sage", "flash4"]
    assert fastest["worst"] == pytest.approx(17700 / 18160)
    assert kept["mean"] == pytest.approx((1 + 17700 / 18160) / 2)
    # A fixed margin over the floor keeps sage on the second measurement too.
    assert judged["keep within the floor or 5% @ 7 rounds"]["wan13b_480p_cfg"]["picks"] == ["sage", "sage"]
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"rows": [row]}))
    assert probe.main(["--out", str(tmp_path / "out"), "--from-json", str(path)]) == 0
    text = (tmp_path / "out" / "contest_probe.md").read_text()
    assert "| Wan | sage | sage 1.000, flash4 1.026, sdpa 1.220 | 0.000 |" in text


def test_contest_probe_measures_as_auto_does_on_cpu():
    """The probe's measuring path on the CPU (sdpa_flash against sdpa stand in for the
    contested kernels): each measurement goes through tuning.measure_on_device."""
    import torch
    from attention.dispatch import Contest
    from attention.tuning import Limits
    probe = _script("contest_probe")
    call = dataclasses.replace(HELD_OUT[0].shrunk(64), dtype="fp32")
    model = load(os.path.join(ROOT, "attention", "cost_models", "sm90.json"), registry.names())
    row = probe.probe_call(call, Contest(("sdpa_flash", "sdpa"), "sdpa"), model, torch.device("cpu"),
                           Limits(signature_s=0.2, run_s=1.0, reps=2), measurements_each=1, long_reps=2)
    assert [m["reps"] for m in row["measurements"]] == [2, 4]
    assert all(set(m["ms"]) == {"sdpa", "sdpa_flash"} for m in row["measurements"])
    assert set(row["long_us"]) == {"sdpa", "sdpa (repeat)", "sdpa_flash", "sdpa_flash (repeat)"}
    assert row["keep"] == "sdpa"


def test_the_heldout_floor_counts_every_timing_of_a_kernel_but_the_judged_row():
    """Run12's Wan 2.2 5B 121f call: the `auto` rows that ran Sage 2 fp8 count as timings
    of it, each judged by the others; the calibrated contested row stays a miss there
    (run13's floor was chosen before run13, not to pass run12)."""
    heldout = _script("heldout")
    data = json.loads(open(os.path.join(BENCHMARKS, "results", "h200", "heldout", "run12", "heldout.json"),
                           encoding="utf-8").read())
    timing = next(heldout.timing_from_json(t) for t in data["timings"] if t["call"]["key"] == "wan22_5b_720p_cfg")
    sm90 = "sage_qk_int8_pv_fp8_cuda_sm90"
    rows = [us for name, us in timing.times_us.items() if name.startswith(sm90) or timing.chose.get(name) == sm90]
    assert len(rows) == 7
    assert heldout.every_timing_floor(timing) == pytest.approx(1 - min(rows) / max(rows))
    judged = "auto (calibrated, contested measured)"
    others = [us for name, us in timing.times_us.items()
              if name != judged and (name.startswith(sm90) or timing.chose.get(name) == sm90)]
    assert heldout.every_timing_floor(timing, leave_out=judged) == pytest.approx(1 - min(others) / max(others))
    row = heldout.verdict(timing)
    assert row["pair_floor"] == pytest.approx(timing.noise_floor)
    mine = row["autos"][judged]
    assert not heldout.inside(mine["vs_fastest"], mine["noise_floor"]) and mine["vs_fastest"] < heldout.TARGET_WORST
    totals = heldout.summary([heldout.verdict(heldout.timing_from_json(t)) for t in data["timings"]])
    assert not totals[judged]["targets_met"] and not totals[judged]["targets_met_pair_floor"]
    assert totals["auto (model, contested measured)"]["targets_met"]


def test_a_masked_calls_auto_rows_never_count_as_timings_of_the_masked_kernel():
    heldout = _script("heldout")
    call = Call("masked", 2, 8, 1024, 1024, 64, mask="integer")
    timing = heldout.CallTiming(call, {"sdpa": 100.0, "sdpa (repeat)": 101.0, "auto (rules)": 80.0,
                                       "auto (model)": 82.0}, chose={"auto (rules)": "sdpa", "auto (model)": "sdpa"})
    # sdpa keeps the mask; the auto rows served it with the keys trimmed: two ways, 1% and 2.4%.
    assert heldout.every_timing_floor(timing) == pytest.approx(1 - 80.0 / 82.0)
    assert heldout.every_timing_floor(timing, leave_out="auto (model)") == pytest.approx(1 - 100.0 / 101.0)


def test_compiled_op_cost_times_the_op_against_traced_sdpa_on_cpu(tmp_path):
    script = _script("compiled_op_cost")
    assert script.main(["--out", str(tmp_path), "--smoke"]) == 0
    written = json.loads((tmp_path / "compiled_op_cost.json").read_text())
    [row] = written["rows"]
    assert set(row["per_call_us"]) == {script.TRACED, script.OP, script.AGAIN}
    assert all(us > 0 for us in row["per_call_us"].values()) and row["noise_floor"] >= 0
    assert row["op_over_traced"] == pytest.approx(row["per_call_us"][script.OP] / row["per_call_us"][script.TRACED])
    assert "through the op" in (tmp_path / "compiled_op_cost.md").read_text()
