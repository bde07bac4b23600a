"""make-shards: write WebDataset shards and a manifest.json from any source of dsclip.data.sources, in
one of two layouts:

- dsclip: shard-NNNNNN.tar with jpg/png + txt + json per sample, what training and evaluation read;
- clip_benchmark: CLIP_benchmark's layout (dsclip.data.clip_benchmark): SPLIT/N.tar with the image
  and the label (cls) or the captions (txt, one per line), class names, templates, the set's type.

Shard i holds source samples [i * per_shard, (i + 1) * per_shard) minus unusable ones, so a re-run skips every
shard whose final file exists: each shard is written under a temporary name and renamed once complete, and the
manifest is rewritten after every shard.
"""
import dataclasses
import io
import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import webdataset as wds
from PIL import Image

from dsclip.data import clip_benchmark
from dsclip.data.shards import MANIFEST
from dsclip.data.sources import Sample, Source
from dsclip.errors import DataSetError
from dsclip.data.templates import SIMPLE_TEMPLATES, check_templates
from dsclip.fileio import atomic_write, atomic_write_text
from dsclip.logs import progress

Layout = Literal["dsclip", "clip_benchmark"]


# PIL format -> the sample's extension (MPO: a camera's JPEG with more pictures after the first one)
COPIED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageEncoding:
    """How make-shards stores an image: the source file's bytes, unchanged, when it is a JPEG, PNG or
    WebP that needs no resizing (no decode and re-encode: smaller shards, faster reads, no generation
    loss); otherwise encoded anew."""
    image_size: int = 0  # resize the shorter side to this (0 = keep)
    max_side: int = 0  # downscale so that the longer side is at most this (0 = keep)
    image_format: Literal["jpg", "png"] = "jpg"  # when encoding
    quality: int = 95  # JPEG quality when encoding
    reencode: bool = False  # encode even where the bytes could be copied

    def validate(self) -> None:
        if self.image_size < 0 or self.max_side < 0 or self.image_format not in ("jpg", "png") \
                or not 1 <= self.quality <= 100:
            raise DataSetError(f"make-shards: image_size={self.image_size} and max_side={self.max_side} must be >= 0, "
                             f"image_format={self.image_format!r} jpg or png, quality={self.quality} in 1..100")

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _copyable(path: Optional[str]) -> Optional[str]:
    """The extension to store `path`'s bytes under, or None when they cannot stand for the decoded
    sample: not a JPEG/PNG/WebP, or transparent (sources composite transparency onto white, which
    the loader's plain RGB conversion of the file would not)."""
    if path is None:
        return None
    with Image.open(path) as img:
        transparent = "A" in img.getbands() or "transparency" in img.info
        return None if transparent else COPIED_FORMATS.get(img.format)


def _target_size(image: Image.Image, encoding: ImageEncoding) -> tuple[int, int]:
    width, height = image.size
    scale = encoding.image_size / min(width, height) if encoding.image_size else 1.0  # the train transform crops later
    if encoding.max_side and max(width, height) * scale > encoding.max_side:
        scale = encoding.max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_bytes(sample: Sample, encoding: ImageEncoding) -> tuple[str, bytes]:
    """(extension, bytes) to store for `sample`'s image."""
    size = _target_size(sample.image, encoding)
    extension = None if encoding.reencode or size != sample.image.size else _copyable(sample.file)
    if extension is not None:
        return extension, Path(sample.file).read_bytes()
    image = sample.image.resize(size, Image.BICUBIC) if size != sample.image.size else sample.image
    buf = io.BytesIO()
    if encoding.image_format == "jpg":
        image.save(buf, format="JPEG", quality=encoding.quality)
    else:
        image.save(buf, format="PNG")
    return encoding.image_format, buf.getvalue()


def _count_keys(path: Path) -> int:
    """Samples in a finished shard (for a shard the manifest does not list yet)."""
    with tarfile.open(path) as tar:
        return len({Path(n).name.split(".", 1)[0] for n in tar.getnames()})


def _load_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.exists():
        return {**settings, "shards": [], "total": 0, "skipped": 0, "complete": False}
    manifest = json.loads(path.read_text())
    # Settings added later, as the shards of an older manifest were written: one layout, re-encoded.
    for key, value in {"layout": "dsclip", "max_side": 0, "quality": 95, "reencode": True}.items():
        manifest.setdefault(key, value)
    differ = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
    if differ:
        raise DataSetError(f"{out} holds shards written with other settings {differ} (existing, requested): "
                         "write to a new --out folder or delete it")
    return manifest


