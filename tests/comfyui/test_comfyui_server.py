"""Through ComfyUI's server: the pack mounted in custom_nodes (under a hyphenated name),
a workflow posted to /prompt, /object_info, the routes and the websocket event.

One server per module; every wait is bounded and the server is killed in a finally.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse
from pathlib import Path

import pytest
from server_support import comfyui_server

RUN_S = 120
CLIENT_ID = "attention-backends-test"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(comfyui_path: Path, custom_nodes: Path, tmp_path_factory: pytest.TempPathFactory):
    with comfyui_server(comfyui_path, custom_nodes, tmp_path_factory.mktemp("comfy_server")) as running:
        yield running


def _workflow(priority: str = "sdpa_math > sdpa") -> dict:
    sampler = {"seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
               "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0], "denoise": 1.0}
    return {
        "1": {"class_type": "AttentionBackendsTestTinyFlux", "inputs": {"seed": 0}},
        "2": {"class_type": "AttentionBackend",
              "inputs": {"model": ["1", 0], "backend": "sdpa", "on_unsupported": "fall back"}},
        "3": {"class_type": "AttentionBackendsTestFluxConditioning", "inputs": {"seed": 0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "attention_backends"}},
        "7": {"class_type": "AttentionBackendAdvanced",
              "inputs": {"model": ["1", 0], "priority": priority, "on_unsupported": "fall back",
                         "step_start": 0.5, "step_end": 1.0, "exact_first_blocks": 0, "exact_last_blocks": 0,
                         "cross_attention_exact_max_keys": 0, "nonfinite_guard": True}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["7", 0], **{**sampler, "seed": 1}}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "attention_backends"}},
    }


async def _get(session, url: str, status: int = 200) -> dict:
    async with session.get(url) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def _poll_history(session, url: str, prompt_id: str, deadline: float) -> dict:
    # ComfyUI files the history entry just after its last websocket message.
    while time.monotonic() < deadline:
        entry = (await _get(session, f"{url}/history/{prompt_id}")).get(prompt_id)
        if entry is not None:
            return entry
        await asyncio.sleep(0.2)
    pytest.fail(f"prompt {prompt_id} did not finish within {RUN_S}s")


async def _run_prompt(session, url: str, prompt: dict) -> tuple[dict, list[dict]]:
    """Post a prompt with a websocket open; (history entry, report events)."""
    import aiohttp

    async with session.ws_connect(f"{url}/ws?clientId={CLIENT_ID}") as socket_:
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": CLIENT_ID}) as posted:
            assert posted.status == 200, await posted.text()
            prompt_id = (await posted.json())["prompt_id"]
        events = []
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            message = await socket_.receive(timeout=deadline - time.monotonic())
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(message.data)
            data = event.get("data") or {}
            if event["type"] == "attention_backends.report":
                events.append(data)
            finished = event["type"] in ("execution_success", "execution_error") or (
                event["type"] == "executing" and data.get("node") is None)
            if finished and data.get("prompt_id") == prompt_id:
                break
    return await _poll_history(session, url, prompt_id, deadline), events


async def _run_workflow(url: str) -> tuple[dict, list[dict], dict]:
    """Post the workflow with a websocket open; (history entry, report events, rejected-prompt answer)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=RUN_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        history, events = await _run_prompt(session, url, _workflow())
        invalid = {node: spec for node, spec in _workflow("flash5 > sdpa").items() if node not in ("2", "5", "6")}
        async with session.post(f"{url}/prompt", json={"prompt": invalid}) as refused:
            assert refused.status == 400
            refusal = (await refused.json())["node_errors"]["7"]
    return history, events, refusal


