"""Input pipeline throughput: dsclip's shard loader against a plain torchvision ImageFolder loader and
against webdataset's own documented pipeline, over the same images, with 0, 1 and 2 workers; and
where dsclip's loader spends its time, stage by stage. Prints tables and writes JSON.

    python bench/data.py                    # writes bench/results/data_cpu.json (about 8 minutes on 2 cores)
    python bench/data.py --json ""          # tables only
    python bench/data.py --quick            # a quarter of the images, tables only

Cases (JPEGs of smooth colour fields plus grain, quality 90, 10 classes; model input 64 px):
  default: 4096 images of 128 px;   large source: 1024 images of 512 px.
Shards are written by dsclip.data.shard_writer (as `dsclip make-shards` does: the JPEG bytes copied).
Every loader applies open_clip's training transform (RandomResizedCrop, ToTensor, Normalize) and
makes batches of 64; dsclip's and webdataset's also tokenize the captions (ImageFolder has none),
webdataset per sample as open_clip's training script does, dsclip per batch. A pass is one epoch,
worker start-up included. Every (loader, workers) pass runs --repeats times, the loaders taking
turns, and the median rate is reported (all passes are in the JSON): a shared machine's speed
drifts by up to a third from one pass to the next, and taking turns spreads the drift over the
loaders alike.
"""
import argparse
import datetime
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from dsclip.data.config import WebDataConfig
from dsclip.data.decode import ImageDecoder, seeded
from dsclip.data.images import open_image
from dsclip.data.shard_writer import write_shards
from dsclip.data.shards import WebLoader, build_webdataset_loader, expand_urls, tar_members
from dsclip.data.sources import open_source

# 8 shards: with 2 workers each reads 4, and every worker's share is whole batches (none decoded for nothing).
CASES = {"default": {"images": 4096, "source_size": 128}, "large source": {"images": 1024, "source_size": 512}}
LOADERS = ("dsclip shard loader", "dsclip, reduced decode off", "webdataset pipeline", "torchvision ImageFolder")


def make_images(root: Path, n: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(size)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size),
                                                                                                   Image.BICUBIC))
        grain = rng.integers(-8, 8, smooth.shape)  # photo-like: JPEG sizes and decode costs are realistic
        Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def rate(loader: Iterable) -> tuple[float, int]:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += batch[0].shape[0]
    return images / (time.perf_counter() - start), images


