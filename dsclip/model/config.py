"""Recipe sections of the model: which architecture and weights (`model:`) and what trains
(`freeze:`). Plain dataclasses; checking `model.name` asks open_clip (architectures.py)."""
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from dsclip.model.architectures import architecture_config, check_known

Strategy = Literal["full", "frozen_image", "frozen_text", "partial", "lit"]
LOCKS_IMAGE: tuple[str, ...] = ("frozen_image", "partial", "lit")  # strategies that lock the image tower
LOCKS_TEXT: tuple[str, ...] = ("frozen_text", "partial")  # strategies that lock the text tower
AdapterKind = Literal["none", "lora"]
AdapterTowers = Literal["both", "image", "text"]
# every transformer block's attention (its in-projection and out_proj) and MLP linears
DEFAULT_LORA_TARGETS = ("*.resblocks.*.attn", "*.resblocks.*.mlp.c_fc", "*.resblocks.*.mlp.c_proj")


@dataclass
class ModelConfig:
    name: str = "dsclip-tiny"  # any open_clip architecture (ViT-B-32, ...) or a config shipped with dsclip
    pretrained: Optional[str] = None  # initial weights: open_clip tag, weights file, HF-style folder, hf-hub:org/name, dsclip run folder
    trust_checkpoint: bool = False  # allow pickled weight files that can run code when loaded (only for files you trust)
    image_size: Optional[int] = None  # override the architecture's image size
    context_length: Optional[int] = None  # override the text context length
    init_logit_scale: Optional[float] = None  # initial log logit scale (default log(1/0.07); SigLIP: log(10))
    init_logit_bias: Optional[float] = None  # add a learned logit bias with this initial value (SigLIP: -10)
    grad_checkpointing: bool = False  # recompute each transformer block in backward (open_clip's checkpointing)
    activation_offload: bool = False  # checkpoint blocks with fairscale, keeping saved inputs in host memory
    patch_dropout: float = 0.0  # share of image patches dropped in training forwards (FLIP); evaluation sees all
    zero_init: Optional[bool] = None  # build already partitioned under ZeRO-3 (deepspeed.zero.Init); null: on from 5e8 parameters

    def has_logit_bias(self) -> bool:
        return self.init_logit_bias is not None or "init_logit_bias" in architecture_config(self.name)

    def validate(self) -> None:
        check_known(self.name)
        if self.grad_checkpointing and self.activation_offload:
            raise ValueError("model.grad_checkpointing and model.activation_offload are alternatives: "
                             "activation_offload already checkpoints every block; enable only one")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout={self.patch_dropout} must be in [0, 1): the share of patches dropped")
        if self.zero_init and self.has_hf_text_tower():
            raise ValueError(f"model.zero_init=true with {self.name}: its Hugging Face text tower loads its own "
                             "weights inside transformers, after zero.Init would have partitioned it; set "
                             "model.zero_init to false or null")

    def has_hf_text_tower(self) -> bool:
        return bool(architecture_config(self.name).get("text_cfg", {}).get("hf_model_name"))


@dataclass
class ImageFreezeConfig:
    """How the image tower is locked (used by frozen_image, partial and lit)."""

    unlocked_groups: int = 0  # layer groups left trainable, counted from the output end (0: all locked)
    freeze_bn_stats: bool = False  # also freeze BatchNorm running statistics (ResNet / timm towers)


@dataclass
class TextFreezeConfig:
    """How the text tower is locked (used by frozen_text and partial)."""

    unlocked_layers: int = 0  # layer groups left trainable, counted from the output end (0: all locked)
    freeze_layer_norm: bool = True  # False keeps every LayerNorm of the text tower trainable


