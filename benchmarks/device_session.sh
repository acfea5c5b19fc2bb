#!/usr/bin/env bash
# One H200 device session, in back-to-back calls on one warm machine (it is given back
# 30 s after a call): each stage writes under OUT and prints a short summary last.
#
#   1 stash   carry .kit/s1: the CuTe DSL's cu13 library waits under /tmp/stash
#   2 kernels carry .kit/s2: install the registry kernels, build SageAttention 2 (~200 s),
#             the GPU suite (incl. every kernel inside torch.compile); the cost-model grid
#             when GRID_S (seconds) is set
#     sparse-tests  the sparse backends against a float64 reference (after a SpargeAttn
#             build into /tmp/site, which is not part of this repository)
#     calibrate  `python -m attention calibrate` timed as a user runs it, then the held-out
#             calls and the kernel table's image shapes with the rules, the committed fit
#             (or HELDOUT_MODEL: /tmp/fit/sm90.json is the fit of a grid measured by stage 2
#             with GRID_S or WINDOW on the same machine) and this calibration, in one run;
#             PREVIOUS_MODEL adds the model a refit replaces, SHIP_FIT=1 calibrates the refit;
#             CALIBRATION=FILE uses that calibration (same fingerprint) instead of calibrating;
#             the contested row (heldout.py --contested) measures what the model cannot separate
#   (kernels) WINDOW=window_: only those grid calls, fitted with the committed grid;
#             PROBE=tiles_: only those probe calls, measured and not fitted;
#             CONTEST_PROBE=1: benchmarks/contest_probe.py (auto's measurement of contested calls)
#     overhead  the node's override against a direct call of the kernel it chose (auto)
#     compiled-op  a compiled call through the pack's op against traced SDPA (no kit needed)
#   3 e2e     carry .whl_e2e .comfy_e2e: the end-to-end benchmark with TorchCompileModel
#             (E2E_MODELS, default flux,wan,sdxl); with E2E_SPARSE_S also the Wan step
#             through the Sparse node
#   4 tables  held-out calls (with the committed sm90 fit), sparse kernels, the Wan step
#             through the Sparse node (needs stage 3's ComfyUI on the same machine);
#             masked calls when MASKED_S (seconds) is set
#   parallel  on a 2- or 4-GPU kind (after stages 1-2 on the same machine for the kit's
#             kernels; without them every GPU runs sdpa): the head_parallel GPU suite, then
#             benchmarks/multi_gpu.py (head_parallel and Ulysses on 1/2/4 GPUs, topology)
#
# The kit (.kit/s1, .kit/s2) comes from shared/tools/device-kit.sh; .whl_e2e/.comfy_e2e
# are described in benchmarks/end_to_end.py. All are ignored by git.
# usage: bash benchmarks/device_session.sh STAGE OUT
set -uo pipefail
stage=$1; out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
site_path() { export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"; }

case $stage in
  stash)
    mkdir -p /tmp/stash && cp .kit/s1/cu13.tar.xz /tmp/stash/ \
      && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.csv"
    ;;
  kernels)
    started=$(date +%s)
    # shellcheck disable=SC1091
    source .kit/s2/device-install.sh .kit/s2  # never piped: a pipe would source it in a subshell
    site_path
    echo "install: $(( $(date +%s) - started )) s"
    python3 -m attention doctor > "$out/doctor.txt" 2>&1; tail -25 "$out/doctor.txt"
    if [ "${GPU_TESTS:-1}" = 1 ]; then
      timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider \
        -k "inside_torch_compile or matches_reference or auto" > "$out/gpu-tests.txt" 2>&1
      tail -4 "$out/gpu-tests.txt"
    fi
    if [ -n "${GRID_S:-}" ]; then
      python3 benchmarks/cost_grid.py --out "$out/grid" --budget-s "$GRID_S" > "$out/grid.log" 2>&1
      tail -5 "$out/grid.log"
      # The fit of this grid, also under /tmp/fit for the next stage on the same machine.
      python3 benchmarks/fit_cost_model.py "$out/grid/cost_grid.json" --out "$out/fit/sm90.json" \
        --residuals-dir "$out/fit" > "$out/fit.log" 2>&1 && mkdir -p /tmp/fit && cp "$out/fit/sm90.json" /tmp/fit/
      tail -12 "$out/fit.log"
    fi
    if [ -n "${WINDOW:-}" ]; then
      # Only the grid calls whose keys start with WINDOW, fitted with the committed grid.
      python3 benchmarks/cost_grid.py --out "$out/window" --only "$WINDOW" > "$out/window.log" 2>&1
      tail -3 "$out/window.log"
      python3 benchmarks/fit_cost_model.py benchmarks/results/h200/cost_model/cost_grid.json \
        "$out/window/cost_grid.json" --out "$out/fit/sm90.json" --residuals-dir "$out/fit" > "$out/fit.log" 2>&1 \
        && mkdir -p /tmp/fit && cp "$out/fit/sm90.json" /tmp/fit/
      tail -12 "$out/fit.log"
    fi
    if [ -n "${PROBE:-}" ]; then
      python3 benchmarks/cost_grid.py --out "$out/probe" --only "$PROBE" > "$out/probe.log" 2>&1
      tail -3 "$out/probe.log"
    fi
    if [ -n "${CONTEST_PROBE:-}" ]; then
      python3 benchmarks/contest_probe.py --out "$out/contest_probe" > "$out/contest_probe.log" 2>&1
      tail -3 "$out/contest_probe.log"; tail -12 "$out/contest_probe/contest_probe.md"
    fi
    ;;
  sparse-tests)
    site_path
    timeout 120 python3 -m pytest -m gpu tests/test_gpu_sparse.py -q -rs -p no:cacheprovider \
      > "$out/gpu-sparse-tests.txt" 2>&1
    tail -6 "$out/gpu-sparse-tests.txt"
    ;;
  calibrate)
    site_path
    model=${HELDOUT_MODEL:-benchmarks/results/h200/cost_model/sm90.json}
    # The stash call needs benchmarks/results moved out of the tree (the carry limit); a
    # calibrate call without it would spend its minutes before the held-out run fails.
    for file in "$model" ${PREVIOUS_MODEL:+"$PREVIOUS_MODEL"}; do
      [ -f "$file" ] || { echo "calibrate: $file is missing: put benchmarks/results back before this call"; exit 2; }
    done
    {
      # SHIP_FIT=1: calibrate rescales /tmp/fit/sm90.json as if it were shipped (this copy only).
      [ -n "${SHIP_FIT:-}" ] && cp /tmp/fit/sm90.json attention/cost_models/sm90.json
      if [ -n "${CALIBRATION:-}" ]; then
        # CALIBRATION=FILE: an earlier session's calibration of the same fingerprint, not timed again.
        cp "$CALIBRATION" "$out/calibration.json"
      else
        started=$(date +%s)
        timeout 330 python3 -m attention calibrate --file "$out/calibration.json" --grid "$out/calibration_grid.json"
        echo "calibrate: rc $? in $(( $(date +%s) - started )) s (the issue's limit: 300 s)"
      fi
      python3 benchmarks/heldout.py --out "$out/heldout" \
        --model "$model" \
        --calibration "$out/calibration.json" --table --contested --budget-s "${HELDOUT_S:-260}" \
        ${PREVIOUS_MODEL:+--previous-model "$PREVIOUS_MODEL"}
    } > "$out/calibrate.log" 2>&1
    tail -30 "$out/calibrate.log"
    ;;
  overhead)
    site_path
    python3 benchmarks/overhead.py --out "$out/overhead" > "$out/overhead.log" 2>&1
    tail -10 "$out/overhead.log"
    ;;
  compiled-op)
    python3 benchmarks/compiled_op_cost.py --out "$out/compiled_op_cost" > "$out/compiled_op_cost.log" 2>&1
    tail -12 "$out/compiled_op_cost.log"
    ;;
  e2e)
    site_path
    mkdir -p /tmp/comfy /tmp/e2e \
      && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/e2e .whl_e2e/*.whl \
      && tar xzf .comfy_e2e/comfyui.tar.gz -C /tmp/comfy || exit 1
    export PYTHONPATH="/tmp/e2e:$PYTHONPATH"
    (cd benchmarks && COMFYUI_PATH=/tmp/comfy/ComfyUI python3 end_to_end.py --models "${E2E_MODELS:-flux,wan,sdxl}" \
      --backends "${E2E_BACKENDS:-auto,flash4,sage_qk_int8_pv_fp8_cuda_sm90}" \
      --compile "${E2E_COMPILE:-auto,flash4,sage_qk_int8_pv_fp8_cuda_sm90}" \
      --steps 4 --repeats "${E2E_REPEATS:-3}" --time-budget "${E2E_BUDGET:-510}" --out "$out/e2e_compile") \
      > "$out/e2e.log" 2>&1
    tail -40 "$out/e2e.log"
    if [ -n "${E2E_SPARSE_S:-}" ]; then
      (cd benchmarks && COMFYUI_PATH=/tmp/comfy/ComfyUI python3 end_to_end.py --models wan --backends auto \
        --sparse "${E2E_SPARSE:-sol,sparge}" --steps 4 --repeats 3 --time-budget "$E2E_SPARSE_S" \
        --out "$out/e2e_sparse") > "$out/e2e_sparse.log" 2>&1
      tail -30 "$out/e2e_sparse.log"
    fi
    ;;
  tables)
    # At most 8 files come back: the tables' JSON and markdown, one log for all.
    # With NO_SAGE_BUILD=1 the kit installs without building SageAttention 2 (a short session).
    if [ -n "${NO_SAGE_BUILD:-}" ]; then mv .kit/s2/sage_src.tar.xz /tmp/ 2>/dev/null; fi
    # shellcheck disable=SC1091
    [ -d .kit/s2 ] && source .kit/s2/device-install.sh .kit/s2
    site_path
    export PYTHONPATH="/tmp/e2e:$PYTHONPATH"
    {
      python3 benchmarks/heldout.py --out "$out/heldout" --model benchmarks/results/h200/cost_model/sm90.json \
        --budget-s "${HELDOUT_S:-150}"
      [ -z "${MASKED_S:-}" ] || python3 benchmarks/masked.py --out "$out/masked" --budget-s "$MASKED_S"
      [ -n "${NO_SPARSE:-}" ] || python3 benchmarks/sparse.py --out "$out/sparse" --budget "${SPARSE_S:-170}"
      [ -d /tmp/comfy/ComfyUI ] && (cd benchmarks && COMFYUI_PATH=/tmp/comfy/ComfyUI python3 end_to_end.py \
        --models wan --backends auto --sparse "${E2E_SPARSE:-sol,sparge}" --steps 4 --repeats 3 \
        --time-budget "${E2E_SPARSE_S:-150}" --out "$out/e2e_sparse")
    } > "$out/tables.log" 2>&1
    tail -60 "$out/tables.log"
    ;;
  parallel)
    site_path
    timeout 150 python3 -m pytest -m gpu tests/test_gpu_parallel.py -q -rs -p no:cacheprovider \
      > "$out/gpu-parallel-tests.txt" 2>&1
    tail -4 "$out/gpu-parallel-tests.txt"
    python3 benchmarks/multi_gpu.py --out "$out/multi_gpu" > "$out/multi_gpu.log" 2>&1
    tail -30 "$out/multi_gpu.log"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
