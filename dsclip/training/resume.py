"""Resuming a run exactly: find the checkpoint (rank 0 decides which, every rank verifies its share
of the files), refuse one this run cannot continue (a setting that changes the computation,
another world size), then restore the engine (model, optimizer, LR schedule, step), this rank's
RNG and the data position."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsclip.config import RunConfig, flat_keys, recorded, redacted
from dsclip.errors import CheckpointError
from dsclip.model.run_folder import resolve_checkpoint, verify_checkpoint
from dsclip.model.safe_files import LOAD_ERRORS, deepspeed_load_error, weights_only_loads
from dsclip.training.checkpoint import agree_on_problems, describe, rank0_decides, read_rank_state, set_rng_state

# Recipe keys a resumed run may change: they do not alter what is computed.
RESUME_MAY_CHANGE = ("name", "output_dir", "logging.", "eval.", "train.save_every", "train.keep_last",
                     "train.export", "train.best_metric", "train.best_mode", "model.grad_checkpointing",
                     "model.activation_offload", "model.trust_checkpoint", "wise_ft.")


@dataclass
class ResumePoint:
    root: Path  # the checkpoints folder
    tag: str  # step-N
    state: dict[str, Any]  # this rank's saved train state: epoch, data position, RNG, config, world size
    trust: bool  # --trust-checkpoint: the files may be loaded with full unpickling


def find_resume_point(spec: str, cfg: RunConfig, rank: int, world_size: int) -> ResumePoint:
    """The checkpoint `spec` names (`latest` or a folder), verified and checked to continue this
    run exactly. Call on every rank: an error is raised on all of them."""
    trust = cfg.model.trust_checkpoint
    root, tag = rank0_decides(lambda: resolve_checkpoint(spec, cfg.checkpoints_dir))
    agree_on_problems(this_ranks_problems(lambda: verify_checkpoint(root, tag, trust, rank, world_size)))
    state: dict[str, Any] = {}

    def read_and_compare() -> list[str]:
        state.update(read_rank_state(root, tag, rank, trust))
        conflicts = resume_conflicts(redacted(state["config"]), recorded(cfg), state["world_size"], world_size)
        return [f"cannot resume {root / tag}: the run differs in " + "; ".join(conflicts)
                + " (restore those settings, or start a new run with --pretrained)"] if conflicts else []

    agree_on_problems(this_ranks_problems(read_and_compare))
    return ResumePoint(root, tag, state, trust)


def this_ranks_problems(check: Callable[[], list[str]]) -> list[str]:
    """check()'s problems, or the error it raised as one: every rank must reach the agreement."""
    try:
        return check()
    except Exception as e:  # any failure here: the other ranks must not be left waiting
        return [describe(e)]


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
    try:
        with weights_only_loads(point.trust):
            load_path, _ = engine.load_checkpoint(str(point.root), tag=point.tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    except LOAD_ERRORS as e:  # files a manifest did not cover, or a checkpoint without one (older dsclip)
        raise deepspeed_load_error(point.root / point.tag, e) from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {point.root / point.tag}")
    set_rng_state(point.state["rng"])
    data.load_state_dict(point.state["data"])
    return point.state["epoch"]
