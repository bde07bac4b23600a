"""Peak extra memory and forward+backward time: open_clip ClipLoss vs dsclip's tiled loss.

    python bench/loss.py                                   # CPU, fp32, 1 and 2 ranks
    python bench/loss.py --device cuda --dtype bf16 --ranks 1

Each rank count runs in fresh processes; each rank measures, per global batch B and loss,
the peak memory above what it held before the loss (CPU: the process's peak RSS, reset
through /proc/self/clear_refs; CUDA: the allocator's peak) and the wall and CPU time of one
forward+backward. The two losses alternate, in swapped order each round, for up to
--repeats rounds (fewer where one round is slow, see --point-budget-s); times are medians,
so a shared machine's changing load hits both alike. ClipLoss runs whose predicted memory
(per-rank bytes per logit x b x B, from the largest batch measured so far) exceeds
--host-budget-gb or 80% of the memory available now (on a GPU: 80% of its free memory, with
16 bytes a logit before any batch was measured) are skipped and extrapolated (memory and time
grow as b x B for ClipLoss); the table marks them with '*'. Prints a table and
writes JSON.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsclip.loss.config import LossConfig  # noqa: E402
from dsclip.loss.contrastive import build_loss  # noqa: E402
from dsclip.training import memory  # noqa: E402
from dsclip.training.bootstrap import free_port  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GB = 1024 ** 3


def _reset_peak(device: str) -> int:
    """Resets the peak-memory counter; returns the memory held now."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return memory.reset_peak_rss()


def _peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return memory.peak_rss_bytes()


