#!/usr/bin/env bash
# The converged study (issue 24): the reference study rerun with every run trained until flat (with a cap), the
# unfoolable verdicts and the circuit probe, then scale (width x depth) and task diversity (a finite pool of K
# rules). Resumable in parts that fit a sitting:
#   bash experiments/converged.sh PART...   # affine | recurrences | priors | scale | pool (CPU work)
#                                           # | regression | gpt12l | scale-gpu | pool-linreg (GPU work)
#                                           # | probes | records | tables
# A sweep skips runs that are complete, a run killed mid-training continues from its last checkpoint, and a run
# already probed by this code is not probed again. `records` copies each finished run's compact record (config,
# metrics with the held-out curve and the stop reason, status, probe summaries and the small probe tables; no
# weights) to results/reference/records/, so a later sitting on a fresh machine can build the tables.
# On a GPU the sweeps train each cell's seeds stacked (STACK=auto); a sitting lent a GPU runs the GPU parts through
# PARTS=converged bash benchmarks/device_check.sh, which resumes from the committed records.
# Run it from a worktree of its own and never change this file while it runs: bash reads a script as it goes.
# CPU cost per run on one thread: recurrences 1-3 min, regression 10-40 min (BENCHMARKS.md); wall times of
# each part, as run, are in results/reference/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-2}
stack=${STACK:-auto}
export OMP_NUM_THREADS=1   # one thread per process: a small model's step is GEMM-bound on one core
# the run folders `probes` and `records` walk; DIRS=results/my-trial-runs probes and records a trial's runs
# (to results/reference/records/my-trial-runs) the same way
dirs=${DIRS:-"results/converged-runs results/converged-priors-runs results/converged-pool-runs"}
sweep() {
    local args=(--jobs "$jobs" --cpus-per-run 1 --quiet)
    if iclbench sweep --help | grep -q -- "--stack"; then args+=(--stack "$stack"); fi
    # exit 1: every run finished, some failed or are unstable (listed): the parts after this one still run;
    # a signal (130) or an invalid sweep (2) ends the script
    iclbench sweep "experiments/converged/$1.yaml" "${args[@]}" || { local rc=$?; test "$rc" -eq 1 || exit "$rc"
        echo "converged.sh: $1: some runs failed or are unstable (listed above); going on" >&2; }
}
probe_all() {  # the verdicts (specialization, with its untrained controls) and the circuit on every finished run
    for d in $dirs; do
        test -d "$d" || continue  # (under pipefail a part not yet run would end the script here)
        ls -d "$d"/*/ | xargs -r -P "$jobs" -I{} sh -c '
            test -f {}/metrics.json || exit 0
            for p in specialization circuit; do
                grep -q "\"$p\"" {}/probes.json 2>/dev/null || iclbench probe {} --probe $p > /dev/null || exit 0
            done'
    done
}
records() {  # compact records (no weights) of every finished run, beside the committed tables
    for d in $dirs; do
        test -d "$d" || continue
        out="results/reference/records/$(basename "$d")"
        for run in "$d"/*/; do
            run=${run%/}
            test -f "$run/metrics.json" || continue
            dest="$out/$(basename "$run")"
            mkdir -p "$dest/probes"
            cp "$run"/config.yaml "$run"/status.json "$dest"/
            for j in metrics probes; do  # the same JSON without its indentation: 40 % smaller
                test -f "$run/$j.json" && python -c 'import json, sys; json.dump(json.load(open(sys.argv[1])),
                    open(sys.argv[2], "w"), separators=(",", ":"))' "$run/$j.json" "$dest/$j.json"
            done
            for t in specialization circuit; do
                test -f "$run/probes/$t.csv" && cp "$run/probes/$t.csv" "$dest/probes/"
            done
            rmdir "$dest/probes" 2>/dev/null || true
        done
    done
}
tables() {  # the leaderboard at convergence and the answer tables, from the runs or else their committed records
    local runs=results/converged-runs out=results/reference
    test -d "$runs" || runs=results/reference/records/converged-runs
    iclbench leaderboard --results "$runs" > "$out/leaderboard.md"
    iclbench leaderboard --results "$runs" --format csv > "$out/leaderboard.csv"
    python experiments/converged_tables.py
}
part() {
    case "$1" in
        affine|recurrences|priors|scale|pool|regression|gpt12l|scale-gpu|pool-linreg) sweep "$1" ;;
        probes) probe_all ;;
        records) records ;;
        tables) tables ;;
        *) echo "converged.sh: unknown part '$1' (affine, recurrences, priors, scale, pool, regression, gpt12l," \
                "scale-gpu, pool-linreg, probes, records, tables)" >&2; exit 2 ;;
    esac
}
if [ $# -eq 0 ]; then
    set -- affine recurrences priors scale pool regression gpt12l scale-gpu pool-linreg probes records tables
fi
for p in "$@"; do
    start=$(date +%s); part "$p"; echo "converged: part $p took $(( $(date +%s) - start )) s"
done
