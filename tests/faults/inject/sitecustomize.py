"""Loaded at start-up by every Python process of a fault case (PYTHONPATH points here) to inject
the fault DSCLIP_FAULT names into real library calls:

    enospc:<text>   torch.save to a path containing <text> fails with ENOSPC (disk full)
"""
import os

FAULT = os.environ.get("DSCLIP_FAULT", "")

if FAULT.startswith("enospc:"):
    import errno

    import torch

    _save, _where = torch.save, FAULT.split(":", 1)[1]

    def save_until_full(obj, f, *args, **kwargs):
        if _where in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = save_until_full
