"""Training throughput and per-rank memory: dsclip (ZeRO-0/2/3, gradient checkpointing off/on)
against open_clip's own training code.

    python bench/train.py                                  # CPU, fp32, dsclip-tiny, 1 and 2 ranks, 64 and 256 per rank
    python bench/train.py --scaling                        # only the computed per-rank memory table
    python bench/train.py --device cuda --dtype bf16 --model ViT-B-32 --batch-size 128 --ranks 1 \
        --systems open_clip_loop zero3 zero3+ckpt

Systems, each run in fresh processes (one per rank; gloo on CPU, nccl on CUDA):
  open_clip_train   open_clip's trainer, `open_clip_train.main --dataset-type synthetic` (1 rank only:
                    its DDP does not start on CPU); it reads its own synthetic data
  open_clip_loop    open_clip's model + ClipLoss(local_loss, gather_with_grad) + AdamW in a plain torch
                    loop, wrapped in DDP when ranks > 1
  zero0|zero2|zero3 dsclip's Trainer (its engine from ds_configs/, its tiled loss) driven step by step
  NAME+ckpt         the same with gradient checkpointing (open_clip's set_grad_checkpointing)
  zeroN+pd50        dsclip with patch dropout 0.5 (model.patch_dropout: half the image patches dropped in
                    training forwards); give the ViT enough patches to drop (--image-size)
  zeroN+gloo        dsclip with its CPU collectives left on gloo (DSCLIP_SHM_COLLECTIVES=0) instead of
                    DeepSpeed's shared-memory all-reduce (dsclip/loss/collectives.py); open_clip_loop's DDP
                    always uses gloo, as torch does on CPU
  open_clip_loop+malloc  the baseline with the host-allocator setting dsclip applies to its CPU
                    processes (dsclip.training.bootstrap.keep_freed_host_memory), to show what that alone is worth

Same model config, per-rank batch, precision, AdamW settings (lr 2e-3, betas 0.9/0.98, eps 1e-6,
wd 0.1 off 1-D params, fused, clip 1.0) and warmup + cosine schedule everywhere, so the per-step
losses of open_clip_loop and dsclip can be compared (the table's loss diff). open_clip_loop and dsclip train on the same
pre-rendered batches of dsclip's synthetic shapes, cycled, so data costs nothing in their step
time; rendering one batch is timed separately. open_clip_train's own data time is in its step time
and also subtracted in a second column. samples/s is the median over windows after a warm-up, each
window's time the slowest rank's. Prints a table and writes JSON.
"""
import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsclip.model.architectures import SHIPPED_CONFIGS, registered  # noqa: E402
from dsclip.training import memory  # noqa: E402
from dsclip.training.bootstrap import free_port, keep_freed_host_memory  # noqa: E402

registered()  # dsclip-tiny for open_clip, here and in every spawned worker (they import this module)

MB = 2 ** 20
GB = 2 ** 30
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 2e-3, (0.9, 0.98), 1e-6, 0.1, 1.0
SCALING_MODELS = ("ViT-B-16", "ViT-L-14", "ViT-bigG-14")
SCALING_GPUS = (8, 16, 32, 64, 128, 256, 512)


# -- data: one pool of rendered batches, shared by open_clip_loop and dsclip -----------------------
def render_pool(args: argparse.Namespace, path: Path) -> float:
    """Render ranks x pool_batches batches of dsclip's synthetic shapes; returns seconds per batch."""
    from dsclip.data import synthetic
    from dsclip.model.build import build_model
    from dsclip.model.config import ModelConfig

    bundle = build_model(ModelConfig(name=args.model, image_size=args.image_size))
    n = max(args.ranks) * args.pool_batches
    samples = synthetic.SyntheticSet(0, n * args.batch_size, 12, bundle.image_size, bundle.tokenizer,
                                     synthetic.Normalize(bundle.image_mean, bundle.image_std), cache=False)
    start = time.perf_counter()
    images, texts = samples.batch(torch.arange(n * args.batch_size))
    seconds = time.perf_counter() - start
    images = images.view(n, args.batch_size, *images.shape[1:])
    texts = texts.view(n, args.batch_size, -1)
    torch.save({"images": images, "texts": texts}, path)
    return seconds / n


