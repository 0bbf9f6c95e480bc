"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by tests/test_blip_distributed.py.

Each rank writes ``OUT/rank{r}.safetensors``: the gradient that reached its own tensors through
``gather_with_grad`` (the core function), and through BLIP's ITM with hard negatives drawn from
the other process (``BlipModel._matching(world=True)``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from prismkit.core.config import resolve_config
from prismkit.core.distributed import gather_padded, gather_with_grad
from prismkit.core.host import get_plugin_manager
from prismkit.core.model import create_model

B = 3


def world_batch(model, world: int):
    """The same global batch on every rank (seeded): pixels, ids, masks of ``world * B`` pairs;
    every rank's negatives come from the next rank."""
    g = torch.Generator().manual_seed(1)
    n, s = world * B, model.config.vision.image_size
    pixels = torch.randn(n, 3, s, s, generator=g)
    ids = torch.randint(1000, 3000, (n, 7), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[::2, -2:] = 0
    ids[::2, -2:] = 0
    neg_image = (torch.arange(n) + B) % n  # the same row of the next rank
    neg_text = (torch.arange(n) + 2 * B - 1) % n
    return pixels, ids, mask, neg_image, neg_text


def tiny_retrieval(host):
    cfg = resolve_config(host, "blip_tiny")
    cfg.head = "blip_retrieval"
    torch.manual_seed(0)
    return create_model(cfg, host, pretrained=False).eval()  # dropout off: ranks comparable


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    # 1. the core function: every process's loss reaches every slice's owner
    weights = torch.randn(w, 3 * w, 2, generator=torch.Generator().manual_seed(0))
    x = ((r + 1) * torch.arange(6.0).view(3, 2)).requires_grad_()
    gathered = gather_with_grad(x)
    (weights[r] * gathered).sum().backward()
    ids_w, mask_w = gather_padded(torch.ones(2, 3 + r, dtype=torch.long), torch.ones(2, 3 + r))
    # 2. BLIP's ITM with world negatives
    host = get_plugin_manager()
    model = tiny_retrieval(host)
    pixels, ids, mask, neg_image, neg_text = world_batch(model, w)
    mine = slice(r * B, (r + 1) * B)
    with torch.no_grad():
        embeds = model.image_embeds(pixels[mine])
    embeds.requires_grad_()
    dummy = torch.ones(B, w * B)
    out_itm = model._matching(
        ids[mine], mask[mine], embeds, dummy, dummy, neg_image[mine], neg_text[mine], world=True
    )
    out_itm["loss_itm"].backward()
    save_file(
        {
            "gathered": gathered.detach(),
            "x_grad": x.grad,
            "ids_world": ids_w,
            "embeds_grad": embeds.grad,
            "loss_itm": out_itm["loss_itm"].detach().reshape(1),
        },
        str(out / f"rank{r}.safetensors"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
