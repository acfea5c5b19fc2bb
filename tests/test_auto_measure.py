"""`auto` times the kernels its cost model cannot separate on a long call (contested
calls), once per signature and machine; everything else stays the model's choice.

The GPU is stood in for by a fake measurement: these tests check what is handed to the
tuner, what is planned from its decision, and when nothing is measured.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

import attention
from attention import registry
from attention.calibration_calls import HELD_OUT, Call
from attention.cost_model import CONTESTED_FROM_US, CONTESTED_WITHIN, contested, load
from attention.dispatch import Contest, Dispatcher
from attention.priority import model_entries
from attention.tuning import ENV_AUTO_MEASURE, AUTO_MEASURED_FILE, Measurement, Tuner, auto_measured_path
from attention.tuning_store import forget_loaded_stores, store_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = load(os.path.join(ROOT, "attention", "cost_models", "sm90.json"), registry.names())
# Wan 2.1 1.3B at 480p, 81 frames, CFG: FA4 and Sage 2 fp8 predicted 5% apart (the held-out
# miss of run9: FA4 measured 6.7% faster there).
WAN = Call("wan", 2, 12, 32760, 32760, 128).signature()
# SD3.5 Large at 1024² with CFG: FA4 predicted well ahead of everything, the model's choice stands.
SD35 = next(c for c in HELD_OUT if c.key == "sd35_1024_cfg").signature()
# SD1.5 level 2 (SDPA predicted at 55 µs): under CONTESTED_FROM_US, where the host path decides.
SHORT = Call("sd15_l2", 2, 8, 1024, 1024, 80).signature()
# Flux at 1024² (SDPA predicted at 411 µs, FA4 at 424): a table miss the host's speed
# decided (FA4 1.02-1.05x SDPA on fast hosts), contested from 100 µs.
FLUX = Call("flux", 1, 24, 4608, 4608, 128).signature()


class FakeMeasure:
    """Stands in for the GPU in the tuner: fixed times, and the kernels it was handed;
    `floor`: the reference's second timing reads that much slower (the noise floor)."""

    def __init__(self, ms: dict[str, float], floor: Optional[float] = None) -> None:
        self.ms, self.floor, self.seen, self.repeats = ms, floor, [], []

    def __call__(self, call, tensors, runs, reference, limits, seconds_left, repeat=None):
        self.seen.append((reference, list(runs)))
        error = {"rel_l1": 0.001, "cosine": 0.999999, "max_abs": 0.01, "nonfinite": 0}
        measured = {name: Measurement(ms=self.ms.get(name, 99.0), error=error) for name in runs}
        if self.floor is not None:  # the tuner asks for the kept choice twice when there is one
            twice = measured[repeat or reference]
            twice.repeat_ms = twice.ms * (1.0 + self.floor)
        self.repeats.append(repeat)
        return measured


@pytest.fixture
def every_kernel_installed(monkeypatch):
    for backend in registry.all_backends():
        monkeypatch.setattr(backend, "_availability", attention.Availability(True, "test", ()))
        monkeypatch.setattr(backend, "runtime_check", None)
        if backend._kernel is None:  # never run: the fake measurement decides
            monkeypatch.setattr(backend, "_kernel", lambda q, k, v, mask, scale, layout: q)
    forget_loaded_stores()
    yield
    forget_loaded_stores()


def _measurer(tmp_path, fake: FakeMeasure) -> Tuner:
    path = str(tmp_path / AUTO_MEASURED_FILE)
    return Tuner(path, measure=fake, store=lambda device: store_for(path, device, machine=lambda d: {"gpu": "test"}))


def _tensors():
    q = torch.randn(1, 1, 8, 8)  # never run: the fake measurement decides
    return q, q, q, None, None


def test_contested_needs_a_long_call_and_two_leaders():
    predicted = {"sdpa": 8000.0, "flash4": 6000.0, "sage": 6300.0, "kitchen_int8": 7000.0}
    order = ["flash4", "sage", "kitchen_int8", "sdpa"]
    assert contested(predicted, order) == ["flash4", "sage"]  # 7000 is 16.7% over the best
    assert contested(predicted, order, within=0.20) == ["flash4", "sage", "kitchen_int8"]
    assert contested(predicted, order, within=0.01) == []  # one leader: nothing to time
    short = {name: us / 100 for name, us in predicted.items()}
    assert contested(short, order) == []  # SDPA under CONTESTED_FROM_US: the host path decides, noise
    # SDPA itself within reach of the best is one of the contested kernels.
    assert contested({"sdpa": 6000.0, "flash4": 5800.0}, ["flash4", "sdpa"]) == ["flash4", "sdpa"]
    assert CONTESTED_FROM_US == 100.0


