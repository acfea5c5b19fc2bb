"""Sparse backends on the CPU: their constraints, their settings reaching the kernel,
`auto` never choosing them, and the quality monitor's decisions with controlled errors
(a fake sparse kernel: exact attention times (1 + error), so its relative L1 is known)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from attention import CallSignature, Dispatcher, quality, registry
from attention.backend import BNHD, Backend
from attention.backends import sparse
from attention.call import MASK_ADDITIVE
from attention.constraints import KeyHeads, MinTokens, NoMask, SequenceLengths
from attention.errors import QUALITY
from attention.priority import AUTO_TABLE, _entries_from_json
from attention.quality import QualityMonitor, QualityPolicy, row_indices, sampled_error
from attention.shapes import by_key
from attention.sparsity import TEXT_LAST, SolSettings, SpargeSettings

B, H, N, D = 1, 2, 128, 16


def sig(**overrides) -> CallSignature:
    base = dict(device_type="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, batch=1, heads_q=40,
                heads_kv=40, seq_q=75600, seq_k=75600, head_dim=128, head_dim_v=128)
    base.update(overrides)
    return CallSignature(**base)


class FakeSparse:
    """A sparse backend on the CPU: exact attention times (1 + error), every call recorded."""

    def __init__(self, name: str = "sol", min_tokens: int = 64) -> None:
        self.error = 0.0
        self.calls: list[dict] = []
        self.backend = Backend(
            name=name, family="test", description="fake sparse kernel", quantized=True, layouts=(BNHD,),
            constraints=(NoMask(), KeyHeads(gqa=False), SequenceLengths(cross=False), MinTokens(min_tokens)),
            load=lambda: self.kernel, tunable=False, sparse=True, configure=sparse._bind,
            default_settings=SolSettings())

    def kernel(self, q, k, v, mask, scale, layout, **arguments):
        assert layout == BNHD and mask is None
        self.calls.append({"tokens": q.shape[1], "arguments": arguments})
        exact = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               scale=scale).transpose(1, 2)
        return exact * (1.0 + self.error)


@pytest.fixture
def fake(extra_backend) -> FakeSparse:
    made = FakeSparse()
    extra_backend(made.backend)
    return made


def qkv(seed: int = 0, tokens: int = N, keys: int | None = None):
    g = torch.Generator().manual_seed(seed)
    keys = tokens if keys is None else keys
    return (torch.randn(B, tokens, H * D, generator=g), torch.randn(B, keys, H * D, generator=g),
            torch.randn(B, keys, H * D, generator=g))


def exact(q, k, v):
    def bhnd(t):
        return t.view(t.shape[0], t.shape[1], H, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(bhnd(q), bhnd(k), bhnd(v))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], H * D)


# ---------------------------------------------------------------- declared constraints


@pytest.mark.parametrize("name", ["sol", "sparge"])
def test_sparse_backends_serve_long_video_self_attention(name):
    for key in ("wan_480p", "wan_720p", "hunyuan_720p"):
        assert registry.get(name).call_reasons(by_key(key).signature()) == [], (name, key)


@pytest.mark.parametrize("name", ["sol", "sparge"])
def test_sparse_backends_refuse_masks_cross_attention_short_calls_and_precision_requests(name):
    def why(**overrides):
        return " | ".join(registry.get(name).call_reasons(sig(**overrides)))

    assert "takes no mask" in why(mask_kind=MASK_ADDITIVE, mask_shape=(1, 1, 75600))
    assert "needs Nq == Nk" in why(seq_k=512)
    assert "sparse attention serves calls from 12288 tokens" in why(seq_q=4608, seq_k=4608)
    assert "as many key heads" in why(heads_kv=8)
    assert "takes bfloat16/float16" in why(dtype=torch.float32)
    assert "runs on cuda only" in why(device_type="cpu", compute_capability=None)
    assert "low_precision_attention=False" in why(low_precision_ok=False)
    assert "attn_precision=float32" in why(attn_precision=torch.float32)


def test_sparse_backends_head_dims_and_gpu_architectures():
    sol, sparge = registry.get("sol"), registry.get("sparge")
    assert sol.call_reasons(sig(head_dim=64, head_dim_v=64)) == ["head dim 64 not in [128]"]
    assert sparge.call_reasons(sig(head_dim=64, head_dim_v=64)) == []
    assert sparge.call_reasons(sig(head_dim=96, head_dim_v=96)) == ["head dim 96 not in [64, 128]"]
    assert sol.call_reasons(sig(compute_capability=(7, 5))) == ["needs sm80 or newer, this GPU is sm75"]
    assert sol.call_reasons(sig(compute_capability=(12, 0))) == []
    # SpargeAttention is built for sm80/86/87/89/90 only.
    assert sparge.call_reasons(sig(compute_capability=(8, 6))) == []
    assert sparge.call_reasons(sig(compute_capability=(10, 0))) == ["supports up to sm90, this GPU is sm100"]


def test_sparse_backends_are_declared_as_such_and_never_tuned():
    assert registry.sparse_names() == ["sol", "sparge"]
    for backend in registry.all_backends():
        assert backend.sparse == (backend.name in ("sol", "sparge"))
        if backend.sparse:
            assert not backend.tunable and not backend.exact and backend.configure is not None


# ---------------------------------------------------------------- auto never chooses them


def test_auto_never_lists_a_sparse_backend_on_any_device():
    sparse_set = set(registry.sparse_names())
    for device_class, entries in AUTO_TABLE.items():
        assert not sparse_set & {entry.backend for entry in entries}, device_class
    for capability in [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)]:
        for name in ("auto", "auto_tuned"):
            candidates = Dispatcher(name).candidates(sig(compute_capability=capability))
            assert not sparse_set & {c.name for c in candidates}, (name, capability)


def test_an_auto_table_override_cannot_bring_in_a_sparse_backend():
    with pytest.raises(ValueError, match="sparse backend: auto never chooses one"):
        _entries_from_json({"sm90": [{"backend": "sol", "min_tokens": 16384}]})


def test_auto_tuned_never_measures_a_sparse_backend_even_when_it_runs(fake):
    q, k, v = qkv()
    call = sig(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=B, heads_q=H, heads_kv=H,
               seq_q=N, seq_k=N, head_dim=D, head_dim_v=D)
    assert fake.backend.call_reasons(call) == []
    assert "sol" not in Dispatcher("auto_tuned").eligible(call, (q, k, v, None, None))


# ---------------------------------------------------------------- settings


def test_sol_settings_name_their_problems():
    assert SolSettings().problems() == []
    assert SolSettings(tau=1.3, topk_ratio=0.1, extra_tokens=0, text_tokens=512).problems() == []
    problems = " | ".join(SolSettings(tau=-1, topk_ratio=1.0, extra_tokens=100, text_tokens=-5,
                                      text_position="middle").problems())
    for fragment in ("tau must be a number >= 0", "topk_ratio must be 0", "extra_tokens must be 0, 64",
                     "text_tokens cannot be negative", "text_position must be one of"):
        assert fragment in problems
    assert SolSettings(tau=math.nan).problems()


def test_sparge_settings_name_their_problems():
    assert SpargeSettings().problems() == []
    problems = " | ".join(SpargeSettings(topk=0.0, simthreshd1=2.0, pvthreshd=0, cdfthreshd=1.5).problems())
    for fragment in ("topk must be in [0.05, 1]", "cdfthreshd must be 0", "simthreshd1", "pvthreshd"):
        assert fragment in problems
    # Below 0.05 the top-k keeps no 128-token key block at the 12288-token floor (int(topk x 96)).
    assert SpargeSettings(topk=0.01).problems()


def test_sparge_settings_set_exactly_one_of_its_selections():
    # spas_sage2_attn_meansim_topk_cuda asserts that one of topk and cdfthreshd is None.
    assert SpargeSettings().kernel_arguments(75600) == {"topk": 0.5, "cdfthreshd": None, "simthreshd1": -0.1,
                                                        "pvthreshd": 50.0}
    by_mass = SpargeSettings(topk=0.3, cdfthreshd=0.98, simthreshd1=0.6)
    assert by_mass.problems() == []
    assert by_mass.kernel_arguments(75600) == {"topk": None, "cdfthreshd": 0.98, "simthreshd1": 0.6,
                                               "pvthreshd": 50.0}
    assert by_mass.describe().startswith("cdf 0.98") and SpargeSettings().describe().startswith("top-k 0.5")


def test_sol_sinks_cover_the_conditioning_tokens_in_whole_blocks():
    assert SolSettings().sinks(75600) == ([0, 0], [0, 0])
    assert SolSettings(text_tokens=512).sinks(4608) == ([0, 8], [0, 8])
    assert SolSettings(text_tokens=300).sinks(4608) == ([0, 5], [0, 5])
    # Last: 4096 image tokens then 300 text tokens; the block holding token 4096 is included.
    assert SolSettings(text_tokens=300, text_position=TEXT_LAST).sinks(4396) == ([64, 69], [64, 69])
    assert SolSettings(text_tokens=10_000).sinks(640) == ([0, 10], [0, 10])


def test_the_dispatcher_binds_the_nodes_settings_into_the_kernel(fake):
    settings = SolSettings(tau=0.7, extra_tokens=128, text_tokens=64)
    dispatcher = Dispatcher(["sol", "sdpa"], settings={"sol": settings})
    q, k, v = qkv()
    out = dispatcher(q, k, v, H)
    torch.testing.assert_close(out, exact(q, k, v))
    assert fake.calls[-1]["arguments"] == {"tau": 0.7, "topk_ratio": 0.0, "token_aug": 128,
                                           "sink_blocks": [0, 1], "sink_q": [0, 1]}
    assert dispatcher.plans()[0].settings is settings
    # Named without settings: the backend's defaults.
    Dispatcher(["sol"])(q, k, v, H)
    assert fake.calls[-1]["arguments"]["tau"] == SolSettings().tau


def test_the_dispatcher_refuses_settings_that_cannot_work(fake):
    with pytest.raises(ValueError, match="takes no settings"):
        Dispatcher(["sdpa"], settings={"sdpa": SolSettings()})
    with pytest.raises(ValueError, match="must be SolSettings, not SpargeSettings"):
        Dispatcher(["sol"], settings={"sol": SpargeSettings()})
    with pytest.raises(ValueError, match="tau must be"):
        Dispatcher(["sol"], settings={"sol": SolSettings(tau=-1.0)})


# ---------------------------------------------------------------- the quality monitor


def monitored(budget: float = 0.1, calls_per_check: int = 2, rechecks: int = 2,
              window: tuple[float, float] = (0.0, 1.0)) -> tuple[Dispatcher, QualityMonitor]:
    monitor = QualityMonitor(QualityPolicy(budget_rel_l1=budget, rows=32, calls_per_check=calls_per_check,
                                           rechecks=rechecks, window=window))
    return Dispatcher(["sol", "sdpa"], settings={"sol": SolSettings()}, monitor=monitor), monitor


@pytest.fixture
def check_counter(monkeypatch):
    """Counts the monitor's sampled comparisons (each one is one device synchronisation)."""
    counted = {"calls": 0}

    def counting(*args, **kwargs):
        counted["calls"] += 1
        return sampled_error(*args, **kwargs)

    monkeypatch.setattr(quality, "sampled_error", counting)
    return counted


