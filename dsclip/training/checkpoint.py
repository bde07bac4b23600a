"""Saving training checkpoints: DeepSpeed's files plus dsclip's per-rank train state (and reading
that state back), a step counted only once complete, the `latest` and `best` pointers, and
pruning. The folder layout is in dsclip/model/run_folder.py; resuming is training/resume.py,
export training/export.py.

A crash mid-save leaves step-N without COMPLETE and `latest` on the previous checkpoint.
"""
import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from dsclip.config import RunConfig, from_dict
from dsclip.errors import CheckpointError
from dsclip.fileio import atomic_write, atomic_write_text
from dsclip.model.run_folder import (BEST, COMPLETE, LATEST, STEP_PREFIX, complete_steps, is_complete, read_pointer,
                                     step_tag, tag_step)


def rank_state_file(root: Path, tag: str, rank: int) -> Path:
    return root / tag / f"rank-{rank}.pt"


def read_rank_state(root: Path, tag: str, rank: int) -> dict[str, Any]:
    state_file = rank_state_file(root, tag, rank)
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: that checkpoint was written by fewer ranks than this run "
                              "has; resume with the original number of ranks")
    # dsclip's own file, written by CheckpointManager.save: it holds numpy RNG state, which weights_only cannot read.
    return torch.load(state_file, weights_only=False)


def run_config_of(root: Path, tag: str) -> RunConfig:
    """The resolved RunConfig a checkpoint was trained with."""
    return from_dict(RunConfig, read_rank_state(root, tag, 0)["config"], path="")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class CheckpointManager:
    """Saves complete checkpoints of one run into `root` (its checkpoints folder); every method
    is called on all ranks."""

    def __init__(self, root: Path, keep_last: int, best_metric: Optional[str] = None, best_mode: str = "max"):
        self.root, self.keep_last = root, keep_last
        self.best_metric, self.best_mode = best_metric, best_mode
        self.rank = dist.get_rank()

    def save(self, engine, train_state: dict[str, Any], metrics: Optional[dict[str, float]] = None) -> str:
        """Write step-<global step>; returns its tag. An existing complete one is left as it is."""
        tag = step_tag(engine.global_steps)
        if is_complete(self.root / tag):
            return tag
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        state = {**train_state, "rng": rng_state(), "world_size": dist.get_world_size()}
        atomic_write(rank_state_file(self.root, tag, self.rank), lambda path: torch.save(state, path))
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            atomic_write_text(self.root / tag / COMPLETE, json.dumps({"step": engine.global_steps, **(metrics or {})}))
            self._update_best(tag, metrics or {})
            atomic_write_text(self.root / LATEST, tag)
            self._prune()
        dist.barrier()
        return tag

    def _update_best(self, tag: str, metrics: dict[str, float]) -> None:
        if not self.best_metric or self.best_metric not in metrics:
            return
        best = read_pointer(self.root / BEST)
        previous = json.loads((self.root / best / COMPLETE).read_text()).get(self.best_metric) if best else None
        if previous is not None:
            value = metrics[self.best_metric]
            if not (value > previous if self.best_mode == "max" else value < previous):
                return
        atomic_write_text(self.root / BEST, tag)

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and the best; drop stale incomplete ones."""
        complete = sorted(complete_steps(self.root))
        keep = {step_tag(s) for s in complete[-self.keep_last:]} | {read_pointer(self.root / BEST)}
        newest = complete[-1] if complete else -1
        for folder in self.root.glob(f"{STEP_PREFIX}*"):
            step = tag_step(folder.name)
            stale_partial = not is_complete(folder) and step is not None and step < newest
            if folder.name not in keep and (is_complete(folder) or stale_partial):
                shutil.rmtree(folder, ignore_errors=True)
