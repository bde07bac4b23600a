"""LoRA adapters in both towers of an open_clip model, trained beside frozen base weights, under
ZeRO-3 too; merged into the weights for export, or written alone in peft's adapter format.

peft adapts the Linear layers (the MLP's c_fc and c_proj, the attention's out_proj): its
lora.Linear adds B(A(x)) to the base layer's output and never writes the base weight, so it works
on weights ZeRO-3 partitions. The attention in-projection is no Linear: nn.MultiheadAttention keeps
it as a bare parameter inside F.multi_head_attention_forward, and peft's MultiheadAttention layer
adapts it by merging the adapter into that weight before every forward and unmerging it after: an
in-place write to a parameter that ZeRO-3 gathers only for the forward and that has no gradient of
its own. `LoraSelfAttention` adds the in-projection's low-rank term beside the base projection
instead, and hands the projected heads to scaled_dot_product_attention.

Names: peft puts a wrapped Linear's weight under `.base_layer` (`mlp.c_fc.base_layer.weight`) and its
adapter beside it (`mlp.c_fc.lora_A.default.weight`); an adapted attention keeps `in_proj_weight`
and holds its in-projection adapter as `attn.lora_A.default.weight`. `base_name` gives back open_clip's
name. The top-level buffer `lora_scaling` (alpha / rank) travels with every state dict of an adapted
model, so that a consolidated checkpoint can be merged without its recipe.
"""
import fnmatch
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsclip.errors import ConfigError, PretrainedError
from dsclip.fileio import atomic_write, atomic_write_text
from dsclip.model.config import AdapterConfig
from dsclip.model.partition import LayerPartition

ADAPTER = "default"  # peft's name for a model's one adapter
SCALING_KEY = "lora_scaling"
BASE = ".base_layer"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's prefix of every key in an adapter file
# peft LoRA settings that change what a lora_A / lora_B pair means (per-module ranks, other scalings)
PLAIN_LORA_ONLY = ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")


class LoraSelfAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with a LoRA term on its in-projection (its out_proj is a peft
    lora.Linear, called here as a module). Made from an existing attention by `adapting`, which
    keeps its parameters and their names."""

    @classmethod
    def adapting(cls, attention: nn.MultiheadAttention, rank: int, alpha: float, dropout: float
                 ) -> "LoraSelfAttention":
        if not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
            raise ValueError("an attention with separate key / value widths has no in_proj_weight to adapt")
        # The same object with this class (as torch.ao's module swaps do): parameters, hooks and the
        # place in the model stay as they are, and nothing is copied.
        attention.__class__ = cls
        width = attention.embed_dim
        attention.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(width, rank, bias=False)})
        attention.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank, 3 * width, bias=False)})
        attention.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout else nn.Identity()})
        attention.lora_scale = alpha / rank
        # LoRA's initialisation (as peft's): A uniform, B zero, so the adapted model starts as the base model
        nn.init.kaiming_uniform_(attention.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(attention.lora_B[ADAPTER].weight)
        return attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None or need_weights:
            raise NotImplementedError("LoRA attention returns no attention weights and takes no key_padding_mask "
                                      "(open_clip's blocks pass neither)")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self.in_projection(query, key, value)
        batch, length, width = q.shape
        heads = self.num_heads
        q, k, v = (t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention: True = masked; SDPA: True = attends
                attn_mask = ~attn_mask
            if attn_mask.dim() == 3:  # (batch * heads, L, S)
                attn_mask = attn_mask.view(batch, heads, length, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def in_projection(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
        """(W + scale B A) x + b for query, key and value, the adapter's term computed beside W."""
        lora_a, lora_b = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        drop = self.lora_dropout[ADAPTER]
        if query is key and key is value:  # self-attention: one projection
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            qkv = qkv + lora_b(lora_a(drop(query))) * self.lora_scale
            return qkv.chunk(3, dim=-1)
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        rows = lora_b.weight.chunk(3)
        return tuple(F.linear(x, w, b) + F.linear(lora_a(drop(x)), r) * self.lora_scale
                     for x, w, b, r in zip((query, key, value), weights, biases, rows))


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to an adapter (not to the base model)."""
    return any(part.startswith("lora_") for part in name.split("."))


def base_name(name: str) -> str:
    """open_clip's name of a base parameter of an adapted model."""
    return name.replace(BASE + ".", ".")


def adapted_towers(cfg: AdapterConfig) -> tuple[str, ...]:
    """The towers whose base weights train only through adapters."""
    if cfg.kind == "none":
        return ()
    return ("image", "text") if cfg.towers == "both" else (cfg.towers,)


