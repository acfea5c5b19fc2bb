"""The pack installed twice under custom_nodes (a Manager install beside a git clone):
the second copy ComfyUI loads stays idle, so nodes, routes and reports share one state."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from server_support import comfyui_server
from test_comfyui_server import _fetch, _run_prompts, _twins


def test_a_second_copy_registers_nothing_and_says_so_once(pack, custom_nodes: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, caplog):
    import nodes  # ComfyUI's nodes.py

    second = tmp_path / "comfyui-attention-backends"
    second.symlink_to(Path(pack.__file__).parent, target_is_directory=True)
    # Whatever the second load does to ComfyUI's tables is undone after the test.
    for table in (nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS, nodes.EXTENSION_WEB_DIRS):
        for key, value in list(table.items()):
            monkeypatch.setitem(table, key, value)
    before = {name: nodes.NODE_CLASS_MAPPINGS[name] for name in ("AttentionBackend", "AttentionBackendAdvanced")}
    module_name = str(second).replace(".", "_x_")
    try:
        with caplog.at_level(logging.WARNING):
            assert asyncio.run(nodes.load_custom_node(str(second)))
        # The nodes ComfyUI runs are still the first copy's: the ones whose reports its routes serve.
        assert {name: nodes.NODE_CLASS_MAPPINGS[name] for name in before} == before
        assert before["AttentionBackend"].__module__.startswith(pack.__name__)
        assert "comfyui-attention-backends" not in nodes.EXTENSION_WEB_DIRS
        assert sys.modules[module_name].WEB_DIRECTORY is None
        warnings = [r.getMessage() for r in caplog.records if "installed twice" in r.getMessage()]
        assert len(warnings) == 1
        assert str(second) in warnings[0] and str(custom_nodes / "ComfyUI-Attention-Backends") in warnings[0]
    finally:
        for name in [name for name in sys.modules if name == module_name or name.startswith(module_name + ".")]:
            del sys.modules[name]


def test_installed_twice_the_server_reports_and_warns_once(comfyui_path: Path, pack_root: Path,
                                                           tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("custom_nodes_twice")
    for name in ("ComfyUI-Attention-Backends", "comfyui-attention-backends"):
        (folder / name).symlink_to(pack_root, target_is_directory=True)
    (folder / "attention-backends-test-fixtures").symlink_to(pack_root / "tests" / "comfyui" / "fixture_nodes",
                                                             target_is_directory=True)
    with comfyui_server(comfyui_path, folder, tmp_path_factory.mktemp("comfy_server_twice")) as (url, log_path):
        [(history, events)] = asyncio.run(_run_prompts(url, [_twins({"5": 0})]))
        assert history["status"]["status_str"] == "success", log_path.read_text()[-4000:]
        assert [event["node_id"] for event in events] == ["5"]
        reports = asyncio.run(_fetch(url + "/attention_backends/report"))["reports"]
        assert reports["5"]["served"] == {"sdpa": reports["5"]["total_calls"]} and reports["5"]["total_calls"] > 0
        log = log_path.read_text()
        warnings = [line for line in log.splitlines() if "installed twice" in line]
        assert len(warnings) == 1, log[-4000:]
        assert str(folder / "ComfyUI-Attention-Backends") in warnings[0]
        assert str(folder / "comfyui-attention-backends") in warnings[0]
