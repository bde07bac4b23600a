"""make-shards: shards + manifest from each source kind, restartable writing, reading back through the loader."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsclip.data.shard_writer import ImageEncoding, write_shards
from dsclip.data.sources import FASHION_MNIST_DIR, OPENCLIPART_DIR, Sample, open_source
from dsclip.data.config import WebDataConfig
from dsclip.data.shards import build_webdataset_loader
from dsclip_testutils import require_data


def save_png(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (12, 10), (value,) * len(mode)).save(path)


def make_folder(root: Path, per_class: int = 5) -> None:
    for c, name in enumerate(["ankle_boot", "sandal"]):
        for i in range(per_class):
            save_png(root / name / f"{i}.png", 10 * c + i)


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


class CountingSource:
    """Wraps a source; raises after `fail_at` loads to simulate an interrupted run."""

    def __init__(self, inner, fail_at: int = -1):
        self.inner, self.fail_at, self.loads = inner, fail_at, 0
        self.name, self.class_names = inner.name, inner.class_names

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, index: int) -> Sample | None:
        if self.loads == self.fail_at:
            raise KeyboardInterrupt
        self.loads += 1
        return self.inner.load(index)


def test_labelled_shards_evaluate_with_the_class_names_of_their_manifest(tmp_path):
    from dsclip.eval.datasets import ShardPairs
    make_folder(tmp_path / "src")
    write_shards(open_source(str(tmp_path / "src"), templates=["a photo of a {}."]), str(tmp_path / "out"),
                 per_shard=4, encoding=ImageEncoding(image_size=20))
    shards = ShardPairs(str(tmp_path / "out" / "shard-{000000..000002}.tar"), lambda image: image, max_samples=0)
    assert shards.class_names == ["ankle boot", "sandal"] and len(shards) == 10
    assert sorted({label for _, label, _ in shards.samples}) == [0, 1]


def test_folder_source_writes_shards_manifest_and_labels(tmp_path):
    make_folder(tmp_path / "src")
    manifest = write_shards(open_source(str(tmp_path / "src"), templates=["a photo of a {}."]), str(tmp_path / "out"),
                            per_shard=4, encoding=ImageEncoding(image_size=20))
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2] and manifest["total"] == 10 and manifest["complete"]
    assert manifest["class_names"] == ["ankle boot", "sandal"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    files = members(tmp_path / "out" / "shard-000002.tar")
    assert sorted(files) == ["000000008.jpg", "000000008.json", "000000008.txt", "000000009.jpg", "000000009.json", "000000009.txt"]
    assert files["000000008.txt"] == b"a photo of a sandal."
    assert json.loads(files["000000008.json"])["label"] == 1
    assert Image.open(io.BytesIO(files["000000008.jpg"])).size == (24, 20)  # shorter side -> image_size
    with tarfile.open(tmp_path / "out" / "shard-000002.tar") as tar:  # one header per member, no pax header
        assert not any(member.pax_headers for member in tar.getmembers())


def test_shards_read_back_through_the_loader_with_manifest_counts(tmp_path):
    make_folder(tmp_path / "src")
    write_shards(open_source(str(tmp_path / "src")), str(tmp_path / "out"), per_shard=3)
    transform = lambda img: torch.zeros(3, 4, 4)  # noqa: E731
    tokenizer = lambda texts: torch.tensor([[len(t)] for t in texts])  # noqa: E731
    cfg = WebDataConfig(urls=[str(tmp_path / "out" / "shard-{000000..000003}.tar")])
    dl = build_webdataset_loader(cfg, transform=transform, tokenizer=tokenizer, batch_size=1, train=False)
    assert len(dl) == 10 and len(list(dl)) == 10


def test_rerun_after_interruption_skips_finished_shards(tmp_path):
    make_folder(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(CountingSource(open_source(str(tmp_path / "src")), fail_at=6), str(out), per_shard=4)
    partial = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in partial["shards"]] == ["shard-000000.tar"] and not partial["complete"]
    assert not (out / "shard-000001.tar").exists() and not list(out.glob(".shard-*")), "no half shard is left"
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    source = CountingSource(open_source(str(tmp_path / "src")))
    manifest = write_shards(source, str(out), per_shard=4)
    assert source.loads == 6  # shard 0 was not rewritten
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first
    assert manifest["total"] == 10 and manifest["complete"]
    with pytest.raises(ValueError, match="other settings"):
        write_shards(open_source(str(tmp_path / "src")), str(out), per_shard=5)


def test_csv_source_skips_and_counts_unusable_rows(tmp_path):
    save_png(tmp_path / "img" / "a.png", 1)
    save_png(tmp_path / "img" / "clipart.png", 0, mode="RGBA")  # fully transparent
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    save_png(tmp_path / "img" / "uncaptioned.png", 2)
    rows = ["filepath,title", "img/a.png,first", "img/broken.jpg,broken", "img/missing.png,gone", "img/a.png,",
            "img/clipart.png,clip", "img/uncaptioned.png,"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    manifest = write_shards(open_source(str(tmp_path / "pairs.csv")), str(tmp_path / "out"), per_shard=10,
                            encoding=ImageEncoding(image_format="png"))
    # One sample per image (a.png's empty second row adds no caption): broken, missing, uncaptioned skipped.
    assert manifest["total"] == 2 and manifest["skipped"] == 3 and manifest["class_names"] is None
    files = members(tmp_path / "out" / "shard-000000.tar")
    assert files["000000000.txt"] == b"first" and files["000000003.txt"] == b"clip"
    assert Image.open(io.BytesIO(files["000000003.png"])).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a .csv/.tsv file, a folder"):
        open_source(str(tmp_path / "nothing-here"))


def test_fashion_mnist_idx_files_give_labelled_captions():
    require_data(FASHION_MNIST_DIR, "dataset-fashion-mnist")
    train, test = open_source("fashion-mnist"), open_source("fashion-mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    sample = train.load(0)
    assert sample.meta == {"label": 9, "class_name": "Ankle boot"}  # the first training image is an ankle boot
    assert sample.caption == "a photo of a ankle boot." and sample.image.size == (28, 28)
    assert np.asarray(sample.image).std() > 10
    assert np.bincount(train.labels, minlength=10).tolist() == [6000] * 10


def test_openclipart_collection_gives_titled_captions():
    require_data(OPENCLIPART_DIR, "openclipart-png")
    source = open_source("openclipart")
    assert len(source) > 8000 and "animals" in source.class_names
    sample = source.load(0)
    assert sample.caption.startswith("clip art of ") and sample.image.mode == "RGB"


def write_sources(folder: Path) -> dict[str, bytes]:
    """One file per storable kind, contents random so that a re-encode could not reproduce them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    pixels = rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.jpg", quality=77)
    Image.fromarray(pixels).save(folder / "drawing.png")
    Image.fromarray(pixels).save(folder / "web.webp", quality=60)
    Image.fromarray(pixels[:, :, 0]).save(folder / "gray.jpg", quality=80)
    Image.fromarray(pixels).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(pixels).save(folder / "old.bmp")
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def written_images(shard: Path) -> dict[str, tuple[str, bytes]]:
    """{source file name: (extension, bytes)} of a shard written from the CSV below."""
    files = members(shard)
    return {Path(json.loads(files[name]).get("path")).name: next(
        (Path(other).suffix[1:], data) for other, data in files.items()
        if other.startswith(name.split(".")[0]) and Path(other).suffix[1:] in ("jpg", "png", "webp"))
        for name in files if name.endswith(".json")}


