"""Training entry point for the DeepSpeed launcher and torchrun:

    deepspeed dsclip/train.py --deepspeed_config ds_configs/zero3.json [--recipe FILE] [--set key=value ...]
"""
import os
import sys

# Run as a script, this folder would sit first on sys.path and its modules (config, data, ...)
# would shadow same-named modules of every library; put the repository root there instead.
_here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
    sys.path[0] = os.path.dirname(_here)

from dsclip.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
