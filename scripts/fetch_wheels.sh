#!/usr/bin/env bash
# Rebuild .whl/ (gitignored; what the GPU machine installs through scripts/gpu_env.sh) from the
# package registry: FlashInfer and its tvm-ffi as wheels for the GPU machine's Python 3.12, and
# TileLang + z3 as one xz archive of their unzipped wheels (their wheels exceed what one device
# call carries; z3's binary and headers left out). About 2 minutes, 55 MB.
# Usage, from the repo root:  bash scripts/fetch_wheels.sh [--local-site DIR]
# --local-site DIR also unpacks TileLang with what it imports for this machine's Python into DIR,
# to compile the TileLang kernels here without a GPU (CPU checks of the generated code):
#   OPENMLA_TILELANG_ARCH=sm_90a TILELANG_DISABLE_CACHE=1 PYTHONPATH=DIR:src python -c \
#     "from openmla.kernels.decode_tilelang import build_kernel; print(build_kernel(16, 64, 'bfloat16', \
#      False, schedule='kv_as_m', block_m=16).get_kernel_source())"
set -euo pipefail
local_site=
if [ "${1:-}" = "--local-site" ]; then local_site=$2; fi
dest=$PWD/.whl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  -d "$work" flashinfer-python==0.6.18.post1 apache-tvm-ffi==0.1.12 torch-c-dlpack-ext==0.1.5 tilelang==0.1.15
pip download -q --no-deps --only-binary=:all: -d "$work" z3-solver==4.15.4  # a manylinux2014 wheel
cp "$work"/flashinfer_python-*.whl "$work"/apache_tvm_ffi-*.whl "$work"/torch_c_dlpack_ext-*.whl "$dest"/
mkdir -p "$work/site"
(cd "$work/site" && unzip -q ../tilelang-*.whl && unzip -q ../z3_solver-*.whl \
  && rm -rf z3/include z3_solver-*.data)
tar -C "$work" -cf - site | xz -9 -T0 > "$dest/tl_site.tar.xz"
ls -la "$dest"
if [ -n "$local_site" ]; then
  mkdir -p "$local_site"
  cp -r "$work"/site/. "$local_site"/
  pip download -q --no-deps --only-binary=:all: -d "$work/local" apache-tvm-ffi==0.1.12 psutil ml_dtypes tqdm
  for w in "$work"/local/*.whl; do (cd "$local_site" && unzip -q -o "$w"); done
  echo "TileLang for this machine's Python in $local_site"
fi
