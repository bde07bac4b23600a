"""Initial weights for fine-tuning (`--pretrained`): model weights only, never training state.

Sources: an open_clip pretrained tag for the architecture (open_clip's loader and cache), a
local weights file (open_clip state dict .pt/.bin/.safetensors, OpenAI's TorchScript CLIP, a
dsclip export), a Hugging Face hub style folder (open_clip_config.json + weights),
`hf-hub:org/name` from the local HF cache, or a dsclip run / checkpoint folder.
"""
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import open_clip
import torch
from open_clip.convert import convert_state_dict
from open_clip.factory import load_state_dict as open_clip_read_weights
from open_clip.model import convert_to_custom_text_state_dict
from torch import nn

from dsclip.errors import PretrainedError
from dsclip.model.adapters import merged_state_dict, read_adapters
from dsclip.model.pos_embed import fit_pos_embeds
from dsclip.model.run_folder import CHECKPOINTS, consolidated_state_dict, is_run_folder, resolve_checkpoint
from dsclip.model.safe_files import TRUST_HINT, refusal
from dsclip.model.weights import CONFIG_FILE, HF_WEIGHT_FILES
from dsclip.model.zero_init import copy_into_partitions, expected_shapes, is_partitioned
from dsclip.ranks import rank0_decides

log = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"


def load_pretrained(clip: nn.Module, model_name: str, source: str, trust: bool = False,
                    adapters: Optional[Path] = None) -> None:
    """Load `source` into the bare open_clip model in place, before the engine exists, with the
    LoRA `adapters` folder merged into it if given. Built whole, every rank reads the files; built
    partitioned (zero.Init), rank 0 alone reads them and fills the ranks' shards one gathered
    parameter at a time."""
    def read() -> dict[str, torch.Tensor]:
        return with_adapters(fit_state_dict(clip, read_source(model_name, source, trust), source), adapters)

    if is_partitioned(clip):
        state_dict: dict[str, torch.Tensor] = {}

        def read_on_rank0() -> list[str]:
            state_dict.update(read())
            return list(state_dict)

        names = rank0_decides(read_on_rank0, PretrainedError)
        copy_into_partitions(clip, state_dict, names)
    else:
        state_dict = read()
        names = list(state_dict)
        clip.load_state_dict(state_dict, strict=False)
    report_leftovers(clip, names, model_name, source)


def report_leftovers(clip: nn.Module, names: list[str], model_name: str, source: str) -> None:
    expected = expected_shapes(clip)
    missing = [name for name in expected if name not in set(names)]
    unexpected = [name for name in names if name not in expected]
    if missing:
        log.warning("pretrained %s: %d parameters not in the file keep the weights the architecture was created "
                    "with: %s", source, len(missing), ", ".join(missing[:8]))
    if unexpected:
        log.warning("pretrained %s: %d tensors in the file are not used by %s: %s", source,
                    len(unexpected), model_name, ", ".join(unexpected[:8]))


def read_source(model_name: str, source: str, trust: bool) -> dict[str, torch.Tensor]:
    if source.startswith(HF_PREFIX):
        return read_file(hf_cache_weights(source[len(HF_PREFIX):], model_name), trust)
    path = Path(source).expanduser()
    if path.is_dir():
        return read_folder(path, model_name, trust)
    if path.is_file():
        return read_file(path, trust)
    if open_clip.get_pretrained_cfg(model_name, source):
        return read_file(Path(download_tag(model_name, source)), trust)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise PretrainedError(
        f"pretrained source '{source}' is neither a file, a folder nor an open_clip tag of {model_name}"
        + (f" (its tags: {', '.join(tags)})" if tags else " (open_clip knows no tags for it)"))


def download_tag(model_name: str, tag: str) -> str:
    """open_clip's own download into its cache (a cache hit needs no network)."""
    try:
        return open_clip.download_pretrained(open_clip.get_pretrained_cfg(model_name, tag))
    except Exception as e:  # network, hub and HTTP errors all mean the same to the user
        raise PretrainedError(
            f"pretrained tag '{tag}' of {model_name} is not in the local cache and could not be downloaded "
            f"({type(e).__name__}); download its weights where there is network and pass the file: "
            f"--pretrained /path/to/open_clip_model.safetensors") from None


