#!/usr/bin/env bash
# BLIP offline, end to end: train the offline BLIP variant on easy-vqa's derived captions, then
# image-text retrieval R@1/5/10 on easy-vqa's test images, then CapFilt on a noisy "web" set
# (half the captions true, half shuffled). Usage: examples/blip_capfilt_easyvqa.sh [OUT] [STEPS]
set -euo pipefail
OUT=${1:-runs/blip}
STEPS=${2:-300}
PK=${PRISMKIT:-.venv/bin/prismkit}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
$PK train offline_default_blip --set 'data.dataset="easyvqa_captions"' --set vision.image_size=64 \
    --steps "$STEPS" --batch-size 32 --lr 1e-3 --eval-questions 0 --out-dir "$OUT"
$PY - "$OUT" <<'PY'
import json, random, sys
from pathlib import Path
from prismkit.datasets.easyvqa import EasyVQACaptions
out = Path(sys.argv[1])
test = EasyVQACaptions(split="test")
rows = [{"image": s.image, "caption": s.target} for s in test.samples[:200]]
(out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
train = EasyVQACaptions(split="train").samples[:64]
rng = random.Random(0)
web = []
for i, s in enumerate(train):
    wrong = rng.choice([t.target for t in train if t.target != s.target])
    web.append({"image": s.image, "caption": s.target if i % 2 == 0 else wrong, "true": i % 2 == 0})
(out / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in web))
PY
echo "== retrieval on 200 easy-vqa test images (one caption each; only 24 distinct captions exist)"
$PK retrieval "$OUT/model.safetensors" "$OUT/test.jsonl" | tee "$OUT/retrieval.txt"
echo "== CapFilt on 64 'web' pairs (32 true captions, 32 shuffled)"
$PK capfilt "$OUT/web.jsonl" --captioner "$OUT/model.safetensors" --filter "$OUT/model.safetensors" \
    --out "$OUT/capfilt.jsonl" --min-length 2 --max-length 8 | tee "$OUT/capfilt.txt"
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
truth = {(r["image"], r["caption"]): r["true"] for r in map(json.loads, (out / "web.jsonl").read_text().splitlines())}
kept = [json.loads(x) for x in (out / "capfilt.jsonl").read_text().splitlines()]
web_kept = [k for k in kept if k.get("source") == "web"]
true_kept = sum(truth.get((k["image"], k["caption"]), False) for k in web_kept)
print(f"web pairs kept: {len(web_kept)} of 64; of those true: {true_kept} (true pairs in the input: 32)")
PY
