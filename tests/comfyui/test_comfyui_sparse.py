"""The Attention Backend (Sparse) node on real ComfyUI models.

The real sparse kernels need CUDA; here a fake `sol` (exact attention, optionally with a
controlled error, every call recorded) stands in for routing: which calls reach the
sparse kernel under the node's rules, what goes dense, and what the report says.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def _node(name: str):
    import nodes  # ComfyUI's registry, filled by the `pack` fixture's load

    return nodes.NODE_CLASS_MAPPINGS[name]


def _inputs(node_class) -> dict:
    return {entry.id: entry for entry in node_class.GET_SCHEMA().inputs}


class FakeSol:
    """Exact attention times (1 + error) in sol's (B, T, H, D) layout; records every call."""

    def __init__(self, pack, min_tokens: int) -> None:
        self.error = 0.0
        self.calls: list[dict] = []
        attention, c = pack.attention, pack.attention.constraints
        self.backend = attention.Backend(
            name="sol", family="test", description="fake sol", quantized=True, layouts=(attention.backend.BNHD,),
            constraints=(c.NoMask(), c.KeyHeads(gqa=False), c.SequenceLengths(cross=False), c.MinTokens(min_tokens)),
            load=lambda: self.kernel, tunable=False, sparse=True, configure=attention.backends.sparse._bind,
            default_settings=attention.sparsity.SolSettings())

    def kernel(self, q, k, v, mask, scale, layout, **arguments):
        self.calls.append({"tokens": q.shape[1], "keys": k.shape[1], "mask": mask, "arguments": arguments})
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2) * (1.0 + self.error)


@pytest.fixture
def fake_sol(pack, monkeypatch):
    def install(min_tokens: int) -> FakeSol:
        fake = FakeSol(pack, min_tokens)
        monkeypatch.setitem(pack.attention.registry._BY_NAME, "sol", fake.backend)
        return fake
    return install


def _patch(pack, model, *, step_start=0.0, step_end=1.0, first=0, last=0, budget=0.1, settings=None):
    sparse = pack.nodes.sparse
    rules = pack.nodes.routing.RoutingRules(step_start=step_start, step_end=step_end, first_blocks=first,
                                            last_blocks=last)
    policy = pack.attention.quality.QualityPolicy(budget_rel_l1=budget, window=(step_start, step_end))
    return sparse.patch_sparse(model, backend="sol", settings=settings or pack.attention.sparsity.SolSettings(),
                               rules=rules, policy=policy, node_id="21")


def _version(pack) -> tuple[int, ...]:
    return tuple(int(part) for part in pack.nodes.compat.comfyui_version().split(".")[:3])


def test_the_sparse_node_is_registered_with_its_knobs(pack):
    node = _node("AttentionBackendSparse")
    schema = node.GET_SCHEMA()
    assert schema.display_name == "Attention Backend (Sparse)" and schema.category == "model_patches/attention"
    inputs = _inputs(node)
    assert inputs["backend"].options == ["sol", "sparge"] and inputs["backend"].default == "sol"
    assert list(inputs) == ["model", "backend", "sol_tau", "sol_topk_ratio", "sol_extra_tokens", "sparge_topk",
                            "sparge_cdfthreshd", "sparge_simthreshd1", "sparge_pvthreshd", "text_tokens",
                            "text_position", "step_start",
                            "step_end", "exact_first_blocks", "exact_last_blocks", "error_budget"]
    assert all(entry.tooltip for entry in schema.inputs)
    assert (inputs["sol_tau"].default, inputs["step_start"].default, inputs["step_end"].default,
            inputs["error_budget"].default) == (0.5, 0.2, 0.9, 0.1)


def test_the_sparse_node_validates_its_inputs(pack):
    node = _node("AttentionBackendSparse")
    assert node.validate_inputs(backend="sol", text_tokens=512, step_start=0.2, step_end=0.9) is True
    assert node.validate_inputs(backend=None, text_tokens=None, step_start=None, step_end=None) is True
    assert "sparge cannot keep conditioning tokens exact" in node.validate_inputs(
        backend="sparge", text_tokens=512, step_start=0.2, step_end=0.9)
    assert "step window" in node.validate_inputs(backend="sol", text_tokens=0, step_start=0.9, step_end=0.2)


def test_dense_nodes_do_not_offer_sparse_backends(pack):
    basic, advanced = _node("AttentionBackend"), _node("AttentionBackendAdvanced")
    options = _inputs(basic)["backend"].options
    assert "sol" not in options and "sparge" not in options and "sdpa" in options
    message = advanced.validate_inputs(priority="sol > sdpa")
    assert "sol: sparse backends run on the Attention Backend (Sparse) node" in message