def adaptable_modules(clip: nn.Module, cfg: AdapterConfig) -> tuple[list[str], list[str]]:
    """(attention names, Linear names) that `cfg.targets` and `cfg.towers` select; a target glob
    that selects nothing, or a module LoRA cannot adapt, is an error."""
    partition = LayerPartition(clip)
    towers = adapted_towers(cfg)
    attentions, linears, matched, reached = [], [], set(), set()
    for name, module in clip.named_modules():
        patterns = [p for p in cfg.targets if fnmatch.fnmatchcase(name, p)]
        first_param = next((n for n, _ in module.named_parameters(prefix=name)), None)
        if not patterns or first_param is None or partition.tower(first_param) not in towers:
            continue
        matched.update(patterns)
        reached.add(partition.tower(first_param))
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise ConfigError(f"adapters.targets selects {name}, an attention with separate key / value widths, "
                                  "which LoRA does not adapt: narrow adapters.targets")
            attentions.append(name)
        elif isinstance(module, nn.Linear):
            if any(name == f"{a}.out_proj" for a in attentions):
                raise ConfigError(f"adapters.targets selects {name}: an attention's out_proj is adapted with the "
                                  "attention itself (as in peft); target the attention module instead")
            linears.append(name)
        else:
            raise ConfigError(f"adapters.targets selects {name}, a {type(module).__name__}: LoRA adapts attention "
                              "(nn.MultiheadAttention) and nn.Linear modules; narrow adapters.targets")
    unmatched = [p for p in cfg.targets if p not in matched]
    if unmatched:
        raise ConfigError(f"adapters.targets pattern {unmatched[0]!r} selects no attention or Linear module of the "
                          f"{' and '.join(towers)} tower{'s' if len(towers) > 1 else ''}")
    bare = [tower for tower in towers if tower not in reached]
    if bare:  # it would be frozen with nothing in it to train
        raise ConfigError(f"adapters.targets selects no module of the {bare[0]} tower ({type(clip).__name__}'s "
                          f"{bare[0]} tower has none of that name): set adapters.towers to the other tower, or "
                          "targets that name its attention / Linear modules")
    return attentions, linears


def add_adapters(clip: nn.Module, cfg: AdapterConfig) -> tuple[int, int]:
    """Put LoRA adapters into the bare open_clip `clip` in place; returns how many attention and
    Linear modules got one (an attention's out_proj counted with it). Call on every rank with the
    same RNG state (the A matrices are random)."""
    from peft import LoraConfig, inject_adapter_in_model

    attentions, linears = adaptable_modules(clip, cfg)
    peft_targets = linears + [f"{name}.out_proj" for name in attentions]
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                       target_modules=peft_targets), clip, adapter_name=ADAPTER)
    modules = dict(clip.named_modules())
    for name in attentions:
        LoraSelfAttention.adapting(modules[name], cfg.rank, cfg.alpha, cfg.dropout)
    clip.register_buffer(SCALING_KEY, torch.tensor([cfg.alpha / cfg.rank]))
    return len(attentions), len(linears)


