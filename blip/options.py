"""BLIP's typed options (a config's ``head_options`` table), one comment per field."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prismkit.core.config import ConfigError, _build

# the three tasks of BLIP's released models, as ``ModelConfig.head``
PRETRAIN, RETRIEVAL, CAPTION = "blip_pretrain", "blip_retrieval", "blip_caption"
TASKS = (PRETRAIN, RETRIEVAL, CAPTION)


@dataclass
class BlipOptions:
    # ITC projection size E
    embed_dim: int = 256
    # momentum features kept per modality (columns of the (E, Q) queues)
    queue_size: int = 57600
    # EMA factor of the momentum encoders, applied once per optimizer step
    momentum: float = 0.995
    # weight of the momentum-distilled soft ITC targets
    alpha: float = 0.4
    # optimizer steps over which alpha ramps linearly from 0 (BLIP: 2 epochs in pre-training,
    # 1 in retrieval fine-tuning); 0 = alpha from the first step
    alpha_ramp_steps: int = 0
    # initial ITC temperature (learnt, clamped to [0.001, 0.5])
    temp: float = 0.07
    # retrieval: draw ITM hard negatives from every process's batch (BLIP's retrieval configs)
    negative_all_rank: bool = True
    # captioning prompt (its tokens carry no loss; cut from generated captions by characters)
    prompt: str = "a picture of "
    # dropout of the BERT text model (hidden states and attention probabilities)
    text_dropout: float = 0.1
    # ViT stochastic depth at the last block (BLIP: 0 for ViT-B, 0.1 for ViT-L)
    drop_path: float = 0.0
    # ViT blocks recomputed in the backward pass when gradient checkpointing is on (the last N)
    vit_checkpoint_layers: int = 0
    # token ids: [DEC] (decoder BOS), [ENC], [PAD], [SEP] (EOS) in BLIP's tokenizer
    dec_token_id: int = 30522
    enc_token_id: int = 30523
    pad_token_id: int = 0
    sep_token_id: int = 102
    # caption beam search (configs/caption_coco.yaml): beams, total length incl. the prompt
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0
    # nucleus sampling (BLIP_Decoder.generate(sample=True); top_k is transformers' default 50)
    top_p: float = 0.9
    top_k: int = 50
    sample_repetition_penalty: float = 1.1
    # retrieval evaluation: ITC candidates re-ranked by ITM per query
    k_test: int = 256
    # pre_caption's word limit for data captions
    max_words: int = 30

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "head_options") -> BlipOptions:
        opts = _build(cls, data, source, "head_options.")
        if opts.queue_size < 1 or opts.embed_dim < 1:
            raise ConfigError(f"{source}: queue_size and embed_dim must be >= 1")
        if not 0 <= opts.momentum <= 1 or not 0 <= opts.alpha <= 1:
            raise ConfigError(
                f"{source}: momentum and alpha must be in [0, 1]; got {opts.momentum}, {opts.alpha}"
            )
        return opts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
