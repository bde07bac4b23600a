"""The DeepSpeed config: read it, fill its "auto" fields from the recipe (an explicit value that
contradicts the recipe is an error naming both places), and resolve precision. `for_run` is the
one call that turns a config file's contents into what the engine gets."""
import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from dsclip.config import RunConfig
from dsclip.errors import DeepSpeedConfigError

AUTO = "auto"


def recipe_values(cfg: RunConfig, world_size: int) -> dict[str, tuple[Any, str]]:
    """DeepSpeed config fields the recipe decides: ds path -> (value, recipe key)."""
    return {
        "train_micro_batch_size_per_gpu": (cfg.data.batch_size, "data.batch_size"),
        "gradient_accumulation_steps": (cfg.train.grad_accum_steps, "train.grad_accum_steps"),
        "train_batch_size": (cfg.data.batch_size * cfg.train.grad_accum_steps * world_size,
                             "data.batch_size x train.grad_accum_steps x world size"),
        "gradient_clipping": (cfg.train.grad_clip, "train.grad_clip"),
        "optimizer.params.lr": (cfg.optim.lr, "optim.lr"),
        "optimizer.params.betas": (cfg.optim.betas, "optim.betas"),
        "optimizer.params.eps": (cfg.optim.eps, "optim.eps"),
        "optimizer.params.weight_decay": (cfg.optim.weight_decay, "optim.weight_decay"),
    }


def for_run(ds: dict[str, Any], cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """`ds` with every "auto" filled from the recipe and precision decided for this machine."""
    return resolve_precision(resolve_ds_config(ds, recipe_values(cfg, world_size)))


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
