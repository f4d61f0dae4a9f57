#!/usr/bin/env bash
# Everything GPU-side in one call: GPU tests, then the benchmarks (KV write path; decode beside
# FlashInfer).
# Usage on the GPU machine, from the repo root:
#   bash scripts/gpu_run.sh [--sweep] [--tests-only | --bench-only] [--group fast|kv_as_m|tilelang]
#                           [--shard K/N]
# (a device call lasts at most 10 minutes: run the tests and the benchmarks as separate calls; the
# whole GPU suite takes more than one call on the H200 machine, so --group runs a third of it:
# fast = the Triton, merge, write-path and launch files; kv_as_m = test_decode_kv_as_m.py and
# test_fp8_decode.py; tilelang = test_decode_tilelang.py and test_tilelang_source.py; --shard K/N
# runs every N-th of the selected tests from the K-th on, K = 1..N, for a group that outlasts one call)
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
group=
shard=
args=("$@")
for i in "${!args[@]}"; do
  [[ ${args[$i]} == --group ]] && group=${args[$((i + 1))]:-}
  [[ ${args[$i]} == --shard ]] && shard=${args[$((i + 1))]:-}
done
case "$group" in
  "") test_files=(tests); precompile=(--set tests) ;;
  fast) test_files=(tests/test_gpu.py tests/test_reduce.py tests/test_batch_invariant.py tests/test_fp8_write.py
                    tests/test_launch.py tests/test_merge.py); precompile=() ;;
  kv_as_m) test_files=(tests/test_decode_kv_as_m.py tests/test_fp8_decode.py); precompile=(--set kv_as_m) ;;
  tilelang) test_files=(tests/test_decode_tilelang.py tests/test_tilelang_source.py); precompile=(--set tests) ;;
  *) echo "unknown --group $group (fast, kv_as_m, tilelang)"; exit 2 ;;
esac
if [[ -n "$shard" ]]; then
  if [[ ! "$shard" =~ ^([0-9]+)/([0-9]+)$ ]] || (( BASH_REMATCH[1] < 1 || BASH_REMATCH[1] > BASH_REMATCH[2] )); then
    echo "--shard takes K/N with 1 <= K <= N, got '$shard'"; exit 2
  fi
  k=${BASH_REMATCH[1]} n=${BASH_REMATCH[2]}
  mapfile -t all_ids < <(python3 -m pytest --collect-only -q -m gpu -p no:cacheprovider "${test_files[@]}" | grep '::')
  test_files=()
  for i in "${!all_ids[@]}"; do (( i % n == k - 1 )) && test_files+=("${all_ids[$i]}"); done
  echo "shard $shard: ${#test_files[@]} of ${#all_ids[@]} tests"
fi
if [[ " $* " != *" --bench-only "* ]]; then
  # the tests' TileLang kernels compile in parallel first; the tests load them from its disk cache
  if [[ ${#precompile[@]} -gt 0 ]]; then
    python3 scripts/precompile_tilelang.py "${precompile[@]}" 2>&1 | grep -v TileLang | tail -n 2
  fi
  python3 -m pytest -m gpu -q -p no:cacheprovider "${test_files[@]}" --junitxml="$OUT/gpu_tests.xml" 2>&1 \
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
