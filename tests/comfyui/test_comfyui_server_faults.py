"""Fault suite through a real ComfyUI server: what a user sees when the files next to the
pack are damaged or huge, when a prompt carries values the node cannot use, when a kernel
raises or returns NaN, when a run is interrupted, after many runs and resolutions, and when
routes are called the wrong way or all at once.

Servers: one with a damaged tuning file (Notepad's UTF-16 "{}") and a truncated
ATTENTION_BACKENDS_AUTO table; one with a 100,000-entry tuning file; a clean one for the
kernel faults (test-only nodes in fixture_nodes/faults.py), growth and routes; one whose
tuning file is a link out of the user directory; one whose tuning folder cannot be made.
"""

from __future__ import annotations

import json
import math
import time
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


# --- kernel faults, interrupts, growth and routes (test-only fixture nodes: faults.py) -----

FAULT_NODE = "2"
SAMPLER = "8"
DIGEST = "9"
PLANS = "10"
STATE = "5"
HOLD_S = 120  # bounded wait for a held run to reach its kernel (never a timing assumption)


def _pack_workflow(node_type: str, inputs: dict, *, seed: int = 0, width: int = 64, height: int = 64,
                   fault: dict | None = None) -> dict:
    """Tiny Flux -> [FaultyKernel] -> node 7 -> KSampler -> LatentDigest, PlanCount."""
    prompt = tiny_flux_workflow(node_type, inputs)
    del prompt["9"]  # SaveLatent: the digest node says what the user got
    prompt["4"]["inputs"].update(width=width, height=height)
    prompt[SAMPLER]["inputs"]["seed"] = seed
    if fault is not None:
        prompt[FAULT_NODE] = {"class_type": "AttentionBackendsTestFaultyKernel",
                              "inputs": {"model": ["1", 0], "backend": "sdpa_math", "on_call": 1, "marker": "",
                                         "token": 0, **fault}}
        prompt["7"]["inputs"]["model"] = [FAULT_NODE, 0]
    prompt[DIGEST] = {"class_type": "AttentionBackendsTestLatentDigest", "inputs": {"samples": [SAMPLER, 0]}}
    prompt[PLANS] = {"class_type": "AttentionBackendsTestPlanCount",
                     "inputs": {"model": ["7", 0], "samples": [SAMPLER, 0]}}
    return prompt


def _plain_workflow(token: int, seed: int = 0) -> dict:
    """The same sampling without the pack; ModelState (new token: the sampler runs again)
    says what ComfyUI's attention functions and the loaded model's options are."""
    prompt = _pack_workflow("AttentionBackend", {}, seed=seed)
    prompt[STATE] = {"class_type": "AttentionBackendsTestModelState", "inputs": {"model": ["1", 0], "token": token}}
    prompt[SAMPLER]["inputs"]["model"] = [STATE, 0]
    del prompt["7"], prompt[PLANS]
    return prompt


def _outputs(entry: dict, node: str, name: str):
    return entry["outputs"][node][name][0]


def _succeeded(entry: dict, log: Path) -> dict:
    assert entry["status"]["status_str"] == "success", log.read_text()[-4000:]
    return entry


@pytest.fixture(scope="module")
def faults(comfyui_path: Path, custom_nodes: Path, tmp_path_factory: pytest.TempPathFactory):
    """A clean server, and a plain run made before any run with the pack (the reference)."""
    base = tmp_path_factory.mktemp("faults_server")
    with comfyui_server(comfyui_path, custom_nodes, base) as (url, log):
        plain = _succeeded(run_prompt(url, _plain_workflow(token=0)), log)
        yield url, log, base, plain


def _report(url: str) -> dict:
    return get_json(url + "/attention_backends/report?node=7")


def _failures(url: str) -> list[dict]:
    return get_json(url + "/attention_backends/status")["kernel_failures"]["failures"]


def test_a_kernel_raising_on_call_2_falls_back_is_listed_cleared_and_retried(faults):
    url, log, _, _ = faults
    basic = {"backend": "sdpa_math", "on_unsupported": "fall back"}
    fault = {"fault": "raise", "on_call": 2, "token": 1}
    entry = _succeeded(run_prompt(url, _pack_workflow("AttentionBackend", basic, seed=100, fault=fault)), log)
    assert _outputs(entry, DIGEST, "finite")
    report = _report(url)
    assert report["served"] == {"sdpa": 3, "sdpa_math": 1}
    [fallback] = report["fallbacks"]
    assert (fallback["wanted"], fallback["served_by"], fallback["calls"]) == ("sdpa_math", "sdpa", 3)
    assert "raised RuntimeError: injected fault on call 2" in fallback["reason"]
    assert "sdpa_math raised RuntimeError: injected fault on call 2" in log.read_text()

    [failure] = _failures(url)
    assert failure["backend"] == "sdpa_math" and failure["count"] == 1 and failure["retried_next_run"]
    assert "injected fault on call 2" in failure["reason"]
    status, body = request(url + "/attention_backends/failures/clear", "POST")
    assert (status, json.loads(body)) == (200, {"cleared": 1})
    assert _failures(url) == []

    # The same graph, another seed: the node's dispatcher plans sdpa_math again, which works now.
    entry = _succeeded(run_prompt(url, _pack_workflow("AttentionBackend", basic, seed=101, fault=fault)), log)
    report = _report(url)
    assert report["served"] == {"sdpa_math": 4} and report["fallbacks"] == [] and report["warnings"] == []
    assert _failures(url) == []


