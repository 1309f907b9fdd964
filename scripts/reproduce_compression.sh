#!/usr/bin/env bash
# Compression of MF on ML-100K (README, "Compression of MF"): each method, seeds 0 1 2.
#   bash scripts/reproduce_compression.sh [output root, default outputs/reproduce_compression]
# (SEEDS="0 1" runs a subset of the seeds.) Each run trains the dense model first
# (compression.dense_epochs), so every record holds dense and compressed metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-outputs/reproduce_compression}
PY=${PYTHON:-python}
run() { "$PY" -m recsys_compress.train trainer.progress_bar=false "$@"; }
for seed in ${SEEDS:-0 1 2}; do
  run compression=qat seed=$seed hydra.run.dir=$ROOT/int8/$seed
  run compression=qat compression.qat.bits=4 seed=$seed hydra.run.dir=$ROOT/int4/$seed
  run compression=svd seed=$seed hydra.run.dir=$ROOT/svd_half/$seed
  run compression=prune seed=$seed hydra.run.dir=$ROOT/prune80/$seed
  run compression=prune compression.prune.sparsity=0.9 seed=$seed hydra.run.dir=$ROOT/prune90/$seed
  run seed=$seed hydra.run.dir=$ROOT/prune80_int8/$seed
done
"$PY" scripts/make_table.py "$ROOT" \
  --group-by compression.prune.sparsity compression.qat.bits compression.svd.param_ratio \
  --metrics compression.artifact_ratio dense.test.ndcg@10 ndcg@10 share:ndcg@10
