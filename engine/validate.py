"""Check every sample of a dataset before step 0: text fits the model, the image is readable,
the label store has its labels. All bad samples are reported at once, by file and index, so a
bad caption fails the run before it starts rather than when its batch comes up.

``data.validate`` picks how images are checked: ``"header"`` (the default: the file opens and
its header gives a size within PIL's decompression-bomb limit; cheap: no pixel is decoded),
``"full"`` (every image is decoded: finds truncated files too, costs a full pass) or ``"off"``.
Text lengths are always checked (one batched tokenizer call) and, with a label store, label
presence (hashing each image file once, as training would).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from prismkit.core.data import Problems, VLDataset
from prismkit.core.processor import Processor, load_image

MODES = ("header", "full", "off")


def text_lengths(
    processor: Processor,
    prompts: Sequence[str],
    targets: Sequence[str],
    tasks: Sequence[str] | None = None,
) -> list[int]:
    """Tokens of each sample exactly as :meth:`Processor.encode` builds it (one batched tokenizer
    call): captions are ``[BOS] caption_text(prompt, target) [EOS]`` cut to
    ``text.caption_tokens`` (the reference truncates data captions); VQA rows are
    ``[BOS] question`` cut to ``text.question_tokens``, then ``answer [EOS]``."""
    text = processor.config.text
    tasks = list(tasks) if tasks is not None else ["caption"] * len(prompts)
    strings: list[str] = []
    for p, t, task in zip(prompts, targets, tasks, strict=True):
        if task == "vqa":
            strings += [processor.question_text(p), processor.answer_text(t)]
        else:
            strings.append(processor.caption_text(p, t))
    unique = sorted(set(strings))
    counts = dict(
        zip(
            unique,
            map(len, processor.tokenizer(unique, add_special_tokens=False)["input_ids"]),
            strict=True,
        )
    )
    out = []
    for p, t, task in zip(prompts, targets, tasks, strict=True):
        if task == "vqa":
            q = counts[processor.question_text(p)]
            out.append(min(1 + q, text.question_tokens) + counts[processor.answer_text(t)] + 1)
        else:
            out.append(min(2 + counts[processor.caption_text(p, t)], text.caption_tokens))
    return out


def check_image_file(path: str, decode: bool) -> str | None:
    """Why the image at ``path`` cannot be used, or ``None``. ``decode=False`` reads the header
    only (size, format, decompression-bomb limit)."""
    if decode:
        try:
            load_image(path)
        except ValueError as e:
            return str(e)
        return None
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        return f"image {path}: too large to decode safely ({e})"
    except (OSError, SyntaxError) as e:
        return f"image {path}: cannot be read ({e})"
    if w < 1 or h < 1:
        return f"image {path}: empty ({w}x{h})"
    return None


def validate_dataset(
    data: VLDataset,
    processor: Processor,
    *,
    images: str = "header",
    store=None,
    experts: Sequence[type] = (),
    skip_empty: bool = False,
) -> None:
    """Raise ``DataError`` listing every bad sample of ``data`` (by source file and index).

    Args:
        images: ``"header"``, ``"full"`` or ``"off"`` (see the module docstring).
        store: a ``LabelStore`` whose labels training reads; each sample's image must have the
            labels of every expert class in ``experts`` there.
        skip_empty: samples with an empty target are not checked (the training loop drops
            and counts them: empty captions are web-data noise); otherwise each is an error.
    """
    if images not in MODES:
        raise ValueError(f"data.validate must be one of {MODES}, got {images!r}")
    bad = Problems(f"dataset {data.name!r} ({len(data)} samples)")
    limit = processor.config.max_text_len
    samples = data.samples
    lengths = text_lengths(
        processor,
        [s.prompt for s in samples],
        [s.target for s in samples],
        [s.task for s in samples],
    )
    image_errors: dict[str, str | None] = {}
    label_errors: dict[str, str | None] = {}
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        where = f"sample {i} ({s.source})" if s.source else f"sample {i} (image {s.image_id})"
        if not s.target.strip():
            if skip_empty:
                continue
            bad.add(f"{where}: empty target text")
        if n > limit:
            bad.add(
                f"{where}: prompt + target is {n} tokens with BOS/EOS; the model takes at most "
                f"{limit} (max_text_len): shorten it, drop the sample, or raise max_text_len"
            )
        if not isinstance(s.image, str):
            continue
        if images != "off":
            if s.image not in image_errors:
                image_errors[s.image] = check_image_file(s.image, decode=images == "full")
            if image_errors[s.image]:
                bad.add(f"{where}: {image_errors[s.image]}")
                continue
        if store is not None and experts:
            if s.image not in label_errors:
                label_errors[s.image] = _missing_labels(store, s.image, experts)
            if label_errors[s.image]:
                bad.add(f"{where}: {label_errors[s.image]}")
    bad.check()


def _missing_labels(store, image: str, experts: Sequence[type]) -> str | None:
    try:
        missing = [e.name for e in experts if not store.has(image, e)]
    except (OSError, ValueError) as e:
        return f"image {image}: cannot be hashed for the label store ({e})"
    if not missing:
        return None
    return (
        f"label store {store.root} has no {', '.join(missing)} labels for image {image}: run "
        f"`prismkit experts run IMAGES --store {store.root} --experts {','.join(missing)}`"
    )
