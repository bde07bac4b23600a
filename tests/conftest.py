"""Runs the Triton kernels in the CPU interpreter unless CUDA is present (set before kernels import),
and registers dsclip's architectures with open_clip (where it is installed) for tests that call
open_clip directly."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # open_clip is absent on a bare GPU machine; the kernel tests (test_kernels.py) run without it
    import open_clip  # noqa: F401
except ImportError:
    pass
else:
    from dsclip.model.architectures import registered

    registered()


def pytest_sessionfinish(session, exitstatus):
    """The one-rank process group some tests start in this process ends before interpreter
    shutdown, which gloo's pending work can abort (pytorch/pytorch#190489)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
