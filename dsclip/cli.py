"""Command line: `dsclip <command>` and the training entry point used by dsclip/train.py."""
import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from dsclip.config import ConfigError, load_config
from dsclip.checkpoint import CheckpointError
from dsclip.engine import DeepSpeedConfigError, load_ds_config
from dsclip.pretrained import PretrainedError

DEFAULT_DS_CONFIG = "ds_configs/zero3.json"
REPO_DS_CONFIG = Path(__file__).resolve().parents[1] / DEFAULT_DS_CONFIG


def default_ds_config() -> str:
    """ds_configs/zero3.json of the working directory, else the checkout dsclip runs from."""
    return DEFAULT_DS_CONFIG if Path(DEFAULT_DS_CONFIG).is_file() or not REPO_DS_CONFIG.is_file() \
        else str(REPO_DS_CONFIG)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsclip train", description="Fine-tune a CLIP model with DeepSpeed.")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        default=default_ds_config(), help="DeepSpeed engine config (JSON; 'auto' fields come from "
                        f"the recipe); default {DEFAULT_DS_CONFIG}")
    parser.add_argument("--recipe", help="run recipe (YAML); default: the embedded synthetic-shapes run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set optim.lr=1e-5 (repeatable)")
    parser.add_argument("--output-dir", help="parent folder of run folders (recipe key output_dir)")
    parser.add_argument("--name", help="run name; outputs go to <output-dir>/<name> (recipe key name)")
    parser.add_argument("--pretrained", metavar="SOURCE", help="initial weights (recipe key model.pretrained): "
                        "open_clip tag, weights file, HF-style folder, hf-hub:org/name or a dsclip run folder; "
                        "a new schedule from step 0")
    parser.add_argument("--resume", metavar="latest|PATH", help="continue a run exactly: model, optimizer, schedule, "
                        "step, data position and RNG from 'latest' (this run's newest checkpoint) or a step-N folder")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled weight files that can run "
                        "code when loaded (recipe key model.trust_checkpoint)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def train_main(argv: Optional[list[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.name:
        overrides.append(f"name={args.name}")
    overrides += weight_overrides(args)
    return guarded(lambda: _train(args.recipe, overrides, args.deepspeed_config, args.resume))


def weight_overrides(args: argparse.Namespace) -> list[str]:
    """Recipe overrides for the shared weight flags (--pretrained, --trust-checkpoint)."""
    overrides = [f"model.pretrained={args.pretrained}"] if args.pretrained else []
    return overrides + (["model.trust_checkpoint=true"] if args.trust_checkpoint else [])


def _train(recipe: Optional[str], overrides: list[str], ds_config_path: str, resume: Optional[str]) -> int:
    cfg = load_config(recipe, overrides)
    ds_config = load_ds_config(ds_config_path)
    from dsclip.trainer import run  # heavy imports only once the inputs are known to be good
    run(cfg, ds_config, resume)
    return 0


def guarded(command: Callable[[], int]) -> int:
    """Run a command; a user error becomes one line on stderr (from one rank) and exit status 2."""
    try:
        return command()
    except (ConfigError, DeepSpeedConfigError, CheckpointError, PretrainedError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"dsclip: error: {e}", file=sys.stderr)
        return 2


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsclip export",
                                     description="Merge a DeepSpeed checkpoint into weights plain open_clip loads.")
    parser.add_argument("ckpt", help="a run folder (its latest checkpoint), its checkpoints/ folder, or a step-N folder")
    parser.add_argument("--out", type=Path, help="a folder (open_clip HF layout, loadable as 'local-dir:OUT') or a "
                        "weights file (.bin/.pt/.safetensors, config beside it as .json); default <run>/export")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="tensor dtype (default fp32)")
    parser.add_argument("--safetensors", action="store_true", help="write safetensors instead of a torch pickle")
    args = parser.parse_args(argv)
    return guarded(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    import torch

    from dsclip.checkpoint import export_model, resolve_checkpoint, run_config_of
    root, tag = resolve_checkpoint(args.ckpt, Path(args.ckpt) / "checkpoints")
    cfg = run_config_of(root, tag)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    weights = export_model(root, tag, cfg.model, args.out or root.parent / "export", dtype, args.safetensors)
    print(f"exported {root / tag} to {weights}")
    return 0


def make_shards_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsclip make-shards",
                                     description="Write WebDataset shards + manifest.json from a local source.")
    parser.add_argument("src", help="a .csv/.tsv file, an image folder (one subfolder per class), "
                        "'fashion-mnist' or 'openclipart' (Debian packages)")
    parser.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and manifest.json")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--image-size", type=int, default=0, help="resize the shorter side to this; 0 keeps it")
    parser.add_argument("--split", choices=["train", "test"], default="train", help="split of fashion-mnist")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image encoding in the shards")
    parser.add_argument("--image-column", default="filepath", help="CSV column with image paths")
    parser.add_argument("--caption-column", default="title", help="CSV column with captions")
    parser.add_argument("--limit", type=int, default=0, help="write only the first N samples (0 = all)")
    args = parser.parse_args(argv)
    return guarded(lambda: _make_shards(args))


def _make_shards(args: argparse.Namespace) -> int:
    from dsclip.shards import FirstSamples, open_source, write_shards
    source = open_source(args.src, split=args.split, image_column=args.image_column,
                         caption_column=args.caption_column)
    if args.limit:
        source = FirstSamples(source, args.limit)
    manifest = write_shards(source, args.out, per_shard=args.per_shard, image_size=args.image_size,
                            image_format=args.format)
    print(f"wrote {len(manifest['shards'])} shards, {manifest['total']} samples, to {args.out}")
    return 0


def eval_main(argv: list[str]) -> int:
    from dsclip.eval_run import eval_main as run_eval_command
    return run_eval_command(argv)


def wiseft_command(argv: list[str]) -> int:
    from dsclip.wiseft import wiseft_main
    return wiseft_main(argv)


COMMANDS = {
    "train": train_main,
    "eval": eval_main,
    "export": export_main,
    "make-shards": make_shards_main,
    "wise-ft": wiseft_command,
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: dsclip {{{','.join(COMMANDS)}}} ...\n"
              "  train        fine-tune in this process (multi-rank: deepspeed dsclip/train.py ...)\n"
              "  eval         zero-shot / retrieval evaluation of a model (also under torchrun, ZeRO-3)\n"
              "  export       merge a DeepSpeed checkpoint into an open_clip model folder\n"
              "  wise-ft      mix zero-shot and fine-tuned weights over alphas (WiSE-FT), evaluate, save the chosen mix\n"
              "  make-shards  write WebDataset shards from a CSV, image folder, fashion-mnist or openclipart",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
