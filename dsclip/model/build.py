"""Build an open_clip model for training: the architecture by name, its transforms and
tokenizer, the engine-facing wrapper, and activation checkpointing."""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import open_clip
import torch
import torch.distributed as dist
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from dsclip.errors import ConfigError
from dsclip.logs import DropMessages, debug_enabled
from dsclip.model.adapters import add_adapters, load_adapters, read_adapters
from dsclip.model.architectures import registered
from dsclip.model.config import AdapterConfig, ModelConfig
from dsclip.model.pretrained import load_pretrained
from dsclip.model.zero_init import full_shape, partitioned_build

log = logging.getLogger(__name__)
# model.zero_init: null builds partitioned from this size: ViT-H-14 (986M) and up, not ViT-L-14 (428M)
ZERO_INIT_MIN_PARAMETERS = 500_000_000


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


def create_clip(cfg: ModelConfig, device: str = "cpu") -> nn.Module:
    """The bare open_clip model of `cfg`, randomly initialised."""
    registered()
    with _random_init_is_intended():
        return open_clip.create_model(
            cfg.name,
            pretrained=None,
            device=device,
            force_image_size=cfg.image_size,
            force_context_length=cfg.context_length,
            nonscalar_logit_scale=True,  # DeepSpeed cannot broadcast 0-dim parameters
            **{key: value for key, value in (("init_logit_scale", cfg.init_logit_scale),
                                             ("init_logit_bias", cfg.init_logit_bias),
                                             ("force_patch_dropout", cfg.patch_dropout or None)) if value is not None},
        )


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the architecture, counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        clip = create_clip(cfg, device="meta")
    return sum(p.numel() for p in clip.parameters())


def builds_partitioned(cfg: ModelConfig, zero_stage: int) -> bool:
    """Whether to build under deepspeed.zero.Init: model.zero_init, or when it is null, ZeRO-3 and a
    model of ZERO_INIT_MIN_PARAMETERS or more (a Hugging Face text tower never: it loads its own
    weights inside transformers)."""
    if cfg.zero_init is not None:
        if cfg.zero_init and zero_stage != 3:
            raise ConfigError(f"model.zero_init=true needs ZeRO stage 3, but the DeepSpeed config has stage "
                              f"{zero_stage}: use ds_configs/zero3.json or set model.zero_init to null")
        return cfg.zero_init
    return zero_stage == 3 and not cfg.has_hf_text_tower() and parameter_count(cfg) >= ZERO_INIT_MIN_PARAMETERS


def build_model(cfg: ModelConfig, load_weights: bool = True, partitioned_by: Optional[dict[str, Any]] = None,
                adapters: Optional[AdapterConfig] = None) -> ModelBundle:
    """Create the architecture, load `cfg.pretrained` into it and add `adapters` (their weights
    too, unless `load_weights` is False, as when resuming), all before the DeepSpeed engine exists.
    Given a resolved ZeRO-3 config `partitioned_by`, the model is built already partitioned
    (zero.Init) and rank 0 alone reads the weights; otherwise every rank builds it whole and reads
    the file."""
    adapters = adapters or AdapterConfig()
    if partitioned_by is None:
        clip = create_clip(cfg)
    else:
        with partitioned_build(partitioned_by):
            clip = create_clip(cfg)
        log.info("model built partitioned over %d ranks (deepspeed.zero.Init): %s parameters",
                 dist.get_world_size(), f"{sum(full_shape(p).numel() for p in clip.parameters()):,}")
    if load_weights:
        load_initial_weights(clip, cfg, adapters)
    if adapters.kind == "lora":
        attentions, linears = add_adapters(clip, adapters)
        log.info("LoRA adapters (rank %d, alpha %g) in %d attention and %d Linear modules of %s", adapters.rank,
                 adapters.alpha, attentions, linears,
                 "both towers" if adapters.towers == "both" else f"the {adapters.towers} tower")
        if adapters.weights and load_weights:
            load_adapters(clip, read_adapters(Path(adapters.weights)), adapters.weights)
    if cfg.patch_dropout:
        log.info("patch dropout: %g of the image patches dropped in training forwards (evaluation sees all)",
                 cfg.patch_dropout)
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


def load_initial_weights(clip: nn.Module, cfg: ModelConfig, adapters: AdapterConfig) -> None:
    """`cfg.pretrained`, with `adapters.weights` merged into it when no adapters are trained."""
    merged = adapters.weights if adapters.kind == "none" else None
    if merged and not cfg.pretrained:
        raise ConfigError(f"adapters.weights={merged} needs model.pretrained: the base weights the adapters were "
                          "trained on (--pretrained BASE --adapters FOLDER)")
    if cfg.pretrained:
        load_pretrained(clip, cfg.name, cfg.pretrained, trust=cfg.trust_checkpoint,
                        adapters=Path(merged) if merged else None)


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