def rank_batches(pool: dict, rank: int, args: argparse.Namespace, device: torch.device):
    k = args.pool_batches
    return [(pool["images"][i].to(device), pool["texts"][i].to(device)) for i in range(rank * k, rank * k + k)]


# -- workers -------------------------------------------------------------------------------------
def _setup(rank: int, world: int, port: int, args: argparse.Namespace) -> torch.device:
    # LOCAL_SIZE as the DeepSpeed launcher sets it: without it DeepSpeed's CPU accelerator runs
    # `numactl --hardware` in a subprocess on every ZeRO-3 gradient reduction (a fork per step).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks' thread pools otherwise fight
        return torch.device("cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_steps(step, batches: list, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Wall and CPU seconds (all this process's threads) of each step after the warm-up, ranks started
    together, and this rank's loss at every step."""
    losses = [step(*batches[i % len(batches)]) for i in range(args.warmup)]
    _sync(device)
    if dist.is_initialized():
        dist.barrier()
    wall, cpu = [], []
    for i in range(args.windows * args.window_steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(step(*batches[i % len(batches)]))
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"times": wall, "cpu_times": cpu, "losses": losses}


def _peaks(device: torch.device) -> dict[str, int]:
    peaks = {"peak_rss": memory.peak_rss_bytes()}
    if device.type == "cuda":
        peaks["peak_device"] = torch.cuda.max_memory_allocated(device)
    return peaks


def _param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.windows * args.window_steps


def _warmup_steps(args: argparse.Namespace) -> int:
    return min(50, _total_steps(args) - 1)


def _schedule(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.LambdaLR:
    """dsclip's warmup + cosine, so both loops take the same steps and their losses can be compared."""
    from dsclip.training.config import OptimConfig
    from dsclip.training.optim import lr_factor
    cfg = OptimConfig(lr=LR, warmup_steps=_warmup_steps(args))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, _total_steps(args)))


