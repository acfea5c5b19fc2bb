"""Backends by name. Every backend is listed on every machine; the ones that cannot run
here stay in the list with their reasons (comfy-kitchen's registry does the same)."""

from __future__ import annotations

import difflib
from typing import Sequence

from .backend import Availability, Backend
from .backends import ALL

# How the two selection strategies are spelled in a priority list, beside the backend
# names (priority_list.py gives them their types): the device's automatic order, and
# the backend measured fastest on this machine per call signature (attention.tuning).
AUTO = "auto"
AUTO_TUNED = "auto_tuned"

_BY_NAME: dict[str, Backend] = {backend.name: backend for backend in ALL}


class UnknownBackendError(ValueError):
    """A name that is not a backend (or, in a priority list, not a strategy either)."""


def names() -> list[str]:
    """Every backend name, in the fixed listing order."""
    return list(_BY_NAME)


def sparse_names() -> list[str]:
    """The sparse backends, in listing order: approximate by design, run only where named."""
    return [name for name, backend in _BY_NAME.items() if backend.sparse]


def get(name: str) -> Backend:
    """The backend called `name`; raises UnknownBackendError with close matches."""
    try:
        return _BY_NAME[name]
    except KeyError:
        close = close_names(name)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackendError(f"unknown attention backend {name!r}.{hint} Known: {', '.join(_BY_NAME)}.") from None


def close_names(name: str, extra: Sequence[str] = ()) -> list[str]:
    """Up to three backend names (or `extra` names) spelled like `name`, closest first."""
    return difflib.get_close_matches(name, list(_BY_NAME) + list(extra), n=3)


def all_backends() -> tuple[Backend, ...]:
    return ALL


def availability_table() -> list[tuple[Backend, Availability]]:
    """Every backend with its (cached) availability on this machine."""
    return [(backend, backend.availability()) for backend in ALL]


def is_backend(name: str) -> bool:
    return name in _BY_NAME
