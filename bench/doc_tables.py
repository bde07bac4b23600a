"""Renders the measured tables and sentences of README.md and docs/*.md from bench/results/*.json.

    python bench/doc_tables.py            # rewrite every generated block in place
    python bench/doc_tables.py --check    # exit 1 listing each block that differs from its JSON

A generated block is everything between two marker lines (outside ``` code fences):

    <!-- generated:NAME (python bench/doc_tables.py) -->
    ...rendered markdown...
    <!-- /generated:NAME -->

NAME picks a function in BLOCKS below (JSON -> markdown). The check also lists markers whose NAME
is unknown, unclosed markers, and known NAMEs that appear in no file. Only json / pathlib /
statistics-level modules are imported, so the docs test that runs the check stays fast;
bench/train.py imports torch, so the few ratios it computes are re-derived here from its JSON fields.
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
FIX = "python bench/doc_tables.py"
START = re.compile(r"^<!-- generated:(\S+) \(python bench/doc_tables\.py\) -->$")
END = re.compile(r"^<!-- /generated:(\S+) -->$")
FENCE = re.compile(r"^\s*```")


def doc_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


# -- formatting helpers ----------------------------------------------------------------------------
def sig(value: float, digits: int = 3) -> str:
    """`digits` significant digits, trailing zeros kept (0.340, 6.80, 0.0697); whole numbers above that."""
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:#.{digits}g}".rstrip(".")


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def sci(value: float) -> str:
    """1 significant decimal in exponent form without the exponent's padding: 3.1e-6."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def span(values: list[float], fmt: Callable[[float], str], sep: str = "-") -> str:
    """'low-high' of the formatted extremes; one value when they format alike."""
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low}{sep}{high}"


def kilo(n: float) -> str:
    return f"{round(n / 1000):,}k"


def table(header: list[str], align: str, rows: list[list[str]], compact: bool = False) -> str:
    """A markdown table; align has one letter per column: 'r' (right) or 'l' (left)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    if compact:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, rule, *rows])


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def runs_of(items: list, key: Callable) -> list[list]:
    """Consecutive items with the same key, as lists."""
    groups: list[list] = []
    for item in items:
        if groups and key(groups[-1][-1]) == key(item):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def and_join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# -- bench/default_run.py: bench/results/default_run.json ----------------------------------------------
def default_run_table() -> str:
    d = load("default_run.json")
    rows = []
    for i, rep in enumerate(d["repeats"], 1):
        run = rep["default_run"]
        rows.append([str(i), f"{rep['bench_zero3']['samples_per_s']:.0f}", f"{run['samples_per_s']:.0f}",
                     ratio(rep["ratio"]), f"{run['wall_s']:.0f} s",
                     f"{run['zeroshot_top1_before']:.2f}% -> {run['zeroshot_top1_after']:.2f}%"])
    return table(["repeat", "bench/train.py ZeRO-3, samples/s", "default run, samples/s", "ratio",
                  "default run, wall time", "zero-shot top-1"], "rrrrrl", rows)


def default_run_median() -> str:
    d, train = load("default_run.json"), load("train_cpu.json")
    zero3 = next(r for r in train["rows"] if r["system"] == "zero3" and r["batch_per_rank"] == 64)
    bench = [rep["bench_zero3"]["samples_per_s"] for rep in d["repeats"]]
    return (f"Median ratio {ratio(d['ratio_median'])}. The machine ran the same ZeRO-3 step at "
            f"{zero3['samples_per_s']:,.0f} samples/s in the `bench/train.py` run below "
            f"(`bench/results/train_cpu.json`) and at {span(bench, lambda v: f'{v:.0f}')} on {d['date']}.")


def default_run_slow_windows() -> str:
    """The two slowest logged windows of each repeat (steps 10i+1..10i+10 for window i)."""
    d = load("default_run.json")
    slow: dict[int, list[float]] = {}
    for rep in d["repeats"]:
        windows = rep["default_run"]["window_samples_per_s"]
        for i in sorted(range(len(windows)), key=windows.__getitem__)[:2]:
            slow.setdefault(i, []).append(windows[i])
    steps = and_join([f"{10 * i + 1}-{10 * i + 10}" for i in sorted(slow)])
    values = [v for vs in slow.values() for v in vs]
    return ("Rendering ahead of the steps still costs time inside the run: the two slowest windows of each "
            f"repeat, steps {steps} (those that render a larger chunk), run at "
            f"{span(values, lambda v: f'{v:.0f}')} samples/s.")


def default_run_summary() -> str:
    """README's one-line summary: wall-time range of the default runs, zero-shot of the first repeat."""
    d = load("default_run.json")
    walls = [rep["default_run"]["wall_s"] for rep in d["repeats"]]
    first = d["repeats"][0]["default_run"]
    return (f"about {span(walls, lambda v: f'{v:.0f}')} s on a quiet {d['cpus']}-core machine (launcher start to "
            f"exit), zero-shot top-1 {first['zeroshot_top1_before']:.2f}% -> {first['zeroshot_top1_after']:.2f}% "
            "(`bench/results/default_run.json`)")


