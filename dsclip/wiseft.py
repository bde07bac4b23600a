"""WiSE-FT: robust fine-tuning by weight-space ensembling (Wortsman et al., 2022).

theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned, for every floating-point
tensor of two checkpoints of one architecture. Each alpha is evaluated on the recipe's evals
(task evals, and the general ones named in `eval.forgetting.general`); the result is a markdown
+ JSON table, a PNG plot and the chosen alpha's weights as an open_clip model.

Memory: the two endpoint state dicts and the one model being evaluated, whatever the number of
alphas. Each alpha is written into that model's tensors in place, one tensor at a time.
Integer and bool tensors (BatchNorm step counters, index buffers) are not interpolated: they are
copied from the nearer endpoint (alpha < 0.5: zero-shot, else fine-tuned), so that alpha = 0 and
alpha = 1 reproduce the two inputs exactly.
"""
import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from dsclip.checkpoint import write_open_clip
from dsclip.evaluation import EvalConfig, build_evals, rank_and_world, run_evals
from dsclip.loss import build_loss
from dsclip.model import build_model
from dsclip.pretrained import PretrainedError, load_into, read_source
from dsclip.resolution import fit_pos_embeds

if TYPE_CHECKING:  # config.py imports this module for WiseFtConfig
    from dsclip.config import RunConfig

log = logging.getLogger("dsclip")

DEFAULT_ALPHAS = "0:1:0.1"
MAX_LISTED = 5  # differences named in an error message before "... and N more"


def parse_alphas(text: str) -> list[float]:
    """'start:stop:step' (stop included), a comma list '0,0.5,1' or one number."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            count = (stop - start) / step if step > 0 else -1.0
            if count < 0 or abs(count - round(count)) > 1e-6:
                raise ValueError
            return [round(start + i * step, 10) for i in range(round(count) + 1)]
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"alphas {text!r}: expected start:stop:step (e.g. {DEFAULT_ALPHAS}, step > 0 dividing "
                         "stop - start), a comma list (0,0.5,1) or one number") from None


@dataclass
class WiseFtConfig:
    enabled: bool = False  # at the end of training, mix model.pretrained (alpha 0) with the fine-tuned weights (alpha 1)
    alphas: list[float] = field(default_factory=lambda: parse_alphas(DEFAULT_ALPHAS))  # weights of the fine-tuned model to evaluate, each in [0, 1]
    save_alpha: Optional[float] = None  # alpha whose weights are written to <run>/wise_ft/export; None = best mean of task and general score

    def validate(self) -> None:
        if not self.alphas:
            raise ValueError("wise_ft.alphas is empty: list at least one alpha in [0, 1], e.g. [0, 0.5, 1]")
        outside = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if outside:
            raise ValueError(f"wise_ft.alphas {outside} are outside [0, 1]: alpha 0 is the zero-shot model, "
                             "1 the fine-tuned one")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"wise_ft.alphas {self.alphas} lists an alpha twice")
        if self.save_alpha is not None and self.save_alpha not in self.alphas:
            raise ValueError(f"wise_ft.save_alpha={self.save_alpha} is not one of wise_ft.alphas {self.alphas}: "
                             "the saved weights must be ones that were evaluated")


class WiseFtError(PretrainedError):
    """The two weight sources cannot be mixed (different architectures)."""


# -- mixing ---------------------------------------------------------------------------------------
def layout(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{key: (shape, is floating point)}: what two mixable checkpoints must share."""
    return {key: (tuple(t.shape), t.is_floating_point()) for key, t in state_dict.items()}


def layout_differences(a: dict[str, tuple[tuple[int, ...], bool]],
                       b: dict[str, tuple[tuple[int, ...], bool]], names: tuple[str, str]) -> list[str]:
    """Human-readable differences between two layouts; empty when they can be mixed. A one-element
    tensor matches any one-element shape (open_clip's logit scale is 0-dim or (1,))."""
    def listed(keys: list[str]) -> str:
        more = f", ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
        return ", ".join(keys[:MAX_LISTED]) + more

    problems = []
    for name, own, other in ((names[0], a, b), (names[1], b, a)):
        only = sorted(set(own) - set(other))
        if only:
            problems.append(f"{len(only)} tensors only in {name} ({listed(only)})")
    shapes = [f"{key}: {a[key][0]} vs {b[key][0]}" for key in sorted(set(a) & set(b))
              if a[key][0] != b[key][0] and not (math.prod(a[key][0]) == math.prod(b[key][0]) == 1)]
    if shapes:
        problems.append(f"{len(shapes)} shape differences ({listed(shapes)})")
    kinds = [key for key in sorted(set(a) & set(b)) if a[key][1] != b[key][1]]
    if kinds:
        problems.append(f"{len(kinds)} tensors floating-point in one and integer in the other ({listed(kinds)})")
    return problems


