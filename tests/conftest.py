"""Shared fixtures for the library tests (CPU, no ComfyUI)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from attention import dispatch, registry  # noqa: E402
from attention.backend import Backend  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here; the gpu suite runs on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_failures():
    dispatch.forget_failures()
    yield
    dispatch.forget_failures()


@pytest.fixture
def extra_backend(monkeypatch):
    """Register a throwaway backend for one test (appended to the registry)."""
    def add(backend: Backend) -> Backend:
        monkeypatch.setitem(registry._BY_NAME, backend.name, backend)
        return backend
    return add