def model_call(dispatcher: Dispatcher, monitor: QualityMonitor, position: float, calls: int = 8) -> list:
    monitor.model_call(position)
    q, k, v = qkv()
    return [dispatcher(q, k, v, H) for _ in range(calls)]


def test_within_budget_the_first_calls_and_each_checkpoint_are_sampled_and_nothing_else(fake, check_counter):
    dispatcher, monitor = monitored()
    fake.error = 0.01
    for position in (0.0, 0.25, 0.5, 0.75):
        model_call(dispatcher, monitor, position)
    assert check_counter["calls"] == 6  # 2 first calls + 2 at each of the checkpoints 1/3 and 2/3
    assert dispatcher.counters().served == {"sol": 32}
    summary = monitor.summary()
    (row,) = summary["signatures"]
    assert [(c["check"], c["position"], c["calls"]) for c in row["checks"]] == [(0, 0.0, 2), (1, 0.5, 2), (2, 0.75, 2)]
    assert row["worst_rel_l1"] == pytest.approx(0.01, rel=1e-3)
    assert row["over_budget"] is False and row["served_instead"] is None
    assert summary["sampled_calls"] == 6 and monitor.warnings() == []


def test_rechecks_spread_over_the_calls_of_one_model_call(fake):
    dispatcher, monitor = monitored(calls_per_check=4, rechecks=1)
    fake.error = 0.01
    model_call(dispatcher, monitor, 0.0, calls=20)
    model_call(dispatcher, monitor, 0.6, calls=20)
    ordinals = [s.ordinal for s in monitor._watches[0].samples]
    assert ordinals == [0, 1, 3, 7, 2, 7, 12, 17]  # first: 1st/2nd/4th/8th; then evenly over the 20


