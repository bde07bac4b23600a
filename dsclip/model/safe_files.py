"""Checkpoint files read as untrusted: a pickle may run code when it is loaded, so every file that
dsclip did not write in this run is loaded weights-only (tensors, plain containers and the three
DeepSpeed classes its checkpoints hold) unless the user passes --trust-checkpoint. COMPLETE
carries a sha256 manifest of its folder; `check_files` verifies it before anything is loaded.
"""
import hashlib
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from dsclip.errors import CheckpointError, first_line
from dsclip.fileio import sync_file

TRUST_HINT = "if you trust its origin, pass --trust-checkpoint (recipe: model.trust_checkpoint: true)"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's switch: weights_only=True whatever the caller passes
FORCE_FULL_LOAD = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # its opposite; torch refuses both at once
HASH_CHUNK = 16 << 20
# What a failed load raises: a refused pickle, a damaged zip or pickle stream, an unreadable file.
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError)


def refusal(path: Path) -> str:
    return f"{path} holds pickled Python objects that could run code when loaded; refusing it ({TRUST_HINT})"


def deepspeed_checkpoint_classes() -> list[type]:
    """The classes in DeepSpeed 0.19's ZeRO-2/3 checkpoint files besides tensors and containers:
    an int enum, a plain record and the loss scalers (static; dynamic under fp16), none of which
    runs code when the unpickler restores its attributes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def is_refusal(error: BaseException) -> bool:
    """Whether a load failed because the weights-only unpickler met a global it does not allow."""
    return isinstance(error, pickle.UnpicklingError) and "GLOBAL" in str(error)


def load_file(path: Path, trust: bool, mmap: bool = False) -> Any:
    """torch.load of one checkpoint file, weights-only unless trusted; a refused or unreadable file
    is a one-line CheckpointError naming it. `mmap` reads the pickle and maps the tensor data."""
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except LOAD_ERRORS as e:
        raise CheckpointError(refusal(path) if is_refusal(e) else damaged(path, e)) from None


def damaged(path: Path, error: BaseException) -> str:
    return f"{path} is damaged or truncated ({first_line(error)}): restore it, or resume from an earlier step-N folder"


def deepspeed_load_error(folder: Path, error: BaseException) -> CheckpointError:
    """The one-line error for a failed DeepSpeed load of checkpoint `folder` (files the manifest
    did not cover, or a checkpoint without one)."""
    if is_refusal(error):
        return CheckpointError(f"a file of {folder} holds pickled Python objects that could run code when loaded; "
                               f"refusing it ({TRUST_HINT})")
    return CheckpointError(f"DeepSpeed cannot load {folder} ({type(error).__name__}: {first_line(error)}): the "
                           "checkpoint is damaged or not a dsclip ZeRO checkpoint; use an earlier step-N folder")


@contextmanager
def weights_only_loads(trust: bool) -> Iterator[None]:
    """Every torch.load inside runs weights-only unless trusted. DeepSpeed's checkpoint engine and
    zero_to_fp32 call torch.load(weights_only=False) and take no argument to change it, so torch's
    own override switch is set for the duration (the process is single-threaded while it loads)."""
    if trust:
        yield
        return
    previous = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, FORCE_FULL_LOAD)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            yield
    finally:
        del os.environ[FORCE_WEIGHTS_ONLY]
        os.environ.update({name: value for name, value in previous.items() if value is not None})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def seal(paths: list[Path]) -> dict[str, str]:
    """fsync each file (DeepSpeed writes its shards without) and return {name: sha256} for COMPLETE."""
    sealed = {}
    for path in paths:
        sync_file(path)
        sealed[path.name] = sha256_of(path)
    return sealed


def check_files(folder: Path, manifest: dict[str, str], names: list[str], trust: bool) -> list[str]:
    """Problems with the manifest's files `names` in `folder`: missing, changed since the save, or
    (untrusted) holding objects a weights-only load refuses. Nothing is loaded when a problem is found."""
    problems = []
    for name in names:
        path = folder / name
        if Path(name).name != name or name.startswith("."):  # a crafted manifest must not reach outside the folder
            problems.append(f"{folder / 'COMPLETE'} lists {name!r}, not a file of its folder: the checkpoint is not "
                            "dsclip's; resume from an earlier step-N folder")
        elif not path.is_file():
            problems.append(f"{path} is missing: the checkpoint is incomplete; resume from an earlier step-N folder")
        elif sha256_of(path) != str(manifest[name]):
            problems.append(f"{path} changed since it was saved (sha256 mismatch: damaged or replaced); restore it, "
                            "or resume from an earlier step-N folder")
        elif path.suffix == ".pt" and not trust:
            try:
                load_file(path, trust=False, mmap=True)
            except CheckpointError as e:
                problems.append(str(e))
    return problems
