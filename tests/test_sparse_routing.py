"""The Sparse node's routing and knobs without ComfyUI: the node's own dispatchers, rules,
step-window hook and override, driven through a simulated sampler run. A fake sparse
kernel on the CPU records every call it gets: it must never see a masked call, a
cross-attention call, a short call, a call outside the step window or in a protected
block."""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from library_support import ROOT

# Imported as a package of its own (relative imports inside), never as `nodes`: a run with
# COMFYUI_PATH set also imports ComfyUI's top-level `nodes` module.
PACK = "attention_backends_sparse_routing"
HEADS, DIM, LONG, SHORT, TEXT = 2, 16, 128, 32, 8


@pytest.fixture(scope="module")
def pack():
    parent = types.ModuleType(PACK)
    parent.__path__ = [ROOT]
    sys.modules[PACK] = parent
    modules = types.SimpleNamespace(**{name: importlib.import_module(f"{PACK}.{path}") for name, path in {
        "attention": "attention", "backend": "attention.backend", "constraints": "attention.constraints",
        "sparse_backends": "attention.backends.sparse", "sparsity": "attention.sparsity",
        "quality": "attention.quality", "sparse": "nodes.sparse", "routing": "nodes.routing",
        "override": "nodes.override", "state": "nodes.state", "report": "nodes.report"}.items()})
    yield modules
    for name in [n for n in sys.modules if n == PACK or n.startswith(PACK + ".")]:
        del sys.modules[name]


class Recorder:
    """The fake sparse kernel: exact attention, every call's shape and mask recorded."""

    def __init__(self, pack, error: float = 0.0) -> None:
        self.error = error
        self.calls: list[dict] = []
        c = pack.constraints
        self.backend = pack.backend.Backend(
            name="sol", family="test", description="fake sparse kernel", quantized=True,
            layouts=(pack.backend.BNHD,),
            constraints=(c.NoMask(), c.KeyHeads(gqa=False), c.SequenceLengths(cross=False), c.MinTokens(64)),
            load=lambda: self.kernel, tunable=False, sparse=True, configure=pack.sparse_backends._bind,
            default_settings=pack.sparsity.SolSettings())

    def kernel(self, q, k, v, mask, scale, layout, **arguments):
        self.calls.append({"tokens": q.shape[1], "keys": k.shape[1], "mask": mask, "arguments": arguments})
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2) * (1.0 + self.error)


@pytest.fixture
def recorder(pack, monkeypatch) -> Recorder:
    made = Recorder(pack)
    monkeypatch.setitem(pack.attention.registry._BY_NAME, "sol", made.backend)
    return made


class Layout:
    """Block positions as Flux/Wan report them in transformer_options."""

    @staticmethod
    def position(options: dict):
        return options["block_index"], options["total_blocks"]


def node(pack, *, step_start=0.25, step_end=0.75, first=1, last=1, budget=0.1, settings=None):
    """What the Sparse node installs: (override, step-window hook, state)."""
    rules = pack.routing.RoutingRules(step_start=step_start, step_end=step_end, first_blocks=first, last_blocks=last)
    policy = pack.quality.QualityPolicy(budget_rel_l1=budget, window=(step_start, step_end), rows=16)
    settings = settings or pack.sparsity.SolSettings()
    main, dense, monitor = pack.sparse.sparse_dispatchers("sol", settings, policy)
    state = pack.state.PatchState(node_id="9", node_type=pack.sparse.NODE_TYPE, selection="sol", strict=False,
                                  main=main, exact=dense, monitor=monitor)
    sparse_rules = pack.sparse.sparse_rules(rules)
    route = pack.routing.build_route(state, sparse_rules, Layout())
    hook = pack.routing.step_window_wrapper(state, sparse_rules, monitor.model_call)
    return pack.override.build_override(state, None, route), hook, state


