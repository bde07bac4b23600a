"""Run configuration: typed dataclasses built from defaults -> recipe YAML -> `--set` overrides.

Precedence is exactly that order. Each package keeps its sections in its own `config.py`
(dsclip/model/config.py, dsclip/data/config.py, ...), plain dataclasses that import nothing
heavy; `RunConfig` composes them. Loading is strict: an unknown key, a value of the wrong type
or an impossible combination raises `ConfigError` naming the key path, the value and, for
unknown keys, the closest valid key. Importing this module loads no torch, open_clip or
DeepSpeed; checking `model.name` loads open_clip.
"""
import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dsclip.credentials import redact
from dsclip.data.config import DataConfig
from dsclip.ensemble.config import WiseFtConfig
from dsclip.errors import ConfigError
from dsclip.eval.config import EvalConfig
from dsclip.loss.config import LossConfig
from dsclip.model.config import AdapterConfig, FreezeConfig, ModelConfig
from dsclip.report.config import LoggingConfig
from dsclip.training.config import OptimConfig, TrainConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "from_dict", "to_dict", "recipe_reference"]


@dataclass
class RunConfig:
    name: str = "default"  # run name: outputs go to <output_dir>/<name>
    output_dir: str = "outputs"  # parent folder of run folders
    seed: int = 0  # seeds model init, data order and augmentation
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wise_ft: WiseFtConfig = field(default_factory=WiseFtConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def export_dir(self) -> Path:
        """Where the run's open_clip export goes (train.export), and where WiSE-FT finds it."""
        return self.run_dir / "export"

    @property
    def transformers_export_dir(self) -> Path:
        """Where train.export_transformers writes the run's CLIPModel folder."""
        return self.run_dir / "export-transformers"

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
                try:
                    section.validate()
                except ConfigError:
                    raise
                except ValueError as e:
                    raise ConfigError(f"{f.name}: {e}") from None
        if self.wise_ft.enabled and not self.model.pretrained:
            raise ConfigError("wise_ft.enabled needs model.pretrained: the sweep's alpha = 0 end is the model "
                              "the fine-tune starts from")
        if self.loss.kind == "siglip" and not self.model.has_logit_bias():
            raise ConfigError(f"loss.kind=siglip needs a logit bias, which {self.model.name} has not: set "
                              "model.init_logit_bias: -10 and model.init_logit_scale: 2.303 (or use a SigLIP model)")
        if self.optim.warmup_steps >= self.train.max_steps > 0:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_steps} is not below train.max_steps={self.train.max_steps}: "
                "lower the warmup or train longer")


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Defaults, then the recipe file (if any), then `key.path=value` overrides; validated."""
    raw: dict[str, Any] = {}
    if recipe is not None:
        raw = read_recipe(recipe)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = from_dict(RunConfig, raw, path="")
    cfg.validate()
    return cfg


def read_recipe(path: str) -> dict[str, Any]:
    recipe = Path(path)
    if not recipe.is_file():
        raise ConfigError(f"recipe file not found: {path} (pass an existing YAML file to --recipe)")
    with open(recipe) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value (e.g. --set optim.lr=1e-5)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({e.problem}); quote strings "
                          "that hold braces, colons or brackets, e.g. --set 'data.webdataset.urls=[\"/d/{0..9}.tar\"]'"
                          ) from None


def from_dict(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value against the field types."""
    where = path or "recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key '{key_path}'{_suggestion(str(key), fields, path)}")
        kwargs[key] = _coerce(hints[key], value, key_path)
    return cls(**kwargs)


def _suggestion(key: str, fields: dict, path: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{path + '.' if path else ''}{close[0]}'?"
    return f"; valid keys here: {', '.join(sorted(fields))}"


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _coerce(candidate, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {inner}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def recipe_reference() -> str:
    """The markdown table of every recipe key (docs/recipes.md's recipe reference is generated from it)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{key}` | `{default!r}` | {comment} |" for key, default, comment in _reference_rows(RunConfig, "")]
    return "\n".join(rows)


def _reference_rows(cls: type, prefix: str):
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        item = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is list else None
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _reference_rows(hints[f.name], f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(item):  # a list of sections: document the default, then each item's keys
            count = len(getattr(defaults, f.name))
            yield f"{prefix}{f.name}", f"{count} x {{...}}" if count else [], comments.get(f.name, "") + " (a list)"
            yield from _reference_rows(item, f"{prefix}{f.name}[].")
        else:
            yield f"{prefix}{f.name}", getattr(defaults, f.name), comments.get(f.name, "")


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the class source: the one place a field is documented."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2).replace("|", "\\|")
    return comments


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config."""
    return dataclasses.asdict(cfg)


def recorded(cfg: Any) -> dict[str, Any]:
    """A config as dsclip writes it anywhere (config.yaml, train state, W&B, TensorBoard): plain
    data with the credentials of data URLs and pipe: commands redacted."""
    return redacted(to_dict(cfg))


def redacted(value: Any) -> Any:
    """`value` (plain config data) with every string passed through redact()."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(v) for v in value)
    return value


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": value} for every leaf of a nested config mapping (lists are leaves)."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(flat_keys(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


if __name__ == "__main__":
    print(recipe_reference())
