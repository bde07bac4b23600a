"""Loading a ZeRO checkpoint onto another number of ranks through DeepSpeed's universal checkpoint
format: rank 0 converts step-N once (deepspeed.checkpoint.ds_to_universal: every parameter's fp32
weights and Adam moments whole, one file each), every rank's engine (built with
"checkpoint": {"load_universal": true}) cuts its new shard out of them, and the converted copy is
removed. DeepSpeed 0.19.8 gets these wrong, put right here:

- its converter and loader unpickle every file with weights_only=False: both run under
  weights_only_loads, in this process (one converter worker), so the untrusted-file rule holds;
- a universal load reads no module state: frozen parameters (which ZeRO-3 keeps as per-rank
  fragments the converter skips) would come back as the model's fresh initialisation, and
  buffers (BatchNorm statistics) too. Frozen fragments are merged into the converter's
  per-parameter layout and copied in one tensor at a time; buffers come from rank 0's module state;
- its ZeRO-3 loader copies param group 0's hyperparameters into every group, which would give
  every per-tower, layer-decay and no-decay group the first group's lr and weight decay: each
  group's own are restored from the saved optimizer state;
- that loader also gives every group's Adam state one shared `step` tensor, on the host, which
  torch's AdamW then advances once per group each step (from the second step on the bias
  correction is wrong): each group gets its own, on its parameter's device.

Its ZeRO-1/2 loader fails on a rank that holds no share of some parameter group (an IndexError,
while the other ranks wait in a collective), so ZeRO-1/2 checkpoints are re-cut onto one rank only.
"""
import argparse
import contextlib
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsclip.errors import CheckpointError
from dsclip.logs import prints_as_debug
from dsclip.model.safe_files import load_file, weights_only_loads
from dsclip.training.checkpoint import SPACE_MARGIN, owned_by

log = logging.getLogger(__name__)

UNIVERSAL_FOLDER = "zero"  # where ds_to_universal writes <parameter name>/{fp32,exp_avg,exp_avg_sq}.pt
OPTIMIZER_STATE = "optimizer_state.pt"  # its optimizer state without the per-rank tensors
PARAM, PARAM_GROUPS = "param", "param_groups"  # keys of DeepSpeed's universal files (deepspeed.checkpoint.constants)
FROZEN_SHAPES, FROZEN_FRAGMENTS = "frozen_param_shapes", "frozen_param_fragments"  # ZeRO-3 model states
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # rank 0's
ZERO3_MODEL_STATES_OF_EVERY_RANK = "*zero_pp_rank_*_mp_rank_00_model_states.pt"
ZERO12_MODEL_STATES = "mp_rank_00_model_states.pt"


