"""Resuming a run exactly: find the checkpoint (rank 0 decides which, every rank verifies its share
of the files), refuse one this run cannot continue (a setting that changes the computation, a
global batch the schedule was not set for), then restore the engine (model, optimizer, LR
schedule, step), the RNG and the data position.

The number of ranks, the micro-batch and the accumulation may change as long as the global batch
does not: the engine's ZeRO shards are re-cut through DeepSpeed's universal checkpoint
(training/universal.py), the data position is kept in samples of the epoch (data/loader.py), and
ranks without a saved RNG state are seeded from (seed, step, rank).
"""
import logging
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from dsclip.config import RunConfig, flat_keys, recorded, redacted
from dsclip.data.loader import IndexedEpochs, position_in_samples
from dsclip.errors import CheckpointError
from dsclip.model.run_folder import resolve_checkpoint, verify_checkpoint
from dsclip.model.safe_files import LOAD_ERRORS, deepspeed_load_error, weights_only_loads
from dsclip.training import universal
from dsclip.ranks import describe, rank0_decides
from dsclip.training.checkpoint import agree_on_problems, rank_state_file, read_rank_state, seed_rng, set_rng_state

log = logging.getLogger(__name__)

# Recipe keys a resumed run may change: they do not alter what is computed.
RESUME_MAY_CHANGE = ("name", "output_dir", "logging.", "eval.", "train.save_every", "train.keep_last",
                     "train.export", "train.best_metric", "train.best_mode", "model.grad_checkpointing",
                     "model.activation_offload", "model.trust_checkpoint", "model.zero_init",
                     "train.collective_timeout_s", "wise_ft.")
# With the number of ranks, how a global batch is cut: free to change while the global batch holds.
LAYOUT_KEYS = ("data.batch_size", "train.grad_accum_steps")
RESHARDED = "resharded"  # <checkpoints>/resharded/step-N: a checkpoint converted for another world size


@dataclass
class ResumePoint:
    root: Path  # the checkpoints folder
    tag: str  # step-N
    state: dict[str, Any]  # the saved train state (this rank's, or rank 0's on another world size)
    trust: bool  # --trust-checkpoint: the files may be loaded with full unpickling

    @property
    def world_size(self) -> int:
        """The ranks of the run that saved it."""
        return self.state["world_size"]

    def reshards_onto(self, world: int) -> bool:
        return self.world_size != world

    def data_position(self) -> dict[str, Any]:
        saved_batch = self.state["config"]["data"]["batch_size"]
        return position_in_samples(self.state["data"], self.world_size * saved_batch)


def find_resume_point(spec: str, cfg: RunConfig, rank: int, world_size: int,
                      new_global_batch: bool = False) -> ResumePoint:
    """The checkpoint `spec` names (`latest` or a folder), verified and checked to continue this
    run (exactly, unless `new_global_batch`). Call on every rank: an error is raised on all of them."""
    trust = cfg.model.trust_checkpoint
    root, tag = rank0_decides(lambda: resolve_checkpoint(spec, cfg.checkpoints_dir))
    agree_on_problems(this_ranks_problems(lambda: verify_checkpoint(root, tag, trust, rank, world_size)))
    state: dict[str, Any] = {}

    def read_and_compare() -> list[str]:
        # This rank's own state (RNG, position) where the saved run had this rank, else rank 0's.
        own = rank_state_file(root, tag, rank).is_file()
        state.update(read_rank_state(root, tag, rank if own else 0, trust))
        if not own and state["world_size"] == world_size:  # the saved run had this rank: its file is gone
            read_rank_state(root, tag, rank, trust)  # raises, naming it
        conflicts = resume_conflicts(redacted(state["config"]), recorded(cfg), state["world_size"], world_size,
                                     new_global_batch)
        return [f"cannot resume {root / tag}: the run differs in " + "; ".join(conflicts)
                + " (restore those settings, or start a new run with --pretrained)"] if conflicts else []

    agree_on_problems(this_ranks_problems(read_and_compare))
    point = ResumePoint(root, tag, state, trust)
    if rank == 0:
        warn_about_layout(flat_keys(redacted(state["config"])), flat_keys(recorded(cfg)), point.world_size, world_size)
    return point


def this_ranks_problems(check: Callable[[], list[str]]) -> list[str]:
    """check()'s problems, or the error it raised as one: every rank must reach the agreement."""
    try:
        return check()
    except Exception as e:  # any failure here: the other ranks must not be left waiting
        return [describe(e)]


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int,
                     new_global_batch: bool = False) -> list[str]:
    """Differences that make a continuation impossible, as 'key: saved -> now' lines."""
    flat_saved, flat_current = flat_keys(saved), flat_keys(current)
    conflicts = [f"{key}: {flat_saved.get(key)!r} -> {flat_current.get(key)!r}"
                 for key in sorted(set(flat_saved) | set(flat_current))
                 if flat_saved.get(key) != flat_current.get(key) and not key.startswith(RESUME_MAY_CHANGE + LAYOUT_KEYS)]
    return conflicts + layout_conflicts(flat_saved, flat_current, saved_world, world, new_global_batch)


