#!/usr/bin/env bash
# One device check for a machine with a GPU (python3 with CUDA torch and iclbench's dependencies installed).
# Parts, most valuable first: the CUDA tests, the default job on cuda (fp32, then bf16), the no-sync check of the training step,
# the reference study's gpt12l cells (issue 15: affine x 10 seeds stacked, 1500 steps, specialization probe),
# the benchmark (fp32 with 8 seeds stacked vs separate, bf16), run --seeds stacked vs one after another,
# CUDA-graph capture (--compile), gpt12l benchmark, more gpt12l study cells while time is left, a short sweep,
# a sweep whose seeds train as one stacked job. Then the converged study's GPU parts (issue 24; each cell's seeds
# stacked, trained until flat) while time is left, resuming from the runs whose records earlier sittings committed:
# `converged`, the regression part's d_model-64 cells, several at once (benchmarks/converged_gpu.py; their run
# directories come back to be probed on a CPU), and `converged-big` (gpt12l, scale-gpu, pool-linreg, probed here).
# PARTS (default: all) picks parts by key: test default sync study bench seeds compile bench12 more sweep stacksweep
# converged converged-big.
# Every part has its own timeout, is skipped once the deadline (DEADLINE seconds, default 480) has passed, and a
# failing part does not stop the rest.
#   bash benchmarks/device_check.sh            (from the repository root)
# Outputs: the log on stdout; with OUT set, $OUT/device_check.log, $OUT/gpt12l-runs.tgz (the study's run
# directories without their 38 MB weights, to unpack into results/reference-runs), $OUT/cells.json and
# $OUT/cells-N.tgz (part converged: its finished run directories, to unpack at the repository root and probe with
# `bash experiments/converged.sh probes records`) and $OUT/converged.tgz (part converged-big: the new compact
# records and reference models, to unpack at the repository root).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)/device_check
RUNS=$WORK/reference-runs
mkdir -p "$WORK" "$RUNS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
START=$(date +%s)
DEADLINE=${DEADLINE:-480}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
PARTS=" ${PARTS:-test default sync study bench seeds compile bench12 more sweep stacksweep converged converged-big} "
part() {  # part KEY TITLE: false when KEY is not in PARTS or the deadline has passed
    case "$PARTS" in *" $1 "*) ;; *) return 1 ;; esac
    echo; echo "=== $2 ($(( $(date +%s) - START ))s elapsed)"
    [ "$(left)" -gt 10 ] || { echo "skipped: past the deadline"; return 1; }
}
run() {  # run TIMEOUT CMD...: at most TIMEOUT s, and never past the deadline
    local t=$1; shift; local l; l=$(left); [ "$l" -lt "$t" ] && t=$l
    [ "$t" -gt 5 ] || { echo "skipped: past the deadline: $*"; return 0; }
    timeout "$t" "$@" || echo "!!! exit $? (timeout $t s): $*"
}
study_cells() {  # study_cells TASK: gpt12l x TASK x 10 seeds stacked, as experiments/study/depths.yaml, + probe
    run 200 $PY -m iclbench.cli run --task "$1" --model gpt12l --device cuda --out "$RUNS" --no-probes \
        --steps 1500 --seeds 0-9 --stack yes --quiet | tail -2
    ls -d "$RUNS/$1"-gpt12l-*-s* | run 80 xargs -P 10 -I{} sh -c "test -f {}/metrics.json || exit 0;
        OMP_NUM_THREADS=1 $PY -m iclbench.cli probe {} --probe specialization --device cuda > /dev/null"
    $PY -m iclbench.cli specialization --results "$RUNS"  # learned label, claims and errors per cell
}

echo "=== install"
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

part test "the CUDA tests (tests/test_cuda.py)" && run 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py

part default "default job on cuda: affine x gpt3l, 3000 steps (fp32, the default)" &&
run 120 $PY -m iclbench.cli run --task affine --model gpt3l --device cuda --out "$WORK/runs" --no-probes \
  | grep -E "mean t>=|on cuda|tokens/s|run directory|Error|error"

part default "bf16 autocast vs fp32: speed and accuracy (same seed, 3000 steps)" &&
run 120 $PY -m iclbench.cli run --task affine --model gpt3l --device cuda --out "$WORK/runs" --no-probes \
  --set train.precision=bf16 | grep -E "mean t>=|on cuda|tokens/s|Error|error"

