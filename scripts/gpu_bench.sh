#!/usr/bin/env bash
# The GPU benchmark (README "Performance", issue #5 "On a GPU") on a CUDA machine that has torch
# and lightning but no network, e.g. the lent H200 (python3 3.12, torch 2.11, lightning 2.6.6).
#
#   here, with network:   make gpu-bundle            # .gpu/: wheels + the ML-100K ratings file
#   on the GPU machine:   bash scripts/gpu_bench.sh  # with .gpu carried along
#
# Installs the carried wheels into /tmp/site, names the card, then runs
# `python3 scripts/bench.py --only gpu` (training and evaluation figures on CUDA, full precision
# and bf16-mixed). Writes gpu.json and gpu.log to $OUT (or the current folder).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
if [ ! -d .gpu/wheels ]; then
  echo "scripts/gpu_bench.sh: .gpu/wheels is missing: run 'make gpu-bundle' first and carry .gpu" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH="/tmp/site:$PWD" RECSYS_COMPRESS_CACHE="$PWD/.gpu/cache" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', \
lightning.__version__, 'cuda', torch.cuda.is_available())"
# optim.sparse on CUDA: RowSparseAdam's fused row update against torch's fused Adam (CPU-tested
# only until a GPU run: its step count must live on the parameter's device).
python3 - <<'PY' 2>&1 | tee "$out/gpu_sparse_adam.log" || true
import torch
from recsys_compress.optim import RowSparseAdam
gen = torch.Generator().manual_seed(0)
start = torch.randn(30, 8, generator=gen).cuda()
ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
opt, ref = RowSparseAdam([ours], lr=0.05), torch.optim.Adam([theirs], lr=0.05, fused=True)
for _ in range(4):
    grad = torch.randn(30, 8, generator=gen).cuda()
    ours.grad, theirs.grad = grad.to_sparse(sparse_dim=1), grad.clone()
    opt.step(); ref.step()
print("RowSparseAdam on CUDA equals Adam(fused=True):", torch.equal(ours, theirs))
PY
python3 scripts/bench.py --only gpu --json "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
