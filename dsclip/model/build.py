"""Build an open_clip model for training: the architecture by name, its transforms and
tokenizer, the engine-facing wrapper, and activation checkpointing."""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from dsclip.logs import DropMessages, debug_enabled
from dsclip.model.architectures import registered
from dsclip.model.config import ModelConfig
from dsclip.model.pretrained import load_pretrained


class ContrastiveModel(nn.Module):
    """What the DeepSpeed engine wraps: every forward, for training and evaluation, goes
    through here so that ZeRO-3 gathers the parameters each tower needs.

    Returns (image_features, text_features, logit_scale, logit_bias); features are L2-normalised,
    None for a tower given no input; logit_scale is exp(logit_scale) (the parameter is clamped
    after each optimizer step: training/temperature.py) and logit_bias None for CLIP.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: Optional[torch.Tensor] = None, texts: Optional[torch.Tensor] = None):
        # Call the CLIP module itself (not encode_*): its forward hook gathers logit_scale under ZeRO-3.
        outputs = self.clip(images, texts)
        image_features, text_features, logit_scale = outputs[:3]
        logit_bias = outputs[3] if len(outputs) > 3 else None
        return image_features, text_features, logit_scale, logit_bias


@dataclass
class ModelBundle:
    module: ContrastiveModel
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    image_size: tuple[int, int]
    image_mean: tuple[float, ...]  # per-channel normalisation the transforms apply
    image_std: tuple[float, ...]


@contextmanager
def _random_init_is_intended() -> Iterator[None]:
    """open_clip warns (on the root logger) that a model built without weights starts random;
    dsclip always builds that way and loads weights itself, so the warning only misleads."""
    drop = DropMessages(("No pretrained weights loaded",))
    root = logging.getLogger()
    if not debug_enabled():
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def build_model(cfg: ModelConfig, load_weights: bool = True) -> ModelBundle:
    """Create the architecture and load `cfg.pretrained` into it (unless `load_weights` is False,
    as when resuming), all before the DeepSpeed engine partitions it. Every rank reads the file."""
    registered()
    with _random_init_is_intended():
        clip = open_clip.create_model(
            cfg.name,
            pretrained=None,
            force_image_size=cfg.image_size,
            force_context_length=cfg.context_length,
            nonscalar_logit_scale=True,  # DeepSpeed cannot broadcast 0-dim parameters
            **{key: value for key, value in (("init_logit_scale", cfg.init_logit_scale),
                                             ("init_logit_bias", cfg.init_logit_bias)) if value is not None},
        )
    if cfg.pretrained and load_weights:
        load_pretrained(clip, cfg.name, cfg.pretrained, trust=cfg.trust_checkpoint)
    configure_activation_checkpointing(clip, cfg)
    preprocess = PreprocessCfg(**clip.visual.preprocess_cfg)
    return ModelBundle(
        module=ContrastiveModel(clip),
        train_transform=image_transform_v2(preprocess, is_train=True),
        eval_transform=image_transform_v2(preprocess, is_train=False),
        tokenizer=open_clip.get_tokenizer(cfg.name, context_length=cfg.context_length),
        image_size=tuple(preprocess.size),
        image_mean=tuple(preprocess.mean),
        image_std=tuple(preprocess.std),
    )


def configure_activation_checkpointing(clip: nn.Module, cfg: ModelConfig) -> None:
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    elif cfg.activation_offload:
        # fairscale patches each block's forward in place, so parameter names stay unchanged.
        from fairscale.nn.checkpoint import checkpoint_wrapper
        for block in transformer_blocks(clip):
            checkpoint_wrapper(block, offload_to_cpu=True)


def transformer_blocks(clip: nn.Module) -> list[nn.Module]:
    """The residual blocks of both towers (open_clip ViT and text transformers)."""
    blocks = []
    for name, module in clip.named_modules():
        if name.endswith("transformer.resblocks"):
            blocks.extend(module)
    if not blocks:
        raise ValueError(f"{type(clip).__name__} has no open_clip transformer blocks to checkpoint; "
                         "disable model.activation_offload for this architecture")
    return blocks
