"""A model built already partitioned over the ZeRO-3 ranks (`deepspeed.zero.Init`), and initial
weights copied into it one parameter at a time.

Built whole, every rank holds the full model until the engine partitions it: ViT-bigG-14 (2.5B
parameters, 10 GB in fp32) costs each of 8 ranks on a node its own copy at start-up. Under
zero.Init each module's parameters are partitioned as soon as the module is constructed, so a
rank holds its share of the model plus the module being built.
"""
import itertools
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode


def is_partitioned(module: nn.Module) -> bool:
    """Whether the module's parameters are ZeRO-3 parameters (built under zero.Init)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """A tensor's shape; for a partitioned ZeRO-3 parameter the whole parameter's, not its shard's."""
    return getattr(tensor, "ds_shape", tensor.shape)


def _unavailable(value: Any) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return getattr(value, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE


class _GatherWhatInitWrites(TorchFunctionMode):
    """Gathers a partitioned parameter that an in-place torch function writes to, keeping rank 0's
    result.

    open_clip initialises parameters of a module's children from the parent's __init__
    (TextTransformer.init_parameters: the token embedding and every block's weights). zero.Init
    has partitioned the children by then, so those writes would land in empty tensors and leave
    PyTorch's default init (the token embedding at std 1 instead of 0.02). DeepSpeed gathers
    around Module.apply only. With this mode every rank draws the same numbers from the same
    generator on the gathered tensor, so the model starts from the weights it has built whole on
    the same device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not name.endswith("_") or name.startswith("__"):  # not an in-place write
            return func(*args, **kwargs)
        targets = [value for value in itertools.chain(args, kwargs.values()) if _unavailable(value)]
        if not targets:
            return func(*args, **kwargs)
        import deepspeed
        with deepspeed.zero.GatheredParameters(targets, modifier_rank=0):
            return func(*args, **kwargs)


@contextmanager
def partitioned_build(ds_config: dict[str, Any]) -> Iterator[None]:
    """Modules constructed inside are partitioned as ZeRO-3 with `ds_config` (resolved) will
    partition them; call on every rank, in the same order."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config), _GatherWhatInitWrites():
        yield


def copy_into_partitions(module: nn.Module, state_dict: Optional[dict[str, torch.Tensor]], names: list[str]) -> None:
    """Copy rank 0's `state_dict` into the partitioned `module`, one gathered parameter at a time.

    `names` (the same on every rank) are the tensors to copy; `state_dict` is read on rank 0 only
    and emptied as it goes. Buffers, which ZeRO-3 does not partition, are broadcast from rank 0."""
    import deepspeed

    wanted, rank0 = set(names), dist.get_rank() == 0
    for name, param in module.named_parameters():
        if name in wanted:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank0:
                    param.data.copy_(state_dict.pop(name))
    for name, buffer in module.named_buffers():
        if name in wanted:
            if rank0:
                buffer.copy_(state_dict.pop(name))
            dist.broadcast(buffer, src=0)


def expected_shapes(module: nn.Module) -> Mapping[str, torch.Size]:
    """The whole shape of every tensor in the module's state dict, partitioned or not."""
    return {name: full_shape(tensor) for name, tensor in module.state_dict(keep_vars=True).items()}