def test_model_entries_mark_the_contested_kernels(every_kernel_installed):
    entries = model_entries(WAN, MODEL)
    marked = [e.backend for e in entries if e.measure]
    predicted = {e.backend for e in entries}
    assert len(marked) >= 2 and "flash4" in marked and "sage_qk_int8_pv_fp8_cuda_sm90" in marked
    assert set(marked) <= predicted
    assert not any(e.measure for e in model_entries(SD35, MODEL))
    assert not any(e.measure for e in model_entries(SHORT, MODEL))
    assert {e.backend for e in model_entries(FLUX, MODEL) if e.measure} == {"flash4", "sdpa"}


def test_auto_times_only_the_contested_kernels_and_sdpa(tmp_path, every_kernel_installed):
    fake = FakeMeasure({"sdpa": 40.0, "flash4": 26.0, "sage_qk_int8_pv_fp8_cuda_sm90": 27.7, "sage": 27.5})
    dispatcher = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake))
    names = [e.backend for e in model_entries(WAN, MODEL) if e.measure]
    candidates = dispatcher.candidates(WAN)
    assert Contest(tuple(names), names[0]) in candidates
    plan = dispatcher.plan_for(WAN, _tensors())
    reference, measured = fake.seen[0]
    assert reference == "sdpa" and set(measured) == {"sdpa", *names}
    assert "kitchen_int8" not in measured
    assert plan.name == "flash4" and plan.tuned_by == registry.AUTO and plan.tuning.source == "measured"
    # Once measured, the decision is reused: no second timing for the same signature.
    again = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake)).plan_for(WAN, _tensors())
    assert again.name == "flash4" and again.tuning.source == "saved" and len(fake.seen) == 1


def test_the_measured_winner_serves_even_against_the_models_first_choice(tmp_path, every_kernel_installed):
    first = next(e.backend for e in model_entries(WAN, MODEL))
    other = next(e.backend for e in model_entries(WAN, MODEL) if e.measure and e.backend != first)
    fake = FakeMeasure({"sdpa": 40.0, first: 30.0, other: 27.0})
    plan = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake)).plan_for(WAN, _tensors())
    assert plan.name == other


def test_the_models_choice_stands_against_a_gain_inside_the_noise_floor(tmp_path, every_kernel_installed):
    """Run10's miss: a measurement read FA4 ahead of the model's Sage 2 fp8 by less than its
    own floor, and the rounds then read FA4 slower. The model's choice is kept unless a
    kernel measured faster by more than the measurement's noise floor."""
    entries = model_entries(WAN, MODEL)
    first = next(e.backend for e in entries if e.rule.reason(WAN) is None)
    other = next(e.backend for e in entries if e.measure and e.backend != first)
    contest = next(c for c in Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, FakeMeasure({})))
                   .candidates(WAN) if isinstance(c, Contest))
    assert contest.keep == first
    close = FakeMeasure({"sdpa": 40.0, first: 28.0, other: 27.4}, floor=0.03)  # other 2.1% faster, floor 3%
    plan = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path / "a", close)).plan_for(WAN, _tensors())
    assert close.repeats == [first]  # the floor is measured on the model's choice
    assert plan.name == first and plan.tuning.noise_floor == pytest.approx(0.03)
    assert plan.tuning.candidates[other]["verdict"].startswith("inside the noise floor")
    clear = FakeMeasure({"sdpa": 40.0, first: 28.0, other: 26.0}, floor=0.03)  # 7.1% faster
    plan = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path / "b", clear)).plan_for(WAN, _tensors())
    assert plan.name == other


def test_sdpa_is_kept_when_it_is_the_models_choice(tmp_path, every_kernel_installed, monkeypatch):
    """A contest whose model choice is SDPA (the kernels predicted near it but not past its
    margin) keeps SDPA against a gain inside the floor: `auto` is never slower than SDPA
    on a difference it cannot see."""
    near = {"sdpa": 8000.0, "flash4": 7700.0}
    monkeypatch.setattr("attention.priority.model_candidates", lambda call, model: (near, set(), []))
    monkeypatch.setattr(type(MODEL), "margins", lambda self, call, predicted, copying: dict.fromkeys(predicted, 0.05))
    dispatcher = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, FakeMeasure({})))
    contest = next(c for c in dispatcher.candidates(WAN) if isinstance(c, Contest))
    assert contest.names == ("flash4", "sdpa") and contest.keep == "sdpa"
    fake = FakeMeasure({"sdpa": 8.0, "flash4": 7.9}, floor=0.02)
    assert Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path / "a", fake)).plan_for(
        WAN, _tensors()).name == "sdpa"


def test_calls_the_model_separates_are_never_timed(tmp_path, every_kernel_installed):
    fake = FakeMeasure({})
    dispatcher = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake))
    for call in (SD35, SHORT):
        assert not any(isinstance(c, Contest) for c in dispatcher.candidates(call))
        plan = dispatcher.plan_for(call, _tensors())
        assert plan.tuning is None and plan.name == next(e.backend for e in model_entries(call, MODEL)
                                                          if e.rule.reason(call) is None)
    assert fake.seen == []


