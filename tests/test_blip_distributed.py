"""Hard negatives gathered from other processes train their owners: two CPU processes (torchrun,
gloo) check the gather and the gradient against a one-process computation of the same losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dist_gather_worker import B, tiny_retrieval, world_batch  # noqa: E402

from prismkit.blip.text import with_first_token  # noqa: E402
from prismkit.core.host import get_plugin_manager  # noqa: E402


def test_gathered_negatives_send_their_gradient_home(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_port=29531", str(HERE / "dist_gather_worker.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    w = len(ranks)

    # the core function: gathered in rank order; each slice's owner gets every rank's gradient
    xs = [(r + 1) * torch.arange(6.0).view(3, 2) for r in range(w)]
    weights = torch.randn(w, 3 * w, 2, generator=torch.Generator().manual_seed(0))
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["gathered"], torch.cat(xs))
        want = weights[:, 3 * r : 3 * (r + 1)].sum(0)  # sum over every rank's loss
        torch.testing.assert_close(got["x_grad"], want)
        assert got["ids_world"].shape == (2 * w, 4)  # right-padded to the longest

    # BLIP's ITM: one process holding the whole batch computes sum_r loss_r
    model = tiny_retrieval(get_plugin_manager())
    pixels, ids, mask, neg_image, neg_text = world_batch(model, w)
    with torch.no_grad():
        embeds = model.image_embeds(pixels)
    embeds.requires_grad_()
    enc = with_first_token(ids, model.options.enc_token_id)
    total = 0.0
    for r in range(w):
        m = slice(r * B, (r + 1) * B)
        text = torch.cat([enc[m], enc[m], enc[neg_text[m]]])
        att = torch.cat([mask[m], mask[m], mask[neg_text[m]]])
        image = torch.cat([embeds[m], embeds[neg_image[m]], embeds[m]])
        logits = model.itm_head(model.text_encoder(text, att, image)[:, 0, :])
        loss = F.cross_entropy(logits, torch.cat([torch.ones(B), torch.zeros(2 * B)]).long())
        torch.testing.assert_close(ranks[r]["loss_itm"][0], loss.detach(), atol=1e-5, rtol=1e-5)
        total = total + loss
    total.backward()
    for r in range(w):
        own = embeds.grad[r * B : (r + 1) * B]
        assert own.abs().sum() > 0
        torch.testing.assert_close(ranks[r]["embeds_grad"], own, atol=1e-5, rtol=1e-4)
