"""Evaluation: dsclip's zero-shot and 2-rank retrieval numbers equal plain open_clip's; logging sinks and the forgetting table."""
import io
import json
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image

from dsclip.config import load_config
from dsclip.data import synthetic
from dsclip.training.ds_config import load_ds_config
from dsclip_testutils import REPO, ds_config, free_port, init_single_rank, make_trainer, read_metrics, subprocess_env


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    """Weights of a briefly trained tiny CLIP (above chance, far from perfect: a sensitive comparison)."""
    tmp_path = tmp_path_factory.mktemp("weights")
    init_single_rank()
    cfg = load_config(None, ["train.max_steps=30", "optim.warmup_steps=5", "data.batch_size=32",
                             "eval.at_start=false", "eval.at_end=false", f"output_dir={tmp_path}"])
    make_trainer(cfg, load_ds_config(str(ds_config(3, tmp_path)))).train()
    return tmp_path / "default" / "export"


# The zero-shot task written out here, not imported: a bug in dsclip's class names or prompt
# templates must show as a difference, not cancel out. Class i is drawn as CLASS_NAMES[i].
CLASS_NAMES = ["red circle", "red triangle", "red cross", "red ring", "green circle", "green triangle", "green cross",
               "green ring", "blue circle", "blue triangle", "blue cross", "blue ring"]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}"]  # dsclip's default ("simple")
EVAL_SAMPLES = 301  # odd: 2 ranks get 151 and 150 images, so one rank evaluates a padded batch


def plain_open_clip(export_dir):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{export_dir}")


def plain_open_clip_top1(export_dir, num_samples: int) -> float:
    """Top-1 of open_clip's own zero-shot classifier (build_zero_shot_classifier, open_clip's
    tokenizer and eval transform) in one process. From dsclip only the held-out images and their
    labels, as the synthetic data set draws them (64 px, brought to the model's size by open_clip)."""
    model, preprocess, tokenizer = plain_open_clip(export_dir)
    samples = [synthetic.render_sample(synthetic.EVAL_SEED_OFFSET, i, len(CLASS_NAMES), 64)
               for i in range(num_samples)]
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, CLASS_NAMES, TEMPLATES,
                                                          num_classes_per_batch=None)
        images = torch.stack([preprocess(image) for image, _, _ in samples])
        labels = torch.tensor([label for _, _, label in samples])
        predicted = (model.encode_image(images, normalize=True) @ classifier).argmax(dim=1)
    return 100 * (predicted == labels).double().mean().item()


def dsclip_eval(tmp_path, ranks: int, *args: str) -> dict[str, float]:
    """`dsclip eval ARGS` under ZeRO-3 on one process or `ranks` torchrun ranks; its metrics."""
    out = tmp_path / "metrics.json"
    args = ["eval", *args, "--out", str(out), "--deepspeed_config", str(ds_config(3, tmp_path))]
    if ranks == 1:
        cmd = [sys.executable, "-m", "dsclip.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), "-m", "dsclip.cli", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks", [1, 2])
def test_zeroshot_accuracy_equals_plain_open_clip(trained_weights, tmp_path, ranks):
    metrics = dsclip_eval(tmp_path, ranks, "--pretrained", str(trained_weights), "--zeroshot", "synthetic",
                          "--set", f"data.synthetic.eval_samples={EVAL_SAMPLES}")
    expected = plain_open_clip_top1(trained_weights, EVAL_SAMPLES)
    assert 15 < expected < 95, "a mid-range accuracy makes the comparison meaningful"
    assert metrics["eval/synthetic/top1"] == pytest.approx(expected, abs=1e-9)


RETRIEVAL_PAIRS = 301  # odd: rank 0 encodes 151 pairs, rank 1 150 and one padding pair


def write_pairs(folder, n: int) -> list[tuple[str, str]]:
    """A CSV of `n` held-out synthetic images with captions made unique by a number (identical
    captions would tie, and ties are decided by the last bit of each encoder's arithmetic)."""
    folder.mkdir()
    rows = []
    for i in range(n):
        image, caption, _ = synthetic.render_sample(synthetic.EVAL_SEED_OFFSET + 7, i, 12, 64)
        image.save(folder / f"{i}.png")
        rows.append((str(folder / f"{i}.png"), f"{caption} number {i}"))
    (folder / "pairs.csv").write_text("filepath,title\n" + "".join(f"{path},{title}\n" for path, title in rows))
    return rows