def loading_config(ds_config: dict) -> dict:
    """`ds_config` for an engine that loads a converted (universal) checkpoint; saving is unchanged."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def saved_zero_stage(folder: Path) -> int:
    """3, 2 (standing for 1 and 2) or 0, from the files of checkpoint `folder`."""
    if any(folder.glob(ZERO3_MODEL_STATES_OF_EVERY_RANK)):
        return 3
    return 2 if any(folder.glob("*_optim_states.pt")) else 0


def check_supported(saved_stage: int, engine_stage: int, saved_world: int, world: int) -> None:
    """A one-line error for a re-cut this code cannot make, before anything is converted."""
    saved_as = "ZeRO-3" if saved_stage == 3 else f"ZeRO-{saved_stage}" if saved_stage == 0 else "ZeRO-1/2"
    if (saved_stage == 3) != (engine_stage == 3):
        raise CheckpointError(f"the checkpoint was saved under {saved_as}, this run uses ZeRO-{engine_stage}: resume "
                              "with the DeepSpeed config it was saved with")
    if saved_stage == 0:
        raise CheckpointError(f"a {saved_as} checkpoint resumes only on the {saved_world} rank(s) it was saved on")
    if saved_stage < 3 and world > 1:
        raise CheckpointError(f"a {saved_as} checkpoint resumes on 1 rank or on the {saved_world} it was saved on, not "
                              f"on {world}: DeepSpeed 0.19.8 cannot re-cut ZeRO-1/2 optimizer state onto several "
                              "ranks (use ZeRO-3 to change the number of ranks freely)")


def convert(source: Path, target: Path, trust: bool) -> None:
    """Rank 0: the new folder `target` becomes the universal form of checkpoint folder `source`."""
    from deepspeed.checkpoint import ds_to_universal
    target.parent.mkdir(parents=True, exist_ok=True)
    # the converter holds every fragment and the merged files at once: about twice the source
    need = sum(f.stat().st_size for f in source.iterdir() if f.is_file()) * 2 * SPACE_MARGIN
    free = shutil.disk_usage(target.parent).free
    if free < need:
        raise CheckpointError(f"{target.parent} has {free / 2**30:.2f} GiB free; re-cutting {source} for another "
                              f"number of ranks needs about {need / 2**30:.2f} GiB there for a while: free space")
    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # ZeRO-1/2: the version record plain data parallel lacks
    progress = io.StringIO()
    with prints_as_debug("DeepSpeed"), contextlib.redirect_stderr(progress), weights_only_loads(trust):
        ds_to_universal.main(args)
    log.debug("DeepSpeed's converter: %s", progress.getvalue().strip()[-2000:])
    write_frozen_parameters(source, target / UNIVERSAL_FOLDER, trust)


def write_frozen_parameters(source: Path, universal: Path, trust: bool) -> None:
    """Each frozen parameter of a ZeRO-3 checkpoint merged from its ranks' fragments (each rank held
    one flat slice, the last one padded) into <universal>/<name>/fp32.pt, as the converter writes
    trainable ones. ZeRO-1/2 checkpoints hold whole weights, which the converter already wrote."""
    files = sorted(source.glob(ZERO3_MODEL_STATES_OF_EVERY_RANK), key=lambda f: owned_by(f.name))
    states = [load_file(f, trust, mmap=True) for f in files]
    shapes = (states[0].get(FROZEN_SHAPES) or {}) if states else {}
    for name, shape in shapes.items():
        flat = torch.cat([state[FROZEN_FRAGMENTS][name].reshape(-1) for state in states])
        (universal / name).mkdir(parents=True, exist_ok=True)
        torch.save({PARAM: flat[:shape.numel()].reshape(shape).clone()}, universal / name / "fp32.pt")


def frozen_parameters(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in engine.module.named_parameters() if not param.requires_grad]


def missing_files(engine, root: Path, tag: str) -> list[str]:
    """What `load` would miss in universal checkpoint root/tag (every rank checks)."""
    universal = root / tag / UNIVERSAL_FOLDER
    needed = [universal / OPTIMIZER_STATE, module_states_file(root / tag)]
    needed += [universal / name / "fp32.pt" for name, _ in frozen_parameters(engine)]
    needed += [universal / name / f"{state}.pt" for name, param in engine.module.named_parameters()
               if param.requires_grad for state in ("fp32", "exp_avg", "exp_avg_sq")]
    return [f"{file} is missing: the re-cut checkpoint is incomplete (is {root} on a filesystem every rank sees?)"
            for file in needed if not file.is_file()][:1]


@dataclass
class ModuleExtras:
    """What the universal load drops and `load` puts back, read before its collectives begin."""

    param_groups: list[dict]
    buffers: dict[str, torch.Tensor]


def read_extras(root: Path, tag: str, trust: bool) -> ModuleExtras:
    groups = load_file(root / tag / UNIVERSAL_FOLDER / OPTIMIZER_STATE, trust, mmap=True)[PARAM_GROUPS]
    return ModuleExtras(groups, load_file(module_states_file(root / tag), trust, mmap=True)["module"])


def load(engine, root: Path, tag: str, trust: bool, extras: ModuleExtras) -> None:
    """Every rank: the engine state of universal checkpoint root/tag, with frozen parameters,
    buffers and each param group's hyperparameters and step count put back."""
    with weights_only_loads(trust):
        load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the re-cut checkpoint {root / tag}")
    own_step_counts(engine.optimizer.optimizer.state)
    restore_param_groups(engine.optimizer.param_groups, extras.param_groups)
    restore_buffers(engine.module, extras.buffers)
    restore_frozen_parameters(frozen_parameters(engine), root / tag / UNIVERSAL_FOLDER, trust)


def own_step_counts(state: dict) -> None:
    """Each parameter's Adam state its own `step` tensor, on the parameter's device (fused AdamW
    wants it there; the loader hands them all one, on the host)."""
    for param, parameter_state in state.items():
        if torch.is_tensor(parameter_state.get("step")):
            parameter_state["step"] = parameter_state["step"].to(param.device, copy=True)


def restore_param_groups(groups: list[dict], saved: list[dict]) -> None:
    """Each group's hyperparameters (lr, weight decay, betas, ...) as saved, in the saved order."""
    if len(groups) != len(saved):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's "
                              f"{len(groups)}: resume with the recipe it was saved with")
    for group, saved_group in zip(groups, saved):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def module_states_file(folder: Path) -> Path:
    """Rank 0's model-states file of checkpoint `folder` (ZeRO-3's name, else ZeRO-1/2's)."""
    return folder / (ZERO3_MODEL_STATES if saved_zero_stage(folder) == 3 else ZERO12_MODEL_STATES)


def restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """The module's saved buffers (whole on every rank: ZeRO partitions only parameters)."""
    for name, buffer in module.named_buffers():
        if name in saved:
            buffer.copy_(saved[name])


def restore_frozen_parameters(frozen: list[tuple[str, torch.nn.Parameter]], universal: Path, trust: bool) -> None:
    """Frozen parameters from <universal>/<name>/fp32.pt, one at a time: under ZeRO-3 rank 0 fills
    the gathered tensor and DeepSpeed re-partitions it; otherwise every rank copies it."""
    import deepspeed
    for name, param in frozen:
        partitioned = hasattr(param, "ds_id")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if not partitioned or dist.get_rank() == 0:
                param.data.copy_(load_file(universal / name / "fp32.pt", trust)[PARAM])
