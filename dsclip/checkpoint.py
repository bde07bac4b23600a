"""Training checkpoints (save, prune, resume) and export to a plain open_clip model.

Layout of `<run>/checkpoints/`:

    step-N/               DeepSpeed's files (ZeRO shards, optimizer, LR schedule)
    step-N/rank-R.pt      dsclip's per-rank train state: data position, RNG, resolved config
    step-N/COMPLETE       written by rank 0 after every rank finished: only then does step-N count
    latest                text: the tag of the newest complete checkpoint, replaced atomically, last
    best                  text: the tag of the best checkpoint by `train.best_metric` (never pruned)

A crash mid-save leaves step-N without COMPLETE and `latest` on the previous checkpoint.
"""
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import open_clip
import torch
import torch.distributed as dist

from dsclip.model import ModelConfig

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
SAFETENSORS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
MODULE_PREFIX = "clip."  # ContrastiveModel keeps the open_clip model under .clip
COMPLETE = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint to resume or export is missing, incomplete or does not fit this run."""


def step_tag(step: int) -> str:
    return f"step-{step}"


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary name in the same folder, then rename: readers never see half a file."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds complete checkpoints of one run; every method is called on all ranks."""

    def __init__(self, root: Path, keep_last: int, best_metric: Optional[str] = None, best_mode: str = "max"):
        self.root, self.keep_last = root, keep_last
        self.best_metric, self.best_mode = best_metric, best_mode
        self.rank = dist.get_rank()

    # -- saving -----------------------------------------------------------------------------
    def save(self, engine, train_state: dict[str, Any], metrics: Optional[dict[str, float]] = None) -> str:
        """Write step-<global step>; returns its tag. An existing complete one is left as it is."""
        tag = step_tag(engine.global_steps)
        if is_complete(self.root / tag):
            return tag
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        state = {**train_state, "rng": rng_state(), "world_size": dist.get_world_size()}
        atomic_write(self.root / tag / f"rank-{self.rank}.pt", lambda path: torch.save(state, path))
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            (self.root / tag / COMPLETE).write_text(json.dumps({"step": engine.global_steps, **(metrics or {})}))
            self._update_best(tag, metrics or {})
            atomic_write(self.root / "latest", lambda path: Path(path).write_text(tag))
            self._prune()
        dist.barrier()
        return tag

    def _update_best(self, tag: str, metrics: dict[str, float]) -> None:
        if not self.best_metric or self.best_metric not in metrics:
            return
        best = read_pointer(self.root / "best")
        if best is not None:
            previous = json.loads((self.root / best / COMPLETE).read_text()).get(self.best_metric)
            better = metrics[self.best_metric] > previous if self.best_mode == "max" \
                else metrics[self.best_metric] < previous
            if previous is not None and not better:
                return
        atomic_write(self.root / "best", lambda path: Path(path).write_text(tag))

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and the best; drop stale incomplete ones."""
        complete = sorted(complete_steps(self.root))
        keep = {step_tag(s) for s in complete[-self.keep_last:]} | {read_pointer(self.root / "best")}
        newest = complete[-1] if complete else -1
        for folder in self.root.glob("step-*"):
            step = tag_step(folder.name)
            stale_partial = not is_complete(folder) and step is not None and step < newest
            if folder.name not in keep and (is_complete(folder) or stale_partial):
                shutil.rmtree(folder, ignore_errors=True)

    # -- resuming ---------------------------------------------------------------------------
    def read_train_state(self, tag: str) -> dict[str, Any]:
        """This rank's dsclip state of checkpoint `tag` (config, data position, RNG, world size)."""
        return read_rank_state(self.root, tag, self.rank)

    def restore(self, engine, tag: str, state: dict[str, Any]) -> None:
        """Engine state (model, optimizer, LR schedule, global step) and this rank's RNG."""
        load_path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.root / tag}")
        set_rng_state(state["rng"])


def read_rank_state(root: Path, tag: str, rank: int) -> dict[str, Any]:
    state_file = root / tag / f"rank-{rank}.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: that checkpoint was written by fewer ranks than this run "
                              "has; resume with the original number of ranks")
    # Our own file, written by save(): it holds numpy RNG state, which weights_only cannot read.
    return torch.load(state_file, weights_only=False)


def run_config_of(root: Path, tag: str):
    """The resolved RunConfig a checkpoint was trained with."""
    from dsclip.config import from_dict, RunConfig
    return from_dict(RunConfig, read_rank_state(root, tag, 0)["config"], path="")