# -- bench/train.py: bench/results/train_cpu*.json ------------------------------------------------------
TRAIN_LABELS = {
    "open_clip_loop": "open_clip_loop (DDP, gloo)",
    "open_clip_loop+malloc": "open_clip_loop, dsclip's allocator setting",
    "zero0": "dsclip ZeRO-0",
    "zero2": "dsclip ZeRO-2",
    "zero3": "dsclip ZeRO-3",
    "zero3+gloo": "dsclip ZeRO-3, collectives on gloo",
}
BASELINE = "open_clip_loop"


def _setting(row: dict) -> tuple[int, int]:
    return row["ranks"], row["batch_per_rank"]


def _baseline(rows: list[dict], row: dict, repeat: Optional[int] = None) -> dict:
    return next(b for b in rows if _setting(b) == _setting(row) and b["system"] == BASELINE
                and (repeat is None or b["repeat"] == repeat))


def per_repeat_ratios(d: dict, row: dict) -> list[float]:
    """samples/s of each repeat of row's system over the baseline's in the same repeat (as bench/train.py)."""
    mine = [r for r in d["runs"] if _setting(r) == _setting(row) and r["system"] == row["system"]]
    return [r["samples_per_s"] / _baseline(d["runs"], r, r["repeat"])["samples_per_s"] for r in mine]


def max_loss_diff(d: dict, row: dict) -> float:
    base = _baseline(d["rows"], row)
    return max(abs(a - b) for a, b in zip(row["losses"], base["losses"]))


def _loss_diff_cell(value: float) -> str:
    return "0" if value == 0 else sci(value)


def train_table() -> str:
    d = load("train_cpu.json")
    loads = [r["load_before"] for r in d["runs"]]
    rows = []
    for r in d["rows"]:
        zero3 = r["system"] == "zero3"
        state = r["state_mb"]
        repeats = "" if r["system"] == BASELINE else " / ".join(f"{x:.2f}" for x in per_repeat_ratios(d, r))
        rows.append([str(r["batch_per_rank"]), bold(TRAIN_LABELS[r["system"]], zero3), f"{r['samples_per_s']:.0f}",
                     bold(ratio(r["speed_vs_open_clip_loop"]), zero3), repeats,
                     f"{r['samples_per_cpu_s_per_rank']:.0f}", ratio(r["cpu_speed_vs_open_clip_loop"]),
                     f"{state['params']:.1f}", f"{state['grads']:.1f}", f"{state['optimizer']:.1f}",
                     bold(ratio(r["params_optimizer_vs_open_clip_loop"]), zero3),
                     _loss_diff_cell(max_loss_diff(d, r))])
    ranks = and_join(sorted({str(r["ranks"]) for r in d["rows"]}))
    lead = (f"Measured on the 2-vCPU development machine, {ranks} ranks, one thread each, 1-minute load "
            f"{span(loads, lambda v: f'{v:.1f}')} (the benchmark's own two processes), `bench/results/train_cpu.json`:")
    header = ["batch/rank", f"system ({ranks} ranks)", "samples/s", "vs DDP", "per repeat", "samples/CPU-s/rank",
              "vs DDP", "params MB", "grads MB", "optimizer MB", "params+optimizer vs DDP", "loss diff"]
    return lead + "\n\n" + table(header, "rlrrlrrrrrrr", rows)


def zero3_repeats_summary() -> str:
    d = load("train_cpu_zero3_repeats.json")
    parts = []
    for r in (r for r in d["rows"] if r["system"] == "zero3"):
        ratios = per_repeat_ratios(d, r)
        per_rank = " per rank" if not parts else ""
        parts.append(f"{ratio(statistics.median(ratios))} ({span(ratios, lambda v: f'{v:.2f}')}) "
                     f"at {r['batch_per_rank']}{per_rank}")
    memory = {ratio(r["params_optimizer_vs_open_clip_loop"]) for r in d["rows"] if r["system"] == "zero3"}
    return (f"A second run of the baseline and ZeRO-3 alone, {d['args']['repeats']} repeats "
            f"(`bench/results/train_cpu_zero3_repeats.json`): ZeRO-3 at {and_join(parts)}, with the same "
            f"{'/'.join(sorted(memory))} memory.")


