#!/usr/bin/env bash
# Everything GPU-side in one call: GPU tests, then the benchmarks (KV write path; decode beside
# FlashInfer).
# Usage on the GPU machine, from the repo root:  bash scripts/gpu_run.sh [--sweep] [--tests-only | --bench-only]
# (a device call lasts at most 10 minutes: run the tests and the benchmarks as two calls)
# Writes logs and JSON under $OUT (default ./gpu_out); prints the benchmark table last.
# FlashInfer (wheels) and TileLang (an archive) travel in .whl/ (scripts/gpu_env.sh, DESIGN.md
# "Benchmarks"); without them the peer columns stay empty and the Triton kernel serves 64+ heads.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

status=0
if [[ " $* " != *" --bench-only "* ]]; then
  # the tests' TileLang kernels compile in parallel first; the tests load them from its disk cache
  python3 scripts/precompile_tilelang.py 2>&1 | grep -v TileLang | tail -n 2
  python3 -m pytest -m gpu -q -p no:cacheprovider tests --junitxml="$OUT/gpu_tests.xml" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -n 25 || status=1
fi
if [[ " $* " == *" --tests-only "* ]]; then
  echo "GPU tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.log" | tail -n 1)"
  grep -E '^(FAILED|ERROR)' "$OUT/gpu_tests.log" | head -n 20
  exit $status
fi
bench_args=()
[[ " $* " == *" --sweep "* ]] && bench_args+=(--sweep)
python3 benchmarks/bench_write.py --out "$OUT" 2>&1 | tee "$OUT/bench_write.log" || status=1
python3 benchmarks/bench_reduce.py --json "$OUT/bench_reduce.json" 2>&1 | tee "$OUT/bench_reduce.log" \
  | tail -n 4 || status=1
python3 benchmarks/bench_decode.py --out "$OUT" --results "$OUT/decode_results.csv" "${bench_args[@]}" \
  2>&1 | tee "$OUT/bench.log" || status=1
if [[ -f "$OUT/gpu_tests.log" ]]; then
  echo "GPU tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.log" | tail -n 1)"
  grep -E '^(FAILED|ERROR)' "$OUT/gpu_tests.log" | head -n 20
fi
exit $status
