#!/usr/bin/env bash
# What works on this GPU machine, in one go (about 10 minutes on one H100):
#
#     bash scripts/gpu_check.sh                 # writes runs/gpu_check/summary.md and one log per step
#     bash scripts/gpu_check.sh /tmp/check      # another output folder
#     NO_BUILD=1 bash scripts/gpu_check.sh      # keep the installed build (step 2 only reports it)
#
# Steps, each timed, its exit status and last lines in the summary:
#   1. environment     torch, CUDA, the GPUs
#   2. build           the C++/CUDA kernels (pip install --no-build-isolation -e .), then what loaded
#   3. gpu tests       pytest -m gpu: the CUDA kernels against the fp64 reference
#   4. attention       benchmarks/attention.py in bf16: minilm's kernel against SDPA's flash backend
#   5. speedrun        `minilm speedrun --preset gpu` cut to a few hundred steps per stage
#   6. 2 GPUs          20 steps of pretraining under torchrun with DDP, then with FSDP2 (--fsdp),
#                      when two GPUs are present
# Without a GPU the GPU steps say "skipped" and the speedrun runs the `ci` preset instead, so the
# script itself is checked on any machine (tests/test_gpu_check.py runs its CPU-safe parts).
set -u
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
FAILED=0

printf "# minilm GPU check\n\n- date: %s\n- git commit: %s\n- GPUs: %s\n\n| step | status | seconds |\n|---|---|---:|\n" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$NGPU" > "$SUMMARY"
TAILS=""

step() {   # step NAME COMMAND...: run it, log it, add a row and the log's tail to the summary
    local name=$1; shift
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status="ok"; [ $rc -ne 0 ] && status="FAILED (exit $rc)" && FAILED=1
    printf "| %s | %s | %d |\n" "$name" "$status" $((SECONDS - start)) >> "$SUMMARY"
    TAILS+=$'\n'"## $name"$'\n\n```\n'"$(tail -n 25 "$OUT/$name.log")"$'\n```\n'
}

skip() {
    printf "| %s | skipped: %s | 0 |\n" "$1" "$2" >> "$SUMMARY"
}

step environment python -c "
import torch, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}')
"
BUILD="pip install --no-build-isolation -e . &&"
[ "${NO_BUILD:-0}" = 1 ] && BUILD=""
step build bash -c "$BUILD python -c \"
from minilm.ops import _kernels, available_backends
print('kernels loaded:', _kernels.LOADED, 'devices:', _kernels.DEVICES, 'error:', _kernels.LOAD_ERROR)
print('attention backends:', available_backends())
\""
if [ "$NGPU" -ge 1 ]; then
    step gpu-tests python -m pytest -m gpu -q
    step attention python benchmarks/attention.py --shapes small T1024 T2048 --dtypes bfloat16 --no-memory
    step speedrun python -m minilm speedrun --preset gpu --out-dir "$OUT/speedrun" \
        --set pretrain.max_steps=400 --set pretrain.eval_every=200 --set pretrain.ckpt_every=200 \
        --set sft.max_steps=300 --set dpo.max_steps=150 --set hydra-sft.max_steps=150 --set ppo.max_steps=20 \
        --set dno.n_prompts=256 --set ltc.iterations=2 --set ltc.episodes_per_iter=64 --set ltc.n_test=64 \
        --set prune.max_steps=150 --set eval.n_chat=128 --set eval.n_winrate=128 --set eval.n_env=16
else
    skip gpu-tests "no CUDA device"
    skip attention "no CUDA device"
    step speedrun python -m minilm speedrun --preset ci --out-dir "$OUT/speedrun"
fi
if [ "$NGPU" -ge 2 ]; then
    step ddp-2gpu torchrun --nproc_per_node 2 -m minilm train --preset small --max-steps 20 \
        --eval-every 10 --out-dir "$OUT/ddp"
    step fsdp-2gpu torchrun --nproc_per_node 2 -m minilm train --preset small --max-steps 20 \
        --eval-every 10 --fsdp --out-dir "$OUT/fsdp"
else
    skip ddp-2gpu "fewer than 2 GPUs"
    skip fsdp-2gpu "fewer than 2 GPUs"
fi

printf "%s" "$TAILS" >> "$SUMMARY"
echo "wrote $SUMMARY"
exit $FAILED
