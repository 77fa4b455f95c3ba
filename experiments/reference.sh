#!/usr/bin/env bash
# Regenerate the committed reference results in results/reference/ (about 35 minutes on a 2-core CPU):
#   bash experiments/reference.sh
# The sweep skips runs that are already complete, so an interrupted regeneration continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=results/reference-runs
out=results/reference
iclbench sweep experiments/leaderboard.yaml --quiet
mkdir -p "$out"
iclbench leaderboard --results "$runs" > "$out/leaderboard.md"
iclbench leaderboard --results "$runs" --metric icl_score > "$out/leaderboard-icl-score.md"
iclbench leaderboard --results "$runs" --format csv > "$out/leaderboard.csv"
iclbench specialization --results "$runs" > "$out/specialization.md"
iclbench specialization --results "$runs" --format csv > "$out/specialization.csv"
rm -rf "$out/report-gpt3l-affine"
iclbench report "$runs"/affine-gpt3l-*-s0 "$runs"/affine-gpt3l-*-s1 "$runs"/affine-gpt3l-*-s2 \
    --out "$out/report-gpt3l-affine"
