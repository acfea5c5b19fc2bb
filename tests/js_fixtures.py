"""The JSON fixtures of the web extension's tests (tests/js/fixtures/), made by the code
that makes the real JSON: the status route's `status()` and the run report's
`build_report()`, on a simulated machine so the files are the same wherever they are
made (which packages are installed, which GPUs are visible, the torch version, the
clock). tests/test_js_fixtures.py fails when a committed file differs from what this
makes; `python tests/js_fixtures.py` rewrites them.

Simulated, and nothing else: package versions and availability of the GPU backends
(their self-tests need the GPU), the device list, torch/CUDA/cuDNN versions, the
tuning machine's fingerprint, the file paths shown, and the report's clock. Every
field, reason and decision is what the pack's own code builds from those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import json
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "js" / "fixtures"
H200_TUNING = ROOT / "benchmarks" / "results" / "h200" / "tuning.json"
RUN12_HELDOUT = ROOT / "benchmarks" / "results" / "h200" / "heldout" / "run12" / "heldout.json"
PACKAGE = "attention_backends_fixtures"
# Where the fixtures say the tuning file is (the ComfyUI user directory of a made-up user).
SHOWN_TUNING_FILE = "/home/me/ComfyUI/user/attention_backends/tuning.json"
SHOWN_CALIBRATION_FILE = "<ComfyUI user directory>/attention_backends/calibration.json"
STARTED_AT = 1763700000.0

CPU = dict(torch="2.13.0+cpu", cuda=None, cudnn=None, devices=[("cpu", "CPU", None, None)], available={})
H200 = ("cuda", "NVIDIA H200", (9, 0), 0)
GPU_VERSIONS = {"sdpa": "2.11.0+cu130", "sdpa_flash": "2.11.0+cu130", "sdpa_efficient": "2.11.0+cu130",
                "sdpa_cudnn": "2.11.0+cu130", "sdpa_math": "2.11.0+cu130", "flex": "2.11.0+cu130",
                "flash4": "4.0.0b36", "kitchen_int8": "0.2.40"}
TWO_H200 = dict(torch="2.11.0+cu130", cuda="13.0", cudnn=91900, available=GPU_VERSIONS,
                devices=[H200, ("cuda", "NVIDIA H200", (9, 0), 1)])
ONE_H200 = dict(TWO_H200, devices=[H200])

# Priority texts whose reading the browser must share with the nodes (priority_list.parse_priority).
PRIORITY_TEXTS = ["auto", "auto_tuned", "flash4 > sage > sdpa", "flash4>sage, sdpa", " flash4 ,sdpa ",
                  "auto_tuned > sdpa", "sdpa > auto", "head_parallel > auto_tuned > auto", "sdpa > auto > sdpa",
                  "flash4 sdpa", "flash4 | sdpa", "flash4; sdpa", "flash5 > sdpa", "flash5 > bogus > sdpa", "SDPA",
                  "AUTO", "auto tuned", "", " > , ", "sdpa >> sage", "flash4,,sdpa"]


def pack() -> types.ModuleType:
    """The repository as a package (its nodes import `..attention`), without running its
    entry point: that is ComfyUI's to import."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    return sys.modules[PACKAGE]


def module(name: str) -> types.ModuleType:
    pack()
    return importlib.import_module(f"{PACKAGE}.{name}")