def hf_cache_weights(repo_id: str, model_name: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise PretrainedError(
            f"hf-hub:{repo_id} is not in the local Hugging Face cache and dsclip does not download at run time: "
            f"run `huggingface-cli download {repo_id}` where there is network, or pass the folder") from None
    return weights_in_folder(folder, model_name)


def read_folder(folder: Path, model_name: str, trust: bool) -> dict[str, torch.Tensor]:
    """An HF-hub style model folder, or a dsclip run / checkpoints folder."""
    if is_run_folder(folder):
        root, tag = resolve_checkpoint(str(folder), folder / CHECKPOINTS)
        return merged_state_dict(consolidated_state_dict(root, tag, trust))  # a LoRA run's adapters merged
    return read_file(weights_in_folder(folder, model_name), trust)


def weights_in_folder(folder: Path, model_name: str) -> Path:
    config_file = folder / CONFIG_FILE
    if config_file.is_file():
        check_architecture(open_clip.get_model_config(f"local-dir:{folder}"), model_name, str(folder))
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PretrainedError(f"{folder} holds none of {', '.join(HF_WEIGHT_FILES)}: not an open_clip model folder")


def check_architecture(folder_cfg: dict, model_name: str, where: str) -> None:
    """The folder's architecture must be model.name's; image size and context length may differ
    (they are interpolated on load)."""
    expected = open_clip.get_model_config(model_name)

    def shape_of(cfg: dict) -> dict:
        vision = {k: v for k, v in cfg.get("vision_cfg", {}).items() if k != "image_size"}
        text = {k: v for k, v in cfg.get("text_cfg", {}).items() if k != "context_length"}
        return {"embed_dim": cfg.get("embed_dim"), "vision_cfg": vision, "text_cfg": text}

    if shape_of(folder_cfg) != shape_of(expected):
        raise PretrainedError(f"{where} holds a different architecture than model.name={model_name}: "
                              "set model.name to the architecture the weights were trained with")


def read_file(path: Path, trust: bool) -> dict[str, torch.Tensor]:
    """Weights only: safetensors or torch.load(weights_only=True), unless trusted. TorchScript
    archives (OpenAI's CLIP releases) hold code that runs when the model is called, and
    torch.jit.load has no weights-only mode: they are read only when trusted."""
    if is_torchscript(path):
        if not trust:
            raise PretrainedError(f"{path} is a TorchScript archive: it carries code, and loading it is only "
                                  f"safe for a file you trust; {TRUST_HINT}")
        state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        return {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    try:
        return open_clip_read_weights(str(path), weights_only=not trust)
    except pickle.UnpicklingError:
        raise PretrainedError(refusal(path)) from None
    except (RuntimeError, OSError, ValueError) as e:
        raise PretrainedError(f"cannot read weights from {path}: {str(e).splitlines()[0]}") from None


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def with_adapters(state_dict: dict[str, torch.Tensor], adapters: Optional[Path]) -> dict[str, torch.Tensor]:
    """A state dict in the model's layout with the LoRA `adapters` folder merged into it (if given)."""
    return merged_state_dict({**state_dict, **read_adapters(adapters)}) if adapters else state_dict


def fit_state_dict(clip: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`state_dict` made to fit the bare open_clip `clip`: open_clip's conversions (third-party
    layouts, custom-text naming), scalar vs 1-element logit scale, position embeddings fitted to
    this model's grid and context; a tensor whose shape still differs is an error."""
    state_dict = convert_state_dict(clip, state_dict)
    if "positional_embedding" in state_dict and not hasattr(clip, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    shapes = expected_shapes(clip)
    for key in ("logit_scale", "logit_bias"):
        if key in state_dict and key in shapes:
            state_dict[key] = state_dict[key].reshape(shapes[key])
    state_dict = fit_pos_embeds(state_dict, clip)
    if not set(state_dict) & set(shapes):
        raise PretrainedError(f"{source} shares no parameter names with {type(clip).__name__}: "
                              "not an open_clip / OpenAI CLIP state dict of this model")
    for name, tensor in state_dict.items():
        if name in shapes and tensor.shape != shapes[name]:
            raise PretrainedError(f"{source} does not fit this architecture (size mismatch for {name}: "
                                  f"{tuple(tensor.shape)} in the file, {tuple(shapes[name])} in the model): "
                                  "set model.name to the architecture the weights were trained with")
    return state_dict
