"""`head_parallel`: one call's heads split across the GPUs of this machine.

Not a kernel of its own: each GPU serves its share of the heads with the priority names
that follow `head_parallel` in the list (default `auto`), and calls too small to gain
stay on their GPU (attention/parallel/heads.py). Never in an `auto` order and never
measured by `auto_tuned`: the user asks for it by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..backend import BHND, Backend, Kernel
from ..call import CallSignature, MASK_ADDITIVE, MASK_BOOL, MASK_INTEGER
from ..constraints import KeyHeads, Masks

if TYPE_CHECKING:  # priority_list reads the registry, which lists this backend
    from ..priority_list import Priority

NAME = "head_parallel"


def _load() -> Kernel:
    from ..parallel.heads import default_group
    return default_group()


def _probe(group: Kernel) -> list[str]:
    return group.problems()


def _bind(group: Kernel, call: CallSignature, rest: Priority) -> Kernel:
    return group.bind(call, rest)


BACKENDS = (
    Backend(
        name=NAME,
        family="parallel",
        description=("Splits a call's heads across the GPUs of this machine (ATTENTION_BACKENDS_DEVICES, default "
                     "every visible GPU); each GPU serves its share with the backends listed after it"),
        quantized=False,
        layouts=(BHND,),
        # The shares' own backends judge masks and head dims; these only keep out what
        # cannot be divided by heads.
        constraints=(Masks(frozenset({MASK_BOOL, MASK_ADDITIVE, MASK_INTEGER})), KeyHeads(gqa=True)),
        load=_load,
        probe=_probe,
        bind=_bind,
        tunable=False,
        copies=("each other GPU's share of q, k, v (and of a per-head mask) goes there and its output comes back "
                "into one output tensor; calls too small to gain stay on their GPU"),
    ),
)