def test_nan_from_a_kernel_is_caught_by_the_guard(faults):
    url, log, _, _ = faults
    advanced = dict(ADVANCED, priority="sdpa_math")
    fault = {"fault": "nan", "on_call": 2}
    unguarded = _succeeded(run_prompt(url, _pack_workflow(
        "AttentionBackendAdvanced", dict(advanced, nonfinite_guard=False), seed=200, fault=dict(fault, token=2))), log)
    assert not _outputs(unguarded, DIGEST, "finite")  # what the user gets without the guard: a black image

    guarded = _succeeded(run_prompt(url, _pack_workflow(
        "AttentionBackendAdvanced", advanced, seed=200, fault=dict(fault, token=3))), log)
    assert _outputs(guarded, DIGEST, "finite")
    report = _report(url)
    assert report["guard"] == {"nonfinite_model_calls": 1, "reruns": 1, "pinned_exact": True}
    assert report["warnings"] == []
    assert "guard: 1 non-finite model calls" in log.read_text()


def _queue(url: str, prompt: dict) -> str:
    status, body = request(url + "/prompt", "POST", {"prompt": prompt})
    assert status == 200, body[-4000:]
    return json.loads(body)["prompt_id"]


def _wait_for(path: Path, log: Path) -> None:
    deadline = time.monotonic() + HOLD_S
    while not path.exists():
        assert time.monotonic() < deadline, f"the run never reached its kernel:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def _history(url: str, prompt_id: str) -> dict:
    deadline = time.monotonic() + HOLD_S
    while (entry := get_json(f"{url}/history/{prompt_id}").get(prompt_id)) is None:
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not end"
        time.sleep(0.1)
    return entry


def _held_run(url: str, base: Path, log: Path, token: int, seed: int) -> str:
    """Queue a run whose first sdpa_math call is held until an interrupt; returns once the
    run is inside that call."""
    marker = base / f"holding-{token}"
    prompt = _pack_workflow("AttentionBackend", {"backend": "sdpa_math", "on_unsupported": "fall back"}, seed=seed,
                            fault={"fault": "wait_for_interrupt", "marker": str(marker), "token": token})
    prompt_id = _queue(url, prompt)
    _wait_for(marker, log)
    return prompt_id


