"""Data for the offline CapFilt demo (examples/blip_capfilt_easyvqa.sh), and its summary.

``prepare OUT``: easy-vqa images with captions from its annotations ("a red circle"), phrased
with a few templates. human.jsonl: 300 train images, true captions. web.jsonl: 900 other train
images whose captions are noisy as web alt-texts are: 40% describe another image, 5% are empty,
5% are the true caption buried in 60 words of junk (cut to 30 words / 30 tokens). noisy.jsonl:
human + web (what BLIP pre-trains on first). test.jsonl: 200 test images, true captions.

``summary OUT``: how clean the kept web captions are, and the two models' retrieval numbers.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TEMPLATES = ("a {}", "a picture of a {}", "there is a {}", "an image with a {}", "{} on white")


def _pairs(split: str, n: int, offset: int, rng: random.Random) -> list[dict]:
    from prismkit.datasets.easyvqa import EasyVQACaptions

    samples = EasyVQACaptions(split=split).samples[offset : offset + n]
    out = []
    for s in samples:
        thing = s.target[2:]  # "a red circle" -> "red circle"
        out.append(
            {"image": s.image, "caption": rng.choice(TEMPLATES).format(thing), "thing": thing}
        )
    return out


def prepare(out: Path) -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    human = _pairs("train", 300, 0, rng)
    web = _pairs("train", 900, 300, rng)
    things = sorted({p["thing"] for p in web})
    junk = ["lorem", "ipsum", "sale", "free", "shipping", "click", "here", "best", "price"]
    for p in web:
        r = rng.random()
        p["true"] = True
        if r < 0.40:
            p["caption"] = rng.choice(TEMPLATES).format(
                rng.choice([t for t in things if t != p["thing"]])
            )
            p["true"] = False
        elif r < 0.45:
            p["caption"] = rng.choice(["", "   ", ".", "!!"])
            p["true"] = False
        elif r < 0.50:
            p["caption"] = p["caption"] + " " + " ".join(rng.choice(junk) for _ in range(60))
    test = _pairs("test", 200, 0, rng)

    def write(name: str, rows: list[dict]) -> None:
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("human.jsonl", human)
    write("web.jsonl", web)
    write("noisy.jsonl", human + web)
    write("test.jsonl", test)
    print(
        f"human {len(human)}, web {len(web)} ({sum(not p['true'] for p in web)} wrong or empty), test {len(test)}"
    )


def summary(out: Path) -> None:
    web = [json.loads(x) for x in (out / "web.jsonl").read_text().splitlines()]
    truth = {p["image"]: p["thing"] for p in web}
    kept = [
        json.loads(x) for x in (out / "capfilt" / "bootstrapped.jsonl").read_text().splitlines()
    ]
    rows = {"web": [], "synthetic": []}
    for k in kept:
        if k["source"] in rows:
            rows[k["source"]].append(truth[k["image"]] in k["caption"])
    report = json.loads((out / "capfilt" / "capfilt.json").read_text())
    print(
        "CapFilt:",
        {k: report[k] for k in report if k.endswith(("kept", "dropped", "empty")) or k == "human"},
    )
    for src, ok in rows.items():
        if ok:
            print(
                f"  kept {src} captions naming the right colour and shape: {sum(ok)}/{len(ok)} ({100 * sum(ok) / len(ok):.1f}%)"
            )
    web_true = sum(p["true"] for p in web)
    print(
        f"  web captions that are true before filtering: {web_true}/{len(web)} ({100 * web_true / len(web):.1f}%)"
    )
    for name in ("noisy", "bootstrapped"):
        path = out / f"retrieval_{name}.json"
        if path.exists():
            m = json.loads(path.read_text())
            print(
                f"retrieval, pre-trained on {name:<12}: txt_r1 {m['txt_r1']:.1f} txt_r5 {m['txt_r5']:.1f} "
                f"img_r1 {m['img_r1']:.1f} img_r5 {m['img_r5']:.1f} r_mean {m['r_mean']:.2f}"
            )


if __name__ == "__main__":
    {"prepare": prepare, "summary": summary}[sys.argv[1]](Path(sys.argv[2]))
