"""The default run (README command 1) against bench/train.py's ZeRO-3 step at the same batch, in one run.

    python bench/default_run.py                 # 2 interleaved repeats; writes bench/results/default_run.json
    python bench/default_run.py --against REV   # also the default run of commit REV (a git worktree), interleaved

Each repeat runs, one after the other, on the same machine:
  bench     `python bench/train.py --systems zero3 --ranks 2 --batch-size 64`: dsclip's Trainer step
            under ZeRO-3 on pre-rendered batches, timed step by step (its samples/s: median of windows)
  default   `deepspeed --num_gpus 2 dsclip/train.py --deepspeed_config ds_configs/zero3.json`: the README's
            command, everything included (launcher, imports, data, evaluations, checkpoint, export, plots)
The default run's samples/s is the median of the train/samples_per_s windows it logs to metrics.jsonl
(every 10 steps), leaving out the first window, which holds the one-time rendering of the epoch's images
(its time is in the wall time). Prints a table with the ratio and writes JSON.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsclip import metric_keys as keys  # noqa: E402
from dsclip.training.bootstrap import free_port  # noqa: E402


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def bench_zero3(tmp: Path) -> dict:
    out = tmp / "bench.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), "--systems", "zero3", "--ranks", "2",
                    "--batch-size", "64", "--json", str(out)], cwd=REPO, env=clean_env(), check=True,
                   stdout=subprocess.DEVNULL)
    row = json.loads(out.read_text())["rows"][0]
    return {"samples_per_s": row["samples_per_s"], "window_samples_per_s": row["window_samples_per_s"]}


def default_run(tmp: Path, tree: Path = REPO) -> dict:
    """The README's command in the checkout `tree` (its own dsclip first on the path)."""
    out = tmp / "runs"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                    str(free_port()), "dsclip/train.py", "--deepspeed_config", "ds_configs/zero3.json",
                    "--output-dir", str(out)], cwd=tree, env={**clean_env(), "PYTHONPATH": str(tree)}, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "default" / "metrics.jsonl").read_text().splitlines()]
    windows = [r[keys.TRAIN_SAMPLES_PER_S] for r in records if keys.TRAIN_SAMPLES_PER_S in r]
    top1 = [r[keys.eval_key("synthetic", keys.TOP1)] for r in records if keys.eval_key("synthetic", keys.TOP1) in r]
    shutil.rmtree(out)
    return {"wall_s": wall, "window_samples_per_s": windows, "samples_per_s": statistics.median(windows[1:]),
            "zeroshot_top1_before": top1[0], "zeroshot_top1_after": top1[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "default_run.json")
    parser.add_argument("--against", metavar="REV", help="also time the default run of this commit, interleaved")
    args = parser.parse_args()
    repeats = []
    with tempfile.TemporaryDirectory() as tmp:
        earlier = Path(tmp) / "earlier"
        if args.against:
            subprocess.run(["git", "worktree", "add", "--detach", str(earlier), args.against], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL)
        for i in range(args.repeats):
            bench = bench_zero3(Path(tmp))
            default = default_run(Path(tmp))
            repeats.append({"bench_zero3": bench, "default_run": default,
                            "ratio": default["samples_per_s"] / bench["samples_per_s"]})
            if args.against:
                then = default_run(Path(tmp), earlier)
                repeats[-1]["against"] = {"rev": args.against, "default_run": then,
                                          "ratio": default["samples_per_s"] / then["samples_per_s"]}
                print(f"repeat {i + 1}: default run now {default['samples_per_s']:.0f} samples/s, at {args.against} "
                      f"{then['samples_per_s']:.0f} samples/s ({repeats[-1]['against']['ratio']:.2f}x)", flush=True)
            print(f"repeat {i + 1}: bench ZeRO-3 {bench['samples_per_s']:.0f} samples/s, default run "
                  f"{default['samples_per_s']:.0f} samples/s ({repeats[-1]['ratio']:.2f}x), wall "
                  f"{default['wall_s']:.0f} s, zero-shot {default['zeroshot_top1_before']:.1f}% -> "
                  f"{default['zeroshot_top1_after']:.1f}%", flush=True)
        if args.against:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=REPO, check=True)
    ratios = [r["ratio"] for r in repeats]
    summary = {"ratio_median": statistics.median(ratios), "wall_s_median": statistics.median(
        r["default_run"]["wall_s"] for r in repeats), "load_after": os.getloadavg()[0]}
    if args.against:
        summary["against"] = {"rev": args.against,
                              "ratio_median": statistics.median(r["against"]["ratio"] for r in repeats)}
        print(f"default run now vs {args.against}: {summary['against']['ratio_median']:.2f}x samples/s (median)")
    print("\n| | samples/s (2 ranks, 64 per rank) | vs bench ZeRO-3 | wall s | zero-shot top-1 |")
    print("|---|---:|---:|---:|---:|")
    for i, r in enumerate(repeats, 1):
        b, d = r["bench_zero3"], r["default_run"]
        print(f"| repeat {i}: bench/train.py zero3 | {b['samples_per_s']:.0f} | 1.00x | | |")
        print(f"| repeat {i}: default run | {d['samples_per_s']:.0f} | {r['ratio']:.2f}x | {d['wall_s']:.0f} | "
              f"{d['zeroshot_top1_before']:.2f}% -> {d['zeroshot_top1_after']:.2f}% |")
    print(f"\nmedian ratio {summary['ratio_median']:.2f}x, median wall time {summary['wall_s_median']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                     "repeats": repeats, **summary}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