def tensors(tokens: int, keys: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = tokens if keys is None else keys
    return (torch.randn(1, tokens, HEADS * DIM, generator=g), torch.randn(1, keys, HEADS * DIM, generator=g),
            torch.randn(1, keys, HEADS * DIM, generator=g))


def comfyui_function(*args, **kwargs):
    raise AssertionError("every call has a backend here; ComfyUI's own function is never reached")


def sample(override, hook, steps: int = 4, blocks: int = 4) -> int:
    """A sampler run: per step one model call; per block a long self-attention call, a
    cross-attention call, a masked long call and a short call. Returns the calls made."""
    schedule = torch.linspace(1.0, 0.0, steps + 1)
    made = 0

    def model_call(transformer_options):
        nonlocal made
        for block in range(blocks):
            options = {**transformer_options, "block_index": block, "total_blocks": blocks}
            common = {"transformer_options": options, "_inside_attn_wrapper": True}
            q, k, v = tensors(LONG)
            override(comfyui_function, q, k, v, HEADS, **common)
            q_text, k_text, v_text = tensors(LONG, TEXT)
            override(comfyui_function, q_text, k_text, v_text, HEADS, **common)
            mask = torch.zeros(1, 1, LONG)
            override(comfyui_function, q, k, v, HEADS, mask=mask, **common)
            q_short, k_short, v_short = tensors(SHORT)
            override(comfyui_function, q_short, k_short, v_short, HEADS, **common)
            made += 4

    for step in range(steps):
        hook(lambda transformer_options: model_call(transformer_options),
             transformer_options={"sample_sigmas": schedule, "sigmas": schedule[step:step + 1]})
    return made


def test_sparse_gets_only_long_unmasked_self_attention_inside_the_window_and_blocks(pack, recorder):
    override, hook, state = node(pack)
    state.begin_run()
    made = sample(override, hook)
    # Steps 1 and 2 of 4 (positions 0.25, 0.5) are inside [0.25, 0.75); blocks 1 and 2 of 4
    # are neither first nor last: 2 x 2 long self-attention calls.
    assert len(recorder.calls) == 4
    assert all(c["tokens"] == LONG and c["keys"] == LONG and c["mask"] is None for c in recorder.calls)
    report = pack.report.build_report(state, still_installed=True, model_name="test")
    assert report["total_calls"] == made == 64
    assert report["served"] == {"sdpa": 60, "sol": 4}
    # Outside the window: all 32 calls of steps 0 and 3. Inside: the first/last blocks'
    # 4 calls each; every cross-attention call by the cross rule.
    assert report["routing"] == {"exact_by_step_window": 32, "exact_by_block_filter": 16,
                                 "exact_by_cross_rule": 4}
    # Masked and short calls inside the window reached the sparse dispatcher and fell back, with reasons.
    reasons = {f["reason"] for f in report["fallbacks"] if f["wanted"] == "sol"}
    assert any("takes no mask" in r for r in reasons)
    assert any("32 tokens: sparse attention serves calls from 64 tokens" in r for r in reasons)
    assert report["quality"]["signatures"][0]["over_budget"] is False
    assert report["warnings"] == []
    assert next(row for row in report["plans"] if row["backend"] == "sol")["settings"] == \
        pack.sparsity.SolSettings().describe()


def test_the_sparse_kernel_gets_the_nodes_settings(pack, recorder):
    settings = pack.sparsity.SolSettings(tau=0.9, extra_tokens=64, text_tokens=TEXT)
    override, hook, state = node(pack, settings=settings)
    state.begin_run()
    sample(override, hook)
    assert {str(c["arguments"]) for c in recorder.calls} == {str(
        {"tau": 0.9, "topk_ratio": 0.0, "token_aug": 64, "sink_blocks": [0, 1], "sink_q": [0, 1]})}


def test_a_kernel_over_budget_goes_dense_and_the_report_says_so(pack, recorder):
    recorder.error = 0.25
    override, hook, state = node(pack)
    state.begin_run()
    sample(override, hook)
    report = pack.report.build_report(state, still_installed=True, model_name="test")
    assert len(recorder.calls) == 1 and report["served"] == {"sdpa": 64}
    (row,) = report["quality"]["signatures"]
    assert row["over_budget"] and row["served_instead"] == "sdpa" and row["worst_rel_l1"] == pytest.approx(0.25)
    assert "at 25% of the schedule" in row["reason"]
    assert any("sol went over the error budget" in w for w in report["warnings"])
    summary = pack.report.summary(report)
    assert "quality: 1 sampled calls on 1 signatures, worst rel. L1 0.2500 (budget 0.1), 1 over budget" in summary
    # The next run starts sparse again and checks again.
    recorder.error = 0.0
    state.begin_run()
    sample(override, hook)
    again = pack.report.build_report(state, still_installed=True, model_name="test")
    assert again["served"] == {"sdpa": 60, "sol": 4} and again["warnings"] == []


def test_the_monitor_rechecks_inside_the_window(pack, recorder):
    override, hook, state = node(pack, step_start=0.0, step_end=1.0, first=0, last=0)
    state.begin_run()
    sample(override, hook, steps=8)
    checks = state.monitor.summary()["signatures"][0]["checks"]
    # First calls at step 0, then the checkpoints 1/4, 2/4, 3/4 of the schedule.
    assert [(c["check"], c["position"]) for c in checks] == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]


# ---------------------------------------------------------------- knob validation


def test_input_problems_name_what_is_wrong(pack):
    problems = pack.sparse.input_problems
    assert problems("sol", 512, 0.2, 0.9) == []
    assert problems("sparge", 0, 0.0, 1.0) == []
    assert problems(None, None, None, None) == []  # wired values are checked when the node runs
    assert "sparge cannot keep conditioning tokens exact" in problems("sparge", 256, 0.2, 0.9)[0]
    assert "backend must be one of ['sol', 'sparge']" in problems("flash4", 0, 0.2, 0.9)[0]
    assert "step window" in problems("sol", 0, 0.9, 0.2)[0]
    assert "cannot be negative" in problems("sol", -1, 0.2, 0.9)[0]


def test_a_complete_configuration_is_checked_when_the_node_runs(pack):
    sparse, sparsity, quality = pack.sparse, pack.sparsity, pack.quality
    rules = pack.routing.RoutingRules(step_start=0.2, step_end=0.9, first_blocks=-1)
    settings = sparse.settings_for("sol", sol_tau=-1.0, sol_topk_ratio=0.0, sol_extra_tokens=96, sparge_topk=0.5,
                                   sparge_simthreshd1=-0.1, sparge_pvthreshd=50.0, text_tokens=0,
                                   text_position="middle")
    found = " | ".join(sparse.all_problems("sol", settings, rules, quality.QualityPolicy(budget_rel_l1=math.inf),
                                           0, "middle"))
    for fragment in ("text_position must be one of", "cannot be negative", "error_budget must be",
                     "tau must be a number", "extra_tokens must be 0, 64"):
        assert fragment in found, fragment
    assert isinstance(sparse.settings_for("sparge", sol_tau=0.5, sol_topk_ratio=0.0, sol_extra_tokens=256,
                                          sparge_topk=0.3, sparge_simthreshd1=0.1, sparge_pvthreshd=20.0,
                                          text_tokens=0, text_position="first"), sparsity.SpargeSettings)
    with pytest.raises(ValueError, match="must be one of"):
        sparse.settings_for("flash4", sol_tau=0.5, sol_topk_ratio=0.0, sol_extra_tokens=256, sparge_topk=0.3,
                            sparge_simthreshd1=0.1, sparge_pvthreshd=20.0, text_tokens=0, text_position="first")