def rank_summary(ranks: torch.Tensor) -> dict[str, float]:
    summary = {f"R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    summary["mean_rank"] = ranks.double().mean().item()
    ordered, mid = ranks.double().sort().values, (len(ranks) - 1) // 2
    summary["median_rank"] = ordered[mid].item() if len(ranks) % 2 else (ordered[mid] + ordered[mid + 1]).item() / 2
    return summary


def brute_force_retrieval(export_dir, images: list, captions: list[list[str]],
                          slack: float) -> dict[str, tuple[float, float]]:
    """Recall@k and mean / median rank both ways from plain open_clip in one process and the full
    images x texts similarity matrix. Image i's captions are captions[i]; image to text ranks an
    image's best caption (1 + the other images' captions scoring at least it), text to image a
    text's image (1 + the other images scoring at least it). Each metric as (lowest, highest)
    over the ranks obtained with every score moved by up to `slack`: two correct encoders differ
    in the last bits, and a near tie may go either way."""
    model, preprocess, tokenizer = plain_open_clip(export_dir)
    owner = torch.tensor([i for i, texts in enumerate(captions) for _ in texts])
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
        text_features = model.encode_text(tokenizer([c for texts in captions for c in texts]), normalize=True)
    scores = image_features.double() @ text_features.double().T  # scores[i, t]: image i with text t
    own = owner[None, :] == torch.arange(len(images))[:, None]
    best_own = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
    text_own = scores[owner, torch.arange(len(owner))][:, None]
    bounds = {}
    for direction, table, target, others in (("image_to_text", scores, best_own, ~own),
                                             ("text_to_image", scores.T, text_own, ~own.T)):
        best = rank_summary(1 + ((table > target + slack) & others).sum(dim=1))  # near ties won
        worst = rank_summary(1 + ((table >= target - slack) & others).sum(dim=1))  # near ties lost
        for key in best:
            low, high = sorted((best[key], worst[key]))
            bounds[f"{direction}_{key}"] = (low, high)
    return bounds


def assert_within(metrics: dict[str, float], task: str, expected: dict[str, tuple[float, float]]) -> None:
    for key, (low, high) in expected.items():
        value = metrics[f"eval/{task}/{key}"]  # dsclip averages in float32: 1e-6 relative
        assert low * (1 - 1e-6) <= value <= high * (1 + 1e-6), (key, value, low, high)


@pytest.mark.multiprocess
def test_two_rank_retrieval_equals_brute_force_plain_open_clip(trained_weights, tmp_path):
    rows = write_pairs(tmp_path / "pairs", RETRIEVAL_PAIRS)
    metrics = dsclip_eval(tmp_path, 2, "--pretrained", str(trained_weights), "--zeroshot", "synthetic",
                          "--retrieval", f"csv:{tmp_path / 'pairs' / 'pairs.csv'}", "--set", "eval.batch_size=64",
                          "--set", "data.synthetic.eval_samples=8")  # the zero-shot set, kept small here
    expected = brute_force_retrieval(trained_weights, [Image.open(path).convert("RGB") for path, _ in rows],
                                     [[title] for _, title in rows], slack=1e-5)
    for direction in ("image_to_text", "text_to_image"):
        low, high = expected[f"{direction}_R@10"]
        assert 5 < low and high < 95, ("mid-range recall makes the comparison meaningful", expected)
    assert_within(metrics, "pairs", expected)


BENCHMARK_TEMPLATES = ["a drawing of a {c}.", "{c}, seen up close"]  # not dsclip's defaults: the file's must be read
CAPTION_FORMS = ["{} number {}", "photo {1}: {0}", "{0}, item {1}", "picture {1} shows {0}", "{0} ({1})"]


def write_benchmark_shards(folder, samples: list[dict]) -> None:
    """Shards the way CLIP_benchmark's own converter writes them (key s + 7 digits, lossless webp),
    two of them, and nshards.txt: written here, not by make-shards, so that dsclip's reader is
    checked against the format and not against its own writer."""
    import webdataset as wds
    folder.mkdir(parents=True)
    half = len(samples) // 2
    for shard, part in enumerate((samples[:half], samples[half:])):
        with wds.TarWriter(str(folder / f"{shard}.tar")) as sink:
            for sample in part:
                sink.write(sample)
    (folder / "nshards.txt").write_text("2\n")


def webp(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="webp", lossless=True)
    return buffer.getvalue()


@pytest.mark.multiprocess
def test_two_rank_clip_benchmark_sets_equal_brute_force_plain_open_clip(trained_weights, tmp_path):
    """A classification set (unbalanced classes, the set's own templates) and a retrieval set with
    five captions per image, in CLIP_benchmark's layout; dsclip eval on 2 ranks against plain
    open_clip and brute force in this process."""
    drawn = [synthetic.render_sample(synthetic.EVAL_SEED_OFFSET + 11, i, 12, 64) for i in range(400)]
    kept = [(image, label) for i, (image, _, label) in enumerate(drawn) if label < 4 or i % 4 == 0][:201]
    shapes = tmp_path / "wds_shapes"
    write_benchmark_shards(shapes / "test", [{"__key__": f"s{i:07d}", "webp": webp(image), "cls": label}
                                             for i, (image, label) in enumerate(kept)])
    (shapes / "classnames.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
    (shapes / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in BENCHMARK_TEMPLATES))

    pictures = [synthetic.render_sample(synthetic.EVAL_SEED_OFFSET + 12, i, 12, 64) for i in range(101)]
    captions = [[form.format(caption, i) for form in CAPTION_FORMS] for i, (_, caption, _) in enumerate(pictures)]
    captions[3] = captions[3][:2]  # the count may differ between images
    coco = tmp_path / "wds_coco"
    write_benchmark_shards(coco / "test", [{"__key__": f"s{i:07d}", "webp": webp(image), "txt": "\n".join(texts)}
                                           for i, ((image, _, _), texts) in enumerate(zip(pictures, captions))])
    (coco / "dataset_type.txt").write_text("retrieval\n")

    metrics = dsclip_eval(tmp_path, 2, "--pretrained", str(trained_weights), "--zeroshot", f"clip_benchmark:{shapes}",
                          "--retrieval", f"clip_benchmark:{coco}", "--set", "eval.batch_size=32")

    model, preprocess, tokenizer = plain_open_clip(trained_weights)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, CLASS_NAMES, [t.replace("{c}", "{}") for t in BENCHMARK_TEMPLATES],
            num_classes_per_batch=None)
        logits = model.encode_image(torch.stack([preprocess(image) for image, _ in kept]), normalize=True) @ classifier
    labels = torch.tensor([label for _, label in kept])
    correct = logits.argmax(dim=1) == labels
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
    per_class = [correct[labels == c].double().mean().item() for c in range(12) if (labels == c).any()]
    top1, balanced = 100 * correct.double().mean().item(), 100 * sum(per_class) / len(per_class)
    assert 15 < top1 < 95 and abs(top1 - balanced) > 0.5, "mid-range, and unbalanced enough to tell the two apart"
    assert metrics["eval/wds_shapes/top1"] == pytest.approx(top1, abs=1e-9)
    assert metrics["eval/wds_shapes/top5"] == pytest.approx(100 * top5.double().mean().item(), abs=1e-9)
    assert metrics["eval/wds_shapes/mean_per_class_recall"] == pytest.approx(balanced, abs=1e-9)

    expected = brute_force_retrieval(trained_weights, [image for image, _, _ in pictures], captions, slack=1e-5)
    for direction in ("image_to_text", "text_to_image"):
        low, high = expected[f"{direction}_R@5"]
        assert 5 < low and high < 95, ("mid-range recall makes the comparison meaningful", expected)
    assert_within(metrics, "wds_coco", expected)


