"""A ComfyUI server for one test module, and plain HTTP helpers to talk to it.

Every wait is bounded; the server is stopped in a finally. A module of its own (not a
conftest): test modules import what they use.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

STARTUP_S = 180
RUN_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def comfyui_server(comfyui_path: Path, custom_nodes: Path, base: Path,
                   env: Optional[dict[str, str]] = None) -> Iterator[tuple[str, Path]]:
    """Run `main.py --cpu` with `custom_nodes` mounted and its user directory at
    `base/user` (prepared by the caller if it wants files there); yields (url, log path)."""
    import pytest

    for folder in ("output", "user"):
        (base / folder).mkdir(exist_ok=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"attention_backends_test:\n    custom_nodes: {custom_nodes}\n")
    port = _free_port()
    log_path = base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--extra-model-paths-config", str(config), "--output-directory", str(base / "output"),
               "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=comfyui_path, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + STARTUP_S
            while True:
                if process.poll() is not None:
                    pytest.fail(f"ComfyUI exited during startup:\n{log_path.read_text()[-4000:]}")
                try:
                    urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"ComfyUI did not answer within {STARTUP_S}s:\n{log_path.read_text()[-4000:]}")
                    time.sleep(0.5)
            yield url, log_path
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def request(url: str, method: str = "GET", body: Any = None) -> tuple[int, bytes]:
    """(status, body) of one request; `body` is sent as JSON (NaN written as NaN, as
    JavaScript clients cannot but Python ones can)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_json(url: str) -> Any:
    status, body = request(url)
    assert status == 200, body[-2000:]
    return json.loads(body)


def run_prompt(url: str, prompt: dict) -> dict:
    """Queue `prompt` and wait for its history entry."""
    status, body = request(url + "/prompt", "POST", {"prompt": prompt})
    assert status == 200, body[-4000:]
    prompt_id = json.loads(body)["prompt_id"]
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        entry = get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry is not None:
            return entry
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} did not finish within {RUN_S}s")


def tiny_flux_workflow(node_type: str, inputs: dict) -> dict:
    """Tiny Flux -> `node_type` (node "7", with `inputs` besides the model) -> KSampler -> SaveLatent."""
    return {
        "1": {"class_type": "AttentionBackendsTestTinyFlux", "inputs": {"seed": 0}},
        "3": {"class_type": "AttentionBackendsTestFluxConditioning", "inputs": {"seed": 0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": node_type, "inputs": {"model": ["1", 0], **inputs}},
        "8": {"class_type": "KSampler",
              "inputs": {"model": ["7", 0], "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 1],
                         "latent_image": ["4", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "attention_backends"}},
    }
