"""Position-embedding interpolation for a changed image resolution or text context length.

All resize functions are pure: they take a state dict and return a new dict (the input
and its tensors are not modified). Numerics match open_clip's resize-on-load
(``open_clip.model.resize_pos_embed`` / ``resize_text_pos_embed``) exactly for fp32, but
the number of prefix tokens (class token, registers) is derived from the shapes rather
than assumed to be 1, and the old grid may be non-square.
"""
import logging
import math
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from dsclip.model.zero_init import full_shape

logger = logging.getLogger(__name__)

VISION_KEY = "visual.positional_embedding"
Size2 = Union[int, tuple[int, int], list[int]]


def _pair(value: Size2, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name}={value!r} must be a positive int or a pair of positive ints")
    return pair


def vision_grid(image_size: Size2, patch_size: Size2) -> tuple[int, int]:
    """(rows, cols) of patches for an image size; like open_clip, a remainder is cut off (warned)."""
    height, width = _pair(image_size, "image_size")
    patch_h, patch_w = _pair(patch_size, "patch_size")
    if height % patch_h or width % patch_w:
        logger.warning("image size %sx%s is not a multiple of patch size %sx%s: the last %s rows / %s columns "
                       "of pixels are never seen", height, width, patch_h, patch_w, height % patch_h, width % patch_w)
    return height // patch_h, width // patch_w


def grid_for(model_or_cfg: Union[nn.Module, Mapping[str, Any]], image_size: Optional[Size2] = None
             ) -> tuple[int, int]:
    """Patch grid of a ViT image tower at ``image_size`` (default: the model's own size).

    ``model_or_cfg`` is an open_clip model (CLIP / CustomTextCLIP), its ``visual`` tower, a
    model config dict (with ``vision_cfg``) or a ``vision_cfg`` dict.
    """
    if isinstance(model_or_cfg, nn.Module):
        visual = getattr(model_or_cfg, "visual", model_or_cfg)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"image tower {type(visual).__name__} has no patch grid; only open_clip ViT towers do")
        return vision_grid(visual.image_size if image_size is None else image_size, visual.patch_size)
    vision_cfg = model_or_cfg.get("vision_cfg", model_or_cfg)
    if "patch_size" not in vision_cfg:
        raise ValueError("vision_cfg has no patch_size: only open_clip ViT towers have a patch grid "
                         "(timm towers resize with open_clip's force_image_size)")
    size = vision_cfg.get("image_size", 224) if image_size is None else image_size
    return vision_grid(size, vision_cfg["patch_size"])


def resize_vision_pos_embed(
    state_dict: Mapping[str, torch.Tensor],
    new_grid: Size2,
    old_grid: Optional[Size2] = None,
    key: str = VISION_KEY,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose ViT position embedding ``key`` fits ``new_grid``.

    The embedding is (prefix + rows * cols, width): prefix tokens (class token, ...) are
    kept as they are, the grid part is interpolated over (rows, cols) with ``interpolation``
    (open_clip: bicubic, antialias, align_corners=False) in fp32 and cast back.
    ``old_grid`` defaults to the largest square grid that fits, the rest being prefix
    tokens; pass it for a non-square old grid (see ``grid_for``).
    """
    if key not in state_dict:
        raise ValueError(f"state dict has no {key!r}; it is not an open_clip ViT checkpoint (or pass key=...)")
    new_rows, new_cols = _pair(new_grid, "new_grid")
    pos = state_dict[key]
    num_pos = pos.shape[0]
    if old_grid is None:
        side = math.isqrt(num_pos)
        old_rows, old_cols = side, side
    else:
        old_rows, old_cols = _pair(old_grid, "old_grid")
    prefix = num_pos - old_rows * old_cols
    if prefix < 0:
        raise ValueError(f"{key} has {num_pos} positions, fewer than the old grid {old_rows}x{old_cols}; "
                         "pass the checkpoint's own grid as old_grid")
    out = dict(state_dict)
    if (old_rows, old_cols) == (new_rows, new_cols):
        return out
    logger.info("resizing %s: grid %dx%d -> %dx%d (%d prefix tokens, %s)",
                key, old_rows, old_cols, new_rows, new_cols, prefix, interpolation)
    tokens, grid = pos[:prefix], pos[prefix:]
    grid = grid.float().reshape(1, old_rows, old_cols, -1).permute(0, 3, 1, 2)  # (1, width, rows, cols)
    grid = F.interpolate(grid, size=(new_rows, new_cols), mode=interpolation, antialias=antialias,
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_rows * new_cols, -1).to(pos.dtype)
    out[key] = torch.cat([tokens, grid], dim=0)
    return out


def text_pos_key(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Key of the built-in text tower's position embedding: CLIP unpacks it, CustomTextCLIP nests it."""
    for key in ("positional_embedding", "text.positional_embedding"):
        if key in state_dict:
            return key
    raise ValueError("state dict has no positional_embedding or text.positional_embedding "
                     "(HF text towers keep their own position table)")


def resize_text_pos_embed(
    state_dict: Mapping[str, torch.Tensor],
    new_num_pos: int,
    key: Optional[str] = None,
    interpolation: str = "linear",
    antialias: bool = False,
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose text position embedding has ``new_num_pos`` rows.

    ``new_num_pos`` is the context length (+1 when the text tower has a class token). As in
    open_clip, all rows are interpolated linearly (align_corners=False) in fp32 and cast back.
    """
    if new_num_pos < 1:
        raise ValueError(f"new_num_pos={new_num_pos} must be >= 1")
    key = text_pos_key(state_dict) if key is None else key
    pos = state_dict[key]
    out = dict(state_dict)
    if pos.shape[0] == new_num_pos:
        return out
    logger.info("resizing %s: %d -> %d positions (%s)", key, pos.shape[0], new_num_pos, interpolation)
    resized = F.interpolate(pos.float().T.unsqueeze(0), size=new_num_pos, mode=interpolation,
                            antialias=antialias, align_corners=False)  # (1, width, positions)
    out[key] = resized[0].T.to(pos.dtype).contiguous()
    return out


def fit_pos_embeds(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                   old_grid: Optional[Size2] = None) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with its position embeddings resized to the bare open_clip ``model``.

    The image grid comes from ``model.visual`` (ViT towers only; other towers are left
    alone) and the text length from the model's own text position embedding. ``old_grid``
    is the checkpoint's grid, needed when it is not square.
    """
    out = dict(state_dict)
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer) and VISION_KEY in out:
        out = resize_vision_pos_embed(out, visual.grid_size, old_grid)
    text = getattr(model, "text", model)
    model_pos = getattr(text, "positional_embedding", None)
    if model_pos is not None:
        out = resize_text_pos_embed(out, full_shape(model_pos)[0])
    return out