CKPT_LABELS = {
    "open_clip_train": "open_clip_train (its own trainer and data)",
    "open_clip_loop": "open_clip_loop (2 threads)",  # 1 rank; 2 ranks: TRAIN_LABELS
    "zero3": "dsclip ZeRO-3",
    "open_clip_loop+ckpt": "open_clip_loop + checkpointing",
    "zero3+ckpt": "dsclip ZeRO-3 + checkpointing",
}


def train_ckpt_table() -> str:
    d = load("train_cpu_ckpt.json")
    rows = []
    for r in d["rows"]:
        label = TRAIN_LABELS[BASELINE] if r["system"] == BASELINE and r["ranks"] > 1 else CKPT_LABELS[r["system"]]
        speed = f"{r['samples_per_s']:.0f}"
        if "samples_per_s_without_data" in r:
            speed += f" ({r['samples_per_s_without_data']:.0f} without its data time)"
        cpu = r.get("samples_per_cpu_s_per_rank")
        rows.append([str(r["ranks"]), label, speed, ratio(r["speed_vs_open_clip_loop"]),
                     "-" if cpu is None else f"{cpu:.0f}",
                     "-" if cpu is None else ratio(r["cpu_speed_vs_open_clip_loop"]),
                     ratio(r["params_optimizer_vs_open_clip_loop"]) if "state_mb" in r else "-"])
    return table(["ranks", "system", "samples/s", "vs loop", "samples/CPU-s/rank", "vs loop",
                  "params+optimizer vs loop"], "rlrrrrr", rows)


def scaling_table() -> str:
    rows_in = load("train_cpu.json")["scaling_computed"]
    gpus = list(rows_in[0]["gb_per_rank"])
    rows = [[r["model"], f"{r['params'] / 1e6:.0f}M", str(r["stage"]), f"{r['ddp_gb_per_rank']:.1f}",
             *(sig(r["gb_per_rank"][n]) for n in gpus)] for r in rows_in]
    header = ["model", "params", "ZeRO", "DDP GB", f"{gpus[0]} GPUs", *gpus[1:]]
    return table(header, "lrrr" + "r" * len(gpus), rows)


# -- bench/loss.py: bench/results/loss_cpu_fp32.json ----------------------------------------------------
def _two(value: float) -> str:
    return f"{value:.2f}"


def _loss_rows(d: dict) -> list[tuple[dict, dict]]:
    """(ClipLoss row, dsclip row) per (ranks, batch), by ranks and batch."""
    by_key = {(r["loss"], r["ranks"], r["batch"]): r for r in d["rows"]}
    ours = sorted((r for r in d["rows"] if r["loss"] == "dsclip"), key=lambda r: (r["ranks"], r["batch"]))
    return [(by_key[("open_clip", r["ranks"], r["batch"])], r) for r in ours]


def _load_span(d: dict) -> str:
    return f"{d['load_before'][0]:.1f} before, {d['load_after'][0]:.1f} after"


def loss_conditions() -> str:
    d = load("loss_cpu_fp32.json")
    batches, ranks = (" ".join(map(str, d["args"][key])) for key in ("batches", "ranks"))
    return (f"Measured {d['date']} with `python bench/loss.py --batches {batches} --ranks {ranks}` on {d['cpus']} cores shared "
            f"with other jobs: 1-minute load {_load_span(d)}, `bench/results/loss_cpu_fp32.json`:")


def loss_table() -> str:
    d = load("loss_cpu_fp32.json")
    rows = []
    for clip, ours in _loss_rows(d):
        mark = "" if clip["measured"] else "*"
        rows.append([str(ours["ranks"]), f"{ours['batch']:,}", f"{clip['peak_extra_gb']:.3f}{mark}",
                     f"{ours['peak_extra_gb']:.3f}", f"{sig(ours['mem_ratio_vs_open_clip'], 2)}{mark}",
                     f"{sig(clip['seconds'])}{mark}", sig(ours["seconds"]),
                     f"{ours['time_ratio_vs_open_clip']:.2f}{mark}", f"{ours['cpu_ratio_vs_open_clip']:.2f}{mark}"])
    return table(["ranks", "global B", "ClipLoss GB / rank", "dsclip GB / rank", "memory ratio", "ClipLoss s",
                  "dsclip s", "time ratio (wall)", "time ratio (CPU)"], "rrrrrrrrr", rows)


