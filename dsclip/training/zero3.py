"""What dsclip adds around DeepSpeed's ZeRO-3 (0.19.x): fetch units, one collective for the
persistent parameters, no second fp32 copy of fp32 weights, and one reduction for the gradient
norm. Each fixes a shortfall measured in bench/train.py (2 CPU ranks, dsclip-tiny; numbers in the
docs/benchmarks.md)."""
from typing import Any, Optional

import torch
from torch import nn

from dsclip.model.partition import LayerPartition


def fetch_unit_names(clip: nn.Module) -> list[str]:
    """Names of the transformer blocks of an open_clip model that can be ZeRO-3 fetch units: every
    block except a trainable one whose input carries no gradient (all below it frozen, as under
    partial freezing). DeepSpeed reduces a unit's gradients in a full backward hook, and with no
    input needing a gradient that hook fires before the block's parameter gradients exist; such a
    block keeps DeepSpeed's per-submodule hooks. Apply freezing first."""
    partition = LayerPartition(clip)
    params = dict(clip.named_parameters())
    names = []
    for tower, layout in partition.layouts.items():
        if not layout.depth:
            continue
        layers = partition.layers(tower)  # [embeddings, block 0, ..., head]
        gradient_below = any(params[n].requires_grad for n in layers[0])
        for i in range(layout.depth):
            trainable = any(params[n].requires_grad for n in layers[i + 1])
            if gradient_below or not trainable:
                names.append(f"{layout.blocks}.{i}")
            gradient_below = gradient_below or trainable
    return names


def mark_fetch_units(model: nn.Module, clip: nn.Module) -> int:
    """Make transformer blocks ZeRO-3 fetch units (DeepSpeed "leaf modules"); see fetch_unit_names.

    By default ZeRO-3 hooks every submodule and gathers each Linear / LayerNorm separately; a
    block as the unit (FSDP's usual wrap policy) gathers its parameters in one collective and runs
    one set of hooks per block. `model` is the module given to deepspeed.initialize, `clip` the
    open_clip model inside it. Returns the number of blocks marked."""
    from deepspeed.utils import set_z3_leaf_modules_by_name

    prefix = next(name for name, module in model.named_modules() if module is clip)
    names = [f"{prefix}.{name}" if prefix else name for name in fetch_unit_names(clip)]
    if names:
        set_z3_leaf_modules_by_name(model, names)
    return len(names)


def share_fp32_master(optimizer: Any) -> int:
    """Let fp32 ZeRO-3 step its parameter partition in place instead of a cloned fp32 copy.

    DeepSpeed means to alias the master to the partition when both are fp32 on the same device,
    but compares a torch.device with the string 'cpu'/'cuda:N' (never equal) and clones: 4 bytes
    per parameter per rank for nothing. Returns the number of sub-groups now shared. Left alone
    when the optimizer is offloaded: its host-side master is DeepSpeed's to manage."""
    if optimizer.offload_optimizer:
        return 0
    shared = 0
    pairs = zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat)
    for i, (partition, master) in enumerate(pairs):
        if (partition.dtype != master.dtype or partition.device != master.device
                or partition.data_ptr() == master.data_ptr()):
            continue
        partition.ds_id, partition.requires_grad = master.ds_id, True
        optimizer.fp32_partitioned_groups_flat[i] = partition
        if master in optimizer.optimizer.state:  # the state DeepSpeed creates at init is keyed by the clone
            optimizer.optimizer.state[partition] = optimizer.optimizer.state.pop(master)
        shared += 1
    return shared


def coalesce_persistent_gather(optimizer: Any) -> None:
    """Gather the persistent (small, replicated) parameters in one collective after each step.

    ZeRO-3 shards their optimizer state and re-gathers them after every step, one all-gather per
    parameter: ~50 for the tiny model, hundreds for a ViT-B (every bias and LayerNorm). dsclip
    packs the local shards into one buffer and gathers it once."""
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = optimizer.persistent_parameters
    if len(params) < 2:
        return
    first = params[0]
    per_param_gather = first.all_gather

    def all_gather(param_list=None, async_op=False, hierarchy=0):
        todo = [p for p in param_list or [first] if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if (async_op or len(todo) < 2 or len({p.ds_tensor.dtype for p in todo}) > 1
                or len({id(p.ds_process_group) for p in todo}) > 1
                or any(p.ds_secondary_tensor is not None or hasattr(p.ds_tensor, "ds_quant_scale")
                       or p.ds_tensor.status != PartitionedParamStatus.AVAILABLE for p in todo)):  # NVMe-swapped
            return per_param_gather(param_list, async_op=async_op, hierarchy=hierarchy)
        group = todo[0].ds_process_group
        shards = [p.ds_tensor.reshape(-1) for p in todo]
        local = torch.cat(shards).to(get_accelerator().current_device_name())  # offload_param keeps shards on the host
        world = comm.get_world_size(group)
        gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        comm.all_gather_into_tensor(gathered, local, group=group)
        by_rank = gathered.view(world, -1)
        offset = 0
        for param, shard in zip(todo, shards):
            full = by_rank[:, offset:offset + shard.numel()].reshape(-1)  # rank-major: one padded copy
            param.data = full[:param.ds_numel].view(param.ds_shape)
            param.ds_status = ZeroParamStatus.AVAILABLE
            offset += shard.numel()
        return None

    first.all_gather = all_gather


def contiguous_span(tensors: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 1-D view of the storage the tensors tile back to back in list order (same dtype and
    device, each contiguous), or None when they do not."""
    if not tensors:
        return None
    first = tensors[0]
    storage, start = first.untyped_storage(), first.storage_offset()
    end = start
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != end):
            return None
        end += t.numel()
    return first.new_empty(0).set_(storage, start, (end - start,))


def fuse_grad_norm(optimizer: Any) -> bool:
    """Let ZeRO-3 take the gradient norm of its flat gradient partition in one reduction.

    DeepSpeed takes each parameter's partition norm separately (an fp64 copy and a norm per
    parameter, then a stack): ~100 small ops for the tiny model, 300 for a ViT-B, 5 ms a step of
    the tiny model on 2 CPU ranks. The partitions are back-to-back slices of one buffer, so dsclip
    takes that buffer's norm in one reduction; DeepSpeed's reduction over ranks, clipping and
    inf/nan handling are unchanged. Left alone under model parallelism (its per-parameter counting rules) and
    optimizer offload (another code path). Returns whether it is in effect."""
    if optimizer.offload_optimizer or getattr(optimizer, "model_parallel_group", None) is not None:
        return False
    per_tensor = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        span = contiguous_span(gradients)
        # DeepSpeed picks the reduction group from the parameters (AutoEP experts have their own)
        if span is None or any(getattr(p, "ds_zero_placement_family", "replicated") != "replicated" for p in params):
            return per_tensor(gradients, params, norm_type)
        # DeepSpeed's norm of a one-element tensor holding the partition's norm is that norm; it
        # then reduces it over ranks as usual. fp64 accumulation as DeepSpeed's (torch's fp32
        # norm drifts by 1e-4 relative over a few million elements).
        local = torch.linalg.vector_norm(span, ord=norm_type, dtype=torch.float64).reshape(1)
        return per_tensor([local], params[:1], norm_type)

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True
