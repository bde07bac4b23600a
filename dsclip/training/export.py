"""Export: a run's DeepSpeed checkpoint consolidated into open_clip weights + config, in the
export dtype, that plain open_clip loads."""
from pathlib import Path

import torch

from dsclip.model.config import ModelConfig
from dsclip.model.run_folder import consolidated_state_dict
from dsclip.model.weights import write_open_clip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_checkpoint(root: Path, tag: str, model: ModelConfig, out: Path, dtype: torch.dtype = torch.float32,
                      safetensors: bool = False, trust: bool = False) -> Path:
    """Consolidate checkpoint `tag` of the checkpoints folder `root` and write it; returns the weights file.
    `trust`: its files may be unpickled in full (--trust-checkpoint)."""
    merged = consolidated_state_dict(root, tag, trust)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
    return write_open_clip(state, model, out, safetensors)
