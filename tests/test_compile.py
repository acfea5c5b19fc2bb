"""The dispatcher inside torch.compile, on the CPU (no ComfyUI): a small attention module
that calls it compiles with no graph break, never recompiles across calls, counts every
call that ran (not what dynamo traced), and gives the eager outputs.

Threads: one dispatcher called from several threads at once counts every call.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

from attention import Dispatcher, parse_priority
from attention.compiled import compiled_attention, register_target

HEADS, WIDTH = 2, 32


class Block(torch.nn.Module):
    """Three attention calls of the two ComfyUI forms around plain tensor work."""

    def __init__(self, attend: Dispatcher) -> None:
        super().__init__()
        self.attend = attend
        self.proj = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.proj(x), x, x, HEADS)  # self-attention, flat form
        x = x + self.attend(x, context, context, HEADS)  # cross-attention
        b, n, _ = x.shape
        heads_first = x.view(b, n, HEADS, WIDTH // HEADS).transpose(1, 2)
        out = self.attend(heads_first, heads_first, heads_first, HEADS, skip_reshape=True, skip_output_reshape=True)
        return x + out.transpose(1, 2).reshape(b, n, WIDTH)


@pytest.fixture
def dynamo_counters():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def _inputs(seed: int, tokens: int = 24):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, tokens, WIDTH, generator=generator), torch.randn(2, 7, WIDTH, generator=generator)


@pytest.mark.parametrize("priority", ["sdpa", "sdpa_math", "auto"])
def test_compiled_module_has_no_graph_break_and_counts_what_ran(dynamo_counters, priority):
    attend = Dispatcher(priority)
    block = Block(attend).eval()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    runs = 5
    with torch.no_grad():
        for seed in range(runs):
            x, context = _inputs(seed)
            torch.testing.assert_close(compiled(x, context), block(x, context), rtol=1e-5, atol=1e-5)
    assert dict(dynamo_counters["graph_break"]) == {}
    assert dynamo_counters["stats"]["unique_graphs"] == 1, "compiled again across calls"
    # Every call counted once per run of the graph and once per eager call, never at trace time.
    served = attend.counters().served
    assert sum(served.values()) == 2 * 3 * runs
    assert set(served) == {"sdpa" if priority == "auto" else priority}


def test_compiled_with_inductor_matches_eager(dynamo_counters):
    attend = Dispatcher("sdpa")
    block = Block(attend).eval()
    compiled = torch.compile(block)
    x, context = _inputs(0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, context), block(x, context), rtol=1e-4, atol=1e-4)
    assert dict(dynamo_counters["graph_break"]) == {}


def test_decision_made_after_compiling_is_not_baked_into_the_graph(dynamo_counters):
    """The plan is made when the graph first runs, and a re-plan (after clear()) is
    followed without recompiling: the graph holds no decision."""
    attend = Dispatcher("sdpa_math > sdpa")
    compiled = torch.compile(Block(attend).eval(), backend="aot_eager", fullgraph=True)
    x, context = _inputs(1)
    with torch.no_grad():
        compiled(x, context)
        assert set(attend.counters().served) == {"sdpa_math"}
        attend.priority = parse_priority("sdpa")
        attend.clear()
        compiled(x, context)
    assert set(attend.counters().served) == {"sdpa"}
    assert dynamo_counters["stats"]["unique_graphs"] == 1


def test_op_output_matches_its_fake_shape_in_every_call_form(dynamo_counters):
    attend = Dispatcher("sdpa")
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 9, 4 * 8, generator=generator)
    kv = torch.randn(2, 5, 2 * 8, generator=generator)  # grouped-query: 2 key heads for 4 query heads
    for skip_output_reshape in (False, True):
        eager = attend(q, kv, kv, 4, skip_output_reshape=skip_output_reshape)
        op = compiled_attention(attend.handle, q, kv, kv, 4, None, skip_reshape=False,
                                skip_output_reshape=skip_output_reshape, scale=None, attn_precision=None,
                                low_precision=True)
        assert op.shape == eager.shape and op.is_contiguous()
        torch.testing.assert_close(op, eager)


def test_a_graph_whose_dispatcher_is_gone_says_what_to_do():
    class Gone:
        def serve_compiled(self, *args, **kwargs):
            raise AssertionError("never called")

    handle = register_target(Gone())  # weakly held: collected at once
    q = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="no longer exists"):
        compiled_attention(handle, q, q, q, 1, None, skip_reshape=False, skip_output_reshape=False, scale=None,
                           attn_precision=None, low_precision=True)


def test_one_dispatcher_called_from_threads_counts_every_call():
    attend = Dispatcher("sdpa")
    q = torch.randn(1, 16, WIDTH)
    expected = attend(q, q, q, HEADS)
    attend.begin_run()
    threads, per_thread, wrong = 4, 500, []

    def work() -> None:
        for _ in range(per_thread):
            if not torch.equal(attend(q, q, q, HEADS), expected):
                wrong.append(1)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not wrong
    assert attend.counters().served == {"sdpa": threads * per_thread}
