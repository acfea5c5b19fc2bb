"""Reasons and selection for every backend on synthetic calls: GPU-only backends'
constraint logic runs here without a GPU."""

from __future__ import annotations

import dataclasses
import json

from pathlib import Path

import pytest
import torch

import attention
from attention import CallSignature, Dispatcher, registry
from attention.call import MASK_ADDITIVE, MASK_BOOL
from attention import cost_store
from attention.errors import UNAVAILABLE
from attention.priority import load_table
from attention.shapes import by_key
from library_support import ROOT


def sig(**overrides) -> CallSignature:
    base = dict(device_type="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, batch=2, heads_q=24,
                heads_kv=24, seq_q=4608, seq_k=4608, head_dim=128, head_dim_v=128)
    base.update(overrides)
    return CallSignature(**base)


def reasons(name: str, call: CallSignature) -> list[str]:
    return registry.get(name).call_reasons(call)


def test_every_backend_is_listed_with_a_stable_name():
    assert registry.names() == [
        "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex", "sage",
        "sage_qk_int8_pv_fp16_triton", "sage_qk_int8_pv_fp16_cuda", "sage_qk_int8_pv_fp8_cuda",
        "sage_qk_int8_pv_fp8_cuda_sm90", "sage3", "flash", "flash3", "flash4", "xformers", "kitchen_int8",
        "sol", "sparge", "head_parallel"]


def test_every_backend_on_a_plain_hopper_call_has_no_per_call_reasons():
    call = sig()
    for backend in registry.all_backends():
        if backend.name == "sage3":
            assert reasons("sage3", call) == ["built for sm10x, sm12x only, this GPU is sm90"]
        elif backend.sparse:  # 4608 tokens: too short for sparse attention (tests/test_sparse.py)
            assert reasons(backend.name, call) == [
                "4608 tokens: sparse attention serves calls from 12288 tokens (shorter ones stay dense)"]
        else:
            assert backend.call_reasons(call) == [], backend.name


@pytest.mark.parametrize("name", ["sage", "sage_qk_int8_pv_fp16_triton", "sage_qk_int8_pv_fp16_cuda",
                                  "sage_qk_int8_pv_fp8_cuda", "sage_qk_int8_pv_fp8_cuda_sm90", "sage3",
                                  "flash", "flash3", "flash4", "flex", "sdpa_flash"])
def test_mask_less_backends_refuse_masked_calls(name):
    call = sig(mask_kind=MASK_ADDITIVE, mask_shape=(2, 1, 4608, 4608))
    assert any("mask" in r for r in reasons(name, call)), name


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "sdpa_efficient", "sdpa_cudnn", "xformers", "kitchen_int8"])
def test_mask_capable_backends_take_broadcastable_masks(name):
    for shape in [(4608, 4608), (2, 4608, 4608), (2, 24, 4608, 4608), (1, 1, 1, 4608)]:
        assert reasons(name, sig(mask_kind=MASK_BOOL, mask_shape=shape)) == [], (name, shape)


def test_unbroadcastable_mask_is_refused_with_its_shape():
    why = reasons("sdpa", sig(mask_kind=MASK_ADDITIVE, mask_shape=(3, 4608, 4608)))
    assert why == ["mask shape [3, 4608, 4608] does not broadcast to [2, 24, 4608, 4608]"]


def test_quantized_backends_honour_precision_requests():
    for name in ["sage", "sage_qk_int8_pv_fp8_cuda_sm90", "kitchen_int8"]:
        assert "low_precision_attention=False" in " ".join(reasons(name, sig(low_precision_ok=False)))
        assert "attn_precision=float32" in " ".join(reasons(name, sig(attn_precision=torch.float32)))
    for name in ["sdpa", "flash4", "flash3"]:
        assert reasons(name, sig(low_precision_ok=False, attn_precision=torch.float32)) == []


def test_head_dim_rules():
    assert reasons("sage", sig(head_dim=80, head_dim_v=80)) == ["head dim 80 not in [64, 96, 128]"]
    assert reasons("flash3", sig(head_dim=512, head_dim_v=512)) == ["head dim 512 outside 8..256, a multiple of 8"]
    assert reasons("flash4", sig(head_dim=40, head_dim_v=40)) == []
    blackwell = sig(compute_capability=(10, 0), head_dim=160, head_dim_v=160)
    assert reasons("flash4", blackwell) == ["head dim 160 outside 8..128, a multiple of 8"]
    assert reasons("sage_qk_int8_pv_fp16_cuda", sig(head_dim=80, head_dim_v=80)) == []


