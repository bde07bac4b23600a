"""Runs the Triton kernels in the CPU interpreter unless CUDA is present (set before kernels import),
and registers dsclip's architectures with open_clip for tests that call open_clip directly."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsclip.model.architectures import registered  # noqa: E402

registered()