def test_run_with_periodic_eval_writes_every_sink_and_the_forgetting_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    init_single_rank()
    cfg = load_config(None, [
        "train.max_steps=6", "optim.warmup_steps=1", "data.batch_size=16", "eval.every_steps=2",
        "logging.log_every=2", "logging.report_to=[jsonl, tensorboard, wandb]", f"output_dir={tmp_path}",
        "eval.batch_size=64", "data.synthetic.eval_samples=64",
        "eval.zeroshot=[{name: shapes}, {name: fashion, source: fashion-mnist, max_samples: 64}]",
        "eval.retrieval=[{name: pairs, source: synthetic, max_samples: 64}]", "eval.forgetting.general=[fashion]"])
    make_trainer(cfg, load_ds_config(str(ds_config(3, tmp_path)))).train()
    run_dir = tmp_path / "default"
    evals = [r for r in read_metrics(run_dir) if "eval/shapes/top1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert {"eval/fashion/top5", "eval/pairs/image_to_text_R@1", "eval/pairs/loss"} <= set(evals[-1])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").rglob("*.wandb"))
    plots = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"train_loss.png", "train_lr.png", "train_logit_scale.png", "eval_shapes_top1.png"} <= plots
    table = (run_dir / "forgetting.md").read_text()
    assert "| eval/fashion/top1 (general) |" in table and "| eval/shapes/top1 |" in table