def _twins(attention_nodes: dict[str, int]) -> dict:
    """Attention Backend nodes with identical inputs, each feeding its own KSampler
    ("<id>0", with the given seed); ComfyUI hands all of them the first one's cached output."""
    prompt = {
        "1": {"class_type": "AttentionBackendsTestTinyFlux", "inputs": {"seed": 0}},
        "2": {"class_type": "AttentionBackendsTestFluxConditioning", "inputs": {"seed": 0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    for node, seed in attention_nodes.items():
        prompt[node] = {"class_type": "AttentionBackend",
                        "inputs": {"model": ["1", 0], "backend": "sdpa", "on_unsupported": "fall back"}}
        prompt[node + "0"] = {"class_type": "KSampler", "inputs": {
            "model": [node, 0], "seed": seed, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["4", 0], "denoise": 1.0}}
        prompt[node + "1"] = {"class_type": "SaveLatent",
                              "inputs": {"samples": [node + "0", 0], "filename_prefix": "attention_backends"}}
    return prompt


async def _run_prompts(url: str, prompts: list[dict]) -> list[tuple[dict, list[dict]]]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=RUN_S * len(prompts))) as session:
        return [await _run_prompt(session, url, prompt) for prompt in prompts]


def test_object_info_lists_both_nodes_with_every_backend(server):
    url, _ = server
    info = asyncio.run(_fetch(url + "/object_info"))
    names = asyncio.run(_fetch(url + "/attention_backends/status"))["nodes"]["selectable"]
    basic, advanced = info["AttentionBackend"], info["AttentionBackendAdvanced"]
    assert basic["display_name"] == "Attention Backend"
    assert advanced["display_name"] == "Attention Backend (Advanced)"
    assert _combo_options(basic["input"]["required"]["backend"]) == names
    assert names[0] == "auto" and "sdpa" in names and "flash4" in names
    assert basic["category"] == advanced["category"] == "model_patches/attention"
    assert basic["output"] == advanced["output"] == ["MODEL"]


def test_workflow_runs_and_both_routes_report(server):
    url, log_path = server
    history, events, refusal = asyncio.run(_run_workflow(url))
    assert history["status"]["status_str"] == "success", log_path.read_text()[-4000:]

    reports = asyncio.run(_fetch(url + "/attention_backends/report"))["reports"]
    basic, advanced = reports["2"], reports["7"]
    assert basic["node_type"] == "AttentionBackend" and basic["selection"] == "sdpa"
    assert basic["total_calls"] > 0 and basic["served"] == {"sdpa": basic["total_calls"]}
    assert basic["shares"] == {"sdpa": 1.0} and basic["warnings"] == [] and basic["model"] == "Flux"
    assert advanced["served"] == {"sdpa": 2, "sdpa_math": 2}  # step 0 of 2 is outside the window
    assert advanced["routing"]["exact_by_step_window"] == 2
    assert asyncio.run(_fetch(url + "/api/attention_backends/report?node=2")) == basic
    asyncio.run(_fetch(url + "/attention_backends/report?node=does-not-exist", status=404))
    # The websocket pushed one report per sampler run.
    assert sorted(event["node_id"] for event in events) == ["2", "7"]
    # Validation names the unknown backend and a close match.
    assert "flash5" in json.dumps(refusal) and "flash4" in json.dumps(refusal), refusal


def test_reports_follow_the_node_the_sampler_ran_through(server):
    url, log_path = server
    # Nodes 3 and 33 are identical, so ComfyUI runs 3 and reuses its output for 33; then the
    # same graph renumbered (40) with a new seed runs only the sampler, on that output again.
    # (Seeds no other test uses: a sampler with the inputs of an earlier one would be cached too.)
    (first, first_events), (second, second_events) = asyncio.run(
        _run_prompts(url, [_twins({"3": 10, "33": 11}), _twins({"40": 12})]))
    assert first["status"]["status_str"] == second["status"]["status_str"] == "success", log_path.read_text()[-4000:]
    assert sorted((e["node_id"], e["sampler_node_id"]) for e in first_events) == [("3", "30"), ("33", "330")]
    assert [(e["node_id"], e["sampler_node_id"]) for e in second_events] == [("40", "400")]
    assert {e["prompt_id"] for e in first_events} == {first["prompt"][1]}
    for node, sampler in (("3", "30"), ("33", "330"), ("40", "400")):
        report = asyncio.run(_fetch(f"{url}/attention_backends/report?node={node}"))
        assert report["node_id"] == node and report["sampler_node_id"] == sampler
        assert report["served"] == {"sdpa": report["total_calls"]} and report["total_calls"] > 0


def test_status_route(server):
    url, _ = server
    status = asyncio.run(_fetch(url + "/api/attention_backends/status"))
    assert {"torch", "cuda", "cudnn", "backends", "devices", "nodes"} <= set(status)
    rows = {row["name"]: row for row in status["backends"]}
    assert rows["sdpa"]["available"] is True
    assert rows["sage"]["available"] is False and rows["sage"]["reasons"]
    assert [device["type"] for device in status["devices"]] == ["cpu"]
    assert status["devices"][0]["auto_order"][-1]["backend"] == "sdpa"
    assert status["nodes"]["selectable"] == ["auto", "auto_tuned"] + [name for name in rows
                                                                      if name not in ("sol", "sparge")]
    assert status["nodes"]["sparse"] == ["sol", "sparge"]
    assert status["parallel"]["gpus"] == [] and status["parallel"]["head_parallel"]["problems"]
    assert status["tuning"]["file"].endswith("attention_backends/tuning.json")
    assert [(d["type"], d["fingerprint"]["gpu"]) for d in status["tuning"]["devices"]] == [("cpu", "cpu")]
    assert {"name": "h200", "title": "NVIDIA H200 · torch 2.11.0 · CUDA 13.0",
            "chart": "/attention_backends/benchmarks/h200/chart.png"} in status["benchmarks"]


def test_benchmark_chart_route_serves_the_committed_png(server, pack_root):
    url, _ = server
    chart = (pack_root / "benchmarks" / "results" / "h200" / "chart.png").read_bytes()
    for prefix in ("", "/api"):
        code, headers, body = _raw_get(url, f"{prefix}/attention_backends/benchmarks/h200/chart.png")
        assert code == 200 and body.startswith(PNG_SIGNATURE) and body == chart
        assert headers["content-type"] == "image/png"
        assert headers["cache-control"] == "no-cache"
    # Revalidation is answered without the body.
    code, _, body = _raw_get(url, "/attention_backends/benchmarks/h200/chart.png",
                             {"If-None-Match": headers["etag"]})
    assert code == 304 and body == b""


@pytest.mark.parametrize("name", ["..", "H200", "a/b", "%2e%2e", "%2E%2E%2F%2E%2E", "..%2f..%2fh200", "h200%00"])
def test_benchmark_chart_route_refuses_names_that_are_not_plain(server, name):
    url, _ = server
    code, headers, body = _raw_get(url, f"/attention_backends/benchmarks/{name}/chart.png")
    assert code in (400, 404), (code, body[:200])
    assert not body.startswith(PNG_SIGNATURE)
    if code == 400:  # the pack's own answer (a/b never reaches it: no route has that shape)
        assert "not a benchmark name" in json.loads(body)["error"]
        assert headers["cache-control"] == "no-store"


def test_benchmark_chart_route_names_the_published_charts_when_one_is_missing(server):
    url, _ = server
    code, headers, body = _raw_get(url, "/attention_backends/benchmarks/no-such-gpu/chart.png")
    assert code == 404 and headers["cache-control"] == "no-store"
    assert "published: h200" in json.loads(body)["error"]


def test_example_workflows_use_registered_nodes_and_valid_links(server, pack_root):
    url, _ = server
    info = asyncio.run(_fetch(url + "/object_info"))
    workflows = sorted((pack_root / "example_workflows").glob("*.json"))
    used = set()
    for path in workflows:
        workflow = json.loads(path.read_text())
        nodes = {node["id"]: node for node in workflow["nodes"]}
        for node in nodes.values():
            assert node["type"] in info, f"{path.name}: {node['type']} is not a registered node"
            used.add(node["type"])
            if node["type"].startswith("AttentionBackend"):
                widgets = [name for name, spec in info[node["type"]]["input"]["required"].items()
                           if spec[0] != "MODEL"]
                assert len(node["widgets_values"]) == len(widgets), path.name
        for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
            assert nodes[source]["outputs"][source_slot]["type"] == kind
            assert nodes[target]["inputs"][target_slot]["link"] == link_id
    assert {"AttentionBackend", "AttentionBackendAdvanced", "AttentionBackendSparse"} <= used


def _combo_options(spec: list) -> list:
    # V1 form: [[options...], {...}]; V3 form: ["COMBO", {"options": [...]}].
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def _raw_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET `path` sent byte for byte: HTTP clients normalise `..` and `%2e` away before the
    server could refuse them."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


async def _fetch(url: str, status: int = 200) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return await _get(session, url, status)
