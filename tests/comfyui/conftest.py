"""The suite that runs against a real ComfyUI tree: set COMFYUI_PATH to one.

Without it every test here is skipped (CI has no ComfyUI). With it, the pack is loaded
the way ComfyUI loads it: ComfyUI's own `load_custom_node` imports a symlink named
with hyphens, by file path, under a module name ComfyUI makes up. Nothing here
imports ComfyUI at module level, so collection works without it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]
FIXTURE_NODES = HERE / "fixture_nodes"
PACK_DIR_NAME = "ComfyUI-Attention-Backends"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: these tests need a ComfyUI tree "
                                   "(COMFYUI_PATH=/path/to/ComfyUI, run with that tree's Python)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_path() -> Iterator[Path]:
    """ComfyUI importable, on the CPU, with the test-only helpers next to it."""
    path = Path(COMFYUI_PATH).resolve()
    if not (path / "comfy" / "ldm" / "modules" / "attention.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI tree")
    # First on the path: ComfyUI's top-level `nodes` must win over the pack's `nodes/`
    # package when pytest runs from the repository root.
    sys.path.insert(0, str(path))
    sys.path.insert(1, str(FIXTURE_NODES))
    previous = os.getcwd()
    os.chdir(path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before any other comfy module reads it
    yield path
    os.chdir(previous)


@pytest.fixture(scope="session")
def custom_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A custom_nodes folder holding the pack under a hyphenated name, and the test-only fixture nodes."""
    folder = tmp_path_factory.mktemp("custom_nodes")
    (folder / PACK_DIR_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    (folder / "attention-backends-test-fixtures").symlink_to(FIXTURE_NODES, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def pack_root() -> Path:
    return PACK_ROOT


@pytest.fixture(scope="session")
def pack(comfyui_path: Path, custom_nodes: Path):
    """The pack as ComfyUI loads it from custom_nodes/ComfyUI-Attention-Backends."""
    import nodes  # ComfyUI's nodes.py

    path = str(custom_nodes / PACK_DIR_NAME)
    if not asyncio.run(nodes.load_custom_node(path)):
        pytest.fail("ComfyUI did not load the pack")
    return sys.modules[path.replace(".", "_x_")]  # the module name ComfyUI gives a pack directory


@pytest.fixture(scope="session")
def tiny(comfyui_path: Path):
    import tiny_models
    return tiny_models


@pytest.fixture
def flux(tiny):
    return tiny.tiny_flux()


@pytest.fixture
def sd15(tiny):
    return tiny.tiny_sd_unet()


@pytest.fixture(autouse=True)
def _forget_kernel_failures(request: pytest.FixtureRequest):
    """Kernel failures are remembered process-wide; keep each test's to itself."""
    yield
    if "pack" in request.fixturenames:
        request.getfixturevalue("pack").attention.forget_failures()


@pytest.fixture
def register_backend(pack, monkeypatch: pytest.MonkeyPatch):
    """Add a test-only backend to the pack's registry for one test: (name, kernel, quantized)."""
    attention = pack.attention

    def register(name: str, kernel, quantized: bool = False) -> None:
        backend = attention.Backend(
            name=name, family="test", description=f"test backend {name}", quantized=quantized,
            layouts=(attention.backend.BHND,), constraints=(attention.constraints.Exactness(quantized=quantized),),
            load=lambda: kernel)
        monkeypatch.setitem(attention.registry._BY_NAME, name, backend)

    return register


@pytest.fixture
def patch(pack):
    """patch_model with the defaults a test rarely changes."""
    patch_module = pack.nodes.patch

    def apply(model, priority, *, strict: bool = False, node_id=None, **kwargs):
        parsed = pack.attention.parse_priority(priority)
        return patch_module.patch_model(model, priority=parsed, strict=strict, selection=parsed.text,
                                        node_id=node_id, **kwargs)

    return apply


def forget_loaded_stores() -> None:
    """Drop the tuning stores every loaded copy of the pack caches per file and machine
    for the process (as a restart of ComfyUI would)."""
    for module in list(sys.modules.values()):
        forget = getattr(module, "forget_loaded_stores", None)
        if forget is not None and getattr(module, "__name__", "").endswith("attention.tuning_store"):
            forget()


@pytest.fixture
def user_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """ComfyUI's user directory (where the tuning files live) in the test's own folder."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    yield tmp_path
    forget_loaded_stores()  # each test has its own files


@pytest.fixture
def restart_stores():
    """forget_loaded_stores, for a test that stands in for a new process."""
    return forget_loaded_stores


@pytest.fixture
def contest_every_call(pack):
    """Make a node's `auto` see every call as contested between SDPA's flash kernel and
    SDPA: a CPU has no cost model, so no real call is (the sm90 model decides that on the GPU)."""
    AutoEntry = pack.attention.priority.AutoEntry
    entries = (AutoEntry("sdpa_flash", measure=True), AutoEntry("sdpa", measure=True))

    def contest(state) -> None:
        state.main.auto_entries = lambda call: entries

    return contest
