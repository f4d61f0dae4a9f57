#!/usr/bin/env bash
# Run a command against another revision's package on the GPU machine (A/B runs, branches not
# checked out): its src/ and tests/ are extracted from git into /tmp/tree_<rev>, and the command
# runs there with that src/ first on PYTHONPATH (benchmarks and scripts come from the
# working tree's copy, under $REPO).
# Usage, from the repo root:  bash scripts/gpu_tree.sh REV COMMAND...
#   e.g.  bash scripts/gpu_tree.sh wip/tilelang-3d-params python3 -m pytest -m gpu -q tests/test_decode_kv_as_m.py
set -euo pipefail
rev=$1
shift
REPO=$PWD
export REPO
source scripts/gpu_env.sh
dir=/tmp/tree_$(echo "$rev" | tr '/' '_')
rm -rf "$dir" && mkdir -p "$dir"
git archive "$rev" src tests pyproject.toml | tar -x -C "$dir"
export PYTHONPATH=$dir/src:/tmp/site
cd "$dir"
echo "== $rev ($(git -C "$REPO" rev-parse --short "$rev")) in $dir"
"$@"