def loss_largest_batch() -> str:
    d = load("loss_cpu_fp32.json")
    fits = d["largest_batch_in_limit"]

    def fit(name: str) -> str:
        one, two = fits.get(f"{name}/1"), fits.get(f"{name}/2")
        return f"about {kilo(one)}" + (f" ({kilo(two)} on 2 ranks)" if two else "")

    return (f"**Largest global batch whose loss fits in {d['args']['limit_gb']:g} GB per rank:** "
            f"{fit('open_clip')} with ClipLoss against {fit('dsclip')} with dsclip "
            "(from the measured growth, quadratic vs linear).")


def loss_speed() -> str:
    d = load("loss_cpu_fp32.json")
    parts = []
    for ranks in sorted({r["ranks"] for r in d["rows"]}):
        mine = [ours for _, ours in _loss_rows(d) if ours["ranks"] == ranks]
        wall = span([r["time_ratio_vs_open_clip"] for r in mine], _two) + "x"
        cpu = span([r["cpu_ratio_vs_open_clip"] for r in mine], _two) + "x"
        parts.append(f"{wall} of ClipLoss's wall time and {cpu} of its CPU time on {ranks} rank{'s' * (ranks > 1)}")
    batches = sorted({r["batch"] for r in d["rows"]})
    return f"dsclip's loss takes {and_join(parts)} (global batches {batches[0]:,}-{batches[-1]:,})."


# -- bench/data.py: bench/results/data_cpu.json ---------------------------------------------------------
def _workers(n: str) -> str:
    return f"{n} worker" + ("" if n == "1" else "s")


def data_table() -> str:
    d = load("data_cpu.json")
    workers = [str(w) for w in d["args"]["workers"]]
    rows = []
    for case, result in d["cases"].items():
        for loader, rates in result["images_per_s"].items():
            rows.append([f"{case} ({result['source_size']} px)", loader, *(f"{rates[w]:.0f}" for w in workers)])
    lead = (f"Images per second, measured {d['date']} with `python bench/data.py` on the shared {d['cpus']}-vCPU "
            f"machine (1-minute load {d['load_before'][0]:.1f} before, {d['load_after'][0]:.1f} after; "
            f"`bench/results/data_cpu.json`), model input {d['args']['image_size']} px, the median of "
            f"{d['args']['repeats']} passes:")
    return lead + "\n\n" + table(["JPEGs", "loader", *map(_workers, workers)], "ll" + "r" * len(workers), rows)


def data_ratio() -> str:
    d = load("data_cpu.json")
    workers = [str(w) for w in d["args"]["workers"]]
    parts = []
    for case, result in d["cases"].items():
        folder = " / ".join(ratio(result["vs_imagefolder"][w]) for w in workers)
        pipeline = " / ".join(ratio(result["vs_webdataset"][w]) for w in workers)
        parts.append(f"{case}: {folder} of ImageFolder's rate and {pipeline} of webdataset's pipeline")
    return f"dsclip's shard loader, with {' / '.join(workers)} workers, {'; '.join(parts)}."


def data_stages() -> str:
    d = load("data_cpu.json")
    stages = list(next(iter(d["cases"].values()))["stage_ms_per_1000"])
    rows = [[case, *(f"{result['stage_ms_per_1000'][s] / 1000:.2f}" for s in stages)] for case, result in d["cases"].items()]
    return table(["JPEGs", *(f"{s} (ms/image)" for s in stages)], "l" + "r" * len(stages), rows)


# -- bench/wiseft_example.py: bench/results/wiseft_example.json ----------------------------------------
def _pct(value: float) -> str:
    return f"{value:.2f}"


def wiseft_table() -> str:
    """The table `dsclip wise-ft` prints (dsclip/ensemble/wiseft.py markdown_table), from the JSON."""
    sweep = load("wiseft_example.json")["sweep"]
    task, general = sweep["task_evals"], sweep["general_evals"]
    header = ["alpha", *task, *(f"{n} (general)" for n in general), "task", "general", ""]
    rows = [[f"{r['alpha']:g}", *(_pct(r["metrics"][f"eval/{n}/top1"]) for n in task + general), _pct(r["task"]),
             _pct(r["general"]), "saved" if r["alpha"] == sweep["chosen_alpha"] else ""] for r in sweep["rows"]]
    return table(header, "r" * (len(header) - 1) + "l", rows, compact=True)