@contextlib.contextmanager
def simulated_machine(torch: str, cuda: Optional[str], cudnn: Optional[int], devices: list,
                      available: dict[str, str]) -> Iterator[None]:
    """No optional package installed and no GPU to probe; the backends in `available`
    (name -> version) run; `devices` are what the status describes."""
    backend_module, registry = module("attention.backend"), module("attention.registry")
    status_module, tuning_store = module("attention.status"), module("attention.tuning_store")
    import torch as torch_module

    backends = registry.all_backends()
    for backend in backends:
        backend.reset_availability()
    fingerprint = _h200_fingerprint() if devices[0][0] == "cuda" else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(backend_module, "installed_version", lambda distribution: None))
        stack.enter_context(mock.patch.object(torch_module.cuda, "is_available", lambda: devices[0][0] == "cuda"))
        stack.enter_context(mock.patch.object(torch_module.cuda, "device_count", lambda: len(devices)))
        stack.enter_context(mock.patch.object(torch_module, "__version__", torch))
        stack.enter_context(mock.patch.object(torch_module.version, "cuda", cuda))
        stack.enter_context(mock.patch.object(torch_module.backends.cudnn, "is_available", lambda: cudnn is not None))
        stack.enter_context(mock.patch.object(torch_module.backends.cudnn, "version", lambda: cudnn))
        stack.enter_context(mock.patch.object(torch_module.cuda, "get_device_capability",
                                              lambda index=0: devices[index][2]))
        stack.enter_context(mock.patch.object(status_module, "visible_devices", lambda: list(devices)))
        # The GPUs as PyTorch would list them, all peers, no nvidia-smi, no link timed yet.
        parallel, heads = module("attention.parallel.status"), module("attention.parallel.heads")
        gpus = [{"index": index, "name": name, "memory_gib": 139.8, "capability": "%d.%d" % capability}
                for kind, name, capability, index in devices if kind == "cuda"]
        stack.enter_context(mock.patch.object(parallel, "visible_gpus", lambda: gpus))
        stack.enter_context(mock.patch.object(parallel, "peer_matrix", lambda: [[True] * len(gpus)] * len(gpus)))
        stack.enter_context(mock.patch.object(parallel, "topology_links", dict))
        stack.enter_context(mock.patch.object(parallel, "nvidia_smi_topology", lambda: None))
        stack.enter_context(mock.patch.object(parallel, "measured_links", list))
        stack.enter_context(mock.patch.object(parallel, "default_group", lambda: heads.HeadGroup(
            [f"cuda:{gpu['index']}" for gpu in gpus], measure_links=False)))
        # No calibration on the simulated machine: auto decides by the cost model shipped
        # for the GPU class (or the rule table where none is shipped).
        cost_store = module("attention.cost_store")
        stack.enter_context(mock.patch.object(cost_store, "calibrated_model", lambda device_type, capability: None))
        stack.enter_context(mock.patch.object(cost_store, "_calibration_files", lambda: [SHOWN_CALIBRATION_FILE]))
        stack.enter_context(mock.patch.object(
            tuning_store, "fingerprint",
            lambda device: fingerprint if device.type == "cuda" else _cpu_fingerprint(torch)))
        for backend in backends:
            if backend.name in available:
                backend._availability = module("attention").Availability(True, available[backend.name], ())
            else:
                backend.availability()  # the real checks, with no package installed and no GPU
        try:
            yield
        finally:
            for backend in backends:
                backend.reset_availability()
            tuning_store.forget_loaded_stores()


def _h200_fingerprint() -> dict:
    return json.loads(H200_TUNING.read_text())["machines"][0]["fingerprint"]


def _cpu_fingerprint(torch_version: str) -> dict:
    return {"gpu": "cpu", "capability": None, "driver": None, "torch": torch_version, "cuda": None, "cudnn": None,
            "packages": {}}


def status(machine: dict, tuning_file: Path) -> dict:
    """GET /attention_backends/status on `machine`, with `tuning_file` as the tuning file."""
    routes, tuning = module("nodes.routes"), module("nodes.tuning")
    with simulated_machine(**machine), mock.patch.object(tuning, "tuning_file", lambda: str(tuning_file)):
        result = routes.status()
    # The files as a user's ComfyUI shows them, not where this checkout is.
    result["tuning"]["file"] = SHOWN_TUNING_FILE
    result["auto_measured"]["file"] = SHOWN_TUNING_FILE.replace("tuning.json", "auto_measured.json")
    return result


