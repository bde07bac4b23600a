"""Resuming a run exactly: find the checkpoint, refuse one this run cannot continue (a setting
that changes the computation, another world size), then restore the engine (model, optimizer,
LR schedule, step), this rank's RNG and the data position."""
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsclip.config import RunConfig, flat_keys, to_dict
from dsclip.errors import CheckpointError
from dsclip.model.run_folder import resolve_checkpoint
from dsclip.training.checkpoint import read_rank_state

# Recipe keys a resumed run may change: they do not alter what is computed.
RESUME_MAY_CHANGE = ("name", "output_dir", "logging.", "eval.", "train.save_every", "train.keep_last",
                     "train.export", "train.best_metric", "train.best_mode", "model.grad_checkpointing",
                     "model.activation_offload", "model.trust_checkpoint", "wise_ft.")


@dataclass
class ResumePoint:
    root: Path  # the checkpoints folder
    tag: str  # step-N
    state: dict[str, Any]  # this rank's saved train state: epoch, data position, RNG, config, world size


def find_resume_point(spec: str, cfg: RunConfig, rank: int, world_size: int) -> ResumePoint:
    """The checkpoint `spec` names (`latest` or a folder), checked to continue this run exactly."""
    root, tag = resolve_checkpoint(spec, cfg.checkpoints_dir)
    state = read_rank_state(root, tag, rank)
    conflicts = resume_conflicts(state["config"], to_dict(cfg), state["world_size"], world_size)
    if conflicts:
        raise CheckpointError(f"cannot resume {root / tag}: the run differs in " + "; ".join(conflicts)
                              + " (restore those settings, or start a new run with --pretrained)")
    return ResumePoint(root, tag, state)


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int) -> list[str]:
    """Differences that make an exact continuation impossible, as 'key: saved -> now' lines."""
    flat_saved, flat_current = flat_keys(saved), flat_keys(current)
    conflicts = [f"{key}: {flat_saved.get(key)!r} -> {flat_current.get(key)!r}"
                 for key in sorted(set(flat_saved) | set(flat_current))
                 if flat_saved.get(key) != flat_current.get(key) and not key.startswith(RESUME_MAY_CHANGE)]
    if saved_world != world:
        conflicts.append(f"world size: {saved_world} -> {world} (ZeRO shards are per rank; export the "
                         "checkpoint and start a new run with --pretrained to change it)")
    return conflicts


def restore(engine, data, point: ResumePoint) -> int:
    """Engine state (model, optimizer, LR schedule, global step), this rank's RNG and the data
    position of `point`; returns the epoch to continue."""
    load_path, _ = engine.load_checkpoint(str(point.root), tag=point.tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {point.root / point.tag}")
    set_rng_state(point.state["rng"])
    data.load_state_dict(point.state["data"])
    return point.state["epoch"]


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
