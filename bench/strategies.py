"""Fine-tuning strategies side by side on real data: what each learns, what it forgets, what it costs.

    python bench/strategies.py            # about 15 minutes on 2 CPU cores

Stages, each a subprocess as a user would type it:
  1. `dsclip make-shards fashion-mnist` writes Fashion-MNIST training shards (Debian dataset-fashion-mnist).
  2. The default recipe (`deepspeed --num_gpus 2 dsclip/train.py`) trains the tiny CLIP on synthetic
     shapes: the "pretrained" model, which knows the shapes (no pretrained CLIP weights can be
     downloaded here).
  3. Each strategy fine-tunes that model on Fashion-MNIST with launch/recipes/wiseft_fashion.yaml's
     data, steps (160 of 2 x 64) and evaluations: fashion, zero-shot on 2000 test images (the task),
     and shapes (what the model knew; what it keeps is what it did not forget). The strategies: full,
     frozen image tower, LiT, LoRA rank 4 and 16, full with patch dropout 0.5, and the full run's
     WiSE-FT mix with the pretrained model at alpha 0.5 (`dsclip wise-ft --alphas 0.5`).
  4. Memory at scale: ViT-B-32 from random init, one step on 2 ranks (ZeRO-3, fp32), full fine-tune
     against LoRA rank 16: params, grads and optimizer bytes per rank, as the run logs them; under the
     shipped config and with every parameter partitioned (`--memory-only` repeats just this part).
Per strategy: both zero-shot top-1s, trainable parameters, the optimizer's and the gradients' MB per
rank (rank 0, logged by the run after its first step), and the median samples/s over the logged
steps. Prints a table; writes bench/results/strategies.json and a plot of task against kept accuracy
(bench/results/strategies.png).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launch" / "recipes" / "wiseft_fashion.yaml"
sys.path.insert(0, str(REPO))

from dsclip.training.bootstrap import free_port  # noqa: E402

SHARDS = 12  # of 5000 samples: the 60k training images
# name -> recipe overrides on top of wiseft_fashion.yaml (its lr, 5e-4, unless set here)
STRATEGIES = {
    "full": [],
    "frozen image tower": ["freeze.strategy=frozen_image"],
    "LiT": ["freeze.strategy=lit"],
    "LoRA rank 4": ["adapters.kind=lora", "adapters.rank=4", "adapters.alpha=8", "optim.lr=1e-3"],
    "LoRA rank 16": ["adapters.kind=lora", "adapters.rank=16", "adapters.alpha=32", "optim.lr=1e-3"],
    "full, patch dropout 0.5": ["model.patch_dropout=0.5"],
}
WISE_FT = "full + WiSE-FT alpha 0.5"
MEMORY = {"full": [], "LoRA rank 16": STRATEGIES["LoRA rank 16"]}
TASK, KEPT = "eval/fashion/top1", "eval/shapes/top1"


def with_sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def launch(args: list[str], ds_config: str = "ds_configs/zero3.json") -> None:
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), "dsclip/train.py", "--deepspeed_config", ds_config, *args]
    print("==", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def dsclip(*args: str) -> None:
    print("== dsclip", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dsclip.cli", *args], cwd=REPO, check=True)


def read_run(run: Path) -> dict:
    """What a run logged: its last evaluation, the memory record after its first step, samples/s."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if TASK in r]
    memory = next(r for r in records if "mem/optimizer_mb" in r)
    speeds = [r["train/samples_per_s"] for r in records if "train/samples_per_s" in r]
    return {"first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
            "params_mb": memory["mem/params_mb"], "grads_mb": memory["mem/grads_mb"],
            "optimizer_mb": memory["mem/optimizer_mb"], "samples_per_s": statistics.median(speeds)}


