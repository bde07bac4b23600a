"""Weight-space mixing of two checkpoints of one architecture: their common layout, loading both
ends in the model's own layout, and writing (1 - alpha) * start + alpha * end into a model in place.

Integer and bool tensors (BatchNorm step counters, index buffers) are not interpolated: they are
copied from the nearer end (alpha < 0.5: start, else end), so that alpha = 0 and alpha = 1
reproduce the two inputs exactly. Later weight averages (EMA, soups) reuse these pieces.
"""
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dsclip.errors import WiseFtError
from dsclip.model.pos_embed import fit_pos_embeds
from dsclip.model.pretrained import fit_state_dict, read_source, with_adapters

log = logging.getLogger(__name__)

MAX_LISTED = 5  # differences named in an error message before "... and N more"


def layout(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{key: (shape, is floating point)}: what two mixable checkpoints must share."""
    return {key: (tuple(t.shape), t.is_floating_point()) for key, t in state_dict.items()}


def layout_differences(a: dict[str, tuple[tuple[int, ...], bool]],
                       b: dict[str, tuple[tuple[int, ...], bool]], names: tuple[str, str]) -> list[str]:
    """Human-readable differences between two layouts; empty when they can be mixed. A one-element
    tensor matches any one-element shape (open_clip's logit scale is 0-dim or (1,))."""
    def listed(keys: list[str]) -> str:
        more = f", ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
        return ", ".join(keys[:MAX_LISTED]) + more

    problems = []
    for name, own, other in ((names[0], a, b), (names[1], b, a)):
        only = sorted(set(own) - set(other))
        if only:
            problems.append(f"{len(only)} tensors only in {name} ({listed(only)})")
    shapes = [f"{key}: {a[key][0]} vs {b[key][0]}" for key in sorted(set(a) & set(b))
              if a[key][0] != b[key][0] and not (math.prod(a[key][0]) == math.prod(b[key][0]) == 1)]
    if shapes:
        problems.append(f"{len(shapes)} shape differences ({listed(shapes)})")
    kinds = [key for key in sorted(set(a) & set(b)) if a[key][1] != b[key][1]]
    if kinds:
        problems.append(f"{len(kinds)} tensors floating-point in one and integer in the other ({listed(kinds)})")
    return problems


def load_endpoint(clip: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                  adapters: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """`state_dict` in the model's own layout (conversions and position-embedding fit as for
    --pretrained), LoRA `adapters` merged in, as a copy the sweep keeps; every model tensor must
    come from the source."""
    incompatible = clip.load_state_dict(with_adapters(fit_state_dict(clip, state_dict, source), adapters), strict=False)
    if incompatible.missing_keys:
        raise WiseFtError(f"{source} lacks {len(incompatible.missing_keys)} tensors of this architecture "
                          f"({', '.join(incompatible.missing_keys[:MAX_LISTED])}): the mix would keep random values "
                          "for them; pass complete checkpoints of model.name")
    if incompatible.unexpected_keys:
        log.warning("WiSE-FT: %d tensors of %s are not used by the model: %s", len(incompatible.unexpected_keys),
                    source, ", ".join(incompatible.unexpected_keys[:MAX_LISTED]))
    return {key: tensor.detach().clone() for key, tensor in clip.state_dict().items()}


def load_endpoints(clip: nn.Module, model_name: str, zeroshot: str, finetuned: str, trust: bool = False,
                   adapters: tuple[Optional[Path], Optional[Path]] = (None, None)
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both endpoints in the model's layout, after checking that they are one architecture;
    `adapters`: LoRA adapter folders merged into the zero-shot and the fine-tuned end.

    Position embeddings are fitted to the model before comparing, so a fine-tune at a new image
    size or context length still mixes with its zero-shot model. One raw source is held at a time.
    """
    raw = read_source(model_name, zeroshot, trust)
    zeroshot_layout = layout(fit_pos_embeds(raw, clip))
    start = load_endpoint(clip, raw, zeroshot, adapters[0])
    raw = read_source(model_name, finetuned, trust)
    problems = layout_differences(zeroshot_layout, layout(fit_pos_embeds(raw, clip)), ("zero-shot", "fine-tuned"))
    if problems:
        raise WiseFtError(f"zero-shot {zeroshot} and fine-tuned {finetuned} are different architectures: "
                          + "; ".join(problems) + ". WiSE-FT mixes two checkpoints of one architecture")
    end = load_endpoint(clip, raw, finetuned, adapters[1])
    different_ints = [k for k in start if not start[k].is_floating_point() and not torch.equal(start[k], end[k])]
    if different_ints:
        log.warning("WiSE-FT: integer tensors differ between the endpoints and are copied from the nearer one: %s",
                    ", ".join(different_ints[:MAX_LISTED]))
    return start, end


@torch.no_grad()
def mix_into(module: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> None:
    """Write (1 - alpha) * start + alpha * end into `module`'s own tensors, in place."""
    for key, target in module.state_dict().items():  # detached views sharing the parameters' storage
        if not target.is_floating_point():
            target.copy_(start[key] if alpha < 0.5 else end[key])
        elif alpha == 0.0:
            target.copy_(start[key])
        elif alpha == 1.0:
            target.copy_(end[key])
        else:  # one tensor's worth of temporaries at most, on the model's device
            torch.lerp(start[key].to(target), end[key].to(target), alpha, out=target)
