"""WiSE-FT end to end on real offline data, through dsclip's own commands.

    python bench/wiseft_example.py                  # the example in docs/evaluation.md: ~4 minutes on 2 CPU cores
    python bench/wiseft_example.py --quick --ranks 1  # the reduced version tests/test_wiseft.py runs

Stages (each a subprocess, as a user would type it):
  0. `dsclip make-shards fashion-mnist` writes Fashion-MNIST shards (Debian dataset-fashion-mnist).
  1. launch/recipes/wiseft_shapes.yaml trains the tiny CLIP from scratch on synthetic shapes: the
     zero-shot model (no pretrained CLIP weights can be downloaded here).
  2. launch/recipes/wiseft_fashion.yaml fine-tunes it on Fashion-MNIST (task) and evaluates
     shapes (general) before and after: fashion improves, shapes is forgotten.
  3. `dsclip wise-ft` sweeps alpha between the two exports.

Prints the sweep table and stage times; writes them as JSON (and copies the plot) to --results.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "launch" / "recipes"
sys.path.insert(0, str(REPO))

from dsclip.training.bootstrap import free_port  # noqa: E402

# The reduced run: fewer steps and evaluation images, the test split (10k) as training shards.
QUICK_EVAL = ["data.synthetic.eval_samples=256",
              "eval.zeroshot=[{name: fashion, source: fashion-mnist, max_samples: 500}, {name: shapes, source: synthetic}]"]
QUICK_SHAPES = ["train.max_steps=60", "optim.warmup_steps=10", "data.synthetic.eval_samples=256"]
QUICK_FASHION = ["train.max_steps=40", "optim.warmup_steps=5"] + QUICK_EVAL


def train_command(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "dsclip.cli", "train"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), "dsclip/train.py"]


def run_stage(name: str, command: list[str], timings: dict[str, float]) -> None:
    print(f"== {name}: {' '.join(command)}", flush=True)
    began = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    timings[name] = round(time.perf_counter() - began, 1)


def with_sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs", help="parent of run folders and shards")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results",
                        help="where wiseft_example.json and .png go")
    parser.add_argument("--ranks", type=int, default=2, help="training ranks (CPU processes); 1 = no launcher")
    parser.add_argument("--alphas", default="0:1:0.1")
    parser.add_argument("--quick", action="store_true", help="the reduced version (about 2 minutes)")
    args = parser.parse_args()
    out = args.out.resolve()
    split = "test" if args.quick else "train"
    shards = out / f"fashion-mnist-{split}"
    count = 2 if args.quick else 12  # shards of 5000 samples
    urls = f'data.webdataset.urls=["{shards}/shard-{{000000..{count - 1:06d}}}.tar"]'
    ds_config = ["--deepspeed_config", "ds_configs/zero3.json", "--output-dir", str(out)]
    timings: dict[str, float] = {}

    run_stage("make-shards", [sys.executable, "-m", "dsclip.cli", "make-shards", "fashion-mnist", "--out", str(shards),
                              "--split", split, "--per-shard", "5000", "--format", "png"], timings)
    run_stage("train zero-shot model (shapes)", train_command(args.ranks) + ds_config + [
        "--recipe", str(RECIPES / "wiseft_shapes.yaml")] + with_sets(QUICK_SHAPES if args.quick else []), timings)
    shapes_export = out / "wiseft_shapes" / "export"
    run_stage("fine-tune on Fashion-MNIST", train_command(args.ranks) + ds_config + [
        "--recipe", str(RECIPES / "wiseft_fashion.yaml"), "--pretrained", str(shapes_export)]
        + with_sets([urls] + (QUICK_FASHION if args.quick else [])), timings)
    fashion_run = out / "wiseft_fashion"
    report = fashion_run / "wise_ft"
    run_stage("wise-ft sweep", [sys.executable, "-m", "dsclip.cli", "wise-ft", "--zeroshot", str(shapes_export),
                                "--finetuned", str(fashion_run / "export"), "--alphas", args.alphas,
                                "--eval", str(RECIPES / "wiseft_fashion.yaml"), "--report-dir", str(report)]
              + with_sets(QUICK_EVAL if args.quick else []), timings)

    sweep = json.loads((report / "wise_ft.json").read_text())
    args.results.mkdir(parents=True, exist_ok=True)
    name = "wiseft_example_quick" if args.quick else "wiseft_example"
    (args.results / f"{name}.json").write_text(json.dumps({"quick": args.quick, "ranks": args.ranks,
                                                            "seconds": timings, "sweep": sweep}, indent=2) + "\n")
    shutil.copyfile(report / "wise_ft.png", args.results / f"{name}.png")
    print((report / "wise_ft.md").read_text())
    print("| stage | seconds |\n|---|---:|")
    for stage, seconds in timings.items():
        print(f"| {stage} | {seconds} |")
    print(f"| total | {sum(timings.values()):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