def trainable_parameters(overrides: list[str]) -> tuple[int, int]:
    """(trainable, total) parameters of the model a strategy trains, as a run builds and freezes it."""
    import torch

    from dsclip.config import load_config
    from dsclip.model.adapters import adapted_towers
    from dsclip.model.build import build_model
    from dsclip.model.freeze import apply_freeze

    cfg = load_config(str(RECIPE), ["model.pretrained=null", *overrides])
    torch.manual_seed(cfg.seed)
    clip = build_model(cfg.model, adapters=cfg.adapters).module.clip
    apply_freeze(clip, cfg.freeze, adapted_towers(cfg.adapters))
    return (sum(p.numel() for p in clip.parameters() if p.requires_grad), sum(p.numel() for p in clip.parameters()))


def fine_tune(name: str, overrides: list[str], pretrained: Path, shards: Path, out: Path, at_start: bool) -> dict:
    run_name = "strategy-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    urls = f'data.webdataset.urls=["{shards}/shard-{{000000..{SHARDS - 1:06d}}}.tar"]'
    began = time.perf_counter()
    launch(["--recipe", str(RECIPE), "--output-dir", str(out), "--name", run_name, "--pretrained", str(pretrained),
            *with_sets([urls, f"eval.at_start={str(at_start).lower()}", *overrides])])
    row = {"strategy": name, "overrides": overrides, "run": str(out / run_name),
           "wall_s": time.perf_counter() - began, **read_run(out / run_name)}
    row["trainable"], row["total"] = trainable_parameters(overrides)
    row["task_top1"], row["kept_top1"] = row["last_eval"][TASK], row["last_eval"][KEPT]
    return row


def wise_ft_row(full: dict, pretrained: Path, out: Path) -> dict:
    report = out / "strategy-wise-ft"
    dsclip("wise-ft", "--zeroshot", str(pretrained), "--finetuned", str(Path(full["run"]) / "export"), "--alphas",
           "0.5", "--eval", str(RECIPE), "--report-dir", str(report))
    metrics = json.loads((report / "wise_ft.json").read_text())["rows"][0]["metrics"]
    keep = ("trainable", "total", "params_mb", "grads_mb", "optimizer_mb", "samples_per_s")
    return {"strategy": WISE_FT, "run": str(report), **{k: full[k] for k in keep},
            "task_top1": metrics[TASK], "kept_top1": metrics[KEPT]}


def memory_rows(out: Path) -> list[dict]:
    """Full and LoRA rank 16 under the shipped ZeRO-3 config, and with every parameter partitioned
    (stage3_param_persistence_threshold 0): the shipped config keeps parameters below 100000 elements,
    every adapter matrix among them, whole on every rank beside their shard."""
    shipped = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    rows = []
    for threshold in (shipped["zero_optimization"]["stage3_param_persistence_threshold"], 0):
        config = out / f"zero3-persistence-{threshold}.json"
        config.write_text(json.dumps({**shipped, "zero_optimization": {
            **shipped["zero_optimization"], "stage3_param_persistence_threshold": threshold}}))
        pair = []
        for name, overrides in MEMORY.items():
            run_name = f"memory-{'lora' if overrides else 'full'}-{threshold}"
            launch(["--output-dir", str(out), "--name", run_name, *with_sets([
                "model.name=ViT-B-32", "data.batch_size=2", "data.synthetic.train_samples=64", "train.max_steps=1",
                "optim.warmup_steps=0", "eval.at_start=false", "eval.at_end=false", "eval.zeroshot=[]",
                "train.export=false", "logging.log_every=1", "logging.plots=false", *overrides])],
                   ds_config=str(config))
            pair.append({"strategy": name, "persistence_threshold": threshold, **read_run(out / run_name)})
            shutil.rmtree(out / run_name / "checkpoints")  # a ViT-B-32 optimizer state is gigabytes
        full, lora = pair
        lora["grads_optimizer_vs_full"] = ((lora["grads_mb"] + lora["optimizer_mb"])
                                           / (full["grads_mb"] + full["optimizer_mb"]))
        lora["adapter_params_mb"] = lora["params_mb"] - full["params_mb"]  # the frozen base is the same in both
        lora["trainable_state_vs_full"] = ((lora["adapter_params_mb"] + lora["grads_mb"] + lora["optimizer_mb"])
                                           / (full["grads_mb"] + full["optimizer_mb"]))
        rows += pair
    return rows