def test_device_and_architecture_rules():
    cpu = sig(device_type="cpu", compute_capability=None, dtype=torch.float32)
    assert reasons("flash4", cpu)[0] == "runs on cuda only, not cpu"
    assert reasons("sdpa", cpu) == [] and reasons("sdpa_flash", cpu) == [] and reasons("sdpa_math", cpu) == []
    ampere = sig(compute_capability=(8, 6))
    assert reasons("sage_qk_int8_pv_fp8_cuda", ampere) == ["needs sm89 or newer, this GPU is sm86"]
    assert reasons("flash3", ampere) == ["built for sm9x only, this GPU is sm86"]
    assert reasons("sage_qk_int8_pv_fp8_cuda_sm90", sig(compute_capability=(12, 0))) == \
        ["built for sm9x only, this GPU is sm120"]
    turing = sig(compute_capability=(7, 5), dtype=torch.float16)
    assert reasons("kitchen_int8", turing) == []
    assert "needs sm80" in reasons("sdpa_flash", turing)[0]


def test_dtype_and_head_count_rules():
    assert reasons("flash4", sig(dtype=torch.float32)) == ["takes bfloat16/float16, not float32"]
    gqa = sig(heads_kv=8)
    assert reasons("flash4", gqa) == [] and reasons("sdpa", gqa) == []
    assert reasons("xformers", gqa) == ["needs as many key heads as query heads (8 vs 24)"]
    assert reasons("kitchen_int8", sig(heads_kv=7)) == ["query heads (24) must be a multiple of key heads (7)"]


def test_sage3_needs_the_default_scale():
    blackwell = sig(compute_capability=(12, 0))
    assert reasons("sage3", blackwell) == []
    assert reasons("sage3", dataclasses.replace(blackwell, custom_scale=True)) == [
        "has no softmax-scale argument, and the call passes its own scale"]


def test_every_reason_is_collected_not_just_the_first():
    call = sig(device_type="cpu", compute_capability=None, dtype=torch.float32, head_dim=40, head_dim_v=40,
               mask_kind=MASK_BOOL, mask_shape=(4608, 4608), low_precision_ok=False)
    assert len(reasons("sage", call)) == 5


def table_auto(priority: object = "auto") -> Dispatcher:
    """`auto` by the rule table, whatever cost model ships for the class."""
    return Dispatcher(priority, auto_table=load_table())


class TestAutoOnSyntheticCalls:
    """`auto`'s rule table on an H200 as seen from here: pretend every kernel is installed."""

    @pytest.fixture(autouse=True)
    def everything_available(self, monkeypatch):
        for backend in registry.all_backends():
            monkeypatch.setattr(backend, "_availability", attention.Availability(True, "test", ()))

    @pytest.mark.parametrize("key, expected", [
        ("sd15_l1", "flash4"), ("sd15_l2", "sdpa"), ("sd15_l3", "sdpa"), ("sdxl_l1", "sdpa"), ("sdxl_l2", "sdpa"),
        ("sdxl_cross", "sdpa"), ("flux_1024", "flash4"), ("qwen_1328", "flash4"),
        ("wan_480p", "sage_qk_int8_pv_fp8_cuda_sm90"), ("wan_720p", "sage_qk_int8_pv_fp8_cuda_sm90")])
    def test_hopper_choices_follow_the_measurements(self, key, expected):
        plan = table_auto().plan_for(by_key(key).signature())
        assert plan.name == expected
        assert not plan.is_fallback

    def test_video_call_with_a_mask_falls_back_with_the_reason(self):
        call = dataclasses.replace(by_key("wan_480p").signature(), mask_kind=MASK_ADDITIVE,
                                   mask_shape=(2, 1, 1, 32760))
        plan = table_auto().plan_for(call)
        assert plan.name == "sdpa"
        assert plan.is_fallback
        assert [name for name, _ in plan.fallback_reasons()] == [
            "sage_qk_int8_pv_fp8_cuda_sm90", "flash4", "flash3"]

    def test_precision_request_skips_quantized_kernel_for_an_exact_one(self):
        call = dataclasses.replace(by_key("wan_480p").signature(), low_precision_ok=False)
        assert table_auto().plan_for(call).name == "flash4"

    def test_explicit_choice_then_auto(self):
        dispatcher = table_auto(["kitchen_int8", "auto"])
        assert dispatcher.plan_for(by_key("sdxl_l2").signature()).name == "kitchen_int8"
        plan = dispatcher.plan_for(dataclasses.replace(by_key("sdxl_l2").signature(), low_precision_ok=False))
        assert plan.name == "sdpa" and plan.is_fallback

    def test_auto_never_picks_a_kernel_the_table_shows_slower_than_sdpa(self):
        # The committed H200 kernel table: every (backend, shape) measured slower than SDPA.
        table = json.loads((Path(ROOT) / "benchmarks" / "results" / "h200" / "kernels.json").read_text())
        slower = {(row["backend"], row["shape"]) for row in table["rows"]
                  if row["speedup"] is not None and row["speedup"] < 1.0}
        assert ("flash4", "sdxl_l2") in slower  # the table is the one the rules were written from
        for row in table["rows"]:
            if row["backend"] == "sdpa":
                chosen = table_auto().plan_for(by_key(row["shape"]).signature()).name
                assert (chosen, row["shape"]) not in slower


