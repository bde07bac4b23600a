"""One fine-tuning run, start to end; the entry point of the DeepSpeed launcher, torchrun and
`dsclip train`:

    deepspeed dsclip/train.py --deepspeed_config ds_configs/zero3.json [--recipe FILE] [--set key=value ...]

The run, in order: the recipe and DeepSpeed config are read and checked (before any rank does
work), the process group starts, every component is built (resumed from a checkpoint with
--resume), the loop trains, evaluates, saves and exports, and a `wise_ft:` recipe section sweeps
WiSE-FT mixes of the result with the pretrained weights.
"""
import os
import sys

# Run as a script, this folder would sit first on sys.path and its modules and packages (config,
# data, ...) would shadow same-named modules of every library; put the repository root there instead.
_here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
    sys.path[0] = os.path.dirname(_here)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from dsclip.commands.common import (DEFAULT_DS_CONFIG, add_ds_config, add_launcher_rank, add_log_level,  # noqa: E402
                                    add_overrides, add_weight_flags, guarded, weight_overrides)
from dsclip.config import RunConfig, load_config  # noqa: E402


def run(cfg: RunConfig, ds_config: dict[str, Any], resume: Optional[str] = None,
        new_global_batch: bool = False) -> dict[str, float]:
    """Train (or resume) the run `cfg` describes on every rank; returns its final evaluation."""
    # Heavy imports only here, once the inputs are known to be good.
    from dsclip.training.bootstrap import end_process_group, start_process_group
    from dsclip.training.components import build_run
    from dsclip.training.loop import StopSignals, Trainer

    if cfg.train.export_transformers:
        from dsclip.model.hf_export import clip_config
        clip_config(cfg.model)  # a model CLIPModel cannot hold is refused before any rank trains
    stop = StopSignals().install()
    start_process_group(cfg.train.collective_timeout_s)
    trainer = Trainer(build_run(cfg, ds_config, resume, new_global_batch), stop)
    metrics = trainer.train()
    if cfg.wise_ft.enabled and not trainer.stopped_by_signal:
        from dsclip.ensemble.wiseft import run_wise_ft
        finetuned = cfg.export_dir if cfg.train.export else cfg.run_dir
        started_from = Path(cfg.adapters.weights) if cfg.adapters.weights else None  # the zero-shot end
        run_wise_ft(cfg.wise_ft, cfg, zeroshot=cfg.model.pretrained, finetuned=str(finetuned),
                    out_dir=cfg.run_dir / "wise_ft", device=trainer.engine.device, adapters=(started_from, None))
    end_process_group()
    return metrics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsclip train", description="Fine-tune a CLIP model with DeepSpeed.")
    add_ds_config(p, "DeepSpeed engine config (JSON; 'auto' fields come from the recipe); "
                  f"default {DEFAULT_DS_CONFIG}")
    p.add_argument("--recipe", help="run recipe (YAML); default: the embedded synthetic-shapes run")
    add_overrides(p)
    p.add_argument("--output-dir", help="parent folder of run folders (recipe key output_dir)")
    p.add_argument("--name", help="run name; outputs go to <output-dir>/<name> (recipe key name)")
    add_weight_flags(p, "initial weights (recipe key model.pretrained): open_clip tag, weights file, HF-style "
                     "folder, hf-hub:org/name or a dsclip run folder; a new schedule from step 0")
    p.add_argument("--resume", metavar="latest|PATH", help="continue a run exactly: model, optimizer, schedule, "
                   "step, data position and RNG from 'latest' (this run's newest checkpoint) or a step-N folder; "
                   "the number of ranks, data.batch_size and train.grad_accum_steps may change if the global "
                   "batch does not")
    p.add_argument("--new-global-batch", action="store_true", help="with --resume: accept another global batch "
                   "(the learning schedule stays the saved run's, set for the old batch)")
    add_log_level(p)
    add_launcher_rank(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.new_global_batch and not args.resume:
        p.error("--new-global-batch only applies to --resume")
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.name:
        overrides.append(f"name={args.name}")
    overrides += weight_overrides(args)

    def train() -> int:
        from dsclip.training.ds_config import load_ds_config
        cfg = load_config(args.recipe, overrides)
        ds_config = load_ds_config(args.deepspeed_config)
        run(cfg, ds_config, args.resume, args.new_global_batch)
        return 0

    return guarded(args, train)


if __name__ == "__main__":
    sys.exit(main())