part sync "no host sync in the training step (torch.cuda.set_sync_debug_mode('error'))" &&
run 90 $PY - <<'PY'
import torch, time
from iclbench.config import resolve
from iclbench.registry import get_registry
from iclbench.build import build
from iclbench.step import make_optimizer, mask_index, train_step
from iclbench.trainer import DeviceLoss
dev = torch.device("cuda")
cfg = resolve(get_registry(), task="affine", model="gpt3l", device="cuda")
task, model = build(get_registry(), cfg, dev)
gen = torch.Generator(device=dev).manual_seed(0)
o, opt, acc = cfg.train, make_optimizer(model, cfg.train), DeviceLoss(dev, [0.0])
norm = task.normalizer(dev).to(dev)
scored = mask_index(task.sample(8, gen, dev).mask)
for step in range(3):  # warm-up (lazy init may sync)
    acc.add(train_step(model, opt, task.sample(o.batch_size, gen, dev), norm, 1e-3, o, scored).reshape(1), step + 1)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
t0 = time.perf_counter()
for step in range(200):
    acc.add(train_step(model, opt, task.sample(o.batch_size, gen, dev), norm, 1e-3, o, scored).reshape(1), step + 1)
queued = time.perf_counter() - t0
torch.cuda.set_sync_debug_mode(0)
torch.cuda.synchronize()
total = time.perf_counter() - t0
print(f"200 steps (sampling included) with no sync: OK; host queued them in {queued*1e3:.0f} ms, "
      f"GPU finished after {total*1e3:.0f} ms ({total/200*1e3:.2f} ms/step)")
PY

part study "reference study: gpt12l x affine x 10 seeds, stacked, 1500 steps, specialization probe" && study_cells affine

part bench "benchmark: gpt3l, fp32 (the default) with 8 seeds stacked vs separate" &&
run 90 $PY -m iclbench.cli bench --task affine --model gpt3l --device cuda --no-tl --rounds 5 --steps 20 --seeds 8
part bench "benchmark: gpt3l, bf16 autocast" &&
run 60 $PY -m iclbench.cli bench --task affine --model gpt3l --device cuda --no-tl --rounds 5 --steps 20 \
  --set train.precision=bf16

part seeds "seeds: run --seeds 0-3 on cuda, 1000 steps: stacked into one model (the GPU default) vs one after another" &&
for stack in yes no; do
  t0=$(date +%s)
  run 90 $PY -m iclbench.cli run --task affine --model gpt3l --device cuda --out "$WORK/seeds-$stack" --no-probes \
    --steps 1000 --seeds 0-3 --stack $stack --quiet | tail -1
  echo "--stack $stack: $(( $(date +%s) - t0 )) s wall for 4 seeds (training and evaluation)"
done

part compile "CUDA-graph capture: --compile (reduce-overhead on cuda)" &&
run 120 $PY -m iclbench.cli bench --task affine --model gpt3l --device cuda --no-tl --rounds 5 --steps 20 --compile

part bench12 "benchmark: gpt12l, fp32 and bf16 at batch 512 (4 seeds stacked); fp32 at batch 64" && {
  for prec in fp32 bf16; do
    run 60 $PY -m iclbench.cli bench --task affine --model gpt12l --device cuda --no-tl --rounds 3 --steps 10 \
      --set train.batch_size=512 --set train.precision=$prec --seeds 4
  done
  run 60 $PY -m iclbench.cli bench --task affine --model gpt12l --device cuda --no-tl --rounds 3 --steps 10; }

for t in linrec affine-vec poly quadratic logistic; do  # more gpt12l study cells, while time is left
  [ "$(left)" -gt 150 ] || break
  part more "reference study: gpt12l x $t x 10 seeds" && study_cells "$t"
done

part sweep "short sweep: 2 depths x 2 seeds, 300 steps, on cuda" && {
cat > "$WORK/sweep.yaml" <<YAML
name: device-check
base: {task: affine, device: cuda, train: {steps: 300}, out: $WORK/sweep, eval: {probes: false}}
grid: {model: [gpt1l, gpt2l], seed: [0, 1]}
YAML
run 60 $PY -m iclbench.cli sweep "$WORK/sweep.yaml" --jobs 2 | tail -8; }