@pytest.mark.skipif(cost_store.shipped_model("sm90") is None, reason="no cost model shipped for sm90 yet")
class TestShippedModelOnMeasuredCalls:
    """The shipped H200 model decided through the dispatcher on the committed held-out runs
    (benchmarks/results/h200/heldout/heldout.json, run2/ to run4/, run6/, run7/, run9/ to run13/), whose rounds
    also timed the kernel table's image shapes: on both lists it is never more than 2% slower than
    SDPA, and every call it moves off SDPA runs within 3% of the fastest kernel, each
    outside the call's noise floor (two timings of one kernel in the same rounds), on the
    table shapes. The held-out list is left to the targets of benchmarks/heldout.py: Wan 2.2
    5B's choice (Sage 2 fp8) read 0.956-0.958 of FA4 in run2 and run3, 0.981-1.000 in
    run4 and heldout.json, 0.966 in run6, 0.971 in run7, 0.989 in run9, 0.969 in run10, 0.953
    in run11, 1.023 in run12 and 0.995 in run13,
    and the Wan calls of 18-20k tokens that run9 added read 0.934-1.001 of FA4, which the
    README reports.

    What staying on SDPA costs is not asserted: at SD1.5's level 1, FA4 read 0.76x SDPA
    in run2, 1.07x in run3, 0.74x in run4, 0.79x in heldout.json, 1.05x in run6 and
    run7, 1.08x in run9, 1.04x in run10, 1.075x in run11, 1.056x in run12 and 0.82x in run13, one H200 type;
    the README reports it, and `auto` times that call on the user's machine (it is contested)."""

    RUNS = ("heldout.json", "run2/heldout.json", "run3/heldout.json", "run4/heldout.json", "run6/heldout.json",
            "run7/heldout.json", "run9/heldout.json", "run10/heldout.json", "run11/heldout.json",
            "run12/heldout.json", "run13/heldout.json")
    # `python -m attention calibrate` on six H200 machines, FA4's host path rescaled x0.69,
    # x1.09, x0.65, x1.12, x1.00 and x1.16 of the model's, each with the model it rescaled:
    # runs 6 and 7 the one the window refit replaced, runs 9 to 11 and 13 the shipped one
    # (run12 used run11's: the same fingerprint).
    CALIBRATIONS = {"calibration_run6": "before_window/sm90.json", "calibration_run7": "before_window/sm90.json",
                    "calibration_run9": None, "calibration_run10": None, "calibration_run11": None,
                    "calibration_run13": None}

    @pytest.fixture(autouse=True)
    def everything_available(self, monkeypatch):
        for backend in registry.all_backends():
            monkeypatch.setattr(backend, "_availability", attention.Availability(True, "test", ()))

    @classmethod
    def measured(cls, section: str) -> list:
        from attention.calibrate import timing_from_json
        from attention.call import MASK_NONE
        timings = []
        for name in cls.RUNS:
            run = json.loads((Path(ROOT) / "benchmarks" / "results" / "h200" / "heldout" / name).read_text())
            timings += [timing_from_json(row) for row in (run[section]["timings"] if section else run["timings"])]
        return [t for t in timings if t.call.mask == MASK_NONE]

    @staticmethod
    def chosen(timing, model=None) -> tuple[str, float]:
        model = model or cost_store.shipped_model("sm90")
        name = Dispatcher("auto", cost_model=model).plan_for(timing.call.signature()).name
        return name, timing.times_us[name]

    def test_every_table_call_moved_off_sdpa_runs_within_3_percent_of_the_fastest(self):
        table = self.measured("table")
        assert len(table) >= 30
        moved = 0
        for timing in table:
            kernels = {n: us for n, us in timing.times_us.items() if n in registry.names()}
            name, us = self.chosen(timing)
            if name == "sdpa":
                continue
            moved += 1
            noise = timing.noise_floor or 0.0
            assert min(kernels.values()) / us >= 0.97 - noise, (timing.call.key, name)
        assert moved >= 2

    def test_the_h200_calibrations_choose_what_the_model_they_rescaled_chooses(self):
        """Rescaling (attention/cost_rescale.py) moves each kernel's host and GPU level, not
        its shape: on the GPU a model was fitted on, a machine's calibration of it keeps its
        decisions on every committed call (held-out and table, seven runs). `sage` counts as
        the Hopper kernel it runs: SageAttention 2's `sageattn` on sm90 calls
        `sageattn_qk_int8_pv_fp8_cuda_sm90` with fp32+fp32 accumulation, as that variant does
        (run9 read them 1.187 and 1.188 of SDPA on Wan 2.1 14B 49f, where a rescale split them)."""
        from attention.cost_model import load

        def kernel(name: str) -> str:
            return "sage_qk_int8_pv_fp8_cuda_sm90" if name == "sage" else name
        folder = Path(ROOT) / "benchmarks" / "results" / "h200" / "cost_model"
        for name, prior_file in self.CALIBRATIONS.items():
            calibrated = cost_store.parse_file((folder / name / "calibration.json").read_text())[0]["model"]
            assert calibrated.fit["sdpa"]["rescaled_from"] == "NVIDIA H200"
            prior = load(str(folder / prior_file), registry.names()) if prior_file else None
            for timing in self.measured("table") + self.measured(""):
                signature = timing.call.signature()
                expected = self.chosen(timing, prior)[0]
                got = Dispatcher("auto", cost_model=calibrated).plan_for(signature).name
                assert kernel(got) == kernel(expected), (name, timing.call.key, got, expected)

    def test_never_more_than_2_percent_slower_than_sdpa(self):
        for timing in self.measured("table") + self.measured(""):
            name, us = self.chosen(timing)
            noise = timing.noise_floor or 0.0
            assert timing.times_us["sdpa"] / us >= 0.98 - noise, (timing.call.key, name)


