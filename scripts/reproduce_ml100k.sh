#!/usr/bin/env bash
# Reproduce the README's ML-100K table: MF and NeuMF on both protocols, seeds 0 1 2.
#   bash scripts/reproduce_ml100k.sh [output root, default outputs/reproduce_ml100k]
# (SEEDS="0 1" runs a subset of the seeds, e.g. to split the work over machines)
# Then: python scripts/make_table.py <root> --group-by model.name split.name eval.protocol
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-outputs/reproduce_ml100k}
PY=${PYTHON:-python}
# skip_completed: a rerun keeps the runs that finished (delete the root to start over).
run() { "$PY" -m recsys_compress.train trainer.progress_bar=false skip_completed=true "$@"; }
for seed in ${SEEDS:-0 1 2}; do
  run experiment=ml100k_ratio_mf seed=$seed hydra.run.dir=$ROOT/ratio_mf/$seed
  run experiment=ml100k_ratio_neumf seed=$seed hydra.run.dir=$ROOT/ratio_neumf/$seed
  run experiment=ml100k_loo_mf seed=$seed hydra.run.dir=$ROOT/loo_mf/$seed
  # NeuMF on leave-one-out is pre-trained from GMF and MLP (NCF paper); those two runs are
  # kept out of the table's root so they are not mistaken for results.
  run experiment=ml100k_loo_mf model=gmf model.dim=32 seed=$seed hydra.run.dir=$ROOT-pretrain/gmf/$seed
  run experiment=ml100k_loo_mf model=mlp model.dim=32 seed=$seed hydra.run.dir=$ROOT-pretrain/mlp/$seed
  run experiment=ml100k_loo_neumf seed=$seed model.pretrained_gmf=$ROOT-pretrain/gmf/$seed \
    model.pretrained_mlp=$ROOT-pretrain/mlp/$seed hydra.run.dir=$ROOT/loo_neumf/$seed
done
"$PY" scripts/make_table.py "$ROOT" --group-by split.name model.name \
  --metrics ndcg@10 hr@10 recall@10
