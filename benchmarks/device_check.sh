#!/usr/bin/env bash
# One device check for a machine with a GPU (python3 with CUDA torch and iclbench's dependencies installed).
# Prints: the no-sync check of the training step, the default job on cuda, the benchmark (bf16 and fp32),
# fp32 vs bf16 accuracy, CUDA-graph capture (--compile, reduce-overhead), stacked vs separate seeds, and a
# short sweep. Budget: < 8 minutes; every part has its own timeout, and a failing part does not stop the rest.
#   bash benchmarks/device_check.sh            (from the repository root)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}/device_check
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
START=$(date +%s)
part() { echo; echo "=== $1 ($(( $(date +%s) - START ))s elapsed)"; }
run() { local t=$1; shift; timeout "$t" "$@" || echo "!!! exit $? (timeout $t s): $*"; }

part "install"
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

part "no host sync in the training step (torch.cuda.set_sync_debug_mode('error'))"
run 120 $PY - <<'PY'
import torch, time
from iclbench.config import resolve, TrainOptions
from iclbench.registry import get_registry
from iclbench.runner import build
from iclbench.trainer import DeviceLoss, make_optimizer, scored_positions, train_step
dev = torch.device("cuda")
cfg = resolve(get_registry(), task="affine", model="gpt3l", device="cuda")
task, model = build(get_registry(), cfg, dev)
gen = torch.Generator(device=dev).manual_seed(0)
o, opt, acc = cfg.train, make_optimizer(model, cfg.train), DeviceLoss(dev)
norm = task.normalizer(dev).to(dev)
scored = scored_positions(task.sample(8, gen, dev).mask)
for step in range(3):  # warm-up (lazy init may sync)
    acc.add(train_step(model, opt, task.sample(o.batch_size, gen, dev), norm, 1e-3, o, scored), step + 1)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
t0 = time.perf_counter()
for step in range(200):
    acc.add(train_step(model, opt, task.sample(o.batch_size, gen, dev), norm, 1e-3, o, scored), step + 1)
queued = time.perf_counter() - t0
torch.cuda.set_sync_debug_mode(0)
torch.cuda.synchronize()
total = time.perf_counter() - t0
print(f"200 steps (sampling included) with no sync: OK; host queued them in {queued*1e3:.0f} ms, "
      f"GPU finished after {total*1e3:.0f} ms ({total/200*1e3:.2f} ms/step)")
PY

part "default job on cuda: affine x gpt3l, 3000 steps (bf16 autocast, the CUDA default)"
run 150 $PY -m iclbench.cli run --task affine --model gpt3l --device cuda --out "$OUT/runs" --no-probes \
  | grep -E "mean t>=|on cuda|run directory"

part "fp32 vs bf16: accuracy (same seed, 3000 steps) - the faster accurate one should be the CUDA default"
run 150 $PY -m iclbench.cli run --task affine --model gpt3l --device cuda --out "$OUT/runs" --no-probes \
  --set train.precision=fp32 | grep -E "mean t>=|on cuda"

part "benchmark: gpt3l, bf16 (default) with 8 seeds stacked vs separate"
run 120 $PY -m iclbench.cli bench --task affine --model gpt3l --device cuda --no-tl --rounds 5 --steps 20 --seeds 8
part "benchmark: gpt3l, fp32 (TF32 off)"
run 90 $PY -m iclbench.cli bench --task affine --model gpt3l --device cuda --no-tl --rounds 5 --steps 20 \
  --set train.precision=fp32
part "benchmark: gpt12l, bf16, batch 64 and 512"
run 90 $PY -m iclbench.cli bench --task affine --model gpt12l --device cuda --no-tl --rounds 3 --steps 10
run 90 $PY -m iclbench.cli bench --task affine --model gpt12l --device cuda --no-tl --rounds 3 --steps 10 \
  --set train.batch_size=512 --seeds 4
part "CUDA-graph capture: --compile (reduce-overhead on cuda)"
run 150 $PY -m iclbench.cli bench --task affine --model gpt3l --device cuda --no-tl --rounds 5 --steps 20 --compile

part "seeds: run --seeds 0-7 on cuda, 1000 steps: stacked into one model (the GPU default) vs one after another"
for stack in yes no; do
  t0=$(date +%s)
  run 150 $PY -m iclbench.cli run --task affine --model gpt3l --device cuda --out "$OUT/seeds-$stack" --no-probes \
    --steps 1000 --seeds 0-7 --stack $stack | tail -3
  echo "--stack $stack: $(( $(date +%s) - t0 )) s wall for 8 seeds (training and evaluation)"
done

part "short sweep: 2 depths x 2 seeds, 300 steps, on cuda"
cat > "$OUT/sweep.yaml" <<YAML
name: device-check
base: {task: affine, device: cuda, train: {steps: 300}, out: $OUT/sweep, eval: {probes: false}}
grid: {model: [gpt1l, gpt2l], seed: [0, 1]}
YAML
run 150 $PY -m iclbench.cli sweep "$OUT/sweep.yaml" --jobs 2 | tail -8

part "done in $(( $(date +%s) - START ))s; outputs under $OUT"
