"""Saving training checkpoints: DeepSpeed's files plus dsclip's per-rank train state (and reading
that state back), a step counted only once complete, the `latest` and `best` pointers, pruning,
and setting a later timeline aside when a run resumes an older step. The folder layout is in
dsclip/model/run_folder.py; resuming is training/resume.py, export training/export.py.

A crash mid-save leaves step-N without COMPLETE and `latest` on the previous checkpoint. Every
decision about the folder (complete? which tag? enough space?) is made on rank 0 and broadcast:
ranks that each read the disk can disagree (NFS attribute caching) and then make different
collectives.
"""
import json
import logging
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from dsclip.config import RunConfig, from_dict
from dsclip.errors import CheckpointError, CheckpointSaveError
from dsclip.fileio import atomic_write, atomic_write_text, sync_folder
from dsclip.model.run_folder import (BEST, COMPLETE, LATEST, STEP_PREFIX, is_complete, raise_first, read_marker,
                                     read_pointer, step_tag, tag_step)
from dsclip.model.safe_files import TRUST_HINT, load_file, seal
from dsclip.ranks import describe, rank0_decides

log = logging.getLogger(__name__)
BYTES_PER_PARAMETER = 16  # a first save's size: fp32 weights, two Adam moments, fp32 master
SPACE_MARGIN = 1.2
LOW_SPACE = 256 << 20  # bytes free below which a failed write is reported as a full disk
SET_ASIDE_PREFIX = "set-aside-"


def rank_state_file(root: Path, tag: str, rank: int) -> Path:
    return root / tag / f"rank-{rank}.pt"


def read_rank_state(root: Path, tag: str, rank: int, trust: bool = False) -> dict[str, Any]:
    state_file = rank_state_file(root, tag, rank)
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: the checkpoint is incomplete; resume from an earlier "
                              "step-N folder")
    try:
        return load_file(state_file, trust)
    except CheckpointError as e:
        if "pickled" in str(e):  # dsclip before 2026-12 pickled numpy's RNG state into this file
            raise CheckpointError(f"{state_file} holds pickled Python objects (a train state written by an older "
                                  f"dsclip, or a planted file); refusing it: {TRUST_HINT}") from None
        raise