# Recipe keys a resumed run may change: they do not alter what is computed.
RESUME_MAY_CHANGE = ("name", "output_dir", "logging.", "eval.", "train.save_every", "train.keep_last",
                     "train.export", "train.best_metric", "train.best_mode", "model.grad_checkpointing",
                     "model.activation_offload", "model.trust_checkpoint", "wise_ft.")


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int) -> list[str]:
    """Differences that make an exact continuation impossible, as 'key: saved -> now' lines."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    conflicts = [f"{key}: {flat_saved.get(key)!r} -> {flat_current.get(key)!r}"
                 for key in sorted(set(flat_saved) | set(flat_current))
                 if flat_saved.get(key) != flat_current.get(key) and not key.startswith(RESUME_MAY_CHANGE)]
    if saved_world != world:
        conflicts.append(f"world size: {saved_world} -> {world} (ZeRO shards are per rank; export the "
                         "checkpoint and start a new run with --pretrained to change it)")
    return conflicts


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def tag_step(tag: str) -> Optional[int]:
    prefix = "step-"
    return int(tag[len(prefix):]) if tag.startswith(prefix) and tag[len(prefix):].isdigit() else None


def complete_steps(root: Path) -> list[int]:
    return [tag_step(f.name) for f in root.glob("step-*") if tag_step(f.name) is not None and is_complete(f)]


def read_pointer(path: Path) -> Optional[str]:
    return path.read_text().strip() if path.is_file() else None


def resolve_checkpoint(spec: str, run_checkpoints: Path) -> tuple[Path, str]:
    """(checkpoints root, tag) for `latest`, a run folder, a checkpoints folder or a step folder."""
    if spec == "latest":
        root = run_checkpoints
    else:
        path = Path(spec)
        if not path.exists():
            raise CheckpointError(f"checkpoint {spec} not found: pass 'latest' or a run / step-N folder")
        if is_complete(path) or tag_step(path.name) is not None:
            return _checked(path.parent, path.name)
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tag = read_pointer(root / "latest")
    if tag is None:
        raise CheckpointError(f"no complete checkpoint in {root} (no 'latest' file): nothing to resume; "
                              "start without --resume, or pass a step-N folder")
    return _checked(root, tag)


def _checked(root: Path, tag: str) -> tuple[Path, str]:
    if not (root / tag).is_dir():
        raise CheckpointError(f"checkpoint {root / tag} not found (pruned or never written): pass 'latest' or "
                              "an existing step-N folder")
    if not is_complete(root / tag):
        raise CheckpointError(f"checkpoint {root / tag} is incomplete (no {COMPLETE} marker; its save was "
                              f"interrupted): resume from 'latest' or an earlier step-N folder")
    return root, tag


# -- export -----------------------------------------------------------------------------------
def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 open_clip state dict of a ZeRO-2/3 checkpoint (DeepSpeed merges the shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    merged = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    state = {}
    for name, tensor in merged.items():
        if not name.startswith(MODULE_PREFIX):
            raise CheckpointError(f"checkpoint {root / tag} holds '{name}', not a dsclip model parameter")
        state[name[len(MODULE_PREFIX):]] = tensor
    return state


def open_clip_config(model: ModelConfig) -> dict[str, Any]:
    """`open_clip_config.json` content: the architecture with dsclip's overrides applied."""
    model_cfg = open_clip.get_model_config(model.name)
    if model.image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = model.image_size
    if model.context_length is not None:
        model_cfg["text_cfg"]["context_length"] = model.context_length
    return {"model_cfg": model_cfg, "preprocess_cfg": {}}


def export_model(root: Path, tag: str, model: ModelConfig, out: Path, dtype: torch.dtype = torch.float32,
                 safetensors: bool = False) -> Path:
    """Consolidate checkpoint `tag` and write it with `write_open_clip`."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in consolidated_state_dict(root, tag).items()}
    return write_open_clip(state, model, out, safetensors)


def write_open_clip(state: dict[str, torch.Tensor], model: ModelConfig, out: Path, safetensors: bool = False) -> Path:
    """Weights + config that plain open_clip loads. `out` is a folder (open_clip's HF layout,
    loadable as 'local-dir:<out>') or a weights file, with the config beside it as <file>.json."""
    if out.suffix in (".bin", ".pt", ".pth", ".safetensors"):
        weights, config = out, out.with_suffix(".json")
    else:
        weights = out / (SAFETENSORS_FILE if safetensors else WEIGHTS_FILE)
        config = out / CONFIG_FILE
    weights.parent.mkdir(parents=True, exist_ok=True)
    # dsclip trains a 1-element logit scale (DeepSpeed cannot broadcast 0-dim tensors); open_clip's is 0-dim.
    state = {k: v.reshape(()) if k in ("logit_scale", "logit_bias") else v for k, v in state.items()}
    if weights.suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(weights, lambda path: save_file({k: v.contiguous() for k, v in state.items()}, path))
    else:
        atomic_write(weights, lambda path: torch.save(state, path))
    atomic_write(config, lambda path: Path(path).write_text(json.dumps(open_clip_config(model), indent=2)))
    return weights
