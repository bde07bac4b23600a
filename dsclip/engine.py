"""DeepSpeed engine: config merge ("auto" filled from the recipe), optimizer param groups,
the LR schedule, and `deepspeed.initialize`."""
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from dsclip import zero3
from dsclip.layer_decay import LayerDecayConfig, LayerPartition, layer_lr_scales

AUTO = "auto"


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config file is missing, unreadable or contradicts the recipe."""


@dataclass
class TowerOptimConfig:
    lr: Optional[float] = None  # this tower's peak lr; None = optim.lr
    weight_decay: Optional[float] = None  # this tower's decay; None = optim.weight_decay
    layer_decay: float = 1.0  # EVA-CLIP layer-wise lr decay: lr x decay^(depth + 1 - layer); 1.0 = off


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.1  # AdamW decay; biases, norms, logit scale and other 1-D params get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW (beta1, beta2)
    eps: float = 1e-6  # AdamW epsilon
    schedule: Literal["cosine", "const", "const-cooldown"] = "cosine"  # after warmup: cosine | const | const-cooldown
    warmup_steps: int = 50  # linear warmup from 0 to lr, in optimizer steps
    cooldown_steps: int = 0  # const-cooldown: final steps of linear decay to min_lr
    min_lr: float = 0.0  # floor of the cosine and of the cooldown
    image: TowerOptimConfig = field(default_factory=TowerOptimConfig)  # image-tower overrides
    text: TowerOptimConfig = field(default_factory=TowerOptimConfig)  # text-tower overrides

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError("optim.warmup_steps and optim.cooldown_steps must be >= 0")
        if self.schedule == "const-cooldown" and self.cooldown_steps == 0:
            raise ValueError("optim.schedule=const-cooldown needs optim.cooldown_steps > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        self.layer_decay().validate()

    def layer_decay(self) -> LayerDecayConfig:
        return LayerDecayConfig(image=self.image.layer_decay, text=self.text.layer_decay)

    def tower(self, name: str) -> TowerOptimConfig:
        return {"image": self.image, "text": self.text}.get(name, TowerOptimConfig())


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
    return param.ndim < 2


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


def load_ds_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise DeepSpeedConfigError(
            f"DeepSpeed config not found: {path} (pass --deepspeed_config ds_configs/zero3.json or another file)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None


def resolve_ds_config(ds: dict[str, Any], recipe_values: dict[str, Any]) -> dict[str, Any]:
    """Fill every "auto" from the recipe; collect every explicit value that contradicts it.

    `recipe_values` maps dotted ds-config paths to (value, recipe key) pairs. All mismatches
    are reported together in one error naming both places.
    """
    resolved = copy.deepcopy(ds)
    mismatches = []
    for ds_path, (value, recipe_key) in recipe_values.items():
        parent, key = _walk(resolved, ds_path)
        current = parent.get(key, AUTO) if parent is not None else AUTO
        if current == AUTO:
            if parent is not None:
                parent[key] = value
        elif not _same(current, value):
            mismatches.append(f"{ds_path}={current!r} in the DeepSpeed config but {recipe_key}={value!r} in the recipe")
    if mismatches:
        raise DeepSpeedConfigError(
            "DeepSpeed config contradicts the recipe: " + "; ".join(mismatches)
            + ' (set those DeepSpeed fields to "auto" or change the recipe)')
    return resolved


def _walk(config: dict[str, Any], dotted: str) -> tuple[Any, str]:
    """(parent mapping, last key) for a dotted path; parent None when an optional section is absent."""
    *sections, key = dotted.split(".")
    node = config
    for section in sections:
        if section not in node:
            return None, key
        node = node[section]
    return node, key


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_sections(ds: dict[str, Any]) -> None:
    """dsclip builds the optimizer and schedule itself; the ds config may only name them as AdamW/auto."""
    optimizer_type = ds.get("optimizer", {}).get("type", AUTO)
    if optimizer_type not in (AUTO, "AdamW", "Adam"):
        raise DeepSpeedConfigError(
            f'optimizer.type={optimizer_type!r} in the DeepSpeed config: dsclip trains with AdamW; '
            'set it to "AdamW" or "auto"')
    scheduler_type = ds.get("scheduler", {}).get("type", AUTO)
    if scheduler_type != AUTO:
        raise DeepSpeedConfigError(
            f'scheduler.type={scheduler_type!r} in the DeepSpeed config: the schedule comes from the recipe '
            '(optim.schedule, optim.warmup_steps); set scheduler.type to "auto" or remove the section')


def resolve_precision(ds: dict[str, Any]) -> dict[str, Any]:
    """`bf16.enabled: "auto"` means bf16 where the device computes it fast (CUDA), else fp32:
    on CPUs without AMX, bf16 matmuls are ~80x slower than fp32."""
    resolved = copy.deepcopy(ds)
    section = resolved.get("bf16", {})
    if section.get("enabled") == AUTO:
        section["enabled"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return resolved


def precision(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, ds: dict[str, Any]) -> torch.optim.Optimizer:
    if offloads_optimizer(ds):
        # ZeRO-Offload steps the optimizer on the host and requires DeepSpeed's CPU Adam.
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    # fused=True: one kernel over all tensors; on CPU it cut the tiny model's optimizer step ~8x.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def set_fetch_units(module: nn.Module, ds: dict[str, Any]) -> None:
    """ZeRO-3 gathers one transformer block at a time, unless the DeepSpeed config asks DeepSpeed
    to choose its fetch units itself (stage3_module_granularity_threshold)."""
    zero = ds.get("zero_optimization", {})
    if zero_stage(ds) == 3 and not zero.get("stage3_module_granularity_threshold"):
        zero3.mark_fetch_units(module, module.clip)


def build_engine(module: nn.Module, ds: dict[str, Any], optim: OptimConfig, total_steps: int):
    """Wrap the ContrastiveModel in a DeepSpeed engine with dsclip's optimizer and schedule;
    `ds` is resolved. Freezing must be applied before: frozen parameters get no optimizer state."""
    import deepspeed  # here, not at module level: config loading and `dsclip --help` stay light

    check_sections(ds)
    engine_config = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    optimizer = build_optimizer(param_groups(module.clip, optim), optim, ds)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(optim, step, total_steps))
    set_fetch_units(module, ds)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=engine_config)
    if zero_stage(ds) == 3:
        zero3.share_fp32_master(engine.optimizer)
        zero3.coalesce_persistent_gather(engine.optimizer)
        zero3.fuse_grad_norm(engine.optimizer)
    return engine


def build_inference_engine(module: nn.Module, ds: dict[str, Any]):
    """A DeepSpeed engine without optimizer, for evaluation: ZeRO-3 still shards the weights."""
    import deepspeed

    engine_config = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    set_fetch_units(module, ds)
    engine, _, _, _ = deepspeed.initialize(model=module, config=engine_config)
    engine.eval()
    return engine
