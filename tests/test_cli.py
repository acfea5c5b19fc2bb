"""`python -m attention doctor` and `bench --quick` work from any checkout name, and the
library imports through relative imports only (ComfyUI loads the pack by file path,
from directories like `ComfyUI-Attention-Backends`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from library_support import ROOT


@pytest.fixture(scope="module")
def hyphenated_checkout(tmp_path_factory):
    target = tmp_path_factory.mktemp("custom_nodes") / "ComfyUI-Attention-Backends"
    shutil.copytree(os.path.join(ROOT, "attention"), target / "attention",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return target


def run_module(cwd, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "attention", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_doctor_lists_every_backend_and_the_auto_order(hyphenated_checkout):
    result = run_module(hyphenated_checkout, "doctor")
    assert result.returncode == 0, result.stderr
    for name in ("sdpa", "sage_qk_int8_pv_fp8_cuda_sm90", "flash4", "xformers", "kitchen_int8", "sol", "sparge"):
        assert name in result.stdout
    assert "auto on" in result.stdout and "typical calls" in result.stdout
    status = json.loads(run_module(hyphenated_checkout, "doctor", "--json").stdout)
    assert len(status["backends"]) == 20
    assert [row["name"] for row in status["backends"] if row["sparse"]] == ["sol", "sparge"]
    assert status["parallel"]["head_parallel"]["problems"]
    assert all(row["available"] or row["reasons"] for row in status["backends"])


def test_bench_quick_prints_a_table(hyphenated_checkout, tmp_path):
    result = run_module(hyphenated_checkout, "bench", "--quick", "--shapes", "sdxl_cross,flux_1024",
                        "--reps", "3", "--backends", "sdpa,sdpa_math,flash4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "| shape | SDPA ms |" in result.stdout and "| shape | row | chose |" in result.stdout
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = {(r["shape"], r["backend"]): r for r in data["rows"]}
    assert rows[("flux_1024", "sdpa")]["status"] == "ok"
    assert rows[("flux_1024", "sdpa")]["error"]["rel_l1"] < 1e-5
    assert rows[("flux_1024", "flash4")]["status"] == "unsupported"
    assert any("flash-attn-4" in r or "cuda" in r for r in rows[("flux_1024", "flash4")]["reasons"])
    assert data["auto"]["flux_1024"]["auto"]["chose"] == "sdpa"
    tuned = data["auto"]["flux_1024"]["auto_tuned"]
    assert tuned["chose"] in ("sdpa", "sdpa_flash") and tuned["tuning_ms"] > 0 and tuned["error_within_budget"]
    assert (tmp_path / "tuning.json").exists()  # the tuned table with its evidence


def test_library_loads_under_a_hyphenated_package_name(hyphenated_checkout):
    init = hyphenated_checkout / "attention" / "__init__.py"
    spec = importlib.util.spec_from_file_location("ComfyUI-Attention-Backends.attention", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    parent = type(sys)("ComfyUI-Attention-Backends")
    parent.__path__ = [str(hyphenated_checkout)]
    sys.modules["ComfyUI-Attention-Backends"] = parent
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert "flash4" in module.names()
    finally:
        for name in [n for n in sys.modules if n.startswith("ComfyUI-Attention-Backends")]:
            del sys.modules[name]
