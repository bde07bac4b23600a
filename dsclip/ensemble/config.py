"""Recipe section `wise_ft:`, and the alpha grammar `dsclip wise-ft --alphas` shares with it."""
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_ALPHAS = "0:1:0.1"


def parse_alphas(text: str) -> list[float]:
    """'start:stop:step' (stop included), a comma list '0,0.5,1' or one number."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            count = (stop - start) / step if step > 0 else -1.0
            if count < 0 or abs(count - round(count)) > 1e-6:
                raise ValueError
            return [round(start + i * step, 10) for i in range(round(count) + 1)]
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"alphas {text!r}: expected start:stop:step (e.g. {DEFAULT_ALPHAS}, step > 0 dividing "
                         "stop - start), a comma list (0,0.5,1) or one number") from None


@dataclass
class WiseFtConfig:
    enabled: bool = False  # at the end of training, mix model.pretrained (alpha 0) with the fine-tuned weights (alpha 1)
    alphas: list[float] = field(default_factory=lambda: parse_alphas(DEFAULT_ALPHAS))  # weights of the fine-tuned model to evaluate, each in [0, 1]
    save_alpha: Optional[float] = None  # alpha whose weights are written to <run>/wise_ft/export; None = best mean of task and general score

    def validate(self) -> None:
        if not self.alphas:
            raise ValueError("wise_ft.alphas is empty: list at least one alpha in [0, 1], e.g. [0, 0.5, 1]")
        outside = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if outside:
            raise ValueError(f"wise_ft.alphas {outside} are outside [0, 1]: alpha 0 is the zero-shot model, "
                             "1 the fine-tuned one")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"wise_ft.alphas {self.alphas} lists an alpha twice")
        if self.save_alpha is not None and self.save_alpha not in self.alphas:
            raise ValueError(f"wise_ft.save_alpha={self.save_alpha} is not one of wise_ft.alphas {self.alphas}: "
                             "the saved weights must be ones that were evaluated")
