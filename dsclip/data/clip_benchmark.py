"""The folder layout of LAION's CLIP_benchmark data sets (`clip_benchmark eval --dataset wds/...`,
the clip-benchmark/wds_* sets on the Hugging Face Hub): read for evaluation, written by
`dsclip make-shards --layout clip_benchmark`.

    ROOT/classnames.txt                          class names, one per line, in label order
    ROOT/zeroshot_classification_templates.txt   prompts, one per line, "{c}" where the class name goes
    ROOT/dataset_type.txt                        "retrieval"; absent or "classification" otherwise
    ROOT/SPLIT/nshards.txt                       how many shards the split has
    ROOT/SPLIT/0.tar, 1.tar, ...                 per sample: an image (webp, png, jpg or jpeg) and either
                                                 "cls" (the label, as text) or "txt" (captions, one per line)

Evaluation reads a sample's members by offset from an index of the tar headers, so a rank holds
the index, not the images: a 50,000-image set does not sit in the memory of every rank.
"""
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from dsclip.data.config import WebDataConfig
from dsclip.errors import DataSetError
from dsclip.data.templates import check_templates

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
CLASS_PLACEHOLDER = "{c}"  # CLIP_benchmark's class-name slot; dsclip's templates use "{}"
MAX_MEMBER_BYTES = int(WebDataConfig().max_member_mb * 2**20)  # a member above this is refused unread

Kind = Literal["classification", "retrieval"]


@dataclass(frozen=True)
class Member:
    """Where one tar member's bytes are: read with a seek, no tar parsing."""
    shard: Path
    offset: int
    size: int

    def check_size(self) -> None:
        if self.size > MAX_MEMBER_BYTES:
            raise DataSetError(f"{self.shard}: a member of {self.size} bytes at offset {self.offset} is above "
                             f"{MAX_MEMBER_BYTES} bytes; is this file an evaluation shard?")

    def read(self) -> bytes:
        self.check_size()
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class BenchmarkSet:
    root: Path
    split: str
    kind: Kind
    shards: list[Path]
    class_names: Optional[list[str]]  # classification sets only
    templates: Optional[list[str]]  # in dsclip's form ("{}"); None when the set ships none


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def to_dsclip_template(template: str) -> str:
    return template.replace(CLASS_PLACEHOLDER, "{}")


def to_benchmark_template(template: str) -> str:
    return template.replace("{}", CLASS_PLACEHOLDER)


def _dataset_kind(root: Path) -> Kind:
    path = root / DATASET_TYPE
    kind = path.read_text(encoding="utf-8").strip().lower() if path.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise DataSetError(f"{path} says {kind!r}; dsclip reads classification and retrieval sets "
                         "(multi-label sets are not supported)")
    return kind  # type: ignore[return-value]


def read_benchmark(root: str | Path, split: str) -> BenchmarkSet:
    """The set at `root` (a local folder in CLIP_benchmark's layout, see the module docstring)."""
    root = Path(root)
    if "://" in str(root):
        raise DataSetError(f"CLIP_benchmark set {root}: give a local folder; download it first, e.g. "
                         "`huggingface-cli download clip-benchmark/wds_cifar10 --repo-type dataset --local-dir DIR`")
    if not root.is_dir():
        raise FileNotFoundError(f"CLIP_benchmark set {root} is not a folder")
    nshards = root / split / NSHARDS
    if not nshards.is_file():
        splits = sorted(p.parent.name for p in root.glob(f"*/{NSHARDS}"))
        raise DataSetError(f"{root} has no split {split!r} in CLIP_benchmark's layout ({split}/{NSHARDS} is missing); "
                         f"splits found: {splits or 'none'}")
    count = nshards.read_text().strip()
    if not count.isdigit() or int(count) < 1:
        raise DataSetError(f"{nshards} must hold a positive shard count, got {count!r}")
    shards = [root / split / f"{i}.tar" for i in range(int(count))]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{nshards} says {count} shards but {missing[0]} is missing: is the download complete?")
    kind = _dataset_kind(root)
    class_names = templates = None
    if kind == "classification":
        if not (root / CLASSNAMES).is_file():
            raise DataSetError(f"{root} is a classification set without {CLASSNAMES}: write its class names, one per line")
        class_names = _lines(root / CLASSNAMES)
        if (root / TEMPLATES).is_file():
            templates = [to_dsclip_template(t) for t in _lines(root / TEMPLATES)]
            check_templates(templates, str(root / TEMPLATES))
    return BenchmarkSet(root, split, kind, shards, class_names, templates)


def split_member_name(name: str) -> Optional[tuple[str, str]]:
    """(sample key, extension) as webdataset groups members: the key runs to the first dot of the
    file name; None for a name without one."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else None


def index_samples(shards: list[Path]) -> list[dict[str, Member]]:
    """Each sample's members by extension, in shard order, from the tar headers alone (tarfile
    seeks past every member's data)."""
    samples: list[dict[str, Member]] = []
    for shard in shards:
        key = None
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                parts = split_member_name(info.name) if info.isreg() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    key = parts[0]
                    samples.append({})
                samples[-1][parts[1]] = Member(shard, info.offset_data, info.size)
    return samples


def image_member(sample: dict[str, Member]) -> Optional[Member]:
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
