"""The nodes inside torch.compile: ComfyUI's own TorchCompileModel (inductor, CPU) on the
tiny real Flux and SD UNet, in both orders, and sequences of workflows on one compiled
model in one process, as a server would run them.

What must hold (issue 10): no graph break caused by the pack, no recompile across the
steps of a run, outputs equal to the uncompiled run, reports that count what ran, and
every run using the attention its own workflow asks for, with no error and no restart.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

# Outputs of compiled and eager runs of the same fp32 model.
TOLERANCE = dict(rtol=2e-4, atol=2e-4)


def _reset_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


@pytest.fixture(scope="module")
def dynamo():
    def counters() -> dict:
        utils = torch._dynamo.utils
        return {"graph_breaks": sum(utils.counters["graph_break"].values()),
                "frames": utils.counters["stats"]["unique_graphs"]}

    torch._dynamo.reset()
    yield counters
    torch._dynamo.reset()


@pytest.fixture
def fresh_dynamo(dynamo):
    """Each test compiles from scratch: its counters and cache are its own."""
    _reset_dynamo()
    return dynamo


@pytest.fixture(autouse=True)
def pytorch_attention(comfyui_path, monkeypatch):
    """ComfyUI's attention as on a GPU: attention_pytorch, which dynamo traces whole.

    On a CPU ComfyUI picks attention_sub_quad, which reads free memory through psutil
    and so breaks every graph at each attention call: the call then runs eagerly and no
    compiled graph ever holds the attention. Models bind `optimized_attention` by name
    at import, so every binding is replaced for the test."""
    import sys

    import comfy.ldm.modules.attention as attention

    chosen = attention.optimized_attention
    for name, module in list(sys.modules.items()):
        if name.startswith("comfy.ldm") and getattr(module, "optimized_attention", None) is chosen:
            monkeypatch.setattr(module, "optimized_attention", attention.attention_pytorch)


def compile_model(model):
    """TorchCompileModel, as the node runs (inductor; the guard filter of 0.8.0 and newer)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model, "inductor").result[0]


def _served(state) -> dict:
    return state.last_report["served"]


@pytest.mark.parametrize("model_name, calls", [("flux", 4), ("sd15", 28)])
@pytest.mark.parametrize("order", ["compile after node", "node after compile"])
def test_compiled_model_with_node_has_no_extra_graph_break_and_matches_eager(
        pack, tiny, patch, fresh_dynamo, request, model_name, calls, order):
    model = request.getfixturevalue(model_name)
    eager_patched, eager_state = patch(model, "sdpa")
    eager = tiny.sample(eager_patched)
    assert eager_state.last_report["total_calls"] == calls

    # The model compiled without the node: the graph breaks ComfyUI's own code makes here.
    plain_compiled = compile_model(model)
    torch.testing.assert_close(tiny.sample(plain_compiled), eager, **TOLERANCE)
    baseline = fresh_dynamo()

    _reset_dynamo()
    if order == "compile after node":
        patched, state = patch(model, "sdpa")
        compiled = compile_model(patched)
    else:
        compiled, state = patch(compile_model(model), "sdpa")
    first = tiny.sample(compiled)
    cold = fresh_dynamo()
    second = tiny.sample(compiled)
    warm = fresh_dynamo()

    assert baseline["graph_breaks"] == 0, baseline
    assert cold["graph_breaks"] == 0, cold
    assert warm == cold, "the second run recompiled or broke the graph"
    torch.testing.assert_close(first, eager, **TOLERANCE)
    torch.testing.assert_close(second, eager, **TOLERANCE)
    report = state.last_report
    assert report["served"] == {"sdpa": calls} and report["warnings"] == []
    compiled = report["compiled"]
    assert compiled["calls_through_graph"] + compiled["calls_traced_as_sdpa"] == calls
    assert compiled["calls_traced_as_sdpa"] == calls, "plain SDPA plans are traced into the graph"


