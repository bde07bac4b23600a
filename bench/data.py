"""Loader throughput: dsclip's WebDataset shard loader (0/1/2 workers) vs a plain torchvision ImageFolder loader
over the same JPEG images, both with open_clip's train transform. Prints a table and writes JSON.

    python bench/data.py                    # writes bench/results/data_cpu.json
    python bench/data.py --json ""          # table only
"""
import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from dsclip.data.config import WebDataConfig
from dsclip.data.shard_writer import write_shards
from dsclip.data.shards import build_webdataset_loader
from dsclip.data.sources import open_source


def make_images(root: Path, n: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)  # smooth-ish content so JPEG sizes are realistic
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


def throughput(loader) -> tuple[float, int]:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += batch[0].shape[0]
    return images / (time.perf_counter() - start), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=128, help="side of the stored JPEGs")
    parser.add_argument("--image-size", type=int, default=64, help="model input size (open_clip train transform)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", default="bench/results/data_cpu.json", help="write results here as JSON ('' = don't)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    transform = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "folder", args.images, args.source_size)
        write_shards(open_source(str(root / "folder")), str(root / "shards"), per_shard=250)
        n_shards = len(list((root / "shards").glob("shard-*.tar")))
        urls = str(root / "shards" / f"shard-{{000000..{n_shards - 1:06d}}}.tar")
        for workers in args.workers:
            loader = build_webdataset_loader(WebDataConfig(urls=[urls]), transform=transform, tokenizer=tokenizer,
                                             batch_size=args.batch_size, num_workers=workers)
            rate, n = throughput(loader)
            rows.append({"loader": "dsclip webdataset (+tokenize)", "workers": workers, "images": n, "images_per_s": rate})
        folder = ImageFolder(str(root / "folder"), transform=transform)
        for workers in args.workers:
            loader = DataLoader(folder, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers)
            rate, n = throughput(loader)
            rows.append({"loader": "torchvision ImageFolder", "workers": workers, "images": n, "images_per_s": rate})
    load_after = os.getloadavg()
    table = {}  # loader -> {workers: images/s}
    for r in rows:
        table.setdefault(r["loader"], {})[str(r["workers"])] = r["images_per_s"]
    print(f"{'loader':32} " + " ".join(f"{f'{w} workers':>10}" for w in args.workers) + "  (images/s)")
    for loader, rates in table.items():
        print(f"{loader:32} " + " ".join(f"{rates[str(w)]:>10.0f}" for w in args.workers))
    print(f"1/5/15-minute load average before {load_before}, after {load_after}")
    result = {"args": vars(args), "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
              "load_before": load_before, "load_after": load_after, "images_per_s": table, "results": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
