"""Recipe section `loss:`."""
from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal["clip", "siglip"]
Impl = Literal["auto", "triton", "torch_tiled", "reference"]


@dataclass
class LossConfig:
    kind: Kind = "clip"  # clip: softmax contrastive (InfoNCE); siglip: sigmoid with logit bias
    impl: Impl = "auto"  # auto: Triton on CUDA, the tiled PyTorch twin elsewhere; reference: open_clip-style logits, O(b x B) memory
    chunk_rows: int = 1024  # image rows per chunk in torch_tiled (work memory: 2 x chunk_rows x B fp32)

    def validate(self) -> None:
        if self.kind not in get_args(Kind):
            raise ValueError(f"loss.kind={self.kind!r} is not one of {get_args(Kind)}")
        if self.impl not in get_args(Impl):
            raise ValueError(f"loss.impl={self.impl!r} is not one of {get_args(Impl)}")
        if self.chunk_rows < 1:
            raise ValueError(f"loss.chunk_rows={self.chunk_rows} must be >= 1 (e.g. 1024)")