def test_workflow_sequence_on_one_compiled_model_never_goes_stale(pack, tiny, flux, patch, fresh_dynamo):
    """One compiled model, one process: the node added, changed, removed, re-added, the
    Advanced node, auto_tuned; each run does what its workflow says, none fails."""
    eager = tiny.sample(flux)
    compiled = compile_model(flux)

    def check(out):
        torch.testing.assert_close(out, eager, **TOLERANCE)

    check(tiny.sample(compiled))  # compiled and run without the node first

    with_sdpa, sdpa_state = patch(compiled, "sdpa")
    check(tiny.sample(with_sdpa))
    assert _served(sdpa_state) == {"sdpa": 4}
    # 0.8.0 and newer drop dynamo's guards on transformer_options, so the graph traced
    # without the node is reused and the node recompiles it once; 0.3.64 keeps the guards
    # and dynamo recompiles by itself.
    import comfy_extras.nodes_torch_compile as torch_compile_node
    stale = 1 if hasattr(torch_compile_node, "skip_torch_compile_dict") else 0
    assert sdpa_state.last_report["compiled"]["recompiled_stale_graphs"] == stale

    with_math, math_state = patch(compiled, "sdpa_math")
    check(tiny.sample(with_math))
    assert _served(math_state) == {"sdpa_math": 4}

    check(tiny.sample(compiled))  # the node removed: ComfyUI's own attention, no error
    assert _served(math_state) == {"sdpa_math": 4}  # that node's report is not touched

    again, again_state = patch(compiled, "sdpa")
    check(tiny.sample(again))
    assert _served(again_state) == {"sdpa": 4}
    # The graph traced while the node was gone holds no call of ours: re-adding it traces
    # once more (0.3.64: dynamo's own guards on the override do it).
    assert again_state.last_report["compiled"]["recompiled_stale_graphs"] == stale

    rules = pack.nodes.routing.RoutingRules(first_blocks=1)
    advanced, advanced_state = patch(compiled, "sdpa_math", rules=rules, guard=True)
    check(tiny.sample(advanced))
    report = advanced_state.last_report
    import inspect

    import comfy.ldm.flux.model as flux_model
    if "block_index" in inspect.getsource(flux_model):
        # Flux here: one double and one single block, two steps: the first block's calls go exact.
        assert report["routing"]["exact_by_block_filter"] == 2
        assert report["served"] == {"sdpa": 2, "sdpa_math": 2}
    else:  # 0.3.64's Flux does not say which block a call belongs to: the report says so
        assert report["routing"]["exact_by_block_filter"] == 0
        assert any("block filter could not apply" in warning for warning in report["warnings"])

    window = pack.nodes.routing.RoutingRules(step_start=0.5)
    stepped, stepped_state = patch(compiled, "sdpa_math", rules=window, guard=True)
    check(tiny.sample(stepped))
    report = stepped_state.last_report
    # The first of two steps is outside [0.5, 1): its two calls go exact, decided per model call.
    assert report["routing"]["exact_by_step_window"] == 2
    assert report["served"] == {"sdpa": 2, "sdpa_math": 2}
    assert report["guard"]["nonfinite_model_calls"] == 0

    frames = fresh_dynamo()["frames"]
    tuned, tuned_state = patch(compiled, "auto_tuned")
    check(tiny.sample(tuned))
    assert sum(_served(tuned_state).values()) == 4
    if stale:  # 0.3.64 keeps dynamo's guards on the override: a new node recompiles there, correctly
        assert fresh_dynamo()["frames"] == frames, "changing the node's backend recompiled the model"


def test_two_models_with_different_backends_compiled_in_one_process(pack, tiny, flux, sd15, patch, fresh_dynamo):
    flux_compiled, flux_state = patch(compile_model(flux), "sdpa")
    sd_compiled, sd_state = patch(compile_model(sd15), "sdpa_math")
    for _ in range(2):
        tiny.sample(flux_compiled)
        tiny.sample(sd_compiled)
        assert _served(flux_state) == {"sdpa": 4}
        assert _served(sd_state) == {"sdpa_math": 28}