def layout(flat: dict[str, Any], world: int) -> tuple[int, int, int]:
    """(ranks, micro-batch per rank, micro-batches per step) of a flat recipe."""
    return world, int(flat.get("data.batch_size", 0)), int(flat.get("train.grad_accum_steps", 1))


def global_batch(layout: tuple[int, int, int]) -> int:
    return math.prod(layout)


def describe_layout(ranks: int, batch: int, accum: int) -> str:
    return (f"{global_batch((ranks, batch, accum))} ({ranks} ranks x {batch}"
            + (f" x {accum} accumulated)" if accum > 1 else ")"))


def layout_conflicts(flat_saved: dict[str, Any], flat_current: dict[str, Any], saved_world: int, world: int,
                     new_global_batch: bool) -> list[str]:
    saved, now = layout(flat_saved, saved_world), layout(flat_current, world)
    if saved == now:
        return []
    change = f"global batch {describe_layout(*saved)} -> {describe_layout(*now)}"
    if flat_current.get("data.kind") == "webdataset":
        return [f"{change}: WebDataset shards are dealt to ranks and loader workers, so a shard position holds "
                f"only on the layout that saved it; resume on {saved[0]} ranks with data.batch_size={saved[1]} "
                f"and train.grad_accum_steps={saved[2]}"]
    if global_batch(saved) != global_batch(now) and not new_global_batch:
        return [f"{change}: the learning schedule was set for the saved global batch; keep it by changing "
                "data.batch_size or train.grad_accum_steps with the number of ranks, or pass --new-global-batch "
                "to go on with the saved schedule at the new batch"]
    return []


def warn_about_layout(flat_saved: dict[str, Any], flat_current: dict[str, Any], saved_world: int, world: int) -> None:
    """What a permitted layout change does to the computation, said once."""
    saved, now = layout(flat_saved, saved_world), layout(flat_current, world)
    if global_batch(saved) != global_batch(now):
        log.warning("resuming with a new global batch, %s -> %s: the learning rate schedule (warmup, decay, "
                    "total steps) is the saved run's, set for the old batch", describe_layout(*saved),
                    describe_layout(*now))
    elif saved[0] * saved[1] != now[0] * now[1] and not flat_current.get("train.grad_cache"):
        log.warning("each micro-batch is contrasted within itself (train.grad_cache is off), and the micro-batch "
                    "over all ranks changes from %d to %d: the loss is not the saved run's; train.grad_cache=true "
                    "contrasts the whole global batch on any layout", saved[0] * saved[1], now[0] * now[1])


def restore(engine, data, point: ResumePoint, seed: int, scratch: Path) -> int:
    """Engine state (model, optimizer, LR schedule, global step), the RNG and the data position of
    `point`; returns the epoch to continue. On another world size the checkpoint is converted into
    a folder under `scratch` (every rank sees it; removed afterwards) and the ranks' RNG seeded afresh."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if point.reshards_onto(world):
        load_resharded(engine, point, scratch)
        seed_rng(seed, engine.global_steps, rank)
    else:
        load_same_layout(engine, point)
        set_rng_state(point.state["rng"])
    data.load_state_dict(point.data_position() if isinstance(data, IndexedEpochs) else point.state["data"])
    return point.state["epoch"]


def load_same_layout(engine, point: ResumePoint) -> None:
    try:
        with weights_only_loads(point.trust):
            load_path, _ = engine.load_checkpoint(str(point.root), tag=point.tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    except LOAD_ERRORS as e:  # files a manifest did not cover, or a checkpoint without one (older dsclip)
        raise deepspeed_load_error(point.root / point.tag, e) from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {point.root / point.tag}")


def load_resharded(engine, point: ResumePoint, scratch: Path) -> None:
    """Rank 0 converts the checkpoint (its files were verified) into a folder under `scratch`;
    every rank checks and reads what the load needs before its collectives begin (so no rank
    fails inside one while the others wait), then loads its new shard; rank 0 removes the folder."""
    saved_stage = universal.saved_zero_stage(point.root / point.tag)
    universal.check_supported(saved_stage, engine.zero_optimization_stage(), point.world_size, dist.get_world_size())
    folder, extras = None, []
    try:
        folder = rank0_decides(lambda: convert_into(scratch, point))

        def check_and_read() -> list[str]:
            problems = universal.missing_files(engine, folder, point.tag)
            if not problems:
                extras.append(universal.read_extras(folder, point.tag, point.trust))
            return problems

        agree_on_problems(this_ranks_problems(check_and_read))
        try:
            universal.load(engine, folder, point.tag, point.trust, extras[0])
        except LOAD_ERRORS as e:
            raise deepspeed_load_error(point.root / point.tag, e) from None
        agree_on_problems([])  # every rank is done reading before rank 0 removes the folder
    finally:
        if dist.get_rank() == 0 and folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def convert_into(scratch: Path, point: ResumePoint) -> Path:
    """Rank 0: `point` converted into a new folder under `scratch` (a failed one removed); returns
    the folder. What a killed conversion left there is removed first: one run owns the folder."""
    shutil.rmtree(scratch, ignore_errors=True)
    folder = scratch / f"{point.tag}-{uuid.uuid4().hex[:8]}"
    try:
        universal.convert(point.root / point.tag, folder / point.tag, point.trust)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