def write_shards(source: Source, out_dir: str, *, per_shard: int = 1000, encoding: ImageEncoding = ImageEncoding(),
                 layout: Layout = "dsclip", split: str = "test",
                 templates: list[str] = SIMPLE_TEMPLATES) -> dict[str, Any]:
    """Write the shards and manifest.json into out_dir (clip_benchmark: out_dir/split, then the set's
    metadata files, `templates` among them); returns the manifest.

    manifest.json: {"source", "per_shard", the ImageEncoding fields, "layout", "class_names",
    "shards": [{"name", "samples"}], "total", "skipped", "complete"}. dsclip.data.shards reads
    per-shard counts from it.
    """
    if per_shard < 1 or layout not in ("dsclip", "clip_benchmark"):
        raise DataSetError(f"make-shards: per_shard={per_shard} must be >= 1, layout={layout!r} dsclip or clip_benchmark")
    encoding.validate()
    check_templates(templates, "make-shards templates")
    out = Path(out_dir) / split if layout == "clip_benchmark" else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": source.name, "samples_in_source": len(source), "per_shard": per_shard,
                **encoding.settings(), "layout": layout, "class_names": source.class_names}
    manifest = _load_manifest(out, settings)
    for stale in out.glob(".*.tar.tmp-*"):  # a killed run's half-written shard
        stale.unlink()
    done = {s["name"]: s for s in manifest["shards"]}
    n_shards = (len(source) + per_shard - 1) // per_shard
    for shard in progress(range(n_shards), total=n_shards, desc="make-shards"):
        name = f"{shard}.tar" if layout == "clip_benchmark" else f"shard-{shard:06d}.tar"
        if (out / name).exists():
            done.setdefault(name, {"name": name, "samples": _count_keys(out / name), "skipped": 0})
            continue
        indices = range(shard * per_shard, min(len(source), (shard + 1) * per_shard))
        counts = {}
        atomic_write(out / name, lambda path: counts.update(
            _write_tar(path, source, indices, encoding, layout)))
        done[name] = {"name": name, **counts}
        _save_manifest(out, manifest, done, complete=False)
    if layout == "clip_benchmark":
        _write_benchmark_metadata(Path(out_dir), out, n_shards, source.class_names, templates)
    return _save_manifest(out, manifest, done, complete=True)


def _sample_fields(index: int, sample: Sample, image: tuple[str, bytes], layout: Layout) -> dict[str, Any]:
    extension, data = image
    if layout == "dsclip":
        return {"__key__": f"{index:09d}", extension: data, "txt": sample.caption, "json": sample.meta}
    label = sample.meta.get("label")  # CLIP_benchmark's writer: key s + index, the label as text
    return {"__key__": f"s{index:07d}", extension: data,
            **({"cls": str(label)} if label is not None else {"txt": sample.caption})}


def _write_tar(path: str, source: Source, indices: range, encoding: ImageEncoding, layout: Layout) -> dict[str, int]:
    """One shard of `indices` at `path`; returns its sample and skip counts."""
    samples = skipped = 0
    # Whole seconds: webdataset's TarWriter stamps each member with time.time() in a pax-format tar
    # (its `format` argument goes unused), where a fractional mtime costs every member an extra pax
    # header: 1 KB more, and one more header to read.
    with wds.TarWriter(path, mtime=int(time.time())) as writer:
        for index in indices:
            sample = source.load(index)
            if sample is None:
                skipped += 1
                continue
            writer.write(_sample_fields(index, sample, image_bytes(sample, encoding), layout))
            samples += 1
    return {"samples": samples, "skipped": skipped}


def _write_benchmark_metadata(root: Path, split_folder: Path, n_shards: int, class_names: list[str] | None,
                              templates: list[str]) -> None:
    """The text files CLIP_benchmark reads beside the shards (written last: a set is complete once
    nshards.txt is there)."""
    if class_names:
        atomic_write_text(root / clip_benchmark.CLASSNAMES, "".join(f"{name}\n" for name in class_names))
        atomic_write_text(root / clip_benchmark.TEMPLATES,
                          "".join(f"{clip_benchmark.to_benchmark_template(t)}\n" for t in templates))
    atomic_write_text(root / clip_benchmark.DATASET_TYPE, "classification\n" if class_names else "retrieval\n")
    atomic_write_text(split_folder / clip_benchmark.NSHARDS, f"{n_shards}\n")


def _save_manifest(out: Path, manifest: dict[str, Any], done: dict[str, dict], complete: bool) -> dict[str, Any]:
    shards = [done[k] for k in sorted(done, key=lambda name: (len(name), name))]  # 2.tar before 10.tar
    manifest.update(shards=shards, total=sum(s["samples"] for s in shards), skipped=sum(s["skipped"] for s in shards),
                    complete=complete)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
