#!/usr/bin/env bash
# Compression on ML-100K (README, "Compression"): each method, seeds 0 1 2.
#   bash scripts/reproduce_compression.sh [output root, default outputs/reproduce_compression/<model>]
# MODEL=neumf runs NeuMF (default mf); SEEDS="0 1" runs a subset of the seeds. Each run trains the
# dense model first (compression.dense_epochs), so every record holds dense and compressed metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-mf}
ROOT=${1:-outputs/reproduce_compression/$MODEL}
PY=${PYTHON:-python}
# MF / GMF: the joint SVD of the score matrix (their tables feed a dot product); others per layer.
# NeuMF overfits when fine-tuned at its training learning rate: it compresses at a tenth of it.
case $MODEL in
  mf | gmf) SVD=joint_dot_product STAGE=() ;;
  *) SVD=per_layer STAGE=(compression.lr=0.0002) ;;
esac
# skip_completed: a rerun keeps the runs that finished (delete the root to start over).
run() {
  "$PY" -m recsys_compress.train model="$MODEL" trainer.progress_bar=false skip_completed=true \
    "${STAGE[@]}" "$@"
}
for seed in ${SEEDS:-0 1 2}; do
  run compression=qat seed=$seed hydra.run.dir=$ROOT/int8/$seed
  run compression=qat compression.qat.post_training=true seed=$seed hydra.run.dir=$ROOT/ptq8/$seed
  run compression=qat compression.qat.bits=4 seed=$seed hydra.run.dir=$ROOT/int4/$seed
  run compression=svd compression.svd.method=$SVD seed=$seed hydra.run.dir=$ROOT/svd_half/$seed
  run compression=prune seed=$seed hydra.run.dir=$ROOT/prune80/$seed
  run compression=prune compression.prune.sparsity=0.9 seed=$seed hydra.run.dir=$ROOT/prune90/$seed
  run seed=$seed hydra.run.dir=$ROOT/prune80_int8/$seed
done
"$PY" scripts/make_table.py "$ROOT" \
  --group-by compression.methods compression.prune.sparsity compression.qat.bits \
  compression.qat.post_training \
  --metrics compression.artifact_ratio dense.test.ndcg@10 ndcg@10 share:ndcg@10
