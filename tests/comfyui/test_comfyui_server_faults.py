"""Fault suite through a real ComfyUI server: what a user sees when the files next to the
pack are damaged or huge, and when a prompt carries values the node cannot use.

Two servers: one started with a damaged tuning file (Notepad's UTF-16 "{}") and a
truncated ATTENTION_BACKENDS_AUTO table, one with a 100,000-entry tuning file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from server_support import comfyui_server, get_json, request, run_prompt, tiny_flux_workflow

UTF16_EMPTY_OBJECT = "{}".encode("utf-16")
TRUNCATED_TABLE = '{"sm90": [{"backend": "flash4", "min_tok'

ADVANCED = {"priority": "sdpa", "on_unsupported": "fall back", "step_start": 0.0, "step_end": 1.0,
            "exact_first_blocks": 0, "exact_last_blocks": 0, "cross_attention_exact_max_keys": 0,
            "nonfinite_guard": True}
WINDOW = "Attention Backend (Advanced): the step window needs 0 <= start < end <= 1"


def _basic(backend: str) -> dict:
    return tiny_flux_workflow("AttentionBackend", {"backend": backend, "on_unsupported": "fall back"})


@pytest.fixture(scope="module")
def damaged(comfyui_path: Path, custom_nodes: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("damaged_server")
    tuning = base / "user" / "attention_backends" / "tuning.json"
    tuning.parent.mkdir(parents=True)
    tuning.write_bytes(UTF16_EMPTY_OBJECT)
    table = base / "auto_table.json"
    table.write_text(TRUNCATED_TABLE)
    with comfyui_server(comfyui_path, custom_nodes, base, env={"ATTENTION_BACKENDS_AUTO": str(table)}) as (url, log):
        yield url, log, tuning, table


def test_status_answers_despite_a_damaged_tuning_file_and_auto_table(damaged):
    url, _, _, _ = damaged
    for _ in range(3):
        status = get_json(url + "/attention_backends/status")
    [device] = status["tuning"]["devices"]
    assert device["ignored_file_problem"].startswith("not UTF-8 text")
    assert device["count"] == 0 and device["decisions"] == []
    assert [entry["backend"] for entry in status["devices"][0]["auto_order"]] == ["sdpa"]  # the built-in table


def test_a_run_with_sdpa_completes(damaged):
    url, log, _, _ = damaged
    entry = run_prompt(url, _basic("sdpa"))
    assert entry["status"]["status_str"] == "success", log.read_text()[-4000:]
    assert get_json(url + "/attention_backends/report?node=7")["served"] == {"sdpa": 4}


def test_a_run_with_auto_tuned_completes_and_replaces_the_damaged_file(damaged):
    url, log, tuning, _ = damaged
    entry = run_prompt(url, _basic("auto_tuned"))
    assert entry["status"]["status_str"] == "success", log.read_text()[-4000:]
    assert tuning.with_name("tuning.json.ignored").read_bytes() == UTF16_EMPTY_OBJECT
    saved = json.loads(tuning.read_text())["machines"][0]["decisions"]
    [device] = get_json(url + "/attention_backends/status")["tuning"]["devices"]
    assert device["ignored_file_problem"] is None and device["count"] == len(saved) >= 1


def test_the_bad_auto_table_is_named_in_one_warning(damaged):
    url, log, _, table = damaged
    assert run_prompt(url, _basic("auto"))["status"]["status_str"] == "success"
    warnings = [line for line in log.read_text().splitlines() if "ATTENTION_BACKENDS_AUTO=" in line]
    assert len(warnings) == 1, warnings
    assert str(table) in warnings[0] and "built-in table" in warnings[0]


def _refusal(url: str, inputs: dict) -> list[dict]:
    status, body = request(url + "/prompt", "POST", {"prompt": tiny_flux_workflow("AttentionBackendAdvanced", inputs)})
    assert status == 400, body[-2000:]
    return json.loads(body)["node_errors"]["7"]["errors"]


@pytest.mark.parametrize("start, end", [(0.5, 0.2), (0.5, 0.5), (0.0, 0.0), (math.nan, 1.0), (0.0, math.nan),
                                        (-0.5, 1.0), (0.0, 1.5)])
def test_an_invalid_step_window_is_refused_when_queued(damaged, start, end):
    url, _, _, _ = damaged
    errors = _refusal(url, dict(ADVANCED, step_start=start, step_end=end))
    # One message, filed by ComfyUI under each input validate_inputs takes.
    assert {e["extra_info"]["input_name"] for e in errors} == {"priority", "step_start", "step_end"}
    for error in errors:
        assert error["type"] == "custom_validation_failed" and WINDOW in error["details"], error


@pytest.mark.parametrize("guard", ["false", "true", 0, 1, None, "off"])
def test_a_guard_that_is_no_boolean_is_refused_when_queued(damaged, guard):
    url, _, _, _ = damaged
    [error] = _refusal(url, dict(ADVANCED, nonfinite_guard=guard))
    assert error["extra_info"]["input_name"] == "nonfinite_guard"
    assert (f"Attention Backend (Advanced): nonfinite_guard must be true or false (a JSON boolean), not {guard!r}"
            in error["details"]), error


def test_valid_advanced_settings_run(damaged):
    url, log, _, _ = damaged
    entry = run_prompt(url, tiny_flux_workflow("AttentionBackendAdvanced",
                                               dict(ADVANCED, step_start=0.5, nonfinite_guard=False)))
    assert entry["status"]["status_str"] == "success", log.read_text()[-4000:]
    assert get_json(url + "/attention_backends/report?node=7")["routing"]["exact_by_step_window"] == 2


@pytest.mark.parametrize("length", [65, 255, 256, 1000])
def test_a_long_chart_name_is_not_found(damaged, length):
    url, _, _, _ = damaged
    status, body = request(f"{url}/attention_backends/benchmarks/{'a' * length}/chart.png")
    assert status == 404, body[:300]
    assert len(json.loads(body)["error"]) < 400  # the name is quoted cut short


# --- a 100,000-entry tuning file ---------------------------------------------------------

ENTRIES = 100_000


@pytest.fixture(scope="module")
def huge(pack, comfyui_path: Path, custom_nodes: Path, tmp_path_factory: pytest.TempPathFactory):
    store = pack.attention.tuning_store
    base = tmp_path_factory.mktemp("huge_file_server")
    tuning = base / "user" / "attention_backends" / "tuning.json"
    tuning.parent.mkdir(parents=True)
    candidate = {"ms": 1.0, "rel_l1": 0.0, "cosine": 1.0, "max_abs": 0.0, "nonfinite": 0, "verdict": "chosen"}
    decisions = {f"float32|B1|H2|Hkv2|Nq{n}|Nk{n}|D64": {
        "backend": "sdpa", "reference": "sdpa", "tuning_ms": 1.0, "budget": {}, "candidates": {"sdpa": candidate},
        "tuned_at": f"2026-01-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}+00:00"}
        for n in range(ENTRIES)}
    # The server's fingerprint: same Python environment, same CPU.
    machine = store.fingerprint(torch.device("cpu"))
    tuning.write_text(json.dumps({"format": store.FORMAT, "version": store.VERSION,
                                  "machines": [{"fingerprint": machine, "decisions": decisions}]}))
    with comfyui_server(comfyui_path, custom_nodes, base) as (url, log):
        yield url, log, tuning, store


def test_status_of_a_100000_entry_file_is_small(huge):
    url, _, tuning, store = huge
    assert tuning.stat().st_size > 20 << 20
    status, body = request(url + "/attention_backends/status")
    assert status == 200
    assert len(body) < 256 << 10, len(body)
    tuning_status = json.loads(body)["tuning"]
    [device] = tuning_status["devices"]
    assert device["count"] == store.MAX_DECISIONS
    assert len(device["decisions"]) == tuning_status["listed_at_most"]


def test_the_next_run_leaves_the_file_within_its_bound(huge):
    url, log, tuning, store = huge
    entry = run_prompt(url, _basic("auto_tuned"))
    assert entry["status"]["status_str"] == "success", log.read_text()[-4000:]
    [machine] = json.loads(tuning.read_text())["machines"]
    assert len(machine["decisions"]) == store.MAX_DECISIONS
    assert tuning.stat().st_size < 2 << 20