def test_over_budget_on_the_first_call_goes_dense_at_once(fake, check_counter):
    dispatcher, monitor = monitored()
    fake.error = 0.3
    outs = model_call(dispatcher, monitor, 0.0)
    q, k, v = qkv()
    for out in outs:  # the call in flight included: exact attention served it
        torch.testing.assert_close(out, exact(q, k, v))
    assert check_counter["calls"] == 1
    counters = dispatcher.counters()
    assert counters.served == {"sdpa": 8} and len(fake.calls) == 1
    (fallback,) = counters.fallbacks
    assert fallback.wanted == "sol" and fallback.served_by == "sdpa"
    assert "relative L1 0.3000 over the error budget 0.1" in fallback.reason
    plan = next(p for p in dispatcher.plans() if p.calls)
    assert [r.kind for r in plan.rejected] == [QUALITY]
    (row,) = monitor.summary()["signatures"]
    assert row["over_budget"] and row["served_instead"] == "sdpa"
    (warning,) = monitor.warnings()
    assert "sol went over the error budget" in warning and "sdpa served these calls for the rest of the run" in warning


def test_an_error_that_grows_later_is_caught_at_a_checkpoint(fake):
    dispatcher, monitor = monitored()
    fake.error = 0.02
    model_call(dispatcher, monitor, 0.0)
    model_call(dispatcher, monitor, 0.2)
    fake.error = 0.5
    model_call(dispatcher, monitor, 0.4)  # checkpoint 1/3: caught here
    model_call(dispatcher, monitor, 0.8)
    served = dispatcher.counters().served
    # 16 calls on sol, then the checkpoint model call: 2 calls before its first sampled
    # ordinal (8 / 2 * 0.5 = 2) on sol, the sampled one and the rest dense.
    assert served == {"sol": 18, "sdpa": 14}
    (row,) = monitor.summary()["signatures"]
    assert row["reason"].startswith("relative L1 0.5000 over the error budget 0.1 (at 40% of the schedule")


