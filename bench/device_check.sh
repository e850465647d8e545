#!/usr/bin/env bash
# The GPU check, as one short script: run it from the repository root on a machine with a CUDA GPU
# and a python3 that has torch, transformers, peft, safetensors, pytest and hypothesis (and
# bitsandbytes for the 4-bit tests). Logs go to $OUT (default ./device-out).
#
#   1. tests/test_cuda.py: CUDA against CPU for every base kind, the VRAM budget, host RSS;
#   2. the whole test suite with device auto, so every PEFT comparison runs on the GPU;
#   3. bench_merge.py at --size ${SIZE:-3b}: copy vs streammerge --device cuda --vram-budget 2GiB,
#      then streammerge --device cpu on the same files, and one verbose CLI run (its last line
#      gives the peak VRAM against the budget).
#
# Each step has its own time limit, so a slow step cannot eat the next one's.
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SIZE=${SIZE:-3b}
W=${WORKDIR:-/tmp/smbench}
STEPS=${STEPS:-"cuda suite bench cpu verbose"}  # any subset, in this order
step() { echo "=== $1 ($(date +%T))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
nproc; free -g | head -2; df -h /tmp | tail -1
python3 -c "import sys, torch, transformers, peft, safetensors; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, safetensors.__version__)"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1

step "start-up: import torch, start CUDA, first matmul"
python3 -c "import time; t=time.perf_counter(); import torch; a=time.perf_counter(); x=torch.ones(64,64,device='cuda',dtype=torch.float64); (x@x).sum().item(); print(f'import torch {a-t:.2f} s, CUDA start + first matmul {time.perf_counter()-a:.2f} s')"

want cuda && step "tests/test_cuda.py" && timeout "${T_CUDA:-150}" python3 -m pytest -q -p no:cacheprovider -s -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | grep -E "^(vram|host)|passed|failed|error|Error" | head -40

want suite && step "whole suite, device auto (on the GPU)" && timeout "${T_SUITE:-170}" python3 -m pytest -q -p no:cacheprovider -rfs 2>&1 | tee "$OUT/suite.log" | tail -25

want bench && step "bench $SIZE: copy vs streammerge --device cuda" && timeout "${T_BENCH:-240}" python3 bench/bench_merge.py --size "$SIZE" --only copy,streammerge --device cuda --vram-budget 2GiB \
    --repeat 2 --workdir "$W" --keep --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log" | tail -22

want cpu && step "streammerge --device cpu on the same files" && timeout "${T_CPU:-120}" python3 bench/bench_merge.py --size "$SIZE" --only streammerge --device cpu \
    --workdir "$W" --keep --json "$OUT/bench_cpu.json" 2>&1 | tail -12

M="$W/model-$SIZE"
want verbose && step "one verbose CLI run on the GPU, and the plan's estimate" &&
    python3 -m streammerge plan "$M/base" "$M/adapter" -o /tmp/sm-verbose --device cuda --vram-budget 2GiB 2>&1 | tail -12 &&
    sync && { echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; true; } &&
    timeout 120 python3 -m streammerge merge "$M/base" "$M/adapter" -o /tmp/sm-verbose --device cuda --vram-budget 2GiB --overwrite 2>&1 | tr '\r' '\n' | tail -3
step "done"
