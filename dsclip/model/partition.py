"""Ordered layer partition of an open_clip model: the one map of layers that freezing, layer-wise
lr decay (training/optim.py) and ZeRO-3 fetch units (training/zero3.py) share.

Every parameter of a CLIP model belongs to one tower (``image``, ``text`` or ``other``).
Inside a tower whose layer structure is known, parameters are numbered from the input
side (EVA-CLIP convention)::

    0            embeddings  (visual.conv1 / class_embedding / positional_embedding / ln_pre;
                              token_embedding / positional_embedding / cls_emb;
                              HF: transformer.embeddings)
    1 .. depth   transformer block i-1
    depth + 1    head        (visual.ln_post / proj / attn_pool; ln_final / text_projection;
                              HF: transformer pooler + proj)

Known layouts: open_clip ``VisionTransformer``, the built-in ``TextTransformer`` (CLIP and
CustomTextCLIP) and ``HFTextEncoder``. timm and ModifiedResNet image towers are towers
without a layer structure (``depth is None``): they can be frozen whole, not decayed.
"""
from dataclasses import dataclass
from typing import Literal, Optional, get_args

from open_clip.hf_configs import arch_dict
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

Tower = Literal["image", "text", "other"]
TOWERS: tuple[Tower, ...] = get_args(Tower)


@dataclass(frozen=True)
class LayerId:
    """Position of one parameter in the partition."""

    tower: Tower
    index: int  # 0 = embeddings, 1..depth = blocks, depth + 1 = head; 0 for "other"
    depth: int  # number of transformer blocks in the tower; 0 for "other"


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower's parameters live, as parameter-name prefixes of the bare model."""

    roots: tuple[str, ...]  # a parameter is in the tower when it is under one of these
    embed: tuple[str, ...] = ()  # prefixes of layer 0
    blocks: str = ""  # prefix of the block list; block i is f"{blocks}.{i}."
    depth: Optional[int] = None  # None: layer structure unknown (timm / ResNet image towers)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _image_layout(model: nn.Module) -> TowerLayout:
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        embed = tuple(f"visual.{n}" for n in ("conv1", "class_embedding", "positional_embedding", "ln_pre"))
        return TowerLayout(("visual",), embed, "visual.transformer.resblocks", len(visual.transformer.resblocks))
    return TowerLayout(("visual",))


def _text_layout(model: nn.Module) -> TowerLayout:
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        arch = arch_dict.get(text.config.model_type, {}).get("config_names", {})
        embed_attr = arch.get("token_embeddings_attr", "embeddings")
        layer_attr = arch.get("layer_attr", "layer")
        has_encoder = hasattr(text.transformer, "encoder")
        stack = "text.transformer.encoder" if has_encoder else "text.transformer"
        depth = len(getattr(text.transformer.encoder if has_encoder else text.transformer, layer_attr))
        return TowerLayout(("text",), (f"text.transformer.{embed_attr}",), f"{stack}.{layer_attr}", depth)
    if isinstance(text, TextTransformer):
        prefix, roots = "text.", ("text",)
        depth = len(text.transformer.resblocks)
    elif text is None and hasattr(model, "token_embedding"):
        # open_clip CLIP unpacks the text tower into top-level attributes
        prefix = ""
        roots = tuple(n for n in ("token_embedding", "positional_embedding", "transformer", "ln_final",
                                  "text_projection") if getattr(model, n, None) is not None)
        depth = len(model.transformer.resblocks)
    elif text is not None:
        return TowerLayout(("text",))
    else:
        return TowerLayout(())
    embed = tuple(prefix + n for n in ("token_embedding", "positional_embedding", "cls_emb"))
    return TowerLayout(roots, embed, prefix + "transformer.resblocks", depth)


class LayerPartition:
    """The ordered partition of one open_clip model's parameters (pass the bare open_clip model)."""

    def __init__(self, model: nn.Module) -> None:
        self.layouts: dict[Tower, TowerLayout] = {"image": _image_layout(model), "text": _text_layout(model)}
        self.names: list[str] = [n for n, _ in model.named_parameters()]

    def tower(self, name: str) -> Tower:
        for tower, layout in self.layouts.items():
            if any(_under(name, root) for root in layout.roots):
                return tower
        return "other"

    def depth(self, tower: Tower) -> Optional[int]:
        """Blocks in ``tower``; None when its layer structure is unknown; 0 for "other"."""
        return 0 if tower == "other" else self.layouts[tower].depth

    def layer_id(self, name: str) -> LayerId:
        """Tower, layer index and depth of parameter ``name``; ValueError for unknown layouts."""
        tower = self.tower(name)
        if tower == "other":
            return LayerId("other", 0, 0)
        layout = self.layouts[tower]
        if layout.depth is None:
            raise ValueError(f"parameter {name}: the {tower} tower has no known layer structure "
                             "(only open_clip ViT, built-in text and HF text towers have one)")
        if _under(name, layout.blocks):
            block = int(name[len(layout.blocks) + 1:].split(".", 1)[0])
            return LayerId(tower, block + 1, layout.depth)
        if any(_under(name, p) for p in layout.embed):
            return LayerId(tower, 0, layout.depth)
        return LayerId(tower, layout.depth + 1, layout.depth)

    def layers(self, tower: Tower) -> list[list[str]]:
        """Parameter names of ``tower`` by layer index, embeddings first (empty layers kept)."""
        depth = self.depth(tower)
        if depth is None:
            raise ValueError(f"the {tower} tower has no known layer structure")
        out: list[list[str]] = [[] for _ in range(depth + 2 if tower != "other" else 1)]
        for name in self.names:
            if self.tower(name) == tower:
                out[self.layer_id(name).index].append(name)
        return out


def layer_label(layer: LayerId) -> str:
    """Human name of a layer: embed, block i (0-based, as in the module names), head."""
    if layer.tower == "other":
        return "other"
    if layer.index == 0:
        return "embed"
    if layer.index == layer.depth + 1:
        return "head"
    return f"block {layer.index - 1}"
