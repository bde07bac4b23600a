"""Recipe section `data:` and its per-kind subsections. Plain dataclasses, no heavy imports."""
from dataclasses import dataclass, field
from typing import Literal

from dsclip.data.templates import SIMPLE_TEMPLATES, check_templates

SYNTHETIC_CLASSES = 24  # (colour, shape) pairs dsclip.data.synthetic draws: 6 colours x 4 shapes


@dataclass
class SyntheticConfig:
    num_classes: int = 12  # (colour, shape) classes used, at most 24
    train_samples: int = 32768  # images per training epoch
    eval_samples: int = 512  # held-out images for zero-shot evaluation (a disjoint seed range)

    def validate(self) -> None:
        if not 2 <= self.num_classes <= SYNTHETIC_CLASSES:
            raise ValueError(f"synthetic.num_classes must be in [2, {SYNTHETIC_CLASSES}], got {self.num_classes}")
        if self.train_samples < 1 or self.eval_samples < 1:
            raise ValueError("synthetic.train_samples and synthetic.eval_samples must be >= 1")


@dataclass
class WebDataConfig:
    urls: list[str] = field(default_factory=list)  # one entry per source: brace pattern, local path or pipe: URL; '::' joins patterns
    weights: list[float] = field(default_factory=list)  # sampling weight per source (resampled only); empty = equal
    resampled: bool = False  # draw shards with replacement (infinite stream cut into nominal epochs)
    train_num_samples: int = 0  # nominal epoch size; required when resampled or when shards have no manifest.json
    shuffle_buffer: int = 1000  # raw samples held per worker for shuffling (0 = no sample shuffle)
    image_key: str = "jpg;jpeg;png;webp"  # sample extensions tried in order for the image
    caption_key: str = "txt;text;caption"  # sample extensions tried in order for the caption
    timeout_s: float = 300.0  # a worker that delivers no batch for this long fails the run (workers > 0)
    shard_retries: int = 3  # a shard that fails to open or read (e.g. a pipe: command) is read again this often, after 1, 2, 4 ... s
    max_member_mb: float = 256.0  # a tar member larger than this is skipped unread (counted as too_large)

    def validate(self) -> None:
        if not self.urls:
            raise ValueError("data.webdataset.urls is empty: give at least one shard pattern, e.g. /data/{00000..00099}.tar")
        if self.weights and len(self.weights) != len(self.urls):
            raise ValueError(f"data.webdataset.weights has {len(self.weights)} entries for {len(self.urls)} urls: give one weight per source")
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"data.webdataset.weights={self.weights}: weights must be > 0")
        if self.weights and len(set(self.weights)) > 1 and not self.resampled:
            raise ValueError("data.webdataset.weights only apply when resampled=true: set resampled=true or drop weights")
        if self.resampled and self.train_num_samples <= 0:
            raise ValueError("data.webdataset.train_num_samples must be > 0 when resampled=true (it sets the epoch length)")
        if self.shuffle_buffer < 0 or self.timeout_s <= 0:
            raise ValueError("data.webdataset.shuffle_buffer must be >= 0 and timeout_s > 0")
        if self.shard_retries < 0 or self.max_member_mb <= 0:
            raise ValueError("data.webdataset.shard_retries must be >= 0 and max_member_mb > 0")


@dataclass
class CsvConfig:
    path: str = ""  # .csv or .tsv file; image paths in it are relative to its folder unless absolute
    image_column: str = "filepath"  # column holding the image path
    caption_column: str = "title"  # column holding the caption
    separator: str = ""  # field separator; "" = tab for .tsv, comma otherwise

    def validate(self) -> None:
        if not self.path:
            raise ValueError("data.csv.path is empty: give the .csv/.tsv file with image paths and captions")
        if len(self.separator) > 1:
            raise ValueError(f"data.csv.separator={self.separator!r} must be one character (or empty for auto)")


@dataclass
class FolderConfig:
    path: str = ""  # root folder with one subfolder of images per class
    templates: list[str] = field(default_factory=lambda: list(SIMPLE_TEMPLATES))  # captions, "{}" = class name

    def validate(self) -> None:
        if not self.path:
            raise ValueError("data.folder.path is empty: give a folder with one subfolder of images per class")
        check_templates(self.templates, "data.folder.templates")


@dataclass
class DataConfig:
    kind: Literal["synthetic", "webdataset", "csv", "folder"] = "synthetic"  # synthetic | webdataset | csv | folder: where training pairs come from
    batch_size: int = 64  # micro-batch per rank
    num_workers: int = 0  # DataLoader worker processes per rank (webdataset, csv, folder)
    worker_timeout_s: float = 300.0  # csv / folder: workers that deliver no batch for this long fail the run (webdataset: data.webdataset.timeout_s)
    reduced_decode: bool = True  # decode a JPEG at 1/2, 1/4 or 1/8 size where its training crop is at least that much larger than the model's input (same crops; webdataset, csv, folder)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # kind: synthetic
    webdataset: WebDataConfig = field(default_factory=WebDataConfig)  # kind: webdataset (tar shards)
    csv: CsvConfig = field(default_factory=CsvConfig)  # kind: csv (image path + caption columns)
    folder: FolderConfig = field(default_factory=FolderConfig)  # kind: folder (one subfolder per class)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"data.worker_timeout_s must be > 0 seconds, got {self.worker_timeout_s}")
        getattr(self, self.kind).validate()  # only the selected source must be complete
