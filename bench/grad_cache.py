"""Contrastive batches past activation memory: peak memory and speed of one optimizer step.

    python bench/grad_cache.py        # 2 CPU ranks, dsclip-tiny, micro-batch 64 per rank

Three ways to train on a contrastive batch of B = micro x k x ranks samples per step, each in
fresh processes, 2 ranks:
  dsclip_cached   dsclip's Trainer with train.grad_cache (ZeRO-3, the tiled loss, run once a step)
  dsclip_plain    dsclip's Trainer with plain accumulation of k micro-batches (each micro-batch
                  contrasted only within itself: the memory and time floor, not the same loss)
  open_clip_accum open_clip_train's --accum-freq scheme, in a loop that follows its
                  train_one_epoch line for line (cache every micro-batch's features without
                  grad, then per micro-batch recompute its features with grad and the whole
                  loss over all cached features, backward; then one optimizer step), with DDP
                  and ClipLoss(local_loss=True, gather_with_grad=True): k loss passes of
                  O(b x B) memory each. Run from its own code it would need its data loader and
                  its CUDA-only distributed start, hence the loop.
Per system and B: peak RSS per rank during one full step (the larger of the two ranks; VmHWM
reset before the step), and samples/s of that step; up to B = 4096 after a first, untimed step
(larger steps take minutes on 2 cores, so they run once, first-call costs included). A point is skipped
(and the larger ones with it) when the previous peak's growth (B^2 for open_clip's logits,
linear otherwise) predicts more than --budget-gb per rank. Batches come from a pool of 4
pre-made micro-batches (the step, not the data, is measured). Prints a table, fits dsclip's
bytes per added sample, writes JSON after every point and a log-log PNG at the end.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsclip.model.architectures import registered  # noqa: E402
from dsclip.training import memory  # noqa: E402
from dsclip.training.bootstrap import free_port  # noqa: E402

registered()  # dsclip-tiny for open_clip, in every spawned worker too
GB = 2 ** 30
SYSTEMS = ("dsclip_cached", "dsclip_plain", "open_clip_accum")
POOL = 4
WARM_UP_UP_TO = 4096  # larger steps take minutes on CPU: one step each, first-call costs included


def _pool(micro: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(rank)
    return [(torch.randn(micro, 3, 32, 32, generator=gen), torch.randint(1, 49000, (micro, 16), generator=gen))
            for _ in range(POOL)]


def _dsclip_step(micro: int, accum: int, cached: bool, out: str, rank: int):
    from dsclip.config import load_config
    from dsclip.training.components import build_run
    from dsclip.training.ds_config import load_ds_config
    from dsclip.training.loop import Trainer

    cfg = load_config(None, ["model.name=dsclip-tiny", f"data.batch_size={micro}", f"train.grad_accum_steps={accum}",
                             f"train.grad_cache={str(cached).lower()}", "train.max_steps=100", "optim.warmup_steps=1",
                             "eval.at_start=false", "eval.at_end=false", "eval.zeroshot=[]", "train.export=false",
                             "logging.plots=false", "logging.report_to=[jsonl]", "data.synthetic.train_samples=256",
                             f"output_dir={out}", f"name=b{accum}-{cached}"])
    trainer = Trainer(build_run(cfg, load_ds_config(str(REPO / "ds_configs" / "zero3.json"))))
    pool, i = _pool(micro, rank), iter(range(10 ** 9))
    trainer.next_batch = lambda: pool[next(i) % POOL]
    return lambda: trainer.optimizer_step()


def _open_clip_accum_step(micro: int, accum: int, rank: int, world: int):
    import open_clip
    from open_clip.loss import ClipLoss
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(open_clip.create_model("dsclip-tiny", output_dict=True))
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pool = _pool(micro, rank)

    def step():
        # as open_clip_train.train.train_one_epoch with accum_freq > 1
        accum_images, accum_texts, accum_features = [], [], {}
        for j in range(accum):
            images, texts = pool[j % POOL]
            with torch.no_grad():
                model_out = model(images, texts)
                model_out.pop("logit_scale")
                for key, val in model_out.items():
                    accum_features.setdefault(key, []).append(val)
            accum_images.append(images)
            accum_texts.append(texts)
        optimizer.zero_grad()
        for j in range(accum):
            model_out = model(accum_images[j], accum_texts[j])
            logit_scale = model_out.pop("logit_scale")
            inputs = {key: torch.cat(accum_features[key][:j] + [model_out[key]] + accum_features[key][j + 1:])
                      for key in accum_features}
            total_loss = loss_fn(inputs["image_features"], inputs["text_features"], logit_scale)
            total_loss.backward()
        optimizer.step()
        return total_loss.detach()

    return step


def _measure(rank: int, world: int, port: int, system: str, micro: int, batch: int, out: str) -> None:
    from dsclip.training.bootstrap import init_distributed, quiet_libraries
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    quiet_libraries()
    init_distributed()
    accum = batch // (micro * world)
    if system == "open_clip_accum":
        step = _open_clip_accum_step(micro, accum, rank, world)
    else:
        step = _dsclip_step(micro, accum, system == "dsclip_cached", out, rank)
    if batch <= WARM_UP_UP_TO:
        step()  # a first step: lazy optimizer state, first-call costs
    dist.barrier()
    base = memory.reset_peak_rss()
    began = time.perf_counter()
    step()
    seconds = time.perf_counter() - began
    result = {"peak_rss": memory.peak_rss_bytes(), "rss_before": base, "seconds": seconds}
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_point(system: str, micro: int, batch: int, world: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_measure, args=(world, free_port(), system, micro, batch, out), nprocs=world, join=True)
        ranks = [json.loads(Path(f"{out}/rank{r}.json").read_text()) for r in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    return {"system": system, "batch": batch, "measured": True, "peak_rss_gb": max(r["peak_rss"] for r in ranks) / GB,
            "peak_extra_gb": max(r["peak_rss"] - r["rss_before"] for r in ranks) / GB, "step_seconds": seconds,
            "samples_per_s": batch / seconds}


def predicted_gb(system: str, last: dict, batch: int) -> float:
    """Peak RSS at `batch` from the last measured point: what the step added grows (B^2 for
    open_clip's logits, B otherwise); what the process held before the step stays."""
    growth = (batch / last["batch"]) ** (2 if system == "open_clip_accum" else 1)
    held = last["peak_rss_gb"] - last["peak_extra_gb"]
    return held + last["peak_extra_gb"] * growth


def bytes_per_sample(rows: list[dict]) -> float:
    """Least-squares slope of peak RSS against B over the measured points."""
    xs, ys = [r["batch"] for r in rows], [r["peak_rss_gb"] * GB for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in SYSTEMS:
        points = [r for r in rows if r["system"] == system and r["measured"]]
        ax.plot([r["batch"] for r in points], [r["peak_rss_gb"] for r in points], marker="o", label=system)
    ax.set(xscale="log", yscale="log", xlabel="contrastive batch per step", ylabel="peak RSS per rank (GB)",
           title="one step, dsclip-tiny, micro-batch 64 x 2 CPU ranks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144])
    parser.add_argument("--micro", type=int, default=64, help="micro-batch per rank")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--budget-gb", type=float, default=16.0, help="skip points predicted above this per rank")
    parser.add_argument("--json", default="bench/results/grad_cache.json")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="keep the points already measured in --json (same micro-batch and ranks) and run the rest")
    args = parser.parse_args()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "load_before": os.getloadavg()[0], "rows": []}
    earlier = {}
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        if (old["args"]["micro"], old["args"]["ranks"]) != (args.micro, args.ranks):
            raise SystemExit(f"grad_cache: error: {path} was measured with another --micro / --ranks; drop --continue")
        earlier = {(r["system"], r["batch"]): r for r in old["rows"] if r["measured"]}
        record["load_before"] = old["load_before"]
    print(f"{'system':>16} {'B':>7} {'peak RSS GB':>12} {'extra GB':>9} {'step s':>8} {'samples/s':>10}", flush=True)
    for system in args.systems:
        last = None
        for batch in args.batches:
            if last is not None and predicted_gb(system, last, batch) > args.budget_gb:
                record["rows"].append({"system": system, "batch": batch, "measured": False,
                                       "predicted_peak_rss_gb": predicted_gb(system, last, batch)})
                print(f"{system:>16} {batch:>7}   skipped: {predicted_gb(system, last, batch):.1f} GB predicted", flush=True)
                continue
            row = last = earlier.get((system, batch)) or run_point(system, args.micro, batch, args.ranks)
            record["rows"].append(row)
            print(f"{system:>16} {batch:>7} {row['peak_rss_gb']:>12.3f} {row['peak_extra_gb']:>9.3f} "
                  f"{row['step_seconds']:>8.2f} {row['samples_per_s']:>10.0f}", flush=True)
            path.write_text(json.dumps(record, indent=1))  # after every point: a cut-off run keeps what it measured
    measured = {s: [r for r in record["rows"] if r["system"] == s and r["measured"]] for s in args.systems}
    if len(measured.get("dsclip_cached", [])) >= 2:
        record["dsclip_cached_bytes_per_sample"] = bytes_per_sample(measured["dsclip_cached"])
        print(f"dsclip_cached: {record['dsclip_cached_bytes_per_sample']:.0f} bytes of peak RSS per added sample")
    speed = {}
    for batch in args.batches:
        ours = next((r for r in measured.get("dsclip_cached", []) if r["batch"] == batch), None)
        theirs = next((r for r in measured.get("open_clip_accum", []) if r["batch"] == batch), None)
        if ours and theirs:
            speed[str(batch)] = ours["samples_per_s"] / theirs["samples_per_s"]
            print(f"B={batch}: dsclip_cached {speed[str(batch)]:.2f}x open_clip_accum's samples/s")
    record["speed_ratio_vs_open_clip_accum"] = speed
    record["load_after"] = os.getloadavg()[0]
    path.write_text(json.dumps(record, indent=1))
    plot(record["rows"], path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