class _Clock:
    """report.py's view of the time module: the run took `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def time(self) -> float:
        return STARTED_AT + self.seconds


def _state(priority: list[str], *, node_id: str, selection: str, node_type: str = "AttentionBackend",
           strict: bool = False, tuner: Any = None, measurer: Any = None) -> Any:
    dispatch, state_module = module("attention.dispatch"), module("nodes.state")
    state = state_module.PatchState(node_id=node_id, node_type=node_type, selection=selection, strict=strict,
                                    main=dispatch.Dispatcher(priority, strict=strict, tuner=tuner,
                                                             measurer=measurer, measure_contested=measurer is not None))
    state.started_at = STARTED_AT
    return state


def _serve(state: Any, call: Any, calls: int, decision: Any = None, tuned_by: str = "auto_tuned") -> None:
    """`calls` calls of signature `call` as the dispatcher plans them (no tensors: no kernel
    runs), or as `decision` (measured by the strategy `tuned_by`) chose."""
    dispatcher = state.main
    plan = dispatcher.plan_for(call)
    if decision is not None:
        plan = module("attention.dispatch").Plan(module("attention.registry").get(decision.backend), call, (),
                                                  None, tuning=decision, tuned_by=tuned_by)
    plan.counter = itertools.count(calls)
    mask_serving = module("attention.mask_serving")
    if call.mask_kind != module("attention.call").MASK_NONE:
        plan.mask_service = mask_serving.KEPT  # a mask the classifier cannot drop goes to the kernel
    dispatcher._plans[(call,)] = plan


def report(state: Any, model: str, seconds: float, **kwargs: Any) -> dict:
    report_module = module("nodes.report")
    with mock.patch.object(report_module, "time", _Clock(seconds)):
        return report_module.build_report(state, still_installed=True, model_name=model, **kwargs)


def _shape(key: str, **changes: Any) -> Any:
    shapes = module("attention.shapes")
    signature = next(s for s in shapes.MODEL_SHAPES if s.key == key).signature("cuda", (9, 0), torch.bfloat16)
    return dataclasses.replace(signature, **changes)


def report_flux() -> dict:
    """Flux on an H200 with flash4 named: long calls on flash4, masked ones fall back to sdpa."""
    with simulated_machine(**ONE_H200):
        state = _state(["flash4", "auto"], node_id="12", selection="flash4")
        _serve(state, _shape("flux_1024"), 1440)
        _serve(state, _shape("flux_1024", mask_kind="additive", mask_shape=(1, 1, 4608, 4608)), 80)
        return report(state, "Flux", 3.2)


def report_never_invoked() -> dict:
    """A node inside a subgraph whose model never called the override."""
    with simulated_machine(**ONE_H200):
        return report(_state(["sage", "auto"], node_id="5:3", selection="sage"), "HunyuanDiT", 0.8)


def report_auto_tuned() -> dict:
    """An SDXL run with auto_tuned: decisions of the committed H200 file, two measured this
    run, one reused, one shape left to auto because the run's budget was spent."""
    tuning = module("attention.tuning")
    saved = json.loads(H200_TUNING.read_text())["machines"][0]["decisions"]
    shapes = {"self_1024": _shape("sdxl_l2"), "cross": _shape("sdxl_cross"),
              "self_4096": _shape("sdxl_l1"), "cross_4096": _shape("sdxl_l1", seq_k=77)}
    with simulated_machine(**ONE_H200):
        tuner = tuning.Tuner(SHOWN_TUNING_FILE, limits=tuning.Limits(), measure=_no_measuring)
        decisions = {}
        for name, source in (("self_4096", tuning.MEASURED), ("cross", tuning.MEASURED), ("self_1024", tuning.SAVED)):
            key = tuning.signature_key(shapes[name])
            decisions[name] = dataclasses.replace(tuning.Decision.from_saved(key, saved[key]), source=source)
        state = _state([module("attention.registry").AUTO_TUNED], node_id="12", selection="auto_tuned", tuner=tuner)
        # What this run's tuner did (the state's run began: its record is empty until now).
        tuner.decisions = [decisions["self_4096"], decisions["cross"], decisions["self_1024"]]
        tuner.over_budget = [tuning.signature_key(shapes["cross_4096"])]
        tuner.run_spent_s = 0.286
        for name, calls in (("self_1024", 600), ("cross", 400), ("self_4096", 200)):
            _serve(state, shapes[name], calls, decisions[name])
        _serve(state, shapes["cross_4096"], 200)
        return report(state, "SDXL", 4.1)


