"""Backends by name. Every backend is listed on every machine; the ones that cannot run
here stay in the list with their reasons (comfy-kitchen's registry does the same)."""

from __future__ import annotations

import difflib
from typing import Iterable

from .backend import Availability, Backend
from .backends import ALL

AUTO = "auto"
# Measures the eligible backends on this machine per call signature (attention.tuning).
AUTO_TUNED = "auto_tuned"
_AUTOS = (AUTO, AUTO_TUNED)

_BY_NAME: dict[str, Backend] = {backend.name: backend for backend in ALL}


class UnknownBackendError(ValueError):
    """A name that is neither a backend nor `auto`."""


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
        close = difflib.get_close_matches(name, list(_BY_NAME) + list(_AUTOS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackendError(
            f"unknown attention backend {name!r}.{hint} Known: {', '.join(_BY_NAME)}, {', '.join(_AUTOS)}.") from None


def all_backends() -> tuple[Backend, ...]:
    return ALL


def availability_table() -> list[tuple[Backend, Availability]]:
    """Every backend with its (cached) availability on this machine."""
    return [(backend, backend.availability()) for backend in ALL]


def parse_priority(text: str | Iterable[str]) -> list[str]:
    """'flash4 > sage > sdpa' (or ',' separated, or a list) to validated names.

    `auto` may appear, standing for the device's auto order at that position, and
    `auto_tuned`, standing for the backend measured fastest here (then the auto order).
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(",", ">").split(">")]
    else:
        parts = [p.strip() for p in text]
    parts = [p for p in parts if p]
    if not parts:
        raise UnknownBackendError("the priority list is empty: name at least one backend, e.g. 'flash4 > sdpa'")
    for part in parts:
        if part not in _AUTOS:
            get(part)
    return parts