def test_unavailable_auto_candidates_are_not_fallbacks_but_named_ones_are(monkeypatch):
    flash4 = registry.get("flash4")
    monkeypatch.setattr(flash4, "_availability", attention.Availability(False, None, ("not installed",)))
    for name in ("sage_qk_int8_pv_fp8_cuda_sm90", "flash3"):
        monkeypatch.setattr(registry.get(name), "_availability", attention.Availability(False, None, ("nope",)))
    hopper = by_key("wan_480p").signature()
    plan = table_auto().plan_for(hopper)
    assert plan.name == "sdpa" and not plan.is_fallback
    assert [r.kind for r in plan.rejected] == [UNAVAILABLE] * 3
    named = table_auto(["flash4", "auto"]).plan_for(hopper)
    assert named.is_fallback
    assert named.fallback_reasons() == [("flash4", "not installed")]


def test_unknown_names_fail_with_suggestions():
    with pytest.raises(attention.UnknownBackendError, match="Did you mean .*flash4"):
        attention.parse_priority("flash5 > sdpa")
    assert attention.parse_priority("flash4 > sage, sdpa").names == ("flash4", "sage", "sdpa")
    with pytest.raises(attention.UnknownBackendError, match="empty"):
        attention.parse_priority(" > ")


def test_sage_1x_refuses_key_lengths_with_many_padded_keys():
    # measured on the H200: sageattention 1.0.6 lets padded keys into the softmax
    assert "padded keys" in " ".join(reasons("sage", sig(seq_k=77)))
    assert "padded keys" in " ".join(reasons("sage", sig(seq_k=1090)))
    assert reasons("sage", sig(seq_k=1024)) == [] and reasons("sage", sig(seq_k=6989)) == []
    assert reasons("sage", sig(seq_k=32760)) == []
