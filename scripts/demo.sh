#!/usr/bin/env bash
# The main job on the bundled default model, offline: prune SmolLM2-135M to 70% with Wanda, verify it,
# repair it with SEFT on bundled text (LAMBADA passages, train split), verify again, and print held-out
# perplexity before and after (the first 8 windows of 512 tokens of the held-out passages).
# Usage: scripts/demo.sh [RUN_DIR]   (run through `make demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
SEFTKIT=${SEFTKIT:-.venv/bin/seftkit}
mkdir -p "$RUN"
START=$SECONDS
stage() { echo "   ($((SECONDS - STAGE)) s)"; STAGE=$SECONDS; }
STAGE=$SECONDS

echo "== 1/4 prune smollm2-135m to 70% with Wanda (16 x 512 calibration tokens)"
$SEFTKIT prune smollm2-135m --method wanda --sparsity 0.7 --nsamples 16 --seqlen 512 \
    --out "$RUN/pruned" --overwrite --json "$RUN/prune.json"
stage

echo "== 2/4 verify the pruned model"
$SEFTKIT verify "$RUN/pruned" --sparsity 0.7 --json "$RUN/verify-pruned.json"
stage

echo "== 3/4 repair with SEFT (sparsity kept, pruned weights may come back where they matter)"
$SEFTKIT repair "$RUN/pruned" --method seft --steps 40 --batch-size 2 --seqlen 128 --lr 3e-3 \
    --warmup-steps 4 --max-grad-norm 1 --update-interval 10 --drop-rate 0.5 \
    --eval-ppl olmo:lambada:heldout --eval-windows 8 --out "$RUN/repaired" --overwrite --json "$RUN/repair.json"
stage

echo "== 4/4 verify the repaired model"
$SEFTKIT verify "$RUN/repaired" --sparsity 0.7 --plot "$RUN/verify-repaired.png" --json "$RUN/verify-repaired.json"
stage

# the instruction set decides both the speed and the last digits of the numbers, so name it with the time
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo || true)
case "$FLAGS" in
  *avx512_bf16*) ISA="AVX-512 BF16" ;;
  *avx512f*) ISA="AVX-512" ;;
  *avx2*) ISA="AVX2" ;;
  *) ISA="no AVX2" ;;
esac
echo "main job: $((SECONDS - START)) s on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($ISA), $(nproc) cores"
echo "reports in $RUN/*.json, pictures in $RUN/*.png; models in $RUN/pruned and $RUN/repaired"