def test_an_interrupted_run_leaves_nothing_patched_and_the_next_run_works(faults):
    url, log, base, plain = faults
    prompt_id = _held_run(url, base, log, token=4, seed=300)
    status, body = request(url + "/interrupt", "POST", {})
    assert status == 200, body
    entry = _history(url, prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [message[0] for message in entry["status"]["messages"]]
    report = _report(url)  # filed however the run ended
    assert report["prompt_id"] == prompt_id and report["served"].get("sdpa_math", 0) >= 1

    again = _succeeded(run_prompt(url, _plain_workflow(token=1)), log)
    assert _outputs(again, STATE, "state") == _outputs(plain, STATE, "state")
    assert _outputs(again, DIGEST, "digest") == _outputs(plain, DIGEST, "digest")

    _succeeded(run_prompt(url, _pack_workflow("AttentionBackend", {"backend": "sdpa_math",
                                                                  "on_unsupported": "fall back"}, seed=301)), log)
    assert _report(url)["served"] == {"sdpa_math": 4}


RESOLUTIONS = [(width, height) for width in (32, 48, 64, 80, 96, 112) for height in (32, 48, 64, 80, 96)]


def test_thirty_resolutions_and_twenty_repeats_stay_correct_and_bounded(faults):
    url, log, _, _ = faults
    assert len(RESOLUTIONS) == 30
    basic = {"backend": "sdpa", "on_unsupported": "fall back"}
    seen: set[int] = set()
    runs = [(w, h, 400) for w, h in RESOLUTIONS] + [(64, 64, 500 + n) for n in range(20)]
    for width, height, seed in runs:
        entry = _succeeded(run_prompt(url, _pack_workflow("AttentionBackend", basic, seed=seed, width=width,
                                                          height=height)), log)
        tokens = (width // 16) * (height // 16) + 8  # image patches + Flux's 8 text tokens
        seen.add(tokens)
        report = _report(url)
        assert report["prompt_id"] == entry["prompt"][1]
        assert report["served"] == {"sdpa": 4} and report["warnings"] == [], (width, height, report)
        assert [plan["shape"]["q_tokens"] for plan in report["plans"]] == [tokens]
        plans, limit = json.loads(_outputs(entry, PLANS, "plans")), _outputs(entry, PLANS, "limit")
        assert plans == {"main": min(len(seen), limit)}, (width, height)


@pytest.mark.parametrize("method, route", [
    ("POST", "/attention_backends/status"), ("PUT", "/attention_backends/status"),
    ("POST", "/attention_backends/report"), ("DELETE", "/attention_backends/report"),
    ("GET", "/attention_backends/failures/clear"), ("PUT", "/attention_backends/failures/clear"),
    ("POST", "/attention_backends/benchmarks/h200/chart.png"),
])
@pytest.mark.parametrize("prefix", ["", "/api"])
def test_a_wrong_method_is_refused_with_405(faults, method, route, prefix):
    url, _, _, _ = faults
    status, body = request(url + prefix + route, method)
    assert status == 405, (status, body[:300])


# Longer than 4000: aiohttp refuses the request line itself (400), before any route.
@pytest.mark.parametrize("node", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "7/../7", "x" * 300, "x" * 4000])
def test_a_report_for_a_strange_node_name_is_not_found(faults, node):
    url, _, _, _ = faults
    status, body = request(f"{url}/attention_backends/report?node={node}")
    assert status == 404, (status, body[:300])
    assert json.loads(body)["error"].startswith("no report for node")
    assert len(body) < 1024  # the name is not echoed in full


def test_routes_answer_concurrent_requests_while_a_run_is_held(faults):
    url, log, base, _ = faults
    from concurrent.futures import ThreadPoolExecutor

    prompt_id = _held_run(url, base, log, token=5, seed=600)
    try:
        routes = ["/attention_backends/status", "/attention_backends/report"] * 20
        with ThreadPoolExecutor(max_workers=len(routes)) as pool:
            answers = list(pool.map(lambda route: request(url + route), routes))
        assert [status for status, _ in answers] == [200] * len(routes), [body[:300] for _, body in answers]
        statuses = [json.loads(body) for (_, body), route in zip(answers, routes) if route.endswith("status")]
        assert all(status["backends"] == statuses[0]["backends"] for status in statuses)
    finally:
        request(url + "/interrupt", "POST", {})
    assert _history(url, prompt_id)["status"]["status_str"] == "error"


def test_get_on_the_clear_route_says_to_post(faults):
    url, _, _, _ = faults
    status, body = request(url + "/attention_backends/failures/clear")
    assert status == 405 and "on POST" in json.loads(body)["error"]


# --- a tuning file that is a link out of the user directory, a folder that cannot be written ---

@pytest.fixture(scope="module")
def linked(pack, comfyui_path: Path, custom_nodes: Path, tmp_path_factory: pytest.TempPathFactory):
    store = pack.attention.tuning_store
    base = tmp_path_factory.mktemp("linked_tuning_server")
    outside = tmp_path_factory.mktemp("elsewhere") / "shared-tuning.json"
    outside.write_text(json.dumps({"format": store.FORMAT, "version": store.VERSION, "machines": []}))
    tuning = base / "user" / "attention_backends" / "tuning.json"
    tuning.parent.mkdir(parents=True)
    tuning.symlink_to(outside)
    with comfyui_server(comfyui_path, custom_nodes, base) as (url, log):
        yield url, log, tuning, outside


def test_a_tuning_file_linked_outside_is_not_written_through(linked):
    url, log, tuning, outside = linked
    before = outside.read_bytes()
    _succeeded(run_prompt(url, _basic("auto_tuned")), log)
    assert outside.read_bytes() == before  # nothing written outside the user directory
    assert not tuning.is_symlink()
    saved = json.loads(tuning.read_text())["machines"][0]["decisions"]  # nothing lost: this run's decisions
    assert len(saved) >= 1
    [warning] = [line for line in log.read_text().splitlines() if "symbolic link" in line]
    assert str(tuning) in warning and str(outside) in warning


@pytest.fixture(scope="module")
def unwritable(comfyui_path: Path, custom_nodes: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("unwritable_server")
    # A file where the pack's folder should be: no folder can be made, as root too (chmod is
    # no obstacle to root, which CI containers often are).
    (base / "user").mkdir()
    (base / "user" / "attention_backends").write_text("not a folder")
    with comfyui_server(comfyui_path, custom_nodes, base) as (url, log):
        yield url, log, base


def test_an_unwritable_tuning_folder_warns_and_the_run_completes(unwritable):
    url, log, base = unwritable
    entry = _succeeded(run_prompt(url, _pack_workflow("AttentionBackend", {"backend": "auto_tuned",
                                                                          "on_unsupported": "fall back"})), log)
    assert _outputs(entry, DIGEST, "finite")
    report = _report(url)
    assert report["total_calls"] == 4 and report["tuning"]["measured"] >= 1
    [warning] = [line for line in log.read_text().splitlines() if "cannot save tuning decisions" in line]
    assert str(base / "user" / "attention_backends" / "tuning.json") in warning
    [device] = get_json(url + "/attention_backends/status")["tuning"]["devices"]
    assert device["count"] >= 1  # this session still uses what it measured
    assert (base / "user" / "attention_backends").read_text() == "not a folder"
