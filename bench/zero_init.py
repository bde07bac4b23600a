"""Peak host memory per rank at start-up, with and without model.zero_init (deepspeed.zero.Init).

    python bench/zero_init.py                          # ViT-B-32 and ViT-L-14, random init, 2 CPU ranks
    python bench/zero_init.py --models ViT-B-32        # one model

Each (model, model.zero_init) pair runs in 2 fresh rank processes joined as one ZeRO-3 run
(ds_configs/zero3.json, fp32), built as dsclip/training/components.py builds a run: the model
(whole, or partitioned as it is constructed), then the DeepSpeed engine with dsclip's optimizer.
Each rank first does the same for dsclip-tiny, so that imports and first-call allocations are out
of the way, then resets its peak RSS (VmHWM) and measures the peak above that point after the model
and after the engine; the larger of the two ranks is reported. The collectives are a CPU run's
own: the shared-memory exchange maps one 64 MB buffer per node, which shows in every rank's RSS as
its pages are first touched; the pages a phase touched (RssShmem growth) are reported and taken off
the peak to give the rank's private peak, the figure the bound is for.

The bound zero.Init should meet: half of the model's fp32 bytes (each rank's share) plus its largest
parameter (a module's parameters exist whole until the module is constructed and partitioned). The
ViT-bigG-14 row is computed from its parameter count (meta device, nothing allocated), for a node of
8 ranks. Writes bench/results/zero_init.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsclip.config import load_config  # noqa: E402
from dsclip.model.build import create_clip  # noqa: E402
from dsclip.training import memory  # noqa: E402
from dsclip.training.bootstrap import free_port  # noqa: E402

MB = 2 ** 20
BIG = "ViT-bigG-14"
BIG_RANKS = 8  # ranks on one node of the computed row


def start_up(model: str, zero_init: bool, world: int) -> Iterator[str]:
    """The model and the engine, as a run builds them (components.build_run), random init."""
    from dsclip.training.ds_config import for_run, load_ds_config
    from dsclip.training.engine import build_engine, build_model_for

    cfg = load_config(None, [f"model.name={model}", f"model.zero_init={str(zero_init).lower()}", "data.batch_size=2"])
    ds = for_run(load_ds_config(str(REPO / "ds_configs" / "zero3.json")), cfg, world)
    torch.manual_seed(cfg.seed)
    bundle = build_model_for(cfg.model, ds)
    yield "model"
    build_engine(bundle.module, ds, cfg.optim, total_steps=10)
    yield "engine"


def _measure(rank: int, world: int, port: int, model: str, zero_init: bool, out: str) -> None:
    from dsclip.training.bootstrap import init_distributed, quiet_libraries
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    quiet_libraries()
    init_distributed()
    for _ in start_up("dsclip-tiny", zero_init, world):  # imports and first calls, not measured
        pass
    dist.barrier()
    base, shared = memory.reset_peak_rss(), memory.shared_rss_bytes()
    result = {}
    began = time.perf_counter()
    for phase in start_up(model, zero_init, world):
        result[f"peak_above_{phase}"] = memory.peak_rss_bytes() - base
        result[f"shared_touched_{phase}"] = memory.shared_rss_bytes() - shared
        result[f"private_peak_{phase}"] = result[f"peak_above_{phase}"] - result[f"shared_touched_{phase}"]
        result[f"seconds_{phase}"] = time.perf_counter() - began
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_pair(model: str, zero_init: bool, world: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_measure, args=(world, free_port(), model, zero_init, out), nprocs=world, join=True)
        ranks = [json.loads(Path(f"{out}/rank{r}.json").read_text()) for r in range(world)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def model_sizes(model: str) -> dict:
    """fp32 bytes of the whole model and of its largest parameter, counted on the meta device."""
    cfg = load_config(None, [f"model.name={model}"])
    with torch.device("meta"):
        clip = create_clip(cfg.model, device="meta")
    counts = [p.numel() for p in clip.parameters()]
    return {"parameters": sum(counts), "model_bytes": 4 * sum(counts), "largest_parameter_bytes": 4 * max(counts)}


def bound(sizes: dict, world: int) -> int:
    """Share of the model per rank plus its largest parameter."""
    return sizes["model_bytes"] // world + sizes["largest_parameter_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", default="bench/results/zero_init.json")
    args = parser.parse_args()
    record = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "load_before": os.getloadavg()[0], "rows": []}
    print(f"{'model':>10} {'zero_init':>9} {'model MiB':>9} {'engine MiB':>10} {'shm MiB':>7} {'bound MiB':>9} "
          f"{'full MiB':>8} {'seconds':>8}", flush=True)
    for model in args.models:
        sizes = model_sizes(model)
        for zero_init in (False, True):
            row = {"model": model, "zero_init": zero_init, "ranks": args.ranks, **sizes,
                   "bound_bytes": bound(sizes, args.ranks), **run_pair(model, zero_init, args.ranks)}
            record["rows"].append(row)
            print(f"{model:>10} {str(zero_init):>9} {row['private_peak_model'] / MB:>9.0f} "
                  f"{row['private_peak_engine'] / MB:>10.0f} {row['shared_touched_engine'] / MB:>7.0f} "
                  f"{row['bound_bytes'] / MB:>9.0f} "
                  f"{row['model_bytes'] / MB:>8.0f} {row['seconds_engine']:>8.1f}", flush=True)
    big = model_sizes(BIG)
    record["computed"] = {"model": BIG, "ranks": BIG_RANKS, **big, "whole_per_rank_bytes": big["model_bytes"],
                          "partitioned_per_rank_bytes": bound(big, BIG_RANKS)}
    print(f"{BIG} on {BIG_RANKS} ranks (computed): {big['model_bytes'] / 2 ** 30:.1f} GiB per rank built whole, "
          f"{bound(big, BIG_RANKS) / 2 ** 30:.2f} GiB partitioned")
    record["load_after"] = os.getloadavg()[0]
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
