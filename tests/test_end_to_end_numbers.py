"""benchmarks/end_to_end.py's arithmetic with injected times (no ComfyUI, no clock): the
speedups, the attention share and the predicted speedup. The tiny end-to-end run in the
ComfyUI suite checks the run itself; its times depend on the machine's load, these do not."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from library_support import ROOT

BENCHMARKS = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def end_to_end():
    sys.path.insert(0, BENCHMARKS)  # end_to_end imports its neighbour `overhead`
    try:
        spec = importlib.util.spec_from_file_location("attention_backends_end_to_end",
                                                      os.path.join(BENCHMARKS, "end_to_end.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("attention_backends_end_to_end", None)
        sys.path.remove(BENCHMARKS)


def test_speedups_share_and_prediction_from_injected_times(end_to_end):
    default = end_to_end.Variant(end_to_end.DEFAULT, patcher=None, sample_ms=[110.0, 100.0, 90.0],
                                 step_intervals_ms=[48.0, 52.0], attention_ms=40.0)
    faster = end_to_end.Variant("flash4", patcher=None, sample_ms=[80.0, 80.0], step_intervals_ms=[40.0],
                                attention_ms=20.0)
    row = end_to_end._variant_result(faster, default, steps=2)
    assert row["step_ms"] == 40.0 and row["speedup"] == pytest.approx(50.0 / 40.0)
    assert row["steady_step_ms"] == 40.0 and row["steady_speedup"] == pytest.approx(50.0 / 40.0)
    assert row["attention_ms_per_step"] == 10.0 and row["attention_share"] == pytest.approx(10.0 / 40.0)
    # T / (T - T_a + T_a') with T = 50, T_a = 20, T_a' = 10.
    assert row["predicted_speedup"] == pytest.approx(50.0 / 40.0)
    assert row["measured_over_predicted"] == pytest.approx(1.0)
    assert end_to_end._variant_result(default, default, steps=2)["speedup"] == 1.0


def test_a_variant_that_failed_reports_its_error_and_no_times(end_to_end):
    default = end_to_end.Variant(end_to_end.DEFAULT, patcher=None, sample_ms=[100.0], attention_ms=40.0)
    broken = end_to_end.Variant("sage", patcher=None, error="RuntimeError: no kernel image")
    row = end_to_end._variant_result(broken, default, steps=2)
    assert row == {"name": "sage", "error": "RuntimeError: no kernel image"}


def test_compiled_variant_against_the_compiled_default_predicted_from_eager_twins(end_to_end):
    default = end_to_end.Variant(end_to_end.DEFAULT, patcher=None, sample_ms=[100.0], attention_ms=40.0)
    twin = end_to_end.Variant("flash4", patcher=None, sample_ms=[80.0], attention_ms=20.0)
    compiled = end_to_end.Variant(end_to_end.COMPILED, patcher=None, sample_ms=[60.0],
                                  compiled_from=end_to_end.DEFAULT)
    fast = end_to_end.Variant(f"{end_to_end.COMPILED}+flash4", patcher=None, sample_ms=[50.0],
                              compiled_from="flash4", dynamo={"graph_breaks_at_warm_up": 0})
    by_name = {v.name: v for v in (default, twin, compiled, fast)}
    row = end_to_end._variant_result(fast, default, steps=2, by_name=by_name)
    assert row["speedup_vs_compiled"] == pytest.approx(60.0 / 50.0)
    # Compiled step T = 30, the eager twins' attention per step 20 and 10: 30 / (30 - 20 + 10).
    assert row["predicted_vs_compiled"] == pytest.approx(30.0 / 20.0)
    assert row["measured_over_predicted_vs_compiled"] == pytest.approx((60.0 / 50.0) / 1.5)
    assert row["dynamo"] == {"graph_breaks_at_warm_up": 0}
