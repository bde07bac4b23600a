"""A dsclip run folder seen from outside the run: where its complete checkpoints are, and their
weights merged into one open_clip state dict. `--pretrained RUN`, `--resume`, `dsclip export`
and WiSE-FT all find checkpoints here; only training/checkpoint.py writes them.

    <run>/checkpoints/step-N/            DeepSpeed's files (ZeRO shards, optimizer, LR schedule)
    <run>/checkpoints/step-N/rank-R.pt   dsclip's per-rank train state (data position, RNG, config)
    <run>/checkpoints/step-N/COMPLETE    written by rank 0 once every rank finished: only then does step-N count
    <run>/checkpoints/latest             text: the tag of the newest complete checkpoint (replaced atomically, last)
    <run>/checkpoints/best               text: the tag of the best checkpoint by train.best_metric
"""
from pathlib import Path
from typing import Optional

import torch

from dsclip.errors import CheckpointError
from dsclip.logs import prints_as_debug

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
CHECKPOINTS = "checkpoints"
MODULE_PREFIX = "clip."  # the engine's ContrastiveModel keeps the open_clip model under .clip
STEP_PREFIX = "step-"


def step_tag(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def tag_step(tag: str) -> Optional[int]:
    rest = tag[len(STEP_PREFIX):]
    return int(rest) if tag.startswith(STEP_PREFIX) and rest.isdigit() else None


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def complete_steps(root: Path) -> list[int]:
    return [tag_step(f.name) for f in root.glob(f"{STEP_PREFIX}*") if tag_step(f.name) is not None and is_complete(f)]


def read_pointer(path: Path) -> Optional[str]:
    return path.read_text().strip() if path.is_file() else None


def is_run_folder(folder: Path) -> bool:
    """A run folder or its checkpoints folder (it has a `latest` pointer)."""
    return (folder / LATEST).is_file() or (folder / CHECKPOINTS / LATEST).is_file()


def resolve_checkpoint(spec: str, run_checkpoints: Path) -> tuple[Path, str]:
    """(checkpoints root, tag) for `latest`, a run folder, a checkpoints folder or a step folder."""
    if spec == LATEST:
        root = run_checkpoints
    else:
        path = Path(spec)
        if not path.exists():
            raise CheckpointError(f"checkpoint {spec} not found: pass 'latest' or a run / step-N folder")
        if is_complete(path) or tag_step(path.name) is not None:
            return _checked(path.parent, path.name)
        root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    tag = read_pointer(root / LATEST)
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


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 open_clip state dict of a ZeRO-2/3 checkpoint (DeepSpeed merges the shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with prints_as_debug("DeepSpeed"):  # it prints what it found; its progress bars stay on stderr
        merged = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    state = {}
    for name, tensor in merged.items():
        if not name.startswith(MODULE_PREFIX):
            raise CheckpointError(f"checkpoint {root / tag} holds '{name}', not a dsclip model parameter")
        state[name[len(MODULE_PREFIX):]] = tensor
    return state
