"""dsclip's evaluation against LAION's CLIP_benchmark on the same sets and the same model.

    pip install --no-deps clip-benchmark==1.6.2     # its metrics and reader; the rest is in dsclip's venv
    python bench/standard_eval.py                  # about 2 minutes on 2 CPU cores

One run, these steps:
  1. the model: the default recipe trained 60 steps on 1 rank (a mid-range model, so that a
     disagreement shows), or --pretrained FOLDER (an open_clip export);
  2. `dsclip make-shards --layout clip_benchmark` writes three sets: Fashion-MNIST's test split
     (real images, the first 2000), 600 held-out synthetic shapes (an image folder) and a retrieval
     set of 120 of them with five captions each (a CSV, several rows per image);
  3. `dsclip eval` scores the model on the three (one process);
  4. CLIP_benchmark's own reader (build_wds_dataset) and metrics (zeroshot_classification /
     zeroshot_retrieval .evaluate) score the same model, loaded by open_clip, in this process.

Prints the metrics side by side and writes bench/results/standard_eval.json. CLIP_benchmark reports
fractions, dsclip percent; the table puts both in percent.
"""
import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsclip.data import synthetic  # noqa: E402

HELD_OUT = synthetic.EVAL_SEED_OFFSET + 101  # a seed range neither training nor dsclip's synthetic eval draws
# Five captions per image; the number keeps every caption distinct (exact ties would be ordered
# differently by the two tools: dsclip counts a tie against the correct item, topk picks either).
CAPTION_FORMS = ("a {name} number {i}", "picture {i}: a {name}", "a photo of a {name} (item {i})",
                 "the {name} in image {i}", "{i}. a drawing of a {name}")
# dsclip metric -> CLIP_benchmark metric (its names: image retrieval = text to image)
CLASSIFICATION = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}
RETRIEVAL = {f"{ours}_R@{k}": f"{theirs}_retrieval_recall@{k}" for k in (1, 5, 10)
             for ours, theirs in (("image_to_text", "text"), ("text_to_image", "image"))}


def run(command: list[str]) -> None:
    print("==", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def dsclip_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsclip.cli", *args]


def train_model(out: Path) -> Path:
    run(dsclip_command("train", "--deepspeed_config", "ds_configs/zero3.json", "--output-dir", str(out),
                       "--set", "train.max_steps=60", "--set", "optim.warmup_steps=10",
                       "--set", "eval.at_start=false", "--set", "eval.at_end=false"))
    return out / "default" / "export"


def write_sources(folder: Path, count: int, captioned: int) -> tuple[Path, Path]:
    """`count` held-out shapes (64 px) as an image folder (class subfolders), the first `captioned`
    of them as a CSV with five captions per image."""
    names = synthetic.class_names(12)
    classes, images = folder / "classes", folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, _, label = synthetic.render_sample(HELD_OUT, i, len(names), 64)
        (classes / names[label]).mkdir(parents=True, exist_ok=True)
        image.save(classes / names[label] / f"{i}.png")
        image.save(images / f"{i}.png")
        if i < captioned:
            rows += [(images / f"{i}.png", form.format(name=names[label], i=i)) for form in CAPTION_FORMS]
    csv = folder / "captions.csv"
    csv.write_text("filepath,title\n" + "".join(f"{path},{caption}\n" for path, caption in rows))
    return classes, csv


def make_sets(folder: Path, count: int, captioned: int) -> dict[str, Path]:
    classes, captions = write_sources(folder / "sources", count, captioned)
    sets = {"fashion": folder / "wds_fashion", "shapes": folder / "wds_shapes", "captions": folder / "wds_captions"}
    for source, target, extra in (("fashion-mnist", sets["fashion"], ["--limit", "2000"]),
                                  (str(classes), sets["shapes"], []), (str(captions), sets["captions"], [])):
        run(dsclip_command("make-shards", source, "--out", str(target), "--layout", "clip_benchmark",
                           "--split", "test", "--format", "png", *extra))
    return sets


def dsclip_metrics(export: Path, sets: dict[str, Path], out: Path) -> tuple[dict[str, float], float]:
    began = time.perf_counter()
    run(dsclip_command("eval", "--pretrained", str(export), "--zeroshot", f"clip_benchmark:{sets['fashion']}",
                       "--zeroshot", f"clip_benchmark:{sets['shapes']}",
                       "--retrieval", f"clip_benchmark:{sets['captions']}", "--out", str(out)))
    return json.loads(out.read_text()), time.perf_counter() - began


def patch_clip_benchmark_accuracy() -> None:
    """clip-benchmark 1.6.2's accuracy() calls float() on a one-element array, which numpy 2 refuses:
    the same top-k fractions, computed in torch."""
    from clip_benchmark.metrics import zeroshot_classification

    def accuracy(logits: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
        hits = logits.topk(max(topk), dim=1).indices == target[:, None]
        return [hits[:, :k].any(dim=1).double().mean().item() for k in topk]

    zeroshot_classification.accuracy = accuracy


def clip_benchmark_metrics(export: Path, sets: dict[str, Path]) -> tuple[dict[str, dict[str, float]], float]:
    from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    patch_clip_benchmark_accuracy()
    began = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    results = {}
    for name in ("fashion", "shapes"):
        dataset = build_wds_dataset(f"wds/{name}", preprocess, split="test", data_dir=str(sets[name]))
        loader = DataLoader(dataset.batched(128), batch_size=None)
        results[name] = zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates,
                                                         "cpu", amp=False)
    dataset = build_wds_dataset("wds/captions", preprocess, split="test", data_dir=str(sets["captions"]))
    loader = DataLoader(dataset.batched(128, collation_fn=image_captions_collate_fn), batch_size=None)
    results["captions"] = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False,
                                                      recall_k_list=[1, 5, 10])
    return results, time.perf_counter() - began


