#!/usr/bin/env bash
# The NCF paper's protocol (experiment=ncf_paper) on the bundled ML-100K: GMF, MLP and NeuMF at
# predictive factors 8, 16, 32, 64, NeuMF with and without pre-training (from the GMF and MLP run
# of the same factor). Writes docs/ncf_paper_ml100k.{md,tex,csv}.
#   bash scripts/reproduce_ncf_paper.sh [output root, default outputs/ncf_paper_ml100k]
# DATA=ml1m runs the paper's own dataset (downloads from GroupLens; then compare with the paper
# via the --reference line printed at the end). DIMS="8 16" runs a subset. EXTRA="key=value ..."
# adds overrides to every run (e.g. EXTRA="optim.fused=false" reproduces docs/ bit for bit).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-outputs/ncf_paper_ml100k}
DATA=${DATA:-ml100k}
PY=${PYTHON:-python}
# skip_completed: a rerun keeps the runs that finished (delete the root to start over).
run() {
  "$PY" -m recsys_compress.train experiment=ncf_paper data=$DATA trainer.progress_bar=false \
    skip_completed=true ${EXTRA:-} "$@"
}
for dim in ${DIMS:-8 16 32 64}; do
  run model=gmf model.dim=$dim hydra.run.dir=$ROOT/gmf/$dim
  run model=mlp model.dim=$dim hydra.run.dir=$ROOT/mlp/$dim
  run model=neumf model.dim=$dim hydra.run.dir=$ROOT/neumf/$dim
  run model=neumf model.dim=$dim model.pretrained_gmf=$ROOT/gmf/$dim \
    model.pretrained_mlp=$ROOT/mlp/$dim hydra.run.dir=$ROOT/neumf_pretrained/$dim
done
OUT=${OUT:-docs/ncf_paper_$DATA}
"$PY" scripts/make_table.py "$ROOT" --rows model.name pretrained --cols model.dim \
  --metrics hr@10 ndcg@10 --out "$OUT"
echo "ML-1M: add --reference ncf_paper to print the paper's Table 2 beside ours"
