"""Loading a ZeRO checkpoint onto another number of ranks through DeepSpeed's universal checkpoint
format: rank 0 converts step-N once (deepspeed.checkpoint.ds_to_universal: every parameter's fp32
weights and Adam moments whole, one file each), every rank's engine (built with
"checkpoint": {"load_universal": true}) cuts its new shard out of them, and the converted copy is
removed. DeepSpeed 0.19.8 gets four things wrong, put right here:

- its converter and loader unpickle every file with weights_only=False: both run under
  weights_only_loads, in this process (one converter worker), so the untrusted-file rule holds;
- ZeRO-3 keeps frozen parameters as per-rank fragments that the converter skips, and a universal
  load reads no module weights: a frozen image tower would come back as the model's fresh
  initialisation. The fragments are merged into the same per-parameter layout and copied into
  the model one tensor at a time;
- its ZeRO-3 loader copies param group 0's hyperparameters into every group, which would give
  every per-tower, layer-decay and no-decay group the first group's lr and weight decay: each
  group's own are restored from the saved optimizer state;
- that loader also gives every group's Adam state one shared `step` tensor, which torch's AdamW
  then advances once per group each step: from the second step on the bias correction is wrong
  (the losses drift from an uninterrupted run's). Each group gets its own copy.
"""
import argparse
import contextlib
import io
import shutil
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, PARAM, PARAM_GROUPS

from dsclip.errors import CheckpointError
from dsclip.logs import prints_as_debug
from dsclip.model.safe_files import load_file, weights_only_loads
from dsclip.training.checkpoint import owned_by

UNIVERSAL_FOLDER = "zero"  # where ds_to_universal writes <parameter name>/{fp32,exp_avg,exp_avg_sq}.pt
OPTIMIZER_STATE = "optimizer_state.pt"  # its optimizer state without the per-rank tensors


def loading_config(ds_config: dict) -> dict:
    """`ds_config` for an engine that loads a converted (universal) checkpoint; saving is unchanged."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def convert(source: Path, target: Path, trust: bool) -> None:
    """Rank 0: `target` becomes the universal form of checkpoint folder `source` (a stale one is replaced)."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # ZeRO-1/2: the version record plain data parallel lacks
    with prints_as_debug("DeepSpeed"), contextlib.redirect_stderr(io.StringIO()), weights_only_loads(trust):
        ds_to_universal.main(args)  # its progress bars go to stderr, its notes to stdout
    write_frozen_parameters(source, target / UNIVERSAL_FOLDER, trust)


def write_frozen_parameters(source: Path, universal: Path, trust: bool) -> None:
    """Each frozen parameter of a ZeRO-3 checkpoint merged from its ranks' fragments (each rank held
    one flat slice, the last one padded) into <universal>/<name>/fp32.pt, as the converter writes
    trainable ones. ZeRO-1/2 checkpoints hold whole weights, which the converter already wrote."""
    files = sorted(source.glob("*zero_pp_rank_*_mp_rank_00_model_states.pt"), key=lambda f: owned_by(f.name))
    states = [load_file(f, trust, mmap=True) for f in files]
    shapes = (states[0].get(FROZEN_PARAM_SHAPES) or {}) if states else {}
    for name, shape in shapes.items():
        flat = torch.cat([state[FROZEN_PARAM_FRAGMENTS][name].reshape(-1) for state in states])
        (universal / name).mkdir(parents=True, exist_ok=True)
        torch.save({PARAM: flat[:shape.numel()].reshape(shape).clone()}, universal / name / "fp32.pt")


def load(engine, root: Path, tag: str, trust: bool) -> None:
    """Every rank: the engine state of universal checkpoint root/tag, with frozen parameters and
    each param group's hyperparameters put back."""
    with weights_only_loads(trust):
        load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the resharded checkpoint {root / tag}")
    universal = root / tag / UNIVERSAL_FOLDER
    unshare_step_counts(engine.optimizer.optimizer.state)
    restore_param_groups(engine.optimizer.param_groups, load_file(universal / OPTIMIZER_STATE, trust)[PARAM_GROUPS])
    restore_frozen_parameters(engine.module, universal, trust)


def unshare_step_counts(state: dict) -> None:
    """Each parameter's Adam state its own `step` tensor (the loader hands them all one)."""
    for parameter_state in state.values():
        if torch.is_tensor(parameter_state.get("step")):
            parameter_state["step"] = parameter_state["step"].clone()


def restore_param_groups(groups: list[dict], saved: list[dict]) -> None:
    """Each group's hyperparameters (lr, weight decay, betas, ...) as saved, in the saved order."""
    if len(groups) != len(saved):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's "
                              f"{len(groups)}: resume with the recipe it was saved with")
    for group, saved_group in zip(groups, saved):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def restore_frozen_parameters(module: torch.nn.Module, universal: Path, trust: bool) -> None:
    """Frozen parameters from <universal>/<name>/fp32.pt, one at a time: under ZeRO-3 rank 0 fills
    the gathered tensor and DeepSpeed re-partitions it; otherwise every rank copies it."""
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        file = universal / name / "fp32.pt"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint holds no weights for frozen parameter {name}")
        partitioned = hasattr(param, "ds_id")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if not partitioned or dist.get_rank() == 0:
                saved = load_file(file, trust)
                param.data.copy_(saved[PARAM] if isinstance(saved, dict) else saved)
