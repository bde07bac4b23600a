"""CLIP_benchmark's data layout: multi-caption retrieval and per-class recall against brute force,
make-shards writing the layout, and the reader's errors."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dsclip.data.clip_benchmark import index_samples, read_benchmark
from dsclip.data.shard_writer import ImageEncoding, write_shards
from dsclip.data.sources import CsvSource, FolderSource
from dsclip.data.config import CsvConfig
from dsclip.data.templates import SIMPLE_TEMPLATES
from dsclip.eval.metrics import class_recall_counts, mean_per_class_recall, retrieval_metrics


def multi_caption_features(captions_per_image: list[int], d: int = 16, noise: float = 1.2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(len(captions_per_image), d, generator=gen)
    owner = torch.repeat_interleave(torch.arange(len(captions_per_image)), torch.tensor(captions_per_image))
    texts = images[owner] + noise * torch.randn(len(owner), d, generator=gen)
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1), owner


def brute_force_multi_caption(images, texts, owner) -> dict[str, float]:
    """Full sorts of the whole score matrix (random data: no ties). Image to text: the position of
    the first of the image's captions in its ranking; text to image: the position of its image."""
    scores = images @ texts.T
    image_ranks = torch.tensor([
        next(pos for pos, t in enumerate(scores[i].argsort(descending=True).tolist()) if owner[t] == i) + 1
        for i in range(len(images))])
    text_ranks = torch.tensor([
        scores[:, t].argsort(descending=True).tolist().index(int(owner[t])) + 1 for t in range(len(texts))])
    out = {}
    for direction, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in (1, 5, 10):
            out[f"{direction}_R@{k}"] = 100.0 * (ranks <= k).double().mean().item()
        out[f"{direction}_mean_rank"] = ranks.double().mean().item()
        out[f"{direction}_median_rank"] = ranks.double().median().item() if len(ranks) % 2 else \
            ranks.double().sort().values[len(ranks) // 2 - 1: len(ranks) // 2 + 1].mean().item()
    return out


@pytest.mark.parametrize("chunk_size", [1, 9, 1000])
def test_multi_caption_retrieval_matches_brute_force(chunk_size):
    counts = [5] * 40 + [1, 2, 3, 4, 7] * 3  # COCO-like five captions, and a few ragged images
    images, texts, owner = multi_caption_features(counts)
    metrics = retrieval_metrics(images, texts, text_image=owner, chunk_size=chunk_size)
    expected = brute_force_multi_caption(images, texts, owner)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert 10 < expected["image_to_text_R@1"] < 90 and 10 < expected["text_to_image_R@1"] < 90


def test_multi_caption_retrieval_does_not_depend_on_caption_order():
    images, texts, owner = multi_caption_features([3] * 30 + [2] * 11)
    order = torch.randperm(len(owner), generator=torch.Generator().manual_seed(1))
    assert retrieval_metrics(images, texts[order], text_image=owner[order], chunk_size=8) == \
        pytest.approx(retrieval_metrics(images, texts, text_image=owner, chunk_size=8))


def test_one_caption_per_image_is_the_paired_case():
    images, texts, owner = multi_caption_features([1] * 50)
    assert retrieval_metrics(images, texts, text_image=owner) == pytest.approx(retrieval_metrics(images, texts))


@pytest.mark.parametrize("owner,message", [
    (torch.tensor([0, 0, 1]), "image 2 has no caption"),
    (torch.tensor([0, 1, 3, 2]), "outside"),
    (torch.tensor([0, 1]), "one image index per text"),
])
def test_multi_caption_retrieval_rejects_bad_owners(owner, message):
    images = F.normalize(torch.randn(3, 4), dim=-1)
    texts = F.normalize(torch.randn(len(owner) if len(owner) != 2 else 3, 4), dim=-1)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts, text_image=owner)


def test_mean_per_class_recall_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 5, 20, 0, 9])])  # class 3 never appears
    logits = torch.randn(len(labels), 5, generator=gen) + 1.5 * F.one_hot(labels, 5)
    hits, counts = class_recall_counts(logits, labels, 5)
    predicted = logits.argmax(dim=1)
    present = [c for c in range(5) if (labels == c).any()]
    expected = sum(((predicted == c) & (labels == c)).sum().item() / (labels == c).sum().item()
                   for c in present) / len(present)
    assert mean_per_class_recall(hits, counts) == pytest.approx(100 * expected)
    top1 = 100 * (predicted == labels).double().mean().item()
    assert abs(mean_per_class_recall(hits, counts) - top1) > 1, "unbalanced classes: the two must differ"


