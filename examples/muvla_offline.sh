#!/usr/bin/env bash
# mu-VLA offline, end to end, on 2 CPU cores in a few minutes: unpaired easy-vqa images and an
# unpaired text corpus -> a weakly aligned corpus by tag retrieval -> the multi-granular objective
# (offline_default_muvla) -> what the ITM-score curriculum weighs, step by step and by truth.
#
# The images' true captions ("a red circle", derived from easy-vqa's annotations) are never given
# to the builder or the trainer; the script uses them only to score the retrieval and the weights.
# Usage: examples/muvla_offline.sh [OUT] [STEPS] [WARMUP] [IMAGES] [NEGATIVES]
# (NEGATIVES: "retrieval", hard in-batch negatives by retrieval similarity, or "random", the paper's)
set -euo pipefail
OUT=${1:-runs/muvla}
STEPS=${2:-120}
WARMUP=${3:-60}
IMAGES=${4:-256}
NEGATIVES=${5:-retrieval}
PK=${PRISMKIT:-.venv/bin/prismkit}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# One thread per process: on a shared, oversubscribed machine torch's second OpenMP thread waits
# for a core on every op (measured here at load ~13 on 2 cores: 17 s per training step with 2
# threads, 2.4 s with 1). On an idle machine set OMP_NUM_THREADS=2.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

echo "== 1. unpaired data: $IMAGES easy-vqa training images; a corpus of shape sentences + distractors"
$PY - "$OUT" "$IMAGES" <<'PY'
import json, random, sys
from pathlib import Path
from prismkit.datasets.easyvqa import COLORS, SHAPES, EasyVQACaptions

out, n = Path(sys.argv[1]), int(sys.argv[2])
samples = EasyVQACaptions(split="train").samples[:n]
(out / "images.txt").write_text("".join(s.image + "\n" for s in samples))
(out / "truth.json").write_text(json.dumps({s.image: s.target for s in samples}))
shape_templates = [
    "a {c} {s} on a white background",
    "there is a {c} {s} in the picture",
    "the drawing shows a {c} {s}",
    "a simple {c} {s} shape",
    "someone painted a {c} {s}",
]
shape_sents = [t.format(c=c, s=s) for t in shape_templates for c in COLORS for s in SHAPES]
subjects = ["the dog", "a cat", "my neighbour", "the old horse", "a small bird", "the teacher"]
verbs = ["sleeps", "waits", "sings", "walks"]
places = ["in the park", "on the sofa", "near the river", "at the station", "under a tree"]
other = [f"{a} {v} {p}" for a in subjects for v in verbs for p in places]
corpus = shape_sents + other
random.Random(0).shuffle(corpus)
(out / "corpus.txt").write_text("\n".join(corpus) + "\n")
print(f"{len(samples)} images, corpus of {len(corpus)} sentences "
      f"({len(shape_sents)} about shapes, {len(other)} distractors)")
PY

echo "== 2. prismkit muvla build (tags by capability: a detector if one is enabled with weights, else classifier tags)"
$PK muvla build --images "$OUT/images.txt" --corpus "$OUT/corpus.txt" --out "$OUT/pairs.jsonl" \
    --k 5 --image-batch 64 | tee "$OUT/build.txt"

echo "== 3. retrieval against the hidden truth"
$PY - "$OUT" <<'PY' | tee "$OUT/retrieval.txt"
import collections, json, sys
from pathlib import Path
from prismkit.datasets.easyvqa import COLORS, SHAPES

out = Path(sys.argv[1])
truth = json.loads((out / "truth.json").read_text())
rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
corpus = (out / "corpus.txt").read_text().split("\n")[:-1]

def words(t):
    return set(t.lower().split())

def match(sent, cap):
    _, colour, shape = cap.split()
    w = words(sent)
    return colour in w, shape in w

hits = collections.Counter()
for r in rows:
    c, s = match(r["sentence"], truth[r["image"]])
    hits["colour"] += c
    hits["shape"] += s
    hits["both"] += c and s
    hits["about shapes"] += bool(words(r["sentence"]) & set(SHAPES))