@dataclass
class FreezeConfig:
    """Which parameters train.

    Order of application: every parameter trainable -> the strategy locks towers ->
    ``include`` globs make matches trainable -> ``exclude`` globs freeze matches. So
    ``exclude`` wins over ``include`` and both win over the strategy. Globs are
    ``fnmatch`` patterns on parameter names of the bare open_clip model (``*`` also
    crosses dots), e.g. ``visual.ln_post.*`` or ``logit_scale``; a glob that matches no
    parameter is an error.
    """

    strategy: Strategy = "full"  # full | frozen_image | frozen_text | partial (both towers) | lit (image locked)
    image: ImageFreezeConfig = field(default_factory=ImageFreezeConfig)  # image tower locking
    text: TextFreezeConfig = field(default_factory=TextFreezeConfig)  # text tower locking
    include: list[str] = field(default_factory=list)  # globs forced trainable
    exclude: list[str] = field(default_factory=list)  # globs forced frozen (wins over include)

    def validate(self) -> None:
        strategies = get_args(Strategy)
        if self.strategy not in strategies:
            raise ValueError(f"freeze.strategy={self.strategy!r} is unknown; use one of {', '.join(strategies)}")
        if self.image.unlocked_groups < 0:
            raise ValueError(f"freeze.image.unlocked_groups={self.image.unlocked_groups} must be >= 0")
        if self.text.unlocked_layers < 0:
            raise ValueError(f"freeze.text.unlocked_layers={self.text.unlocked_layers} must be >= 0")
        if self.strategy == "partial" and (self.image.unlocked_groups < 1 or self.text.unlocked_layers < 1):
            raise ValueError(
                f"freeze.strategy=partial needs freeze.image.unlocked_groups >= 1 and freeze.text.unlocked_layers"
                f" >= 1 (got {self.image.unlocked_groups}, {self.text.unlocked_layers}); "
                "use frozen_image / frozen_text to lock one tower completely")
        if self.image != ImageFreezeConfig() and self.strategy not in LOCKS_IMAGE:
            raise ValueError(f"freeze.image options have no effect with freeze.strategy={self.strategy}; "
                             "remove them or use frozen_image, partial or lit")
        if self.strategy == "lit" and self.image.unlocked_groups != 0:
            raise ValueError(f"freeze.image.unlocked_groups={self.image.unlocked_groups} with freeze.strategy=lit: "
                             "LiT locks the whole image tower; use strategy frozen_image to unlock groups")
        if self.text != TextFreezeConfig() and self.strategy not in LOCKS_TEXT:
            raise ValueError(f"freeze.text options have no effect with freeze.strategy={self.strategy}; "
                             "remove them or use frozen_text or partial")
        for key in ("include", "exclude"):
            if any(not pattern for pattern in getattr(self, key)):
                raise ValueError(f"freeze.{key} holds an empty pattern; remove it")


@dataclass
class AdapterConfig:
    """Low-rank adapters (LoRA) trained beside frozen base weights: the towers they adapt train only
    through them; the other tower follows freeze.strategy."""

    kind: AdapterKind = "none"  # none | lora
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # an adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on an adapter's input, in training
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # module-name globs (* crosses dots): nn.MultiheadAttention (in-projection and out_proj) or nn.Linear
    towers: AdapterTowers = "both"  # both | image | text
    weights: Optional[str] = None  # adapter folder (an export's adapters/) to start from; with kind none, merged into the weights

    def validate(self) -> None:
        kinds, towers = get_args(AdapterKind), get_args(AdapterTowers)
        if self.kind not in kinds:
            raise ValueError(f"adapters.kind={self.kind!r} is unknown; use one of {', '.join(kinds)}")
        if self.towers not in towers:
            raise ValueError(f"adapters.towers={self.towers!r} is unknown; use one of {', '.join(towers)}")
        if self.rank < 1:
            raise ValueError(f"adapters.rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"adapters.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapters.dropout={self.dropout} must be in [0, 1)")
        if not self.targets or any(not pattern for pattern in self.targets):
            raise ValueError("adapters.targets must hold at least one non-empty module-name glob")