def _open_clip_loop(rank: int, world: int, port: int, args: argparse.Namespace, ckpt: bool,
                    pool_path: str) -> dict:
    import math

    import open_clip
    from open_clip.loss import ClipLoss
    from torch.nn.parallel import DistributedDataParallel

    device = _setup(rank, world, port, args)
    if world > 1:
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
    batches = rank_batches(torch.load(pool_path), rank, args, device)
    base_rss = memory.rss_bytes()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None, force_image_size=args.image_size).to(device)
    model.set_grad_checkpointing(ckpt)
    wrapped = DistributedDataParallel(model) if world > 1 else model
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    optimizer = torch.optim.AdamW(_param_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=True)
    schedule = _schedule(optimizer, args)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(images: torch.Tensor, texts: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            image_features, text_features, logit_scale = wrapped(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip_train does after each step
        return loss.item()

    times = _timed_steps(step, batches, args, device)
    return {**times, "state": memory.module_state_bytes(model, optimizer), "base_rss": base_rss,
            **_peaks(device)}


def _dsclip(rank: int, world: int, port: int, args: argparse.Namespace, stage: int, ckpt: bool,
            patch_dropout: float, pool_path: str) -> dict:
    from dsclip.config import load_config
    from dsclip.training.bootstrap import init_distributed, quiet_libraries
    from dsclip.training.components import build_run
    from dsclip.training.ds_config import load_ds_config
    from dsclip.training.loop import Trainer

    device = _setup(rank, world, port, args)
    quiet_libraries()
    init_distributed()  # also releases the /dev/shm names
    batches = rank_batches(torch.load(pool_path), rank, args, device)
    base_rss = memory.rss_bytes()
    steps = _total_steps(args)
    cfg = load_config(None, [
        f"model.name={args.model}", f"model.image_size={args.image_size or 'null'}",
        f"model.grad_checkpointing={ckpt}", f"model.patch_dropout={patch_dropout}", f"data.batch_size={args.batch_size}",
        f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"train.grad_clip={GRAD_CLIP}",
        f"train.max_steps={steps}", f"optim.warmup_steps={_warmup_steps(args)}", "eval.at_start=false",
        "eval.at_end=false", "eval.zeroshot=[]", "train.export=false", "logging.plots=false",
        f"output_dir={Path(pool_path).parent}", f"name=zero{stage}-{ckpt}-{world}"])
    if stage == 0:
        ds = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
        ds["zero_optimization"] = {"stage": 0}
    else:
        ds = load_ds_config(str(REPO / "ds_configs" / f"zero{stage}.json"))
    ds["bf16"] = {"enabled": args.dtype == "bf16"}
    for item in args.ds_set:
        apply_ds_override(ds, item)
    trainer = Trainer(build_run(cfg, ds))

    def step(images: torch.Tensor, texts: torch.Tensor) -> float:
        loss, _ = trainer.micro_step(images, texts)  # the Trainer's own forward + loss + backward
        trainer.engine.step()
        return loss.item()

    times = _timed_steps(step, batches, args, device)
    return {**times, "state": memory.state_bytes(trainer.engine), "base_rss": base_rss, **_peaks(device)}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, system: str, pool_path: str,
            out: str) -> None:
    name, *suffixes = system.split("+")
    ckpt = "ckpt" in suffixes
    if "gloo" in suffixes:
        os.environ["DSCLIP_SHM_COLLECTIVES"] = "0"
    if "malloc" in suffixes:
        keep_freed_host_memory()
    if name == "open_clip_loop":
        result = _open_clip_loop(rank, world, port, args, ckpt, pool_path)
    else:
        result = _dsclip(rank, world, port, args, int(name[-1]), ckpt, 0.5 if "pd50" in suffixes else 0.0, pool_path)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _open_clip_train_worker(rank: int, args: argparse.Namespace, logs: str, out: str) -> None:
    """open_clip's trainer in this process: its own synthetic data, fp32, AdamW, no saving."""
    import open_clip
    from open_clip_train.main import main

    _setup(0, 1, 0, args)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key)  # otherwise open_clip_train starts its (CUDA-only) distributed mode
    open_clip.add_model_config(SHIPPED_CONFIGS)
    window = args.window_steps
    steps = window * (args.windows + 1) + 1  # logs at step 0, after the warm-up window, then each window
    main(["--dataset-type", "synthetic", "--device", args.device, "--model", args.model,
          "--batch-size", str(args.batch_size), "--train-num-samples", str(steps * args.batch_size),
          "--epochs", "1", "--workers", "0", "--precision", "amp_bf16" if args.dtype == "bf16" else "fp32",
          "--lr", str(LR), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS),
          "--wd", str(WEIGHT_DECAY), "--warmup", "50", "--grad-clip-norm", str(GRAD_CLIP), "--seed", "0",
          "--log-every-n-steps", str(window), "--logs", logs, "--name", "bench", "--save-frequency", "0",
          "--report-to", "", *(["--force-image-size", str(args.image_size)] if args.image_size else [])])
    lines = re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)", (Path(logs) / "bench" / "out.log").read_text())
    windows = [(float(d), float(b)) for d, b in lines[2:]]  # drop step 0 and the warm-up window
    result = {"window_data_s": [d for d, _ in windows], "window_step_s": [b for _, b in windows],
              **_peaks(torch.device(args.device))}
    Path(f"{out}.rank0.json").write_text(json.dumps(result))


def require_open_clip_train() -> None:
    """open_clip's trainer ships in open_clip_torch but imports pandas and other extras at the top."""
    try:
        import open_clip_train.main  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"bench/train.py: the open_clip_train system cannot start ({err}): install the extras "
                         "with pip install -e '.[dev]', or leave it out: --systems open_clip_loop zero0 zero2 zero3")


