"""The server <-> browser contract: the JSON fixtures of the web tests are what the pack's
Python makes (tests/js_fixtures.py), and every field the browser reads is structured."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import js_fixtures
from attention import registry
from attention.backend import Availability
from attention.call import FLAT, HEADS_FIRST, MASK_ADDITIVE, CallSignature
from attention.contract import (
    CHOSEN, NONFINITE, NOT_MEASURED, NOT_TIMED, OVER_BUDGET, RAISED, SLOWER, UNKNOWN, install_hint, key_fields,
    priority_case, signature_fields, verdict,
)
from attention.status import backend_row
from attention.tuning import DEFAULT_BUDGET, Measurement, decide, signature_key


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return js_fixtures.build_all()


@pytest.mark.parametrize("name", sorted(js_fixtures.BUILDERS))
def test_committed_fixture_is_what_python_makes(generated, name):
    committed = (js_fixtures.FIXTURES / name).read_text(encoding="utf-8")
    assert committed == generated[name], (
        f"tests/js/fixtures/{name} differs from what the pack's Python makes now: run "
        f"`python tests/js_fixtures.py` and review the diff (the web tests read these files)")


def test_the_status_fixtures_have_every_top_level_field_of_the_route(generated):
    import json
    for name in ("status_cpu.json", "status_gpu_synthetic.json"):
        assert set(json.loads(generated[name])) == {"torch", "cuda", "cudnn", "backends", "devices", "nodes",
                                                     "benchmarks", "tuning", "auto_measured", "parallel",
                                                     "kernel_failures"}, name


CALL = CallSignature(device_type="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, batch=2, heads_q=32,
                     heads_kv=8, seq_q=512, seq_k=77, head_dim=128, head_dim_v=64, mask_kind=MASK_ADDITIVE,
                     mask_shape=(1, 1, 512, 77), layout_in=FLAT, layout_out=HEADS_FIRST,
                     attn_precision=torch.float32, low_precision_ok=False, custom_scale=True)


@pytest.mark.parametrize("call", [CALL, dataclasses.replace(CALL, mask_kind="none", mask_shape=None,
                                                             attn_precision=None, low_precision_ok=True,
                                                             custom_scale=False)])
def test_a_tuner_key_reads_back_as_the_signatures_fields(call):
    fields = signature_fields(call)
    assert key_fields(signature_key(call)) == {**fields, "device": None, "capability": None}
    assert fields["device"] == "cuda" and fields["capability"] == "9.0"


def test_signature_fields_spell_out_the_call():
    assert signature_fields(CALL) == {
        "dtype": "bfloat16", "batch": 2, "heads": 32, "kv_heads": 8, "q_tokens": 512, "k_tokens": 77,
        "head_dim": 128, "v_head_dim": 64, "mask": {"kind": "additive", "shape": [1, 1, 512, 77]},
        "layout_in": "B,N,H*D", "layout_out": "B,H,N,D", "precision": "float32", "low_precision_ok": False,
        "custom_scale": True, "device": "cuda", "capability": "9.0"}
    assert key_fields("B=1 H=24 Nq=4608") is None
    assert key_fields("bfloat16|Bx|H1|Hkv1|Nq1|Nk1|D1|Dv1|mask=none|in=a|out=b|prec=-|lowp=1|scale=0") is None


def test_every_verdict_the_tuner_writes_has_a_kind():
    measured = {
        "fast": Measurement(ms=1.0, error={"rel_l1": 0.001, "cosine": 0.99999, "max_abs": 0.1, "nonfinite": 0}),
        "slow": Measurement(ms=2.0, error={"rel_l1": 0.001, "cosine": 0.99999, "max_abs": 0.1, "nonfinite": 0}),
        "inexact": Measurement(ms=0.5, error={"rel_l1": 0.05, "cosine": 0.999, "max_abs": 1.0, "nonfinite": 0}),
        "nan": Measurement(ms=0.5, error={"rel_l1": 0.0, "cosine": 1.0, "max_abs": 0.0, "nonfinite": 3}),
        "untimed": Measurement(error={"rel_l1": 0.001, "cosine": 0.99999, "max_abs": 0.1, "nonfinite": 0}),
        "broken": Measurement(failure="raised RuntimeError: no kernel image"),
        "late": Measurement(failure="not measured: the signature's tuning time was spent"),
    }
    _, table = decide(measured, DEFAULT_BUDGET)
    kinds = {name: verdict(row["verdict"])["kind"] for name, row in table.items()}
    assert kinds == {"fast": CHOSEN, "slow": SLOWER, "inexact": OVER_BUDGET, "nan": NONFINITE,
                     "untimed": NOT_TIMED, "broken": RAISED, "late": NOT_MEASURED}
    assert verdict(table["slow"]["verdict"]) == {"kind": SLOWER, "text": "slower: 2.000x the chosen time"}
    assert verdict("something new")["kind"] == UNKNOWN and verdict(None) == {"kind": UNKNOWN, "text": ""}


@pytest.mark.parametrize("backend", [b for b in registry.all_backends() if b.package is not None],
                         ids=lambda b: b.name)
def test_install_hints_are_a_command_and_a_note(backend):
    hint = install_hint(backend.package)
    command, note = hint["command"], hint["note"]
    assert command or note
    if command:
        assert command.startswith("pip install ") and "(" not in command
        assert backend.package.hint() == (f"{command} ({note})" if note else command)
    else:
        assert note == backend.package.hint()


def test_an_install_hint_only_where_installing_helps():
    sage, cudnn = registry.get("sage"), registry.get("sdpa_cudnn")
    missing = backend_row(sage, Availability(False, None, (f"sageattention is not installed "
                                                           f"({sage.package.hint()})",)))
    assert missing["reasons"] == ["sageattention is not installed"]
    assert missing["install"] == {"command": "pip install sageattention", "note": ""}
    no_gpu = backend_row(registry.get("kitchen_int8"), Availability(False, "0.2.40", ("no CUDA GPU is visible",)))
    assert no_gpu["install"] is None and no_gpu["reasons"] == ["no CUDA GPU is visible"]
    assert backend_row(cudnn, Availability(True, "2.13", ()))["install"] is None


def test_priority_lists_are_read_one_way():
    assert priority_case("flash4>auto_tuned, auto") == {
        "text": "flash4>auto_tuned, auto", "uses_tuner": True,
        "entries": [{"kind": "backend", "name": "flash4"}, {"kind": "auto_tuned", "name": "auto_tuned"},
                    {"kind": "auto", "name": "auto"}]}
    # Spaces, ';' and '|' separate nothing: the browser showed these as valid and the node refused them.
    for text in ("flash4 sdpa", "flash4 | sdpa", "flash4; sdpa"):
        case = priority_case(text)
        assert case["unknown"] == [text] and not case["empty"]
        assert "unknown attention backend" in case["error"] and "Separate names with '>' or ','" in case["error"]
    assert priority_case("flash5 > bogus > sdpa")["unknown"] == ["flash5", "bogus"]
    empty = priority_case(" > , ")
    assert empty["empty"] and empty["unknown"] == [] and "empty" in empty["error"]