def test_no_timing_without_tensors_or_when_turned_off(tmp_path, every_kernel_installed, monkeypatch):
    fake = FakeMeasure({})
    first = next(e.backend for e in model_entries(WAN, MODEL))
    # Without tensors (status, doctor, a trace) the model's first choice answers.
    assert Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake)).plan_for(WAN).name == first
    # Turned off per dispatcher (benchmarks' model-alone rows) or by the environment.
    off = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake), measure_contested=False)
    assert off.measurer is None and off.plan_for(WAN, _tensors()).name == first
    monkeypatch.setenv(ENV_AUTO_MEASURE, "0")
    assert Dispatcher("auto", cost_model=MODEL).measurer is None
    assert fake.seen == []
    monkeypatch.delenv(ENV_AUTO_MEASURE)
    made = Dispatcher("auto", cost_model=MODEL).measurer
    assert made is not None and made.path == auto_measured_path()
    # Only `auto` measures contested calls: not a named kernel, not auto_tuned's static fallback.
    assert Dispatcher("flash4").measurer is None
    tuned = Dispatcher("auto_tuned", cost_model=MODEL, tuner=_measurer(tmp_path, fake))
    assert tuned.measurer is None and not any(isinstance(c, Contest) for c in tuned.candidates(WAN))


def test_a_rule_table_never_measures(tmp_path, every_kernel_installed):
    from attention.priority import AUTO_TABLE
    dispatcher = Dispatcher("auto", auto_table=dict(AUTO_TABLE), measurer=_measurer(tmp_path, FakeMeasure({})))
    assert not any(isinstance(c, Contest) for c in dispatcher.candidates(WAN))


def test_a_compiled_graph_traces_a_contested_call_as_sdpa_once_this_machine_measured_sdpa(
        tmp_path, every_kernel_installed, monkeypatch):
    """A compiled graph decides at trace time, on the call alone: a contested call goes
    through the pack's op until this machine has measured it; once SDPA won, the next
    trace runs it as traced SDPA (no op on a ~190 µs call), and a synthetic plan says so."""
    monkeypatch.setattr("attention.dispatch._signature_device", lambda call: torch.device("cpu"))
    assert not Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, FakeMeasure({}))).runs_traced_sdpa(WAN)
    fake = FakeMeasure({"sdpa": 0.40, "flash4": 0.45})
    first = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake))
    assert not first.runs_traced_sdpa(FLUX)  # not measured yet: the op serves it, and times it
    assert first.plan_for(FLUX, _tensors()).name == "sdpa" and len(fake.seen) == 1
    later = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path, fake))
    assert later.runs_traced_sdpa(FLUX)
    synthetic = later.plan_for(FLUX)
    assert synthetic.name == "sdpa" and synthetic.tuned_by == registry.AUTO and synthetic.tuning.source == "saved"
    assert later.measurer.decisions == [] and len(fake.seen) == 1  # looked up, neither timed nor counted
    # Counted once a graph runs it (the plan a compiled run serves through).
    later.traced_plan(("flux",), FLUX)
    assert [d.key for d in later.measurer.decisions] == [synthetic.tuning.key]
    # A re-tune forgets the saved decision at its first measurement: until then, nothing is traced on it.
    retune = Tuner(later.measurer.path, measure=fake, retune=True, store=later.measurer._store_for)
    assert not Dispatcher("auto", cost_model=MODEL, measurer=retune).runs_traced_sdpa(FLUX)
    # Where the measurement chose a kernel, the op serves the call.
    kernel = FakeMeasure({"sdpa": 0.45, "flash4": 0.30})
    Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path / "b", kernel)).plan_for(FLUX, _tensors())
    chose_kernel = Dispatcher("auto", cost_model=MODEL, measurer=_measurer(tmp_path / "b", kernel))
    assert chose_kernel.plan_for(FLUX).name == "flash4" and not chose_kernel.runs_traced_sdpa(FLUX)


def test_the_measurements_file_is_not_auto_tuneds(tmp_path):
    tuning = str(tmp_path / "tuning.json")
    assert auto_measured_path(tuning) == str(tmp_path / AUTO_MEASURED_FILE) != tuning



def test_doctor_says_whether_auto_times_contested_calls(monkeypatch):
    from attention import doctor
    line = doctor._source_line({"source": "default", "gpu": "NVIDIA H200"})
    assert "auto times those kernels once per machine" in line and f"{CONTESTED_WITHIN:.1%}" in line
    monkeypatch.setenv(ENV_AUTO_MEASURE, "0")
    assert "are not timed" in doctor._source_line({"source": "default", "gpu": "NVIDIA H200"})
    assert "timed" not in doctor._source_line({"source": "rules"})
