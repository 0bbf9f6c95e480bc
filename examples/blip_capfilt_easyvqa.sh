#!/usr/bin/env bash
# BLIP's CapFilt offline, end to end, on easy-vqa (CPU, no network beyond PyPI):
#  1. pre-train BLIP (offline_blip: MiniLM-initialised MED, small ViT) on human + noisy web pairs
#  2. CapFilt: fine-tune a captioner and a filter from it on the human pairs, caption the web
#     images (nucleus sampling), filter web + synthetic captions with ITM
#  3. pre-train a new BLIP on the bootstrapped dataset, same budget
#  4. retrieval R@1/5 of both pre-trained models on 200 easy-vqa test images
# Usage: examples/blip_capfilt_easyvqa.sh [OUT] [PRETRAIN_STEPS] [FINETUNE_STEPS]
set -euo pipefail
OUT=${1:-runs/blip_capfilt}
STEPS=${2:-150}
FT=${3:-80}
PK=${PRISMKIT:-.venv/bin/prismkit}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
HERE=$(dirname "$0")
$PY "$HERE/blip_capfilt_easyvqa.py" prepare "$OUT"
pretrain() {  # $1 = data file, $2 = run folder
    $PK train offline_blip --set 'data.dataset="blip_pairs"' --set "data.options.train=\"$1\"" \
        --steps "$STEPS" --batch-size 16 --lr 1e-4 --warmup 10 --eval-questions 0 --log-every 25 \
        --out-dir "$2"
}
echo "== 1. pre-train on human + noisy web pairs ($STEPS steps)"
pretrain "$OUT/noisy.jsonl" "$OUT/pretrain_noisy"
echo "== 2. CapFilt ($FT fine-tuning steps per model)"
$PK capfilt "$OUT/web.jsonl" --human "$OUT/human.jsonl" --init "$OUT/pretrain_noisy/model.safetensors" \
    --out "$OUT/capfilt" --steps "$FT" --batch-size 16 --lr 1e-4 --max-length 12 --min-length 6
echo "== 3. pre-train on the bootstrapped dataset ($STEPS steps)"
pretrain "$OUT/capfilt/bootstrapped.jsonl" "$OUT/pretrain_bootstrapped"
echo "== 4. retrieval on 200 test images"
for name in noisy bootstrapped; do
    $PK retrieval "$OUT/pretrain_$name/model.safetensors" "$OUT/test.jsonl" --k-test 16 \
        --out "$OUT/retrieval_$name.json"
done
$PY "$HERE/blip_capfilt_easyvqa.py" summary "$OUT"
