"""Memory this rank holds: model-state bytes of a DeepSpeed engine (ZeRO-0/1/2/3) or a plain
torch model + optimizer, and the peak resident set size of this process.

Model states are counted from the tensors the engine keeps between steps:
  params     the model-dtype weights on this rank: all of them under ZeRO-0/1/2; under ZeRO-3
             this rank's partition plus the parameters kept whole (below the persistence threshold)
  grads      the gradient the optimizer consumes on this rank, sized from its parameters: the
             whole model under ZeRO-0/1, this rank's partition under ZeRO-2/3 (reduce buckets and
             other transient buffers are not counted)
  optimizer  the optimizer's state tensors (Adam moments) plus its master copy of the weights
             where it keeps one in separate memory (ZeRO-1/2 always; ZeRO-3 only when the model
             dtype differs from the master dtype: fp32 ZeRO-3 steps the partition in place)
"""
import ctypes

import torch
from torch import nn

STATES = ("params", "grads", "optimizer")


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _state_tensor_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def module_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Model states of an unsharded model (one rank of DDP, or one process): {params, grads, optimizer}."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "params": sum(_bytes(p) for p in model.parameters()),
        "grads": sum(_bytes(p) for p in trainable),
        "optimizer": _state_tensor_bytes(optimizer),
    }


def state_bytes(engine) -> dict[str, int]:
    """Model states this rank of a DeepSpeed engine holds: {params, grads, optimizer} in bytes.

    Call after at least one optimizer step: torch's AdamW creates its moments lazily.
    """
    stage = engine.zero_optimization_stage()
    params = 0
    param_storages = set()
    for p in engine.module.parameters():
        partition = getattr(p, "ds_tensor", None)
        if partition is not None:  # ZeRO-3: the partition, plus the full tensor if it stays gathered
            params += _bytes(partition)
            param_storages.add(partition.untyped_storage().data_ptr())
        if p.numel() > 0:
            params += _bytes(p)
            param_storages.add(p.untyped_storage().data_ptr())
    # ZeRO wrappers keep the torch optimizer in `.optimizer` and its master partitions in their own
    # lists (ZeRO-3 puts them into the torch optimizer's param_groups only during step()).
    if stage == 0:
        inner, masters = engine.optimizer, _optimizer_params(engine.optimizer)
    elif stage == 3:
        inner, masters = engine.optimizer.optimizer, engine.optimizer.fp32_partitioned_groups_flat
    else:
        inner, masters = engine.optimizer.optimizer, engine.optimizer.single_partition_of_fp32_groups
    master = sum(_bytes(p) for p in masters if p.untyped_storage().data_ptr() not in param_storages)
    if stage >= 2:
        grads = sum(p.numel() for p in masters) * 4  # fp32 gradient partition of the master weights
    else:
        grads = sum(_bytes(p) for p in engine.module.parameters() if p.requires_grad)
    return {"params": params, "grads": grads, "optimizer": master + _state_tensor_bytes(inner)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status (Linux only)")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def shared_rss_bytes() -> int:
    """Resident shared memory of this process now (RssShmem: /dev/shm mappings such as the CPU
    collectives' exchange, counted in every process that touched them)."""
    return _status_kib("RssShmem") * 1024


def reset_peak_rss() -> int:
    """Start a new peak (VmHWM := VmRSS, Linux) after handing freed heap back to the system, so
    that memory reused from the heap is not invisible to the next peak; returns the RSS now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()
