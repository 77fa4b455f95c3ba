#!/usr/bin/env bash
# Regenerate the committed reference results in results/reference/ (about an hour on a 2-core CPU):
#   bash experiments/reference.sh
# The sweep skips runs that are already complete, so an interrupted regeneration continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=results/reference-runs
out=results/reference
iclbench sweep experiments/leaderboard.yaml --jobs 2 --quiet
# the specialization probe on every run (a few seconds each; skipped where already stored by this code), every
# probe on the runs the report shows
ls -d "$runs"/*/ | xargs -P 2 -I{} sh -c \
    'grep -q "\"specialization\"" {}/probes.json 2>/dev/null || iclbench probe {} --probe specialization > /dev/null' 
for run in "$runs"/affine-gpt3l-*-s[012]; do
    grep -q '"ladder"' "$run/probes.json" 2>/dev/null || iclbench probe "$run" > /dev/null
done
mkdir -p "$out"
iclbench leaderboard --results "$runs" > "$out/leaderboard.md"
iclbench leaderboard --results "$runs" --metric icl_score > "$out/leaderboard-icl-score.md"
iclbench leaderboard --results "$runs" --metric excess_bayes > "$out/leaderboard-excess-bayes.md"
iclbench leaderboard --results "$runs" --format csv > "$out/leaderboard.csv"
iclbench specialization --results "$runs" > "$out/specialization.md"
iclbench specialization --results "$runs" --format csv > "$out/specialization.csv"
rm -rf "$out/report-gpt3l-affine"
iclbench report "$runs"/affine-gpt3l-*-s0 "$runs"/affine-gpt3l-*-s1 "$runs"/affine-gpt3l-*-s2 \
    --out "$out/report-gpt3l-affine"