def test_flux_self_attention_goes_sparse_only_inside_the_step_window(pack, tiny, flux, fake_sol):
    fake = fake_sol(min_tokens=16)
    plain = tiny.sample(flux, steps=4)
    patched, state = _patch(pack, flux, step_start=0.25, step_end=0.75)
    out = tiny.sample(patched, steps=4)
    report = state.last_report
    # 4 steps, one model call each (cond and uncond batched), 2 joint self-attention calls
    # per model call: steps 1 and 2 are inside [0.25, 0.75).
    assert report["served"] == {"sol": 4, "sdpa": 4}
    assert report["routing"]["exact_by_step_window"] == 4
    assert len(fake.calls) == 4 and all(c["mask"] is None and c["tokens"] == c["keys"] for c in fake.calls)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)  # the fake is exact
    assert report["quality"]["signatures"][0]["over_budget"] is False
    assert report["node_type"] == "AttentionBackendSparse" and report["selection"] == "sol"
    assert report["warnings"] == []


def test_flux_blocks_protected_by_the_block_filter(pack, tiny, flux, fake_sol):
    fake = fake_sol(min_tokens=16)
    patched, state = _patch(pack, flux, last=1)
    tiny.sample(patched, steps=2)
    report = state.last_report
    if _version(pack) >= (0, 8, 0):
        # One double block, then one single block: the single block is the last.
        assert report["served"] == {"sol": 2, "sdpa": 2} and len(fake.calls) == 2
        assert report["routing"]["exact_by_block_filter"] == 2
    else:  # Flux on older ComfyUI does not say which block a call belongs to
        assert report["served"] == {"sol": 4}
        assert any("block filter could not apply" in w for w in report["warnings"])


def test_sd_unet_cross_attention_and_short_calls_stay_dense(pack, tiny, sd15, fake_sol):
    fake = fake_sol(min_tokens=100)
    patched, state = _patch(pack, sd15)
    tiny.sample(patched, steps=2)
    report = state.last_report
    # Per model call: 7 attention blocks; self-attention has 256 tokens in 3 of them (input 1,
    # output 2 and 3) and 64 in the other 4; every block's cross-attention has 8 keys.
    assert report["served"] == {"sdpa": 22, "sol": 6}
    assert report["routing"]["exact_by_cross_rule"] == 14
    assert {c["tokens"] for c in fake.calls} == {256} and all(c["keys"] == 256 for c in fake.calls)
    short = [f for f in report["fallbacks"] if f["wanted"] == "sol"]
    assert sum(f["calls"] for f in short) == 8
    assert "64 tokens: sparse attention serves calls from 100 tokens" in short[0]["reason"]


def test_over_budget_signatures_go_dense_and_the_report_says_so(pack, tiny, sd15, fake_sol):
    fake = fake_sol(min_tokens=100)
    fake.error = 0.5
    patched, state = _patch(pack, sd15)
    tiny.sample(patched, steps=2)
    report = state.last_report
    # The first call of the one 256-token signature was sampled, over budget, and served dense.
    assert len(fake.calls) == 1 and report["served"] == {"sdpa": 28}
    (row,) = report["quality"]["signatures"]
    assert row["over_budget"] and row["served_instead"] == "sdpa" and row["worst_rel_l1"] == pytest.approx(0.5)
    assert any("sol went over the error budget" in w for w in report["warnings"])
    assert any(f["wanted"] == "sol" and "over the error budget 0.1" in f["reason"] for f in report["fallbacks"])


def test_the_node_runs_as_comfyui_runs_it(pack, tiny, flux, fake_sol):
    from comfy_api.latest import io

    fake_sol(min_tokens=16)
    node = type("AttentionBackendSparseRun", (_node("AttentionBackendSparse"),), {})
    node.hidden = io.HiddenHolder.from_dict({io.Hidden.unique_id: "33"})
    inputs = {entry.id: entry.default for entry in node.GET_SCHEMA().inputs if entry.id != "model"}
    inputs.update(exact_first_blocks=0, exact_last_blocks=0, step_start=0.0, step_end=1.0, text_tokens=8)
    patched = node.execute(flux, **inputs).result[0]
    tiny.sample(patched, steps=2)
    report = pack.nodes.report.last_reports()["33"]
    assert report["served"] == {"sol": 4}
    assert report["quality"]["budget_rel_l1"] == 0.1
    with pytest.raises(ValueError, match="sparge cannot keep conditioning tokens exact"):
        node.execute(flux, **{**inputs, "backend": "sparge"})
