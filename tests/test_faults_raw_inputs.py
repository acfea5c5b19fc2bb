"""Fault suite, CPU: boolean inputs posted as something else ("false", 0, null) are
marked before ComfyUI's validation turns them into True (nodes/raw_inputs.py); the
ComfyUI suite posts them to a real server."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from library_support import ROOT

# Loaded by path (no ComfyUI, no package): see test_benchmarks_listing.py.
_spec = importlib.util.spec_from_file_location("attention_backends_raw_inputs",
                                               os.path.join(ROOT, "nodes", "raw_inputs.py"))
raw_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(raw_inputs)


def _prompt(guard, class_type: str = "AttentionBackendAdvanced") -> dict:
    return {"prompt": {"7": {"class_type": class_type,
                             "inputs": {"model": ["1", 0], "priority": "sdpa", "nonfinite_guard": guard}}},
            "client_id": "x"}


@pytest.mark.parametrize("posted", ["false", "true", "False", 0, 1, None, 0.0, "", {"on": True},
                                    {"__value__": "false"}])
def test_a_posted_non_boolean_is_marked_and_cannot_become_a_bool(posted):
    request = raw_inputs.mark_non_boolean_inputs(_prompt(posted))
    marked = request["prompt"]["7"]["inputs"]["nonfinite_guard"]
    assert isinstance(marked, raw_inputs.NotABoolean)
    shown = posted["__value__"] if isinstance(posted, dict) and "__value__" in posted else posted
    expected = ("Attention Backend (Advanced): nonfinite_guard must be true or false (a JSON boolean), "
                f"not {shown!r}")
    # What ComfyUI's validation does with a BOOLEAN input: bool(value), which now refuses.
    with pytest.raises(ValueError) as refused:
        bool(marked)
    assert str(refused.value) == expected
    # ComfyUI shows the value in its error ("{input}, {value}, {exception}") and sends it as JSON.
    assert f"{marked}" == repr(shown)
    assert json.loads(json.dumps({"received_value": marked})) == {"received_value": repr(shown)}


@pytest.mark.parametrize("posted", [True, False, ["3", 0], {"__value__": True}])
def test_booleans_and_links_are_left_alone(posted):
    request = raw_inputs.mark_non_boolean_inputs(_prompt(posted))
    assert request["prompt"]["7"]["inputs"]["nonfinite_guard"] is posted


def test_other_nodes_and_odd_requests_are_left_alone():
    other = _prompt("false", class_type="SomeoneElsesNode")
    assert raw_inputs.mark_non_boolean_inputs(other)["prompt"]["7"]["inputs"]["nonfinite_guard"] == "false"
    for odd in ({}, {"prompt": None}, {"prompt": {"1": None}}, {"prompt": {"1": {"inputs": 3}}}, [], None,
                {"prompt": {"1": {"class_type": "AttentionBackendAdvanced", "inputs": {}}}}):
        assert raw_inputs.mark_non_boolean_inputs(odd) == odd
