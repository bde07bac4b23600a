"""Loaded at start-up by every Python process of a fault case (PYTHONPATH points here) to inject
the fault DSCLIP_FAULT names into real calls of the libraries and of dsclip:

    enospc:<text>          torch.save to a path containing <text> fails with ENOSPC (disk full)
    kill-at:<text>[:<n>]   the process SIGKILLs itself the n-th time (default: first) torch.save
                           writes, or os.replace renames onto, a path ending in <text> (a crash
                           at that point of a save)
    small-batch:<step>:<r> rank r's micro-batch of optimizer step <step> loses half its rows
    worker-error:<r>:<n>   a data-loader worker of rank r raises after <n> samples

dsclip's modules are patched when they are first imported, so processes that never import
them (the launcher) stay as they are.
"""
import importlib.abc
import importlib.util
import os
import signal
import sys

KIND, _, ARGUMENT = os.environ.get("DSCLIP_FAULT", "").partition(":")


def after_import(name, patch):
    """Call patch(module) right after `name` is first imported."""
    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            run = spec.loader.exec_module

            def run_then_patch(module):
                run(module)
                patch(module)
            spec.loader.exec_module = run_then_patch
            return spec
    sys.meta_path.insert(0, Finder())


def wrap_torch_save(fail):
    import torch
    save = torch.save

    def faulty_save(obj, f, *args, **kwargs):
        fail(str(f))
        return save(obj, f, *args, **kwargs)
    torch.save = faulty_save


if KIND == "enospc":
    import errno

    def full(path):
        if ARGUMENT in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    wrap_torch_save(full)

if KIND == "kill-at":
    TARGET, _, NTH = ARGUMENT.partition(":")
    seen = [0]

    def die_at(path):
        if path.endswith(TARGET):
            seen[0] += 1
            if seen[0] == int(NTH or 1):
                os.kill(os.getpid(), signal.SIGKILL)
    replace = os.replace

    def faulty_replace(src, dst, *args, **kwargs):
        die_at(str(dst))
        return replace(src, dst, *args, **kwargs)
    os.replace = faulty_replace
    after_import("deepspeed", lambda module: wrap_torch_save(die_at))

if KIND == "small-batch":
    STEP, RANK = (int(x) for x in ARGUMENT.split(":"))

    def shrink(loop):
        next_batch = loop.Trainer.next_batch

        def next_batch_of_this_rank(self):
            images, texts = next_batch(self)
            if int(os.environ["RANK"]) == RANK and self.engine.global_steps == STEP - 1:
                return images[: len(images) // 2], texts[: len(texts) // 2]
            return images, texts
        loop.Trainer.next_batch = next_batch_of_this_rank
    after_import("dsclip.training.loop", shrink)

if KIND == "worker-error":
    RANK, AFTER = (int(x) for x in ARGUMENT.split(":"))

    def break_workers(loader):
        get_item, calls = loader.SeededSamples.__getitem__, [0]

        def failing_get_item(self, index):
            calls[0] += 1
            if int(os.environ["RANK"]) == RANK and calls[0] > AFTER:
                raise RuntimeError(f"injected failure in a data-loader worker of rank {RANK}")
            return get_item(self, index)
        loader.SeededSamples.__getitem__ = failing_get_item
    after_import("dsclip.data.loader", break_workers)