part stacksweep "sweep --stack yes: gpt3l x 4 seeds as one stacked job, 1000 steps, on cuda" && {
cat > "$WORK/stacksweep.yaml" <<YAML
name: device-check-stack
base: {task: affine, model: gpt3l, device: cuda, train: {steps: 1000}, out: $WORK/stacksweep, eval: {probes: false}}
grid: {seed: [0, 1, 2, 3]}
YAML
t0=$(date +%s)
run 90 $PY -m iclbench.cli sweep "$WORK/stacksweep.yaml" --stack yes --jobs 1 --quiet | tail -3
echo "sweep --stack yes: $(( $(date +%s) - t0 )) s wall for 4 seeds (training and evaluation)"; }

# The converged study's GPU parts (issue 24), resuming where earlier sittings stopped: the committed compact
# records count as finished runs, so each sweep trains only what no sitting has finished.
from_records() {
    local records=results/reference/records
    mkdir -p results
    for d in converged-runs converged-pool-runs; do
        rm -rf "results/$d"; if [ -d "$records/$d" ]; then cp -r "$records/$d" "results/$d"; fi
    done
}
# The regression part's cells (d_model 64), the bar's first: one stacked job a cell, several sharing the GPU;
# cells that cannot end by the deadline are stopped. On an H200 (2026-12-01) two sparse-linreg cells
# (20000 steps, 6 and 10 seeds) ended in 430 and 480 s with up to five cells beside them.
converged() {
    from_records
    run $(left) $PY benchmarks/converged_gpu.py regression --deadline $(( $(left) - 30 )) --jobs 5 --most 9 \
        --out "${OUT:-$WORK}" --first decision-tree-gpt3l,decision-tree-gpt2l,linreg-gpt6l,relu-nn-gpt6l,\
decision-tree-gpt6l,sparse-linreg-gpt6l,decision-tree-gpt1l,sparse-linreg-gpt1l
}
# gpt12l, scale-gpu and pool-linreg (a pool's seeds cannot stack and run 8 at once), one part after another. New
# runs are probed here (their weights are too large to bring back); their records and seed 0's exported weights
# come back in $OUT/converged.tgz, to unpack at the repository root and commit.
converged_big() {
    local records=results/reference/records
    from_records
    find "$records" -mindepth 2 -maxdepth 2 -type d | sort > "$WORK/records-before"
    touch "$WORK/stamp"
    for p in gpt12l scale-gpu; do
        run $(( $(left) - 240 )) $PY -m iclbench.cli sweep "experiments/converged/$p.yaml" --stack yes --jobs 1 --quiet \
            | tail -2
    done
    run $(( $(left) - 240 )) $PY -m iclbench.cli sweep experiments/converged/pool-linreg.yaml --stack no --jobs 8 \
        --cpus-per-run 1 --quiet | tail -2
    ls -d results/converged-runs/*/ results/converged-pool-runs/*/ 2>/dev/null | run $(( $(left) - 100 )) xargs -P 8 -I{} sh -c '
        test -f {}/metrics.json || exit 0
        for p in specialization circuit; do grep -q "\"$p\"" {}/probes.json 2>/dev/null ||
            OMP_NUM_THREADS=1 '"$PY"' -m iclbench.cli probe {} --probe $p > /dev/null; done'
    bash experiments/converged.sh records | tail -1
    run 60 $PY experiments/reference_models.py results/converged-runs 2>/dev/null | tail -1
    find "$records" -mindepth 2 -maxdepth 2 -type d | sort | comm -13 "$WORK/records-before" - > "$WORK/new-records"
    find results/reference/models -mindepth 1 -maxdepth 1 -type d -newer "$WORK/stamp" | grep . >> "$WORK/new-records" &&
        echo results/reference/models/README.md >> "$WORK/new-records"  # the index, when an export is new
    echo "converged: $(grep -c . "$WORK/new-records") new records and exports"
}
part converged "converged study: the regression part's cells, several at once, resuming from the committed records" &&
  [ "$(left)" -gt 150 ] && converged
part converged-big "converged study: gpt12l, scale-gpu and pool-linreg, resuming from the committed records" &&
  [ "$(left)" -gt 300 ] && converged_big

echo; echo "=== done in $(( $(date +%s) - START ))s; outputs under $WORK"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpt12l-runs.tgz" --exclude=model.safetensors --exclude=train_state.pt -C "$RUNS" .
  if [ -s "$WORK/new-records" ]; then  # the new runs' compact records and reference models (no other weights)
    tar czf "$OUT/converged.tgz" -T "$WORK/new-records"
  fi
  ls -la "$OUT"
fi
