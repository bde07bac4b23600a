"""open_clip's weight-file layout, written: a folder open_clip loads as `local-dir:` or a
weights file with its config beside it. Exports and WiSE-FT mixes are written here."""
import json
import logging
from pathlib import Path

import torch

from dsclip.fileio import atomic_write, atomic_write_text
from dsclip.model.architectures import sized_config
from dsclip.model.config import ModelConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
SAFETENSORS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
HF_WEIGHT_FILES = (SAFETENSORS_FILE, WEIGHTS_FILE, "open_clip_pytorch_model.pt")  # in the order open_clip prefers
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def write_open_clip(state: dict[str, torch.Tensor], model: ModelConfig, out: Path, safetensors: bool = True) -> Path:
    """Weights + config that plain open_clip loads. `out` is a folder (open_clip's HF layout,
    loadable as 'local-dir:<out>') or a weights file, with the config beside it as <file>.json.
    safetensors by default: a file anyone can load without running code; `safetensors=False` writes
    open_clip's pickled .bin. Returns the weights file."""
    if out.suffix in WEIGHT_SUFFIXES:
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
    if weights.name in HF_WEIGHT_FILES:  # an earlier export's file in another format would be loaded instead
        for stale in (weights.parent / name for name in HF_WEIGHT_FILES if name != weights.name):
            if stale.exists():
                log.info("removed %s: %s replaces it", stale, weights.name)
                stale.unlink()
    model_cfg = sized_config(model.name, model.image_size, model.context_length)
    atomic_write_text(config, json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=2))
    return weights
