#!/usr/bin/env bash
# Source this on the device machine (an H200 with no network) to install the kernel
# packages carried as registry wheels: `source benchmarks/device_setup.sh`.
# Wheels: sageattention 1.0.6 (or a SageAttention 2 built on the device, below),
# comfy-kitchen, flash-attn-4 and its CuTe DSL (nvidia-cutlass-dsl, -libs-base,
# -libs-core: the Python DSL lives in libs-core). The DSL's 92 MB cu13 library wheel
# does not fit one transfer, so it travels as an xz tarball in parts; parts sent by an
# earlier call wait under /tmp/stash.
# SageAttention 2 has no registry wheel: when a session builds it on the device, the
# installed tree comes back as `sage2.tar.xz.part-*` (kept in the ignored .sage2_whl/,
# never committed) and is unpacked here instead of sageattention 1.0.6.
set -u
site=/tmp/site
mkdir -p "$site" /tmp/stash
for dir in .whl_stage1 .whl .whl2 .sage2_whl; do
  [ -d "$dir" ] || continue
  cp -n "$dir"/cu13.tar.xz.part-* "$dir"/sage2.tar.xz.part-* /tmp/stash/ 2>/dev/null || true
  ls "$dir"/*.whl >/dev/null 2>&1 && cp -n "$dir"/*.whl /tmp/stash/
done
new=""
for wheel in /tmp/stash/*.whl; do
  [ -e "$wheel" ] && [ ! -e "$wheel.done" ] && new="$new $wheel"
done
if [ -n "$new" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $new \
    && for wheel in $new; do touch "$wheel.done"; done
fi
parts=$(ls /tmp/stash/cu13.tar.xz.part-* 2>/dev/null | wc -l)
if [ "$parts" -ge 3 ] && [ ! -f "$site/.cu13" ]; then
  # unpacked last: pip --target replaces top-level folders of the same name
  cat /tmp/stash/cu13.tar.xz.part-* | xz -d | tar -x -C "$site" && touch "$site/.cu13"
fi
if ls /tmp/stash/sage2.tar.xz.part-* >/dev/null 2>&1 && [ ! -f "$site/.sage2" ]; then
  rm -rf "$site"/sageattention "$site"/sageattention-*.dist-info
  cat /tmp/stash/sage2.tar.xz.part-* | xz -d | tar -x -C "$site" && touch "$site/.sage2"
fi
export PYTHONPATH="$site:$site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
echo "device_setup: $(ls /tmp/stash | wc -l) files stashed, cu13 parts: $parts, site: $(ls $site | wc -l) entries"