def _off_line(rows: list[dict]) -> list[tuple[dict, float]]:
    """Each inner row's task score minus the straight line between the end rows, at its general score
    (the right-hand plot: general on x, task on y)."""
    a, b = rows[0], rows[-1]
    slope = (b["task"] - a["task"]) / (b["general"] - a["general"])
    return [(r, r["task"] - (a["task"] + slope * (r["general"] - a["general"]))) for r in rows[1:-1]]


def _alpha_groups(off: list[tuple[dict, float]], above: bool) -> str:
    """'0.4 and 0.7-0.9': the runs of consecutive alphas on one side of the line."""
    groups = [g for g in runs_of(off, key=lambda item: item[1] > 0) if (g[0][1] > 0) == above]
    return and_join([span([r["alpha"] for r, _ in g], lambda v: f"{v:g}") for g in groups])


EVAL_NAMES = {"fashion": "Fashion-MNIST"}  # the eval names in the recipes -> prose


def wiseft_summary() -> str:
    sweep = load("wiseft_example.json")["sweep"]
    rows = sorted(sweep["rows"], key=lambda r: r["alpha"])
    first, last = rows[0], rows[-1]
    off = _off_line(rows)
    above, below = [v for _, v in off if v > 0], [v for _, v in off if v <= 0]
    chosen = next(r for r in rows if r["alpha"] == sweep["chosen_alpha"])
    task, general = (EVAL_NAMES.get(n, n) for n in (sweep["task_evals"][0], sweep["general_evals"][0]))
    return (f"Fine-tuning takes {task} from {first['task']:.1f}% to {last['task']:.1f}% and drops {general} "
            f"from {first['general']:.1f}% to {last['general']:.1f}%. In the right-hand plot alpha "
            f"{_alpha_groups(off, above=True)} lie up to {max(above):.1f} points of {task} above the straight line "
            f"between the two models, alpha {_alpha_groups(off, above=False)} up to {-min(below):.1f} points below it. "
            f"The chosen alpha, {chosen['alpha']:g}, keeps {chosen['general'] - last['general']:.2f} points of "
            f"{general} for {last['task'] - chosen['task']:.2f} points of {task} against alpha {last['alpha']:g}.")


WISEFT_STAGES = {"make-shards": "make-shards", "train zero-shot model (shapes)": "stage 1",
                 "fine-tune on Fashion-MNIST": "stage 2", "wise-ft sweep": "sweep"}


def wiseft_stage_times() -> str:
    d = load("wiseft_example.json")
    seconds = d["seconds"]
    parts = [f"{WISEFT_STAGES[name]} {s:.0f} s" for name, s in seconds.items()]
    return (f"Stage times: {', '.join(parts)} ({len(d['sweep']['rows'])} alphas in the sweep), "
            f"{sum(seconds.values()) / 60:.1f} minutes in all.")


# -- bench/test_tiers.py: bench/results/test_tiers.json ----------------------------------------------
def test_tiers() -> str:
    """README's Tests section: each tier's wall time and pytest counts in one fresh-clone run."""
    d = load("test_tiers.json")
    rows = [[tier, f"`{t['command']}`", f"{t['wall_s'] / 60:.1f} min",
             ", ".join(f"{n} {kind}" for kind, n in t["counts"].items() if kind != "deselected")]
            for tier, t in d["tiers"].items()]
    total = sum(t["wall_s"] for t in d["tiers"].values()) / 60
    return (table(["tier", "command", "wall time", "result"], "llrl", rows) + "\n\n"
            f"Measured by `bench/test_tiers.py` in a fresh clone on {d['date']} ({d['cpus']} cores, `CI` set, "
            f"1-minute load {d['load_before']:.1f} before and {d['load_after']:.1f} after): {total:.0f} minutes of "
            "tests in all (`bench/results/test_tiers.json`).")


# -- bench/faults.py: bench/results/faults.json ------------------------------------------------------
def faults_table() -> str:
    """README's Reliability section: each fault case, what must hold, and what the suite measured."""
    d = load("faults.json")
    rows = [[row["fault"], row["expected"], row["result"]] for row in d["rows"]]
    return (table(["fault", "expected", "measured"], "lll", rows) + "\n\n"
            f"Measured by `bench/faults.py` at commit {d['commit']} on {d['date']} ({d['cpus']} cores): {d['summary']} "
            f"in {d['wall_s'] / 60:.1f} minutes (`bench/results/faults.json`).")


