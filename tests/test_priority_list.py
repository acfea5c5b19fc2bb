"""The parsed priority list: its grammar and errors, the questions it answers, and how
the dispatcher expands its strategies and prepares each backend once."""

from __future__ import annotations

import pytest
import torch

from attention import dispatch, registry
from attention import (
    AutoStrategy, Backend, Dispatcher, NamedBackend, PriorityError, TunedStrategy, UnknownBackendError,
    describe_call, parse_priority,
)
from attention.backend import BHND
from attention.priority import AutoEntry, Rule
from attention.priority_list import NOTHING_AFTER
from library_support import sdpa_kernel


def test_one_grammar_for_text_and_names():
    priority = parse_priority(" flash4 > sage, auto_tuned ,, auto ")
    assert priority.entries == (NamedBackend("flash4"), NamedBackend("sage"), TunedStrategy(), AutoStrategy())
    assert priority == parse_priority(["flash4", " sage", "auto_tuned", "auto"])
    assert parse_priority(priority) is priority
    assert priority.text == str(priority) == "flash4 > sage > auto_tuned > auto"
    assert parse_priority(priority.text) == priority


def test_the_list_answers_what_it_means():
    tuned = parse_priority("head_parallel > sdpa > auto_tuned")
    assert tuned.uses_tuner and tuned.uses_auto_order
    assert tuned.backends == ("head_parallel", "sdpa")
    assert tuned.names_backend("sdpa") and not tuned.names_backend("auto_tuned")
    assert tuned.after("head_parallel") == parse_priority("sdpa > auto_tuned")
    assert tuned.after("flash4") == NOTHING_AFTER and not NOTHING_AFTER
    assert tuned.without("sdpa") == parse_priority("head_parallel > auto_tuned")
    named = parse_priority("flash4 > sdpa")
    assert not named.uses_tuner and not named.uses_auto_order
    assert named.with_auto_fallback() == parse_priority("flash4 > sdpa > auto")
    assert parse_priority("auto > sdpa").with_auto_fallback() == parse_priority("auto > sdpa")
    assert {parse_priority("auto"): 1}[parse_priority(" auto ")] == 1  # hashable: keys prepared kernels


def test_errors_name_every_unknown_name_and_what_to_do():
    with pytest.raises(PriorityError) as raised:
        parse_priority("flash5 > bogus > sdpa")
    assert raised.value.unknown == ("flash5", "bogus") and not raised.value.empty
    assert "'flash5' (did you mean flash" in str(raised.value) and "'bogus'" in str(raised.value)
    assert isinstance(raised.value, UnknownBackendError)  # what callers caught before the strategies had types
    with pytest.raises(PriorityError, match="Separate names with '>' or ','"):
        parse_priority("flash4 sdpa")
    with pytest.raises(PriorityError, match="empty") as empty:
        parse_priority(" > , ")
    assert empty.value.empty and empty.value.unknown == ()
    with pytest.raises(PriorityError, match="did you mean auto"):
        parse_priority("sdpa > auto_tune > bogus")
    with pytest.raises(TypeError, match="backend names"):
        parse_priority(["sdpa", 3])


def _call():
    q = torch.zeros(1, 2, 8, 4)
    return describe_call(q, q, q, 2, None, skip_reshape=True, skip_output_reshape=True)


TABLE = {"default": (AutoEntry("sdpa_math", Rule(), "test"), AutoEntry("sdpa", Rule(), "test"))}


def test_strategies_expand_where_they_stand():
    call = _call()
    names = [candidate.name for candidate in Dispatcher("sdpa > auto", auto_table=TABLE).candidates(call)]
    assert names == ["sdpa", "sdpa_math"]
    tuned = Dispatcher("auto_tuned > sdpa_flash", auto_table=TABLE)
    candidates = tuned.candidates(call)
    assert candidates[0] == TunedStrategy() and [c.name for c in candidates[1:]] == ["sdpa_math", "sdpa",
                                                                                    "sdpa_flash"]
    assert tuned.tuner is not None and Dispatcher("sdpa > auto", auto_table=TABLE).tuner is None


def test_a_list_without_strategies_never_asks_for_the_auto_order(monkeypatch):
    dispatcher = Dispatcher("sdpa_math > sdpa", auto_table=TABLE)
    monkeypatch.setattr(dispatcher, "auto_entries", lambda call: pytest.fail("auto order computed for nothing"))
    assert [c.name for c in dispatcher.candidates(_call())] == ["sdpa_math", "sdpa"]


class _DecliningTuner:
    """A tuner that decides nothing (its run's budget spent): the static order answers."""

    def __init__(self) -> None:
        self.offered: list[str] = []

    def choose(self, call, tensors, runs, prefer=(), keep=None):
        self.offered = sorted(runs)
        return None


def test_each_backend_is_prepared_and_checked_once_per_signature(extra_backend, monkeypatch):
    checks, prepared = [], []

    def check(q, k, v, mask):
        checks.append(q.shape)
        return []

    backend = extra_backend(Backend("checked", "test", "runtime-checked", False, (BHND,), (), lambda: sdpa_kernel,
                                    runtime_check=check))
    monkeypatch.setattr(registry, "all_backends", lambda: registry.ALL + (backend,))  # tunable, so measured
    original = dispatch.Prepared.__init__

    def counting(self, backend, *args, **kwargs):
        prepared.append(backend.name)
        original(self, backend, *args, **kwargs)

    monkeypatch.setattr(dispatch.Prepared, "__init__", counting)
    tuner = _DecliningTuner()
    table = {"default": (AutoEntry("checked", Rule(), "test"),)}
    dispatcher = Dispatcher("auto_tuned", auto_table=table, tuner=tuner)
    q = torch.randn(1, 2, 8, 4)
    for _ in range(3):
        dispatcher(q, q, q, 2, skip_reshape=True, skip_output_reshape=True)
    assert "checked" in tuner.offered  # the tuner was asked, with the backend prepared
    assert dispatcher.counters().served == {"checked": 3}  # then the auto order served it
    assert len(checks) == 1 and prepared.count("checked") == 1
