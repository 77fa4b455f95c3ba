#!/usr/bin/env bash
# The reference study (issue 15): does "an early layer makes a rough estimate, later layers refine it" generalize
# across tasks and depths? Regenerates results/reference/ from scratch, or continues where it stopped:
#   bash experiments/study.sh            # every part, in priority order
#   bash experiments/study.sh seeds      # one part: seeds | priors | attn | steps | depths | probes | tables | verdicts
# Every part is resumable: a sweep skips runs that are complete, and a run killed mid-training continues from
# its last checkpoint; probes are skipped where already stored. Each sweep runs two 1-thread processes (a small
# model's step is GEMM-bound on one core, so this is the CPU's many-seeds engine; see BENCHMARKS.md).
# CPU time on a 2-core machine, measured in the session that produced results/reference/ (see results/reference/README.md):
# seeds ~45 min, priors ~15 min, attn ~3 min, steps ~12 min per seed, depths ~105 min, probes ~30 min, tables
# ~15 s. gpt12l cells need a GPU: PARTS="test study more" bash benchmarks/device_check.sh (see results/reference/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-2}
export OMP_NUM_THREADS=1   # probes run in parallel processes of one thread each
h8='[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]'  # a config hash, so gpt3l-attn is not gpt3l
sweep() { iclbench sweep "experiments/study/$1.yaml" --jobs "$jobs" --cpus-per-run 1 --quiet; }
probe_all() {  # the specialization probe on every complete run under $1 not yet probed by this code
    ls -d "$1"/*/ 2>/dev/null | xargs -r -P "$jobs" -I{} sh -c \
        'test -f {}/metrics.json || exit 0; grep -q "\"specialization\"" {}/probes.json 2>/dev/null ||
         iclbench probe {} --probe specialization > /dev/null'
}
part() {
    case "$1" in
        seeds|priors|attn|steps|depths) sweep "$1" ;;
        verdicts)  # issue 21: gpt3l/affine re-derived with the new verdicts (results/reference/verdicts.md)
            sweep verdicts; probe_all results/study-verdicts-runs; python experiments/verdict_tables.py ;;
        probes)
            probe_all results/reference-runs; probe_all results/study-priors-runs; probe_all results/study-steps-runs
            for run in results/reference-runs/affine-gpt3l-$h8-s[012]; do  # every probe, for the report
                grep -q '"ladder"' "$run/probes.json" 2>/dev/null || iclbench probe "$run" > /dev/null
            done ;;
        tables)
            runs=results/reference-runs out=results/reference
            mkdir -p "$out"
            iclbench leaderboard --results "$runs" > "$out/leaderboard-1500.md"
            iclbench leaderboard --results "$runs" --metric icl_score > "$out/leaderboard-1500-icl-score.md"
            iclbench leaderboard --results "$runs" --metric excess_bayes > "$out/leaderboard-1500-excess-bayes.md"
            iclbench leaderboard --results "$runs" --format csv > "$out/leaderboard-1500.csv"
            rm -rf "$out/report-gpt3l-affine"
            iclbench report "$runs"/affine-gpt3l-$h8-s[012] --out "$out/report-gpt3l-affine" > /dev/null
            python experiments/study_tables.py ;;   # specialization tables, study-1500.md and its figures
        *) echo "study.sh: unknown part '$1' (seeds, priors, attn, steps, depths, probes, tables, verdicts)" >&2; exit 2 ;;
    esac
}
if [ $# -gt 0 ]; then for p in "$@"; do part "$p"; done; exit 0; fi
for p in seeds priors attn steps depths probes tables; do
    start=$(date +%s); part "$p"; echo "study: part $p took $(( $(date +%s) - start )) s"
done
