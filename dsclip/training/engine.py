"""The DeepSpeed engine around the ContrastiveModel, with dsclip's optimizer and schedule and,
under ZeRO-3, dsclip's additions (training/zero3.py)."""
from typing import Any, Optional

import torch
from torch import nn

from dsclip.model.build import ModelBundle, build_model, builds_partitioned
from dsclip.model.config import AdapterConfig, ModelConfig
from dsclip.training import zero3
from dsclip.training.bootstrap import freed_host_memory_returned
from dsclip.training.config import OptimConfig
from dsclip.training.ds_config import check_sections
from dsclip.training.optim import build_optimizer, lr_factor, param_groups


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_model_for(cfg: ModelConfig, ds: dict[str, Any], load_weights: bool = True,
                    adapters: Optional[AdapterConfig] = None) -> ModelBundle:
    """The model (with its adapters) built as the engine of the resolved config `ds` will hold it:
    already partitioned under ZeRO-3 where model.zero_init asks for it (builds_partitioned),
    otherwise whole."""
    partitioned = builds_partitioned(cfg, zero_stage(ds))
    with freed_host_memory_returned():
        return build_model(cfg, load_weights, partitioned_by=ds if partitioned else None, adapters=adapters)


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
