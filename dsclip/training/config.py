"""Recipe sections `optim:` and `train:`."""
from dataclasses import dataclass, field
from typing import Literal, Optional

from dsclip.errors import ConfigError

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


@dataclass
class LayerDecayConfig:
    """Layer-wise lr decay (EVA-CLIP): lr scale = decay ** (depth + 1 - layer index), per tower."""

    image: float = 1.0  # image tower decay per layer, in (0, 1]; 1.0 disables
    text: float = 1.0  # text tower decay per layer, in (0, 1]; 1.0 disables

    def validate(self) -> None:
        for field_name in ("image", "text"):
            value = getattr(self, field_name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"layer_decay.{field_name}={value} must be in (0, 1]; use 1.0 to disable")


@dataclass
class TowerOptimConfig:
    lr: Optional[float] = None  # this tower's peak lr; None = optim.lr
    weight_decay: Optional[float] = None  # this tower's decay; None = optim.weight_decay
    layer_decay: float = 1.0  # EVA-CLIP layer-wise lr decay: lr x decay^(depth + 1 - layer); 1.0 = off


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.1  # AdamW decay; biases, norms, logit scale and other 1-D params get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW (beta1, beta2)
    eps: float = 1e-6  # AdamW epsilon
    schedule: Literal["cosine", "const", "const-cooldown"] = "cosine"  # after warmup: cosine | const | const-cooldown
    warmup_steps: int = 50  # linear warmup from 0 to lr, in optimizer steps
    cooldown_steps: int = 0  # const-cooldown: final steps of linear decay to min_lr
    min_lr: float = 0.0  # floor of the cosine and of the cooldown
    image: TowerOptimConfig = field(default_factory=TowerOptimConfig)  # image-tower overrides
    text: TowerOptimConfig = field(default_factory=TowerOptimConfig)  # text-tower overrides

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError("optim.warmup_steps and optim.cooldown_steps must be >= 0")
        if self.schedule == "const-cooldown" and self.cooldown_steps == 0:
            raise ValueError("optim.schedule=const-cooldown needs optim.cooldown_steps > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        self.layer_decay().validate()

    def layer_decay(self) -> LayerDecayConfig:
        return LayerDecayConfig(image=self.image.layer_decay, text=self.text.layer_decay)

    def tower(self, name: str) -> TowerOptimConfig:
        return {"image": self.image, "text": self.text}.get(name, TowerOptimConfig())


# open_clip's layout in safetensors or a pickle; a folder transformers' CLIPModel loads
TRANSFORMERS = "transformers"  # the export format of a transformers CLIPModel folder
EXPORT_FORMATS = ("safetensors", "bin", TRANSFORMERS)


@dataclass
class TrainConfig:
    epochs: int = 1  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps to run; 0 = derived from epochs
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_cache: bool = False  # true: a step's micro-batches form one contrastive batch (gradient caching: one extra forward); false: each micro-batch contrasts only within itself
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    save_every: int = 0  # optimizer steps between checkpoints (also saved at each epoch end and at the end); 0 = epoch ends and end only
    keep_last: int = 2  # complete checkpoints kept, >= 2 (older ones pruned; the best is always kept)
    best_metric: Optional[str] = None  # keep the checkpoint with the best value of this eval metric, e.g. eval/synthetic/top1
    best_mode: Literal["max", "min"] = "max"  # whether a larger or smaller best_metric is better
    export: bool = True  # write open_clip-loadable weights to <run>/export at the end
    export_transformers: bool = False  # also write <run>/export-transformers: a folder transformers' CLIPModel and CLIPProcessor load
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S  # a rank that waits this long in a collective (a peer died or hangs) exits non-zero

    def validate(self) -> None:
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError("train.epochs and train.max_steps are both < 1: set one of them to a positive number")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.keep_last < 2:
            raise ConfigError(f"train.keep_last must be >= 2 (with 1, a newest checkpoint found damaged on resume "
                              f"leaves nothing to fall back on), got {self.keep_last}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"train.collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.export_transformers and not self.export:
            raise ConfigError("train.export_transformers is written with the export: set train.export: true, "
                              "or export_transformers: false")