def test_non_finite_output_goes_dense(fake):
    dispatcher, monitor = monitored(budget=10.0)
    fake.error = math.nan
    outs = model_call(dispatcher, monitor, 0.0, calls=2)
    assert all(torch.isfinite(out).all() for out in outs)
    assert "non-finite values" in monitor.summary()["signatures"][0]["reason"]


def test_each_run_starts_sparse_and_checks_again(fake, check_counter):
    dispatcher, monitor = monitored()
    fake.error = 0.3
    model_call(dispatcher, monitor, 0.0)
    assert dispatcher.counters().served == {"sdpa": 8}
    monitor.begin_run()
    fake.error = 0.01
    model_call(dispatcher, monitor, 0.0)
    assert dispatcher.counters().served == {"sol": 8}
    assert check_counter["calls"] == 3 and monitor.summary()["signatures"][0]["over_budget"] is False


def test_plans_of_dense_backends_are_not_watched(fake, check_counter):
    dispatcher, monitor = monitored()
    q, k, v = qkv(tokens=32)  # below the fake's 64-token floor: sdpa serves it
    for _ in range(4):
        dispatcher(q, k, v, H)
    assert dispatcher.counters().served == {"sdpa": 4}
    assert check_counter["calls"] == 0 and monitor.summary()["signatures"] == []


def test_sampled_error_reads_rows_in_every_call_form():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, H, 50, D, generator=g) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    call = CallSignature("cpu", None, torch.float32, 2, H, H, 50, 50, D, D, layout_in="B,H,N,D",
                         layout_out="B,H,N,D")
    rows = row_indices(50, 8, q.device)
    assert sampled_error(call, q, k, v, None, out, rows)[0] < 1e-6
    flat = dataclasses.replace(call, layout_out="B,N,H*D")
    flat_out = out.transpose(1, 2).reshape(2, 50, H * D)
    rel_l1, cosine, nonfinite = sampled_error(flat, q, k, v, None, flat_out * 1.25, rows)
    assert rel_l1 == pytest.approx(0.25, rel=1e-4) and cosine == pytest.approx(1.0) and nonfinite == 0
    assert rows.tolist() == [0, 7, 14, 21, 28, 35, 42, 49]


def test_the_policy_names_its_problems():
    assert QualityPolicy().problems() == []
    assert QualityPolicy(window=(0.2, 0.9)).checkpoints() == pytest.approx((0.375, 0.55, 0.725))
    assert "error budget" in QualityPolicy(budget_rel_l1=0).problems()[0]
    assert "step window" in QualityPolicy(window=(0.5, 0.5)).problems()[0]
    with pytest.raises(ValueError, match="quality monitor"):
        QualityMonitor(QualityPolicy(rows=0))


# ---------------------------------------------------------------- the real sol adapter