def plot(rows: list[dict], pretrained: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[float, float], list[str]] = {}  # strategies that ended at the same point share it
    for row in rows:
        points.setdefault((row["task_top1"], row["kept_top1"]), []).append(row["strategy"])
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter([pretrained[TASK]], [pretrained[KEPT]], marker="*", s=160, color="black", label="pretrained")
    for (task, kept), names in points.items():
        ax.scatter([task], [kept], s=50, label=" = ".join(names))
    ax.set_xlabel("Fashion-MNIST zero-shot top-1 % (the task)")
    ax.set_ylabel("synthetic shapes zero-shot top-1 % (kept)")
    ax.set_title("dsclip-tiny fine-tuned on Fashion-MNIST, 160 steps of 2 x 64")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs", help="parent of run folders and shards")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "strategies.json")
    parser.add_argument("--memory-only", action="store_true", help="measure the ViT-B-32 memory part again and "
                        "replace it in --json, keeping the strategies measured before")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.memory_only:
        record = json.loads(args.json.read_text())
        record["memory"] = memory_rows(out)
        record["memory_date"] = time.strftime("%Y-%m-%d")
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print_memory(record["memory"])
        return 0
    record = {"date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()[0]}
    shards = out / "fashion-mnist-train"
    if not (shards / "manifest.json").is_file():
        dsclip("make-shards", "fashion-mnist", "--out", str(shards), "--split", "train", "--per-shard", "5000",
               "--format", "png")
    launch(["--output-dir", str(out), "--name", "strategy-pretrained"])
    pretrained = out / "strategy-pretrained" / "export"
    rows = []
    for name, overrides in STRATEGIES.items():
        rows.append(fine_tune(name, overrides, pretrained, shards, out, at_start=not rows))
        print(json.dumps({k: rows[-1][k] for k in ("strategy", "task_top1", "kept_top1", "trainable")}), flush=True)
    rows.insert(1, wise_ft_row(rows[0], pretrained, out))
    record["pretrained"] = {k: v for k, v in rows[0]["first_eval"].items() if k.startswith("eval/")}
    record["rows"] = [{k: v for k, v in r.items() if k not in ("first_eval", "last_eval")} for r in rows]
    record["memory"] = memory_rows(out)
    record["load_after"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    plot(record["rows"], record["pretrained"], args.json.with_suffix(".png"))

    print(f"\npretrained: fashion {record['pretrained'][TASK]:.1f}%, shapes {record['pretrained'][KEPT]:.1f}%")
    print(f"{'strategy':>26} {'fashion %':>9} {'shapes %':>9} {'trainable':>10} {'optim MB':>9} {'samples/s':>9}")
    for r in record["rows"]:
        print(f"{r['strategy']:>26} {r['task_top1']:>9.1f} {r['kept_top1']:>9.1f} {r['trainable']:>10,} "
              f"{r['optimizer_mb']:>9.2f} {r['samples_per_s']:>9.0f}")
    print_memory(record["memory"])
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


def print_memory(rows: list[dict]) -> None:
    for r in rows:
        print(f"ViT-B-32 {r['strategy']}, persistence threshold {r['persistence_threshold']}: params "
              f"{r['params_mb']:.1f} MiB, grads {r['grads_mb']:.1f} MiB, optimizer {r['optimizer_mb']:.1f} MiB per rank")
        if "trainable_state_vs_full" in r:
            print(f"  LoRA rank 16: grads + optimizer {r['grads_optimizer_vs_full']:.2%} of full's; with its adapter "
                  f"weights ({r['adapter_params_mb']:.1f} MiB) {r['trainable_state_vs_full']:.2%}")


if __name__ == "__main__":
    sys.exit(main())
