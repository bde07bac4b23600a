"""DeepSpeed training checkpoints and export to a plain open_clip model folder."""
import json
import os
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dsclip.model import ModelConfig

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
CONFIG_FILE = "open_clip_config.json"
MODULE_PREFIX = "clip."  # ContrastiveModel keeps the open_clip model under .clip


def step_tag(step: int) -> str:
    return f"step-{step}"


def save_training_checkpoint(engine, checkpoint_dir: Path, client_state: dict[str, Any]) -> str:
    """All ranks: write this step's engine state (shards, optimizer, schedule) plus client state."""
    tag = step_tag(engine.global_steps)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state)
    return tag


def consolidated_state_dict(checkpoint_dir: Path, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The fp32 open_clip state dict of a ZeRO-2/3 checkpoint (DeepSpeed merges the shards)."""
    merged = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    state = {}
    for name, tensor in merged.items():
        if not name.startswith(MODULE_PREFIX):
            raise ValueError(f"checkpoint {checkpoint_dir} holds '{name}', not a dsclip model parameter")
        state[name[len(MODULE_PREFIX):]] = tensor
    # dsclip trains a 1-element logit scale (DeepSpeed cannot broadcast 0-dim tensors); open_clip's is 0-dim.
    for key in ("logit_scale", "logit_bias"):
        if key in state:
            state[key] = state[key].reshape(())
    return state


def open_clip_config(model: ModelConfig) -> dict[str, Any]:
    """`open_clip_config.json` content: the architecture with dsclip's overrides applied."""
    model_cfg = open_clip.get_model_config(model.name)
    if model.image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = model.image_size
    if model.context_length is not None:
        model_cfg["text_cfg"]["context_length"] = model.context_length
    return {"model_cfg": model_cfg, "preprocess_cfg": {}}


def export_model(checkpoint_dir: Path, tag: str, model: ModelConfig, out_dir: Path,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write an open_clip model folder: weights + config, loadable with
    `open_clip.create_model_and_transforms('local-dir:<out_dir>')` or `pretrained=<weights file>`."""
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in consolidated_state_dict(checkpoint_dir, tag).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    atomic_write(weights, lambda path: torch.save(state, path))
    atomic_write(out_dir / CONFIG_FILE,
                 lambda path: Path(path).write_text(json.dumps(open_clip_config(model), indent=2)))
    return weights


def atomic_write(target: Path, write) -> None:
    """Write through a temporary name in the same folder, then rename: readers never see half a file."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
