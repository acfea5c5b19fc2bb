"""`python -m attention calibrate` without a GPU: a fake measurement and an injected clock;
the calibration file (fingerprint, validation, damaged file ignored); auto reusing it and
auto_tuned's saved decisions."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from attention import calibrate as calibration
from attention.backend import BHND, Backend
from attention import cost_store
from attention.calibrate import BASELINE, LONG_CALL_MS, REPEAT, CallTiming, measure_grid, rounds, samples
from attention.calibration_calls import Call, grid
from attention.call import CallSignature
from attention.cost_model import KernelCost, Tiling, work_of
from attention.dispatch import Dispatcher
from attention.tuning import signature_key
from attention.tuning_store import forget_loaded_stores, store_for

from library_support import sdpa_kernel

SDPA = KernelCost(host_us=20.0, flat_host_factor=1.5, launch_us=6.0, tile_us=0.3, tflops=600.0, softmax_gelems=2_500.0,
                  overlap=0.2, gbps=3_000.0, mask_factor=2.0, ragged_factor=1.2, tiling=Tiling(128, 128, 32))
FAST = KernelCost(host_us=70.0, flat_host_factor=1.0, launch_us=4.0, tile_us=0.2, tflops=900.0, softmax_gelems=4_000.0,
                  overlap=2.0, gbps=3_000.0, mask_factor=1.0, ragged_factor=1.0, tiling=Tiling(128, 128, 32))
CPU = torch.device("cpu")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_measure(clock: FakeClock, seconds_per_call: float):
    """Times from known costs (on the one 'SM' device_facts reports for a CPU), as time_call returns them."""
    def time_one(call, device, names, **kwargs):
        clock.now += seconds_per_call
        work = work_of(call.signature("cpu", None))
        sdpa = SDPA.predict_us(work, 1)
        return CallTiming(call, {BASELINE: sdpa, REPEAT: sdpa * 1.01, "fast_exact": FAST.predict_us(work, 1)})
    return time_one


@pytest.fixture(autouse=True)
def fast_exact(extra_backend):
    """A kernel outside SDPA's family, available on this CPU machine (it runs SDPA)."""
    return extra_backend(Backend(name="fast_exact", family="test", description="test", quantized=False,
                                 layouts=(BHND,), constraints=(), load=lambda: sdpa_kernel))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Calibration and tuning files in tmp_path, and calls on 'cuda' sm90 mapped to this CPU."""
    monkeypatch.delenv(cost_store.ENV_FILE, raising=False)
    monkeypatch.setattr(cost_store, "_folders", [])
    monkeypatch.setattr(cost_store, "default_folder", lambda: str(tmp_path / "standalone"))
    monkeypatch.setattr(cost_store, "default_tuning_path", lambda: str(tmp_path / "standalone" / "tuning.json"))
    monkeypatch.setattr(cost_store, "device_for", lambda device_type, capability: CPU)
    cost_store.forget()
    forget_loaded_stores()
    yield tmp_path
    cost_store.forget()
    forget_loaded_stores()


LONG = CallSignature("cuda", (9, 0), torch.bfloat16, 2, 24, 24, 8192, 8192, 128, 128)


def test_measure_grid_stops_starting_calls_when_the_budget_is_spent():
    clock = FakeClock()
    calls = grid(reduced=True)
    timings, left_out = measure_grid(calls, CPU, ["sdpa"], budget_s=30.0, time_one=fake_measure(clock, 4.0),
                                     clock=clock)
    assert len(timings) == 8 and left_out == [c.key for c in calls[8:]]
    assert timings[0].noise_floor == pytest.approx(0.01)


def test_long_calls_get_the_rounds_asked_for_them_and_short_ones_keep_theirs():
    assert rounds(LONG_CALL_MS / 2, 20, 6.0, long_reps=40, long_budget_s=12.0) == (20, 6.0)
    assert rounds(LONG_CALL_MS, 20, 6.0, long_reps=40, long_budget_s=12.0) == (40, 12.0)
    assert rounds(LONG_CALL_MS * 4, 20, 6.0) == (20, 6.0)  # calibrate asks for nothing more
    assert rounds(LONG_CALL_MS * 4, 50, 20.0, long_reps=40, long_budget_s=12.0) == (50, 20.0)  # never fewer


def test_samples_leave_out_the_repeat_extra_rows_and_sdpas_own_sub_backends():
    call = grid()[0]
    timing = CallTiming(call, {BASELINE: 30.0, REPEAT: 31.0, "auto (model)": 29.0, "flash4": 80.0,
                               "sdpa_cudnn": 40.0, "sdpa_flash": 35.0})
    by_kernel = samples([timing])
    assert set(by_kernel) == {BASELINE, "flash4"} and by_kernel["flash4"][0].us == 80.0


def test_calibrate_keeps_time_for_the_fit_inside_its_limit(folder, monkeypatch):
    clock = FakeClock()
    limits = {}
    fit_model = calibration.fit_model

    def limited_fit(samples_by_kernel, **kwargs):
        limits["fit_s"], limits["calls"] = kwargs["time_limit_s"], len(samples_by_kernel[BASELINE])
        return fit_model(samples_by_kernel, **{**kwargs, "steps": 20})

    monkeypatch.setattr(calibration, "fit_model", limited_fit)
    limit = 60.0
    _, _, left_out = calibration.calibrate(CPU, budget_s=1000.0, limit_s=limit, time_one=fake_measure(clock, 4.0),
                                           clock=clock)
    measured = limit - calibration.FIT_RESERVE_S - calibration.MIN_FIT_S
    assert limits["calls"] == int(measured // 4.0) and left_out
    assert clock.now - 100.0 + limits["fit_s"] + calibration.FIT_RESERVE_S <= limit + 4.0


def test_calibrate_fits_saves_and_auto_uses_it(folder):
    clock = FakeClock()
    model, path, left_out = calibration.calibrate(CPU, budget_s=200.0, time_one=fake_measure(clock, 1.0),
                                                  clock=clock, steps=400, grid_path=str(folder / "grid.json"))
    assert not left_out and path == str(folder / "standalone" / "calibration.json")
    written = json.loads((folder / "grid.json").read_text())
    assert [calibration.timing_from_json(row).call.key for row in written["rows"]] == [c.key for c in grid(True)]
    assert set(model.kernels) == {"sdpa", "fast_exact"} and model.source == cost_store.CALIBRATED
    for name, truth in (("sdpa", SDPA), ("fast_exact", FAST)):
        assert model.kernels[name].host_us == pytest.approx(truth.host_us, rel=0.05)
    loaded = cost_store.model_for("cuda", (9, 0))
    assert loaded is not None and loaded.source == cost_store.CALIBRATED
    assert loaded.kernels["sdpa"] == model.kernels["sdpa"]
    assert cost_store.describe("cuda", (9, 0))["source"] == cost_store.CALIBRATED
    # A long call goes to the kernel fitted faster; a short one stays on SDPA (FAST's host path).
    assert Dispatcher("auto").candidates(LONG)[0].name == "fast_exact"
    short = CallSignature("cuda", (9, 0), torch.bfloat16, 1, 8, 8, 256, 77, 64, 64)
    assert Dispatcher("auto").plan_for(short).name == "sdpa"


def test_another_machines_calibration_is_kept_and_not_used(folder):
    clock = FakeClock()
    model, path, _ = calibration.calibrate(CPU, budget_s=50.0, time_one=fake_measure(clock, 1.0), clock=clock,
                                           steps=200)
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    data["machines"][0]["fingerprint"]["gpu"] = "another GPU"
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    cost_store.forget()
    assert cost_store.calibrated_model("cuda", (9, 0)) is None
    cost_store.save_calibration(model, CPU, path)
    with open(path, encoding="utf-8") as handle:
        gpus = sorted(m["fingerprint"]["gpu"] for m in json.load(handle)["machines"])
    assert gpus == ["another GPU", "cpu"]


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not JSON"),
    (json.dumps({"format": "x", "version": 1, "machines": []}), "format"),
    (json.dumps({"format": cost_store.FORMAT, "version": 1, "machines": [{"fingerprint": {"gpu": 3}}]}),
     "fingerprint field"),
    (json.dumps({"format": cost_store.FORMAT, "version": 1,
                 "machines": [{"fingerprint": {"gpu": "cpu"}, "model": {"format": "nope"}}]}), "format"),
])
def test_a_damaged_calibration_file_is_ignored_with_a_warning(folder, caplog, text, problem):
    path = folder / "standalone" / "calibration.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        assert cost_store.calibrated_model("cuda", (9, 0)) is None
    assert problem in caplog.text and "ignoring calibration file" in caplog.text
    # Saving over it moves it aside rather than merging anything from it.
    model, _ = calibration.fit_timings([fake_measure(FakeClock(), 0)(c, CPU, []) for c in grid(reduced=True)],
                                       gpu_class="default", gpu="CPU", sms=1, capability=None, device_type="cpu",
                                       steps=50)
    cost_store.save_calibration(model, CPU, str(path))
    assert (folder / "standalone" / "calibration.json.ignored").read_text() == text
    assert cost_store.calibrated_model("cuda", (9, 0)) is not None


def _decision(backend: str) -> dict:
    return {"backend": backend, "reference": "sdpa", "tuning_ms": 12.0, "budget": {"rel_l1": 0.02},
            "tuned_at": "2026-01-01T00:00:00+00:00",
            "candidates": {backend: {"ms": 1.0, "rel_l1": 0.001, "cosine": 1.0, "max_abs": 0.01, "nonfinite": 0,
                                     "verdict": "chosen"}}}


def test_auto_runs_auto_tuneds_saved_decision_first(folder):
    comfy_dir = folder / "comfy_user"
    cost_store.register_folder(str(comfy_dir))
    store = store_for(str(comfy_dir / "tuning.json"), CPU)
    store.put(signature_key(LONG), _decision("sdpa_efficient"))
    store.flush()  # decisions reach the file at the end of a run
    order = [c.name for c in Dispatcher("auto").candidates(LONG)]
    assert order[0] == "sdpa_efficient" and order[-1] == "sdpa" and order.count("sdpa_efficient") == 1
    # Another signature has no decision: the usual order.
    other = CallSignature("cuda", (9, 0), torch.bfloat16, 1, 24, 24, 4096, 4096, 128, 128)
    assert Dispatcher("auto").candidates(other)[0].name != "sdpa_efficient"
    # An explicit table decides alone.
    from attention.priority import AUTO_TABLE
    assert Dispatcher("auto", auto_table=dict(AUTO_TABLE)).candidates(LONG)[0].name != "sdpa_efficient"


def test_calibrate_on_a_machine_without_a_gpu_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.ERROR):
        assert calibration.calibrate_main() == 2
    assert "no" in caplog.text.lower() and "CUDA GPU" in caplog.text


def test_the_noise_floor_is_the_widest_gap_of_any_kernel_timed_twice():
    from attention.calibrate import repeat_label
    call = Call("c", 1, 2, 64, 64, 32)
    timing = CallTiming(call, {"sdpa": 100.0, repeat_label("sdpa"): 101.0, "flash4": 50.0,
                               repeat_label("flash4"): 52.0, "auto (model)": 55.0})
    assert timing.noise_floor == pytest.approx(0.04)
    assert CallTiming(call, {"sdpa": 100.0}).noise_floor is None
    # Two auto rows that ran the same kernel are two timings of it; different kernels are not.
    autos = CallTiming(call, {"sdpa": 100.0, repeat_label("sdpa"): 100.5, "auto (rules)": 60.0, "auto (model)": 63.0,
                              "auto (other)": 90.0},
                       chose={"auto (rules)": "sage", "auto (model)": "sage", "auto (other)": "flash4"})
    assert autos.noise_floor == pytest.approx(1 - 60.0 / 63.0)


def test_time_call_times_each_kernel_an_auto_chose_twice():
    from attention.calibrate import kernel_names, repeat_label, time_call
    names = kernel_names(CPU)
    assert "sdpa_flash" in names
    call = Call("c", 1, 2, 64, 64, 32, dtype="fp32")
    timing = time_call(call, CPU, names, reps=3, budget_s=0.5, repeat_chosen=True,
                       extra={"auto (test)": lambda: Dispatcher("sdpa_flash > sdpa")})
    assert timing.chose == {"auto (test)": "sdpa_flash"}
    assert {repeat_label("sdpa"), repeat_label("sdpa_flash"), "sdpa_flash", "auto (test)"} <= set(timing.times_us)
    without = time_call(call, CPU, names, reps=3, budget_s=0.5,
                        extra={"auto (test)": lambda: Dispatcher("sdpa_flash > sdpa")})
    assert repeat_label("sdpa_flash") not in without.times_us


def test_doctor_and_the_status_route_say_a_calibration_rescaled_the_shipped_model(folder):
    from attention.cost_model import CostModel
    from attention.cost_rescale import rescale_model
    from attention.doctor import _source_line

    prior = CostModel("sm90", "NVIDIA H200", 1, {"sdpa": SDPA, "fast_exact": FAST})
    clock = FakeClock()
    timings = [fake_measure(clock, 0.0)(call, CPU, []) for call in grid(reduced=True)]
    model, _, afresh = rescale_model(prior, samples(timings, None, "cpu"), gpu="CPU", sms=1,
                                     source=cost_store.CALIBRATED)
    assert afresh == []
    cost_store.save_calibration(model, CPU)
    source = cost_store.describe("cuda", (9, 0))
    assert source["source"] == cost_store.CALIBRATED and source["rescaled_from"] == "NVIDIA H200"
    assert set(source["levels"]) == {"sdpa", "fast_exact"}
    assert source["levels"]["sdpa"] == {"host": 1.0, "gpu": 1.0}  # measured as the prior predicts
    line = _source_line(source)
    assert "the model shipped for NVIDIA H200" in line and "sdpa host x1.00 GPU x1.00" in line