def run_config_of(root: Path, tag: str, trust: bool = False) -> RunConfig:
    """The resolved RunConfig a checkpoint was trained with."""
    return from_dict(RunConfig, read_rank_state(root, tag, 0, trust)["config"], path="")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, ints and strings only: loadable weights-only."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys.astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Python's, numpy's and torch's RNG seeded from (seed, step, rank): a run resumed on another
    number of ranks has no saved state for its ranks, but still draws the same numbers every time."""
    derived = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]) >> 1
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def agree_on_problems(problems: list[str]) -> None:
    """Every rank's problems gathered; the first is raised on every rank (none: all go on). A
    problem every rank found (a recipe conflict) counts once."""
    every: list[Optional[list[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(every, problems)
    raise_first(list(dict.fromkeys(problem for rank_problems in every for problem in rank_problems or [])))


def owned_by(name: str) -> int:
    """The rank that writes a checkpoint file: DeepSpeed names its per-rank shards
    zero_pp_rank_R_..., dsclip its train state rank-R.pt; the rest (ZeRO-1/2's model states) rank 0."""
    match = re.search(r"(?:^|_)zero_pp_rank_(\d+)_|^rank-(\d+)\.", name)  # bf16 runs: bf16_zero_pp_rank_R_...
    return int(match.group(1) or match.group(2)) if match else 0


def save_sequence(folder: Path) -> int:
    """The order in which a complete checkpoint was saved (markers before 2026-12: its step)."""
    record = read_marker(folder)
    return int(record.get("seq", record.get("step", 0)))


class CheckpointManager:
    """Saves complete checkpoints of one run into `root` (its checkpoints folder); every method
    is called on all ranks."""

    def __init__(self, root: Path, keep_last: int, best_metric: Optional[str] = None, best_mode: str = "max"):
        self.root, self.keep_last = root, keep_last
        self.best_metric, self.best_mode = best_metric, best_mode
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.check_shared()

    def check_shared(self) -> None:
        """Every rank must see rank 0's checkpoint folder: saves are collective, and a rank that
        writes to a node-local folder of the same name makes checkpoints nobody can resume."""
        def write_probe() -> str:
            self.root.mkdir(parents=True, exist_ok=True)
            token = uuid.uuid4().hex
            (self.root / f".probe-{token}").write_text(token)
            return token

        token = rank0_decides(write_probe)
        probe = self.root / f".probe-{token}"
        try:
            sees = probe.read_text() == token
        except OSError:
            sees = False
        blind = [None] * self.world_size
        dist.all_gather_object(blind, None if sees else self.rank)
        rank0_decides(lambda: probe.unlink())
        missing = [r for r in blind if r is not None]
        if missing:
            raise CheckpointError(f"rank(s) {missing} cannot see the checkpoint folder {self.root} that rank 0 writes: "
                                  "put output_dir on a filesystem every node shares (e.g. NFS, Lustre)")

    # -- saving -----------------------------------------------------------------------------
    def save(self, engine, train_state: dict[str, Any], metrics: Optional[dict[str, float]] = None) -> str:
        """Write step-<global step>; returns its tag. An existing complete one is left as it is."""
        tag, start = step_tag(engine.global_steps), time.perf_counter()
        if rank0_decides(lambda: self.prepare(tag, engine)) == "complete":
            return tag
        folder = self.root / tag
        failed = f"saving {folder} failed on rank {self.rank}: {{}}; {self.root / LATEST} still names the previous " \
                 "complete checkpoint"
        try:
            # DeepSpeed's save makes collectives of its own: a rank whose write fails there leaves at
            # once, and the launcher stops the others (or the collective timeout does).
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise CheckpointSaveError(failed.format(self.write_failure(e))) from None
        sealed, problems = {}, []
        try:
            state = {**train_state, "rng": rng_state(), "world_size": self.world_size}
            atomic_write(rank_state_file(self.root, tag, self.rank), lambda path: torch.save(state, path))
            sealed = seal(sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                                 and owned_by(p.name) == self.rank))
        except Exception as e:  # every rank must reach the agreement below
            problems.append(failed.format(self.write_failure(e)))
        parts: list[Optional[tuple[dict[str, str], list[str]]]] = [None] * self.world_size
        dist.all_gather_object(parts, (sealed, problems))  # also the barrier: every rank's files are on disk
        raise_first([problem for _, rank_problems in parts for problem in rank_problems])
        manifest = {name: digest for part, _ in parts for name, digest in part.items()}
        rank0_decides(lambda: self.commit(tag, engine.global_steps, manifest, metrics or {}))
        size = sum(p.stat().st_size for p in folder.iterdir() if p.name in manifest) if self.rank == 0 else 0
        log.info("saved %s in %.1f s (%.2f GB; a stop signal needs that much time before SIGKILL)", tag,
                 time.perf_counter() - start, size / 1e9)
        return tag

    def write_failure(self, error: BaseException) -> str:
        """What went wrong writing a checkpoint file, with the free space when it is nearly gone
        (torch.save's own message for a full disk is 'unexpected pos ...')."""
        free = shutil.disk_usage(self.root).free
        full = f" ({free / 2**20:.0f} MiB left on the disk of {self.root}: it is full)" if free < LOW_SPACE else ""
        return describe(error) + full

    def prepare(self, tag: str, engine) -> str:
        """Rank 0, before a save: 'complete' if `tag` is already saved; otherwise a stale partial
        folder of that tag is cleared and the free space checked."""
        folder = self.root / tag
        if is_complete(folder):
            return "complete"
        if folder.exists():
            shutil.rmtree(folder)
        need = self.expected_size(engine) * SPACE_MARGIN
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise CheckpointError(f"{self.root} has {free / 2**30:.2f} GiB free, a checkpoint needs about "
                                  f"{need / 2**30:.2f} GiB: free space there, or set output_dir elsewhere")
        return "save"

    def expected_size(self, engine) -> float:
        """The newest complete checkpoint's size, or an estimate from the parameter count."""
        newest = self.complete_by_sequence()[-1:]
        if newest:
            return sum(p.stat().st_size for p in (self.root / newest[0]).iterdir() if p.is_file())
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        return parameters * BYTES_PER_PARAMETER

    def commit(self, tag: str, step: int, manifest: dict[str, str], metrics: dict[str, float]) -> None:
        """Rank 0, once every file is synced: COMPLETE (atomic, durable), best, latest, then pruning."""
        complete = self.complete_by_sequence()
        sequence = 1 + max((save_sequence(self.root / t) for t in complete), default=0)
        record = {"step": step, "seq": sequence, "best_by": [self.best_metric, self.best_mode], **metrics,
                  "files": manifest}
        atomic_write_text(self.root / tag / COMPLETE, json.dumps(record))
        self.update_best(tag, metrics)
        atomic_write_text(self.root / LATEST, tag)
        self.prune()

    def update_best(self, tag: str, metrics: dict[str, float]) -> None:
        if not self.best_metric or self.best_metric not in metrics:
            return
        previous = self.best_value()
        if previous is not None:
            value = metrics[self.best_metric]
            if not (value > previous if self.best_mode == "max" else value < previous):
                return
        atomic_write_text(self.root / BEST, tag)

    def best_tag(self) -> Optional[str]:
        """What `best` names; None when there is none or it is not a step-N tag (warned: it restarts)."""
        try:
            return read_pointer(self.root / BEST)
        except CheckpointError as e:
            log.warning("%s; restarting the best checkpoint", e)
            return None

    def best_value(self) -> Optional[float]:
        """The current best checkpoint's value of train.best_metric; None (with a warning) when
        `best` is missing, points at a folder that is gone, or was chosen by another metric or mode."""
        best = self.best_tag()
        if best is None:
            return None
        record = read_marker(self.root / best) if is_complete(self.root / best) else {}
        value = record.get(self.best_metric)
        chosen_by = record.get("best_by", [self.best_metric, self.best_mode])
        if not isinstance(value, (int, float)) or list(chosen_by) != [self.best_metric, self.best_mode]:
            log.warning("best pointed at %s, chosen by %s; restarting the best checkpoint by %s (%s)", best,
                        chosen_by if record else "a checkpoint that is gone", self.best_metric, self.best_mode)
            return None
        return float(value)

    def step_folders(self) -> list[Path]:
        """The step-N folders of the checkpoints folder, complete or not."""
        return [f for f in self.root.glob(f"{STEP_PREFIX}*") if tag_step(f.name) is not None]

    def complete_by_sequence(self) -> list[str]:
        """Tags of the complete checkpoints, oldest save first."""
        return [f.name for f in sorted((f for f in self.step_folders() if is_complete(f)), key=save_sequence)]

    def prune(self) -> None:
        """Keep the `keep_last` newest saves and the best; drop incomplete folders (stale: saves
        are sequential and this one just finished)."""
        keep = set(self.complete_by_sequence()[-self.keep_last:]) | {self.best_tag()}
        for folder in self.step_folders():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        sync_folder(self.root)

    # -- resuming ---------------------------------------------------------------------------
    def continue_from(self, tag: str) -> None:
        """Resuming `tag` of this folder starts a new timeline from it: checkpoints saved after it
        (and partial folders above its step) are moved into set-aside-<time>/, `latest` names it
        again, and `best` restarts if it pointed into the set-aside ones."""
        rank0_decides(lambda: self.set_aside_after(tag))

    def set_aside_after(self, tag: str) -> None:
        resumed_sequence, resumed_step = save_sequence(self.root / tag), tag_step(tag)
        later = [f for f in self.step_folders() if f.name != tag
                 and (save_sequence(f) > resumed_sequence if is_complete(f) else tag_step(f.name) > resumed_step)]
        partial = [f.name for f in self.step_folders() if not is_complete(f) and f not in later]
        if partial:
            log.warning("ignoring incomplete checkpoint folder(s) %s (interrupted saves; pruned at the next save)",
                        ", ".join(sorted(partial)))
        if later:
            aside = self.root / f"{SET_ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            aside.mkdir()
            for folder in later:
                folder.rename(aside / folder.name)
            log.warning("resuming %s of a run that went on to %s: those checkpoints are moved to %s", tag,
                        ", ".join(sorted(f.name for f in later)), aside)
            best = self.best_tag()
            if best in {f.name for f in later}:
                (self.root / BEST).unlink()
                log.warning("best pointed at %s, now set aside; restarting the best checkpoint by %s (%s)", best,
                            self.best_metric, self.best_mode)
            sync_folder(aside)
        atomic_write_text(self.root / LATEST, tag)
