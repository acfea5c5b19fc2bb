"""`auto_tuned` through the node on real ComfyUI models sampled on the CPU: measured in
the first run, saved in ComfyUI's user directory, reused by a later node, re-tuned on
request, and shown in the run report and the status route."""

from __future__ import annotations

import json

import pytest
import torch


def test_first_run_measures_later_node_reuses(pack, tiny, flux, patch, user_directory):
    plain = tiny.sample(flux)
    patched, state = patch(flux, ["auto_tuned", "auto"])
    out = tiny.sample(patched)
    report = state.last_report
    tuning = report["tuning"]
    assert tuning["measured"] >= 1 and tuning["reused"] == 0 and tuning["left_to_auto"] == []
    assert tuning["file"] == str(user_directory / "attention_backends" / "tuning.json")
    for decision in tuning["decisions"]:
        chosen = decision["candidates"][decision["backend"]]
        assert chosen["verdict"] == {"kind": "chosen", "text": "chosen"}
        assert chosen["rel_l1"] <= decision["budget"]["rel_l1"]
        assert decision["shape"]["dtype"] == "float32" and decision["shape"]["heads"] == 2
        assert "sdpa_math" not in decision["candidates"] and "flex" not in decision["candidates"]
    assert all(plan["tuned"] == "measured" for plan in report["plans"])
    assert sum(report["served"].values()) == report["total_calls"] > 0
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
    saved = json.loads((user_directory / "attention_backends" / "tuning.json").read_text())
    assert len(saved["machines"][0]["decisions"]) == tuning["measured"]

    # A second node (a new workflow) on the same machine measures nothing.
    again, again_state = patch(flux, "auto_tuned")
    tiny.sample(again)
    reused = again_state.last_report["tuning"]
    assert reused["measured"] == 0 and reused["reused"] == tuning["measured"] and reused["tuning_s"] == 0
    assert "auto_tuned: 0 signatures measured" in pack.nodes.report.summary(again_state.last_report)


def test_retune_measures_again_once_per_run(pack, tiny, flux, patch, user_directory):
    first, first_state = patch(flux, "auto_tuned")
    tiny.sample(first)
    retuned, state = patch(flux, "auto_tuned", tuning="re-tune")
    tiny.sample(retuned)
    assert state.last_report["tuning"]["measured"] == first_state.last_report["tuning"]["measured"]
    tiny.sample(retuned)  # the plans hold the new decisions: nothing measured twice
    again = state.last_report["tuning"]
    assert again["measured"] == 0 and again["reused"] == 0
    # ...and the report still lists them, as kept from the node's earlier run
    assert again["kept"] == len(again["decisions"]) > 0
    assert not any(d["this_run"] for d in again["decisions"])


def test_status_shows_the_saved_decisions(pack, tiny, flux, patch, user_directory):
    patched, _ = patch(flux, "auto_tuned")
    tiny.sample(patched)
    status = pack.nodes.routes.status()
    assert "auto_tuned" in status["nodes"]["selectable"]
    assert status["tuning"]["file"].startswith(str(user_directory))
    assert status["tuning"]["exists"]
    saved = status["tuning"]["devices"][0]["decisions"]
    assert saved and all(d["candidates"][d["backend"]]["verdict"]["kind"] == "chosen" for d in saved)
    assert all(d["shape"]["device"] is None and d["shape"]["head_dim"] == 128 for d in saved)


def test_nodes_offer_auto_tuned_and_the_tuning_choice(pack):
    import nodes
    for name in ("AttentionBackend", "AttentionBackendAdvanced"):
        inputs = {i.id: i for i in nodes.NODE_CLASS_MAPPINGS[name].define_schema().inputs}
        # optional: prompts saved before the input existed still validate
        assert inputs["tuning"].options == ["reuse saved", "re-tune"] and inputs["tuning"].optional
    basic = {i.id: i for i in nodes.NODE_CLASS_MAPPINGS["AttentionBackend"].define_schema().inputs}
    assert "auto_tuned" in basic["backend"].options


# --- the file: damaged, written once per run, bounded in the status route ---------------

