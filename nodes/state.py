"""The state one Attention Backend node shares between its override, its model-call
hooks and its run report."""

from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

from ..attention import Dispatcher
from ..attention.counters import count_value
from ..attention.parallel.heads import HEAD_PARALLEL, HeadGroup, default_group
from ..attention.quality import QualityMonitor
from ..attention.tuning import Tuner


class PatchState:
    """One patched MODEL's dispatchers, per-model-call flags and per-run counters.

    Counters are `itertools.count` objects advanced on the hot path (one C call each):
    ComfyUI 0.28's multi-GPU sampling calls one override from a thread per device, and
    a plain `+= 1` could lose counts there. `count(name)` reads one.
    """

    def __init__(self, *, node_id: Optional[str], node_type: str, selection: str, strict: bool,
                 main: Dispatcher, exact: Optional[Dispatcher] = None,
                 monitor: Optional[QualityMonitor] = None) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.selection = selection
        self.strict = strict
        self.main = main
        self.exact = exact  # serves calls routed to exact attention (Advanced node only)
        self.tuner: Optional[Tuner] = main.tuner  # decides auto_tuned; reports its run
        # Times what `auto` cannot separate (contested calls); reports its run. Shared with
        # the exact dispatcher where one is (the Sparse node's dense calls).
        self.measurer: Optional[Tuner] = main.measurer
        self.monitor = monitor  # checks sparse plans' error (Sparse node only)
        # Splits calls across GPUs when the priority names head_parallel; reports its run.
        self.head_group: Optional[HeadGroup] = default_group() if main.priority.names_backend(HEAD_PARALLEL) else None
        self.override: Optional[Callable] = None  # the function installed, to spot a later replacement
        # The override's serving path, for calls that come back from a compiled graph (compiled.py).
        self.serve: Optional[Callable] = None
        self.last_report: Optional[dict] = None
        # Per compiled graph id: the plans its traced-SDPA calls count for (compiled.py).
        self.traced_counts: dict[int, list] = {}
        self.begin_run()

    def dispatchers(self) -> list[tuple[str, Dispatcher]]:
        """(route, dispatcher) pairs: "main" for the user's priority, "exact" for routed calls."""
        pairs = [("main", self.main)]
        if self.exact is not None:
            pairs.append(("exact", self.exact))
        return pairs

    def tuners(self) -> list[Tuner]:
        """The tuners of this node: auto_tuned's and `auto`'s measurer, where there are."""
        return [tuner for tuner in (self.tuner, self.measurer) if tuner is not None]

    def begin_run(self) -> None:
        """Zero the counters and flags at the start of a sampler run (plans stay cached)."""
        for _, dispatcher in self.dispatchers():
            dispatcher.reset_counters()
        for tuner in self.tuners():
            tuner.begin_run()
        if self.monitor is not None:
            self.monitor.begin_run()
        if self.head_group is not None:
            self.head_group.begin_run()
        self.started_at = time.time()
        # Set once per model call by the step-window and guard hooks, read per attention call.
        self.step_exact = False
        self.pinned = False
        # Set by every call the override serves; read by the compiled-model watch (compiled.py).
        self.invoked = False
        # Whether this run's model is compiled (TorchCompileModel), and what that changed.
        self.compiled = False
        self.compiled_calls = itertools.count()
        # Calls a compiled graph ran as traced SDPA (compiled.py: TracedSdpa), counted per
        # run of the graph.
        self.traced_calls = itertools.count()
        self.traced_mismatch = False
        self.recompiled_stale = 0
        # Calls the override passed on unread because their form was not ComfyUI's.
        self.unknown_form = itertools.count()
        # Routing: calls sent to the exact dispatcher, by rule, and calls a rule could not judge.
        self.routed_step = itertools.count()
        self.routed_block = itertools.count()
        self.routed_cross = itertools.count()
        self.block_unknown = itertools.count()
        self.step_unknown = itertools.count()
        # Non-finite guard.
        self.nonfinite_model_calls = itertools.count()
        self.reruns = itertools.count()
        self.nonfinite_exact = itertools.count()

    def count(self, name: str) -> int:
        """The value of one of the counters above."""
        return count_value(getattr(self, name))