def report_auto_measured() -> dict:
    """A Wan 2.1 1.3B run (480p, 81 frames, CFG) with `auto` on an H200 whose self-attention
    call (2x12 heads, 32760 tokens) the model cannot separate between Sage 2 fp8 and FA4, so
    it was timed once this run: FA4 measured 2.5% ahead, inside the 2.6% floor of the model's
    choice timed twice, so Sage 2 fp8 stayed. The decision is run12's, as measured
    (heldout/run12/heldout.json, contested_decisions); the cross-attention call is the
    model's choice, never timed."""
    tuning = module("attention.tuning")
    self_attention = _shape("wan_480p", heads_q=12, heads_kv=12)
    cross = _shape("wan_480p", heads_q=12, heads_kv=12, seq_k=512)
    key = tuning.signature_key(self_attention)
    saved = json.loads(RUN12_HELDOUT.read_text())["contested_decisions"]["auto (model, contested measured)"][key]
    decision = dataclasses.replace(tuning.Decision.from_saved(key, saved), source=tuning.MEASURED)
    with simulated_machine(**ONE_H200):
        measurer = tuning.Tuner(SHOWN_TUNING_FILE.replace("tuning.json", tuning.AUTO_MEASURED_FILE),
                                limits=tuning.Limits(), measure=_no_measuring)
        state = _state([module("attention.registry").AUTO], node_id="7", selection="auto", measurer=measurer)
        measurer.decisions = [decision]
        measurer.run_spent_s = decision.tuning_ms / 1e3
        _serve(state, self_attention, 1200, decision, tuned_by="auto")
        _serve(state, cross, 1200)
        return report(state, "WAN21", 31.8)


def _no_measuring(*args: Any, **kwargs: Any) -> dict:
    raise AssertionError("the fixtures' tuner measures nothing: its decisions are the committed ones")


@contextlib.contextmanager
def _raising_sage() -> Iterator[None]:
    """`sage` as a kernel that raises on every call (registered for the block only), and
    no failure remembered before or after."""
    dispatch, registry = module("attention.dispatch"), module("attention.registry")
    backend_module, constraints = module("attention.backend"), module("attention.constraints")

    def broken(*args: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    backend = backend_module.Backend(
        name="sage", family="sage", description="a kernel that raises", quantized=True,
        layouts=(backend_module.BHND,), constraints=(constraints.Exactness(quantized=True),), load=lambda: broken)
    dispatch.forget_failures()
    with mock.patch.dict(registry._BY_NAME, {"sage": backend}):
        try:
            yield
        finally:
            dispatch.forget_failures()


def kernel_failures() -> dict:
    """The status route's kernel_failures after a kernel raised: once on one call shape
    (tried again at the next run), RETRY_LIMIT times on another (off until cleared)."""
    dispatch, failures = module("attention.dispatch"), module("nodes.failures")
    once, repeated = torch.zeros(1, 16, 64), torch.zeros(1, 32, 64)
    with _raising_sage():
        attend = dispatch.Dispatcher(["sage", "sdpa"])
        attend(once, once, once, 2)
        for _ in range(dispatch.RETRY_LIMIT):
            attend.begin_run()
            attend(repeated, repeated, repeated, 2)
        return failures.failures_status()


def report_kernel_failed() -> dict:
    """A run on the CPU whose sage kernel raised on its first call: the rest of the run on sdpa."""
    q = torch.zeros(1, 16, 64)
    with _raising_sage():
        state = _state(["sage", "sdpa"], node_id="4", selection="sage > sdpa", node_type="AttentionBackendAdvanced")
        for _ in range(3):
            state.main(q, q, q, 2)
        return report(state, "Flux", 0.5)


def priority_cases() -> list[dict]:
    contract = module("attention.contract")
    return [contract.priority_case(text) for text in PRIORITY_TEXTS]


BUILDERS: dict[str, Callable[[], Any]] = {
    "status_cpu.json": lambda: status(CPU, FIXTURES / "no-such-tuning-file.json"),
    "status_gpu_synthetic.json": lambda: status(TWO_H200, FIXTURES / "no-such-tuning-file.json"),
    "status_tuning_h200.json": lambda: status(ONE_H200, H200_TUNING)["tuning"],
    "report_flux.json": report_flux,
    "report_never_invoked.json": report_never_invoked,
    "report_auto_tuned.json": report_auto_tuned,
    "report_auto_measured.json": report_auto_measured,
    "priority_cases.json": priority_cases,
    "status_kernel_failures.json": kernel_failures,
    "report_kernel_failed.json": report_kernel_failed,
}


def render(value: Any) -> str:
    return json.dumps(value, indent=1, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """Every fixture's file text, by file name."""
    return {name: render(build()) for name, build in BUILDERS.items()}


def main() -> int:
    for name, text in build_all().items():
        (FIXTURES / name).write_text(text, encoding="utf-8")
        print(f"wrote {FIXTURES / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