def csv_of(folder: Path, names: list[str]) -> str:
    (folder.parent / "pairs.csv").write_text("filepath,title\n" + "".join(f"{folder / n},{n}\n" for n in names))
    return str(folder.parent / "pairs.csv")


def test_source_bytes_are_copied_unchanged_where_they_can_be(tmp_path):
    sources = write_sources(tmp_path / "src")
    names = sorted(sources)
    write_shards(open_source(csv_of(tmp_path / "src", names)), str(tmp_path / "out"), per_shard=10)
    stored = written_images(tmp_path / "out" / "shard-000000.tar")
    for name, extension in (("photo.jpg", "jpg"), ("drawing.png", "png"), ("web.webp", "webp"), ("gray.jpg", "jpg")):
        assert stored[name] == (extension, sources[name]), name  # bit-identical
    # Transparency is composited onto white by every source, which the file's bytes would not show;
    # a BMP is no format to ship: both are encoded anew (--format, JPEG by default).
    for name in ("alpha.png", "old.bmp"):
        extension, data = stored[name]
        assert extension == "jpg" and data != sources[name] and Image.open(io.BytesIO(data)).format == "JPEG"


def test_max_side_and_reencode_encode_anew(tmp_path):
    sources = write_sources(tmp_path / "src")
    csv = csv_of(tmp_path / "src", ["photo.jpg", "drawing.png"])
    write_shards(open_source(csv), str(tmp_path / "small"), per_shard=10, encoding=ImageEncoding(max_side=32))
    for name, (extension, data) in written_images(tmp_path / "small" / "shard-000000.tar").items():
        assert extension == "jpg" and Image.open(io.BytesIO(data)).size == (32, 20), name  # 64 x 40 -> longer side 32
    write_shards(open_source(csv), str(tmp_path / "large"), per_shard=10, encoding=ImageEncoding(max_side=64))
    assert written_images(tmp_path / "large" / "shard-000000.tar")["photo.jpg"] == ("jpg", sources["photo.jpg"])
    write_shards(open_source(csv), str(tmp_path / "again"), per_shard=10,
                 encoding=ImageEncoding(reencode=True, image_format="png"))
    stored = written_images(tmp_path / "again" / "shard-000000.tar")
    assert stored["drawing.png"][0] == "png" and stored["photo.jpg"][0] == "png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored["drawing.png"][1]))),
                          np.asarray(Image.open(tmp_path / "src" / "drawing.png")))  # PNG re-encode is lossless
    with pytest.raises(ValueError, match="other settings"):  # copied and re-encoded shards never mix in one folder
        write_shards(open_source(csv), str(tmp_path / "again"), per_shard=10)
