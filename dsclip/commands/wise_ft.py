"""`dsclip wise-ft`: evaluate WiSE-FT mixes of a zero-shot and a fine-tuned model over a range of
alphas and save the chosen one; one process (CPU, or one GPU when present)."""
import argparse
from pathlib import Path

from dsclip.commands.common import add_log_level, add_overrides, add_trust_checkpoint, guarded, weight_overrides
from dsclip.config import load_config
from dsclip.ensemble.config import DEFAULT_ALPHAS, WiseFtConfig, parse_alphas
from dsclip.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsclip wise-ft", description="WiSE-FT: evaluate (1 - alpha) * zero-shot + alpha * fine-tuned weights "
        "over a range of alphas and save the chosen mix as an open_clip model.")
    p.add_argument("--zeroshot", required=True, metavar="SOURCE", help="alpha = 0 weights: open_clip tag, "
                   "weights file, HF-style folder, hf-hub:org/name or dsclip run folder (as --pretrained)")
    p.add_argument("--finetuned", metavar="SOURCE", help="alpha = 1 weights (same kinds)")
    p.add_argument("--adapters", type=Path, metavar="FOLDER", help="LoRA adapters (an export's adapters/) merged "
                   "into the alpha = 1 end, which is then --finetuned or, without it, --zeroshot")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"start:stop:step (stop included), a comma "
                   f"list or one number; default {DEFAULT_ALPHAS}")
    p.add_argument("--eval", dest="recipe", metavar="RECIPE", help="recipe YAML whose model: section names the "
                   "architecture and whose eval: section the evals (eval.forgetting.general: the general ones); "
                   "default: the embedded default recipe")
    add_overrides(p)
    p.add_argument("--save-alpha", type=float, help="alpha whose weights are saved (one of --alphas); default: "
                   "the best mean of task and general score")
    p.add_argument("--out", type=Path, help="chosen weights: a folder ('local-dir:OUT') or a .bin/.pt/"
                   ".safetensors file; default REPORT_DIR/export")
    p.add_argument("--report-dir", type=Path, help="folder for wise_ft.md/.json/.png; default <run dir of the "
                   "recipe>/wise_ft")
    add_trust_checkpoint(p)
    add_log_level(p)
    return p


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not (args.finetuned or args.adapters):
        p.error("name the alpha = 1 end: --finetuned SOURCE, or --adapters FOLDER (merged into --zeroshot)")
    return guarded(args, lambda: wise_ft(args))


def wise_ft(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + weight_overrides(args)
    run_cfg = load_config(args.recipe, overrides)
    from dsclip.ensemble.wiseft import run_wise_ft, split_tasks
    try:
        cfg = WiseFtConfig(enabled=True, alphas=parse_alphas(args.alphas), save_alpha=args.save_alpha)
        cfg.validate()
        split_tasks(run_cfg.eval)
    except ValueError as e:
        raise ConfigError(str(e).replace("wise_ft.alphas", "--alphas").replace("wise_ft.save_alpha", "--save-alpha"))
    run_wise_ft(cfg, run_cfg, args.zeroshot, args.finetuned or args.zeroshot,
                args.report_dir or run_cfg.run_dir / "wise_ft", weights_out=args.out, adapters=(None, args.adapters))
    return 0
