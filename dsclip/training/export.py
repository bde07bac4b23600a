"""Export: a run's DeepSpeed checkpoint consolidated into open_clip weights + config, in the
export dtype, that plain open_clip loads; a LoRA run's adapters merged into them, and written
alone beside them in peft's adapter format."""
from pathlib import Path
from typing import Optional

import torch

from dsclip.model.adapters import SCALING_KEY, merged_state_dict, write_adapters
from dsclip.model.config import AdapterConfig, ModelConfig
from dsclip.model.run_folder import consolidated_state_dict
from dsclip.model.weights import WEIGHT_SUFFIXES, write_open_clip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def adapters_folder(out: Path) -> Path:
    """Where an export to `out` (a folder or a weights file) puts a LoRA run's adapters."""
    return out.with_name(f"{out.stem}.adapters") if out.suffix in WEIGHT_SUFFIXES else out / "adapters"


def export_checkpoint(root: Path, tag: str, model: ModelConfig, out: Path, dtype: torch.dtype = torch.float32,
                      safetensors: bool = False, trust: bool = False, adapters: Optional[AdapterConfig] = None
                      ) -> Path:
    """Consolidate checkpoint `tag` of the checkpoints folder `root` and write it; returns the weights file.
    `trust`: its files may be unpickled in full (--trust-checkpoint). `adapters`: the run's section."""
    consolidated = consolidated_state_dict(root, tag, trust)
    if SCALING_KEY in consolidated:
        write_adapters(consolidated, model.name, adapters_folder(out), adapters.dropout if adapters else 0.0)
    merged = merged_state_dict(consolidated)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
    return write_open_clip(state, model, out, safetensors)