def load_endpoint(clip: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`state_dict` in the model's own layout (conversions and position-embedding fit as for
    --pretrained), as a copy the sweep keeps; every model tensor must come from the source."""
    incompatible = load_into(clip, state_dict, source)
    if incompatible.missing_keys:
        raise WiseFtError(f"{source} lacks {len(incompatible.missing_keys)} tensors of this architecture "
                          f"({', '.join(incompatible.missing_keys[:MAX_LISTED])}): the mix would keep random values "
                          "for them; pass complete checkpoints of model.name")
    if incompatible.unexpected_keys:
        log.warning("WiSE-FT: %d tensors of %s are not used by the model: %s", len(incompatible.unexpected_keys),
                    source, ", ".join(incompatible.unexpected_keys[:MAX_LISTED]))
    return {key: tensor.detach().clone() for key, tensor in clip.state_dict().items()}


def load_endpoints(clip: nn.Module, model_name: str, zeroshot: str, finetuned: str,
                   trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both endpoints in the model's layout, after checking that they are one architecture.

    Position embeddings are fitted to the model before comparing, so a fine-tune at a new image
    size or context length still mixes with its zero-shot model. One raw source is held at a time.
    """
    raw = read_source(model_name, zeroshot, trust)
    zeroshot_layout = layout(fit_pos_embeds(raw, clip))
    start = load_endpoint(clip, raw, zeroshot)
    raw = read_source(model_name, finetuned, trust)
    problems = layout_differences(zeroshot_layout, layout(fit_pos_embeds(raw, clip)), ("zero-shot", "fine-tuned"))
    if problems:
        raise WiseFtError(f"zero-shot {zeroshot} and fine-tuned {finetuned} are different architectures: "
                          + "; ".join(problems) + ". WiSE-FT mixes two checkpoints of one architecture")
    end = load_endpoint(clip, raw, finetuned)
    different_ints = [k for k in start if not start[k].is_floating_point() and not torch.equal(start[k], end[k])]
    if different_ints:
        log.warning("WiSE-FT: integer tensors differ between the endpoints and are copied from the nearer one: %s",
                    ", ".join(different_ints[:MAX_LISTED]))
    return start, end


