"""`dsclip eval`: evaluate a model (any open_clip architecture + pretrained source) without
training, on one process or many ranks (torchrun / the DeepSpeed launcher), under ZeRO-3."""
import argparse
import json
from pathlib import Path
from typing import Optional

from dsclip.cli import default_ds_config, guarded, weight_overrides  # cli imports this module lazily: no cycle
from dsclip.config import load_config


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsclip eval", description="Zero-shot and retrieval evaluation.")
    parser.add_argument("--model", help="open_clip architecture (recipe key model.name)")
    parser.add_argument("--pretrained", help="weights: tag, file, HF-style folder, hf-hub:org/name or dsclip run folder")
    parser.add_argument("--recipe", help="take model and eval sections from this recipe")
    parser.add_argument("--zeroshot", action="append", default=[], metavar="SOURCE[:PATH]",
                        help="zero-shot set: synthetic, fashion-mnist, folder:DIR or webdataset:PATTERN (repeatable)")
    parser.add_argument("--retrieval", action="append", default=[], metavar="SOURCE:PATH",
                        help="retrieval set: csv:FILE or webdataset:PATTERN (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=default_ds_config(),
                        help="DeepSpeed config; ZeRO-3 shards the weights over the ranks")
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here")
    parser.add_argument("--trust-checkpoint", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


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


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    overrides = list(args.overrides) + task_overrides("zeroshot", args.zeroshot) + \
        task_overrides("retrieval", args.retrieval)
    if args.model:
        overrides.append(f"model.name={args.model}")
    overrides += weight_overrides(args)
    return guarded(lambda: evaluate(args.recipe, overrides, args.deepspeed_config, args.out))


def evaluate(recipe: Optional[str], overrides: list[str], ds_config_path: str, out: Optional[Path]) -> int:
    from dsclip.engine import load_ds_config
    cfg = load_config(recipe, overrides)
    ds_config = load_ds_config(ds_config_path)
    import torch.distributed as dist

    from dsclip.engine import build_inference_engine, precision, resolve_ds_config, resolve_precision
    from dsclip.evaluation import build_evals, run_evals
    from dsclip.loss import build_loss
    from dsclip.model import build_model
    from dsclip.trainer import (configure_threads, init_distributed, quiet_libraries, recipe_values,
                                single_process_defaults)
    quiet_libraries()
    single_process_defaults()
    configure_threads()
    init_distributed()
    bundle = build_model(cfg.model)
    ds = resolve_precision(resolve_ds_config(ds_config, recipe_values(cfg, dist.get_world_size())))
    engine = build_inference_engine(bundle.module, ds)
    evals = build_evals(cfg.eval, bundle, cfg.data.synthetic, cfg.seed, build_loss(cfg.loss))
    metrics = run_evals(evals, engine, engine.device, precision(ds))
    if dist.get_rank() == 0:
        for key, value in metrics.items():
            print(f"{key}\t{value:.4f}")
        if out:
            out.write_text(json.dumps(metrics, indent=2))
    return 0
