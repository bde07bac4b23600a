"""Export: a run's DeepSpeed checkpoint consolidated into open_clip weights + config, in the
export dtype, that plain open_clip loads (and, on request, a folder transformers' CLIPModel loads);
a LoRA run's adapters merged into them, and written alone beside them in peft's adapter format."""
from pathlib import Path
from typing import Optional

import torch

from dsclip.model.adapters import SCALING_KEY, merged_state_dict, write_adapters
from dsclip.model.config import AdapterConfig, ModelConfig
from dsclip.model.hf_export import clip_config, write_transformers
from dsclip.model.run_folder import consolidated_state_dict
from dsclip.model.weights import WEIGHT_SUFFIXES, write_open_clip
from dsclip.training.config import EXPORT_FORMATS, TRANSFORMERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def adapters_folder(out: Path) -> Path:
    """Where an export to `out` (a folder or a weights file) puts a LoRA run's adapters."""
    return out.with_name(f"{out.stem}.adapters") if out.suffix in WEIGHT_SUFFIXES else out / "adapters"


def export_checkpoint(root: Path, tag: str, model: ModelConfig, outputs: dict[str, Path],
                      dtype: torch.dtype = torch.float32, trust: bool = False,
                      adapters: Optional[AdapterConfig] = None) -> list[Path]:
    """Consolidate checkpoint `tag` of the checkpoints folder `root` once and write it in every
    format of `outputs` (format -> folder or weights file): "safetensors" and "bin" in open_clip's
    layout, a LoRA run's adapters beside it; "transformers" a CLIPModel folder. Returns what was
    written. `trust`: the checkpoint's files may be unpickled in full (--trust-checkpoint);
    `adapters`: the run's section."""
    unknown = sorted(set(outputs) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"unknown export format {unknown[0]!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if TRANSFORMERS in outputs:
        clip_config(model)  # a model CLIPModel cannot hold is refused before the consolidation
    consolidated = consolidated_state_dict(root, tag, trust)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged_state_dict(consolidated).items()}
    written = []
    for fmt, out in outputs.items():
        if fmt == TRANSFORMERS:
            written.append(write_transformers(state, model, out))
            continue
        if SCALING_KEY in consolidated:
            write_adapters(consolidated, model.name, adapters_folder(out), adapters.dropout if adapters else 0.0)
        written.append(write_open_clip(state, model, out, safetensors=fmt == "safetensors"))
    return written