n = len(rows)
chance = collections.Counter()
for cap in set(truth.values()):
    w = sum(truth[i] == cap for i in truth)
    for sent in corpus:
        c, s = match(sent, cap)
        chance["colour"] += w * c
        chance["shape"] += w * s
        chance["both"] += w * (c and s)
        chance["about shapes"] += w * bool(words(sent) & set(SHAPES))
m = len(truth) * len(corpus)
print(f"{n} pairs for {len({r['image'] for r in rows})} images (K=5)")
for k in ("about shapes", "colour", "shape", "both"):
    print(f"  precision@5 {k:<13} {hits[k] / n:.3f}   (a random corpus sentence: {chance[k] / m:.3f})")
tags = collections.Counter(t for r in rows if r["rank"] == 1 for t in r["tags"])
print("  most frequent tags:", ", ".join(f"{t} ({c})" for t, c in tags.most_common(8)))
PY

echo "== 4. train offline_default_muvla ($STEPS steps, ITM weighting after $WARMUP, $NEGATIVES negatives)"
$PK train offline_default_muvla --set 'data.dataset="muvla_pairs"' \
    --set "data.options={pairs=\"$OUT/pairs.jsonl\"}" --set vision.image_size=64 \
    --set "head_options.warmup_steps=$WARMUP" --set "head_options.negatives=\"$NEGATIVES\"" \
    --steps "$STEPS" --batch-size 8 --lr 3e-4 \
    --eval-questions 0 --out-dir "$OUT/train" 2>&1 | grep -v "^$" | tee "$OUT/train.txt"

echo "== 5. the curriculum: weights per step (log.jsonl) and by truth (the trained ITM head)"
$PY - "$OUT" <<'PY' | tee "$OUT/curriculum.txt"
import json, statistics, sys
from pathlib import Path
import torch
from prismkit.core.checkpoint import load_checkpoint
from prismkit.core.processor import Processor
from prismkit.datasets.easyvqa import COLORS, SHAPES

out = Path(sys.argv[1])
log = [json.loads(x) for x in (out / "train" / "log.jsonl").read_text().splitlines()]
print("step  weighted  w_min  w_q25  w_med  w_q75  w_max  itm_acc  neg_sim  pos_sim  loss")
for r in log:
    p = r["parts"]
    if r["step"] % 10 == 0 or r["step"] == log[-1]["step"]:
        print(f"{r['step']:4d}  {p['weighted']:8.0f}  {p['w_min']:.3f}  {p['w_q25']:.3f}  "
              f"{p['w_median']:.3f}  {p['w_q75']:.3f}  {p['w_max']:.3f}  {p['itm_acc']:7.3f}  "
              f"{p.get('neg_sim', float('nan')):7.3f}  {p.get('pos_sim', float('nan')):7.3f}  {r['loss']:.3f}")
truth = json.loads((out / "truth.json").read_text())
rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
model = load_checkpoint(out / "train" / "model.safetensors").eval()
proc = Processor.from_config(model.config)
by = {"both": [], "shape only": [], "colour only": [], "neither": []}
with torch.no_grad():
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        images = proc.images([r["image"] for r in chunk])
        enc = proc.tokenizer([r["sentence"] for r in chunk], padding=True, return_tensors="pt")
        w = model.objective.match_probability(model, images, enc["input_ids"], enc["attention_mask"])
        for r, p in zip(chunk, w.tolist()):
            _, colour, shape = truth[r["image"]].split()
            s = set(r["sentence"].split())
            key = ("both" if colour in s and shape in s else "shape only" if shape in s
                   else "colour only" if colour in s else "neither")
            by[key].append(p)
print("ITM weight of the retrieved pairs after training, by how well the sentence fits the image:")
for k, v in by.items():
    if v:
        print(f"  {k:<12} {len(v):5d} pairs  mean weight {statistics.mean(v):.3f}")
PY
