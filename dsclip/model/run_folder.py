"""A dsclip run folder seen from outside the run: where its complete checkpoints are, and their
weights merged into one open_clip state dict. `--pretrained RUN`, `--resume`, `dsclip export`
and WiSE-FT all find checkpoints here; only training/checkpoint.py writes them.

    <run>/checkpoints/step-N/            DeepSpeed's files (ZeRO shards, optimizer, LR schedule)
    <run>/checkpoints/step-N/rank-R.pt   dsclip's per-rank train state (data position, RNG, config)
    <run>/checkpoints/step-N/COMPLETE    JSON written by rank 0 once every rank's files are synced: only then does
                                         step-N count; it holds the save sequence number and every file's sha256
    <run>/checkpoints/latest             text: the tag of the newest complete checkpoint (replaced atomically, last)
    <run>/checkpoints/best               text: the tag of the best checkpoint by train.best_metric
"""
import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from dsclip.errors import CheckpointError
from dsclip.logs import prints_as_debug
from dsclip.model.safe_files import LOAD_ERRORS, check_files, deepspeed_load_error, weights_only_loads

log = logging.getLogger(__name__)

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


def read_pointer(path: Path) -> Optional[str]:
    """The tag a `latest` / `best` file names, None without the file. Only a step-N tag is accepted:
    the pointer becomes a path, and '/etc' or '../..' would leave the checkpoints folder."""
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not re.fullmatch(rf"{STEP_PREFIX}[0-9]+", tag):
        raise CheckpointError(f"{path} names {tag[:80]!r}, not a step-N checkpoint of this folder: write the tag of "
                              f"a complete checkpoint into it (e.g. {step_tag(0)}) or delete it")
    return tag


def read_marker(folder: Path) -> dict[str, Any]:
    """A checkpoint's COMPLETE record: its step, save sequence, metrics and file manifest."""
    marker = folder / COMPLETE
    try:
        record = json.loads(marker.read_text() or "null")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{marker} is unreadable ({type(e).__name__}): the checkpoint cannot be verified; "
                              "resume from an earlier step-N folder") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{marker} holds no checkpoint record: resume from an earlier step-N folder")
    return record


def verify_checkpoint(root: Path, tag: str, trust: bool, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems with the files of checkpoint `tag` (see safe_files.check_files); rank r checks
    every world_size-th file of the manifest, so the ranks of a run share the reading."""
    folder = root / tag
    manifest = read_marker(folder).get("files")
    if manifest is None:  # written before dsclip recorded manifests
        log.warning("%s has no file manifest: its files cannot be verified before loading", folder)
        return []
    return check_files(folder, manifest, sorted(manifest)[rank::world_size], trust)


def raise_first(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


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


def consolidated_state_dict(root: Path, tag: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 open_clip state dict of a ZeRO-2/3 checkpoint (DeepSpeed merges the shards), its
    files verified first and loaded weights-only unless trusted."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    raise_first(verify_checkpoint(root, tag, trust))
    try:
        with prints_as_debug("DeepSpeed"), weights_only_loads(trust):  # it prints what it found
            merged = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except LOAD_ERRORS as e:  # a file the manifest did not cover, or no manifest
        raise deepspeed_load_error(root / tag, e) from None
    state = {}
    for name, tensor in merged.items():
        if not name.startswith(MODULE_PREFIX):
            raise CheckpointError(f"checkpoint {root / tag} holds '{name}', not a dsclip model parameter")
        state[name[len(MODULE_PREFIX):]] = tensor
    return state
