"""Remembered kernel failures: retried at the next run, permanent after RETRY_LIMIT, listed
for the status route and cleared on request (issue 13, defect 8)."""

from __future__ import annotations

import pytest
import torch

from attention import Backend, Dispatcher, dispatch
from attention.backend import BHND
from attention.constraints import Exactness


class Flaky:
    """A kernel that raises on its first `failures` calls, then works."""

    def __init__(self, failures: int) -> None:
        self.left = failures

    def __call__(self, q, k, v, mask, scale, layout):
        if self.left:
            self.left -= 1
            raise RuntimeError("transient fault")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.fixture
def flaky_backend(monkeypatch):
    from attention import registry

    def install(failures: int) -> Flaky:
        kernel = Flaky(failures)
        backend = Backend(name="flaky", family="test", description="raises at first", quantized=False,
                          layouts=(BHND,), constraints=(Exactness(quantized=False),), load=lambda: kernel)
        monkeypatch.setitem(registry._BY_NAME, "flaky", backend)
        return kernel

    yield install
    dispatch.forget_failures()


def test_a_transient_failure_is_retried_at_the_next_run(flaky_backend):
    flaky_backend(failures=1)
    q = torch.randn(1, 8, 16)
    attend = Dispatcher("flaky > sdpa")
    attend.begin_run()
    attend(q, q, q, 2)
    attend(q, q, q, 2)
    assert attend.counters().served == {"sdpa": 2}  # the rest of this run on the next backend
    attend.begin_run()
    attend(q, q, q, 2)
    assert attend.counters().served == {"flaky": 1}  # retried, and it works now


def test_a_repeated_failure_stays_until_cleared(flaky_backend):
    flaky_backend(failures=dispatch.RETRY_LIMIT + 5)
    q = torch.randn(1, 8, 16)
    attend = Dispatcher("flaky > sdpa")
    for _ in range(dispatch.RETRY_LIMIT + 2):
        attend.begin_run()
        attend(q, q, q, 2)
    (key, failure), = dispatch.remembered_failures().items()
    assert key[0] == "flaky" and failure.count == dispatch.RETRY_LIMIT and failure.permanent
    attend.begin_run()
    attend(q, q, q, 2)
    assert attend.counters().served == {"sdpa": 1}
    assert dispatch.forget_failures() == 1 and dispatch.remembered_failures() == {}


def test_status_rows_name_each_failure(flaky_backend):
    flaky_backend(failures=1)
    q = torch.randn(1, 8, 16)
    Dispatcher("flaky > sdpa")(q, q, q, 2)
    (row,) = dispatch.failure_rows()
    assert row["backend"] == "flaky" and row["count"] == 1 and row["retried_next_run"]
    assert "transient fault" in row["reason"] and "Nq=8" in row["signature"]
