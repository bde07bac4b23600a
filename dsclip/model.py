"""Build an open_clip model for training: architecture by name, transforms, tokenizer, the
engine-facing wrapper, and activation checkpointing."""
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
import torch
from torch import nn

import dsclip.hf_towers  # noqa: F401  registers the *-minilm architectures when their package is installed
from dsclip.pretrained import load_pretrained

SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
MAX_LOGIT_SCALE = 100.0  # open_clip's clamp: exp(logit_scale) never exceeds 100

open_clip.add_model_config(SHIPPED_CONFIGS)


@dataclass
class ModelConfig:
    name: str = "dsclip-tiny"  # any open_clip architecture (ViT-B-32, ...) or a config shipped with dsclip
    pretrained: Optional[str] = None  # initial weights: open_clip tag, weights file, HF-style folder, hf-hub:org/name, dsclip run folder
    trust_checkpoint: bool = False  # allow pickled weight files that can run code when loaded (only for files you trust)
    image_size: Optional[int] = None  # override the architecture's image size
    context_length: Optional[int] = None  # override the text context length
    init_logit_scale: Optional[float] = None  # initial log logit scale (default log(1/0.07); SigLIP: log(10))
    init_logit_bias: Optional[float] = None  # add a learned logit bias with this initial value (SigLIP: -10)
    grad_checkpointing: bool = False  # recompute each transformer block in backward (open_clip's checkpointing)
    activation_offload: bool = False  # checkpoint blocks with fairscale, keeping saved inputs in host memory

    def has_logit_bias(self) -> bool:
        return self.init_logit_bias is not None or "init_logit_bias" in open_clip.get_model_config(self.name)

    def validate(self) -> None:
        known = open_clip.list_models()
        if self.name not in known:
            close = difflib.get_close_matches(self.name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
            raise ValueError(f"model.name '{self.name}' is not an open_clip architecture{hint}")
        if self.grad_checkpointing and self.activation_offload:
            raise ValueError("model.grad_checkpointing and model.activation_offload are alternatives: "
                             "activation_offload already checkpoints every block; enable only one")


class ContrastiveModel(nn.Module):
    """What the DeepSpeed engine wraps: every forward, for training and evaluation, goes
    through here so that ZeRO-3 gathers the parameters each tower needs.

    Returns (image_features, text_features, logit_scale, logit_bias); features are L2-normalised,
    None for a tower given no input; logit_scale is exp(clamped) and logit_bias None for CLIP.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: Optional[torch.Tensor] = None, texts: Optional[torch.Tensor] = None):
        # Call the CLIP module itself (not encode_*): its forward hook gathers logit_scale under ZeRO-3.
        outputs = self.clip(images, texts)
        image_features, text_features, logit_scale = outputs[:3]
        logit_bias = outputs[3] if len(outputs) > 3 else None
        # Clamp inside forward: an in-place clamp of a ZeRO-3 partitioned parameter would not stick.
        return image_features, text_features, logit_scale.clamp(max=MAX_LOGIT_SCALE), logit_bias


@dataclass
class ModelBundle:
    module: ContrastiveModel
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    image_size: tuple[int, int]


def build_model(cfg: ModelConfig, load_weights: bool = True) -> ModelBundle:
    """Create the architecture and load `cfg.pretrained` into it (unless `load_weights` is False,
    as when resuming), all before the DeepSpeed engine partitions it. Every rank reads the file."""
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
