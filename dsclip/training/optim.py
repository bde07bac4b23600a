"""Optimizer and schedule: AdamW parameter groups (no decay on 1-D tensors, per-tower lr and
weight decay, EVA-CLIP layer-wise lr decay over the model's layer partition) and the warmup +
cosine / constant / cooldown schedule as a multiplier of each group's lr."""
import math
from typing import Any

import torch
from torch import nn

from dsclip.model.partition import LayerId, LayerPartition
from dsclip.model.zero_init import full_shape
from dsclip.training.config import LayerDecayConfig, OptimConfig
from dsclip.training.ds_config import offloads_optimizer


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of each group's base lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "const":
        return 1.0
    if cfg.schedule == "const-cooldown":
        cooldown_start = total_steps - cfg.cooldown_steps
        if step < cooldown_start:
            return 1.0
        progress = (step - cooldown_start) / cfg.cooldown_steps
        return 1.0 - (1.0 - floor) * progress
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def excluded_from_decay(param: torch.Tensor) -> bool:
    """open_clip's rule: no decay for 1-D tensors (biases, norm gains, class token, logit scale)."""
    return len(full_shape(param)) < 2  # a parameter partitioned by zero.Init is 1-D (its shard)


def param_groups(clip: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters of the open_clip model, grouped by (lr, weight decay).

    Per-tower lr / decay overrides and layer-wise lr decay set each group's lr; the schedule
    then scales every group by the same factor. Frozen parameters get no group and no state.
    """
    partition = LayerPartition(clip)
    scales = layer_lr_scales(clip, cfg.layer_decay())
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in clip.named_parameters():
        if not param.requires_grad:
            continue
        tower = cfg.tower(partition.tower(name))
        lr = (cfg.lr if tower.lr is None else tower.lr) * scales[name]
        decay = cfg.weight_decay if tower.weight_decay is None else tower.weight_decay
        groups.setdefault((lr, 0.0 if excluded_from_decay(param) else decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def lr_scale(layer: LayerId, cfg: LayerDecayConfig) -> float:
    """decay ** (depth + 1 - index) for the layer's tower; 1.0 for "other" (logit_scale, ...)."""
    if layer.tower == "other":
        return 1.0
    decay = cfg.image if layer.tower == "image" else cfg.text
    return decay ** (layer.depth + 1 - layer.index)


def layer_lr_scales(model: nn.Module, cfg: LayerDecayConfig) -> dict[str, float]:
    """lr scale of every trainable parameter of the bare open_clip ``model``, by name.

    A tower whose decay is 1.0 needs no layer structure, so timm / ResNet image towers
    work as long as their decay stays 1.0.
    """
    cfg.validate()
    partition = LayerPartition(model)
    scales: dict[str, float] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = partition.tower(name)
        if tower == "other" or getattr(cfg, tower) == 1.0:
            scales[name] = 1.0
        else:
            scales[name] = lr_scale(partition.layer_id(name), cfg)
    return scales


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, ds: dict[str, Any]) -> torch.optim.Optimizer:
    if offloads_optimizer(ds):
        # ZeRO-Offload steps the optimizer on the host and requires DeepSpeed's CPU Adam.
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    # fused=True: one kernel over all tensors; on CPU it cut the tiny model's optimizer step ~8x.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
