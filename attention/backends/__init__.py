"""Every backend the pack knows, one module per kernel family.

The order here is the order of the full list (node combo, doctor, status route); it
is not a priority. Priorities live in `attention.priority`.
"""

from __future__ import annotations

from ..backend import Backend
from . import flash, flex, kitchen, parallel, sage, sdpa, sparse, xformers

ALL: tuple[Backend, ...] = (
    sdpa.BACKENDS + flex.BACKENDS + sage.BACKENDS + flash.BACKENDS + xformers.BACKENDS + kitchen.BACKENDS
    + sparse.BACKENDS + parallel.BACKENDS
)