def webdataset_pipeline(urls: str, transform: Callable, tokenizer: Callable, batch_size: int, workers: int):
    """webdataset's documented training pipeline, as open_clip's training script builds it."""
    dataset = (wds.WebDataset(urls, shardshuffle=100, nodesplitter=wds.single_node_only)
               .shuffle(1000)
               .decode("pilrgb")
               .to_tuple("jpg;png;webp", "txt")
               .map_tuple(transform, lambda text: tokenizer(text)[0])
               .batched(batch_size, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def finished(loader: WebLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """dsclip's batches as the model takes them, finished on the CPU as a CPU run finishes them (a
    run on GPUs finishes them on the device)."""
    for images, tokens in loader:
        yield loader.finish(images), tokens


def loaders(name: str, folder: Path, urls: str, transform: Callable, tokenizer: Callable, batch_size: int,
            workers: int) -> Iterable:
    if name == "torchvision ImageFolder":
        return DataLoader(ImageFolder(str(folder), transform=transform), batch_size=batch_size, shuffle=True,
                          drop_last=True, num_workers=workers)
    if name == "webdataset pipeline":
        return webdataset_pipeline(urls, transform, tokenizer, batch_size, workers)
    return finished(build_webdataset_loader(WebDataConfig(urls=[urls]), transform=transform, tokenizer=tokenizer,
                                            batch_size=batch_size, num_workers=workers,
                                            reduced_decode=name == "dsclip shard loader"))


def stage_seconds(urls: str, transform: Callable, tokenizer: Callable, batch_size: int) -> dict[str, float]:
    """Milliseconds per 1000 images in each stage of dsclip's loader, run one stage at a time in this
    process: read (tar members grouped into samples), decode (the crop drawn, the JPEG decoded,
    reduced where it can be), crop (resampled to the model's size, as uint8), tokenize (per batch),
    collate + normalize (a batch stacked, converted and normalised at once)."""
    decoder, clock, seconds = ImageDecoder(transform), time.perf_counter, {}
    start = clock()
    samples = []
    for url in expand_urls(urls):
        with open(url, "rb") as stream:
            samples += list(wds.tariterators.group_by_keys(tar_members(stream, url, 1 << 28)))
    seconds["read"] = clock() - start
    start = clock()
    decoded = []
    for index, sample in enumerate(samples):
        with open_image(io.BytesIO(sample["jpg"])) as image, seeded(index):
            decoded.append(decoder.decode(image))
    seconds["decode"] = clock() - start
    start = clock()
    crops = [torch.from_numpy(np.array(decoder.resample(*item))) for item in decoded]
    seconds["crop"] = clock() - start
    batches = range(0, len(samples) - batch_size + 1, batch_size)
    captions = [sample["txt"].decode() for sample in samples]
    start = clock()
    for first in batches:
        tokenizer(captions[first:first + batch_size])
    seconds["tokenize"] = clock() - start
    start = clock()
    for first in batches:
        decoder.finish(decoder.collate(crops[first:first + batch_size]))
    seconds["collate + normalize"] = clock() - start
    return {stage: 1e6 * value / len(samples) for stage, value in seconds.items()}  # ms per 1000 images


def run_case(case: str, images: int, source_size: int, args: argparse.Namespace, root: Path) -> dict:
    transform = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    folder, shards = root / "folder", root / "shards"
    make_images(folder, images, source_size)
    write_shards(open_source(str(folder)), str(shards), per_shard=images // 8)
    urls = str(shards / "shard-{000000..000007}.tar")
    passes = {name: {str(workers): [] for workers in args.workers} for name in LOADERS}
    for repeat in range(args.repeats):
        for workers in args.workers:
            for name in LOADERS:
                images_per_s, _ = rate(loaders(name, folder, urls, transform, tokenizer, args.batch_size, workers))
                passes[name][str(workers)].append(images_per_s)
                print(f"{case:13} pass {repeat + 1}/{args.repeats} {name:28} {workers} workers "
                      f"{images_per_s:7.0f} images/s", flush=True)
    rates = {name: {w: statistics.median(runs) for w, runs in by_workers.items()} for name, by_workers in passes.items()}
    ours = rates["dsclip shard loader"]
    return {"images": images, "source_size": source_size, "images_per_s": rates, "images_per_s_passes": passes,
            "vs_imagefolder": {w: ours[w] / rates["torchvision ImageFolder"][w] for w in ours},
            "vs_webdataset": {w: ours[w] / rates["webdataset pipeline"][w] for w in ours},
            "stage_ms_per_1000": stage_seconds(urls, transform, tokenizer, args.batch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64, help="model input size (open_clip train transform)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="passes per (loader, workers); the median is reported")
    parser.add_argument("--quick", action="store_true", help="a quarter of the images, one pass each (a smoke run; no JSON)")
    parser.add_argument("--json", default="bench/results/data_cpu.json", help="write results here as JSON ('' = don't)")
    args = parser.parse_args()
    if args.quick:
        args.json, args.repeats = "", 1
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    cases = {}
    for case, shape in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            images = shape["images"] // 4 if args.quick else shape["images"]
            cases[case] = run_case(case, images, shape["source_size"], args, Path(tmp))
    load_after = os.getloadavg()
    for case, result in cases.items():
        print(f"\n{case}: {result['images']} JPEGs of {result['source_size']} px -> {args.image_size} px (images/s, median of {args.repeats} passes)")
        print(f"{'loader':30}" + "".join(f"{w:>10} w" for w in args.workers))
        for name, by_workers in result["images_per_s"].items():
            print(f"{name:30}" + "".join(f"{by_workers[str(w)]:>12.0f}" for w in args.workers))
        print("dsclip / ImageFolder: " + " ".join(f"{v:.2f}x" for v in result["vs_imagefolder"].values()) +
              "   dsclip / webdataset: " + " ".join(f"{v:.2f}x" for v in result["vs_webdataset"].values()))
        print("ms per 1000 images, by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in result["stage_ms_per_1000"].items()))
    print(f"1/5/15-minute load average before {load_before}, after {load_after}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
            "load_before": load_before, "load_after": load_after, "cases": cases}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
