"""The Attention Backend (Sparse) node's logic: its inputs checked and turned into
settings, and the dispatchers, routing rules and quality monitor it patches a MODEL with.

Calls the sparse backend must not or cannot take stay dense, on `auto` (the fastest
dense kernel for the shape): calls outside the step window and in the first/last
blocks (nodes.routing), every cross-attention call (the routing's cross rule with no
key limit), masked, short or otherwise unsupported calls (the backend's constraints),
and signatures the quality monitor finds over the error budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from ..attention import AUTO, Dispatcher, parse_priority, sparse_names
from ..attention.quality import DEFAULT_BUDGET_REL_L1, QualityMonitor, QualityPolicy
from ..attention.sparsity import TEXT_POSITIONS, SolSettings, SpargeSettings
from ..attention.tuning import Tuner
from .patch import patch_model
from .routing import RoutingRules
from .state import PatchState
from .tuning import REUSE, make_measurer

SOL = "sol"
SPARGE = "sparge"
# Where every call the sparse backend does not serve goes.
DENSE_PRIORITY = (AUTO,)
# The cross rule's key limit that sends every cross-attention call dense.
ANY_KEYS = 1 << 62
NODE_TYPE = "AttentionBackendSparse"
# The node's defaults: dense for the first 20% and the last 10% of the schedule, and for
# the first and the last attention block.
DEFAULT_RULES = RoutingRules(step_start=0.2, step_end=0.9, first_blocks=1, last_blocks=1)


def policy_for(rules: RoutingRules, budget_rel_l1: float = DEFAULT_BUDGET_REL_L1) -> QualityPolicy:
    """The quality monitor's policy for a node whose step window is `rules`'."""
    return QualityPolicy(budget_rel_l1=budget_rel_l1, window=(rules.step_start, rules.step_end))


def settings_for(backend: str, *, sol_tau: float, sol_topk_ratio: float, sol_extra_tokens: int, sparge_topk: float,
                 sparge_simthreshd1: float, sparge_pvthreshd: float, text_tokens: int,
                 text_position: str, sparge_cdfthreshd: float = 0.0) -> SolSettings | SpargeSettings:
    """The chosen backend's settings from the node's inputs (the other backend's are unused)."""
    if backend == SOL:
        return SolSettings(tau=sol_tau, topk_ratio=sol_topk_ratio, extra_tokens=sol_extra_tokens,
                           text_tokens=text_tokens, text_position=text_position)
    if backend == SPARGE:
        return SpargeSettings(topk=sparge_topk, simthreshd1=sparge_simthreshd1, pvthreshd=sparge_pvthreshd,
                              cdfthreshd=sparge_cdfthreshd)
    raise ValueError(f"the sparse backend must be one of {sparse_names()}, not {backend!r}")


def input_problems(backend: Optional[str] = None, text_tokens: Optional[int] = None,
                   step_start: Optional[float] = None, step_end: Optional[float] = None) -> list[str]:
    """What is wrong across the node's inputs (a value wired from another node is None
    here and checked when the node runs)."""
    found = []
    if backend is not None and backend not in sparse_names():
        found.append(f"backend must be one of {sparse_names()}, not {backend!r}")
    if text_tokens is not None:
        if text_tokens < 0:
            found.append(f"text_tokens cannot be negative (got {text_tokens})")
        elif text_tokens and backend == SPARGE:
            found.append("sparge cannot keep conditioning tokens exact (only sol has sink blocks): set text_tokens "
                         "to 0 or choose sol")
    if step_start is not None and step_end is not None and not 0.0 <= step_start < step_end <= 1.0:
        found.append(f"the step window needs 0 <= step_start < step_end <= 1 (got {step_start}, {step_end})")
    return found


def all_problems(backend: str, settings: Any, rules: RoutingRules, policy: QualityPolicy,
                 text_tokens: int, text_position: str) -> list[str]:
    """Every problem of a complete configuration (what the node checks when it runs,
    wired values included)."""
    found = input_problems(backend, text_tokens, rules.step_start, rules.step_end)
    if text_position not in TEXT_POSITIONS:
        found.append(f"text_position must be one of {TEXT_POSITIONS}, not {text_position!r}")
    if min(rules.first_blocks, rules.last_blocks) < 0:
        found.append("exact_first_blocks and exact_last_blocks cannot be negative")
    if not math.isfinite(policy.budget_rel_l1) or policy.budget_rel_l1 <= 0:
        found.append(f"error_budget must be a relative L1 above 0 (got {policy.budget_rel_l1})")
    return found + settings.problems()


def sparse_dispatchers(backend: str, settings: Any, policy: QualityPolicy,
                       measurer: Optional[Tuner] = None) -> tuple[Dispatcher, Dispatcher, QualityMonitor]:
    """(main, dense, monitor): `main` tries the sparse backend with the node's settings
    and then `auto`, watched by the monitor; `dense` serves calls the rules route away.
    `measurer`, shared by both, times a contested dense call once, whichever serves it
    (none: `auto` never times one)."""
    monitor = QualityMonitor(policy)
    timing = {"measurer": measurer, "measure_contested": measurer is not None}
    main = Dispatcher([backend] + list(DENSE_PRIORITY), settings={backend: settings}, monitor=monitor, **timing)
    return main, Dispatcher(list(DENSE_PRIORITY), **timing), monitor


def sparse_rules(rules: RoutingRules) -> RoutingRules:
    """The user's step window and block filters, and every cross-attention call dense."""
    return dataclasses.replace(rules, cross_max_keys=ANY_KEYS)


def patch_sparse(model: Any, *, backend: str, settings: Any, rules: RoutingRules, policy: QualityPolicy,
                 node_id: Optional[str] = None) -> tuple[Any, PatchState]:
    """A clone of `model` whose self-attention calls go to `backend` where the rules allow."""
    main, dense, monitor = sparse_dispatchers(backend, settings, policy,
                                              make_measurer(parse_priority(DENSE_PRIORITY), REUSE))
    return patch_model(model, priority=main.priority, strict=False, selection=backend, node_id=node_id,
                       node_type=NODE_TYPE, rules=sparse_rules(rules), main=main, exact=dense, monitor=monitor)
