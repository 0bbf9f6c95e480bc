"""Prismer's label space: the reference's feature tables, background vector and PCA, converted
once (safe reads only) and used to embed semantic labels as the reference does."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_label_embedding import tiny_clip  # noqa: F401 - the tiny CLIP text tower fixture

from prismkit.core.cli import main
from prismkit.labels.embedding import COCO_PANOPTIC, TextEncoder
from prismkit.labels.prismer_space import PrismerLabelSpace, convert_label_space, read_pca_pickle


@pytest.fixture
def reference_dataset(tmp_path: Path) -> Path:
    """Files shaped as the reference's dataset/ folder (random values; real names and sizes)."""
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "dataset"
    folder.mkdir()
    names = [n.replace("wall-other-merged", "other type of wall") for n in COCO_PANOPTIC]
    torch.save(
        {"labels": names, "features": torch.randn(133, 8, generator=g)}, folder / "coco_features.pt"
    )
    torch.save(
        {"labels": ["bottle", "cup", "person"], "features": torch.randn(3, 8, generator=g)},
        folder / "detection_features.pt",
    )
    torch.save(torch.randn(8, generator=g), folder / "background_features.pt")
    pca = PCA(n_components=8, random_state=0).fit(np.random.default_rng(0).normal(size=(40, 16)))
    with open(folder / "clip_pca.pkl", "wb") as f:
        pickle.dump(pca, f)
    return folder


def test_convert_and_embed_as_the_reference(reference_dataset, tmp_path, tiny_clip):  # noqa: F811
    out = tmp_path / "space.safetensors"
    assert main(["convert", "prismer-labels", str(reference_dataset), "--out", str(out)]) == 0
    assert main(["convert", "prismer-labels", str(reference_dataset), "--out", str(out)]) == 2
    space = PrismerLabelSpace.load(out, encoder=str(tiny_clip))
    coco = torch.load(reference_dataset / "coco_features.pt", weights_only=True)["features"]
    det = torch.load(reference_dataset / "detection_features.pt", weights_only=True)["features"]
    bg = torch.load(reference_dataset / "background_features.pt", weights_only=True)
    rows = space.embed(["background", "person", "wall-other-merged", "other type of wall"], "coco")
    assert torch.equal(rows[0], bg) and torch.equal(rows[1], coco[0])
    assert torch.equal(rows[2], coco[131]) and torch.equal(rows[3], coco[131])  # standard names too
    assert torch.equal(space.embed(["person"], "detection")[0], det[2])  # the expert's own table
    # free text (OCR words): CLIP's projected text features, NOT normalised, through the PCA
    with open(reference_dataset / "clip_pca.pkl", "rb") as f:
        pca = pickle.load(f)  # noqa: S301 - the test's own file, to compare with sklearn
    raw = TextEncoder(str(tiny_clip), normalize=False)(["stop", "open"]).numpy()
    want = torch.from_numpy(pca.transform(raw)).float()
    torch.testing.assert_close(space.embed(["stop", "open"], None), want, atol=1e-5, rtol=1e-5)


def test_the_pca_pickle_is_parsed_with_an_allow_list(reference_dataset, tmp_path):
    p = read_pca_pickle(reference_dataset / "clip_pca.pkl")
    assert p["components"].shape == (8, 16) and p["mean"].shape == (16,)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing builtins.print"):
        read_pca_pickle(bad)


def test_a_model_config_selects_the_label_space(reference_dataset, tmp_path):
    from prismkit.labels.feeder import label_embedder

    out = convert_label_space(reference_dataset, tmp_path / "space.safetensors")
    assert isinstance(label_embedder(str(out)), PrismerLabelSpace)
    with pytest.raises(ValueError, match="not a Prismer label space"):
        PrismerLabelSpace.load(reference_dataset / "coco_features.pt")
