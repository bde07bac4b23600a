"""`dsclip eval`: evaluate a model (any open_clip architecture + pretrained source) without
training, on one process or many ranks (torchrun / the DeepSpeed launcher), under ZeRO-3."""
import argparse
import json
import logging
from pathlib import Path
from typing import Optional

from dsclip.commands.common import (add_ds_config, add_launcher_rank, add_log_level, add_overrides, add_weight_flags,
                                    guarded, weight_overrides)
from dsclip.config import RunConfig, load_config

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsclip eval", description="Zero-shot and retrieval evaluation.")
    p.add_argument("--model", help="open_clip architecture (recipe key model.name)")
    add_weight_flags(p, "weights: tag, file, HF-style folder, hf-hub:org/name or dsclip run folder")
    p.add_argument("--recipe", help="take model and eval sections from this recipe")
    p.add_argument("--zeroshot", action="append", default=[], metavar="SOURCE[:PATH]",
                   help="zero-shot set: synthetic, fashion-mnist, folder:DIR, webdataset:PATTERN or clip_benchmark:DIR "
                        "(a CLIP_benchmark classification set; repeatable)")
    p.add_argument("--retrieval", action="append", default=[], metavar="SOURCE:PATH",
                   help="retrieval set: csv:FILE, webdataset:PATTERN or clip_benchmark:DIR (a CLIP_benchmark "
                        "retrieval set; repeatable)")
    add_overrides(p)
    add_ds_config(p, "DeepSpeed config; ZeRO-3 shards the weights over the ranks")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    add_log_level(p)
    add_launcher_rank(p)
    return p


def task_overrides(kind: str, specs: list[str]) -> list[str]:
    """`--zeroshot fashion-mnist --zeroshot folder:/d` -> one `eval.<kind>=[...]` override."""
    if not specs:
        return []
    items = []
    for spec in specs:
        source, _, path = spec.partition(":")
        name = Path(path).stem if path else (source if kind == "zeroshot" else f"{source}-pairs")
        items.append(f"{{name: '{name}', source: '{source}', path: '{path}'}}")
    return [f"eval.{kind}=[{', '.join(items)}]"]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    overrides = list(args.overrides) + task_overrides("zeroshot", args.zeroshot) + \
        task_overrides("retrieval", args.retrieval)
    if args.model:
        overrides.append(f"model.name={args.model}")
    overrides += weight_overrides(args)

    def evaluate_command() -> int:
        from dsclip.training.ds_config import load_ds_config
        cfg = load_config(args.recipe, overrides)
        evaluate(cfg, load_ds_config(args.deepspeed_config), args.out)
        return 0

    return guarded(args, evaluate_command)


def evaluate(cfg: RunConfig, ds_config: dict, out: Optional[Path]) -> dict[str, float]:
    """Every eval of `cfg` on every rank, through a DeepSpeed inference engine."""
    import torch.distributed as dist

    from dsclip.eval.tasks import build_evals, run_evals
    from dsclip.loss.contrastive import build_loss
    from dsclip.training.bootstrap import end_process_group, start_process_group
    from dsclip.training.ds_config import for_run, precision
    from dsclip.training.engine import build_inference_engine, build_model_for

    start_process_group(cfg.train.collective_timeout_s)
    ds = for_run(ds_config, cfg, dist.get_world_size())
    bundle = build_model_for(cfg.model, ds, adapters=cfg.adapters)
    engine = build_inference_engine(bundle.module, ds)
    evals = build_evals(cfg.eval, bundle, cfg.data.synthetic, cfg.seed, build_loss(cfg.loss))
    metrics = run_evals(evals, engine, engine.device, precision(ds))
    if dist.get_rank() == 0:
        for key, value in metrics.items():
            print(f"{key}\t{value:.4f}")
        if out:
            out.write_text(json.dumps(metrics, indent=2))
            log.info("metrics written to %s", out)
    end_process_group()
    return metrics