# -- bench/grad_cache.py: bench/results/grad_cache.json -------------------------------------------------
def _gc_cell(row: Optional[dict], key: str, fmt: Callable[[float], str]) -> str:
    if row is None:
        return "not run"
    if not row["measured"]:
        return f"({sig(row['predicted_peak_rss_gb'], 2)} GB predicted: skipped)" if key == "peak_rss_gb" else "-"
    return fmt(row[key])


def grad_cache_table() -> str:
    d = load("grad_cache.json")
    by = {(r["system"], r["batch"]): r for r in d["rows"]}
    rows = []
    for batch in d["args"]["batches"]:
        cached, plain, theirs = (by.get((s, batch)) for s in ("dsclip_cached", "dsclip_plain", "open_clip_accum"))
        speed = d["speed_ratio_vs_open_clip_accum"].get(str(batch))
        rows.append([f"{batch:,}", _gc_cell(cached, "peak_rss_gb", sig), _gc_cell(plain, "peak_rss_gb", sig),
                     _gc_cell(theirs, "peak_rss_gb", sig), _gc_cell(cached, "samples_per_s", lambda v: f"{v:.0f}"),
                     _gc_cell(theirs, "samples_per_s", lambda v: f"{v:.0f}"), ratio(speed) if speed else "-"])
    return table(["contrastive B", "dsclip cached GB / rank", "plain accumulation GB / rank",
                  "open_clip --accum-freq GB / rank", "dsclip cached samples/s", "open_clip samples/s",
                  "speed ratio"], "rrrrrrr", rows)


def grad_cache_summary() -> str:
    d = load("grad_cache.json")
    batches = " ".join(map(str, d["args"]["batches"]))
    per_sample = d.get("dsclip_cached_bytes_per_sample")
    slope = f"; dsclip's cached step adds about {per_sample / 1024:.0f} KiB of peak RSS per sample of B" if per_sample else ""
    parts = ", the points run in more than one go with `--continue`" if d["args"].get("resume") else ""
    return (f"Measured {d['date']} with `python bench/grad_cache.py --batches {batches}`{parts} ({d['args']['ranks']} CPU ranks, "
            f"dsclip-tiny, micro-batch {d['args']['micro']} per rank, 1-minute load {d['load_before']:.1f} before and "
            f"{d['load_after']:.1f} after){slope} (`bench/results/grad_cache.json`, plot `bench/results/grad_cache.png`).")


# -- bench/zero_init.py: bench/results/zero_init.json ----------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def zero_init_table() -> str:
    d = load("zero_init.json")
    rows = []
    for row in d["rows"]:
        whole = next(r for r in d["rows"] if r["model"] == row["model"] and not r["zero_init"])
        rows.append([f"{row['model']} ({row['parameters'] / 1e6:.0f}M)", str(row["zero_init"]).lower(),
                     _mib(row["private_peak_model"]), ratio(row["private_peak_model"] / whole["private_peak_model"]),
                     _mib(row["bound_bytes"]), _mib(row["private_peak_engine"]), f"{row['seconds_engine']:.0f} s"])
    return table(["model", "`model.zero_init`", "peak after the model, per rank", "vs built whole",
                  "model / ranks + largest parameter", "peak after the engine, per rank", "start-up"], "llrrrrr", rows)


def zero_init_summary() -> str:
    d = load("zero_init.json")
    big = d["computed"]
    per_node = big["whole_per_rank_bytes"] * big["ranks"]
    return (f"Measured {d['date']} with `python bench/zero_init.py` ({d['args']['ranks']} CPU ranks, random init, fp32, "
            f"1-minute load {d['load_before']:.1f} before and {d['load_after']:.1f} after; `bench/results/zero_init.json`). "
            f"Computed by the same script for {big['model']} ({big['parameters'] / 1e9:.2f}B parameters) on a node of "
            f"{big['ranks']} ranks: built whole, {big['whole_per_rank_bytes'] / 2 ** 30:.1f} GiB per rank "
            f"({per_node / 2 ** 30:.0f} GiB per node) before the engine; partitioned, "
            f"{big['partitioned_per_rank_bytes'] / 2 ** 30:.2f} GiB per rank.")