DAMAGED_FILES = {
    "utf-16": "{}".encode("utf-16"),
    "random bytes": bytes(range(256)) * 8,
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("case", sorted(DAMAGED_FILES))
def test_a_damaged_file_leaves_status_and_runs_working_and_is_moved_aside(pack, tiny, flux, patch, user_directory,
                                                                          case):
    path = user_directory / "attention_backends" / "tuning.json"
    path.parent.mkdir()
    path.write_bytes(DAMAGED_FILES[case])
    [device] = pack.nodes.routes.status()["tuning"]["devices"]
    assert device["ignored_file_problem"] and device["count"] == 0 and device["decisions"] == []
    patched, state = patch(flux, "auto_tuned")
    out = tiny.sample(patched)
    assert torch.isfinite(out).all() and state.last_report["tuning"]["measured"] >= 1
    assert path.with_name("tuning.json.ignored").read_bytes() == DAMAGED_FILES[case]
    saved = json.loads(path.read_text())["machines"][0]["decisions"]
    assert len(saved) == state.last_report["tuning"]["measured"]


def test_decisions_are_written_once_after_the_sampler_run(pack, tiny, flux, sd15, patch, user_directory,
                                                          monkeypatch):
    import os

    path = str(user_directory / "attention_backends" / "tuning.json")
    patched, state = patch(sd15, "auto_tuned")
    writes = []
    real_replace = os.replace

    def record(src, dst):  # which file, and how many attention calls had been served by then
        writes.append((dst, sum(sum(d.counters().served.values()) for _, d in state.dispatchers())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", record)
    tiny.sample(patched)
    measured = state.last_report["tuning"]["measured"]
    assert measured >= 2  # self- and cross-attention shapes of the UNet
    # One write for the whole run, after its last attention call.
    assert writes == [(path, state.last_report["total_calls"])]
    tiny.sample(patched)  # nothing new: nothing written
    assert len(writes) == 1


def test_status_lists_a_bounded_number_of_decisions(pack, user_directory):
    store_module = pack.attention.tuning_store
    machine = store_module.fingerprint(torch.device("cpu"))
    decision = {"backend": "sdpa", "reference": "sdpa", "tuning_ms": 1.0, "budget": {},
                "candidates": {"sdpa": {"ms": 1.0, "rel_l1": 0.0, "cosine": 1.0, "max_abs": 0.0, "nonfinite": 0,
                                        "verdict": "chosen"}}}
    decisions = {f"float32|B1|H2|Hkv2|Nq{n}|Nk{n}|D64": dict(decision, tuned_at=f"2026-01-01T00:00:{n % 60:02d}+00:00")
                 for n in range(3000)}
    path = user_directory / "attention_backends" / "tuning.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": store_module.FORMAT, "version": store_module.VERSION,
                                "machines": [{"fingerprint": machine, "decisions": decisions}]}))
    tuning = pack.nodes.routes.status()["tuning"]
    [device] = tuning["devices"]
    assert device["count"] == store_module.MAX_DECISIONS
    assert len(device["decisions"]) == tuning["listed_at_most"] == pack.nodes.tuning.STATUS_DECISIONS
    assert all(d["tuned_at"].endswith(":59+00:00") for d in device["decisions"])  # the newest
    assert len(json.dumps(tuning)) < 64 * 1024


def test_auto_times_a_contested_call_once_and_saves_it_beside_tuning(pack, tiny, flux, patch, user_directory,
                                                                        contest_every_call, monkeypatch):
    plain = tiny.sample(flux)
    patched, state = patch(flux, "auto")
    measured_file = user_directory / "attention_backends" / "auto_measured.json"
    assert state.tuner is None and state.measurer is not None and state.measurer.path == str(measured_file)
    contest_every_call(state)
    out = tiny.sample(patched)
    report = state.last_report
    assert report["tuning"] is None
    measured = report["auto_measured"]
    assert measured["strategy"] == "auto" and measured["measured"] >= 1 and measured["file"] == str(measured_file)
    for decision in measured["decisions"]:
        assert set(decision["candidates"]) == {"sdpa", "sdpa_flash"}
    assert all(plan["tuned"] == "measured" and plan["tuned_by"] == "auto" for plan in report["plans"])
    assert "auto measured" in pack.nodes.report.summary(report)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
    # Written after the run, in its own file: auto_tuned's file is untouched.
    saved = json.loads(measured_file.read_text())
    assert len(saved["machines"][0]["decisions"]) == measured["measured"]
    assert not (user_directory / "attention_backends" / "tuning.json").exists()
    # The status route lists them apart from auto_tuned's.
    status = pack.nodes.routes.status()
    [device] = status["auto_measured"]["devices"]
    assert status["auto_measured"]["file"] == str(measured_file) and status["auto_measured"]["exists"]
    assert device["count"] == measured["measured"] and device["decisions"][0]["shape"]["head_dim"] == 128
    assert status["tuning"]["devices"][0]["count"] == 0 and not status["tuning"]["exists"]

    # Another node on this machine reuses the measurements; auto_tuned never sees them.
    again, again_state = patch(flux, "auto")
    contest_every_call(again_state)
    tiny.sample(again)
    assert again_state.last_report["auto_measured"]["measured"] == 0
    assert again_state.last_report["auto_measured"]["reused"] == measured["measured"]

    # A run with nothing contested has no auto_measured section; the variable turns timing off.
    plain_auto, plain_state = patch(flux, "auto")
    tiny.sample(plain_auto)
    assert plain_state.last_report["auto_measured"] is None
    monkeypatch.setenv("ATTENTION_BACKENDS_AUTO_MEASURE", "0")
    assert patch(flux, "auto")[1].measurer is None