def write_class_folder(root: Path, classes: dict[str, list[tuple[int, int, int]]]) -> None:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (12 + i, 10), colour).save(root / name / f"{i}.png")


def tar_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_make_shards_writes_a_classification_set_clip_benchmark_reads(tmp_path):
    write_class_folder(tmp_path / "src", {"cat": [(200, 0, 0), (0, 200, 0), (0, 0, 200)], "dog": [(9, 9, 9)] * 2})
    write_shards(FolderSource(str(tmp_path / "src"), list(SIMPLE_TEMPLATES)), str(tmp_path / "bench"), per_shard=2,
                 encoding=ImageEncoding(image_format="png"), layout="clip_benchmark", split="test")
    root = tmp_path / "bench"
    # The files exactly as CLIP_benchmark's build_wds_dataset reads them.
    assert (root / "classnames.txt").read_text() == "cat\ndog\n"
    assert (root / "zeroshot_classification_templates.txt").read_text().splitlines() == \
        ["a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.", "{c}"]
    assert (root / "dataset_type.txt").read_text().strip() == "classification"
    assert (root / "test" / "nshards.txt").read_text().strip() == "3"
    written = {k: v for i in range(3) for k, v in tar_samples(root / "test" / f"{i}.tar").items()}
    assert sorted(written) == [f"s{i:07d}" for i in range(5)]
    assert [int(s["cls"]) for _, s in sorted(written.items())] == [0, 0, 0, 1, 1]
    first = Image.open(io.BytesIO(written["s0000001"]["png"]))
    assert first.size == (13, 10) and first.getpixel((0, 0)) == (0, 200, 0)

    bench = read_benchmark(root, "test")
    assert bench.kind == "classification" and bench.class_names == ["cat", "dog"]
    assert bench.templates == list(SIMPLE_TEMPLATES)
    samples = index_samples(bench.shards)
    assert [s["cls"].read() for s in samples] == [b"0", b"0", b"0", b"1", b"1"]
    assert samples[1]["png"].read() == written["s0000001"]["png"]


def test_make_shards_groups_a_csv_into_a_multi_caption_retrieval_set(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"{i}.png")
        rows += [(str(folder / f"{i}.png"), f"caption {i}.{j}") for j in range(5 - i)]
    rows.insert(2, rows.pop())  # image 2's last caption comes third: rows of an image need not be adjacent
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows))
    source = CsvSource(CsvConfig(path=str(csv)))
    write_shards(source, str(tmp_path / "bench"), per_shard=10, layout="clip_benchmark", split="test")

    bench = read_benchmark(tmp_path / "bench", "test")
    assert bench.kind == "retrieval" and bench.class_names is None
    assert not (tmp_path / "bench" / "classnames.txt").exists()
    captions = [s["txt"].read().decode().splitlines() for s in index_samples(bench.shards)]
    assert captions == [[f"caption 0.{j}" for j in range(5)],  # images in order of first appearance
                        ["caption 2.2", "caption 2.0", "caption 2.1"], [f"caption 1.{j}" for j in range(4)]]


def test_make_shards_resumes_a_clip_benchmark_set(tmp_path):
    write_class_folder(tmp_path / "src", {"a": [(1, 2, 3)] * 3, "b": [(4, 5, 6)] * 3})
    source = FolderSource(str(tmp_path / "src"), list(SIMPLE_TEMPLATES))
    write_shards(source, str(tmp_path / "bench"), per_shard=2, layout="clip_benchmark", split="test")
    shard = tmp_path / "bench" / "test" / "1.tar"
    before = shard.stat().st_mtime_ns
    (tmp_path / "bench" / "test" / "2.tar").unlink()
    manifest = write_shards(source, str(tmp_path / "bench"), per_shard=2, layout="clip_benchmark", split="test")
    assert shard.stat().st_mtime_ns == before and manifest["total"] == 6
    assert (tmp_path / "bench" / "test" / "2.tar").is_file()
    with pytest.raises(ValueError, match="other settings"):
        write_shards(source, str(tmp_path / "bench"), per_shard=3, layout="clip_benchmark", split="test")


def test_reader_errors_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_benchmark(tmp_path / "nope", "test")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "nshards.txt").write_text("2\n")
    with pytest.raises(ValueError, match=r"no split 'test'.*splits found: \['train'\]"):
        read_benchmark(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="0.tar is missing"):
        read_benchmark(tmp_path, "train")
    for i in range(2):
        with tarfile.open(tmp_path / "train" / f"{i}.tar", "w"):
            pass
    with pytest.raises(ValueError, match="without classnames.txt"):
        read_benchmark(tmp_path, "train")
    (tmp_path / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="multi-label"):
        read_benchmark(tmp_path, "train")
    (tmp_path / "dataset_type.txt").write_text("retrieval\n")
    assert read_benchmark(tmp_path, "train").kind == "retrieval"