def test_the_sol_adapter_calls_comfy_kitchen_as_its_docs_say_from_both_call_forms(extra_backend):
    """comfy-kitchen's eager reference of sol_attn runs on a CPU: the real adapter, with
    its constraints relaxed to the CPU, against sol_attn called by hand on (B, T, H, 128)."""
    kitchen = pytest.importorskip("comfy_kitchen")
    if not hasattr(kitchen, "sol_attn"):
        pytest.skip(f"comfy-kitchen {getattr(kitchen, '__version__', '?')} has no sol_attn")
    extra_backend(dataclasses.replace(registry.get("sol"), constraints=(), probe=None, _availability=None,
                                      _kernel=None))
    g = torch.Generator().manual_seed(5)
    batch, tokens, heads, dim = 1, 320, 2, 128
    q, k, v = (torch.randn(batch, tokens, heads, dim, generator=g) for _ in range(3))
    settings = SolSettings(tau=0.8, extra_tokens=0, text_tokens=100, text_position=TEXT_LAST)
    by_hand = kitchen.sol_attn(q, k, v, tau=0.8, sink_blocks=[3, 5], sink_q=[3, 5], topk_ratio=0.0, token_aug=0)
    dispatcher = Dispatcher(["sol"], settings={"sol": settings}, strict=True)
    flat = dispatcher(q.flatten(2), k.flatten(2), v.flatten(2), heads)
    torch.testing.assert_close(flat, by_hand.flatten(2))
    heads_first = dispatcher(*(t.transpose(1, 2) for t in (q, k, v)), heads, skip_reshape=True,
                             skip_output_reshape=True)
    torch.testing.assert_close(heads_first, by_hand.transpose(1, 2))
    # Every block a sink: exact attention.
    everything = Dispatcher(["sol"], settings={"sol": SolSettings(text_tokens=tokens, extra_tokens=0)})
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(everything(q.flatten(2), k.flatten(2), v.flatten(2), heads), dense.flatten(2),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the GPU benchmark's smoke mode


def test_the_sparse_benchmark_smoke_run_writes_its_tables(tmp_path, monkeypatch):
    import importlib.util
    import json
    import os
    import sys

    from library_support import ROOT

    spec = importlib.util.spec_from_file_location("sparse_benchmark", os.path.join(ROOT, "benchmarks", "sparse.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    # With comfy-kitchen installed, --smoke swaps its CPU reference in for `sol`: undone after.
    monkeypatch.setitem(registry._BY_NAME, "sol", registry.get("sol"))
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--smoke", "--budget", "0.1", "--reps", "1",
                        "--shapes", "hunyuan_smoke"]) == 0
    data = json.loads((tmp_path / "sparse.json").read_text())
    rows = {row["label"]: row for row in data["rows"]}
    assert rows["sdpa"]["ms"] > 0 and rows["sdpa"]["error"]["rel_l1"] < 1e-5
    assert rows["sdpa (timed again)"]["speedup"] > 0
    assert rows["quality check (256 rows, one sync)"]["ms"] > 0
    assert rows["sage2 fp8 sm90"]["status"] in ("unavailable", "unsupported")
    assert data["shapes"][0]["tokens"] == 16 + 3 * 6 * 8 and data["input_model"]["noise"] == 0.5
    assert "Noise floor: SDPA timed twice" in (tmp_path / "sparse.md").read_text()


def test_a_source_build_without_install_metadata_is_found(tmp_path, monkeypatch):
    """SpargeAttn built in place and put on the path has no install metadata: the backend
    still finds it (and says it is a source build) rather than calling it not installed."""
    from attention.backend import UNVERSIONED, Package

    package_dir = tmp_path / "sourcebuilt_kernel_pkg"
    package_dir.mkdir()
    (package_dir / "__init__.py").write_text("def attend(q, k, v):\n    return q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = Backend(name="sourcebuilt_test", family="test", description="test", quantized=False,
                      layouts=(BNHD,), constraints=(), package=Package("sourcebuilt_kernel_pkg", "sourcebuilt-kernel-pkg", None, "build it from source"),
                      load=lambda: __import__("sourcebuilt_kernel_pkg").attend)
    availability = backend.availability()
    assert availability.available, availability.reasons
    assert availability.version == UNVERSIONED

    missing = Backend(name="missing_test", family="test", description="test", quantized=False,
                      layouts=(BNHD,), constraints=(), package=Package("no_such_kernel_pkg", "no-such-kernel-pkg", None, "build it from source"),
                      load=lambda: __import__("no_such_kernel_pkg"))
    assert not missing.availability().available
    assert "no-such-kernel-pkg is not installed (build it from source)" in missing.availability().reasons[0]