def make_loss(name: str, args: argparse.Namespace):
    """The one setup factory: open_clip's ClipLoss or dsclip's loss for this process group."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if name == "open_clip":
        from open_clip.loss import ClipLoss
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    return build_loss(LossConfig(impl=args.impl, chunk_rows=args.chunk_rows))


# ClipLoss's peak per logit before any batch was measured (a GPU run may start at a batch whose
# logits cannot fit): bf16 logits both ways and their softmax and gradients, upcast in places.
CLIP_LOSS_BYTES_PER_LOGIT = 16


def _room(args: argparse.Namespace) -> float:
    """Bytes a ClipLoss run may take: the budget (CPU) or 80% of the free GPU memory."""
    if args.device == "cuda":
        return 0.8 * torch.cuda.mem_get_info()[0]
    return min(args.host_budget_gb * GB, 0.8 * _available_bytes())


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def step(loss_fn, b: int, args: argparse.Namespace, seed: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak extra bytes) of one forward+backward at local batch b."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[args.dtype]
    image = F.normalize(torch.randn(b, args.dim, generator=gen), dim=-1).to(args.device, dtype).requires_grad_()
    text = F.normalize(torch.randn(b, args.dim, generator=gen), dim=-1).to(args.device, dtype).requires_grad_()
    scale = torch.tensor([14.3], device=args.device, requires_grad=True)
    before = _reset_peak(args.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    loss_fn(image, text, scale).backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, _peak(args.device) - before


def _agree(value: float, op: dist.ReduceOp, device: str) -> float:
    """The same value on every rank (MIN / MAX over ranks)."""
    if not dist.is_initialized():
        return value
    x = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=op)
    return x.item()


def measure_batch(losses: dict, batch: int, world: int, args: argparse.Namespace, rank: int) -> dict[str, list]:
    """Per loss: [(wall s, CPU s, peak extra bytes)] over the rounds run at global batch `batch`."""
    b = batch // world
    if args.device == "cuda":
        for loss_fn in losses.values():
            step(loss_fn, b, args, seed=rank)  # per-shape autotune off the clock
    samples = {name: [] for name in losses}
    rounds, r = args.repeats, 0
    while r < rounds:
        order = list(losses) if r % 2 == 0 else list(losses)[::-1]
        round_start = time.perf_counter()
        for name in order:
            samples[name].append(step(losses[name], b, args, seed=rank))
        if r == 0:  # slow points get fewer rounds; every rank runs the same number
            first = _agree(time.perf_counter() - round_start, dist.ReduceOp.MAX, args.device)
            rounds = max(1, min(args.repeats, int(args.point_budget_s // max(first, 1e-9))))
        r += 1
    return samples


def _default_allocator() -> None:
    """Undo the glibc setting dsclip's start-up applies (keep freed memory, serve blocks up to 1 GB
    from the heap), so that large blocks are mapped and unmapped again as on 1 rank. With it the
    2-rank peak RSS came out about twice as high in one run (ClipLoss at B=8192: 1.14 vs 0.55 GB per
    rank), freed blocks staying in the heap, which would overstate both losses' memory."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: glibc's default
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: glibc's default


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
        if args.device == "cpu" and args.collectives == "shm":
            # As in training: DeepSpeed's gloo group, dsclip's collectives on shared memory (ClipLoss's
            # torch.distributed.nn all-gather stays on gloo).
            from dsclip.training.bootstrap import init_distributed
            init_distributed()
            _default_allocator()
            from dsclip.loss.collectives import _shared_memory_backend
            print(f"rank {rank}/{world}: dsclip's loss collectives on "
                  f"{'shared memory' if _shared_memory_backend() is not None else 'gloo'}", flush=True)
        else:
            dist.init_process_group("gloo" if args.device == "cpu" else "nccl", rank=rank, world_size=world)
    all_losses = {name: make_loss(name, args) for name in args.losses}
    for loss_fn in all_losses.values():
        step(loss_fn, 64, args, seed=rank)  # warm-up: first-call costs (and Triton compiles) off the clock
    bytes_per_logit = {name: None for name in all_losses}
    rows = []
    for batch in args.batches:
        b = batch // world
        losses = {}
        for name, loss_fn in all_losses.items():
            per_logit = bytes_per_logit[name] or (CLIP_LOSS_BYTES_PER_LOGIT if args.device == "cuda" else None)
            predicted = None if per_logit is None else per_logit * b * batch
            fits = name != "open_clip" or predicted is None or predicted * world <= _room(args)
            if _agree(float(fits), dist.ReduceOp.MIN, args.device):  # all ranks skip together
                losses[name] = loss_fn
            else:
                rows.append({"loss": name, "batch": batch, "measured": False})
        for name, samples in measure_batch(losses, batch, world, args, rank).items():
            walls, cpus, peaks = zip(*samples)
            bytes_per_logit[name] = max(peaks) / (b * batch)
            rows.append({"loss": name, "batch": batch, "measured": True, "seconds": statistics.median(walls),
                         "cpu_seconds": statistics.median(cpus), "wall_samples": list(walls),
                         "peak_extra_bytes": max(peaks)})
            print(f"rank {rank}/{world} {name} B={batch}: wall {' '.join(f'{w:.2f}' for w in walls)} s, "
                  f"cpu {statistics.median(cpus):.2f} s, {max(peaks) / GB:.3f} GB", flush=True)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(rows, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Per loss and batch: time = slowest rank, memory = largest rank; skipped points extrapolated as b x B."""
    out = str(tmp / f"ranks{world}")
    mp.spawn(_worker, args=(world, free_port(), args, out), nprocs=world, join=True)
    per_rank = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    rows = []
    for name in args.losses:
        last = None
        for points in zip(*[[p for p in ranks if p["loss"] == name] for ranks in per_rank]):
            row = {"loss": name, "ranks": world, "batch": points[0]["batch"], "measured": points[0]["measured"]}
            if row["measured"]:
                row["seconds"] = max(p["seconds"] for p in points)
                row["cpu_seconds"] = max(p["cpu_seconds"] for p in points)
                row["rounds"] = len(points[0]["wall_samples"])
                row["peak_extra_gb"] = max(p["peak_extra_bytes"] for p in points) / GB
                last = row
            elif last is not None:
                growth = (row["batch"] / last["batch"]) ** 2
                row["seconds"] = last["seconds"] * growth
                row["cpu_seconds"] = last["cpu_seconds"] * growth
                row["peak_extra_gb"] = last["peak_extra_gb"] * growth
            rows.append(row)
    return rows


def largest_batch_in(rows: list[dict], limit_gb: float) -> Optional[int]:
    """Largest global batch whose per-rank peak extra memory fits limit_gb, from the measured growth.

    open_clip: memory = c * B^2 (fit on the largest measured batch). dsclip: memory = a + c * B
    (line through the two largest measured batches; None with fewer than two)."""
    measured = [r for r in rows if r["measured"]]
    if not measured:
        return None
    big = measured[-1]
    if big["loss"] == "open_clip":
        return int((limit_gb / big["peak_extra_gb"]) ** 0.5 * big["batch"])
    if len(measured) < 2:
        return None
    small = measured[-2]
    slope = (big["peak_extra_gb"] - small["peak_extra_gb"]) / (big["batch"] - small["batch"])
    return int(big["batch"] + (limit_gb - big["peak_extra_gb"]) / slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--losses", nargs="+", default=["open_clip", "dsclip"], choices=["open_clip", "dsclip"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--impl", default="auto", choices=["auto", "triton", "torch_tiled"], help="dsclip loss.impl")
    parser.add_argument("--chunk-rows", type=int, default=2048,
                        help="loss.chunk_rows for torch_tiled (2048: fastest at these shapes on 2 cores)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per batch (times are medians)")
    parser.add_argument("--point-budget-s", type=float, default=150.0,
                        help="fewer rounds where rounds x first round's seconds would exceed this")
    parser.add_argument("--host-budget-gb", type=float, default=10.0, help="skip ClipLoss runs predicted above this")
    parser.add_argument("--limit-gb", type=float, default=16.0, help="memory for the 'largest batch that fits' column")
    parser.add_argument("--collectives", default="shm", choices=["shm", "gloo"],
                        help="CPU ranks > 1: dsclip's start-up (its loss's collectives on shared memory, as in "
                             "training) or a plain gloo group")
    parser.add_argument("--json", default="bench/results/loss_{device}_{dtype}.json")
    args = parser.parse_args()
    load_before, started = os.getloadavg(), time.strftime("%Y-%m-%d")

    tmp = Path(args.json.format(device=args.device, dtype=args.dtype)).parent / ".loss_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = [row for world in args.ranks for row in run(world, args, tmp)]

    print(f"\nforward+backward, d={args.dim}, {args.dtype} on {args.device}, chunk_rows={args.chunk_rows}; "
          "per-rank peak extra memory; median wall / CPU seconds over the rounds"
          " ('*' = did not fit, extrapolated as b x B from the largest measured batch)")
    print(f"{'ranks':>5} {'loss':>10} {'B':>7} {'rounds':>6} {'peak extra GB':>14} {'wall s':>9} {'CPU s':>9}"
          f" {'mem ratio':>10} {'wall ratio':>11} {'CPU ratio':>10}")
    by_key = {(r["loss"], r["ranks"], r["batch"]): r for r in rows}
    for r in rows:
        base = by_key.get(("open_clip", r["ranks"], r["batch"]))
        mark = "" if r["measured"] else "*"
        if "seconds" not in r:
            print(f"{r['ranks']:>5} {r['loss']:>10} {r['batch']:>7} {'':>6} {'not run':>14}")
            continue
        ratios = ""
        if r["loss"] == "dsclip" and base and "seconds" in base:
            r["mem_ratio_vs_open_clip"] = r["peak_extra_gb"] / base["peak_extra_gb"]
            r["time_ratio_vs_open_clip"] = r["seconds"] / base["seconds"]
            r["cpu_ratio_vs_open_clip"] = r["cpu_seconds"] / base["cpu_seconds"]
            r["vs_extrapolated"] = not base["measured"]
            mark_base = "" if base["measured"] else "*"
            ratios = (f"{r['mem_ratio_vs_open_clip']:>9.4f}{mark_base:1} {r['time_ratio_vs_open_clip']:>10.3f}{mark_base:1}"
                      f" {r['cpu_ratio_vs_open_clip']:>9.3f}{mark_base:1}")
        print(f"{r['ranks']:>5} {r['loss']:>10} {r['batch']:>7} {r.get('rounds', ''):>6} {r['peak_extra_gb']:>13.3f}{mark:1}"
              f" {r['seconds']:>8.2f}{mark:1} {r['cpu_seconds']:>8.2f}{mark:1} {ratios}")
    fits = {f"{name}/{world}": largest_batch_in([r for r in rows if r["loss"] == name and r["ranks"] == world],
                                                args.limit_gb)
            for world in args.ranks for name in args.losses}
    print(f"\nlargest global batch with per-rank peak extra memory <= {args.limit_gb} GB "
          "(computed from the measured growth: B^2 for open_clip, linear for dsclip):")
    for key, batch in fits.items():
        print(f"  {key:>14} ranks: {batch if batch else 'n/a (needs two measured batches)'}")
    path = Path(args.json.format(device=args.device, dtype=args.dtype))
    path.write_text(json.dumps({"args": vars(args), "date": started, "cpus": os.cpu_count(),
                                "load_before": load_before, "load_after": os.getloadavg(), "rows": rows,
                                "largest_batch_in_limit": fits}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