# -- bench/standard_eval.py: bench/results/standard_eval.json ------------------------------------------
def standard_eval_table() -> str:
    d = load("standard_eval.json")
    rows = [[f"`{r['set']}`", f"`{r['metric']}` / `{r['clip_benchmark_metric']}`", f"{r['dsclip']:.2f}",
             f"{r['clip_benchmark']:.2f}", f"{r['difference']:.1g}"] for r in d["rows"]]
    return table(["set", "dsclip / CLIP_benchmark metric", "dsclip (%)", "CLIP_benchmark (x 100)", "difference"],
                 "llrrr", rows)


def standard_eval_summary() -> str:
    d = load("standard_eval.json")
    return (f"Measured {d['date']} with `python bench/standard_eval.py` (clip-benchmark {d['clip_benchmark_version']}, "
            f"model: {d['model']}; {d['images']['fashion']} Fashion-MNIST test images, {d['images']['shapes']} held-out "
            f"shapes, {d['images']['captioned']} of them with five captions each; `bench/results/standard_eval.json`): "
            f"the largest difference between the two tools is {d['max_abs_difference']:.1g} points.")


# -- bench/strategies.py: bench/results/strategies.json ----------------------------------------------
def strategies_table() -> str:
    d = load("strategies.json")
    pre = d["pretrained"]
    rows = [["pretrained (default run)", f"{pre['eval/fashion/top1']:.1f}", f"{pre['eval/shapes/top1']:.1f}", "", "",
             "", ""]]
    for r in d["rows"]:
        rows.append([r["strategy"], f"{r['task_top1']:.1f}", f"{r['kept_top1']:.1f}",
                     f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.1f}%)", f"{r['optimizer_mb']:.2f}",
                     f"{r['grads_mb']:.2f}", f"{r['samples_per_s']:.0f}"])
    return table(["strategy", "Fashion-MNIST top-1 % (task)", "shapes top-1 % (kept)", "trainable parameters",
                  "optimizer MiB / rank", "grads MiB / rank", "samples/s"], "lrrrrrr", rows)


def strategies_summary() -> str:
    d = load("strategies.json")
    shipped, partitioned = (d["memory"][i:i + 2] for i in (0, 2))
    full, lora = shipped
    return (f"Measured {d['date']} with `python bench/strategies.py` (2 CPU ranks, ZeRO-3, fp32; 1-minute load "
            f"{d['load_before']:.1f} before and {d['load_after']:.1f} after; `bench/results/strategies.json`, plot "
            f"`bench/results/strategies.png`). ViT-B-32 from random init, one step on 2 ranks, per rank: full "
            f"fine-tuning holds {full['grads_mb']:,.0f} MiB of gradients and {full['optimizer_mb']:,.0f} MiB of "
            f"optimizer state, LoRA rank 16 {lora['grads_mb']:.1f} and {lora['optimizer_mb']:.1f} MiB, "
            f"{100 * lora['grads_optimizer_vs_full']:.1f}% of full's. With the adapters' own weights counted: "
            f"{100 * partitioned[1]['trainable_state_vs_full']:.1f}% with every parameter partitioned "
            f"(`stage3_param_persistence_threshold: 0`), {100 * lora['trainable_state_vs_full']:.1f}% with the "
            f"shipped `ds_configs/zero3.json`, which keeps parameters below "
            f"{lora['persistence_threshold']:,} elements (every adapter matrix) whole on each rank beside their "
            f"shard ({lora['adapter_params_mb']:.1f} MiB).")


# -- bench/train.py --systems ... zero3+pd50: bench/results/train_cpu_patch_dropout.json -------------------
def patch_dropout_table() -> str:
    d = load("train_cpu_patch_dropout.json")
    zero3 = next(r for r in d["rows"] if r["system"] == "zero3")
    labels = {"open_clip_loop": "open_clip_loop (DDP)", "zero3": "dsclip ZeRO-3",
              "zero3+pd50": "dsclip ZeRO-3, patch dropout 0.5"}
    rows = [[labels[r["system"]], f"{r['samples_per_s']:.0f}", ratio(r["samples_per_s"] / zero3["samples_per_s"])]
            for r in d["rows"]]
    args = d["args"]
    lead = (f"`python bench/train.py --systems {' '.join(args['systems'])} --model {args['model']} --image-size "
            f"{args['image_size']} --ranks {' '.join(map(str, args['ranks']))} --batch-size "
            f"{' '.join(map(str, args['batch_size']))} --repeats {args['repeats']}` (the best of the repeats, ratios "
            f"of the best; {d['rows'][0]['ranks']} CPU ranks, fp32; `bench/results/train_cpu_patch_dropout.json`):")
    return lead + "\n\n" + table(["system", "samples/s", "vs ZeRO-3"], "lrr", rows)


