"""A progress bar for the command-line measurements (bench, calibrate, the benchmarks):
tqdm, which ComfyUI ships, when it is importable, else a counter on stderr."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Sequence, TypeVar

Item = TypeVar("Item")


def progress(items: Sequence[Item], label: str) -> Iterable[Item]:
    """Iterate over `items` with a progress bar labelled `label` on stderr."""
    try:
        from tqdm import tqdm
        return tqdm(items, desc=label, file=sys.stderr)
    except ImportError:
        return _counter(items, label)


def _counter(items: Sequence[Item], label: str) -> Iterator[Item]:
    for i, item in enumerate(items, 1):
        sys.stderr.write(f"\r{label}: {i}/{len(items)}")
        yield item
    sys.stderr.write("\n")
