"""Freeze masks for fine-tuning strategies (full, frozen towers, partial, LiT).

``apply_freeze(model, cfg)`` sets ``requires_grad`` on the bare open_clip model (CLIP or
CustomTextCLIP, not a wrapper around it) before the DeepSpeed engine is built. Tower
locking has exactly open_clip's semantics: ``lock_image_tower(unlocked_groups=N,
freeze_bn_stats)`` and ``lock_text_tower(unlocked_layers=N, freeze_layer_norm)``; open_clip's
own functions do the work where they are correct. Two cases are done here instead, with
the same meaning: ``freeze_layer_norm=False`` on the built-in text tower (open_clip asserts)
and HF text towers (open_clip's ``HFTextEncoder.lock`` fails for BERT-type configs when
``unlocked_layers > 0``).

What "N groups/layers" means (counted from the output end, as in open_clip):
  image ViT:     groups = [embeddings + ln_pre], blocks 0..d-2, [block d-1 + ln_post], [proj];
                 N=1 unlocks proj only, N=2 adds the last block and ln_post, ...
  built-in text: the same shape: [embeddings], blocks 0..d-2, [block d-1 + ln_final],
                 [text_projection].
  HF text:       groups = [embeddings], layers 0..d-1; N=0 locks the whole HF transformer
                 (its pooler too), N>=1 keeps the last N groups and the pooler trainable.
                 The projection head (``text.proj``) is new in a CLIP, so it always trains.
"""
import fnmatch
from dataclasses import dataclass
from typing import Optional, get_args

from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import lock_text_tower
from torch import nn

from dsclip.errors import ConfigError
from dsclip.model.adapters import base_name, is_adapter_key
from dsclip.model.config import LOCKS_IMAGE, LOCKS_TEXT, FreezeConfig, Strategy, TextFreezeConfig
from dsclip.model.partition import TOWERS, LayerPartition, Tower, layer_label
from dsclip.model.zero_init import full_shape, is_partitioned


@dataclass
class LayerState:
    label: str  # embed, block i, head
    trainable: int  # trainable elements
    total: int  # all elements


@dataclass
class TowerSummary:
    tower: Tower
    trainable: int  # trainable elements
    total: int  # all elements
    layers: list[LayerState]  # embed .. head; empty when the tower has no known layer structure

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def unlocked(self) -> str:
        """What trains: all, none, or the layers (consecutive whole blocks merged, "(part)" if mixed)."""
        if self.trainable == self.total:
            return "all" if self.total else "-"
        if self.trainable == 0:
            return "none"
        if not self.layers:
            return "part"
        items: list[str] = []
        run: list[str] = []  # block numbers of a run of fully trainable blocks

        def close_run() -> None:
            if run:
                items.append(f"block {run[0]}" if len(run) == 1 else f"blocks {run[0]}-{run[-1]}")
                run.clear()

        for layer in self.layers:
            whole = layer.trainable == layer.total
            if whole and layer.label.startswith("block "):
                run.append(layer.label.split()[1])
                continue
            close_run()
            if layer.trainable:
                items.append(layer.label if whole else f"{layer.label} (part)")
        close_run()
        return ", ".join(items)


@dataclass
class FreezeSummary:
    strategy: str  # the strategy that was applied ("" when summarizing an arbitrary model)
    towers: list[TowerSummary]  # image, text, other
    trainable_names: list[str]  # names of trainable parameters, in model order


def _numel(param: nn.Parameter) -> int:
    return full_shape(param).numel()


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _max_groups(model: nn.Module, partition: LayerPartition, tower: Tower) -> Optional[int]:
    """Number of lock groups of a tower (N above it is a mistake); None when unknown."""
    depth = partition.depth(tower)
    if depth is None:
        return None
    if tower == "image":
        return depth + 2
    if isinstance(getattr(model, "text", None), HFTextEncoder):
        return depth + 1
    text = getattr(model, "text", model)
    return depth + 1 + (getattr(text, "text_projection", None) is not None)


def _check_groups(model: nn.Module, partition: LayerPartition, tower: Tower, n: int, key: str) -> None:
    limit = _max_groups(model, partition, tower)
    if limit is not None and n > limit:
        raise ValueError(f"{key}={n} but the {tower} tower has only {limit} groups; "
                         f"use <= {limit} (all groups unlocked is strategy full for that tower)")


def _lock_text(model: nn.Module, partition: LayerPartition, cfg: TextFreezeConfig) -> None:
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        depth = partition.depth("text")
        for name, param in model.named_parameters():
            if not name.startswith("text.transformer."):
                continue
            index = partition.layer_id(name).index
            if cfg.unlocked_layers == 0 or index <= depth - cfg.unlocked_layers:
                param.requires_grad = (not cfg.freeze_layer_norm) and "LayerNorm" in name.split(".")
        return
    if partition.depth("text") is None:
        text.lock(cfg.unlocked_layers, cfg.freeze_layer_norm)
        return
    lock_text_tower(model, cfg.unlocked_layers)
    if not cfg.freeze_layer_norm:
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm) and partition.tower(name) == "text":
                module.requires_grad_(True)