BLOCKS: dict[str, Callable[[], str]] = {f.__name__: f for f in [
    default_run_table, default_run_median, default_run_slow_windows, default_run_summary,
    train_table, zero3_repeats_summary, train_ckpt_table, scaling_table,
    loss_conditions, loss_table, loss_largest_batch, loss_speed,
    data_table, data_ratio, data_stages,
    wiseft_table, wiseft_summary, wiseft_stage_times,
    test_tiers, grad_cache_table, grad_cache_summary, faults_table, zero_init_table, zero_init_summary,
    strategies_table, strategies_summary, patch_dropout_table, standard_eval_table, standard_eval_summary,
]}


# -- the blocks in the files -----------------------------------------------------------------------
def marker_lines(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} ({FIX}) -->", f"<!-- /generated:{name} -->"


def scan(lines: list[str]) -> Iterator[tuple[str, int, int]]:
    """(kind, index, other) per line outside ``` fences: ('block', start, end) for each closed block,
    ('unclosed', start, -1) for a start marker without its end, ('stray', i, -1) for an end without a start."""
    fenced, open_at = False, None
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        start, end = START.match(line), END.match(line)
        if start:
            if open_at is not None:
                yield "unclosed", open_at, -1
            open_at = i
        elif end:
            if open_at is not None and START.match(lines[open_at]).group(1) == end.group(1):
                yield "block", open_at, i
                open_at = None
            else:
                yield "stray", i, -1
    if open_at is not None:
        yield "unclosed", open_at, -1


def outside_blocks(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every line outside generated blocks and ``` code fences."""
    lines = text.splitlines()
    inside = set()
    for kind, start, end in scan(lines):
        if kind == "block":
            inside.update(range(start, end + 1))
    fenced = False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced and i not in inside:
            yield i + 1, line


def render_file(path: Path, repo: Path = REPO) -> tuple[str, list[str], set[str]]:
    """(text with every known block rendered, problems other than drift, names found)."""
    lines = path.read_text().splitlines(keepends=True)
    rel = path.relative_to(repo)
    problems, names, out, last = [], set(), [], 0
    for kind, start, end in scan([line.rstrip("\n") for line in lines]):
        name_line = lines[start].rstrip("\n")
        name = (START.match(name_line) or END.match(name_line)).group(1)
        if kind != "block":
            problems.append(f"{rel}:{start + 1}: {'unclosed marker' if kind == 'unclosed' else 'end marker without start'}"
                            f" for {name!r}")
            continue
        names.add(name)
        if name not in BLOCKS:
            problems.append(f"{rel}:{start + 1}: unknown block {name!r} (known: {', '.join(BLOCKS)})")
            continue
        out += lines[last:start + 1]
        out.append(BLOCKS[name]().rstrip("\n") + "\n")
        last = end
    out += lines[last:]
    return "".join(out), problems, names


def check(repo: Path = REPO, write: bool = False) -> list[str]:
    """Problems (drifted blocks, unknown / unclosed markers, known names used nowhere); with write=True
    the drifted blocks are rewritten instead of reported."""
    problems, seen = [], set()
    for path in doc_files(repo):
        if not path.exists():
            continue
        text = path.read_text()
        rendered, file_problems, names = render_file(path, repo)
        problems += file_problems
        seen |= names
        if rendered == text:
            continue
        if write:
            path.write_text(rendered)
            print(f"rewrote {path.relative_to(repo)}")
            continue
        for (line, name, old), (_, _, new) in zip(_blocks(text), _blocks(rendered)):
            if old != new:
                problems.append(f"{path.relative_to(repo)}:{line}: block {name!r} differs from what its JSON renders")
    problems += [f"block {name!r} is in no file (README.md, docs/*.md)" for name in BLOCKS if name not in seen]
    return problems


def _blocks(text: str) -> Iterator[tuple[int, str, str]]:
    """(1-based line of the start marker, name, content) of each closed block, in order."""
    lines = text.splitlines()
    for kind, start, end in scan(lines):
        if kind == "block":
            yield start + 1, START.match(lines[start]).group(1), "\n".join(lines[start + 1:end])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 listing what differs")
    args = parser.parse_args()
    problems = check(write=not args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems and args.check:
        print(f"fix: {FIX}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