LORA_A, LORA_B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def merged_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its adapters merged into their base weights (W + scale B A, in fp32) under
    open_clip's names; without adapters it comes back as it is. The base part may be named as in
    the adapted model or as in open_clip (an adapter file laid over a pretrained file)."""
    if SCALING_KEY not in state:
        return state
    scale = float(state[SCALING_KEY])
    merged = {base_name(k): v for k, v in state.items() if not is_adapter_key(k)}
    for key in state:
        if not key.endswith(LORA_A):
            continue
        module = base_name(key[:-len(LORA_A)])
        delta = state[key[:-len(LORA_A)] + LORA_B].float() @ state[key].float() * scale
        target = f"{module}.in_proj_weight" if f"{module}.in_proj_weight" in merged else f"{module}.weight"
        if target not in merged or merged[target].shape != delta.shape:
            raise PretrainedError(f"the adapter of {module} does not fit the base weights ({target} "
                                  f"{tuple(merged[target].shape) if target in merged else 'missing'}, adapter "
                                  f"{tuple(delta.shape)}): the adapters belong to another architecture")
        merged[target] = (merged[target].float() + delta).to(merged[target].dtype)
    return merged


def to_peft_key(name: str, attentions: set[str]) -> str:
    """The key of an adapter tensor in peft's adapter file: no adapter name, and an attention's
    out_proj under base_layer (peft's attention layer wraps the whole attention)."""
    name = name.replace(f".{ADAPTER}.", ".")
    module, _, rest = name.partition(".out_proj.lora_")
    if rest and module in attentions:
        name = f"{module}{BASE}.out_proj.lora_{rest}"
    return PEFT_PREFIX + name


def from_peft_key(key: str) -> str:
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    name = name.replace(f"{BASE}.out_proj.lora_", ".out_proj.lora_")
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.weight", f".{part}.{ADAPTER}.weight")
    return name


def write_adapters(state: dict[str, torch.Tensor], model_name: str, folder: Path, dropout: float = 0.0) -> Path:
    """The adapters of an adapted model's state dict alone, as peft writes them: `folder` gets
    adapter_model.safetensors and adapter_config.json (rank and alpha read off the tensors and the
    scaling). Returns the weights file."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = sorted(k[:-len(LORA_A)] for k in state if k.endswith(LORA_A))
    attentions = {m for m in modules if f"{m}.in_proj_weight" in state}  # adapted attentions (not out_proj alone)
    tensors = {to_peft_key(k, attentions): v.contiguous() for k, v in state.items()
               if is_adapter_key(k) and k != SCALING_KEY}
    targets = [m for m in modules if m.rpartition(".out_proj")[0] not in attentions]
    rank = state[modules[0] + LORA_A].shape[0]
    config = LoraConfig(r=rank, lora_alpha=float(state[SCALING_KEY]) * rank, lora_dropout=dropout,
                        target_modules=targets, base_model_name_or_path=model_name).to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / ADAPTER_WEIGHTS
    atomic_write(weights, lambda path: save_file(tensors, path))
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, default=_jsonable))
    return weights


def _jsonable(value: object) -> object:
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def read_adapters(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter folder (write_adapters, or peft's own for the same targets) as state-dict entries
    of the adapted model, its scaling (lora_alpha / r) included."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config_file = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    if not weights.is_file() or not config_file.is_file():
        raise PretrainedError(f"{folder} is not an adapter folder: it needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} "
                              "(dsclip export writes them to <export>/adapters)")
    try:
        config = json.loads(config_file.read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(weights))
    except (ValueError, KeyError, TypeError, ZeroDivisionError, SafetensorError) as e:
        raise PretrainedError(f"cannot read the adapters in {folder}: {type(e).__name__}: {e}") from None
    variants = [key for key in PLAIN_LORA_ONLY if config.get(key)]
    if variants or config.get("peft_type", "LORA") != "LORA":
        raise PretrainedError(f"{folder} holds {config.get('peft_type')} adapters with "
                              f"{', '.join(variants) or 'them'}: dsclip reads plain LoRA (one rank and alpha for "
                              "every module)")
    state = {from_peft_key(k): v for k, v in tensors.items()}
    halves = {k.replace(LORA_B, LORA_A) for k in state if k.endswith(LORA_B)}
    unpaired = halves ^ {k for k in state if k.endswith(LORA_A)}
    if unpaired:
        raise PretrainedError(f"{folder}: {sorted(unpaired)[0]} has no partner (every lora_A needs its lora_B): the "
                              "adapter file is incomplete")
    state[SCALING_KEY] = torch.tensor([scale], dtype=torch.float32)
    return state


def load_adapters(clip: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors (read_adapters) into the adapted `clip`; they must be exactly its adapters,
    at its scaling."""
    own = {k: v for k, v in clip.state_dict(keep_vars=True).items() if is_adapter_key(k) and k != SCALING_KEY}
    given = {k: v for k, v in state.items() if k != SCALING_KEY}
    problems = [f"{len(set(given) - set(own))} tensors this model has no adapter for"] if set(given) - set(own) else []
    problems += [f"{len(set(own) - set(given))} of its adapters missing"] if set(own) - set(given) else []
    problems += [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} here" for k, v in given.items()
                 if k in own and v.shape != own[k].shape][:1]
    scale = float(getattr(clip, SCALING_KEY))
    if abs(float(state[SCALING_KEY]) - scale) > 1e-6 * scale:
        problems.append(f"alpha / rank {float(state[SCALING_KEY]):g} in the file, {scale:g} in this run")
    if problems:
        raise PretrainedError(f"adapters {source} do not fit this model's ({'; '.join(problems)}): set adapters.rank, "
                              "alpha, targets and towers as in the run that wrote them")
    with torch.no_grad():
        for key, tensor in given.items():
            own[key].copy_(tensor)