def apply_ds_override(ds: dict, item: str) -> None:
    """`zero_optimization.overlap_comm=false`: set one DeepSpeed config key (value parsed as JSON)."""
    path, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--ds-set {item!r}: expected KEY.PATH=VALUE, e.g. zero_optimization.overlap_comm=false")
    *sections, key = path.split(".")
    node = ds
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = json.loads(value)


# -- runs ----------------------------------------------------------------------------------------
def run(system: str, world: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = str(tmp / f"{system}-{world}-{args.batch_size}")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if system == "open_clip_train":
        mp.spawn(_open_clip_train_worker, args=(args, str(tmp / "oc_logs" / str(time.time_ns())), out), nprocs=1)
    else:
        mp.spawn(_worker, args=(world, free_port(), args, system, str(tmp / f"pool{args.batch_size}.pt"), out), nprocs=world)
    per_rank = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    row = {"system": system, "ranks": world, "batch_per_rank": args.batch_size,
           "wall_s": time.perf_counter() - started, "load_before": load_before, "load_after": os.getloadavg()[0],
           "peak_rss_mb": max(r["peak_rss"] for r in per_rank) / MB}
    if "peak_device" in per_rank[0]:
        row["peak_device_mb"] = max(r["peak_device"] for r in per_rank) / MB
    samples = world * args.batch_size
    if system == "open_clip_train":
        r = per_rank[0]
        row["samples_per_s"] = statistics.median(samples / s for s in r["window_step_s"])
        row["samples_per_s_without_data"] = statistics.median(
            samples / (s - d) for s, d in zip(r["window_step_s"], r["window_data_s"]))
        row["data_s_per_batch"] = statistics.median(r["window_data_s"])
        return row
    w = args.window_steps
    window_s = [max(sum(r["times"][i * w:(i + 1) * w]) for r in per_rank) for i in range(args.windows)]
    row["window_samples_per_s"] = [samples * w / s for s in window_s]
    row["samples_per_s"] = statistics.median(row["window_samples_per_s"])
    # load-robust companion: samples per CPU-second of a rank (the busiest rank's CPU time per window)
    cpu_s = [max(sum(r["cpu_times"][i * w:(i + 1) * w]) for r in per_rank) for i in range(args.windows)]
    row["samples_per_cpu_s_per_rank"] = statistics.median(args.batch_size * w / s for s in cpu_s)
    row["loss_first_last"] = [per_rank[0]["losses"][0], per_rank[0]["losses"][-1]]
    row["losses"] = per_rank[0]["losses"]
    row["base_rss_mb"] = max(r["base_rss"] for r in per_rank) / MB
    row["state_mb"] = {k: max(r["state"][k] for r in per_rank) / MB for k in memory.STATES}
    return row


# -- computed scaling table ------------------------------------------------------------------------
def parameter_count(name: str) -> int:
    """Parameters of an open_clip architecture, built on the meta device (no weights, no memory)."""
    import open_clip
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    return sum(p.numel() for p in model.parameters())


def scaling_rows(models: tuple[str, ...] = SCALING_MODELS, gpus: tuple[int, ...] = SCALING_GPUS) -> list[dict]:
    """Per-rank model-state GB under ZeRO-2/3 with bf16 params + grads and fp32 Adam master + 2 moments:
    ZeRO-2 keeps the 2P bytes of params whole and shards the rest; ZeRO-3 shards all 16P bytes."""
    rows = []
    for name in models:
        p = parameter_count(name)
        for stage in (2, 3):
            per_rank = {n: ((2 * p if stage == 2 else 2 * p / n) + 2 * p / n + 12 * p / n) / GB for n in gpus}
            rows.append({"model": name, "params": p, "stage": stage, "gb_per_rank": per_rank,
                         "ddp_gb_per_rank": 16 * p / GB})
    return rows


def print_scaling(rows: list[dict]) -> None:
    gpus = list(rows[0]["gb_per_rank"])
    print("\nper-rank model states, GB (computed from parameter counts, not measured: bf16 params + grads, "
          "fp32 Adam master + moments; activations and buffers excluded)")
    print(f"{'model':>12} {'params':>7} {'ZeRO':>4} {'DDP':>6} " + " ".join(f"{n:>7}" for n in gpus))
    for r in rows:
        cells = " ".join(f"{r['gb_per_rank'][n]:>7.3g}" for n in gpus)
        print(f"{r['model']:>12} {r['params'] / 1e6:>6.0f}M {r['stage']:>4} {r['ddp_gb_per_rank']:>6.1f} {cells}")


# -- report --------------------------------------------------------------------------------------
def _setting(row: dict) -> tuple[int, int]:
    return row["ranks"], row["batch_per_rank"]


def _baseline(rows: list[dict], row: dict, repeat: Optional[int] = None) -> Optional[dict]:
    """The open_clip_loop row of `row`'s ranks and batch (and of `repeat`, when given)."""
    return next((b for b in rows if _setting(b) == _setting(row) and b["system"] == "open_clip_loop"
                 and (repeat is None or b["repeat"] == repeat)), None)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (ranks, batch, system): the repeat with the most samples/s (the least disturbed by
    other jobs), plus the median over repeats of the speed ratio to open_clip_loop measured in the
    same repeat, and the largest difference of its per-step losses from open_clip_loop's."""
    rows = []
    for key in dict.fromkeys((*_setting(r), r["system"]) for r in runs):
        mine = [r for r in runs if (*_setting(r), r["system"]) == key]
        row = dict(max(mine, key=lambda r: r["samples_per_s"]))
        row["repeats_samples_per_s"] = [r["samples_per_s"] for r in mine]
        ratios = [r["samples_per_s"] / base["samples_per_s"] for r in mine if (base := _baseline(runs, r, r["repeat"]))]
        row["speed_vs_open_clip_loop"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    for row in rows:
        base = _baseline(rows, row)
        if base and "losses" in row:
            row["max_loss_diff_vs_open_clip_loop"] = max(abs(a - b) for a, b in zip(row["losses"], base["losses"]))
        if base and "samples_per_cpu_s_per_rank" in row:
            row["cpu_speed_vs_open_clip_loop"] = row["samples_per_cpu_s_per_rank"] / base["samples_per_cpu_s_per_rank"]
        if base and "state_mb" in row:
            row["params_optimizer_vs_open_clip_loop"] = (
                (row["state_mb"]["params"] + row["state_mb"]["optimizer"])
                / (base["state_mb"]["params"] + base["state_mb"]["optimizer"]))
    return rows


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def print_table(rows: list[dict], data_s: dict[int, float]) -> None:
    print("\nsamples/s: median window, best repeat; 'vs base': median over repeats of the ratio to open_clip_loop"
          " run in the same repeat; CPU-s: samples per CPU-second of the busiest rank (robust to other jobs);"
          " p+o: params + optimizer state (incl. master) per rank; loss diff: largest |loss - open_clip_loop's"
          " loss| over all steps (same batches, same schedule); load: 1-min load average before the run")
    print(f"{'ranks':>5} {'batch':>5} {'system':>19} {'samples/s':>10} {'vs base':>8} {'CPU-s':>6} {'vs base':>8} "
          f"{'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'p+o vs base':>11} {'loss diff':>9} "
          f"{'peak RSS MB':>12} {'load':>5}")
    for r in rows:
        state = r.get("state_mb")
        cells = f"{'-':>10} {'-':>9} {'-':>9} {'':>11}"
        if state:
            cells = (f"{state['params']:>10.1f} {state['grads']:>9.1f} {state['optimizer']:>9.1f} "
                     f"{_ratio(r.get('params_optimizer_vs_open_clip_loop')):>11}")
        cpu = f"{r['samples_per_cpu_s_per_rank']:>6.0f}" if "samples_per_cpu_s_per_rank" in r else f"{'-':>6}"
        extra = f"  peak device {r['peak_device_mb']:.0f} MB" if "peak_device_mb" in r else ""
        if "samples_per_s_without_data" in r:
            extra += f"  (without its data time: {r['samples_per_s_without_data']:.0f}/s)"
        loss = f"{r['max_loss_diff_vs_open_clip_loop']:>9.1e}" if "max_loss_diff_vs_open_clip_loop" in r else f"{'':>9}"
        print(f"{r['ranks']:>5} {r['batch_per_rank']:>5} {r['system']:>19} {r['samples_per_s']:>10.0f}"
              f" {_ratio(r['speed_vs_open_clip_loop']):>8} {cpu} {_ratio(r.get('cpu_speed_vs_open_clip_loop')):>8}"
              f" {cells} {loss} {r['peak_rss_mb']:>12.0f} {r['load_before']:>5.1f}{extra}")
    times = ", ".join(f"{seconds * 1000:.0f} ms at {batch}" for batch, seconds in data_s.items())
    print(f"\nrendering one batch of dsclip's synthetic shapes (not in the dsclip/open_clip_loop step times): {times}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["open_clip_train", "open_clip_loop", "zero0", "zero2",
                                                          "zero3", "zero3+gloo", "open_clip_loop+ckpt",
                                                          "zero3+ckpt"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="dsclip-tiny")
    parser.add_argument("--image-size", type=int, help="the model's image size (default its own)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256], help="per rank; each is a setting")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window-steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=1, help="run every system this many times, interleaved")
    parser.add_argument("--pool-batches", type=int, default=4, help="distinct pre-rendered batches per rank")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DeepSpeed config key for the dsclip systems (JSON value; repeatable)")
    parser.add_argument("--scaling", action="store_true", help="only print the computed scaling table")
    parser.add_argument("--json", default="bench/results/train_{device}.json")
    args = parser.parse_args()
    systems = [s for s in args.systems if s != "open_clip_train"]
    for system in systems:
        name, *suffixes = system.split("+")
        if (name not in ("open_clip_loop", "zero0", "zero1", "zero2", "zero3")
                or not set(suffixes) <= {"ckpt", "gloo", "malloc", "pd50"}
                or ({"gloo", "pd50"} & set(suffixes) and name == "open_clip_loop")
                or ("malloc" in suffixes and name != "open_clip_loop")):
            raise ValueError(f"--systems: unknown system {system!r}; use open_clip_train, open_clip_loop, zero0, "
                             "zero1, zero2, zero3, each optionally with +ckpt; the zeroN also with +gloo or +pd50, "
                             "open_clip_loop also with +malloc")

    if args.scaling:
        print_scaling(scaling_rows())
        return
    if "open_clip_train" in args.systems:
        require_open_clip_train()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dsclip-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        settings = [argparse.Namespace(**{**vars(args), "batch_size": batch}) for batch in args.batch_size]
        data_s = {s.batch_size: render_pool(s, tmp / f"pool{s.batch_size}.pt") for s in settings if systems}
        for repeat in range(args.repeats):
            for setting in settings:
                for world in args.ranks:
                    for system in args.systems:
                        if system == "open_clip_train" and world > 1:
                            continue  # its DDP needs CUDA device ids; open_clip_loop is the multi-rank baseline
                        row = {**run(system, world, setting, tmp), "repeat": repeat}
                        print(f"repeat {repeat}: {world} rank(s) x {setting.batch_size} {system}: "
                              f"{row['samples_per_s']:.0f} samples/s, load {row['load_before']:.1f}", flush=True)
                        runs.append(row)
    rows = summarize(runs)
    print_table(rows, data_s)
    scaling = scaling_rows()
    print_scaling(scaling)
    path = Path(args.json.format(device=args.device))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "data_s_per_batch": data_s, "rows": rows, "runs": runs,
                                "scaling_computed": scaling}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