def test_override_called_from_threads_counts_every_call(pack, tiny, flux, patch):
    """ComfyUI 0.28's multi-GPU sampling calls one model's override from a thread per
    device: counts stay exact, outputs stay right."""
    patched, state = patch(flux, "sdpa")
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    import comfy.ldm.modules.attention as attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2 * 32, generator=generator) for _ in range(3))
    expected = attention.attention_pytorch(q, k, v, 2, _inside_attn_wrapper=True)
    state.begin_run()
    threads, per_thread, wrong = 4, 300, []

    def work() -> None:
        for _ in range(per_thread):
            out = override(attention.attention_pytorch, q, k, v, 2, transformer_options={},
                           _inside_attn_wrapper=True)
            if not torch.allclose(out, expected, rtol=1e-5, atol=1e-5):
                wrong.append(out)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not wrong
    assert state.main.counters().served == {"sdpa": threads * per_thread}


def test_a_contested_call_is_traced_as_sdpa_once_this_machine_measured_sdpa(
        pack, tiny, flux, patch, fresh_dynamo, user_directory, contest_every_call, restart_stores):
    """`auto` times a contested call on its tensors, which a trace does not have: the first
    compiled run serves it through the pack's op (and times it there); once SDPA has won on
    this machine, the next trace runs it as traced SDPA, counted as the saved decision
    reused. A measurement that chose a kernel keeps the op."""
    Measurement = pack.attention.tuning.Measurement
    error = {"rel_l1": 0.0, "cosine": 1.0, "max_abs": 0.0, "nonfinite": 0}

    def measure_as(ms: dict):
        def fake(call, tensors, runs, reference, limits, seconds_left, repeat=None):
            return {name: Measurement(ms=ms[name], error=dict(error)) for name in runs}
        return fake

    eager = tiny.sample(flux)
    compiled, state = patch(compile_model(flux), "auto")
    contest_every_call(state)
    state.measurer._measure = measure_as({"sdpa": 1.0, "sdpa_flash": 1.5})
    torch.testing.assert_close(tiny.sample(compiled), eager, **TOLERANCE)
    report = state.last_report
    assert report["compiled"]["calls_through_graph"] == 4 and report["compiled"]["calls_traced_as_sdpa"] == 0
    assert report["served"] == {"sdpa": 4} and report["auto_measured"]["measured"] >= 1
    assert (user_directory / "attention_backends" / "auto_measured.json").exists()

    _reset_dynamo()  # a new process, or ComfyUI compiling the model again
    again, again_state = patch(compile_model(flux), "auto")
    contest_every_call(again_state)
    torch.testing.assert_close(tiny.sample(again), eager, **TOLERANCE)
    report = again_state.last_report
    assert report["compiled"]["calls_traced_as_sdpa"] == 4 and report["compiled"]["calls_through_graph"] == 0
    measured = report["auto_measured"]
    assert measured["measured"] == 0 and measured["reused"] == len(measured["decisions"]) >= 1
    assert fresh_dynamo()["graph_breaks"] == 0

    # The same on a machine whose measurement chose the kernel: the op serves it.
    user_directory.joinpath("attention_backends", "auto_measured.json").unlink()
    restart_stores()
    _reset_dynamo()
    kernel, kernel_state = patch(compile_model(flux), "auto")
    contest_every_call(kernel_state)
    kernel_state.measurer._measure = measure_as({"sdpa": 1.5, "sdpa_flash": 1.0})
    tiny.sample(kernel)
    _reset_dynamo()
    later, later_state = patch(compile_model(flux), "auto")
    contest_every_call(later_state)
    torch.testing.assert_close(tiny.sample(later), eager, **TOLERANCE)
    report = later_state.last_report
    assert report["served"] == {"sdpa_flash": 4} and report["compiled"]["calls_through_graph"] == 4
    assert report["compiled"]["calls_traced_as_sdpa"] == 0
