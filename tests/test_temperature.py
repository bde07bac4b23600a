"""The temperature: no clamp in the forward (its gradient lives at the cap), the parameter clamped
to [0, ln 100] after each optimizer step in the parameter and the optimizer's fp32 master."""
import math

import pytest
import torch

from dsclip.config import load_config
from dsclip.training.ds_config import load_ds_config
from dsclip_testutils import REPO, ds_config, init_single_rank, make_trainer

LN_100_FLOAT32 = float(torch.tensor(math.log(100.0)))  # where pretrained CLIPs sit: exp() is 100.0000076


CONFIGS = {"zero2": lambda tmp: ds_config(2, tmp), "zero3": lambda tmp: ds_config(3, tmp),  # all partitioned
           "zero3-shipped": lambda tmp: REPO / "ds_configs" / "zero3.json"}  # the scale stays gathered (persistent)


def logit_scales(tmp_path, config: str, init: float, steps: int) -> tuple[list[float], float]:
    """exp(logit_scale) each step's forward saw, and the fp32 master value at the end."""
    from deepspeed.utils import safe_get_full_fp32_param
    init_single_rank()
    cfg = load_config(None, [f"train.max_steps={steps}", "optim.warmup_steps=1", "data.batch_size=16",
                             f"model.init_logit_scale={init}", "eval.at_start=false", "eval.at_end=false",
                             "train.export=false", "train.save_every=0", f"output_dir={tmp_path}"])
    trainer = make_trainer(cfg, load_ds_config(str(CONFIGS[config](tmp_path))))
    seen, original = [], trainer.optimizer_step

    def recording_step():
        loss, logit_scale, lr = original()
        seen.append(logit_scale.item())
        return loss, logit_scale, lr

    trainer.optimizer_step = recording_step
    trainer.train()
    master = safe_get_full_fp32_param(trainer.engine.module.clip.logit_scale)
    return seen, master.item()


@pytest.mark.parametrize("config", CONFIGS)
def test_a_temperature_above_the_cap_is_clamped_after_the_first_step_in_every_copy(tmp_path, config):
    seen, master = logit_scales(tmp_path, config, init=5.0, steps=3)
    assert seen[0] == pytest.approx(math.exp(5.0), rel=1e-6)  # the forward itself does not clamp
    assert max(seen[1:]) <= 100.0 + 1e-3 and master <= math.log(100.0) + 1e-6


@pytest.mark.parametrize("config", CONFIGS)
def test_a_temperature_at_the_cap_comes_down_when_the_loss_asks(tmp_path, config):
    seen, _ = logit_scales(tmp_path, config, init=LN_100_FLOAT32, steps=6)
    assert seen[0] == pytest.approx(100.0)
    assert seen[-1] < seen[0] - 0.5, seen  # with the forward clamp its gradient was exactly 0
