"""The user's priority list, parsed once: the backends they named and the two selection
strategies, `auto` and `auto_tuned`, as typed entries.

Grammar, the one every reader shares (the dispatcher, the nodes, the status route, and
the browser's web/lib/priority.js, checked against the readings this module writes to
tests/js/fixtures/priority_cases.json): names separated by '>' or ','; spaces around a
name are dropped and empty names between separators skipped; nothing else separates
('flash4 sdpa' is one unknown name). A sequence of strings is one name per item.

Code asks the parsed list (`Priority`) what it means ("does it use the tuner?", "what
comes after head_parallel?") instead of comparing the spellings.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Iterable, Iterator, Union

from . import registry
from .registry import UnknownBackendError

# Where the list names a backend: a "kind" is what the browser's fixtures call an entry.
BACKEND = "backend"
_SEPARATORS = re.compile(r"[>,]")
# What users type between names that the grammar does not take as a separator.
_SEPARATOR_LOOKALIKE = re.compile(r"[\s;|]")


@dataclasses.dataclass(frozen=True)
class NamedBackend:
    """A backend the user named: tried at its position; why it could not serve a call is
    reported as a fallback from it."""

    name: str
    kind: ClassVar[str] = BACKEND


@dataclasses.dataclass(frozen=True)
class AutoStrategy:
    """`auto`: the device's automatic order at this position (calibration, shipped cost
    model or rule table: cost_store.py)."""

    name: ClassVar[str] = registry.AUTO
    kind: ClassVar[str] = registry.AUTO


@dataclasses.dataclass(frozen=True)
class TunedStrategy:
    """`auto_tuned`: the backend a Tuner measured fastest and accurate for the call on
    this machine, then the auto order for calls it leaves undecided."""

    name: ClassVar[str] = registry.AUTO_TUNED
    kind: ClassVar[str] = registry.AUTO_TUNED


PriorityEntry = Union[NamedBackend, AutoStrategy, TunedStrategy]
_STRATEGIES: dict[str, PriorityEntry] = {strategy.name: strategy for strategy in (AutoStrategy(), TunedStrategy())}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)


class PriorityError(UnknownBackendError):
    """A priority list the nodes refuse: `empty`, or naming `unknown` names."""

    def __init__(self, message: str, *, empty: bool = False, unknown: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.empty = empty
        self.unknown = unknown


@dataclasses.dataclass(frozen=True)
class Priority:
    """A parsed priority list, best first. Hashable: it keys prepared kernels and the
    per-device dispatchers of head_parallel."""

    entries: tuple[PriorityEntry, ...]

    def __iter__(self) -> Iterator[PriorityEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        return self.text

    @property
    def names(self) -> tuple[str, ...]:
        """Each entry as spelled in a priority list."""
        return tuple(entry.name for entry in self.entries)

    @property
    def text(self) -> str:
        """The list in its one spelling, 'flash4 > sage > auto' (what reports show)."""
        return " > ".join(self.names)

    @property
    def uses_tuner(self) -> bool:
        """Whether `auto_tuned` decides a position: the dispatcher then needs a Tuner."""
        return any(isinstance(entry, TunedStrategy) for entry in self.entries)

    @property
    def uses_auto(self) -> bool:
        """Whether `auto` itself decides a position (it may then time contested calls)."""
        return any(isinstance(entry, AutoStrategy) for entry in self.entries)

    @property
    def uses_auto_order(self) -> bool:
        """Whether a strategy brings the device's auto order in (both strategies do)."""
        return any(not isinstance(entry, NamedBackend) for entry in self.entries)

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends named, in order (not those the strategies bring in)."""
        return tuple(entry.name for entry in self.entries if isinstance(entry, NamedBackend))

    def names_backend(self, name: str) -> bool:
        return NamedBackend(name) in self.entries

    def after(self, name: str) -> Priority:
        """The entries after the named backend `name` (empty when it is not named): what a
        backend that binds to the rest of the list (head_parallel) serves its share with."""
        entry = NamedBackend(name)
        if entry not in self.entries:
            return Priority(())
        return Priority(self.entries[self.entries.index(entry) + 1:])

    def without(self, name: str) -> Priority:
        """This list without the named backend `name`."""
        return Priority(tuple(entry for entry in self.entries if entry != NamedBackend(name)))

    def with_auto_fallback(self) -> Priority:
        """This list, ending in `auto` unless it already names it: the automatic order
        serves what the named backends cannot."""
        if self.uses_auto:
            return self
        return Priority(self.entries + (AutoStrategy(),))


# The rest of a list after a backend that is last, or that a strategy brought in.
NOTHING_AFTER = Priority(())


def split_priority(text: str | Iterable[str]) -> list[str]:
    """The names of a priority text (or sequence), spaces around them and empty ones dropped."""
    parts = _SEPARATORS.split(text) if isinstance(text, str) else [_name(part) for part in text]
    return [part.strip() for part in parts if part.strip()]


def parse_priority(text: str | Iterable[str] | Priority) -> Priority:
    """'flash4 > sage, sdpa' (or a sequence of names) as a Priority; a Priority as is.

    Raises PriorityError, an UnknownBackendError, naming every unknown name with close
    matches, or saying the list is empty.
    """
    if isinstance(text, Priority):
        return text
    names = split_priority(text)
    if not names:
        raise PriorityError("the priority list is empty: name at least one backend, e.g. 'flash4 > sdpa' "
                            "(names separated by '>' or ',')", empty=True)
    unknown = tuple(name for name in names if name not in _STRATEGIES and not registry.is_backend(name))
    if unknown:
        raise PriorityError(_unknown_message(unknown), unknown=unknown)
    return Priority(tuple(_STRATEGIES.get(name) or NamedBackend(name) for name in names))


def _name(part: object) -> str:
    if not isinstance(part, str):
        raise TypeError(f"a priority list's entries are backend names (str), not {type(part).__name__}: {part!r}")
    return part


def _unknown_message(unknown: tuple[str, ...]) -> str:
    if len(unknown) == 1:
        close = registry.close_names(unknown[0], STRATEGY_NAMES)
        listed = f"backend {unknown[0]!r}." + (f" Did you mean {', '.join(close)}?" if close else "")
    else:
        listed = "backends " + ", ".join(_with_close_names(name) for name in unknown) + "."
    message = f"unknown attention {listed} Known: {', '.join(registry.names() + list(STRATEGY_NAMES))}."
    if any(_SEPARATOR_LOOKALIKE.search(name) for name in unknown):
        message += " Separate names with '>' or ','; spaces, ';' and '|' separate nothing."
    return message


def _with_close_names(name: str) -> str:
    close = registry.close_names(name, STRATEGY_NAMES)
    return f"{name!r} (did you mean {', '.join(close)}?)" if close else repr(name)
