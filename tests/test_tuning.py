"""`auto_tuned` on the CPU: the decision with controlled times and errors, the budgets,
the saved file (keying, reuse, damaged and foreign files), and the dispatcher measuring
real CPU kernels."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from attention import Dispatcher, contract, registry, tuning
from attention.call import FLAT, CallSignature
from attention.tuning import (DEFAULT_BUDGET, MEASURED, PRECISE_BUDGET, SAVED, Limits, Measurement, Tuner,
                              budget_for, decide, measure_on_device, signature_key)
from attention.tuning_store import FORMAT, VERSION, forget_loaded_stores, parse, store_for, InvalidTuningFile

CALL = CallSignature(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=2, heads_q=4,
                     heads_kv=4, seq_q=64, seq_k=64, head_dim=16, head_dim_v=16)
MACHINE_A = {"gpu": "GPU A", "capability": "9.0", "driver": "1", "torch": "2", "cuda": "13.0", "cudnn": "9",
             "packages": {}}
MACHINE_B = dict(MACHINE_A, gpu="GPU B")


def good(rel_l1: float = 0.001, cosine: float = 0.999999) -> dict:
    return {"rel_l1": rel_l1, "cosine": cosine, "max_abs": 0.01, "nonfinite": 0}


@pytest.fixture(autouse=True)
def _fresh_stores():
    forget_loaded_stores()
    yield
    forget_loaded_stores()


# --- the decision ----------------------------------------------------------------------

def test_decide_takes_the_fastest_inside_the_budget():
    measured = {"sdpa": Measurement(ms=1.0, error=good(0.0)), "flash4": Measurement(ms=0.8, error=good()),
                "sage": Measurement(ms=0.5, error=good(rel_l1=0.05))}
    chosen, table = decide(measured, DEFAULT_BUDGET)
    assert chosen == "flash4"
    assert table["flash4"]["verdict"] == "chosen"
    assert table["sdpa"]["verdict"].startswith("slower: 1.250x")
    assert "rel. L1 0.0500 > 0.02" in table["sage"]["verdict"]


def test_decide_refuses_nonfinite_low_cosine_and_failures():
    measured = {"sdpa": Measurement(ms=2.0, error=good(0.0)),
                "sage": Measurement(ms=0.1, error=dict(good(), nonfinite=3)),
                "kitchen_int8": Measurement(ms=0.2, error=good(cosine=0.99)),
                "flash4": Measurement(failure="raised RuntimeError: no kernel")}
    chosen, table = decide(measured, DEFAULT_BUDGET)
    assert chosen == "sdpa"
    assert table["sage"]["verdict"] == "3 non-finite values"
    assert "cosine 0.990000 < 0.9995" in table["kitchen_int8"]["verdict"]
    assert table["flash4"]["verdict"] == "raised RuntimeError: no kernel"
    assert table["flash4"]["ms"] is None


def test_decide_keeps_a_choice_a_measurement_cannot_overturn():
    """`keep` (auto's cost model on a contested call) stays unless beaten by more than the
    margin (the measurement's noise floor); an inaccurate or unmeasured keep never stays."""
    measured = {"sdpa": Measurement(ms=1.0, error=good(0.0)), "sage": Measurement(ms=0.80, error=good()),
                "flash4": Measurement(ms=0.78, error=good())}
    chosen, table = decide(measured, DEFAULT_BUDGET, keep="sage", margin=0.03)
    assert chosen == "sage"  # flash4 is 2.5% faster: inside the 3% floor
    assert table["sage"]["verdict"] == "chosen"
    assert table["flash4"]["verdict"].startswith("inside the noise floor: 0.975x the chosen time, within the "
                                                 "measurement's 3.0%")
    assert contract.verdict(table["flash4"]["verdict"])["kind"] == contract.INSIDE_NOISE
    assert table["sdpa"]["verdict"].startswith("slower: 1.250x")
    assert decide(measured, DEFAULT_BUDGET, keep="sage", margin=0.02)[0] == "flash4"  # 2.5% > 2%: measured wins
    assert decide(measured, DEFAULT_BUDGET, keep="sage")[0] == "flash4"  # no floor: the fastest
    assert decide(measured, DEFAULT_BUDGET)[0] == "flash4"  # nothing to keep (auto_tuned)
    inaccurate = dict(measured, sage=Measurement(ms=0.79, error=good(rel_l1=0.05)))
    assert decide(inaccurate, DEFAULT_BUDGET, keep="sage", margin=0.5)[0] == "flash4"
    failed = dict(measured, sage=Measurement(failure="raised RuntimeError: no kernel"))
    assert decide(failed, DEFAULT_BUDGET, keep="sage", margin=0.5)[0] == "flash4"
    # A keep that measured fastest is simply chosen.
    assert decide(measured, DEFAULT_BUDGET, keep="flash4", margin=0.03)[0] == "flash4"


def test_the_rounds_shuffle_differs_per_signature(monkeypatch):
    """The rounds' order is seeded from the signature (one seed for every call would give
    every call with the same candidates the same sequence of orders), or as given."""
    seeds = []

    def fake_timing(fns, device, **kwargs):
        if len(fns) > 1:  # the rounds (each kernel's single timing has no order)
            seeds.append(kwargs["seed"])
        return dict.fromkeys(fns, 1.0)

    monkeypatch.setattr(tuning, "interleaved_median_ms", fake_timing)
    q = torch.randn(1, 2, 64, 16)
    runs = {name: sdpa_run for name in ("sdpa", "sdpa_cudnn")}
    calls = [CallSignature("cpu", None, torch.float32, 1, 2, 2, n, n, 16, 16, layout_in="B,H,N,D",
                           layout_out="B,H,N,D") for n in (64, 64, 128)]
    for call in calls:
        measure_on_device(call, (q, q, q, None, None), runs, "sdpa", Limits(reps=3), 10.0)
    assert seeds[0] == seeds[1] != seeds[2]
    measure_on_device(calls[0], (q, q, q, None, None), runs, "sdpa", Limits(reps=3), 10.0, seed=7)
    assert seeds[-1] == 7


def test_decide_with_nothing_accurate_chooses_nothing():
    chosen, table = decide({"sage": Measurement(ms=0.1, error=good(rel_l1=0.5))}, DEFAULT_BUDGET)
    assert chosen is None and "over the error budget" in table["sage"]["verdict"]


def test_precision_requests_get_the_strict_budget():
    import dataclasses
    assert budget_for(CALL) is DEFAULT_BUDGET
    assert budget_for(dataclasses.replace(CALL, attn_precision=torch.float32)) is PRECISE_BUDGET
    assert budget_for(dataclasses.replace(CALL, low_precision_ok=False)) is PRECISE_BUDGET
    # an error a quantized kernel may have on a default call is refused on a precise one
    assert DEFAULT_BUDGET.problem(good(rel_l1=0.01)) is None
    assert PRECISE_BUDGET.problem(good(rel_l1=0.01)) is not None


def test_signature_keys_differ_in_everything_that_matters():
    import dataclasses
    variants = [CALL, dataclasses.replace(CALL, seq_k=77), dataclasses.replace(CALL, dtype=torch.bfloat16),
                dataclasses.replace(CALL, mask_kind="bool", mask_shape=(64, 64)),
                dataclasses.replace(CALL, layout_in=FLAT, layout_out="B,H,N,D"),
                dataclasses.replace(CALL, low_precision_ok=False), dataclasses.replace(CALL, heads_kv=2),
                dataclasses.replace(CALL, custom_scale=True)]
    keys = {signature_key(c) for c in variants}
    assert len(keys) == len(variants)
    assert signature_key(CALL) == signature_key(dataclasses.replace(CALL))


# --- the tuner with controlled measurements -------------------------------------------

class FakeMeasure:
    """Stands in for the GPU: returns fixed measurements and advances a fake clock."""

    def __init__(self, results: dict[str, Measurement], seconds: float = 0.5) -> None:
        self.results = results
        self.seconds = seconds
        self.now = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def __call__(self, call, tensors, runs, reference, limits, seconds_left, repeat=None):
        self.calls += 1
        self.now += min(self.seconds, seconds_left)
        return {name: Measurement(self.results[name].ms, self.results[name].error, self.results[name].failure)
                for name in runs}


def tensors():
    q = torch.randn(2, 4, 64, 16)
    return (q, q, q, None, None)


RUNS = {"sdpa": lambda *a: None, "flash4": lambda *a: None, "sage": lambda *a: None}
RESULTS = {"sdpa": Measurement(ms=1.0, error=good(0.0)), "flash4": Measurement(ms=0.7, error=good()),
           "sage": Measurement(ms=0.4, error=good(rel_l1=0.03))}


def tuner(path, fake, machine=MACHINE_A, **kwargs) -> Tuner:
    return Tuner(str(path), measure=fake, clock=fake.clock, limits=kwargs.pop("limits", Limits()),
                 store=lambda device: store_for(str(path), device, machine=lambda d: machine), **kwargs)


def test_first_run_measures_and_saves_later_runs_reuse(tmp_path):
    path = tmp_path / "tuning.json"
    fake = FakeMeasure(RESULTS)
    first_tuner = tuner(path, fake)
    first = first_tuner.choose(CALL, tensors(), RUNS)
    assert (first.backend, first.source, fake.calls) == ("flash4", MEASURED, 1)
    first_tuner.flush()  # the end of the sampler run
    assert first.candidates["sage"]["verdict"].startswith("over the error budget")
    saved = json.loads(path.read_text())
    assert saved["format"] == FORMAT and saved["machines"][0]["fingerprint"] == MACHINE_A
    assert saved["machines"][0]["decisions"][signature_key(CALL)]["backend"] == "flash4"

    forget_loaded_stores()  # as a new ComfyUI process would
    again = tuner(path, fake)
    reused = again.choose(CALL, tensors(), RUNS)
    assert (reused.backend, reused.source, fake.calls) == ("flash4", SAVED, 1)
    summary = again.summary()
    assert summary["reused"] == 1 and summary["measured"] == 0 and summary["tuning_s"] == 0


def test_retune_forgets_this_machines_decisions_and_measures_once_more(tmp_path):
    import dataclasses
    path = tmp_path / "tuning.json"
    fake = FakeMeasure(RESULTS)
    other_shape = dataclasses.replace(CALL, seq_q=128, seq_k=128)
    first = tuner(path, fake)
    first.choose(CALL, tensors(), RUNS)
    first.choose(other_shape, tensors(), RUNS)
    first.flush()
    on_b = tuner(path, fake, machine=MACHINE_B)
    on_b.choose(CALL, tensors(), RUNS)
    on_b.flush()
    fake.results = dict(RESULTS, sdpa=Measurement(ms=0.5, error=good(0.0)))  # e.g. a new cuDNN
    retuner = tuner(path, fake, retune=True)
    assert retuner.choose(CALL, tensors(), RUNS).backend == "sdpa"
    assert retuner.choose(CALL, tensors(), RUNS).source == SAVED  # once per signature, not per call
    retuner.flush()
    assert fake.calls == 4
    machines = {m["fingerprint"]["gpu"]: m["decisions"] for m in json.loads(path.read_text())["machines"]}
    assert list(machines["GPU A"]) == [signature_key(CALL)]  # the other shape was forgotten
    assert list(machines["GPU B"]) == [signature_key(CALL)]  # another machine's decisions stay


def test_a_saved_choice_that_cannot_run_now_is_measured_again(tmp_path):
    path = tmp_path / "tuning.json"
    fake = FakeMeasure(RESULTS)
    tuner(path, fake).choose(CALL, tensors(), RUNS)
    without_flash4 = {"sdpa": RUNS["sdpa"], "sage": RUNS["sage"]}
    assert tuner(path, fake).choose(CALL, tensors(), without_flash4).backend == "sdpa"
    assert fake.calls == 2


def test_other_machines_decisions_are_kept_but_not_used(tmp_path):
    path = tmp_path / "tuning.json"
    fake = FakeMeasure(RESULTS)
    on_a = tuner(path, fake, machine=MACHINE_A)
    on_a.choose(CALL, tensors(), RUNS)
    on_a.flush()
    fake.results = dict(RESULTS, sdpa=Measurement(ms=0.1, error=good(0.0)))
    b_tuner = tuner(path, fake, machine=MACHINE_B)
    on_b = b_tuner.choose(CALL, tensors(), RUNS)
    b_tuner.flush()
    assert (on_b.backend, on_b.source, fake.calls) == ("sdpa", MEASURED, 2)
    machines = json.loads(path.read_text())["machines"]
    assert sorted(m["fingerprint"]["gpu"] for m in machines) == ["GPU A", "GPU B"]


def test_run_budget_leaves_later_signatures_to_static_auto(tmp_path):
    import dataclasses
    fake = FakeMeasure(RESULTS, seconds=3.0)
    t = tuner(tmp_path / "t.json", fake, limits=Limits(signature_s=3.0, run_s=5.0))
    calls = [dataclasses.replace(CALL, seq_q=n, seq_k=n) for n in (64, 128, 256)]
    decisions = [t.choose(c, tensors(), RUNS) for c in calls]
    assert [d is not None for d in decisions] == [True, True, False]
    assert t.run_spent_s == pytest.approx(5.0)  # the second got only what was left
    assert t.summary()["left_to_auto"] == [signature_key(calls[2])]
    t.begin_run()
    assert t.choose(calls[2], tensors(), RUNS) is not None


def test_partial_measurements_are_used_but_not_saved(tmp_path):
    path = tmp_path / "t.json"
    results = dict(RESULTS, sage=Measurement(failure="not measured: the signature's tuning time was spent"))
    partial = tuner(path, FakeMeasure(results))
    decision = partial.choose(CALL, tensors(), RUNS)
    partial.flush()
    assert decision.backend == "flash4" and not decision.complete
    assert not path.exists()


def test_an_unwritable_file_does_not_end_the_run(tmp_path, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    unwritable = tuner(blocked / "tuning.json", FakeMeasure(RESULTS))
    with caplog.at_level(logging.WARNING):
        decision = unwritable.choose(CALL, tensors(), RUNS)
        unwritable.flush()
    assert decision.backend == "flash4" and "cannot save tuning decisions" in caplog.text
    assert unwritable.choose(CALL, tensors(), RUNS).source == SAVED  # still serves this process


def test_no_exact_reference_means_no_tuning(tmp_path):
    fake = FakeMeasure(RESULTS)
    assert tuner(tmp_path / "t.json", fake).choose(CALL, tensors(), {"sage": RUNS["sage"]}) is None
    assert fake.calls == 0


# --- damaged and foreign files --------------------------------------------------------

def valid_file(decision: dict | None = None) -> dict:
    decision = decision or {"backend": "flash4", "reference": "sdpa", "tuning_ms": 12.0, "budget": {},
                            "candidates": {"sdpa": {"ms": 1.0, "rel_l1": 0.0, "cosine": 1.0, "max_abs": 0.0,
                                                    "nonfinite": 0, "verdict": "slower"}}}
    return {"format": FORMAT, "version": VERSION,
            "machines": [{"fingerprint": MACHINE_A, "decisions": {signature_key(CALL): decision}}]}


DAMAGED = {
    "not json": "{\"format\": ",
    "a list": "[]",
    "foreign format": json.dumps(dict(valid_file(), format="someone-else/cache")),
    "newer version": json.dumps(dict(valid_file(), version=VERSION + 1)),
    "unknown backend": json.dumps(valid_file(dict(valid_file()["machines"][0]["decisions"][signature_key(CALL)],
                                                  backend="__import__('os').system('x')"))),
    "NaN time": json.dumps(valid_file()).replace("12.0", "NaN"),
    "string time": json.dumps(valid_file()).replace("12.0", "\"12\""),
    "bad key": json.dumps(valid_file()).replace(signature_key(CALL), "../../etc"),
    "fingerprint not object": json.dumps(dict(valid_file(), machines=[{"fingerprint": 3, "decisions": {}}])),
    "budget not numbers": json.dumps(valid_file(dict(valid_file()["machines"][0]["decisions"][signature_key(CALL)],
                                                     budget={"rel_l1": "<img src=x>"}))),
    "noise floor not a number": json.dumps(valid_file(dict(
        valid_file()["machines"][0]["decisions"][signature_key(CALL)], noise_floor="1%"))),
    "tuned_at not text": json.dumps(valid_file(dict(valid_file()["machines"][0]["decisions"][signature_key(CALL)],
                                                    tuned_at=["x"]))),
}


def test_a_valid_file_parses():
    assert parse(json.dumps(valid_file()))[0]["fingerprint"] == MACHINE_A


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_or_foreign_files_are_ignored_with_a_warning(tmp_path, caplog, case):
    path = tmp_path / "tuning.json"
    path.write_text(DAMAGED[case])
    with pytest.raises(InvalidTuningFile):
        parse(DAMAGED[case])
    fake = FakeMeasure(RESULTS)
    with caplog.at_level(logging.WARNING):
        damaged = tuner(path, fake)
        decision = damaged.choose(CALL, tensors(), RUNS)
        damaged.flush()
    assert "ignoring tuning file" in caplog.text
    assert decision.source == MEASURED and fake.calls == 1  # nothing in it was trusted
    assert (tmp_path / "tuning.json.ignored").read_text() == DAMAGED[case]  # kept for the user to inspect
    assert parse(path.read_text())[0]["fingerprint"] == MACHINE_A


# --- real kernels on the CPU ----------------------------------------------------------

def sdpa_run(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class VirtualClock:
    """Time that passes only when a kernel says so: measurements independent of the load
    on the machine running the tests."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms * 1e-3


def test_measure_on_device_times_real_calls_and_checks_errors(monkeypatch):
    from attention import measure

    clock = VirtualClock()
    monkeypatch.setattr(measure, "time", clock)  # the timer measure.time_ms reads on a CPU
    q, k, v = (torch.randn(1, 4, 256, 32) for _ in range(3))

    def costing(ms, kernel):
        def run(q, k, v, mask, scale):
            clock.spend(ms)
            return kernel(q, k, v, mask, scale)
        return run

    def noisy(q, k, v, mask, scale):  # fastest, but 10% off
        out = sdpa_run(q, k, v, mask, scale)
        return out + 0.1 * out.abs().mean() * torch.randn_like(out)

    def broken(q, k, v, mask, scale):
        raise RuntimeError("no kernel image for this GPU")

    runs = {"sdpa": costing(1.0, sdpa_run), "sdpa_efficient": costing(4.0, sdpa_run),  # exact, 4x slower
            "sdpa_flash": costing(1.1, sdpa_run),  # exact, a contender: timed in interleaved rounds
            "kitchen_int8": costing(0.5, noisy), "flash4": broken}
    call = CallSignature(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=1, heads_q=4,
                         heads_kv=4, seq_q=256, seq_k=256, head_dim=32, head_dim_v=32, layout_in="B,H,N,D",
                         layout_out="B,H,N,D")
    measured = measure_on_device(call, (q, k, v, None, None), runs, "sdpa", Limits(reps=5), 10.0,
                                 clock=clock.perf_counter)
    assert measured["sdpa"].error["rel_l1"] == 0.0
    assert measured["kitchen_int8"].error["rel_l1"] > 0.05 and measured["kitchen_int8"].ms is None
    assert measured["flash4"].failure.startswith("raised RuntimeError: no kernel image")
    assert measured["sdpa"].ms == pytest.approx(1.0)
    assert measured["sdpa_flash"].ms == pytest.approx(1.1)
    assert measured["sdpa_efficient"].ms == pytest.approx(4.0)
    chosen, table = decide(measured, budget_for(call))
    assert chosen == "sdpa"
    assert table["sdpa_efficient"]["verdict"] == "slower: 4.000x the chosen time"


def test_measure_on_device_stops_at_the_signature_deadline(monkeypatch):
    from attention import measure

    clock = VirtualClock()
    monkeypatch.setattr(measure, "time", clock)
    q = torch.randn(1, 2, 16, 8)

    def costing(ms):
        def run(q, k, v, mask, scale):
            clock.spend(ms)
            return sdpa_run(q, k, v, mask, scale)
        return run

    runs = {"sdpa": costing(300.0), "sdpa_flash": costing(300.0), "sdpa_efficient": costing(300.0)}
    call = CallSignature(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=1, heads_q=2,
                         heads_kv=2, seq_q=16, seq_k=16, head_dim=8, head_dim_v=8, layout_in="B,H,N,D",
                         layout_out="B,H,N,D")
    measured = measure_on_device(call, (q, q, q, None, None), runs, "sdpa", Limits(reps=5), 1.0,
                                 clock=clock.perf_counter)
    # The reference output, sdpa's check run and its two timed calls take 1.2 s of the 1 s:
    # the others are not started.
    assert measured["sdpa"].ms == pytest.approx(300.0)
    for name in ("sdpa_flash", "sdpa_efficient"):
        assert measured[name].failure == "not measured: the signature's tuning time was spent"


def test_the_reference_is_timed_twice_with_the_contenders(monkeypatch):
    """The noise floor: with a rival within CONTENDER_RATIO, the reference runs twice in the
    same rounds; alone, no rounds and no floor. Timings are faked (no wall clock)."""
    rounds = []

    def fake_timing(fns, device, **kwargs):
        rounds.append(sorted(fns))
        return {name: {"sdpa": 1.0, "sdpa_cudnn": 1.1, "sdpa_efficient": 3.0}.get(name, 1.02) for name in fns}

    monkeypatch.setattr(tuning, "interleaved_median_ms", fake_timing)
    q = torch.randn(1, 2, 64, 16)
    call = CallSignature("cpu", None, torch.float32, 1, 2, 2, 64, 64, 16, 16, layout_in="B,H,N,D", layout_out="B,H,N,D")
    runs = {name: sdpa_run for name in ("sdpa", "sdpa_cudnn", "sdpa_efficient")}
    measured = measure_on_device(call, (q, q, q, None, None), runs, "sdpa", Limits(reps=3), 10.0)
    assert rounds[-1] == ["(repeat)", "sdpa", "sdpa_cudnn"]
    assert measured["sdpa"].repeat_ms == 1.02 and measured["sdpa_cudnn"].repeat_ms is None
    # Asked for another contender (auto's kept choice), that one is timed twice instead.
    measured = measure_on_device(call, (q, q, q, None, None), runs, "sdpa", Limits(reps=3), 10.0,
                                 repeat="sdpa_cudnn")
    assert measured["sdpa_cudnn"].repeat_ms == 1.02 and measured["sdpa"].repeat_ms is None
    # One that is no contender (sdpa_efficient, 3x slower) leaves the floor to the reference.
    measured = measure_on_device(call, (q, q, q, None, None), runs, "sdpa", Limits(reps=3), 10.0,
                                 repeat="sdpa_efficient")
    assert measured["sdpa"].repeat_ms == 1.02 and measured["sdpa_efficient"].repeat_ms is None
    rounds.clear()
    alone = {"sdpa": sdpa_run, "sdpa_efficient": sdpa_run}
    measured = measure_on_device(call, (q, q, q, None, None), alone, "sdpa", Limits(reps=3), 10.0)
    assert measured["sdpa"].repeat_ms is None and all(len(r) == 1 for r in rounds)


def test_decisions_carry_the_noise_floor_into_the_file(tmp_path):
    path = tmp_path / "tuning.json"
    results = dict(RESULTS, sdpa=Measurement(ms=1.0, error=good(0.0), repeat_ms=1.02))

    class WithRepeat(FakeMeasure):
        def __call__(self, call, tensors, runs, reference, limits, seconds_left, repeat=None):
            out = super().__call__(call, tensors, runs, reference, limits, seconds_left)
            out[reference].repeat_ms = self.results[reference].repeat_ms
            return out

    measuring = tuner(path, WithRepeat(results))
    decision = measuring.choose(CALL, tensors(), RUNS)
    assert decision.noise_floor == pytest.approx(0.02)
    measuring.flush()  # written at the end of the run
    saved = json.loads(path.read_text())["machines"][0]["decisions"][signature_key(CALL)]
    assert saved["noise_floor"] == pytest.approx(0.02)
    forget_loaded_stores()
    assert tuner(path, FakeMeasure(RESULTS)).choose(CALL, tensors(), RUNS).noise_floor == pytest.approx(0.02)


def test_dispatcher_auto_tuned_measures_once_then_serves_from_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_BACKENDS_TUNING_FILE", str(tmp_path / "tuning.json"))
    q, k, v = (torch.randn(2, 64, 4 * 16) for _ in range(3))
    dispatcher = Dispatcher("auto_tuned")
    out = dispatcher(q, k, v, 4)
    expected = Dispatcher("sdpa")(q, k, v, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    plan = dispatcher.plans()[0]
    assert plan.tuning is not None and plan.tuning.source == MEASURED
    assert plan.name in ("sdpa", "sdpa_flash")  # the CPU's tunable backends
    assert set(plan.tuning.candidates) == {"sdpa", "sdpa_flash"}  # sdpa_math is not tunable
    for _ in range(3):
        dispatcher(q, k, v, 4)
    assert plan.calls == 4 and len(dispatcher.tuner.decisions) == 1
    dispatcher.tuner.flush()
    saved = json.loads((tmp_path / "tuning.json").read_text())
    assert saved["machines"][0]["fingerprint"]["gpu"] == "cpu"


def test_auto_tuned_never_sends_a_mask_to_a_maskless_backend(tmp_path):
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    mask = torch.rand(1, 1, 32, 32) > 0.3
    seen = {}

    def spy(call, tensors, runs, reference, limits, seconds_left, repeat=None):
        seen.update(runs)
        return {name: Measurement(ms=1.0, error=good(0.0)) for name in runs}

    dispatcher = Dispatcher("auto_tuned", tuner=Tuner(str(tmp_path / "t.json"), measure=spy))
    dispatcher(q, k, v, 2, mask, skip_reshape=True, skip_output_reshape=True)
    assert seen and all(registry.get(name).call_reasons(dispatcher.plans()[0].signature) == [] for name in seen)
    assert not any(registry.get(name).quantized for name in seen)


def test_synthetic_plans_answer_with_the_static_order():
    plan = Dispatcher("auto_tuned", tuner=Tuner("/nonexistent/never-written.json")).plan_for(CALL)
    assert plan.name == "sdpa" and plan.tuning is None


def test_non_finite_measurements_are_saved_as_null(tmp_path):
    nan_error = {"rel_l1": math.nan, "cosine": math.nan, "max_abs": math.inf, "nonfinite": 4096}
    fake = FakeMeasure(dict(RESULTS, sage=Measurement(ms=math.inf, error=nan_error)))
    nan_tuner = tuner(tmp_path / "t.json", fake)
    decision = nan_tuner.choose(CALL, tensors(), RUNS)
    nan_tuner.flush()
    assert decision.backend == "flash4"
    saved = parse((tmp_path / "t.json").read_text())[0]["decisions"][signature_key(CALL)]
    assert saved["candidates"]["sage"] == {"ms": None, "rel_l1": None, "cosine": None, "max_abs": None,
                                           "nonfinite": 4096, "verdict": "4096 non-finite values"}
