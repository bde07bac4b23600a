"""The learned temperature kept in [0, ln 100] after every optimizer step, as open_clip's loop
clamps it, in every copy ZeRO keeps of it.

Clamping exp(logit_scale) inside the forward instead (what dsclip did) zeroes its gradient above
the cap: a pretrained CLIP sits at float32(ln 100), whose exp is 100.0000076, so its temperature
could never move. Clamping the parameter needs care under ZeRO: the optimizer steps an fp32
master copy and writes it back into the (partitioned) parameter, so both are clamped, each on
the partition this rank holds (no collective).
"""
import math

import torch
from torch import nn

MAX_LOG_SCALE = math.log(100.0)


def clamp_logit_scale(clip: nn.Module) -> None:
    """Clamp `clip.logit_scale` (the open_clip model inside the engine) after an optimizer step."""
    param = getattr(clip, "logit_scale", None)
    if param is None or not param.requires_grad:
        return
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition and its fp32 master (maybe offloaded)
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
            param.ds_tensor.clamp_(0.0, MAX_LOG_SCALE)
            if getattr(param, "ds_persist", False):  # a persistent parameter stays gathered in .data between steps
                param.data.clamp_(0.0, MAX_LOG_SCALE)
            master = safe_get_local_fp32_param(param)
            if master is not None and master.data_ptr() != param.ds_tensor.data_ptr():
                safe_set_local_fp32_param(param, master.clamp(0.0, MAX_LOG_SCALE))
            return
        param.clamp_(0.0, MAX_LOG_SCALE)  # ZeRO-1/2: every rank holds the whole parameter
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # the fp32 master fragment, a view into this rank's flat partition
            mapping.get_hp_fragment().clamp_(0.0, MAX_LOG_SCALE)