def test_an_eval_task_of_the_wrong_kind_or_a_sample_without_its_label_is_a_clear_error(tmp_path):
    from dsclip.eval.config import RetrievalTask, ZeroShotTask
    from dsclip.eval.datasets import BenchmarkImages, prompts_for

    write_class_folder(tmp_path / "src", {"cat": [(200, 0, 0)] * 2, "dog": [(9, 9, 9)] * 2})
    write_shards(FolderSource(str(tmp_path / "src"), list(SIMPLE_TEMPLATES)), str(tmp_path / "bench"),
                 layout="clip_benchmark", split="test", templates=["art of a {}."])
    root = str(tmp_path / "bench")
    with pytest.raises(ValueError, match=r"eval.retrieval 'r': .* is a classification set; list it under eval.zeroshot"):
        BenchmarkImages(RetrievalTask(name="r", source="clip_benchmark", path=root), lambda image: image)
    task = ZeroShotTask(name="z", source="clip_benchmark", path=root)
    dataset = BenchmarkImages(task, lambda image: image.size)
    assert [dataset[i][:2] for i in range(4)] == [((12, 10), 0), ((13, 10), 0), ((12, 10), 1), ((13, 10), 1)]
    assert prompts_for(task, dataset) == (["cat", "dog"], ["art of a {}."])  # the set's own templates
    chosen = ZeroShotTask(name="z", source="clip_benchmark", path=root, templates=["imagenet"])
    assert prompts_for(chosen, dataset)[1][0] == "a photo of a {}."  # templates the task names win

    with tarfile.open(tmp_path / "bench" / "test" / "0.tar", "w") as tar:  # a sample without its label
        info = tarfile.TarInfo("s0000000.png")
        data = (tmp_path / "src" / "cat" / "0.png").read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"sample 0 \(\['png'\]\) lacks an image or its cls"):
        BenchmarkImages(task, lambda image: image)


class PixelModel(torch.nn.Module):
    """A stand-in CLIP for RetrievalEval: an image's features are a fixed projection of its pixels;
    caption j of sample i encodes sample i's pixels plus noise j, so captions match their image."""

    def __init__(self, pixels_of: dict[int, torch.Tensor]):
        super().__init__()
        self.projection = torch.randn(192, 16, generator=torch.Generator().manual_seed(0))
        self.pixels_of = pixels_of

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.flatten(1) @ self.projection, dim=-1)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        noise = torch.Generator()
        return F.normalize(torch.stack([
            self.pixels_of[i] @ self.projection + 8.0 * torch.randn(16, generator=noise.manual_seed(i * 10 + j))
            for i, j in tokens.tolist()]), dim=-1)

    def forward(self, images=None, texts=None):
        return (None if images is None else self.encode_images(images),
                None if texts is None else self.encode_texts(texts), torch.tensor(1.0), None)


def test_retrieval_on_shards_with_five_captions_per_image_matches_brute_force(tmp_path):
    from dsclip.eval.datasets import ShardPairs
    from dsclip.eval.tasks import RetrievalEval
    from generated_data import jpeg, write_shards as write_generated_shards

    urls = write_generated_shards(tmp_path / "d", n_shards=3, per_shard=13, captions=5)
    to_tensor = lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255  # noqa: E731
    dataset = ShardPairs(urls, to_tensor, max_samples=0)
    assert all(len(captions) == 5 for _, _, captions in dataset.samples)
    pixels = {i: to_tensor(Image.open(io.BytesIO(jpeg(i))).convert("RGB")).flatten() for i in range(39)}
    model = PixelModel(pixels)
    tokenizer = lambda captions: torch.tensor([[int(c.split()[1]), int(c.split()[3])] for c in captions])  # noqa: E731
    metrics = RetrievalEval("five", dataset, tokenizer, batch_size=8, max_samples=0,
                            loss_fn=lambda images, texts, scale: (images * texts).sum()).run(model, "cpu", torch.float32)
    images = model.encode_images(torch.stack([dataset[i][0] for i in range(39)]))
    texts = model.encode_texts(torch.tensor([[i, j] for i in range(39) for j in range(5)]))
    expected = brute_force_multi_caption(images, texts, torch.arange(39).repeat_interleave(5))
    for key, value in expected.items():
        assert metrics[f"eval/five/{key}"] == pytest.approx(value), key
    assert 10 < expected["image_to_text_R@1"] < 90 and 10 < expected["text_to_image_R@1"] < 90