def summarize_freeze(model: nn.Module, strategy: str = "") -> FreezeSummary:
    """Trainable / total elements per tower and per layer of the bare open_clip ``model``."""
    partition = LayerPartition(model)
    towers: dict[Tower, TowerSummary] = {t: TowerSummary(t, 0, 0, []) for t in TOWERS}
    layer_states: dict[tuple[Tower, int], LayerState] = {}
    for tower in ("image", "text"):
        depth = partition.depth(tower)
        if depth is None:
            continue
        for index, names in enumerate(partition.layers(tower)):
            if names:
                state = LayerState(layer_label(partition.layer_id(names[0])), 0, 0)
                layer_states[(tower, index)] = state
                towers[tower].layers.append(state)
    trainable_names = []
    for name, param in model.named_parameters():
        tower = partition.tower(name)
        count = _numel(param)
        trainable = count if param.requires_grad else 0
        towers[tower].total += count
        towers[tower].trainable += trainable
        if towers[tower].layers:
            state = layer_states[(tower, partition.layer_id(name).index)]
            state.total += count
            state.trainable += trainable
        if param.requires_grad:
            trainable_names.append(name)
    return FreezeSummary(strategy, list(towers.values()), trainable_names)


def apply_freeze(model: nn.Module, cfg: FreezeConfig, adapted: tuple[str, ...] = ()) -> FreezeSummary:
    """Set ``requires_grad`` on every parameter of the bare open_clip ``model`` from ``cfg``; the
    towers in ``adapted`` train through their LoRA adapters alone (their base weights frozen).

    Idempotent: every flag is recomputed from scratch (all trainable first), so applying
    the same config twice, or a second config after a first, gives the flags of that
    config alone. Call it before building the DeepSpeed engine / optimizer. Note that
    ``freeze_bn_stats`` swaps BatchNorm modules for frozen ones (ResNet / timm towers).
    """
    cfg.validate()
    if cfg.image.freeze_bn_stats and is_partitioned(model):
        raise ConfigError("freeze.image.freeze_bn_stats with a model built partitioned (model.zero_init): the "
                          "frozen BatchNorm copies its statistics when the parameters are empty shards; set "
                          "model.zero_init: false")
    partition = LayerPartition(model)
    names = [base_name(n) for n, _ in model.named_parameters()]  # patterns name open_clip's parameters
    for key in ("include", "exclude"):
        for pattern in getattr(cfg, key):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"freeze.{key} pattern {pattern!r} matches no parameter of the model "
                                 f"(names look like {names[0]!r}, {names[-1]!r})")

    model.requires_grad_(True)
    if cfg.strategy in LOCKS_IMAGE:
        groups = 0 if cfg.strategy == "lit" else cfg.image.unlocked_groups
        _check_groups(model, partition, "image", groups, "freeze.image.unlocked_groups")
        model.lock_image_tower(unlocked_groups=groups, freeze_bn_stats=cfg.image.freeze_bn_stats)
    if cfg.strategy in LOCKS_TEXT:
        _check_groups(model, partition, "text", cfg.text.unlocked_layers, "freeze.text.unlocked_layers")
        _lock_text(model, partition, cfg.text)
    for name, param in model.named_parameters():
        if is_adapter_key(name):
            param.requires_grad = True
        elif partition.tower(name) in adapted or (len(adapted) == 2 and partition.tower(name) == "other"):
            param.requires_grad = False  # adapters on both towers: they alone train (include logit_scale to add it)
        if _matches(base_name(name), cfg.include):
            param.requires_grad = True
        if _matches(base_name(name), cfg.exclude):
            param.requires_grad = False
    return summarize_freeze(model, cfg.strategy)


def _count(n: int) -> str:
    return f"{n:,}"


def format_summary(summary: FreezeSummary) -> str:
    """A small table (one row per tower, then the total) for rank 0 to print at start."""
    rows = [("tower", "trainable", "frozen", "unlocked")]
    for t in summary.towers:
        rows.append((t.tower, _count(t.trainable), _count(t.frozen), t.unlocked()))
    trainable = sum(t.trainable for t in summary.towers)
    total = sum(t.total for t in summary.towers)
    share = f"{100.0 * trainable / total:.1f}% trainable" if total else ""
    rows.append(("total", _count(trainable), _count(total - trainable), share))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"freeze strategy: {summary.strategy or '-'}"]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
    return "\n".join(lines)


_LR_RANGES: dict[str, tuple[float, float]] = {
    "full": (1e-5, 1e-4),
    "partial": (5e-5, 5e-4),
    "frozen_image": (1e-4, 1e-3),
    "frozen_text": (1e-4, 1e-3),
    "lit": (1e-4, 1e-3),
    "lora": (1e-4, 1e-3),  # adapters (adapters.kind: lora), whatever the strategy
}
FULL_WARMUP_STEPS = (1000, 5000)  # warmup recommended with a full fine-tune


def recommended_lr_range(strategy: str) -> tuple[float, float]:
    """(low, high) peak lr that usually works for ``strategy`` (full: with 1000-5000 warmup steps), or for
    LoRA adapters (``"lora"``)."""
    if strategy not in _LR_RANGES:
        raise ValueError(f"freeze.strategy={strategy!r} is unknown; use one of {', '.join(get_args(Strategy))}")
    return _LR_RANGES[strategy]


def check_lr(strategy: str, lr: float) -> Optional[str]:
    """A warning when a full fine-tune uses lr > 1e-4 (it tends to wreck pretrained features), else None."""
    low, high = recommended_lr_range(strategy)
    if strategy == "full" and lr > high:
        return (f"lr={lr:g} is high for a full fine-tune (recommended {low:g}..{high:g} with "
                f"{FULL_WARMUP_STEPS[0]}-{FULL_WARMUP_STEPS[1]} warmup steps); it tends to destroy the "
                "pretrained features: lower lr or freeze a tower (frozen_image, partial, lit)")
    return None