def side_by_side(ours: dict[str, float], theirs: dict[str, dict[str, float]], sets: dict[str, Path]) -> list[dict]:
    rows = []
    for name, mapping in (("fashion", CLASSIFICATION), ("shapes", CLASSIFICATION), ("captions", RETRIEVAL)):
        task = sets[name].name
        for metric, their_metric in mapping.items():
            dsclip_value, reference = ours[f"eval/{task}/{metric}"], 100 * theirs[name][their_metric]
            rows.append({"set": task, "metric": metric, "clip_benchmark_metric": their_metric,
                         "dsclip": dsclip_value, "clip_benchmark": reference, "difference": dsclip_value - reference})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-clip-benchmark", help="work folder")
    parser.add_argument("--pretrained", type=Path, help="an open_clip export folder (default: train one)")
    parser.add_argument("--shapes", type=int, default=600, help="held-out shape images to classify")
    parser.add_argument("--captioned", type=int, default=120, help="held-out shape images to retrieve (5 captions each)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    out = args.out.resolve()
    export = args.pretrained or train_model(out / "model")
    sets = make_sets(out / "sets", args.shapes, args.captioned)
    ours, dsclip_seconds = dsclip_metrics(export, sets, out / "dsclip_metrics.json")
    theirs, reference_seconds = clip_benchmark_metrics(export, sets)
    rows = side_by_side(ours, theirs, sets)
    print("| set | metric (dsclip / CLIP_benchmark) | dsclip | CLIP_benchmark | difference |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['set']} | {row['metric']} / {row['clip_benchmark_metric']} | {row['dsclip']:.2f} | "
              f"{row['clip_benchmark']:.2f} | {row['difference']:+.2g} |")
    print(f"seconds: dsclip eval {dsclip_seconds:.1f} (a process, its start included), "
          f"CLIP_benchmark {reference_seconds:.1f} (in this process)")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "standard_eval.json").write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "model": "trained here: default recipe, 60 steps" if args.pretrained is None else str(args.pretrained),
        "clip_benchmark_version": "1.6.2", "rows": rows,
        "seconds": {"dsclip_eval_process": round(dsclip_seconds, 1), "clip_benchmark": round(reference_seconds, 1)},
        "max_abs_difference": max(abs(row["difference"]) for row in rows),
        "images": {"fashion": 2000, "shapes": args.shapes, "captioned": args.captioned}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
