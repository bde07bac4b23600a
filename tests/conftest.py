"""Runs the Triton kernels in the CPU interpreter unless CUDA is present (set before kernels import)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