@torch.no_grad()
def mix_into(module: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> None:
    """Write (1 - alpha) * start + alpha * end into `module`'s own tensors, in place."""
    for key, target in module.state_dict().items():  # detached views sharing the parameters' storage
        if not target.is_floating_point():
            target.copy_(start[key] if alpha < 0.5 else end[key])
        elif alpha == 0.0:
            target.copy_(start[key])
        elif alpha == 1.0:
            target.copy_(end[key])
        else:  # one tensor's worth of temporaries at most, on the model's device
            torch.lerp(start[key].to(target), end[key].to(target), alpha, out=target)


# -- scoring and reports ----------------------------------------------------------------------------
def headline(metrics: dict[str, float], task: str) -> Optional[float]:
    """One number per eval task: zero-shot top-1, or the mean of the two retrieval R@1."""
    if f"eval/{task}/top1" in metrics:
        return metrics[f"eval/{task}/top1"]
    recalls = [metrics[k] for k in (f"eval/{task}/image_to_text_R@1", f"eval/{task}/text_to_image_R@1") if k in metrics]
    return sum(recalls) / len(recalls) if recalls else None


def mean_headline(metrics: dict[str, float], tasks: list[str]) -> Optional[float]:
    values = [v for v in (headline(metrics, t) for t in tasks) if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class SweepRow:
    alpha: float
    metrics: dict[str, float]
    task: Optional[float]  # mean headline metric of the task evals
    general: Optional[float]  # mean headline metric of the general evals

    @property
    def balance(self) -> float:
        """Mean of the task and general scores (those present): what the default choice maximises."""
        scores = [s for s in (self.task, self.general) if s is not None]
        return sum(scores) / len(scores) if scores else float("nan")


def choose_alpha(rows: list[SweepRow], save_alpha: Optional[float]) -> SweepRow:
    """The row of `save_alpha`, else the best balance (ties: the smaller alpha, nearer zero-shot)."""
    if save_alpha is not None:
        return next(row for row in rows if row.alpha == save_alpha)
    return max(sorted(rows, key=lambda r: r.alpha), key=lambda r: (-math.inf if math.isnan(r.balance) else r.balance))


def markdown_table(rows: list[SweepRow], task_names: list[str], general_names: list[str], chosen: float) -> str:
    def cell(value: Optional[float]) -> str:
        return "" if value is None else f"{value:.2f}"

    names = task_names + general_names
    header = ["alpha"] + [f"{n} (general)" if n in general_names else n for n in names] + ["task", "general", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    for row in rows:
        cells = [f"{row.alpha:g}"] + [cell(headline(row.metrics, n)) for n in names]
        cells += [cell(row.task), cell(row.general), "saved" if row.alpha == chosen else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[SweepRow], task_names: list[str], general_names: list[str], path: Path) -> None:
    """Left: each eval's headline metric vs alpha (general evals dashed). Right: task vs general
    score, one point per alpha (the WiSE-FT curve)."""
    alphas = [row.alpha for row in rows]
    figure = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for name in task_names + general_names:
        values = [headline(row.metrics, name) for row in rows]
        label = f"{name} (general)" if name in general_names else f"{name} (task)"
        left.plot(alphas, values, marker="o", linestyle="--" if name in general_names else "-", label=label)
    left.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    left.set_ylabel("top-1 / R@1 (%)")
    left.set_title("metric vs alpha")
    left.grid(alpha=0.3)
    left.legend()
    if task_names and general_names:
        ends = [min(rows, key=lambda r: r.alpha), max(rows, key=lambda r: r.alpha)]
        right.plot([r.general for r in ends], [r.task for r in ends], color="gray", linestyle=":",
                   label="straight line between the ends")
        right.plot([row.general for row in rows], [row.task for row in rows], marker="o", label="WiSE-FT")
        right.margins(0.08)
        right.legend()
        for row in rows:
            right.annotate(f"{row.alpha:g}", (row.general, row.task), textcoords="offset points", xytext=(4, 4))
        right.set_xlabel(f"general: {', '.join(general_names)} (%)")
        right.set_ylabel(f"task: {', '.join(task_names)} (%)")
        right.set_title("task vs general, labelled by alpha")
        right.grid(alpha=0.3)
    else:
        right.axis("off")
        right.text(0.5, 0.5, "name general evals in eval.forgetting.general\nfor the task vs general curve",
                   ha="center", va="center")
    figure.tight_layout()
    figure.savefig(path)


# -- the sweep --------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    rows: list[SweepRow]
    chosen: SweepRow
    weights: Optional[Path]  # the chosen alpha's open_clip weights (written by rank 0)
    report: Path  # folder with wise_ft.md, wise_ft.json, wise_ft.png


def sweep(module: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alphas: list[float],
          evaluate: Callable[[], dict[str, float]], task_names: list[str], general_names: list[str],
          on_row: Callable[[SweepRow], None] = lambda row: None) -> list[SweepRow]:
    """Evaluate the mix at every alpha (in the given order), reusing `module`'s storage."""
    rows = []
    for alpha in alphas:
        mix_into(module, start, end, alpha)
        metrics = evaluate()
        rows.append(SweepRow(alpha, metrics, mean_headline(metrics, task_names), mean_headline(metrics, general_names)))
        on_row(rows[-1])
    return rows


def split_tasks(cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(task eval names, general eval names) in recipe order."""
    names = [t.name for t in cfg.zeroshot] + [t.name for t in cfg.retrieval]
    if not names:
        raise ValueError("WiSE-FT needs evaluations: list eval.zeroshot or eval.retrieval tasks in the recipe")
    return [n for n in names if n not in cfg.forgetting.general], [n for n in names if n in cfg.forgetting.general]


def run_wise_ft(cfg: WiseFtConfig, run_cfg: "RunConfig", zeroshot: str, finetuned: str, out_dir: Path,
                weights_out: Optional[Path] = None, device: Optional[torch.device] = None) -> SweepResult:
    """Sweep `cfg.alphas` between two checkpoints of `run_cfg.model`'s architecture, evaluating
    `run_cfg.eval`; rank 0 writes the report to `out_dir` and the chosen weights to `weights_out`
    (default out_dir/export).

    Without torch.distributed this runs in one process. Under a process group every rank must
    call it (evaluation is sharded over the ranks in lockstep); each rank holds a full model.
    """
    cfg.validate()
    task_names, general_names = split_tasks(run_cfg.eval)
    rank, _ = rank_and_world()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = dataclasses.replace(run_cfg.model, pretrained=None, grad_checkpointing=False,
                                    activation_offload=False)
    bundle = build_model(model_cfg)
    clip = bundle.module.clip
    start, end = load_endpoints(clip, model_cfg.name, zeroshot, finetuned, run_cfg.model.trust_checkpoint)
    bundle.module.to(device)
    evals = build_evals(run_cfg.eval, bundle, run_cfg.data.synthetic, run_cfg.seed, build_loss(run_cfg.loss))

    def report(row: SweepRow) -> None:
        if rank == 0:
            shown = " ".join(f"{n}={headline(row.metrics, n):.2f}" for n in task_names + general_names)
            print(f"[dsclip] wise-ft alpha {row.alpha:g}: {shown}", flush=True)

    rows = sweep(clip, start, end, cfg.alphas,
                 lambda: run_evals(evals, bundle.module, device, torch.float32), task_names, general_names, report)
    chosen = choose_alpha(rows, cfg.save_alpha)
    weights = None
    if rank == 0:
        mix_into(clip, start, end, chosen.alpha)
        weights = write_open_clip({k: v.cpu() for k, v in clip.state_dict().items()}, model_cfg,
                                  weights_out or out_dir / "export")
        write_report(rows, chosen, task_names, general_names, out_dir,
                     {"zeroshot": zeroshot, "finetuned": finetuned, "weights": str(weights)})
        print(f"[dsclip] wise-ft: saved alpha {chosen.alpha:g} to {weights}; table, JSON and plot in {out_dir}",
              flush=True)
    if dist.is_initialized():
        dist.barrier()  # the weights exist before any rank moves on
    return SweepResult(rows, chosen, weights, out_dir)


def write_report(rows: list[SweepRow], chosen: SweepRow, task_names: list[str], general_names: list[str],
                 out_dir: Path, sources: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, task_names, general_names, chosen.alpha)
    (out_dir / "wise_ft.md").write_text(table)
    record = {**sources, "task_evals": task_names, "general_evals": general_names, "chosen_alpha": chosen.alpha,
              "rows": [dataclasses.asdict(row) for row in rows]}
    (out_dir / "wise_ft.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_sweep(rows, task_names, general_names, out_dir / "wise_ft.png")
    print(table, end="", flush=True)


# -- command line -----------------------------------------------------------------------------------
def wiseft_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsclip wise-ft", description="WiSE-FT: evaluate (1 - alpha) * zero-shot + alpha * fine-tuned weights "
        "over a range of alphas and save the chosen mix as an open_clip model.")
    parser.add_argument("--zeroshot", required=True, metavar="SOURCE", help="alpha = 0 weights: open_clip tag, "
                        "weights file, HF-style folder, hf-hub:org/name or dsclip run folder (as --pretrained)")
    parser.add_argument("--finetuned", required=True, metavar="SOURCE", help="alpha = 1 weights (same kinds)")
    parser.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"start:stop:step (stop included), a comma "
                        f"list or one number; default {DEFAULT_ALPHAS}")
    parser.add_argument("--eval", dest="recipe", metavar="RECIPE", help="recipe YAML whose model: section names the "
                        "architecture and whose eval: section the evals (eval.forgetting.general: the general ones); "
                        "default: the embedded default recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set 'eval.forgetting.general=[shapes]' (repeatable)")
    parser.add_argument("--save-alpha", type=float, help="alpha whose weights are saved (one of --alphas); default: "
                        "the best mean of task and general score")
    parser.add_argument("--out", type=Path, help="chosen weights: a folder ('local-dir:OUT') or a .bin/.pt/"
                        ".safetensors file; default REPORT_DIR/export")
    parser.add_argument("--report-dir", type=Path, help="folder for wise_ft.md/.json/.png; default <run dir of the "
                        "recipe>/wise_ft")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled weight files that can run "
                        "code when loaded")
    return parser


def wiseft_main(argv: list[str]) -> int:
    """`dsclip wise-ft`: one process (CPU, or one GPU when present)."""
    args = wiseft_parser().parse_args(argv)
    from dsclip.cli import guarded  # cli imports this module to register the command
    return guarded(lambda: _wise_ft(args))


def _wise_ft(args: argparse.Namespace) -> int:
    from dsclip.config import ConfigError, load_config
    overrides = list(args.overrides) + (["model.trust_checkpoint=true"] if args.trust_checkpoint else [])
    run_cfg = load_config(args.recipe, overrides)
    try:
        cfg = WiseFtConfig(enabled=True, alphas=parse_alphas(args.alphas), save_alpha=args.save_alpha)
        cfg.validate()
        split_tasks(run_cfg.eval)
    except ValueError as e:
        raise ConfigError(str(e).replace("wise_ft.alphas", "--alphas").replace("wise_ft.save_alpha", "--save-alpha"))
    run_wise_ft(cfg, run_cfg, args.zeroshot, args.finetuned, args.report_dir or run_cfg.run_dir / "wise_ft",
                weights_out=args.out)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(wiseft_main(sys.argv[1:]))
