"""`dsclip export`: merge a run's DeepSpeed checkpoint into weights plain open_clip loads."""
import argparse
import logging
from pathlib import Path
from typing import Optional

from dsclip.commands.common import add_log_level, add_trust_checkpoint, guarded
from dsclip.training.config import EXPORT_FORMATS, TRANSFORMERS

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsclip export",
                                description="Merge a DeepSpeed checkpoint into weights plain open_clip loads.")
    p.add_argument("ckpt", help="a run folder (its latest checkpoint), its checkpoints/ folder, or a step-N folder")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors", help="safetensors (default) or bin: open_clip's "
                   "layout, a LoRA run's adapters beside it in adapters/; transformers: a folder CLIPModel and "
                   "CLIPProcessor load (from_pretrained)")
    p.add_argument("--out", type=Path, help="a folder (open_clip's HF layout, loadable as 'local-dir:OUT'; for "
                   "transformers the model folder) or, for open_clip's layout, a weights file (.safetensors/.bin/.pt, "
                   "config beside it as .json); default <run>/export, <run>/export-transformers for transformers")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="tensor dtype (default fp32)")
    p.add_argument("--safetensors", action="store_true", help=argparse.SUPPRESS)  # the default since safetensors became it
    add_trust_checkpoint(p)
    add_log_level(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return guarded(args, lambda: export(args))


def check_out(fmt: str, out: Optional[Path]) -> None:
    """A weights-file --out must name the format asked for: its suffix decides what is written."""
    from dsclip.errors import ConfigError
    from dsclip.model.weights import WEIGHT_SUFFIXES
    if out is None or out.suffix not in WEIGHT_SUFFIXES:
        return
    wanted = {TRANSFORMERS: None, "safetensors": (".safetensors",), "bin": (".bin", ".pt", ".pth")}[fmt]
    if wanted is None or out.suffix not in wanted:
        fix = "a folder" if wanted is None else " or ".join(f"a {s} file" for s in wanted) + " or a folder"
        raise ConfigError(f"--out {out} is a {out.suffix} file but --format is {fmt}: give {fix}")


def export(args: argparse.Namespace) -> int:
    from dsclip.model.run_folder import CHECKPOINTS, resolve_checkpoint
    from dsclip.training.checkpoint import run_config_of
    from dsclip.training.export import DTYPES, export_checkpoint

    if args.safetensors:
        log.warning("--safetensors is no longer needed: safetensors is the default format")
    check_out(args.format, args.out)
    root, tag = resolve_checkpoint(args.ckpt, Path(args.ckpt) / CHECKPOINTS)
    cfg = run_config_of(root, tag, args.trust_checkpoint)
    out = args.out or root.parent / ("export-transformers" if args.format == TRANSFORMERS else "export")
    log.info("merging the ZeRO shards of %s", root / tag)
    written = export_checkpoint(root, tag, cfg.model, {args.format: out}, DTYPES[args.dtype], args.trust_checkpoint,
                                cfg.adapters)
    log.info("exported %s to %s", root / tag, written[0])
    return 0
